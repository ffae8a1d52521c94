"""`pipeline query`: the paper's Figure 1 view for one image and one free-text class.

Writes <image stem>_query_<text>.png (the image, then the class's activation under CLIP and under
ours: the min-max normalised score map at the image's size, with a colourbar; with --against, the
label map among the query and those classes, and its legend) and the same name .json, and prints
the cosine of the query's text feature to each --against class before (CLIP) and after the text
projector. The name is never another image's (pipeline/results/names.py); the photo keeps its
aspect ratio unless --resize square. The model and its defaults are `segment`'s (stages/segment.py:
the projectors file's record, flags over it); with the default running text BatchNorm statistics
the query's map and score do not depend on --against, and --against may be left out.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.api.unmix import class_list, template_list
from pipeline.api.views import resize_rule
from pipeline.config.schema import Params
from pipeline.data.images import load_image
from pipeline.evaluation.segmentation import method_labels
from pipeline.files import atomic_write_text
from pipeline.results.names import free_name, image_digest, slug
from pipeline.results.outputs import project_relative
from pipeline.results.overlays import panel_view
from stages.segment import (
    label_panel,
    model_from_params,
    note_batch_stats,
    output_dir,
    split_classes,
)

QUERY_METHODS = ("clip", "ours")


def query_cosines(raw: torch.Tensor, projected: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Cosine of row 0 (the query) with rows 1.. (the others), before and after projection."""
    def cos(f: torch.Tensor) -> np.ndarray:
        f = F.normalize(f.double(), dim=-1)  # (C, D)
        return (f[1:] @ f[0]).cpu().numpy()  # (C-1,)
    return cos(raw), cos(projected)


def run(params: Params | None, image: str, text: str, against: Sequence[str] = (),
         projectors: str | None = None, templates: Sequence[str] = (), out: str | None = None,
         run_dir: str | None = None, checkpoint: str | None = None, text_bn: str | None = None,
         device: str | None = None, resize: str = "keep") -> dict[str, Any]:
    classes = class_list([text, *split_classes(against)])
    resize = resize_rule(resize)
    query, others = classes[0], classes[1:]
    given = template_list(templates) if templates else None  # argument errors before the model loads
    model = model_from_params(params, projectors, run_dir=run_dir, checkpoint=checkpoint, text_bn=text_bn,
                              device=device)
    model.resize = resize  # the network's view: keep the aspect ratio, or the evaluation's square
    prompts = given or model.templates
    note_batch_stats(model, classes)
    features = model.text_features(classes, prompts)  # raw (C, D), projected (C, D')
    before, after = query_cosines(features.raw, features.projected)
    result = model.segment([image], classes, template=prompts, methods=QUERY_METHODS)
    out_dir = output_dir(out, params, run_dir, "query")
    digest = image_digest(image)
    name = free_name(out_dir, f"{slug(Path(image).stem)}_query_{slug(query, 'text')}", digest)
    png = out_dir / f"{name}.png"  # and <name>.json
    from pipeline.results.plots import activation_grid  # matplotlib: ~1 s, at the first figure
    picture = load_image(image)
    labels_of = method_labels(model.backbone.name)
    views = {labels_of[m]: panel_view(picture, result.method_score_maps[m][0][:1]) for m in QUERY_METHODS}
    small = next(iter(views.values()))[0]  # (h, w, 3) uint8
    maps = {label: [view[0]] for label, (_, view) in views.items()}  # (h, w) of the query class
    activation_grid([small], maps, png, row_labels=[query], title=f"\"{query}\" in {Path(image).name}",
                    label_panel=label_panel(result, 0, small.shape[:2]) if others else None)
    record = {"image": str(image), "image_sha256": digest, "query": query, "against": others,
              "templates": prompts, "text_bn": features.stats, "resize": result.resize,
              "input_size": list(result.input_sizes[0]),
              "cosine": {c: {"clip": float(b), "ours": float(a)} for c, b, a in zip(others, before, after)},
              "image_score": float(result.image_scores[0, 0]), "png": png.name, "model": model.describe()}
    if others:
        record["mean_cosine"] = {"clip": float(before.mean()), "ours": float(after.mean())}
    text = project_relative(json.dumps(record, indent=2))  # no machine paths in results
    atomic_write_text(png.with_suffix(".json"), text + "\n")
    width = max([len(c) for c in others] + [7])
    lines = [f"query \"{query}\": image score {record['image_score']:.3f}; activation map -> {png}"]
    if others:
        lines += [f"text cosine to the query   {'class':<{width}}  CLIP    ours",
                  *[f"                           {c:<{width}}  {b:+.3f}  {a:+.3f}"
                    for c, b, a in zip(others, before, after)],
                  f"                           {'mean':<{width}}  {before.mean():+.3f}  {after.mean():+.3f}"]
    print("\n".join(lines), flush=True)
    return record
