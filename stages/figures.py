"""Stage `figures`: activation maps of queried classes, CLIP vs CLIP-VV vs ours (paper Fig. 1/4).

Per class one PNG in results/figures/: rows = images of the first segmentation dataset
(evaluate.seg.datasets[0], split val), preferring images whose mask contains the class;
columns = the image, then the class's cosine map of each method, min-max normalised over the
tokens and upsampled bilinearly to the image (the score the segmentation thresholds).
"""
from __future__ import annotations

import re

import numpy as np
import torch

from pipeline import paths
from pipeline.augment import eval_view
from pipeline.datacheck import for_evaluation
from pipeline.datasets import load_segmentation
from pipeline.plots import activation_grid
from pipeline.results import stamp
from pipeline.segmentation import (
    METHOD_LABELS,
    METHODS,
    method_text,
    normalise_minmax,
    object_classes,
    plain_text,
    score_maps,
    upsample,
)
from stages.evaluate import SEG_SPLIT, backbone_and_head, dataset_root


def query_classes(wanted: list[str], available: list[str]) -> list[str]:
    """The queried classes the dataset has, in query order; else its first len(wanted) classes."""
    present = [c for c in wanted if c in available]
    return present or available[:max(len(wanted), 1)]


def pick_images(dataset, class_value: int, count: int) -> list[int]:
    """Up to `count` image indices: those whose mask contains `class_value` first, in order."""
    count = min(count, len(dataset))
    chosen = []
    for i in range(len(dataset)):
        if len(chosen) == count:
            break
        if (dataset.mask(i) == class_value).any():
            chosen.append(i)
    rest = [i for i in range(len(dataset)) if i not in chosen]
    return chosen + rest[:count - len(chosen)]


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")


def run(params: dict) -> dict:
    params, todo = for_evaluation(params, ["figures"])  # missing data: error, or skip (evaluate.missing)
    if not todo:
        return {"figures": [], "classes": [], "dataset": None}
    cfg, seg = params["figures"], params["evaluate"]["seg"]
    name = seg["datasets"][0]
    dataset = load_segmentation(name, dataset_root(params, name), SEG_SPLIT)
    backbone, head = backbone_and_head(params)
    names = object_classes(dataset)
    classes = query_classes(list(cfg["classes"]), names)
    texts = method_text(plain_text(backbone, names, params["evaluate"]["prompt"]), head, METHODS)
    written = []
    for cls in classes:
        k = names.index(cls)
        indices = pick_images(dataset, k + int(dataset.has_background), cfg["images"])
        pictures = [np.asarray(dataset.image(i)) for i in indices]  # (H, W, 3) uint8 each
        images = torch.stack([eval_view(dataset.image(i), seg["image_size"]) for i in indices])  # (N, 3, S, S)
        one_class = {m: t[k:k + 1] for m, t in texts.items()}  # (1, D) per method
        maps = score_maps(backbone, head, images, one_class, seg["pos_interpolation"])  # (N, 1, h, w)
        overlays = {METHOD_LABELS[m]: [upsample(normalise_minmax(maps[m][i]), p.shape[:2])[0].cpu().numpy()
                                       for i, p in enumerate(pictures)] for m in METHODS}
        path = paths.results_dir(params, "figures", f"activation_{_slug(cls)}.png")
        activation_grid(pictures, overlays, path, title=f"activation maps: {cls} ({name})")
        written.append(str(path))
        print(f"figures: {path}", flush=True)
    stamp(params, paths.results_dir(params, "figures"))  # the report checks which run drew them
    return {"figures": written, "classes": classes, "dataset": name}
