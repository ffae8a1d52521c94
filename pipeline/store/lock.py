"""One writer per feature store: the writer lock of pipeline/locks.py on `<store>.lock`.

The lock file sits next to the store (so `rm -r` of the store, or --restart-on-change, keeps it)
and records who holds it: pid, host, start time; pipeline/locks.py says how a dead holder's lock is
taken over and another host's needs ``break_lock``. Readers call ``check_not_written`` and refuse a
store being written. With Dask the client process holds the lock; its workers write under it.
"""
from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from pipeline.errors import CacheError
from pipeline.locks import WriterLock, describe, holder, lock_path

__all__ = ["StoreLock", "StoreLocked", "check_not_written", "holder", "lock_path"]


class StoreLocked(CacheError):
    """Another process holds the store's writer lock."""


def check_not_written(store: str | Path) -> None:
    """Refuse to read a store that a writer holds (readers: training, evaluation, export)."""
    info = holder(store)
    if info is not None:
        raise StoreLocked(f"{store} is being written by {describe(info)}: wait for its "
                          f"extract-features to finish (lock file {lock_path(store)})")


class StoreLock(WriterLock):
    """Exclusive writer lock on a store, held from ``acquire`` (or ``with``) to ``release``."""

    error = StoreLocked

    def __init__(self, store: str | Path, break_lock: bool = False) -> None:
        super().__init__(store, break_lock=break_lock, command="extract-features")
        self.store = Path(store)

    def _refuse(self, info: dict[str, Any]) -> StoreLocked:
        where = ("on another host: if it is dead, pass --break-lock"
                 if info["host"] != socket.gethostname() else "which is still running")
        return StoreLocked(f"{self.store} is locked by a writer, {describe(info)}, {where} "
                           f"(lock file {self.path})")
