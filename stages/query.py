"""`pipeline query`: the paper's Figure 1 view for one image and one free-text class.

Writes query_<text>.png (the image, then the class's activation under CLIP and under ours: the
min-max normalised score map at the image's size) and query_<text>.json, and prints the cosine
of the query's text feature to each --against class before (CLIP) and after the text projector.
"""
from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.api.unmix import class_list
from pipeline.config import paths
from pipeline.config.schema import Params
from pipeline.data.images import load_image
from pipeline.evaluation.segmentation import method_labels
from pipeline.files import atomic_write_text
from pipeline.results.plots import activation_grid
from stages.segment import (
    model_from_params,
    note_batch_stats,
    panel_view,
    split_classes,
    templates_or_default,
)

QUERY_METHODS = ("clip", "ours")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_") or "query"


def query_cosines(raw: torch.Tensor, projected: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Cosine of row 0 (the query) with rows 1.. (the others), before and after projection."""
    def cos(f: torch.Tensor) -> np.ndarray:
        f = F.normalize(f.double(), dim=-1)  # (C, D)
        return (f[1:] @ f[0]).cpu().numpy()  # (C-1,)
    return cos(raw), cos(projected)


def run(params: Params, image: str, text: str, against: Sequence[str] = (), projectors: str | None = None,
        templates: Sequence[str] = (), out: str | None = None) -> dict[str, Any]:
    classes = class_list([text, *split_classes(against)])
    query, others = classes[0], classes[1:]
    prompts = templates_or_default(templates, params.evaluate)
    model = model_from_params(params, projectors)
    note_batch_stats(model, classes)
    features = model.text_features(classes, prompts)  # raw (C, D), projected (C, D')
    before, after = query_cosines(features.raw, features.projected)
    result = model.segment([image], classes, template=prompts, methods=QUERY_METHODS)
    out_dir = Path(out) if out else paths.results_dir(params.paths, "query")
    png = out_dir / f"query_{_slug(query)}.png"
    picture = load_image(image)
    labels_of = method_labels(model.backbone.name)
    views = {labels_of[m]: panel_view(picture, result.method_score_maps[m][0][:1]) for m in QUERY_METHODS}
    maps = {label: [small[0]] for label, (_, small) in views.items()}  # (h, w) of the query class
    activation_grid([next(iter(views.values()))[0]], maps, png, row_labels=[query],
                    title=f"\"{query}\" in {Path(image).name}")
    record = {"image": str(image), "query": query, "against": others, "templates": prompts,
              "text_bn": features.stats,
              "cosine": {c: {"clip": float(b), "ours": float(a)} for c, b, a in zip(others, before, after)},
              "image_score": float(result.image_scores[0, 0]), "png": png.name, "model": model.describe()}
    if others:
        record["mean_cosine"] = {"clip": float(before.mean()), "ours": float(after.mean())}
    atomic_write_text(png.with_suffix(".json"), json.dumps(record, indent=2) + "\n")
    width = max([len(c) for c in others] + [7])
    lines = [f"query \"{query}\": image score {record['image_score']:.3f}; activation map -> {png}"]
    if others:
        lines += [f"text cosine to the query   {'class':<{width}}  CLIP    ours",
                  *[f"                           {c:<{width}}  {b:+.3f}  {a:+.3f}"
                    for c, b, a in zip(others, before, after)],
                  f"                           {'mean':<{width}}  {before.mean():+.3f}  {after.mean():+.3f}"]
    print("\n".join(lines), flush=True)
    return record
