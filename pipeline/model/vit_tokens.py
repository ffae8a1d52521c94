"""Dense tokens of an open_clip CLIP ViT: which towers qualify, the positional embedding at other
input sizes, and the four last-block variants (q-k, MaskCLIP, ClearCLIP, CLIP Surgery).

Pure functions of open_clip's `VisionTransformer` modules (no state, no wrapper): `FrozenViT`
(model/vit.py) calls them. Notation, with x the tokens entering a block (class token first):
a standard block is x + Attn_qk(ln_1 x), then + MLP(ln_2 .); every method's output tokens are
ln_post(.) @ proj. Shapes: B images, T = 1 + h*w tokens, C the tower width, D the joint width.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import nn

from pipeline.config.backbones import vit_config_refusal  # noqa: F401  (the torch-free check, re-exported)
from pipeline.model.attention_pool import multi_head_attention, resize_positional_embedding

VIT_METHODS = ("qk", "maskclip", "clearclip", "clip-surgery")
# FrozenCLIP's path names (ResNet attention pool) -> their ViT counterparts, so that callers asking
# for ("vproj", "vv", "qk") get the value path and the v-v path of whichever tower they hold.
PATH_ALIASES = {"vproj": "maskclip", "vv": "clip-surgery", "surgery": "clip-surgery"}
SURGERY_BLOCKS = 6  # CLIP Surgery's dual path runs through the last 6 blocks


def vit_refusal(visual: Any) -> str | None:
    """Why this image tower is not an OpenAI-style CLIP ViT (class token, ln_pre, plain
    MultiheadAttention blocks, ln_post, proj), or None when it is. Checks modules, not names."""
    if not isinstance(visual, VisionTransformer):
        return f"its image tower is {type(visual).__name__}, not open_clip's VisionTransformer"
    if getattr(visual, "attn_pool", None) is not None:
        return "it pools with an attentional pooler (attn_pool, CoCa-style), not the class token"
    if getattr(visual, "pool_type", "tok") != "tok":
        return f"it pools by {visual.pool_type!r} (e.g. global average pooling), not the class token"
    if getattr(visual, "proj", None) is None:
        return "it has no output projection (proj)"
    for i, block in enumerate(visual.transformer.resblocks):
        if type(block) is not ResidualAttentionBlock:
            return (f"block {i} is {type(block).__name__} (qk-norm / scaled-cosine attention), "
                    "not a plain block")
        if not isinstance(block.attn, nn.MultiheadAttention) or block.attn.in_proj_weight is None:
            return f"block {i}'s attention is not a MultiheadAttention with a joint in_proj_weight"
        if not (isinstance(block.ls_1, nn.Identity) and isinstance(block.ls_2, nn.Identity)):
            return f"block {i} has layer scale (ls_init_value), which OpenAI's blocks do not"
        if hasattr(block, "ln_1_kv"):
            return f"block {i} is a cross-attention block"
    gh, gw = visual.grid_size
    if visual.positional_embedding.shape[0] != 1 + gh * gw:
        return f"its positional embedding has {visual.positional_embedding.shape[0]} rows, not 1 + {gh}x{gw}"
    return None


def surgery_start(layers: int, name: str = "model") -> int:
    """Index of the first block of CLIP Surgery's dual path: the 6th from the end, or block 0
    (with a warning) when the tower has fewer than 6 blocks."""
    if layers < SURGERY_BLOCKS:
        warnings.warn(f"{name}: {layers} blocks < {SURGERY_BLOCKS}: CLIP Surgery's dual path runs "
                      f"through all {layers}", stacklevel=3)
        return 0
    return layers - SURGERY_BLOCKS


def patch_grid(visual: VisionTransformer, height: int, width: int) -> tuple[int, int]:
    """Token grid (h, w) of an HxW input; ValueError unless both sides are multiples of the patch."""
    ph, pw = visual.patch_size
    if height % ph or width % pw:
        raise ValueError(f"input {height}x{width} is not a multiple of the {ph}x{pw} patch size")
    return height // ph, width // pw


def positional_embedding(visual: VisionTransformer, grid: tuple[int, int],
                         mode: str = "bilinear") -> torch.Tensor:
    """The tower's positional embedding (1+h*w, C) for an h x w token grid: the class row kept, the
    learned grid interpolated (align_corners=False, as CLIP Surgery); the tower's own tensor at
    its native grid. Non-square grids both ways (native and target)."""
    return resize_positional_embedding(visual.positional_embedding, grid, mode, native=visual.grid_size)


def embed(visual: VisionTransformer, images: torch.Tensor,
          pos_interpolation: str = "bilinear") -> tuple[torch.Tensor, tuple[int, int]]:
    """open_clip's `_embeds` at any input size: patches, class token first, positional embedding
    (resized), ln_pre. images (B, 3, H, W) -> tokens (B, 1+h*w, C) and the grid (h, w)."""
    grid = patch_grid(visual, images.shape[-2], images.shape[-1])
    x = visual.conv1(images)  # (B, C, h, w)
    x = x.flatten(2).transpose(1, 2)  # (B, hw, C), row-major
    cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], 1, -1)  # (B, 1, C)
    x = torch.cat([cls, x], dim=1) + positional_embedding(visual, grid, pos_interpolation).to(x.dtype)
    x = visual.patch_dropout(x)  # identity in eval mode
    return visual.ln_pre(x), grid  # (B, 1+hw, C)


def run_block(block: ResidualAttentionBlock, x: torch.Tensor, batch_first: bool = True) -> torch.Tensor:
    """The block's own forward (open_clip's code) on batch-first tokens (B, T, C) -> (B, T, C)."""
    if batch_first:
        return block(x)
    return block(x.transpose(0, 1)).transpose(0, 1)  # older towers run sequence-first


def qkv(block: ResidualAttentionBlock, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Query, key and value projections of y (B, T, C) from in_proj_weight/bias: 3 x (B, T, C)."""
    attn = block.attn
    q, k, v = F.linear(y, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    return q, k, v


def value_path(block: ResidualAttentionBlock, x: torch.Tensor) -> torch.Tensor:
    """MaskCLIP's last block: out_proj(v(ln_1 x)); no attention mixing, residual or MLP -> (B, T, C)."""
    _, _, v = qkv(block, block.ln_1(x))
    return block.attn.out_proj(v)


def qq_attention(block: ResidualAttentionBlock, x: torch.Tensor) -> torch.Tensor:
    """ClearCLIP's last block: out_proj(softmax(scale q q^T) v) per head, q and v of ln_1 x;
    no residual, no MLP -> (B, T, C)."""
    q, _, v = qkv(block, block.ln_1(x))
    return block.attn.out_proj(multi_head_attention(q, q, v, block.attn.num_heads))


def vv_attention(block: ResidualAttentionBlock, y: torch.Tensor) -> torch.Tensor:
    """CLIP Surgery's Attn_vv on already-normalised tokens y: out_proj(softmax(scale v v^T) v) per
    head, v the block's own value projection (not normalised) -> (B, T, C)."""
    _, _, v = qkv(block, y)
    return block.attn.out_proj(multi_head_attention(v, v, v, block.attn.num_heads))


def project(visual: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """Tokens (B, T, C) into the joint space: ln_post, then proj -> (B, T, D)."""
    return visual.ln_post(x) @ visual.proj


def trunk(visual: VisionTransformer, x: torch.Tensor,
          surgery_from: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Blocks 0..L-2 on embedded tokens x (B, T, C): the input of the last block, and (when
    `surgery_from` is a block index) CLIP Surgery's path x_s up to that point, else None.

    The surgery path starts at block s as x_s = x + Attn_vv(ln_1 x); each later block adds
    Attn_vv(ln_1 x_orig), x_orig that block's input on the ordinary path (no MLP on x_s).
    """
    blocks = visual.transformer.resblocks
    batch_first = getattr(visual.transformer, "batch_first", True)
    x_s = None
    for i, block in enumerate(blocks[:-1]):
        if surgery_from is not None and i >= surgery_from:
            x_s = (x if x_s is None else x_s) + vv_attention(block, block.ln_1(x))
        x = run_block(block, x, batch_first)
    return x, x_s


def last_block_tokens(visual: VisionTransformer, x: torch.Tensor, x_s: torch.Tensor | None,
                      methods: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Each method's output tokens (B, T, D) from the last block's input x (B, T, C) (and CLIP
    Surgery's path x_s, None when it starts at the last block)."""
    last = visual.transformer.resblocks[-1]
    out = {}
    if "qk" in methods or "clip-surgery" in methods:
        final = run_block(last, x, getattr(visual.transformer, "batch_first", True))  # (B, T, C)
        if "qk" in methods:
            out["qk"] = project(visual, final)
        if "clip-surgery" in methods:
            x_s = (x if x_s is None else x_s) + vv_attention(last, last.ln_1(x))  # (B, T, C)
            # token 0 from the ordinary path, tokens 1..hw from the surgery path
            out["clip-surgery"] = project(visual, torch.cat([final[:, :1], x_s[:, 1:]], dim=1))
    if "maskclip" in methods:
        out["maskclip"] = project(visual, value_path(last, x))
    if "clearclip" in methods:
        out["clearclip"] = project(visual, qq_attention(last, x))
    return out


def resolve_methods(paths: Iterable[str]) -> tuple[tuple[str, ...], dict[str, str]]:
    """Asked names (VIT_METHODS or FrozenCLIP's aliases) -> the methods to run, and asked -> method."""
    asked = {p: PATH_ALIASES.get(p, p) for p in paths}
    unknown = sorted(p for p, m in asked.items() if m not in VIT_METHODS)
    if unknown:
        raise ValueError(f"token paths must be among {VIT_METHODS} (or {tuple(PATH_ALIASES)}), got {unknown}")
    return tuple(m for m in VIT_METHODS if m in asked.values()), asked
