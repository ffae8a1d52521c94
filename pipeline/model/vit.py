"""Frozen CLIP ViT backbone: dense tokens of any open_clip CLIP whose image tower is an OpenAI-style
VisionTransformer (class token, ln_pre, MultiheadAttention blocks, ln_post, proj).

`FrozenViT` mirrors `FrozenCLIP` (model/backbone.py): `spatial_tokens`, `vv_tokens`, `qk_tokens`,
`token_paths`, `global_embedding`, the text features, `embed_dim`, `device`, `weights_digest`.
The token arithmetic lives in model/vit_tokens.py; weights come through backbone.create_clip,
the same path (tag, local checkpoint + sha256, seeded random init) as the ResNet backbone.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.modified_resnet import ModifiedResNet
from torch import nn

from pipeline.model import vit_tokens as vt
from pipeline.model.backbone import _AUTOCAST_DTYPES, FrozenCLIP, FrozenTowers, create_clip
from pipeline.model.weights import WeightsError

TINY_VIT = "tiny-ViT"  # pipeline/model/model_configs/tiny-ViT.json: 64 px, 8 px patches, 7 blocks


class FrozenViT(FrozenTowers):
    """An open_clip CLIP ViT that is never trained: eval mode, no gradients, float32 outputs.

    Token methods (`token_paths`, each (B, 1+h*w, D), class token first, then the h x w patch grid
    row by row, after ln_post and proj): "qk" the ordinary output tokens (the "CLIP" row),
    "maskclip" the last block's value path, "clearclip" the last block's q-q attention,
    "clip-surgery" CLIP Surgery's v-v dual path. FrozenCLIP's names "vproj" and "vv" mean
    "maskclip" and "clip-surgery" here. Other input sizes resize the patch part of the positional
    embedding (bilinear by default, class row kept); sides must be multiples of the patch size.
    ``channels_last`` is accepted for FrozenCLIP's signature and ignored (no convolutional trunk).
    """

    def __init__(self, model: nn.Module, name: str, weights_digest: str, device: str = "cpu",
                 precision: str = "fp32", channels_last: bool = False, compile: bool = False):
        super().__init__()
        reason = vt.vit_refusal(getattr(model, "visual", None))
        if reason is not None:
            raise WeightsError(f"{name}: dense ViT tokens need an OpenAI-style CLIP ViT (class token, "
                               f"plain attention blocks, ln_post, proj), but {reason}")
        if precision not in _AUTOCAST_DTYPES:
            raise ValueError(f"precision must be one of {sorted(_AUTOCAST_DTYPES)}, got {precision!r}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.model.requires_grad_(False)
        self.name = name
        self.weights_digest = weights_digest
        self.precision = precision
        self.channels_last = False  # no convolutional trunk to lay out
        visual: Any = model.visual  # open_clip's VisionTransformer: untyped attributes
        self.embed_dim: int = visual.output_dim
        self.width: int = visual.transformer.width
        self.layers: int = len(visual.transformer.resblocks)
        self.num_heads: int = visual.transformer.resblocks[-1].attn.num_heads
        height, width = visual.image_size
        self.image_size: int | tuple[int, int] = height if height == width else (height, width)
        ph, pw = visual.patch_size
        self.stride: int | tuple[int, int] = ph if ph == pw else (ph, pw)  # input pixels per token side
        self.surgery_from: int = vt.surgery_start(self.layers, name)
        self.compiled = compile
        self._trunk = torch.compile(self._trunk_eager) if compile else self._trunk_eager
        self.tokenizer = open_clip.get_tokenizer(name)
        self.eval()

    @property
    def default_tokens(self) -> str:
        return "maskclip"

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        return images.to(self.device, torch.float32, non_blocking=True)

    def _trunk_eager(self, images: torch.Tensor, pos_interpolation: str,
                     surgery: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Embedding and blocks 0..L-2: (last block's input (B, T, C), CLIP Surgery's path or None)."""
        x, _ = vt.embed(self.model.visual, images, pos_interpolation)  # (B, 1+hw, C)
        return vt.trunk(self.model.visual, x, self.surgery_from if surgery else None)

    @torch.no_grad()
    def token_paths(self, images: torch.Tensor, paths: Iterable[str] = vt.VIT_METHODS,
                    pos_interpolation: str = "bilinear") -> dict[str, torch.Tensor]:
        """Several token methods from ONE pass through blocks 0..L-2 (each last-block variant from
        the same input): images (B, 3, H, W), CLIP-normalised -> {asked name: (B, 1+h*w, D) float32},
        h, w = H, W / patch size. Names: VIT_METHODS, or FrozenCLIP's "vproj" / "vv" / "qk"."""
        methods, asked = vt.resolve_methods(tuple(paths))
        with self._autocast():
            x, x_s = self._trunk(self._prepare(images), pos_interpolation, "clip-surgery" in methods)
            tokens = vt.last_block_tokens(self.model.visual, x, x_s, methods)
        return {name: tokens[method].float() for name, method in asked.items()}

    def spatial_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """MaskCLIP's value-path tokens (B, 1+h*w, D), the ViT counterpart of DualCoOp's spatial
        tokens (the value and output projections applied per token, no attention mixing)."""
        return self.token_paths(images, ("maskclip",))["maskclip"]

    def vv_tokens(self, images: torch.Tensor, pos_interpolation: str = "bilinear") -> torch.Tensor:
        """CLIP Surgery's tokens (B, 1+h*w, D): v-v dual path through the last 6 blocks, token 0
        from the ordinary path."""
        return self.token_paths(images, ("clip-surgery",), pos_interpolation)["clip-surgery"]

    def qk_tokens(self, images: torch.Tensor, pos_interpolation: str = "bilinear") -> torch.Tensor:
        """The ordinary output tokens (B, 1+h*w, D) (the "CLIP" row); token 0 is encode_image's output."""
        return self.token_paths(images, ("qk",), pos_interpolation)["qk"]

    def maskclip_tokens(self, images: torch.Tensor, pos_interpolation: str = "bilinear") -> torch.Tensor:
        return self.token_paths(images, ("maskclip",), pos_interpolation)["maskclip"]

    def clearclip_tokens(self, images: torch.Tensor, pos_interpolation: str = "bilinear") -> torch.Tensor:
        return self.token_paths(images, ("clearclip",), pos_interpolation)["clearclip"]

    def global_embedding(self, images: torch.Tensor, pos_interpolation: str = "bilinear") -> torch.Tensor:
        """CLIP's image embedding (B, D): encode_image at the native size (the class token of "qk")."""
        return self.qk_tokens(images, pos_interpolation)[:, 0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.spatial_tokens(images)


def frozen_backbone(model: nn.Module, name: str, weights_digest: str,
                    **options: Any) -> FrozenCLIP | FrozenViT:
    """FrozenCLIP for a ModifiedResNet image tower, FrozenViT for an OpenAI-style ViT; anything
    else is refused in one line (WeightsError naming the model and what its tower does)."""
    if isinstance(getattr(model, "visual", None), ModifiedResNet):
        return FrozenCLIP(model, name, weights_digest, **options)
    return FrozenViT(model, name, weights_digest, **options)


def load_vit(name: str = "ViT-B-16", pretrained: str | None = "openai",
             checkpoint: str | Path | None = None, sha256: str | None = None,
             device: str = "cpu", precision: str = "fp32", channels_last: bool = False,
             compile: bool = False, init_seed: int = 0, quick_gelu: bool | None = None) -> FrozenViT:
    """`load_backbone` for a ViT: the same weights path (backbone.create_clip), wrapped in FrozenViT."""
    model, digest = create_clip(name, pretrained, checkpoint, sha256, init_seed, quick_gelu)
    return FrozenViT(model, name, digest, device=device, precision=precision,
                     channels_last=channels_last, compile=compile)


def load_any_backbone(name: str, pretrained: str | None = "openai",
                      checkpoint: str | Path | None = None, sha256: str | None = None,
                      device: str = "cpu", precision: str = "fp32", channels_last: bool = False,
                      compile: bool = False, init_seed: int = 0,
                      quick_gelu: bool | None = None) -> FrozenCLIP | FrozenViT:
    """`load_backbone` for either tower: the wrapper is chosen by the built model's structure."""
    model, digest = create_clip(name, pretrained, checkpoint, sha256, init_seed, quick_gelu)
    return frozen_backbone(model, name, digest, device=device, precision=precision,
                           channels_last=channels_last, compile=compile)

