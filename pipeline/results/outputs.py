"""Where a stage's numbers go: full results for people and scripts, a few numbers for DVC.

  results/details/<what>.json   everything (per-class APs and IoUs under `per_class*` keys), plus
                                `run`: the recipe and a digest of the params that made the numbers
  results/metrics/<what>.json   DVC's view (`metrics`, evaluations only): a few flat numbers whose
                                names say their evaluation (`val_map`, `zs3_voc2012`, `zs_mlr_map`),
                                so `dvc metrics show` fits 120 columns for the `coco` profile and
                                `dvc exp show` columns need no file name; dvc_metrics() lists them
  results/tables/<what>.md      the Markdown table the report quotes

`headline()` is the fuller, nested view (every method per dataset, every MFI class set) that the
report and the demo's summary read from the details files (key_numbers()). Every text written here
names files relative to the project (the working directory the stage runs in): a result file
never carries the absolute paths of the machine that made it.

The digest lets the report notice a table, figure or ablation made by another run than the one
that trained the projectors; projector-free results (the ZS3 baselines) carry a digest of only the
params they read, so an experiment on train.* leaves them current.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
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
# What the projector-free ZS3 methods read (dvc.yaml's evaluate-seg-baselines lists the same): the
# backbone (its BatchNorm recalibrated on data.dataset for a random one) and these evaluate keys.
PROJECTOR_FREE = "projector-free"
DVC_VIEWS = ("mlr", "mfi", "seg", "zs-mlr")  # the stages with a results/metrics/<what>.json
_FREE_EVALUATE_KEYS = ("batch_size", "missing", "prompt", "text_input", "voc_names", "seg")


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


def run_identity(params: Params, scope: str = "projectors") -> dict:
    """{"recipe", "digest", "backbone", "weights"}: who made these numbers, comparable across files.
    The train keys that only say where or how fast a run went (provenance.IGNORED_TRAIN_KEYS, which
    the projectors' own record skips) are left out, so a rerun with more threads is the same run.
    scope PROJECTOR_FREE: the digest of what the projector-free ZS3 methods read (recorded as
    "scope"), which no model or train key changes."""
    from pipeline.training.provenance import (
        IGNORED_TRAIN_KEYS,  # torch and zarr: only when a digest is made
    )

    b = params.backbone
    sections = as_dict(params)
    run = {s: sections[s] for s in RUN_SECTIONS}
    run["data"] = {k: v for k, v in run["data"].items() if k in _DATA_KEYS}
    run["train"] = {k: v for k, v in run["train"].items() if k not in IGNORED_TRAIN_KEYS}
    if scope == PROJECTOR_FREE:
        run = {"data": run["data"], "backbone": run["backbone"],
               "evaluate": {k: sections["evaluate"][k] for k in _FREE_EVALUATE_KEYS}}
    blob = json.dumps(run, sort_keys=True, default=str).encode()
    out = {"recipe": params.recipe, "digest": hashlib.sha256(blob).hexdigest()[:16],
           "backbone": b.name, "weights": weights_label(b)}
    return out if scope != PROJECTOR_FREE else {**out, "scope": PROJECTOR_FREE}


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
    """The key numbers of `full`, nested: every method per dataset, every MFI class set (what the
    report's paper table and the demo's summary quote; dvc_metrics() picks DVC's few from them)."""
    if what in ("mlr",):
        return {m: _num(r["map"]) for m, r in full.items() if isinstance(r, dict) and "map" in r}
    if what == "mfi":
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


def dvc_metrics(what: str, full: dict, params: Params) -> dict:
    """DVC's flat view of `full`: one "val mAP" (`val_map`: the projectors evaluate.projectors names,
    on the val split; train.json's per-epoch values are plots), ZS3 mIoU of ours per dataset
    (`zs3_<dataset>`, the headline protocol), the MFI figure after training on the training data's
    classes (`mfi_<set>`) and ZS-MLR mAP of ours (`zs_mlr_map`: global + regions). Nothing more fits
    120 columns for the coco profile (DVC prints one column per name across all files): baselines
    (CLIP, CLIP-VV, ...), which no experiment on train.* moves, and training's last epoch are in
    the tables, the details and the plots. Stages outside DVC_VIEWS write no metrics file."""
    head = headline(what, full, params.evaluate.seg)
    if what == "mlr":
        return {"val_map": head.get("ours")}
    if what == "mfi":
        sets = [s for s in head if params.data.dataset.startswith(s)] or list(head)[:1]
        return {f"mfi_{s}": head[s]["after"] for s in sets[:1]}
    if what == "seg":
        return {f"zs3_{name}": row["ours"] for name, row in head.items() if "ours" in row}
    if what == "zs-mlr":
        return {"zs_mlr_map": head.get("combined")} if head else {}
    return {}


def count_values(d: dict) -> int:
    return sum(count_values(v) if isinstance(v, dict) else 1 for v in d.values())


def project_relative(text: str, root: str | Path | None = None) -> str:
    """`text` with every path inside `root` (default: the working directory, the project or the
    demo's run folder) written relative to it: results travel between machines."""
    prefix = str(Path(root or os.getcwd()).resolve()) + os.sep
    return text.replace(prefix, "") if prefix != os.sep else text


def write_results(params: Params, what: str, full: dict, headline_: dict | None = None,
                  table: str | None = None, skipped: list[str] | None = None,
                  scope: str = "projectors") -> dict:
    """Write details (full + run identity + `skipped` datasets), metrics (DVC's view) and the table.

    `headline_` None: dvc_metrics(what, ...). scope PROJECTOR_FREE: details and table only, with
    that run identity (no DVC metrics: baselines fill columns, not comparisons). Returns the
    metrics written."""
    full = jsonable(full)
    head = jsonable(dvc_metrics(what, full, params) if headline_ is None else headline_)
    details = {**full, "run": run_identity(params, scope)}
    if skipped:
        details["skipped"] = skipped
    atomic_write_text(paths.results_dir(params.paths, "details", f"{what}.json"),
                      project_relative(json.dumps(details, indent=1)) + "\n")
    if what in DVC_VIEWS and scope != PROJECTOR_FREE:
        atomic_write_text(paths.results_dir(params.paths, "metrics", f"{what}.json"),
                          json.dumps(head, indent=2) + "\n")
    # beside the metrics, not one: which recipe, every key that differs from the other one, and
    # which of this run's values are a profile's (set_by)
    summary = recipe_summary(params)
    summary["set_by"] = set_by(params, summary["overridden"])
    atomic_write_text(paths.results_dir(params.paths, RECIPE_FILE), json.dumps(summary, indent=1) + "\n")
    if table is not None:
        note = f"\n\nNot evaluated (not on disk, evaluate.missing: skip): {', '.join(skipped)}." \
            if skipped else ""
        atomic_write_text(paths.results_dir(params.paths, "tables", f"{what}.md"),
                          project_relative(table.rstrip() + note) + "\n")
    return head


def set_by(params: Params, overridden: dict) -> dict[str, str]:
    """For each recipe key this run sets otherwise: "profile <name>" when it holds the value of the
    profile this run's params match best (a profile's keys land in params.yaml through `pipeline
    configure`, so which one was used is read off the values), else "params" (the file or --set)."""
    from pipeline.config.params import PROFILES_DIR, flatten, load_profile

    values = as_dict(params)
    best: tuple[str, dict] | None = None
    best_score = 0.5  # at least half of a profile's keys must hold its values
    for name in sorted(p.stem for p in PROFILES_DIR.glob("*.yaml")):
        keys = flatten(load_profile(name))
        score = sum(_lookup(values, k) == v for k, v in keys.items()) / max(len(keys), 1)
        if score > best_score:
            best, best_score = (name, keys), score
    out = {}
    for key, v in overridden.items():
        mine = best is not None and key in best[1] and best[1][key] == v["value"]
        out[key] = f"profile {best[0]}" if mine and best else "params"
    return out


def _lookup(values: dict, key: str) -> Any:
    from pipeline.config.params import ParamError, get

    try:
        return get(values, key)
    except ParamError:  # a profile key the schema no longer has: not this profile's value
        return None


def key_numbers(results: Path, params: Params) -> dict[str, dict]:
    """{what: headline(what, details)} for every results/details/<what>.json: the nested numbers
    the report and the demo's summary quote (the projector stage's seg.json has every method)."""
    out = {}
    for path in sorted((results / "details").glob("*.json")):
        try:
            full = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(full, dict):
            out[path.stem] = headline(path.stem, full, params.evaluate.seg)
    return out


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
