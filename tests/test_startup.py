"""Start-up stays cheap: `pipeline --help` and every parameter error are answered before any heavy
library is imported, the segment and query stage modules leave plotting and the feature store out
(matplotlib is imported when the first overlay is drawn), and a stage is imported with the cyclic
garbage collector paused, then left as it was. Each import check runs in a fresh interpreter and
asserts on its sys.modules, not on a time (bench/bench_startup.py measures the times)."""
from __future__ import annotations

import gc
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from pipeline.cli import app

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "open_clip", "matplotlib", "zarr", "dask", "sklearn", "pycocotools", "numpy", "PIL")
STAGE_FREE = ("matplotlib", "zarr", "dask", "distributed", "sklearn", "pycocotools", "scipy", "pandas")


def loaded_after(code: str) -> dict:
    """Run `code` in a fresh interpreter at the repository root; it leaves a dict in `out`, to
    which the top-level packages it imported are added under "modules"."""
    script = f"import json, sys\nout = {{}}\n{code}\n" \
             "out['modules'] = sorted({m.split('.')[0] for m in sys.modules})\nprint(json.dumps(out))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def test_help_imports_no_heavy_library() -> None:
    out = loaded_after("import pipeline.cli.app\n"
                       "from click.testing import CliRunner\n"
                       "from pipeline.cli import main\n"
                       "r = CliRunner().invoke(main, ['--help'])\n"
                       "out['code'], out['text'] = r.exit_code, r.output\n"
                       "r = CliRunner().invoke(main, ['segment', '--help'])\n"
                       "out['segment_text'] = r.output")
    assert out["code"] == 0 and "segment" in out["text"] and "--classes" in out["segment_text"]
    assert not set(HEAVY) & set(out["modules"])


PARAMETER_ERRORS = [  # (argv, what the one-line error names)
    (["train", "--set", "train.epochs=abc"], "train.epochs"),
    (["segment", "x.jpg", "--classes", "a,b", "--set", "evaluate.seg.threshold=abc"], "evaluate.seg.threshold"),
    (["query", "x.jpg", "--text", "dog", "--set", "evaluate.no_such_key=1"], "evaluate.no_such_key"),
    (["evaluate", "mlr", "--profile", "no-such-profile"], "no-such-profile"),
    (["segment", "x.jpg", "--classes", "a", "--threshold", "3"], "--threshold"),
]


def test_parameter_errors_are_answered_before_torch_is_imported() -> None:
    out = loaded_after("from click.testing import CliRunner\n"
                       "from pipeline.cli import main\n"
                       f"for argv in {[argv for argv, _ in PARAMETER_ERRORS]!r}:\n"
                       "    r = CliRunner().invoke(main, argv)\n"
                       "    out[' '.join(argv)] = [r.exit_code, r.output]")
    for argv, key in PARAMETER_ERRORS:
        code, text = out[" ".join(argv)]
        assert code != 0 and key in text, (argv, text)
        assert "Traceback" not in text
    assert not set(HEAVY) & set(out["modules"])


def test_segment_and_query_stage_modules_import_neither_plots_nor_the_feature_store() -> None:
    out = loaded_after("import stages.segment, stages.query")
    assert "torch" in out["modules"]  # the check reached the model's imports
    assert not set(STAGE_FREE) & set(out["modules"])


def test_a_stage_is_imported_with_the_collector_paused_then_left_as_it_was(
        monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[bool] = []

    def import_module(name: str) -> ModuleType:
        seen.append(gc.isenabled())
        return ModuleType(name)

    monkeypatch.setattr(importlib, "import_module", import_module)
    enabled = gc.isenabled()
    try:
        for state in (True, False):
            (gc.enable if state else gc.disable)()
            assert app.import_stage("no_such_stage_imported_yet").__name__ == "stages.no_such_stage_imported_yet"
            assert gc.isenabled() is state  # as it was before
            assert gc.get_freeze_count() > 0  # what the import made is left out of later collections
    finally:
        gc.unfreeze()  # this test process keeps collecting everything
        (gc.enable if enabled else gc.disable)()
    assert seen == [False, False]  # paused while importing
