"""Score maps and labels for free-text segmentation: the API's view of pipeline/evaluation/segmentation.py.

The `segment` / `query` commands and `UnmixCLIP.segment` use exactly the evaluation's method
definitions (segmentation.METHODS: q-k CLIP, DualCoOp v-proj, CLIP Surgery, CLIP-VV, ours,
CLIP Surgery + ours), its min-max normalisation and upsampling, and its background rules
(none | softmax | max-score); this module only selects and names them for free text.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from pipeline.evaluation.segmentation import (
    BACKGROUND_RULES,
    PROJECTED,
    TOKEN_PATH,
    maps_from_tokens,
    method_path,
    normalised_maps,
)
from pipeline.evaluation.segmentation import (
    METHOD_LABELS as LABELS,  # the evaluation's method names
)
from pipeline.evaluation.segmentation import label_with_background as label_map
from pipeline.model.heads import UnmixHead, positive_scores, region_logits

__all__ = [
    "BACKGROUND_RULES",
    "LABELS",
    "METHODS",
    "image_scores",
    "label_map",
    "method_maps",
    "normalised_maps",
    "token_paths_for",
]

METHODS = ("clip", "clip-vv", "ours")  # the overlay's columns: the paper's Figure 1 / 7 comparison


def token_paths_for(methods: Sequence[str], ours_tokens: str | None = None,
                    train_tokens: str = "vproj") -> list[str]:
    """Backbone token paths the methods need ("ours" on `ours_tokens` when given), plus
    `train_tokens` (the head's image-level scores: the tokens it was trained on; a ViT reads
    "vproj" as MaskCLIP's)."""
    unknown = [m for m in methods if m not in TOKEN_PATH]
    if unknown:
        raise ValueError(f"methods must be among {tuple(TOKEN_PATH)}, got {unknown}")
    return sorted({train_tokens, *(method_path(m, ours_tokens) for m in methods)})


def method_maps(tokens: dict[str, Tensor], head: UnmixHead, raw_text: Tensor, projected_text: Tensor,
                methods: Sequence[str], *, ours_norm: str = "after", cs_ours_norm: str = "before",
                grid: tuple[int, int] | None = None, ours_tokens: str | None = None) -> dict[str, Tensor]:
    """Score maps (B, C, h, w) float32 per method from one trunk pass's token paths (B, 1+hw, D):
    the evaluation's own maps_from_tokens, with the projected text for the projected methods.
    `grid` (h, w): the token grid of a view that kept its aspect ratio; None: square.

    maps_from_tokens reads a square grid (the evaluation's views are square). Every method's
    score at a token depends only on that token and token 0 (cosines, the projector per token,
    feature surgery's class weights from token 0), so a non-square grid's h x w tokens are laid
    out on the smallest square that holds them, padded with copies of the last token, and the
    first h x w scores read back as (h, w): the same numbers as a grid-aware computation."""
    texts = {m: projected_text if m in PROJECTED else raw_text for m in methods}
    if grid is None or grid[0] == grid[1]:
        return maps_from_tokens(tokens, head, texts, ours_norm=ours_norm, cs_ours_norm=cs_ours_norm,
                                ours_tokens=ours_tokens)
    height, width = grid
    count = height * width
    side = math.isqrt(count - 1) + 1  # the smallest square with side^2 >= count
    padded = {}
    for path, t in tokens.items():  # (B, 1+hw, D) -> (B, 1+side^2, D)
        if t.shape[1] != 1 + count:
            raise ValueError(f"{path} tokens {tuple(t.shape)} do not make a {height} x {width} grid")
        padded[path] = torch.cat([t, t[:, -1:].expand(-1, side * side - count, -1)], dim=1)
    maps = maps_from_tokens(padded, head, texts, ours_norm=ours_norm, cs_ours_norm=cs_ours_norm,
                            ours_tokens=ours_tokens)
    return {m: s.flatten(2)[:, :, :count].unflatten(2, (height, width)).contiguous()  # (B, C, h, w)
            for m, s in maps.items()}


@torch.no_grad()
def image_scores(head: UnmixHead, spatial: Tensor, text_neg: Tensor, text_pos: Tensor,
                 stats: str) -> Tensor:
    """Image-level class scores (B, C) in [0, 1]: the head's region logits on the spatial (v-proj)
    tokens it was trained on, with the negative / positive prompts, positive channel.

    The same arithmetic as UnmixHead.forward, with the text BatchNorm statistics chosen per call:
    [neg; pos] (2C, D) go through the projector together.
    """
    device = next(head.parameters()).device
    text = head.project_text(torch.cat([text_neg, text_pos]).to(device), stats=stats)  # (2C, D')
    image = head.project_tokens(spatial.to(device))  # (B, 1+hw, D')
    return positive_scores(region_logits(image, text, head.softmax_mode)).float()  # (B, C)
