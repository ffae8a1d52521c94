"""What users install is complete: the wheel carries every data file the package reads (recipes,
profiles, model configs, the default params), and a non-editable install runs `pipeline demo`
from a folder outside the repository."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tracked_tree(dest: Path) -> Path:
    """A copy of the tracked files (what a clone holds), so the build leaves the checkout clean."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)  # follows links: pipeline/config/params.yaml
    for name in filter(None, files):  # links to folders or files are copied as their target
        if (ROOT / name).is_symlink() and not (dest / name).exists():
            shutil.copy2(ROOT / name, dest / name)
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("git") is None:
        pytest.skip("needs git")
    base = tmp_path_factory.mktemp("wheel")
    tree = _tracked_tree(base / "src")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(base / "dist"), str(tree)], check=True, capture_output=True)
    (built,) = (base / "dist").glob("unmix_pipeline-*.whl")
    return built


@pytest.mark.slow
def test_wheel_carries_every_data_file_the_package_reads(wheel: Path) -> None:
    tracked = subprocess.run(["git", "ls-files", "pipeline", "stages"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split()
    data = {f for f in tracked if not f.endswith(".py")}
    assert {"pipeline/config/params.yaml", "pipeline/config/recipes/authors.yaml",
            "pipeline/config/profiles/smoke.yaml", "pipeline/model/model_configs/tiny-RN.json"} <= data
    names = set(zipfile.ZipFile(wheel).namelist())
    assert data <= names, sorted(data - names)
    assert {f for f in tracked if f.endswith(".py")} <= names
    packaged = zipfile.ZipFile(wheel).read("pipeline/config/params.yaml").decode()
    assert packaged == (ROOT / "params.yaml").read_text()  # a copy of the one params file


@pytest.mark.slow
def test_non_editable_install_runs_the_demo_outside_the_repository(wheel: Path, tmp_path: Path) -> None:
    env_dir = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # dependencies from this environment (no network); a path line does not run its .pth files,
    # so this checkout's editable hook stays out and only the wheel provides `pipeline`
    (site / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True)
    where = subprocess.run([str(python), "-c", "import pipeline, stages; print(pipeline.__file__)"],
                           cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(site)), where
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run([str(env_dir / "bin" / "pipeline"), "demo", "--workdir", "run"], cwd=tmp_path,
                          capture_output=True, text=True, env=environ, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = (tmp_path / "run" / "results" / "summary.md").read_text()
    assert "| MLR val mAP |" in summary and (tmp_path / "run" / "results" / "report.md").is_file()
