"""One writer per output: a lock file beside the output plus an advisory OS lock.

The file `<output>.lock` sits next to the output (so `rm -r` of the output keeps it) and records
who holds it: pid, host, start time. Where the filesystem supports ``fcntl.flock`` the kernel lock
is the truth (released when the holder dies, even by SIGKILL); the recorded pid decides where it
does not. A lock recorded by a dead process on this host is taken over (logged); one recorded on
another host is refused unless ``break_lock`` is given, because its pid cannot be checked from
here. Feature stores (pipeline/store/lock.py) and the outputs of `train` and `ablate`
(`one_writer`) are locked this way.
"""
from __future__ import annotations

import errno
import fcntl
import functools
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from pipeline.errors import UserError

if TYPE_CHECKING:  # typing.Self is Python 3.11+; the package supports 3.10
    from typing_extensions import Self

log = logging.getLogger(__name__)
P = ParamSpec("P")
R = TypeVar("R")


class OutputLocked(UserError, RuntimeError):
    """Another process holds the output's writer lock (or the lock file cannot be one)."""


def lock_path(output: str | Path) -> Path:
    output = Path(output)
    return output.parent / f"{output.name}.lock"


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


def describe(info: dict[str, Any]) -> str:
    return f"pid {info['pid']} on host {info['host']} (since {info.get('started', '?')})"


def try_flock(fd: int, mode: int = fcntl.LOCK_EX, attempts: int = 1) -> bool | None:
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


def holder(output: str | Path) -> dict[str, Any] | None:
    """The writer holding `output`'s lock now (not this process), or None."""
    path = lock_path(output)
    info = _read(path)
    if info is None or _own(info):
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        flocked = try_flock(fd, fcntl.LOCK_SH)  # a probe: never blocks a writer for long
        if flocked is False:
            return info
    finally:
        os.close(fd)  # closing drops a flock we may just have taken
    if flocked is None:  # no flock here: the record decides, as it does for writers
        return info if _live_holder(info, flocked) else None
    return None  # flock works and nobody holds it: not being written


class WriterLock:
    """Exclusive writer lock on an output, held from ``acquire`` (or ``with``) to ``release``.
    `command` names the writer in messages (`pipeline train`)."""

    error: type[UserError] = OutputLocked

    def __init__(self, output: str | Path, break_lock: bool = False, command: str = "a writer") -> None:
        self.output = Path(output)
        self.path = lock_path(output)
        self.break_lock = break_lock
        self.command = command
        self._fd: int | None = None

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _refuse(self, info: dict[str, Any]) -> UserError:
        if info["host"] != socket.gethostname():
            return self.error(f"{self.output} is being written by {self.command}, {describe(info)}, on "
                              f"another host: wait for it, or if it is dead delete the lock file {self.path}")
        return self.error(f"{self.output} is being written by {self.command}, {describe(info)}, which is "
                          f"still running: wait for it to finish, or write elsewhere (params 'paths') "
                          f"(lock file {self.path})")

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except IsADirectoryError:
            raise self.error(f"{self.path} is a directory where the writer lock file of {self.output} "
                             "goes: move or delete it and run the command again") from None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = self._open()
            flocked = try_flock(fd, attempts=20)  # outlasts a reader's probe
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
            log.warning("taking over the lock of %s left by %s, no longer running%s", self.output,
                        describe(info), " (--break-lock)" if self.break_lock else "")
            print(f"taking over the writer lock of {self.output} left by {describe(info)}")
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


def one_writer(output: Callable[..., str | Path], command: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorate a stage's `run`: it runs holding the writer lock of `output(*its arguments)`, so a
    second run on the same output is refused naming the first (`command` names them)."""

    def decorate(func: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(func)
        def locked(*args: P.args, **kwargs: P.kwargs) -> R:
            with WriterLock(output(*args, **kwargs), command=command):
                return func(*args, **kwargs)

        return locked

    return decorate
