"""The real user's path, end to end: a fresh `git clone`, the README's set-up (`pipeline configure
--profile smoke`), a COCO-layout dataset placed by hand, then `dvc repro` with no download, an
experiment that re-runs only what is downstream of its parameter, and metrics a terminal can show.
And on the smoke profile as it comes (generated data and backbone): the data stage run again
writes the same bytes, so nothing downstream of it is rebuilt."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.data.synthetic import make_planted_coco

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's dvc and pipeline entry points
DVC = shutil.which("dvc", path=str(BIN)) or shutil.which("dvc")
pytestmark = pytest.mark.skipif(DVC is None, reason="dvc not installed")

SETTINGS = [  # the smoke profile on a hand-placed COCO-2017 layout, tiny: the test proves the path
    "data.dataset=coco2017", "backbone.checkpoint=null", "backbone.recalibrate_bn=true",
    "backbone.image_size=64", "extract.shard_size=16", "extract.views=1", "train.epochs=2",
    "train.eval_every=2", "evaluate.seg.datasets=[coco2017]", "evaluate.seg.image_size=64",
    "evaluate.zs_mlr.dataset=coco2017", "evaluate.zs_mlr.split=val", "evaluate.zs_mlr.image_size=64",
    "evaluate.mfi.class_sets=[coco]", "ablate.epochs=1", "ablate.lambdas=[0.2]",
    "ablate.alphas=[0.0]", "figures.images=1", "figures.classes=[person]",
]
STAGES = {"data", "extract@train", "extract@val", "train", "evaluate@mlr", "evaluate-seg-baselines",
          "evaluate-seg", "evaluate@zs-mlr", "evaluate-mfi", "figures", "ablate", "report"}
TIMES: dict[str, float] = {}


def _env(repo: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(repo), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "HF_HUB_OFFLINE": "1", "COLUMNS": "400", "DVC_NO_ANALYTICS": "1"}
    env.pop("VIRTUAL_ENV", None)
    return env


def _sh(cwd: Path, *args: str, step: str | None = None) -> str:
    start = time.perf_counter()
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=900, check=False,
                          env=_env(cwd))
    if step:
        TIMES[step] = time.perf_counter() - start
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def _ran(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


def _count(d) -> int:
    return sum(_count(v) for v in d.values()) if isinstance(d, dict) else 1


def fresh_clone(tmp_path_factory, *settings: str) -> Path:
    """`git clone` of the committed tree, `pipeline configure --profile smoke` with `settings`."""
    if subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], check=False,
                      capture_output=True).returncode:
        pytest.skip("not a git checkout")
    repo = tmp_path_factory.mktemp("user") / "unmix"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(repo)], check=True)
    for key, value in (("user.email", "ci@example.com"), ("user.name", "ci")):
        subprocess.run(["git", "-C", str(repo), "config", key, value], check=True)
    _sh(repo, "pipeline", "configure", "--profile", "smoke", *[a for s in settings for a in ("--set", s)])
    return repo


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """`git clone` of the committed tree, configured as the README says, data placed by hand."""
    repo = fresh_clone(tmp_path_factory, *SETTINGS)
    make_planted_coco(repo / "data" / "coco2017", n_train=32, n_val=16, num_classes=80,
                      image_size=64)  # the COCO-2017 reader wants all 80 categories
    return repo


@pytest.mark.slow
def test_fresh_clone_repro_then_experiment_then_readable_metrics(clone):
    first = _sh(clone, DVC, "repro", step="dvc repro (fresh clone)")
    assert _ran(first) == STAGES
    assert "downloading" not in first  # the placed dataset was used as is
    assert "RANDOM weights" in first and "BatchNorm statistics recalibrated" in first
    report = (clone / "results" / "report.md").read_text()
    assert "WARNING: this run used a RANDOM backbone" in report
    assert "inputs from another run" not in report  # every input of this report is this run's
    seg = (clone / "results" / "tables" / "seg.md").read_text()  # one Table 2: every method
    assert all(f"| {m} " in seg for m in ("clip", "clip-vv", "clip-surgery", "ours"))
    again = _sh(clone, DVC, "repro", step="dvc repro (no-op)")
    assert _ran(again) == set(), again  # nothing changed, nothing runs
    assert_no_absolute_paths(clone)
    plots = json.loads(_sh(clone, DVC, "plots", "show", "--json"))["data"]
    assert set(plots) == {"loss", "val_map", "mfi_vs_map"}  # not every column of train.tsv
    _sh(clone, DVC, "plots", "show")  # writes dvc_plots/, which `git add -A` must leave out
    _sh(clone, "git", "add", "-A")  # the README: commit the baseline, then run experiments on it
    _sh(clone, "git", "commit", "-qm", "baseline")
    assert "dvc_plots" not in _sh(clone, "git", "ls-files")

    exp = _sh(clone, DVC, "exp", "run", "-S", "train.mfi.lambda=0.5", step="dvc exp run -S")
    ran = _ran(exp)
    assert "train" in ran and "report" in ran and "evaluate-seg" in ran
    assert not ran & {"data", "extract@train", "extract@val", "evaluate-seg-baselines"}
    report = (clone / "results" / "report.md").read_text()
    assert "inputs from another run" not in report  # the baselines' file is still current
    assert_no_absolute_paths(clone)

    metrics = json.loads(_sh(clone, DVC, "metrics", "show", "--json"))
    values = sum(_count(f.get("data", {})) for w in metrics.values() for f in w.get("data", {}).values())
    assert 0 < values <= 40, f"{values} metric values"
    assert "per_class" not in json.dumps(metrics)
    details = json.loads((clone / "results" / "details" / "mlr.json").read_text())
    assert "per_class" in json.dumps(details)  # per-class values kept, beside the headline
    # `evaluate mlr` on the projectors evaluate.projectors names is the epoch train.json reports
    trained = json.loads((clone / "results" / "details" / "train.json").read_text())
    which = details["source"]["projectors"]["which"]
    assert details["ours"]["map"] == pytest.approx(trained[which]["val_map"], abs=1e-6)
    assert json.loads((clone / "results" / "metrics" / "seg.json").read_text()).keys() == {"zs3_coco2017"}
    # --drop: the dependency columns (a hash per changed folder); metric names keep their ':'
    table = _sh(clone, DVC, "exp", "show", "--only-changed", "--drop", "[^:]*/[^:]*$", "--no-pager")
    widest = max(len(line) for line in table.splitlines())
    assert widest < 200, f"dvc exp show --only-changed is {widest} characters wide:\n{table}"
    assert "train.mfi.lambda" in table and "val_map" in table
    print("\nwall times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in TIMES.items()))


def assert_no_absolute_paths(repo: Path) -> None:
    """No file under results/ names where the run happened (the clone's path or its real path)."""
    roots = {str(repo), str(repo.resolve())}
    for path in (repo / "results").rglob("*"):
        if path.is_file() and path.suffix in {".json", ".md", ".csv", ".tsv", ".txt"}:
            text = path.read_text()
            assert not any(r in text for r in roots), f"{path} names {repo}"


@pytest.mark.slow
def test_the_runs_projectors_segment_a_photo_from_another_directory(clone, tmp_path):
    """After the DVC run (random backbone, recalibrated BatchNorm), `pipeline segment --projectors`
    alone works from elsewhere: the projectors record the BatchNorm statistics file."""
    from PIL import Image

    from pipeline.data.synthetic import planted_sample

    _sh(clone, DVC, "repro", "train")  # nothing to do after the test above
    projectors = clone / "cache" / "models" / "projectors-best.pt"
    photo = tmp_path / "photo.jpg"
    Image.fromarray(planted_sample(3, "val", 0, 96, 8)[0]).save(photo, quality=90)
    done = subprocess.run(["pipeline", "segment", str(photo), "--classes", "person,dog", "--projectors",
                           str(projectors), "--out", "out"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, check=False, env=_env(clone))  # the clone's code, run elsewhere
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads((tmp_path / "out" / "photo.json").read_text())["classes"] == ["person", "dog"]


@pytest.mark.slow
def test_smoke_data_stage_run_again_rebuilds_nothing(tmp_path_factory) -> None:
    """The generated data and backbone.pt are the same bytes when the data stage runs again (a
    dependency edited, `pipeline download`, `dvc repro -f data`): before, backbone.pt's torch
    archive carried the PID-named temporary file's name, and both stores were rebuilt."""
    repo = fresh_clone(tmp_path_factory, "data.synthetic.n_train=16", "data.synthetic.n_val=8",
                       "data.synthetic.image_size=64", "backbone.image_size=64", "extract.views=1",
                       "extract.shard_size=8")
    stores = ["extract@train", "extract@val"]
    assert _ran(_sh(repo, DVC, "repro", *stores, step="dvc repro data + stores")) == {"data", *stores}
    backbone = repo / "data" / "synthetic" / "backbone.pt"
    before = backbone.read_bytes()
    assert _ran(_sh(repo, DVC, "repro", "-f", "data", step="dvc repro -f data")) == {"data"}
    assert backbone.read_bytes() == before
    again = _sh(repo, DVC, "repro", *stores, step="dvc repro (after data)")
    assert _ran(again) == set(), again
    assert "up to date" in _sh(repo, DVC, "status", *stores)
