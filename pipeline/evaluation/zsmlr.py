"""Segment-driven zero-shot multi-label recognition (paper Table 3).

CLIP's global prediction on the whole image is combined with CLIP's predictions on the regions
that the model segments:
  global   g_c = softmax_c(100 * cos(global_embedding(image), text_c))   (CLIP's logit scale 100)
  regions  for each class c predicted in the image's segmentation ("ours" score maps, the
           seg threshold on the max normalised score making low-confidence pixels background, the
           "max-score" rule whatever evaluate.seg.background says) with area >= min_area of the
           image: the image outside that region is set to 0, i.e. the normalisation mean
           ("mask"), or its bounding box is cropped and resized ("crop"); r_c = class c's
           probability from CLIP on that view. Classes not segmented get r_c = 0.
  final    (1 - w) * g_c + w * r_c, w = evaluate.zs_mlr.region_weight.
Text is the plain prompt "A photo of a {class}." for both CLIP and the projected segmentation.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from pipeline.data.classes import prompt_names
from pipeline.evaluation.metrics import average_precision
from pipeline.evaluation.segmentation import method_text, plain_text, predict, score_maps, seg_view
from pipeline.model.backbone import FrozenTowers
from pipeline.model.heads import UnmixHead

CLIP_LOGIT_SCALE = 100.0  # exp(logit_scale) of the pretrained OpenAI models (clamped at 100)
REGION_MODES = ("mask", "crop")


@torch.no_grad()
def global_probabilities(backbone: FrozenTowers, images: Tensor, text: Tensor, chunk: int = 32) -> Tensor:
    """CLIP zero-shot class probabilities (N, C) of images (N, 3, S, S) against text (C, D)."""
    out = []
    for start in range(0, images.shape[0], chunk):
        emb = F.normalize(backbone.global_embedding(images[start:start + chunk]), dim=-1)  # (n, D)
        out.append((CLIP_LOGIT_SCALE * emb @ text.to(emb.device).T).softmax(dim=-1).cpu())  # (n, C)
    return torch.cat(out) if out else torch.zeros(0, text.shape[0])


def region_views(images: Tensor, labels: Tensor, min_area: float = 0.01,
                 mode: str = "mask") -> tuple[list[tuple[int, int]], Tensor]:
    """One view per (image, segmented class): [(b, class index 0..C-1)], views (R, 3, S, S).

    labels (B, S, S) int: 0 background, k + 1 class k (the network input's resolution).
    """
    if mode not in REGION_MODES:
        raise ValueError(f"evaluate.zs_mlr.region_mode must be one of {REGION_MODES}, got {mode!r}")
    owners, views = [], []
    size = images.shape[-2:]
    for b in range(images.shape[0]):
        for k in torch.unique(labels[b]).tolist():
            region = labels[b] == k  # (S, S)
            if k == 0 or region.float().mean() < min_area:
                continue
            if mode == "mask":
                views.append(images[b] * region)  # zero = the CLIP mean after normalisation
            else:
                rows, cols = region.any(dim=1).nonzero(), region.any(dim=0).nonzero()
                crop = images[b, :, rows.min():rows.max() + 1, cols.min():cols.max() + 1]  # (3, h, w)
                views.append(F.interpolate(crop[None], size=tuple(size), mode="bicubic",
                                           align_corners=False)[0])
            owners.append((b, k - 1))
    stacked = torch.stack(views) if views else images.new_zeros((0, *images.shape[1:]))
    return owners, stacked


def region_probabilities(backbone: FrozenTowers, images: Tensor, labels: Tensor, text: Tensor,
                         min_area: float = 0.01, mode: str = "mask") -> Tensor:
    """r (B, C): class c's CLIP probability on the view of its own region; 0 where not segmented."""
    owners, views = region_views(images, labels, min_area, mode)
    out = torch.zeros(images.shape[0], text.shape[0])
    if owners:
        probs = global_probabilities(backbone, views, text)  # (R, C)
        for r, (b, c) in enumerate(owners):
            out[b, c] = probs[r, c]
    return out


def combine(global_scores: np.ndarray, region_scores: np.ndarray, weight: float) -> np.ndarray:
    return (1.0 - weight) * global_scores + weight * region_scores


def zero_shot_mlr(backbone: FrozenTowers, head: UnmixHead, dataset: Any, *, image_size: int,
                  batch_size: int = 16, region_weight: float = 0.5, threshold: float = 0.85,
                  pos_interpolation: str = "bilinear", min_area: float = 0.01, region_mode: str = "mask",
                  limit: int | None = None, progress: bool = True, prompt: str = "plain",
                  interpolation: str = "bicubic", text_input: str = "normalised",
                  text_bn: str = "running", voc_names: str = "official", ours_norm: str = "after",
                  ours_tokens: str | None = None) -> dict:
    """mAP of CLIP global alone, of the regions alone and of the combination on a MultiLabelDataset.
    The regions are those of "ours" on the token method `ours_tokens` (evaluate.seg.tokens; None:
    segmentation.TOKEN_PATH's) with its image side normalised `ours_norm` (segmentation.IMAGE_NORMS).

    Returns {"map": {"clip", "regions", "combined"}, "per_class_ap": {...}, "scores": {name: (N, C)},
    "labels" (N, C), "num_images", "seconds_per_image", "classnames"}.
    """
    names = list(dataset.classnames)
    num = len(dataset.records) if limit is None else min(limit, len(dataset.records))
    words = prompt_names(names, dataset.name, voc_names)
    into_head = plain_text(backbone, words, prompt, normalise=text_input == "normalised")  # (C, D)
    # L2-normalised, for CLIP itself: the same features, normalised (text_features' own last step)
    raw = into_head if text_input == "normalised" else F.normalize(into_head, dim=-1)
    texts = method_text(into_head, head, ["ours"], text_bn)
    glob, regions = [], []
    start = time.perf_counter()
    bar = tqdm(total=num, desc=f"zs-mlr {dataset.name}", unit="img", disable=not progress)
    for first in range(0, num, batch_size):
        indices = range(first, min(first + batch_size, num))
        images = torch.stack([seg_view(dataset.image(i), image_size, interpolation)
                              for i in indices])  # (B, 3, S, S)
        maps = score_maps(backbone, head, images, texts, pos_interpolation,
                          ours_norm=ours_norm, ours_tokens=ours_tokens)["ours"]  # (B, C, h, w)
        labels = torch.stack([predict(m, (image_size, image_size), "max-score", threshold).cpu()
                              for m in maps])  # (B, S, S): 0 background, k + 1 class k
        glob.append(global_probabilities(backbone, images, raw).numpy())
        regions.append(region_probabilities(backbone, images, labels, raw, min_area, region_mode).numpy())
        bar.update(len(indices))
    bar.close()
    seconds = (time.perf_counter() - start) / max(num, 1)
    glob_np, region_np = np.concatenate(glob), np.concatenate(regions)  # (N, C) each
    scores = {"clip": glob_np, "regions": region_np, "combined": combine(glob_np, region_np, region_weight)}
    truth = dataset.labels[:num]
    per_class = {k: average_precision(v, truth) for k, v in scores.items()}
    return {
        "map": {k: float(np.nanmean(ap)) for k, ap in per_class.items()},
        "per_class_ap": {k: {n: float(a) for n, a in zip(names, ap)} for k, ap in per_class.items()},
        "scores": scores, "labels": truth, "num_images": num, "seconds_per_image": seconds,
        "classnames": names,
    }

