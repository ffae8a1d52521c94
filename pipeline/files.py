"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never half of one.

A write that fails for want of space or permission is an OSError naming the file written (not the
temporary name), which the CLI prints as one line; the old file is kept.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp)` on a temporary name beside `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")  # keeps the suffix (savefig)
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as err:
        if err.errno is None or err.filename not in (None, str(tmp), tmp):
            raise
        raise OSError(err.errno, err.strerror or os.strerror(err.errno), str(path)) from err
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_save(obj: Any, path: str | Path) -> Path:
    """torch.save(obj) to `path`, atomically and byte-identical for the same obj: torch names the
    records of its zip archive after the file it is given (here the PID-named temporary one), so
    it writes through a file object instead (records under "archive/", as torch.load expects)."""
    import torch  # not at import time: the bottom layer stays light

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    return atomic_write(path, write)
