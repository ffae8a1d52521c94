"""Zero-shot segmentation evaluation over a dataset: every method, variant and mIoU protocol.

Variants of the label space (datasets with a background class: VOC 2012, COCO-17):
  "bkgd"     labels 0 = background (by evaluate.seg.background's rule), k + 1 = class k;
  "no_bkgd"  argmax over the objects only, ground-truth background ignored;
  "all"      datasets without a background class (Context-59: 0 = first class, 255 ignored).
Protocols (metrics.MIOU_PROTOCOLS), all accumulated in one pass from per-image confusion
matrices: "dataset" (mmseg IoUMetric), "per-image-positive-pred" and "per-image-positive-only"
(the authors' released scripts, ground-truth background ignored) and "per-image-predicted".
Runs in one process, batch-wise with a progress bar.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pipeline.config.params import ParamError
from pipeline.data.classes import CONTEXT_UNSEEN_IN_COCO, prompt_names
from pipeline.evaluation.labels import labels, with_background
from pipeline.evaluation.metrics import MIOU_PROTOCOLS, MiouAccumulator
from pipeline.evaluation.segmentation import (
    BACKGROUND_RULES,
    IGNORE_INDEX,
    METHODS,
    method_text,
    normalise_minmax,
    plain_text,
    score_maps,
    seg_view,
)
from pipeline.model.backbone import FrozenTowers
from pipeline.model.heads import UnmixHead


def variants(has_background: bool) -> tuple[str, ...]:
    return ("bkgd", "no_bkgd") if has_background else ("all",)


def variant_target(mask: np.ndarray, variant: str) -> np.ndarray:
    """Ground truth in the variant's label space: "no_bkgd" shifts 1..C to 0..C-1 and ignores 0."""
    if variant != "no_bkgd":
        return mask
    target = mask.astype(np.int64) - 1
    target[(mask == 0) | (mask == IGNORE_INDEX)] = IGNORE_INDEX
    return target


def _on(target: np.ndarray, device: torch.device) -> np.ndarray | torch.Tensor:
    """A ground truth where the predictions are: NumPy for the CPU, a tensor on another device."""
    return target if device.type == "cpu" else torch.from_numpy(target.astype(np.int64)).to(device)


def class_subsets(dataset_name: str, classnames: Sequence[str]) -> dict[str, list[int]]:
    """Context-59: indices of the 30 classes unseen in COCO and the 29 seen."""
    if dataset_name != "context59":
        return {}
    unseen = [i for i, c in enumerate(classnames) if c in CONTEXT_UNSEEN_IN_COCO]
    return {"unseen": unseen, "seen": [i for i in range(len(classnames)) if i not in unseen]}


def object_classes(dataset: Any) -> list[str]:
    """Class names that get a text prompt: a background entry (mask value 0) is not one."""
    names = list(dataset.classnames)
    return names[1:] if dataset.has_background else names


def evaluate_segmentation(backbone: FrozenTowers, head: UnmixHead | None, dataset: Any, *,
                          image_size: int, batch_size: int = 16, background: str = "none",
                          threshold: float = 0.85, pos_interpolation: str = "bilinear",
                          interpolation: str = "bicubic", methods: Sequence[str] = METHODS,
                          limit: int | None = None, progress: bool = True,
                          keep_predictions: bool = False, prompt: str = "plain",
                          text_input: str = "normalised", text_bn: str = "running",
                          voc_names: str = "official", ours_norm: str = "after",
                          cs_ours_norm: str = "before", ours_tokens: str | None = None) -> dict:
    """mIoU of every method, variant and protocol on a SegmentationDataset.

    Returns {"methods": {method: {variant: {protocol: mIoU %}}}, "per_class": {method: {variant:
    {class: dataset-level IoU %}}}, "num_images", "seconds_per_image", "classnames" (object
    classes), "prompt_names" (the words in the prompts), "has_background"}; with keep_predictions
    also "predictions": {method: {variant: [label map per image]}} (memory grows with the dataset).
    Projected methods need `head`; their text enters the projector `text_input` (raw or
    L2-normalised) with BatchNorm statistics `text_bn` (running, or batch = of these C prompts);
    their image side is normalised after or before the image projector per `ours_norm` ("ours")
    and `cs_ours_norm` ("clip-surgery+ours"), segmentation.IMAGE_NORMS; "ours" scores the token
    method `ours_tokens` (evaluate.seg.tokens; None: segmentation.TOKEN_PATH's).
    """
    names = object_classes(dataset)
    words = prompt_names(names, dataset.name, voc_names)
    num = len(dataset.records) if limit is None else min(limit, len(dataset.records))
    subsets = class_subsets(dataset.name, names)
    rule = background if dataset.has_background else None  # the "bkgd" variant's rule
    if rule is not None and rule not in BACKGROUND_RULES:
        raise ParamError(f"evaluate.seg.background must be one of {BACKGROUND_RULES}, got {rule!r}")
    raw = plain_text(backbone, words, prompt, normalise=text_input == "normalised")  # (C, D)
    texts = method_text(raw, head, methods, text_bn)
    acc = {m: {v: MiouAccumulator(len(names) + (v == "bkgd"), 0 if v == "bkgd" else None, IGNORE_INDEX)
               for v in variants(dataset.has_background)} for m in methods}
    kept: dict[str, dict[str, list[np.ndarray]]] = {m: {v: [] for v in acc[m]} for m in methods}
    start = time.perf_counter()
    bar = tqdm(total=num, desc=f"seg {dataset.name}", unit="img", disable=not progress)
    for first in range(0, num, batch_size):
        indices = list(range(first, min(first + batch_size, num)))
        images = torch.stack([seg_view(dataset.image(i), image_size, interpolation) for i in indices])
        maps = score_maps(backbone, head, images, texts, pos_interpolation, ours_norm=ours_norm,
                          cs_ours_norm=cs_ours_norm, ours_tokens=ours_tokens)  # (B, C, h, w) each
        device = maps[methods[0]].device
        for j, i in enumerate(indices):
            mask = dataset.mask(i)  # (H, W), its own size: the maps are upsampled to it
            targets = {v: _on(variant_target(mask, v), device) for v in variants(dataset.has_background)}
            for m in methods:  # one upsampled stack gives both label spaces (labels.py)
                objects, is_background = labels(normalise_minmax(maps[m][j]), mask.shape, rule, threshold)
                for v, a in acc[m].items():
                    pred = with_background(objects, is_background) if v == "bkgd" else objects
                    a.update(pred, targets[v])  # on the maps' device until the confusion counts
                    if keep_predictions:
                        kept[m][v].append(pred.cpu().numpy())
        bar.update(len(indices))
    bar.close()
    seconds = (time.perf_counter() - start) / max(num, 1)
    results: dict[str, dict] = {m: {} for m in methods}
    per_class: dict[str, dict] = {m: {} for m in methods}
    for m in methods:
        for v, a in acc[m].items():
            shift = int(v == "bkgd")
            results[m][v], iou = a.result({k: [i + shift for i in idx] for k, idx in subsets.items()})
            per_class[m][v] = dict(zip((["background"] if shift else []) + names, iou.tolist()))
    out = {"methods": results, "per_class": per_class, "num_images": num, "seconds_per_image": seconds,
           "classnames": names, "prompt_names": words, "has_background": bool(dataset.has_background),
           "protocols": list(MIOU_PROTOCOLS)}
    return {**out, "predictions": kept} if keep_predictions else out
