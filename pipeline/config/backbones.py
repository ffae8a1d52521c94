"""Which `backbone.name`s the params accept, and what a name implies, read from open_clip's model
configs as JSON (no torch import: this is the config layer).

Accepted: open_clip's ModifiedResNet CLIPs (RN50, RN101, RN50x4, ...) and OpenAI-architecture ViT
CLIPs (ViT-B-16, ViT-B-32, ViT-L-14, ViT-L-14-336, ...: class token, plain attention blocks, ln_post
and proj, open_clip's own text transformer), plus this project's tiny-RN and tiny-ViT. Refused in
one line: towers that pool or attend otherwise (SigLIP, EVA and other timm towers, CoCa, CLIPA's
average pooling, layer scale) and Hugging Face text towers. A name fixes the token stride (32 input
pixels for a ModifiedResNet, the patch size for a ViT), which every image size must be a multiple
of, and the token methods the backbone has (`token_methods`).
"""
from __future__ import annotations

import importlib.util
import json
from functools import cache
from pathlib import Path
from typing import Any

from pipeline.config.schema import Params
from pipeline.errors import ParamError

MODEL_CONFIGS_DIR = Path(__file__).resolve().parent.parent / "model" / "model_configs"  # ours
RESNET_STRIDE = 32  # ModifiedResNet: layer4 is 1/32 of the input side
# Token methods per tower (FrozenCLIP.token_paths / FrozenViT.token_paths; docs/METHOD.md).
# "auto" in params means the first of the pair below: what the projectors train on / ZS3 scores.
RESNET_TOKENS = ("vproj", "vv", "qk", "surgery")
VIT_TOKENS = ("maskclip", "clip-surgery", "qk", "clearclip")
AUTO_TOKENS = {"resnet": {"train": "vproj", "seg": "vv"}, "vit": {"train": "maskclip", "seg": "clip-surgery"}}
_CUSTOM_BLOCK_KEYS = ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn",
                      "scale_fc")


def _config_dirs() -> list[Path]:
    dirs = [MODEL_CONFIGS_DIR]
    spec = importlib.util.find_spec("open_clip")
    if spec and spec.origin:
        dirs.append(Path(spec.origin).parent / "model_configs")
    return dirs


@cache
def model_configs() -> dict[str, dict[str, Any]]:
    """{name: open_clip config} of ours and open_clip's JSON configs (ours win a clash)."""
    out: dict[str, dict[str, Any]] = {}
    for d in reversed(_config_dirs()):
        out.update({p.stem: json.loads(p.read_text()) for p in sorted(d.glob("*.json"))})
    return out


def vit_config_refusal(vision_cfg: dict) -> str | None:
    """model.vit_tokens.vit_refusal read from an open_clip config's "vision_cfg": None when open_clip
    builds an OpenAI-style VisionTransformer from it (class token, plain blocks, ln_post, proj)."""
    if vision_cfg.get("timm_model_name"):
        return "its image tower is a timm model, not open_clip's VisionTransformer"
    if isinstance(vision_cfg.get("layers"), (list, tuple)):
        return "its image tower is a ModifiedResNet, not open_clip's VisionTransformer"
    if vision_cfg.get("attentional_pool"):
        return "it pools with an attentional pooler (attn_pool, CoCa-style), not the class token"
    pool = vision_cfg.get("pool_type", "tok")
    if pool != "tok":
        return f"it pools by {pool!r} (e.g. global average pooling), not the class token"
    if vision_cfg.get("block_type", "default") not in (None, "default") or any(
            vision_cfg.get(k) for k in _CUSTOM_BLOCK_KEYS):
        return "its blocks are custom (qk-norm / scaled-cosine attention), not plain blocks"
    if vision_cfg.get("ls_init_value") is not None:
        return "its blocks have layer scale (ls_init_value), which OpenAI's blocks do not"
    return None


def config_refusal(config: dict[str, Any]) -> str | None:
    """Why a whole open_clip config is neither a ModifiedResNet CLIP nor an OpenAI-architecture ViT."""
    vision = config.get("vision_cfg") or {}
    text = config.get("text_cfg") or {}
    if config.get("multimodal_cfg"):
        return "it is a CoCa model (a captioning decoder beside the towers)"
    if text.get("hf_model_name") or text.get("hf_tokenizer_name"):
        return "its text tower or tokenizer comes from Hugging Face, not OpenAI's text transformer"
    if isinstance(vision.get("layers"), (list, tuple)):
        return None if not vision.get("timm_model_name") else "its image tower is a timm model"
    return vit_config_refusal(vision)


def backbone_kind(name: str) -> str:
    """"resnet" or "vit" for an accepted name; ParamError naming backbone.name otherwise."""
    config = model_configs().get(name)
    if config is None:
        near = sorted(n for n in model_configs() if config_refusal(model_configs()[n]) is None)
        raise ParamError(f"parameter 'backbone.name': no open_clip model config named {name!r} (known: "
                         f"{', '.join(near)})")
    reason = config_refusal(config)
    if reason is not None:
        raise ParamError(f"parameter 'backbone.name': {name} is not a ModifiedResNet or an OpenAI-style "
                         f"ViT CLIP: {reason}; use e.g. RN101 or ViT-B-16")
    return "resnet" if isinstance(config["vision_cfg"].get("layers"), (list, tuple)) else "vit"


def known_backbones() -> set[str]:
    """Every accepted backbone name (ModifiedResNet and OpenAI-style ViT CLIPs, ours included)."""
    return {n for n, c in model_configs().items() if config_refusal(c) is None}


def token_stride(name: str) -> int:
    """Input pixels per token side: 32 for a ModifiedResNet, the patch size for a ViT."""
    if backbone_kind(name) == "resnet":
        return RESNET_STRIDE
    return int(model_configs()[name]["vision_cfg"]["patch_size"])


def token_methods(name: str) -> tuple[str, ...]:
    """The token methods `name`'s backbone computes (RESNET_TOKENS or VIT_TOKENS)."""
    return RESNET_TOKENS if backbone_kind(name) == "resnet" else VIT_TOKENS


def resolve_tokens(name: str, role: str, value: str) -> str:
    """A token-method parameter's value for this backbone: "auto" -> AUTO_TOKENS[kind][role]."""
    return AUTO_TOKENS[backbone_kind(name)][role] if value == "auto" else value


def check_backbone(params: Params) -> Params:
    """The validated params after the checks that need the backbone: its name is accepted, every image size is a multiple
    of its token stride, the token methods are its own ("auto" resolved in place), and
    `backbone.recalibrate_bn` only for a ResNet. ParamError (one line, naming the key) otherwise."""
    b = params.backbone
    kind = backbone_kind(b.name)
    stride = token_stride(b.name)
    what = "token stride (layer4 is 1/32 of the input)" if kind == "resnet" else "patch size"
    for key, size in (("backbone.image_size", b.image_size),
                      ("evaluate.seg.image_size", params.evaluate.seg.image_size),
                      ("evaluate.zs_mlr.image_size", params.evaluate.zs_mlr.image_size)):
        if size % stride:
            raise ParamError(f"parameter '{key}' must be a positive multiple of {stride}, {b.name}'s "
                             f"{what}, got {size}")
    if kind == "vit" and b.recalibrate_bn:
        raise ParamError(f"parameter 'backbone.recalibrate_bn': {b.name} is a ViT, whose LayerNorms have "
                         "no running statistics to recalibrate: set it false")
    methods = token_methods(b.name)
    for key, section, role in (("extract.tokens", params.extract, "train"),
                               ("evaluate.seg.tokens", params.evaluate.seg, "seg")):
        value = resolve_tokens(b.name, role, section.tokens)
        if value not in methods:
            raise ParamError(f"parameter '{key}' must be a token method of {b.name} "
                             f"({', '.join(('auto', *methods))}), got {section.tokens!r}")
        section.tokens = value  # type: ignore[assignment]  # a method name of the Literal
    if kind == "resnet" and "clearclip" in params.evaluate.seg.methods:
        raise ParamError(f"parameter 'evaluate.seg.methods': clearclip is a ViT method (ClearCLIP's "
                         f"last block), {b.name} is a ResNet: remove it")
    return params
