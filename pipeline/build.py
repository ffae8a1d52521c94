"""Turn params into objects (device, frozen backbone, head) in one place, so every stage agrees."""
from __future__ import annotations

import torch

from pipeline.backbone import FrozenCLIP, load_backbone
from pipeline.heads import UnmixHead


def resolve_device(spec: str | None = "auto") -> torch.device:
    """'auto' -> the first CUDA device when present, else CPU."""
    if spec in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def backbone_from_params(params: dict, device: torch.device | None = None) -> FrozenCLIP:
    b = params["backbone"]
    pretrained = None if b["checkpoint"] else b["pretrained"]
    return load_backbone(
        b["name"],
        pretrained=pretrained,
        checkpoint=b["checkpoint"],
        sha256=b["sha256"],
        device=device or resolve_device(b["device"]),
        precision=b["precision"],
        channels_last=b["channels_last"],
        compile=b["compile"],
        init_seed=b["init_seed"],
    )


def head_from_params(model: dict, embed_dim: int) -> UnmixHead:
    """`model` is the params['model'] section (stored in checkpoints to rebuild the head)."""
    return UnmixHead(
        embed_dim,
        proj_dim=model["proj_dim"],
        text_hidden=model["text_hidden"],
        image_projector=model["image_projector"],
        softmax_mode=model["softmax"],
        text_bn=model.get("text_bn", "train"),  # projectors saved before the recipes trained in train mode
    )
