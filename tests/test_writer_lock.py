"""One writer per output for `train` and `ablate` (the feature stores' lock design, pipeline/locks.py):
a second run on the same output is refused naming the first (pid, host, since), and a lock path
that is a directory is one line, for them and for the stores. The store lock itself: test_lock.py."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_faults import CLASSES, SIZE, assert_clear_error, cli, sets

from pipeline.data.synthetic import make_planted_coco
from pipeline.locks import OutputLocked, WriterLock, lock_path

ROOT = Path(__file__).resolve().parents[1]
HOLD = """
import sys, time
from pipeline.data.synthetic import make_planted_coco
from pipeline.locks import WriterLock
WriterLock(sys.argv[1], command="`pipeline train`").acquire()
print("locked", flush=True)
time.sleep(120)
"""
OUTPUTS = {"train": Path("cache") / "models", "ablate": Path("results") / "ablation"}


@pytest.mark.parametrize("command", list(OUTPUTS))
def test_second_writer_of_an_output_is_refused_naming_the_holder(tmp_path: Path, command: str) -> None:
    """Two `pipeline train` on one output both ran to exit 0, the second overwriting the first's
    checkpoint and projectors epoch by epoch."""
    output = tmp_path / OUTPUTS[command]
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(output)], stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"locked"
        result = cli(command, *sets(tmp_path))
        assert_clear_error(result, output, f"pid {proc.pid} on host {socket.gethostname()} (since ",
                           f"`pipeline {command}`", "still running", lock_path(output))
        with pytest.raises(OutputLocked, match=f"pid {proc.pid}"):  # in-process: the same refusal
            WriterLock(output).acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    result = cli(command, *sets(tmp_path))  # the holder is gone: the run goes on (to the missing store)
    assert "being written" not in result.output and "train.zarr" in result.output, result.output


@pytest.mark.parametrize("command, lock", [
    ("train", Path("cache") / "models.lock"), ("ablate", Path("results") / "ablation.lock"),
    ("extract-features", Path("cache") / "features" / "val.zarr.lock")])
def test_a_lock_path_that_is_a_directory_is_one_line(tmp_path: Path, command: str, lock: Path) -> None:
    """`extract-features` ended in a bare IsADirectoryError traceback."""
    (tmp_path / lock).mkdir(parents=True)
    args = []
    if command == "extract-features":
        make_planted_coco(tmp_path / "data" / "synthetic", 2, 2, num_classes=CLASSES, image_size=SIZE)
        args = ["--split", "val"]
    assert_clear_error(cli(command, *args, *sets(tmp_path)), tmp_path / lock, "is a directory",
                       "move or delete it")
