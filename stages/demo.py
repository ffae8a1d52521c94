"""`pipeline demo`: the whole DAG on the embedded smoke profile, in a few minutes on 2 CPU cores.

Generates a planted-signal COCO-layout dataset and a tiny random CLIP, then runs the same stage
functions that `dvc repro` runs, in DAG order, inside `workdir` (relative paths resolve there).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import yaml

import pipeline
from pipeline.config import DEFAULT_PARAMS, load_params


def _base_params() -> Path:
    repo = Path(pipeline.__file__).resolve().parents[1] / DEFAULT_PARAMS
    return repo if repo.exists() else DEFAULT_PARAMS.resolve()


def run(workdir: str | Path = "demo") -> dict:
    from stages import ablate, download, evaluate, extract_features, figures, report, train

    params = load_params(_base_params(), profile="smoke")
    workdir = Path(workdir).resolve()
    (workdir / "configs").mkdir(parents=True, exist_ok=True)
    (workdir / "configs" / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    steps = [
        ("data", lambda: download.run(params, params["data"]["dataset"])),
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
    results = workdir / params["paths"]["results"]
    print("\nstage timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    print(f"results: {results}\nreport:  {results / 'report.md'}\nfigures: {results / 'figures'}")
    return {"workdir": str(workdir), "timings": timings}
