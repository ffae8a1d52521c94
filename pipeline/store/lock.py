"""One writer per feature store: a lock file beside the store plus an advisory OS lock.

The file `<store>.lock` sits next to the store (so `rm -r` of the store, or --restart-on-change,
keeps it) and records who holds it: pid, host, start time. Where the filesystem supports
``fcntl.flock`` the kernel lock is the truth (released when the holder dies, even by SIGKILL);
the recorded pid decides where it does not. A lock recorded by a dead process on this host is
taken over (logged); one recorded on another host is refused unless ``break_lock`` is given,
because its pid cannot be checked from here. Readers call ``check_not_written`` and refuse a store
being written. With Dask the client process holds the lock; its workers write under it.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import CacheError

if TYPE_CHECKING:  # typing.Self is Python 3.11+; the package supports 3.10
    from typing_extensions import Self

log = logging.getLogger(__name__)


class StoreLocked(CacheError):
    """Another process holds the store's writer lock."""


def lock_path(store: str | Path) -> Path:
    store = Path(store)
    return store.parent / f"{store.name}.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read(path: Path) -> dict[str, Any] | None:
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and "pid" in info and "host" in info else None


def _describe(info: dict[str, Any]) -> str:
    return f"pid {info['pid']} on host {info['host']} (since {info.get('started', '?')})"


def _try_flock(fd: int, mode: int = fcntl.LOCK_EX, attempts: int = 1) -> bool | None:
    """True: locked; False: another open file holds it; None: the filesystem has no flock.
    `attempts` > 1 retries every 50 ms: a reader's probe holds the file for microseconds."""
    for attempt in range(attempts):
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if attempt + 1 < attempts:
                time.sleep(0.05)
        except OSError as err:
            if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return None
            raise
    return False


def _own(info: dict[str, Any]) -> bool:
    return info["pid"] == os.getpid() and info["host"] == socket.gethostname()


def _live_holder(info: dict[str, Any] | None, flocked: bool | None) -> bool:
    """Whether the recorded holder must be taken as alive (other host: cannot be checked)."""
    if info is None:
        return False
    if info["host"] != socket.gethostname():
        return True
    return flocked is None and _pid_alive(int(info["pid"]))


def holder(store: str | Path) -> dict[str, Any] | None:
    """The writer holding `store`'s lock now (not this process), or None."""
    path = lock_path(store)
    info = _read(path)
    if info is None or _own(info):
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        flocked = _try_flock(fd, fcntl.LOCK_SH)  # a probe: never blocks a writer for long
        if flocked is False:
            return info
    finally:
        os.close(fd)  # closing drops a flock we may just have taken
    if flocked is None:  # no flock here: the record decides, as it does for writers
        return info if _live_holder(info, flocked) else None
    return None  # flock works and nobody holds it: not being written


def check_not_written(store: str | Path) -> None:
    """Refuse to read a store that a writer holds (readers: training, evaluation, export)."""
    info = holder(store)
    if info is not None:
        raise StoreLocked(f"{store} is being written by {_describe(info)}: wait for its "
                          f"extract-features to finish (lock file {lock_path(store)})")


class StoreLock:
    """Exclusive writer lock on a store, held from ``acquire`` (or ``with``) to ``release``."""

    def __init__(self, store: str | Path, break_lock: bool = False) -> None:
        self.store = Path(store)
        self.path = lock_path(store)
        self.break_lock = break_lock
        self._fd: int | None = None

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _refuse(self, info: dict[str, Any]) -> StoreLocked:
        where = ("on another host: if it is dead, pass --break-lock"
                 if info["host"] != socket.gethostname() else "which is still running")
        return StoreLocked(f"{self.store} is locked by a writer, {_describe(info)}, {where} "
                           f"(lock file {self.path})")

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            flocked = _try_flock(fd, attempts=20)  # outlasts a reader's probe
            info = _read(self.path)
            if flocked is False:
                os.close(fd)
                raise self._refuse(info or {"pid": "?", "host": "?"})
            # the holder may have unlinked the file between our open and flock: retry on the new one
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        if info is not None and not _own(info):
            if _live_holder(info, flocked) and not (self.break_lock and info["host"] != socket.gethostname()):
                os.close(fd)
                raise self._refuse(info)
            log.warning("taking over the lock of %s left by %s, no longer running%s", self.store,
                        _describe(info), " (--break-lock)" if self.break_lock else "")
            print(f"taking over the writer lock of {self.store} left by {_describe(info)}")
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # unlink while still locked: no one reads a stale record
        finally:
            os.close(self._fd)
            self._fd = None
