"""`pipeline segment`: trained projectors on any images and any class words (no DVC stage).

Per image, in --out: <name>_overlay.png (image | CLIP | CLIP-VV | ours, one row per class),
<name>_labels.png (palette PNG: 0 background, 1..C the classes in the given order) and
<name>.json (image-level scores, pixel fractions, the model used). Everything is computed by
pipeline.api.unmix.UnmixCLIP, configured from params: backbone.* (weights), evaluate.seg.* (image
size, resize (the rule `released` is bicubic here: no dataset, as the VOC and COCO scripts), background
rule and threshold), evaluate.text_bn.{seg,mlr}, evaluate.text_input. `ours` is normalised after
the image projector (the paper's cosine), whatever evaluate.seg.ours_norm says.
"""
from __future__ import annotations

import glob
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from pipeline.api.unmix import SegmentationResult, UnmixCLIP, class_list, template_list
from pipeline.config import paths
from pipeline.config.params import ParamError
from pipeline.config.schema import Evaluate, Params
from pipeline.data.images import BadImageError, load_image
from pipeline.data.synthetic import voc_palette
from pipeline.evaluation.segment_maps import METHODS
from pipeline.evaluation.segmentation import PROMPTS, method_labels
from pipeline.evaluation.variants import seg_interpolation
from pipeline.files import atomic_write, atomic_write_text
from pipeline.results.plots import activation_grid

MAP_BUDGET_BYTES = 1 << 30  # score maps held per chunk: C x methods x pixels x 4 bytes per image
TYPICAL_PIXELS = 640 * 480  # a COCO image
PANEL_SIDE = 480  # pixels: overlays are drawn from images shrunk to this (twice a panel's width)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def expand_images(specs: Sequence[str]) -> list[Path]:
    """Files, folders (their image files, sorted) and glob patterns -> image paths, in order."""
    found: list[Path] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            found += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif path.exists():
            found.append(path)
        elif not glob.has_magic(spec):
            raise BadImageError(path, "no such file")  # before any model is loaded
        else:
            matches = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
            if not matches:
                raise ParamError(f"no image matches {spec!r}")
            found += matches
    if not found:
        raise ParamError(f"no images in {', '.join(specs)}")
    return list(dict.fromkeys(found))


def split_classes(texts: Sequence[str]) -> list[str]:
    """--classes "person,dog" (repeatable) -> ["person", "dog"]."""
    return [c.strip() for text in texts for c in text.split(",")] if texts else []


def default_projectors(params: Params) -> Path:
    """The file evaluate.projectors names (as every evaluation reads it; no silent fallback)."""
    return paths.projectors(params.paths, params.evaluate.projectors)


def model_from_params(params: Params, projectors: str | Path | None = None) -> UnmixCLIP:
    """UnmixCLIP with the backbone weights of params (checkpoint wins; pretrained null = random)."""
    b, ev = params.backbone, params.evaluate
    path = Path(projectors) if projectors else default_projectors(params)
    print(f"projectors: {path}", flush=True)
    return UnmixCLIP.from_files(
        path, checkpoint=b.checkpoint, pretrained=None if b.checkpoint else (b.pretrained or "random"),
        device=b.device, sha256=b.sha256, init_seed=b.init_seed, precision=b.precision,
        channels_last=b.channels_last, image_size=ev.seg.image_size, text_bn=ev.text_bn.seg,
        score_text_bn=ev.text_bn.mlr, text_input=ev.text_input,
        pos_interpolation=ev.seg.pos_interpolation,
        interpolation=seg_interpolation(ev.seg.interpolation),  # released: bicubic (no dataset)
        batch_size=ev.batch_size)


def templates_or_default(templates: Sequence[str], evaluate: Evaluate) -> list[str]:
    return template_list(list(templates) or [PROMPTS[evaluate.prompt]])


def note_batch_stats(model: UnmixCLIP, classes: list[str]) -> None:
    if model.text_bn == "batch":
        if len(classes) < 2:
            model.text_features(classes, PROMPTS["plain"])  # raises the API's one-line error
        print("note: evaluate.text_bn.seg = batch: the text projector's BatchNorm uses the statistics "
              "of the queried classes, so every score depends on the whole class list "
              "(--set evaluate.text_bn.seg=running for class-independent scores)", flush=True)


def output_stems(files: Sequence[Path]) -> list[str]:
    """A file-name stem per image, unique even when two folders hold the same name."""
    stems: list[str] = []
    seen: dict[str, int] = {}
    for f in files:
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", f.stem) or "image"
        seen[stem] = seen.get(stem, 0) + 1
        stems.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
    return stems


def chunk_size(batch_size: int, num_classes: int, num_methods: int = len(METHODS)) -> int:
    """Images per API call: evaluate.batch_size, fewer when many classes' full-size maps would
    not fit MAP_BUDGET_BYTES (80 classes: 3 typical images)."""
    per_image = 4 * num_classes * num_methods * TYPICAL_PIXELS
    return max(1, min(batch_size, MAP_BUDGET_BYTES // per_image))


def write_label_png(path: Path, labels: np.ndarray) -> None:
    """(H, W) uint8 labels as a palette PNG (VOC colours: 0 black, 1 red, 2 green, ...)."""
    image = Image.fromarray(labels, mode="P")
    image.putpalette(voc_palette())
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def read_label_png(path: str | Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)  # P mode: the label values themselves


def panel_view(picture: Image.Image, maps: np.ndarray, max_side: int = PANEL_SIDE
               ) -> tuple[np.ndarray, np.ndarray]:
    """Picture (h, w, 3) uint8 and maps (C, h, w) shrunk to at most `max_side` pixels a side: a
    panel is ~240 px wide, and drawing full-size images costs seconds per figure."""
    scale = min(1.0, max_side / max(picture.size))
    size = (max(1, round(picture.height * scale)), max(1, round(picture.width * scale)))
    small = F.interpolate(torch.from_numpy(maps)[None], size=size, mode="bilinear",
                          align_corners=False, antialias=scale < 1.0)[0]  # (C, h, w)
    return np.asarray(picture.resize(size[::-1], Image.Resampling.BILINEAR)), small.numpy()


def write_image_outputs(result: SegmentationResult, index: int, out: Path, stem: str, model: UnmixCLIP,
                        methods: Sequence[str] = METHODS) -> dict:
    classes = result.classes
    overlay, labels, summary = out / f"{stem}_overlay.png", out / f"{stem}_labels.png", out / f"{stem}.json"
    image = load_image(result.sources[index])
    labels_of = method_labels(model.backbone.name)
    views = {labels_of[m]: panel_view(image, result.method_score_maps[m][index]) for m in methods}
    picture = next(iter(views.values()))[0]  # (h, w, 3) uint8
    maps = {label: list(small) for label, (_, small) in views.items()}  # C x (h, w) each
    activation_grid([picture] * len(classes), maps, overlay, row_labels=classes,
                    title=f"{Path(result.sources[index]).name}: {', '.join(classes)}")
    write_label_png(labels, result.label_maps[index])
    record = {**result.summary(index), "label_png": labels.name, "overlay_png": overlay.name,
              "model": model.describe()}
    atomic_write_text(summary, json.dumps(record, indent=2) + "\n")
    return record


def run(params: Params, images: Sequence[str], classes: Sequence[str], projectors: str | None = None,
        background: str | None = None, threshold: float | None = None, templates: Sequence[str] = (),
        out: str | None = None, progress: bool = True) -> dict[str, Any]:
    names = class_list(split_classes(classes))  # argument errors before any model is loaded
    prompts = templates_or_default(templates, params.evaluate)
    files = expand_images(images)
    seg = params.evaluate.seg
    rule = background or seg.background
    threshold = seg.threshold if threshold is None else threshold
    out_dir = Path(out) if out else paths.results_dir(params.paths, "segment")
    model = model_from_params(params, projectors)
    note_batch_stats(model, names)
    stems, records = output_stems(files), []
    bar = tqdm(total=len(files), unit="img", desc="segment", disable=not progress)
    step = chunk_size(model.batch_size, len(names))
    for first in range(0, len(files), step):
        chunk = files[first:first + step]
        result = model.segment(chunk, names, background=rule, threshold=threshold, template=prompts,
                               methods=METHODS)
        for j in range(len(chunk)):
            records.append(write_image_outputs(result, j, out_dir, stems[first + j], model))
        bar.update(len(chunk))
    bar.close()
    print(f"segment: {len(records)} images, classes {', '.join(names)}, background {rule} -> {out_dir}",
          flush=True)
    return {"out": str(out_dir), "images": records}

