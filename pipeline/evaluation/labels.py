"""Pixel labels of both ZS3 label spaces from one image's low-resolution score maps, by the
computation the evaluation always made (segmentation.label_with_background on normalised_maps):
every class's min-max-normalised map upsampled to the mask's size (bilinear, align_corners=False),
then argmax / max / softmax over the classes. Made once per image and method for both label spaces
(objects only, and with background).

Two ways to the same labels, bit for bit:
- `stack_labels`, the reference: the whole (C, H, W) stack. On CUDA (nothing leaves the device
  until the confusion counts) and wherever the envelope does not apply.
- label_envelope on a CPU: the argmax of the bilinear maps row by row, with ATen's own values
  where that is too close to call; most of the stack is never made (bench/bench_zs3.py). The
  softmax rule still needs every class's value at every pixel: there only the argmax is the
  envelope's, and the softmax is the reference's on the whole stack.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.evaluation.label_envelope import envelope_labels

SOFTMAX_SCALE = 100.0  # GEM: softmax over classes of 100 x the normalised maps


def labels(normalised: Tensor, size: tuple[int, int], rule: str | None,
           threshold: float) -> tuple[Tensor, Tensor | None]:
    """Normalised maps (C, h, w) -> (argmax over the classes (H, W) int64, background mask (H, W)
    bool by `rule`, None for "none" / None) on the maps' device; rule assumed valid."""
    if normalised.device.type == "cpu" and normalised.is_contiguous() and _in_unit_range(normalised):
        found = envelope_labels(normalised, size, None if rule == "softmax" else rule, threshold)
        if found is not None:
            if rule != "softmax":
                return found
            return found[0], _softmax_best(_stack(normalised, size)) < threshold
    return stack_labels(normalised, size, rule, threshold)


def stack_labels(normalised: Tensor, size: tuple[int, int], rule: str | None,
                 threshold: float) -> tuple[Tensor, Tensor | None]:
    """The reference: every class upsampled, then argmax / max / softmax over them."""
    stack = _stack(normalised, size)
    return stack.argmax(dim=0), background_mask(stack, rule, threshold)


def background_mask(stack: Tensor, rule: str | None, threshold: float) -> Tensor | None:
    """Upsampled maps (C, H, W) -> where `rule` says background (H, W) bool; None for "none" / None."""
    if rule in (None, "none"):
        return None
    return (_softmax_best(stack) if rule == "softmax" else stack.max(dim=0).values) < threshold


def with_background(objects: Tensor, is_background: Tensor | None) -> Tensor:
    """Labels of the label space with background: 0 = background, k + 1 = class k (VOC / COCO ids)."""
    return objects + 1 if is_background is None else torch.where(is_background, 0, objects + 1)


def upsample(scores: Tensor, size: tuple[int, int]) -> Tensor:
    """(C, h, w) -> (C, H, W), bilinear, align_corners=False."""
    return F.interpolate(scores[None], size=size, mode="bilinear", align_corners=False)[0]


def _stack(normalised: Tensor, size: tuple[int, int]) -> Tensor:
    return upsample(normalised.float(), size)


def _softmax_best(stack: Tensor) -> Tensor:
    return (SOFTMAX_SCALE * stack).softmax(dim=0).max(dim=0).values


def _in_unit_range(maps: Tensor) -> bool:
    """The envelope's error bounds assume finite values in [0, 1] (min-max normalised maps)."""
    low, high = torch.aminmax(maps)
    return bool(torch.isfinite(maps).all()) and float(low) >= 0.0 and float(high) <= 1.0
