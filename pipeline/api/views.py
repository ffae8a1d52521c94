"""Images of several shapes through the network: the `resize` rule of UnmixCLIP (keep the aspect
ratio, or the released evaluation's square; pipeline/data/dense_view.py) and one batch per view
shape, results back in the images' order.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from pipeline.config.params import ParamError
from pipeline.data.dense_view import RESIZES, token_grid_size
from pipeline.evaluation.segment_maps import (
    image_scores,
    method_maps,
    normalised_maps,
    token_paths_for,
)
from pipeline.model.backbone import FrozenTowers
from pipeline.model.heads import UnmixHead


def resize_rule(resize: str) -> str:
    if resize not in RESIZES:
        raise ParamError(f"resize must be one of {', '.join(RESIZES)}, got {resize!r}")
    return resize


def shape_groups(views: Sequence[Tensor]) -> list[list[int]]:
    """Indices of the views grouped by shape, groups in order of first appearance (one batch each)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for j, v in enumerate(views):
        groups.setdefault(tuple(v.shape), []).append(j)
    return list(groups.values())


def view_grid(views: Tensor, backbone: FrozenTowers, resize: str) -> tuple[int, int] | None:
    """The token grid (h, w) of a batch of "keep" views; None for "square" (the evaluation's
    square grid, read from the token count as evaluate seg reads it)."""
    return token_grid_size(views, backbone.stride) if resize == "keep" else None


@torch.no_grad()
def maps_by_shape(backbone: FrozenTowers, head: UnmixHead, views: Sequence[Tensor],
                  sizes: Sequence[tuple[int, int]], texts: tuple[Tensor, Tensor, Tensor, Tensor],
                  methods: Sequence[str], resize: str, pos_interpolation: str, score_text_bn: str,
                  tokens_used: Mapping[str, str] | None = None) -> tuple[Tensor, dict[str, list[Tensor]]]:
    """Views (3, H, W) of one chunk -> image-level scores (N, C) and per method the normalised maps
    (C, H_i, W_i) at each picture's own size `sizes[i]`. texts: raw and projected class features,
    negative and positive prompt features. tokens_used: {"train": the token path the head was trained
    on (its image-level scores), "seg": the one `ours` scores}; None: the ResNet's vproj / vv. One
    trunk pass per view shape ("square": one batch)."""
    raw, projected, neg, pos = texts
    train, seg = (tokens_used or {}).get("train", "vproj"), (tokens_used or {}).get("seg", "vv")
    scores: list[Tensor] = [torch.empty(0)] * len(views)
    maps: dict[str, list[Tensor]] = {m: [torch.empty(0)] * len(views) for m in methods}
    for group in shape_groups(views):
        batch = torch.stack([views[j] for j in group])  # (b, 3, H, W)
        paths = token_paths_for(methods, seg, train)
        tokens = backbone.token_paths(batch, paths, pos_interpolation)  # (b, 1+hw, D) each
        grid = view_grid(batch, backbone, resize)
        method = method_maps(tokens, head, raw, projected, methods, grid=grid, ours_tokens=seg)  # (b, C, h, w)
        group_scores = image_scores(head, tokens[train], neg, pos, score_text_bn)  # (b, C)
        for k, j in enumerate(group):
            scores[j] = group_scores[k]
            for m in methods:
                maps[m][j] = normalised_maps(method[m][k], sizes[j])  # (C, H_j, W_j)
    return torch.stack(scores), maps
