"""One writer per store: a second writer (or --restart-on-change) is refused naming the holder,
readers refuse a store being written, a dead holder's lock is taken over, another host's needs
--break-lock. Two concurrent extract-features: tests/test_lock_extract.py."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.store.cache import FeatureCache
from pipeline.store.create import create_or_open
from pipeline.store.lock import StoreLock, StoreLocked, lock_path

ROOT = Path(__file__).resolve().parents[1]
HOLD = """
import sys, time
from pipeline.store.lock import StoreLock
StoreLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(60)
"""


def small_store(path: Path) -> FeatureCache:
    cache = create_or_open(path, ids=["a", "b"], labels=np.zeros((2, 2)), classnames=["x", "y"],
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
