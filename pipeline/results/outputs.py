"""Where a stage's numbers go: full results for people and scripts, headline numbers for DVC.

  results/details/<what>.json   everything (per-class APs and IoUs under `per_class*` keys), plus
                                `run`: the recipe and a digest of the params that made the projectors
  results/metrics/<what>.json   the headline only (DVC `metrics`): mAP, MFI before/after/reduction (%),
                                the headline mIoU protocol per dataset and method, ZS-MLR mAPs;
                                ~40 values for a full run, so `dvc metrics show` fits a terminal
  results/tables/<what>.md      the Markdown table the report quotes

The digest lets the report notice a table, figure or ablation made by another run than the one
that trained the projectors.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import paths
from pipeline.config.params import as_dict, recipe_summary
from pipeline.config.schema import Backbone, Params, Seg
from pipeline.files import atomic_write_text

RECIPE_FILE = "recipe.json"

# The params that decide the projectors (and so every number downstream of them).
RUN_SECTIONS = ("data", "backbone", "extract", "model", "train")
_DATA_KEYS = ("dataset", "train_split", "val_split", "coco_val_images", "synthetic")


def jsonable(obj: Any) -> Any:
    """numpy -> Python, NaN/inf -> None (strict JSON for DVC and other readers)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def run_identity(params: Params) -> dict:
    """{"recipe", "digest", "backbone", "weights"}: who made these numbers, comparable across files.
    The train keys that only say where or how fast a run went (provenance.IGNORED_TRAIN_KEYS, which
    the projectors' own record skips) are left out, so a rerun with more threads is the same run."""
    from pipeline.training.provenance import (
        IGNORED_TRAIN_KEYS,  # torch and zarr: only when a digest is made
    )

    b = params.backbone
    sections = as_dict(params)
    run = {s: sections[s] for s in RUN_SECTIONS}
    run["data"] = {k: v for k, v in run["data"].items() if k in _DATA_KEYS}
    run["train"] = {k: v for k, v in run["train"].items() if k not in IGNORED_TRAIN_KEYS}
    blob = json.dumps(run, sort_keys=True, default=str).encode()
    return {"recipe": params.recipe, "digest": hashlib.sha256(blob).hexdigest()[:16],
            "backbone": b.name, "weights": weights_label(b)}


def weights_label(b: Backbone) -> str:
    """'checkpoint <file>', 'open_clip <tag>' or 'random (seed k[, BatchNorm recalibrated])'."""
    if b.checkpoint:
        return f"checkpoint {Path(b.checkpoint).name}"
    if b.pretrained not in (None, "random"):
        return f"open_clip {b.pretrained}"
    return f"random (seed {b.init_seed}" + (", BatchNorm recalibrated)" if b.recalibrate_bn else ")")


def _num(v: Any) -> float | None:
    """4 significant digits: a headline is for reading, details keep every digit."""
    if v is None or isinstance(v, bool) or not isinstance(v, (int, float, np.number)):
        return None
    v = float(v)
    return float(f"{v:.4g}") if math.isfinite(v) else None


def _trained(v: Any) -> Any:
    """MFI reduction: a number, or {untrained, alpha0, trained} (the trained projector's)."""
    return v.get("trained") if isinstance(v, dict) else v


def headline(what: str, full: dict, seg: Seg) -> dict:
    """The few numbers of `full` that `dvc metrics show` / `dvc exp show` display."""
    if what in ("mlr",):
        return {m: _num(r["map"]) for m, r in full.items() if isinstance(r, dict) and "map" in r}
    if what == "mfi":  # short names: `dvc exp show` prints one column per value
        sets = full.get("class_sets", full)
        return {s: {"before": _num(r.get("before")), "after": _num(r.get("after")),
                    "reduction": _num(_trained(r.get("reduction_pct")))}
                for s, r in sets.items() if isinstance(r, dict) and "after" in r}
    if what == "zs-mlr":
        return {m: _num(v) for m, v in full.get("map", {}).items()}
    if what == "train":
        mfi = full.get("mfi", {})
        return {"val_map": _num(full.get("val_map")), "mfi_reduction": _num(mfi.get("reduction_pct"))}
    if what == "seg":  # {datasets: {name: {methods: {method: {variant: {protocol: mIoU}}}}}}
        protocol = full.get("protocol", seg.protocol)
        out: dict = {}
        for name, result in full.get("datasets", full).items():
            if not isinstance(result, dict) or "methods" not in result:
                continue
            row = {}
            for method, variants in result["methods"].items():
                variant = next((variants[v] for v in ("bkgd", "all") if v in variants),
                               next(iter(variants.values())))
                row[method] = _num(variant.get(protocol))  # absent: None, never another protocol
            out[name] = row
        return out
    return {k: _num(v) for k, v in full.items() if _num(v) is not None}


def count_values(d: dict) -> int:
    return sum(count_values(v) if isinstance(v, dict) else 1 for v in d.values())


def write_results(params: Params, what: str, full: dict, headline_: dict | None = None,
                  table: str | None = None, skipped: list[str] | None = None) -> dict:
    """Write details (full + run identity + `skipped` datasets), metrics (headline) and the table.

    `headline_` None: chosen by `headline(what, ...)`. Returns the headline written."""
    full = jsonable(full)
    head = jsonable(headline(what, full, params.evaluate.seg) if headline_ is None else headline_)
    details = {**full, "run": run_identity(params)}
    if skipped:
        details["skipped"] = skipped
    atomic_write_text(paths.results_dir(params.paths, "details", f"{what}.json"),
                      json.dumps(details, indent=1) + "\n")
    atomic_write_text(paths.results_dir(params.paths, "metrics", f"{what}.json"),
                      json.dumps(head, indent=2) + "\n")
    # beside the metrics, not one: which recipe, and every key that differs from the other one
    atomic_write_text(paths.results_dir(params.paths, RECIPE_FILE),
                      json.dumps(recipe_summary(params), indent=1) + "\n")
    if table is not None:
        note = f"\n\nNot evaluated (not on disk, evaluate.missing: skip): {', '.join(skipped)}." \
            if skipped else ""
        atomic_write_text(paths.results_dir(params.paths, "tables", f"{what}.md"), table.rstrip() + note + "\n")
    return head


def write_skipped(params: Params, what: str, datasets: list[str]) -> None:
    """An evaluation with no data on disk: outputs that say so (DVC expects them to exist)."""
    write_results(params, what, {}, {}, f"## {what}\n\nSkipped: {', '.join(datasets)} not on disk "
                  "(evaluate.missing: skip).", skipped=datasets)


def stamp(params: Params, folder: str | Path) -> Path:
    """`<folder>/run.json`: the run identity, for outputs that are folders (ablation, figures)."""
    return atomic_write_text(Path(folder) / "run.json", json.dumps(run_identity(params), indent=1) + "\n")


def read_run(path: Path) -> dict | None:
    """The run identity a details file or stamp records; None when it records none."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    run = data.get("run", data) if isinstance(data, dict) else None
    return run if isinstance(run, dict) and "digest" in run else None
