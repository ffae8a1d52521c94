"""`pipeline segment`: trained projectors on any images and any class words (no DVC stage).

Per image, in --out: <name>_overlay.png (image | CLIP | CLIP-VV | ours, one row per class, one
colourbar; the label map in the label PNG's colours with a legend of class and pixel share),
<name>_labels.png (palette PNG: 0 background, 1..C the classes in the given order) and
<name>.json (image-level scores, pixel fractions, the view's resize and size, the image's sha256,
the model used). <name> is the image's file stem, never another image's (pipeline/results/names.py).
The photo keeps its aspect ratio (--resize keep, data/dense_view.py) unless --resize square asks
for the evaluation's view. Everything is computed by pipeline.api.unmix.UnmixCLIP.from_files with
the API's defaults: those of the projectors file's record (backbone weights, image size and resize
interpolation, prompt, text input, background rule and threshold; pipeline/api/record.py),
overridden only by flags given (--checkpoint, --text-bn, --background, --threshold, --template,
--device). The projectors: --projectors FILE, --run DIR (its evaluate.projectors file), else the
params' evaluate.projectors file; no params file is needed with either flag. params' evaluate.seg.*
are the evaluation's, not segment's: they are read only for projectors files written before the
record (and backbone.* for their weights). The maps use the text projector's running BatchNorm
statistics (open vocabulary) unless --text-bn batch. `ours` is normalised after the image projector
(the paper's cosine), whatever evaluate.seg.ours_norm says.
"""
from __future__ import annotations

import glob
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from pipeline.api.record import record_options
from pipeline.api.unmix import SegmentationResult, UnmixCLIP, class_list, template_list
from pipeline.api.views import resize_rule
from pipeline.config import paths
from pipeline.config.params import ParamError, load_params
from pipeline.config.schema import Params
from pipeline.data.images import BadImageError, load_image
from pipeline.data.synthetic import voc_palette
from pipeline.evaluation.segment_maps import METHODS
from pipeline.evaluation.segmentation import method_labels
from pipeline.files import atomic_write, atomic_write_text
from pipeline.model.projectors import read_state
from pipeline.results.names import image_digest, output_names
from pipeline.results.outputs import project_relative
from pipeline.results.overlays import label_colours, legend_colours, panel_view
from pipeline.training.usage import view_record

MAP_BUDGET_BYTES = 1 << 30  # score maps held per chunk: C x methods x pixels x 4 bytes per image
TYPICAL_PIXELS = 640 * 480  # a COCO image
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


def run_params(run_dir: str | Path) -> Params:
    """The params of a run directory (e.g. demo/, which `pipeline demo` writes), with its relative
    paths (paths.*, backbone.checkpoint) made relative to it."""
    run = Path(run_dir)
    file = run / "configs" / "params.yaml"
    if not file.is_file():
        raise ParamError(f"--run {run_dir}: no {file} (a run directory holds configs/params.yaml, as "
                         "`pipeline demo` writes it); pass the projectors file with --projectors instead")
    params = load_params(file)
    rooted = {k: v if Path(v).is_absolute() else str(run / v) for k, v in params.paths.model_dump().items()}
    b = params.backbone
    checkpoint = b.checkpoint if not b.checkpoint or Path(b.checkpoint).is_absolute() else str(run / b.checkpoint)
    return params.model_copy(update={"paths": params.paths.model_copy(update=rooted),
                                     "backbone": b.model_copy(update={"checkpoint": checkpoint})})


def projectors_and_params(params: Params | None, projectors: str | Path | None,
                          run_dir: str | Path | None) -> tuple[Path, Params | None]:
    """(projectors file, params of its run or the project's): --projectors, else --run DIR's
    evaluate.projectors, else the params' (no silent fallback)."""
    if run_dir is not None:
        params = run_params(run_dir)
    if projectors:
        return Path(projectors), params
    if params is None:
        raise ParamError("which projectors? pass --projectors FILE (e.g. cache/models/projectors-best.pt) "
                         "or --run DIR (e.g. demo), or run from a project with configs/params.yaml")
    return default_projectors(params), params


def unrecorded_options(params: Params) -> dict[str, Any]:
    """Defaults for a projectors file written before the record (pipeline/training/usage.py):
    the params' backbone weights and evaluation values, as `segment` read them then."""
    b = params.backbone
    return {"checkpoint": b.checkpoint, "pretrained": None if b.checkpoint else (b.pretrained or "random"),
            "sha256": b.sha256, "init_seed": b.init_seed, **record_options({"use": view_record(params)})}


def model_from_params(params: Params | None, projectors: str | Path | None = None, *,
                      run_dir: str | Path | None = None, checkpoint: str | None = None,
                      text_bn: str | None = None, device: str | None = None) -> UnmixCLIP:
    """UnmixCLIP.from_files with the API's defaults (the file's record) and the flags given; the
    params (when there are any) choose the file, the device and the precision, and for files
    without a record also the weights and evaluation values (unrecorded_options)."""
    path, params = projectors_and_params(params, projectors, run_dir)
    print(f"projectors: {path}", flush=True)
    options: dict[str, Any] = {}
    if params is not None:
        b = params.backbone
        options.update(device=b.device, precision=b.precision, channels_last=b.channels_last)
        if path.is_file() and "use" not in read_state(path).get("meta", {}):
            options.update(unrecorded_options(params))
    given = {"checkpoint": checkpoint, "text_bn": text_bn, "device": device}
    if checkpoint is not None:
        options.pop("pretrained", None)
        options.pop("sha256", None)
    options.update({k: v for k, v in given.items() if v is not None})
    return UnmixCLIP.from_files(path, **options)


def output_dir(out: str | None, params: Params | None, run_dir: str | None, name: str) -> Path:
    """--out, else <run>/results/<name> (--run), the params' results folder, or results/<name>."""
    if out:
        return Path(out)
    if run_dir is None and params is not None:
        return paths.results_dir(params.paths, name)
    return Path(run_dir or ".") / "results" / name


def note_batch_stats(model: UnmixCLIP, classes: list[str]) -> None:
    if model.text_bn == "batch":
        if len(classes) < 2:
            model.text_features(classes)  # raises the API's one-line error
        print("note: --text-bn batch: the text projector's BatchNorm uses the statistics of the queried "
              "classes, so every score depends on the whole class list (as the released ZS3 scripts; "
              "the default, running, gives class-independent maps)", flush=True)


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


def label_panel(result: SegmentationResult, index: int, size: tuple[int, int]
                ) -> tuple[str, np.ndarray, dict[str, tuple[int, int, int]]]:
    """The overlay's label-map panel: title, (h, w, 3) colours of the label PNG, legend entries
    "name (share of pixels)" -> colour."""
    shares = result.pixel_fractions(index)
    names = {v: f"{name} ({shares[name]:.0%})" for v, name in result.legend().items() if name in shares}
    return "labels (ours)", label_colours(result.label_maps[index], size), legend_colours(names)


def write_image_outputs(result: SegmentationResult, index: int, out: Path, stem: str, model: UnmixCLIP,
                        methods: Sequence[str] = METHODS, digest: str = "") -> dict:
    """<stem>_overlay.png (per class row: image | each method's score map; the label map and
    its legend; one colourbar), <stem>_labels.png and <stem>.json (with the image's sha256)."""
    # matplotlib (~1 s of imports): loaded at the first overlay, not by the stage's import
    from pipeline.results.plots import activation_grid

    classes = result.classes
    overlay, labels, summary = out / f"{stem}_overlay.png", out / f"{stem}_labels.png", out / f"{stem}.json"
    image = load_image(result.sources[index])
    labels_of = method_labels(model.backbone.name)
    views = {labels_of[m]: panel_view(image, result.method_score_maps[m][index]) for m in methods}
    picture = next(iter(views.values()))[0]  # (h, w, 3) uint8
    maps = {label: list(small) for label, (_, small) in views.items()}  # C x (h, w) each
    activation_grid([picture] * len(classes), maps, overlay, row_labels=classes,
                    title=f"{Path(result.sources[index]).name}: {', '.join(classes)}",
                    label_panel=label_panel(result, index, picture.shape[:2]))
    write_label_png(labels, result.label_maps[index])
    record = {**result.summary(index), "image_sha256": digest or image_digest(result.sources[index]),
              "label_png": labels.name, "overlay_png": overlay.name, "model": model.describe()}
    text = project_relative(json.dumps(record, indent=2))  # no machine paths in results
    atomic_write_text(summary, text + "\n")
    return record


def run(params: Params | None, images: Sequence[str], classes: Sequence[str], projectors: str | None = None,
        background: str | None = None, threshold: float | None = None, templates: Sequence[str] = (),
        out: str | None = None, progress: bool = True, run_dir: str | None = None,
        checkpoint: str | None = None, text_bn: str | None = None, device: str | None = None,
        resize: str = "keep") -> dict[str, Any]:
    names = class_list(split_classes(classes))  # argument errors before any model is loaded
    resize = resize_rule(resize)
    prompts = template_list(templates) if templates else None  # None: the model's (record's)
    files = expand_images(images)
    model = model_from_params(params, projectors, run_dir=run_dir, checkpoint=checkpoint, text_bn=text_bn,
                              device=device)
    model.resize = resize  # the network's view: keep the aspect ratio, or the evaluation's square
    out_dir = output_dir(out, params, run_dir, "segment")
    rule = background or model.background
    threshold = model.threshold if threshold is None else threshold
    note_batch_stats(model, names)
    digests = [image_digest(f) for f in files]
    stems, records = output_names(files, out_dir, digests), []
    bar = tqdm(total=len(files), unit="img", desc="segment", disable=not progress)
    step = chunk_size(model.batch_size, len(names))
    for first in range(0, len(files), step):
        chunk = files[first:first + step]
        result = model.segment(chunk, names, background=rule, threshold=threshold, template=prompts,
                               methods=METHODS)
        for j in range(len(chunk)):
            records.append(write_image_outputs(result, j, out_dir, stems[first + j], model,
                                               digest=digests[first + j]))
        bar.update(len(chunk))
    bar.close()
    print(f"segment: {len(records)} images, classes {', '.join(names)}, background {rule}, "
          f"resize {resize} -> {out_dir}",
          flush=True)
    return {"out": str(out_dir), "images": records}

