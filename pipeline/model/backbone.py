"""Frozen CLIP ResNet backbone: spatial tokens (DualCoOp), v-v tokens (the paper's description of
CLIP Surgery's attention), CLIP Surgery's released attention pool, q-k tokens (the pool's own
attention per token), text features.

The attention pool of open_clip's ModifiedResNet is never used to pool here: its weights are
applied per token so that every image location gets a vector in CLIP's joint space. All the
arithmetic on the pool's weights lives in pipeline/model/attention_pool.py, with shapes at every
reshape.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from torch import nn

from pipeline.model import attention_pool
from pipeline.model.attention_pool import (
    resize_positional_embedding,
)
from pipeline.model.weights import WeightsError, load_checkpoint, quiet_open_clip, sha256_file

TINY_MODEL = "tiny-RN"
open_clip.add_model_config(Path(__file__).resolve().parent / "model_configs")

# Authors' prompts for training (no full stop) and the paper's prompt for MFI / ZS3 (full stop).
POSITIVE_TEMPLATE = "A photo of a {}"
NEGATIVE_TEMPLATE = "Not a photo of a {}"
PLAIN_TEMPLATE = "A photo of a {}."

_AUTOCAST_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
_TEXT_CHUNK = 256  # prompts per encode_text call
TOKEN_PATHS = ("vproj", "vv", "qk", "surgery")  # per-token paths of the attention pool (see token_paths)


class FrozenTowers(nn.Module):
    """What every frozen CLIP wrapper shares (FrozenCLIP for ResNets, model.vit.FrozenViT for ViTs):
    eval mode for good, the precision's autocast, and the text tower. Subclasses set the attributes
    below and give the token methods (`spatial_tokens`, `token_paths`, `global_embedding`): every
    stage types its backbone as FrozenTowers and so runs either tower."""

    model: Any
    device: torch.device
    precision: str
    tokenizer: Any
    name: str
    weights_digest: str
    embed_dim: int
    image_size: int | tuple[int, int]
    stride: int | tuple[int, int]  # input pixels per token side
    channels_last: bool
    compiled: bool

    @property
    def default_tokens(self) -> str:
        """The token path `spatial_tokens` gives (what the projectors train on by default)."""
        raise NotImplementedError

    def spatial_tokens(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def token_paths(self, images: torch.Tensor, paths: Iterable[str] = (),
                    pos_interpolation: str = "bilinear") -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def global_embedding(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def tokens(self, images: torch.Tensor, method: str | None = None) -> torch.Tensor:
        """One token method's tokens (B, 1+hw, D) float32; None: `spatial_tokens` (the default)."""
        if method is None or method == self.default_tokens:
            return self.spatial_tokens(images)
        return self.token_paths(images, (method,))[method]

    def train(self, mode: bool = True) -> FrozenTowers:
        """Stay in eval mode: BatchNorm statistics of a frozen backbone must not drift, and a ViT's
        patch dropout stays off."""
        return super().train(False)

    def _autocast(self) -> contextlib.AbstractContextManager:
        dtype = _AUTOCAST_DTYPES[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    @torch.no_grad()
    def text_features(self, prompts: list[str], normalise: bool = True) -> torch.Tensor:
        """CLIP text embeddings (P, D) float32 of the prompts, in order; L2-normalised unless
        `normalise` is False (the raw encode_text output the authors' training feeds the projector)."""
        chunks = []
        for start in range(0, len(prompts), _TEXT_CHUNK):
            tokens = self.tokenizer(list(prompts[start:start + _TEXT_CHUNK])).to(self.device)  # (p, 77)
            with self._autocast():
                chunks.append(self.model.encode_text(tokens).float())  # (p, D)
        raw = torch.cat(chunks)  # (P, D)
        return F.normalize(raw, dim=-1) if normalise else raw

    def class_text_features(self, classnames: list[str], normalise: bool = True) -> dict[str, torch.Tensor]:
        """Per class: positive / negative training prompts and the plain prompt, each (C, D)."""
        templates = {"positive": POSITIVE_TEMPLATE, "negative": NEGATIVE_TEMPLATE,
                     "plain": PLAIN_TEMPLATE}
        prompts = [t.format(c) for t in templates.values() for c in classnames]
        features = self.text_features(prompts, normalise).split(len(classnames))  # 3 x (C, D)
        return dict(zip(templates, features))


class FrozenCLIP(FrozenTowers):
    """An open_clip ResNet CLIP that is never trained: eval mode, no gradients, float32 outputs.

    ``precision`` "fp16"/"bf16" runs the towers under autocast (weights stay fp32); outputs are
    cast back to float32 so caches and heads never see half precision by accident.
    """

    def __init__(self, model: nn.Module, name: str, weights_digest: str, device: str = "cpu",
                 precision: str = "fp32", channels_last: bool = False, compile: bool = False):
        super().__init__()
        if not isinstance(model.visual, ModifiedResNet):
            raise TypeError(f"{name}: spatial tokens need a ModifiedResNet image tower (RN50, RN101, ...)")
        if precision not in _AUTOCAST_DTYPES:
            raise ValueError(f"precision must be one of {sorted(_AUTOCAST_DTYPES)}, got {precision!r}")
        self.device = torch.device(device)
        self.model: Any = model.to(self.device).eval()  # open_clip's CLIP: untyped attributes
        self.model.requires_grad_(False)
        self.name = name
        self.weights_digest = weights_digest
        self.precision = precision
        self.channels_last = channels_last
        if channels_last:
            self.model.visual.to(memory_format=torch.channels_last)
        self.compiled = compile
        self._trunk = torch.compile(self._trunk_eager) if compile else self._trunk_eager
        self.tokenizer = open_clip.get_tokenizer(name)
        self.embed_dim: int = model.visual.output_dim
        self.num_heads: int = model.visual.attnpool.num_heads
        self.image_size: int = model.visual.image_size
        self.stride: int = 32  # input pixels per token side: layer4 is 1/32 of the input
        self.eval()

    @property
    def default_tokens(self) -> str:
        return "vproj"

    def _trunk_eager(self, images: torch.Tensor) -> torch.Tensor:
        visual = self.model.visual
        x = visual.stem(images)  # (B, w, H/4, W/4)
        return visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))  # (B, 32w, H/32, W/32)

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, torch.float32, non_blocking=True)  # pinned by the DataLoader
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def _trunk_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """[mean token; HW tokens] of the trunk's feature map -> (B, 1+HW, C), and (H, W)."""
        x = self._trunk(self._prepare(images))  # (B, C, H, W)
        size = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        return torch.cat([x.mean(dim=1, keepdim=True), x], dim=1), size  # (B, 1+HW, C)

    def _with_pos(self, x: torch.Tensor, size: tuple[int, int], pos_interpolation: str) -> torch.Tensor:
        """Attention-pool inputs: tokens + the positional embedding resized to `size` -> (B, 1+HW, C)."""
        pos = resize_positional_embedding(
            self.model.visual.attnpool.positional_embedding, size, pos_interpolation)  # (1+HW, C)
        return x + pos.to(x.dtype)

    def _pool_inputs(self, images: torch.Tensor, pos_interpolation: str) -> torch.Tensor:
        return self._with_pos(*self._trunk_tokens(images), pos_interpolation)  # (B, 1+HW, C)

    def _value_path(self, x: torch.Tensor) -> torch.Tensor:
        return attention_pool.value_path(self.model.visual.attnpool, x)  # (B, 1+HW, D)

    def _vv_attention(self, x: torch.Tensor) -> torch.Tensor:
        return attention_pool.vv_attention(self.model.visual.attnpool, x, self.num_heads)

    def _surgery_attention(self, x: torch.Tensor) -> torch.Tensor:
        return attention_pool.surgery_attention(self.model.visual.attnpool, x, self.num_heads)

    def _qk_attention(self, x: torch.Tensor) -> torch.Tensor:
        return attention_pool.qk_attention(self.model.visual.attnpool, x, self.num_heads)

    def _qk_first_token(self, x: torch.Tensor) -> torch.Tensor:
        return attention_pool.qk_first_token(self.model.visual.attnpool, x, self.num_heads)

    @torch.no_grad()
    def spatial_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """DualCoOp's spatial tokens: c_proj(v_proj(x)) per token, positional grid resized bicubically.

        images (B, 3, H, W) normalised with CLIP_MEAN/CLIP_STD (data.augment) -> (B, 1+HW', D) float32, the
        mean token first, then the H/32 x W/32 grid in row-major order.
        """
        with self._autocast():
            tokens = self._value_path(self._pool_inputs(images, "bicubic"))  # (B, 1+HW, D)
        return tokens.float()

    @torch.no_grad()
    def vv_tokens(self, images: torch.Tensor, pos_interpolation: str = "bilinear") -> torch.Tensor:
        """v-v attention tokens as the paper describes CLIP Surgery's attention -> (B, 1+HW, D) float32.

        Every token attends with query = key = value = v_proj(x) (per head, scale head_dim^-0.5,
        softmax over all 1+HW tokens), then c_proj; no residual. Token 0 keeps the ordinary q-k
        attention output of the pool (q_proj/k_proj/v_proj), as docs/METHOD.md "Backbone and spatial tokens" states. Note that
        CLIP Surgery's code fills its qkv with v_proj three times, so its "original" token 0 is
        v-v attention too; this path follows the paper's description, `surgery_tokens` the released
        code. CLIP Surgery resizes the positional grid bilinearly (the default here), DualCoOp
        bicubically.
        """
        with self._autocast():
            tokens = self._vv_attention(self._pool_inputs(images, pos_interpolation))  # (B, 1+HW, D)
        return tokens.float()

    @torch.no_grad()
    def surgery_tokens(self, images: torch.Tensor, pos_interpolation: str = "bilinear") -> torch.Tensor:
        """CLIP Surgery's released ResNet tokens (`_surgery_attention`) -> (B, 1+HW, D) float32:
        grid tokens from its surgery path, token 0 from its original path (both v-v)."""
        return self.token_paths(images, ("surgery",), pos_interpolation)["surgery"]

    @torch.no_grad()
    def qk_tokens(self, images: torch.Tensor, pos_interpolation: str = "bilinear") -> torch.Tensor:
        """The attention pool's own q-k output for every token (paper Table 2's "CLIP" row):
        images (B, 3, H, W) -> (B, 1+HW', D) float32; token 0 equals `global_embedding` at the
        native size (there both grids are the same)."""
        return self.token_paths(images, ("qk",), pos_interpolation)["qk"]

    @torch.no_grad()
    def token_paths(self, images: torch.Tensor, paths: Iterable[str] = TOKEN_PATHS,
                    pos_interpolation: str = "bilinear") -> dict[str, torch.Tensor]:
        """Several per-token paths of the attention pool from ONE trunk pass (the trunk is ~all of
        the cost): "vproj" = `spatial_tokens` (bicubic positional grid, DualCoOp), "vv" =
        `vv_tokens`, "qk" = `qk_tokens`, "surgery" = `surgery_tokens` (the last three with
        `pos_interpolation`). Each (B, 1+HW', D) float32."""
        paths = tuple(paths)
        unknown = set(paths) - set(TOKEN_PATHS)
        if unknown:
            raise ValueError(f"token paths must be among {TOKEN_PATHS}, got {sorted(unknown)}")
        out = {}
        with self._autocast():
            x, size = self._trunk_tokens(images)  # (B, 1+HW, C)
            if "vproj" in paths:
                out["vproj"] = self._value_path(self._with_pos(x, size, "bicubic"))  # (B, 1+HW, D)
            if {"vv", "qk", "surgery"} & set(paths):
                pooled = self._with_pos(x, size, pos_interpolation)  # (B, 1+HW, C)
                if "vv" in paths:
                    out["vv"] = self._vv_attention(pooled)  # (B, 1+HW, D)
                if "qk" in paths:
                    out["qk"] = self._qk_attention(pooled)  # (B, 1+HW, D)
                if "surgery" in paths:
                    out["surgery"] = self._surgery_attention(pooled)  # (B, 1+HW, D)
        return {k: v.float() for k, v in out.items()}

    @torch.no_grad()
    def global_embedding(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP's image embedding (B, D): model.encode_image at the native size.

        At other sizes the positional grid is resized bicubically (encode_image itself would fail).
        """
        with self._autocast():
            embedding = self._qk_first_token(self._pool_inputs(images, "bicubic"))  # (B, D)
        return embedding.float()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.spatial_tokens(images)


def _create_random(name: str, init_seed: int, quick_gelu: bool) -> nn.Module:
    """open_clip's own initialisation, seeded in a forked RNG: identical weights in every process."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        with quiet_open_clip():  # its "initialized randomly" line misleads when a checkpoint follows
            return open_clip.create_model(name, pretrained=None, force_quick_gelu=quick_gelu)


def create_clip(name: str, pretrained: str | None = "openai", checkpoint: str | Path | None = None,
                sha256: str | None = None, init_seed: int = 0,
                quick_gelu: bool | None = None) -> tuple[nn.Module, str]:
    """The open_clip CLIP model (any image tower) and its weights digest; see `load_backbone`.

    ``checkpoint`` (checked against ``sha256`` when given) wins over ``pretrained``; OpenAI's
    TorchScript archives load directly. ``pretrained`` None or "random" gives open_clip's random
    init seeded by ``init_seed``. ``quick_gelu`` None means: the tag's own setting for a tag, True
    otherwise (OpenAI's CLIP was trained with QuickGELU). The digest is "<name>:<tag>", the
    checkpoint's sha256, or "random:<init_seed>".
    """
    if sha256 is not None and checkpoint is None:
        raise ValueError("sha256 given without a checkpoint: nothing to check it against")
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, sha256)
        model = _create_random(name, init_seed, quick_gelu is not False)  # architecture only
        # Buffers the model rebuilds itself (attn_mask) are saved by TorchScript but not loadable.
        rebuilt = {k for k, _ in model.named_buffers()} - set(model.state_dict())
        state = {k: v for k, v in state.items() if k not in rebuilt}
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise WeightsError(f"{checkpoint}: does not match architecture {name}: {e}") from e
        digest = sha256.strip().lower() if sha256 is not None else sha256_file(checkpoint)
    elif pretrained is None or pretrained == "random":
        model = _create_random(name, init_seed, quick_gelu is not False)
        digest = f"random:{init_seed}"
    else:
        if quick_gelu is None:
            quick_gelu = bool(open_clip.get_pretrained_cfg(name, pretrained).get("quick_gelu", False))
        try:
            model = open_clip.create_model(name, pretrained=pretrained, force_quick_gelu=quick_gelu)
        except RuntimeError as e:
            raise WeightsError(
                f"pretrained weights {name}:{pretrained} could not be loaded ({e}); offline, pass "
                f"checkpoint=<path to the downloaded file> (and sha256) instead") from e
        digest = f"{name}:{pretrained}"
    return model, digest


def load_backbone(name: str = "RN101", pretrained: str | None = "openai",
                  checkpoint: str | Path | None = None, sha256: str | None = None,
                  device: str = "cpu", precision: str = "fp32", channels_last: bool = False,
                  compile: bool = False, init_seed: int = 0,
                  quick_gelu: bool | None = None) -> FrozenCLIP:
    """Build the frozen backbone from a local checkpoint, an open_clip pretrained tag, or at random.

    ``checkpoint`` (checked against ``sha256`` when given) wins over ``pretrained``; OpenAI's
    TorchScript RN101.pt / RN50.pt load directly. ``pretrained`` None or "random" gives
    open_clip's random init seeded by ``init_seed``. ``quick_gelu`` None means: the tag's own
    setting for a tag, True otherwise (OpenAI's CLIP was trained with QuickGELU).
    ``weights_digest`` is "<name>:<tag>", the checkpoint's sha256, or "random:<init_seed>".
    """
    model, digest = create_clip(name, pretrained, checkpoint, sha256, init_seed, quick_gelu)
    return FrozenCLIP(model, name, digest, device=device, precision=precision,
                      channels_last=channels_last, compile=compile)
