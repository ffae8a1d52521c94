"""`pipeline demo`: the whole DAG on the embedded smoke profile, in a few minutes on 2 CPU cores.

Generates a planted-signal COCO-layout dataset and a tiny random CLIP, then runs the same stage
functions that `dvc repro` runs, in DAG order, inside `workdir` (relative paths resolve there), and
writes `<workdir>/results/summary.md`: the "latest run" table the README quotes.
"""
from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline.config.params import PACKAGED_PARAMS, as_dict, load_params
from pipeline.config.schema import Params
from pipeline.config.yaml12 import yaml_dump
from pipeline.files import atomic_write_text
from pipeline.results.outputs import key_numbers


def _base_params() -> Path:
    """The repository's params.yaml: pipeline/config/params.yaml links to it, and a wheel carries
    a copy of it, so `pipeline demo` works from any folder and from a non-editable install."""
    return PACKAGED_PARAMS


def summary_table(results: Path, timings: dict[str, float], params: Params) -> str:
    """The "latest run" table the README quotes: CLIP vs ours per result, and seconds per stage."""
    m = key_numbers(results, params)  # every method and class set (DVC's metrics keep a few)

    def f(*keys: str) -> str:
        v: Any = m
        for k in keys:
            v = v.get(k) if isinstance(v, dict) else None
        return "-" if not isinstance(v, (int, float)) else f"{v:.3g}" if abs(v) < 1 else f"{v:.1f}"

    rows = [f"| MLR val mAP | {f('mlr', 'clip')} | {f('mlr', 'ours')} |"]
    rows += [f"| MFI figure of merit, {s} classes | {f('mfi', s, 'before')} | {f('mfi', s, 'after')} |"
             for s in m.get("mfi", {})]
    rows += [f"| ZS3 mIoU, {d} (CLIP-VV {f('seg', d, 'clip-vv')}) | {f('seg', d, 'clip')} | "
             f"{f('seg', d, 'ours')} |" for d in m.get("seg", {})]
    rows.append(f"| segment-driven ZS-MLR mAP (regions / combined) | {f('zs-mlr', 'clip')} | "
                f"{f('zs-mlr', 'regions')} / {f('zs-mlr', 'combined')} |")
    host = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch_version()}"
    return "\n".join([
        (f"Latest `pipeline demo` ({datetime.now(timezone.utc):%Y-%m-%d}, {host}), recipe "
         f"**{params.recipe}**; generated data and a tiny random backbone: the "
         "numbers test the pipeline, not the method."), "",
        "| result (smoke data) | CLIP, no projectors | ours |", "|---|---:|---:|", *rows, "",
        "| stage | " + " | ".join(timings) + " | total |", "|---" * (len(timings) + 2) + "|",
        "| seconds | " + " | ".join(f"{v:.0f}" for v in timings.values())
        + f" | {sum(timings.values()):.0f} |"]) + "\n"


def torch_version() -> str:
    import torch

    return torch.__version__


def run(workdir: str | Path = "demo", recipe: str | None = None) -> dict[str, Any]:
    from stages import ablate, download, evaluate, extract_features, figures, report, train

    params = load_params(_base_params(), [f"recipe={recipe}"] if recipe else [], profile="smoke")
    workdir = Path(workdir).resolve()
    (workdir / "configs").mkdir(parents=True, exist_ok=True)
    (workdir / "configs" / "params.yaml").write_text(yaml_dump(as_dict(params)))
    steps: list[tuple[str, Callable[[], object]]] = [
        ("data", lambda: download.run(params, params.data.dataset)),
        ("extract", lambda: extract_features.run(params, split="all", restart_on_change=True)),
        ("train", lambda: train.run(params)),
        ("evaluate", lambda: evaluate.run(params, what="all")),
        ("figures", lambda: figures.run(params)),
        ("ablate", lambda: ablate.run(params)),
        ("report", lambda: report.run(params)),
    ]
    cwd = os.getcwd()
    os.chdir(workdir)
    timings: dict[str, float] = {}
    try:
        for name, step in steps:
            start = time.perf_counter()
            print(f"== {name}", flush=True)
            step()
            timings[name] = time.perf_counter() - start
    finally:
        os.chdir(cwd)
    results = workdir / params.paths.results
    summary = atomic_write_text(results / "summary.md", summary_table(results, timings, params))
    print("\n" + summary.read_text())
    print(f"results: {results}\nreport:  {results / 'report.md'}\nsummary: {summary}")
    return {"workdir": str(workdir), "timings": timings}
