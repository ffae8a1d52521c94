"""What DVC shows of a run, read through DVC itself in a throw-away git + DVC repository holding
this project's dvc.yaml and params.yaml: `dvc metrics show` fits 120 columns for a result set of
the `coco` profile's shape, with names that say their evaluation, and `dvc plots show` draws loss
and val mAP per epoch and the ablation's MFI figure against val mAP (nothing else)."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config.params import DEFAULT_PARAMS, load_params
from pipeline.results.outputs import PROJECTOR_FREE, write_results

ROOT = Path(__file__).resolve().parents[1]
DVC = shutil.which("dvc", path=str(Path(sys.executable).parent)) or shutil.which("dvc")
pytestmark = pytest.mark.skipif(DVC is None, reason="dvc not installed")
CLASSES = [f"class{i}" for i in range(80)]
METHODS = ["clip", "clip-vproj", "clip-surgery", "clip-vv", "ours", "clip-surgery+ours"]


def _dvc(repo: Path, *args: str) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "COLUMNS": "400"}
    done = subprocess.run([DVC, *args], cwd=repo, capture_output=True, text=True, env=env, check=False,
                          timeout=300)
    assert done.returncode == 0, f"dvc {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """git + DVC repository with the project's dvc.yaml and params.yaml; the working directory."""
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    _dvc(tmp_path, "init", "-q")
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _seg(datasets: list[str], methods: list[str]) -> dict:
    """The seg stage's details shape: dataset -> methods -> variant -> protocol, per-class IoUs."""
    def one(i: int) -> dict:
        return {"methods": {m: {v: {"dataset": 10.0 + i + j, "per-image-positive-pred": 50.0 + i + j}
                                for v in ("all", "bkgd")} for j, m in enumerate(methods)},
                "headline": {}, "num_images": 5, "seconds_per_image": 0.1}
    return {"protocol": "per-image-positive-pred", "datasets": {d: one(i) for i, d in enumerate(datasets)},
            "per_class": {"iou_dataset": {d: {m: {"all": dict.fromkeys(CLASSES, 0.5)} for m in methods}
                                          for d in datasets}}}


def test_dvc_metrics_show_fits_120_columns_for_the_coco_profile_with_unambiguous_names(repo: Path) -> None:
    params = load_params(ROOT / DEFAULT_PARAMS, profile="coco")
    sets, datasets = params.evaluate.mfi.class_sets, params.evaluate.seg.datasets
    assert len(sets) == 4 and len(datasets) == 3  # the shape this test stands for
    free = [m for m in METHODS if "ours" not in m]
    write_results(params, "train", {"val_map": 80.12, "best": {"epoch": 37, "val_map": 85.09},
                                    "last": {"epoch": 50, "val_map": 84.52},
                                    "mfi": {"before": 0.7, "after": 0.2, "reduction_pct": 71.0}})
    write_results(params, "mlr", {m: {"map": 60.0 + i} for i, m in enumerate(("clip", "ours"))}
                  | {"per_class": {"ours": {"ap": dict.fromkeys(CLASSES, 0.6)}}})
    write_results(params, "mfi", {"class_sets": {s: {"before": 0.7512, "after": 0.5234, "reduction_pct":
                                                     {"trained": 30.33}} for s in sets}})
    write_results(params, "seg-baselines", _seg(datasets, free), scope=PROJECTOR_FREE)
    write_results(params, "seg", _seg(datasets, METHODS))
    write_results(params, "zs-mlr", {"map": {"clip": 78.73, "regions": 70.1, "combined": 80.71},
                                     "per_class": {"ap": {"clip": dict.fromkeys(CLASSES, 0.7)}}})

    table = _dvc(repo, "metrics", "show")
    widest = max(len(line) for line in table.splitlines())
    assert widest <= 120, f"`dvc metrics show` is {widest} characters wide:\n{table}"
    shown = json.loads(_dvc(repo, "metrics", "show", "--json"))[""]["data"]
    names = [k for f in shown.values() for k in f["data"]]
    assert len(names) == len(set(names)), names  # no name in two files: `dvc exp show` needs no path
    assert set(names) == {"val_map", "mfi_coco", "zs_mlr_map", *(f"zs3_{d}" for d in datasets)}
    files = {Path(p).stem: f["data"] for p, f in shown.items()}
    assert files["mlr"] == {"val_map": 61.0} and files["zs-mlr"] == {"zs_mlr_map": 80.71}
    assert files["seg"] == {f"zs3_{d}": 50.0 + i + METHODS.index("ours") for i, d in enumerate(datasets)}
    assert "seg-baselines" not in files  # the baselines' numbers: tables and details, not DVC's view
    details = json.loads((repo / "results" / "details" / "seg-baselines.json").read_text())
    assert details["run"]["scope"] == PROJECTOR_FREE


def test_dvc_plots_show_draws_loss_and_val_map_per_epoch_and_the_ablation(repo: Path) -> None:
    from stages.train import TSV_COLUMNS, write_metrics

    params = load_params(ROOT / DEFAULT_PARAMS)
    history = [{c: float(e if c == "epoch" else 10 * e + i) for i, c in enumerate(TSV_COLUMNS)}
               for e in (1, 2, 3)]
    write_metrics(params, history, None)
    ablation = repo / "results" / "ablation" / "ablation.csv"
    ablation.parent.mkdir(parents=True)
    with ablation.open("w", newline="") as f:  # the columns stages/ablate.py writes, among others
        rows = csv.DictWriter(f, ["lambda", "alpha", "val_map", "mfi_after", "loss"])
        rows.writeheader()
        rows.writerows({"lambda": lam, "alpha": a, "val_map": 50 + lam, "mfi_after": 0.5 - lam / 10,
                        "loss": 1.0} for lam in (0.0, 0.2) for a in (0.0, 0.01))

    plots = json.loads(_dvc(repo, "plots", "show", "--json"))["data"]
    drawn = {plot_id: _fields(p[0]["content"]) for plot_id, p in plots.items()}
    assert drawn == {"loss": {"x": {"epoch"}, "y": {"loss"}}, "val_map": {"x": {"epoch"}, "y": {"val_map"}},
                     "mfi_vs_map": {"x": {"mfi_after"}, "y": {"val_map"}}}, drawn
    values = plots["val_map"][0]["content"]["data"]["values"]
    assert [float(v["val_map"]) for v in values] == [r["val_map"] for r in history]
    assert len(plots["mfi_vs_map"][0]["content"]["data"]["values"]) == 4


def _fields(spec: object) -> dict[str, set[str]]:
    """{"x": fields, "y": fields} that a Vega-Lite spec encodes on its axes, at any depth."""
    out: dict[str, set[str]] = {"x": set(), "y": set()}
    stack = [spec]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for axis in ("x", "y"):
                enc = (node.get("encoding") or {}).get(axis) if isinstance(node.get("encoding"), dict) else None
                if isinstance(enc, dict) and "field" in enc:
                    out[axis].add(enc["field"])
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return out
