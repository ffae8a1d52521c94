"""`dvc repro` of the smoke profile in a throw-away git repository: green, then a no-op, then a
one-parameter change re-runs only the stages downstream of it."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_params

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("dvc") is None, reason="dvc not installed")

TINY = [  # the smoke profile, smaller still: the test proves the DAG, not learning
    "data.synthetic.n_train=48", "data.synthetic.n_val=24", "data.synthetic.image_size=64",
    "backbone.image_size=64", "extract.shard_size=16", "train.epochs=2", "ablate.epochs=1",
    "ablate.lambdas=[0.2]", "ablate.alphas=[0.0,0.05]", "figures.images=1", "figures.classes=[person]",
]


def _sh(cwd: Path, *args: str) -> str:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def _ran(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("dvcrepo")
    for name in ("pipeline", "stages"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    shutil.copy(ROOT / ".dvcignore", repo / ".dvcignore")
    params = load_params(ROOT / "configs" / "params.yaml", TINY, profile="smoke")
    (repo / "configs").mkdir()
    (repo / "configs" / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (repo / "params.yaml").symlink_to("configs/params.yaml")
    _sh(repo, "git", "init", "-q")
    _sh(repo, "git", "config", "user.email", "ci@example.com")
    _sh(repo, "git", "config", "user.name", "ci")
    _sh(repo, "dvc", "init", "-q")
    _sh(repo, "dvc", "config", "core.analytics", "false")
    _sh(repo, "git", "add", "-A")
    _sh(repo, "git", "commit", "-qm", "init")
    return repo


@pytest.mark.slow
def test_dvc_repro_runs_green_then_is_a_noop_then_reruns_only_downstream(repo):
    first = _sh(repo, "dvc", "repro")
    assert {"data", "extract@train", "extract@val", "train", "report"} <= _ran(first)
    assert (repo / "results" / "report.md").exists()
    metrics = _sh(repo, "dvc", "metrics", "show")
    assert "val_map" in metrics or "map" in metrics

    assert _ran(_sh(repo, "dvc", "repro")) == set()  # nothing changed, nothing runs

    _sh(repo, "dvc", "exp", "run", "-S", "train.mfi.lambda=0.5")
    params = yaml.safe_load((repo / "configs" / "params.yaml").read_text())
    assert params["train"]["mfi"]["lambda"] == 0.5  # -S edited the single source of params
    status = _sh(repo, "dvc", "status")
    assert "extract" not in status  # the change did not invalidate the feature stores


@pytest.mark.slow
def test_changing_one_param_reruns_only_downstream_stages(repo):
    _sh(repo, "dvc", "repro")
    params_file = repo / "configs" / "params.yaml"
    params = yaml.safe_load(params_file.read_text())
    params["figures"]["images"] = 2
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    ran = _ran(_sh(repo, "dvc", "repro"))
    assert "figures" in ran
    assert not ran & {"data", "extract@train", "extract@val", "train", "ablate"}
