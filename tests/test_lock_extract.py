"""Two concurrent `extract-features` on one store (the second with other settings and
--restart-on-change, as dvc.yaml passes it): the second is refused naming the first (pid, host),
and the store ends with exactly the first run's bytes. (Before the writer lock the second deleted
the store under the first and both wrote shards, all marked complete.)"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from pipeline.cli.app import main
from pipeline.data.synthetic import make_planted_coco

ROOT = Path(__file__).resolve().parents[1]


SLOW_WRITER = """
import os, sys, time
from pipeline.store.cache import FeatureCache
original = FeatureCache.write_shard
def slow_write(self, s, tokens, status, *inputs):  # the first shard waits for the go (<= 120 s)
    deadline = time.monotonic() + 120
    while not os.path.exists(os.environ["GO_FILE"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    original(self, s, tokens, status, *inputs)
FeatureCache.write_shard = slow_write
from pipeline.cli.app import main
main(sys.argv[1:])
"""


def files(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_concurrent_extractions_second_refused_store_holds_the_first_runs_tokens(tmp_path: Path) -> None:
    make_planted_coco(tmp_path / "data" / "synthetic", 2, 10, num_classes=4, image_size=64)

    def args(cache: Path, *more: str) -> list[str]:
        sets = [f"paths.data={tmp_path / 'data'}", f"paths.cache={cache}", "data.dataset=synthetic",
                "backbone.name=tiny-RN", "backbone.pretrained=null", "backbone.image_size=64",
                "backbone.channels_last=false", "backbone.device=cpu", "extract.shard_size=4",
                "extract.batch_size=4", "extract.num_workers=0", *more]
        return ["extract-features", "--params", str(ROOT / "configs" / "params.yaml"), "--split", "val",
                *[x for s in sets for x in ("--set", s)]]

    threads = str(torch.get_num_threads())  # the same thread count as here: the same rounding
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "PYTHONPATH": str(ROOT),
           "GO_FILE": str(tmp_path / "go")}
    first = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, *args(tmp_path / "run")], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    store = tmp_path / "run" / "features" / "val.zarr"
    deadline = time.monotonic() + 120
    while not (store / "zarr.json").exists() and time.monotonic() < deadline:  # created under the lock
        assert first.poll() is None, first.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    # another fingerprint (other weights) with --restart-on-change, as dvc.yaml passes it
    second = CliRunner().invoke(main, [*args(tmp_path / "run", "backbone.init_seed=1"), "--restart-on-change"])
    (tmp_path / "go").touch()
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err.decode()[-2000:]
    assert second.exit_code == 1 and "Traceback" not in second.output, second.output
    assert [ln for ln in second.output.splitlines() if ln.startswith("Error:")] == [
        second.output.strip().splitlines()[-1]]
    assert f"pid {first.pid} on host {socket.gethostname()}" in second.output, second.output

    reference = CliRunner().invoke(main, args(tmp_path / "ref"))
    assert reference.exit_code == 0, reference.output
    ref = files(tmp_path / "ref" / "features" / "val.zarr")
    assert ref == files(store)  # only the first run's tokens, every shard
