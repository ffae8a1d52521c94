"""Score maps and labels for free-text segmentation (the API's adapter onto pipeline/segmentation.py).

Everything the API and the `segment` / `query` commands compute per pixel goes through the few
functions here, so that they can be re-pointed at other method definitions in one place.
Methods (today's pipeline/segmentation.py meaning):
  "clip"     DualCoOp spatial tokens c_proj(v_proj(x)) vs raw CLIP text;
  "clip-vv"  CLIP Surgery's v-v tokens vs raw CLIP text;
  "ours"     v-v tokens through the image projector vs text through the text projector.
Maps to labels: every class's cosine map is min-max normalised over the image's tokens, upsampled
bilinearly to the image's own size, and a pixel takes argmax_c n_c (label k + 1 for class k).
Background rules (label 0):
  "none"      never (argmax over the classes only);
  "softmax"   where max_c softmax_c(100 n(x)) < threshold (GEM's rule), after the upsampling;
  "max-score" where max_c n_c(x) < threshold.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from pipeline.heads import UnmixHead, positive_scores, region_logits
from pipeline.segmentation import METHOD_LABELS, cosine_maps, normalise_minmax, token_grid, upsample

METHODS = ("clip", "clip-vv", "ours")
LABELS = {m: METHOD_LABELS[m] for m in METHODS}
BACKGROUND_RULES = ("none", "softmax", "max-score")
SOFTMAX_SCALE = 100.0  # GEM: softmax over the classes of 100 x the normalised maps
BACKGROUND = 0  # label of background; class k is k + 1 under every rule


@torch.no_grad()
def method_maps(spatial: Tensor, vv: Tensor, head: UnmixHead, raw_text: Tensor, projected_text: Tensor,
                methods: Sequence[str]) -> dict[str, Tensor]:
    """Cosine maps (B, C, h, w) float32 per method from one trunk pass's tokens (B, 1+hw, D)."""
    maps: dict[str, Tensor] = {}
    for method in methods:
        if method == "clip":
            maps[method] = cosine_maps(token_grid(spatial), raw_text.to(spatial.device))
        elif method == "clip-vv":
            maps[method] = cosine_maps(token_grid(vv), raw_text.to(vv.device))
        elif method == "ours":
            projected = head.project_tokens(vv.to(projected_text.device))  # (B, 1+hw, D')
            maps[method] = cosine_maps(token_grid(projected), projected_text)
        else:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return {m: s.float() for m, s in maps.items()}


def normalised_maps(scores: Tensor, size: tuple[int, int]) -> Tensor:
    """One image's cosine maps (C, h, w) -> normalised maps (C, H, W) in [0, 1] at the image size."""
    return upsample(normalise_minmax(scores), size)


def label_map(normalised: Tensor, rule: str, threshold: float) -> Tensor:
    """Normalised maps (C, H, W) -> labels (H, W) int64: 0 background, k + 1 class k."""
    if rule not in BACKGROUND_RULES:
        raise ValueError(f"background must be one of {BACKGROUND_RULES}, got {rule!r}")
    best, label = normalised.max(dim=0)  # (H, W) each
    if rule == "none":
        return label + 1
    if rule == "softmax":
        best = (SOFTMAX_SCALE * normalised).softmax(dim=0).max(dim=0).values  # (H, W)
    return torch.where(best < threshold, BACKGROUND, label + 1)


@torch.no_grad()
def image_scores(head: UnmixHead, spatial: Tensor, text_neg: Tensor, text_pos: Tensor,
                 stats: str) -> Tensor:
    """Image-level class scores (B, C) in [0, 1]: the head's region logits on the spatial tokens
    (what it was trained on) with the negative / positive prompts, positive channel.

    The same arithmetic as UnmixHead.forward, with the text BatchNorm statistics chosen per call:
    [neg; pos] (2C, D) go through the projector together.
    """
    device = next(head.parameters()).device
    text = head.project_text(torch.cat([text_neg, text_pos]).to(device), stats=stats)  # (2C, D')
    image = head.project_tokens(spatial.to(device))  # (B, 1+hw, D')
    return positive_scores(region_logits(image, text, head.softmax_mode)).float()  # (B, C)
