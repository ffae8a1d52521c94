"""The record that makes a projectors file usable on its own: meta["use"].

`pipeline segment IMGS --projectors FILE`, `pipeline query` and `UnmixCLIP.from_files(FILE)` read
every default from it, from any directory and with no params file: the backbone as used (name,
open_clip tag or checkpoint path with its sha256, seed, weights digest; for a random backbone with
recalibrated BatchNorm, the statistics file and its sha256), the token paths, the image view
(size, resize, positional-embedding interpolation), prompt templates, text input, the image-level
scores' text BatchNorm, the background rule and threshold, and the recipe. Paths are stored as
given, relative to the project root (the directory the run's `paths.*` are relative to) when inside
it, and the file's own path too, so a reader finds the project root from the file's location
(pipeline/api/record.py). Older files have no "use" block and keep loading as before.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch

from pipeline.config.backbones import resolve_tokens
from pipeline.config.schema import Params
from pipeline.evaluation.segmentation import PROMPTS
from pipeline.evaluation.variants import seg_interpolation
from pipeline.model.build import backbone_from_params, is_random
from pipeline.model.recalibrate import bn_state_file, is_bn_state
from pipeline.model.weights import declared_digest, sha256_file

USE_VERSION = 1


def as_recorded(path: str | os.PathLike, root: Path | None = None) -> str:
    """`path` as the record keeps it: relative to the project root (default: the working directory,
    which `paths.*` are relative to) when inside it, else as given (absolute)."""
    p, root = Path(path), (root or Path.cwd())
    if not p.is_absolute():
        return p.as_posix()
    try:
        return p.relative_to(root).as_posix()
    except ValueError:
        try:
            return Path(os.path.abspath(p)).relative_to(Path(os.path.abspath(root))).as_posix()
        except ValueError:
            return str(p)


def bn_file_record(params: Params, weights_digest: str | None, root: Path | None = None
                   ) -> dict[str, str] | None:
    """{path, sha256} of the BatchNorm statistics of params' recalibrated random backbone, saved
    by extraction (cache/backbone/bn-*.pt); recomputed and saved here (atomically, by
    recalibrate_on_dataset) when missing or not the statistics the train store was built with."""
    b = params.backbone
    if not (b.recalibrate_bn and is_random(b)) or not weights_digest or "+bn:" not in weights_digest:
        return None
    path = bn_state_file(params)
    if _saved_digest(path) != weights_digest:
        backbone_from_params(b, torch.device("cpu"), params=params)  # recalibrates, saves the file
    if _saved_digest(path) != weights_digest:
        print(f"WARNING: the BatchNorm statistics in {path} are not those of the train store "
              f"({weights_digest}): the projectors record no statistics file", file=sys.stderr, flush=True)
        return None
    return {"path": as_recorded(path, root), "sha256": sha256_file(path)}


def _saved_digest(path: Path) -> str | None:
    if not path.is_file():
        return None
    saved = torch.load(path, map_location="cpu", weights_only=True)
    return saved["weights_digest"] if is_bn_state(saved) else None


def use_record(params: Params, projectors: str | os.PathLike, weights_digest: str | None,
               root: Path | None = None) -> dict[str, Any]:
    """meta["use"] of the projectors file at `projectors` (as the run names it), trained on tokens
    of backbone weights `weights_digest` (the train store's); paths relative to `root` (default:
    the working directory, which the run's paths.* are relative to)."""
    b, ev = params.backbone, params.evaluate
    checkpoint = as_recorded(b.checkpoint, root) if b.checkpoint else None
    sha256 = None
    if b.checkpoint:  # a checkpoint's digest is its sha256: the store's is the one trained on
        sha256 = (weights_digest or "").split("+bn:")[0] or declared_digest(b)
    return {
        "version": USE_VERSION,
        "projectors": as_recorded(projectors, root),
        "backbone": {
            "name": b.name, "pretrained": None if checkpoint or is_random(b) else b.pretrained,
            "checkpoint": checkpoint, "sha256": sha256, "init_seed": b.init_seed,
            "weights_digest": weights_digest or declared_digest(b),
            "bn_file": bn_file_record(params, weights_digest, root)},
        "tokens": {"train": resolve_tokens(b.name, "train", params.extract.tokens),  # trained on
                   "seg": resolve_tokens(b.name, "seg", ev.seg.tokens)},  # ZS3 `ours`, segment, query
        **view_record(params),
        "recipe": params.recipe,
    }


def view_record(params: Params) -> dict[str, Any]:
    """The record's image view, prompts and background rule as params give them: what use_record
    writes, and what `segment` takes from params for a file written before the record."""
    ev = params.evaluate
    return {
        "image_size": ev.seg.image_size,
        "interpolation": seg_interpolation(ev.seg.interpolation),  # released: bicubic (no dataset)
        "pos_interpolation": ev.seg.pos_interpolation,
        "templates": [PROMPTS[ev.prompt]],
        "text_input": ev.text_input,
        "text_bn": {"seg": ev.text_bn.seg, "mlr": ev.text_bn.mlr},  # the evaluation's; segment: running
        "background": ev.seg.background, "threshold": ev.seg.threshold,
        "batch_size": ev.batch_size,
    }
