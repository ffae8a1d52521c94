"""A small pipeline run made through the CLI only (extract-features, train), shared by the tests of
what a feature store answers for (tests/test_store_identity.py, test_store_inputs.py,
test_store_params.py; the session fixture `store_world` in conftest.py): they copy it and break
one thing. CLI only, so that the tests also run against older code, where they must fail."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from click.testing import CliRunner, Result

from pipeline.cli.app import main
from pipeline.data.synthetic import make_planted_coco

ROOT = Path(__file__).resolve().parents[1]
SIZE, CLASSES, N = 64, 4, 8  # 8 train and 8 val images in shards of 4; train K = 2 views
FAST = {"train.epochs": 1, "train.batch_size": 8, "train.optimizer": "adam", "train.lr": 0.01,
        "train.weight_decay": 0, "train.warmup_epochs": 0, "train.device": "cpu",
        "train.read_threads": 1}


def cli(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def sets(run: Path, **extra: object) -> list[str]:
    """--params/--set arguments of a run under `run` (data, cache, results), `extra` on top
    (dotted keys as keyword names with __ for the dots)."""
    values = {"paths.data": run / "data", "paths.cache": run / "cache", "paths.results": run / "results",
              "data.dataset": "synthetic", "backbone.name": "tiny-RN", "backbone.pretrained": "null",
              "backbone.image_size": SIZE, "backbone.device": "cpu", "backbone.channels_last": "false",
              "extract.num_workers": 0, "extract.shard_size": 4, "extract.views": 2,
              "extract.batch_size": 4, **FAST, **{k.replace("__", "."): v for k, v in extra.items()}}
    return ["--params", str(ROOT / "configs" / "params.yaml"),
            *[a for k, v in values.items() for a in ("--set", f"{k}={v}")]]


def record_of(args: list[str], role: str) -> dict:
    """The role and params record `extract-features` would write with these CLI arguments (for
    stores a test extracts through the Python API and reads through the CLI)."""
    from pipeline.config.params import load_params
    from pipeline.extraction.expected import expected_fingerprint

    return expected_fingerprint(load_params(args[1], args[3::2]), role).record


def ok(result: Result) -> Result:
    assert result.exit_code == 0, result.output
    return result


def clear_error(result: Result, *names: object) -> str:
    """Exit 1 through click, one `Error:` line and no traceback, each name in the output."""
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), (
        result.output, result.exception)
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert "Traceback" not in result.output and len(errors) == 1, result.output
    for name in names:
        assert str(name) in result.output, (name, result.output)
    return errors[0]


def extracted(output: str) -> list[int]:
    """The image counts `extract-features` reports extracting, per split."""
    return [int(n) for n in re.findall(r"extracted (\d+) images", output)]


def files(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


def store(run: Path, role: str) -> Path:
    return run / "cache" / "features" / f"{role}.zarr"


def annotations(run: Path, role: str) -> Path:
    return run / "data" / "synthetic" / "annotations" / f"instances_{role}2017.json"


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def build(root: Path) -> Path:
    """Data, both stores and one trained run under `root`."""
    make_planted_coco(root / "data" / "synthetic", N, N, num_classes=CLASSES, image_size=SIZE)
    ok(cli("extract-features", *sets(root)))
    ok(cli("train", *sets(root)))
    return root


def copy(world: Path, run: Path) -> Path:
    """A copy of the world (file times kept, as `cp -a` does)."""
    shutil.copytree(world, run, symlinks=True, dirs_exist_ok=True)
    return run
