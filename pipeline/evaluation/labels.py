"""Pixel labels of both ZS3 label spaces from one image's low-resolution score maps, by the
computation the evaluation always made (segmentation.label_with_background on normalised_maps):
every class's min-max-normalised map upsampled to the mask's size (bilinear, align_corners=False),
then argmax / max / softmax over the classes. Made once per image and method for both label
spaces (objects only, and with background), on the maps' device: on CUDA nothing leaves it until
the confusion counts.

A tiled CPU path (upsampling only the classes that can win on each tile) was tried for issue 22
and removed: the labels must be the reference's bit for bit, and ATen's bilinear kernel changes
its arithmetic with the channel and thread count, so undecided pixels needed the whole stack
anyway; measured side by side it was 0.73-0.92x the stack on a quiet 2-core CPU
(bench/bench_zs3.py, docs/PERFORMANCE.md).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

SOFTMAX_SCALE = 100.0  # segmentation.SOFTMAX_SCALE (GEM)


def labels(normalised: Tensor, size: tuple[int, int], rule: str | None,
           threshold: float) -> tuple[Tensor, Tensor | None]:
    """Normalised maps (C, h, w) -> (argmax over the classes (H, W) int64, background mask (H, W)
    bool by `rule`, None for "none" / None) on the maps' device; rule assumed valid."""
    stack = F.interpolate(normalised[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    label = stack.argmax(dim=0)
    if rule in (None, "none"):
        return label, None
    best, _ = stack.max(dim=0)
    if rule == "softmax":
        best = (SOFTMAX_SCALE * stack).softmax(dim=0).max(dim=0).values
    return label, best < threshold
