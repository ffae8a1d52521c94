"""One writer per store: a second writer (or --restart-on-change) is refused naming the holder,
readers refuse a store being written, a dead holder's lock is taken over, another host's needs
--break-lock; two concurrent extract-features leave exactly the first run's bytes."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.cache import FeatureCache
from pipeline.cli import main
from pipeline.lock import StoreLock, StoreLocked, lock_path
from pipeline.synthetic import make_planted_coco

ROOT = Path(__file__).resolve().parents[1]
HOLD = """
import sys, time
from pipeline.lock import StoreLock
StoreLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(60)
"""


def small_store(path: Path) -> FeatureCache:
    cache = FeatureCache.create_or_open(path, ids=["a", "b"], labels=np.zeros((2, 2)), classnames=["x", "y"],
                                        views=1, num_tokens=2, dim=2, fingerprint={}, shard_size=2)
    cache.write_shard(0, np.ones((2, 1, 2, 2)), np.zeros(2))
    return cache


def test_live_writer_refuses_writers_and_readers_then_its_kill_frees_the_store(tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    cache = small_store(store)
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(store)], stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout.readline().strip() == b"locked"
        holder = f"pid {proc.pid} on host {socket.gethostname()}"
        with pytest.raises(StoreLocked, match=holder) as err:
            StoreLock(store).acquire()
        assert "\n" not in str(err.value) and "still running" in str(err.value)
        with pytest.raises(StoreLocked, match=f"being written by {holder}"):
            cache.require_complete()  # the gate of TokenLoader (train, evaluate) and export
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert lock_path(store).exists()  # a kill -9 leaves the record, but not the OS lock
    cache.require_complete()  # the holder is dead: readable
    with StoreLock(store):
        assert json.loads(lock_path(store).read_text())["pid"] == os.getpid()
        cache.require_complete()  # this process's own lock does not block it
    assert not lock_path(store).exists()
    assert store.exists()  # the lock file lives beside the store, not in it


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_lock_of_a_dead_pid_is_taken_over(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    store = tmp_path / "s.zarr"
    pid = _dead_pid()
    lock_path(store).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "x"}))
    with StoreLock(store):
        assert json.loads(lock_path(store).read_text())["pid"] == os.getpid()
    assert f"left by pid {pid}" in capsys.readouterr().out


def test_another_hosts_lock_needs_break_lock(tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    lock_path(store).write_text(json.dumps({"pid": 1, "host": "elsewhere.example", "started": "x"}))
    with pytest.raises(StoreLocked, match=r"pid 1 on host elsewhere.example .*--break-lock"):
        StoreLock(store).acquire()
    with StoreLock(store, break_lock=True):
        assert json.loads(lock_path(store).read_text())["host"] == socket.gethostname()


SLOW_WRITER = """
import os, sys, time
from pipeline.cache import FeatureCache
original = FeatureCache.write_shard
def slow_write(self, s, tokens, status):  # the first shard waits for the test's go (up to 120 s)
    deadline = time.monotonic() + 120
    while not os.path.exists(os.environ["GO_FILE"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    original(self, s, tokens, status)
FeatureCache.write_shard = slow_write
from pipeline.cli import main
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
    while not (store.exists() and lock_path(store).exists()) and time.monotonic() < deadline:
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
