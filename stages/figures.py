"""Stage `figures`: activation maps of queried classes, one column per evaluate.seg.methods entry
(paper Fig. 1/4).

Per class one PNG in results/figures/: rows = images of the first segmentation dataset
(evaluate.seg.datasets[0], split val), preferring images whose mask contains the class;
columns = the image, then the class's score map of each method (computed against the whole
class set: feature surgery needs it), min-max normalised over the tokens and upsampled
bilinearly to the image. The title names the projectors file (best | last) and the recipe. The
image resize, `ours`' normalisation and the COCO masks follow evaluate.seg's rules on that dataset,
as `evaluate seg` computes them (pipeline/evaluation/variants.py).
"""
from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch

from pipeline.config import paths
from pipeline.config.schema import Params
from pipeline.data.classes import prompt_names
from pipeline.data.datasets import SegmentationDataset, load_segmentation
from pipeline.evaluation.seg_eval import object_classes
from pipeline.evaluation.segmentation import (
    method_labels,
    method_text,
    normalise_minmax,
    plain_text,
    score_maps,
    seg_view,
    upsample,
)
from pipeline.evaluation.sources import SEG_SPLIT, backbone_and_head, dataset_root
from pipeline.evaluation.variants import resolve
from pipeline.results.outputs import stamp as stamp_run
from pipeline.results.plots import activation_grid
from pipeline.results.skips import for_evaluation
from pipeline.training import provenance


def query_classes(wanted: list[str], available: list[str]) -> list[str]:
    """The queried classes the dataset has, in query order; else its first len(wanted) classes."""
    present = [c for c in wanted if c in available]
    return present or available[:max(len(wanted), 1)]


def pick_images(dataset: SegmentationDataset, class_value: int, count: int) -> list[int]:
    """Up to `count` image indices: those whose mask contains `class_value` first, in order."""
    count = min(count, len(dataset))
    chosen: list[int] = []
    for i in range(len(dataset)):
        if len(chosen) == count:
            break
        if (dataset.mask(i) == class_value).any():
            chosen.append(i)
    rest = [i for i in range(len(dataset)) if i not in chosen]
    return chosen + rest[:count - len(chosen)]


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")


def run(params: Params) -> dict[str, Any]:
    params, todo = for_evaluation(params, ["figures"])  # missing data: error, or skip (evaluate.missing)
    if not todo:
        return {"figures": [], "classes": [], "dataset": None}
    provenance.require_current(params, val=False)  # projectors of this run's backbone and params
    cfg, seg = params.figures, params.evaluate.seg
    name = seg.datasets[0]
    variant = resolve(seg, name)
    dataset = load_segmentation(name, dataset_root(params.paths, name), SEG_SPLIT, coco_masks=variant.masks())
    ev = params.evaluate
    backbone, head, _, src = backbone_and_head(params)
    names = object_classes(dataset)
    classes = query_classes(list(cfg.classes), names)
    words = prompt_names(names, name, ev.voc_names)
    raw = plain_text(backbone, words, ev.prompt, normalise=ev.text_input == "normalised")  # (C, D)
    methods = list(seg.methods)
    texts = method_text(raw, head, methods, ev.text_bn.seg)
    stamp = f"projectors {src['projectors']['which']} (epoch {src['projectors']['epoch']}), recipe {src['recipe']}"
    written = []
    for cls in classes:
        k = names.index(cls)
        value = k + int(dataset.has_background)
        indices = pick_images(dataset, value, cfg.images)
        with_class = sum(bool((dataset.mask(i) == value).any()) for i in indices)
        shown = "" if with_class == len(indices) else f" ({with_class} of {len(indices)} images contain it)"
        pictures = [np.asarray(dataset.image(i)) for i in indices]  # (H, W, 3) uint8 each
        images = torch.stack([seg_view(dataset.image(i), seg.image_size, variant.interpolation)
                              for i in indices])  # (N, 3, S, S)
        maps = score_maps(backbone, head, images, texts, seg.pos_interpolation, ours_norm=variant.ours_norm,
                          cs_ours_norm=variant.cs_ours_norm, ours_tokens=seg.tokens)  # (N, C, h, w) each
        overlays = {method_labels(params.backbone.name)[m]: [upsample(normalise_minmax(maps[m][i, k:k + 1]), p.shape[:2])[0]
                                       .cpu().numpy() for i, p in enumerate(pictures)] for m in methods}
        path = paths.results_dir(params.paths, "figures", f"activation_{_slug(cls)}.png")
        activation_grid(pictures, overlays, path, title=f"activation maps: {cls} ({name}){shown}; {stamp}")
        written.append(str(path))
        print(f"figures: {path}", flush=True)
    stamp_run(params, paths.results_dir(params.paths, "figures"))  # the report checks which run drew them
    return {"figures": written, "classes": classes, "dataset": name, "methods": methods, "source": src,
            "variant": variant.record()}
