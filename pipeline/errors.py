"""The project's error types, in the bottom layer so that every layer raises the same classes.

A `UserError` is one the user can act on: its message names the file or the key and says what to
do, so the CLI prints it as one line (exit 1) instead of a traceback. Anything else escaping a
stage is a bug and keeps its traceback. The classes also derive from the built-in type their
callers historically caught (ValueError, RuntimeError, FileNotFoundError).
"""
from __future__ import annotations

import os
from pathlib import Path


class UserError(Exception):
    """An error whose message is the whole story for a user (the CLI prints it as one line)."""


class ParamError(UserError, ValueError):
    """A bad parameter; the message names the dotted key."""


class WeightsError(UserError, RuntimeError):
    """A weights file that is missing, corrupt or not the expected one; the message names the file."""


class BadImageError(UserError, ValueError):
    """An image file that cannot be decoded into RGB pixels; the message names the file."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"bad image {self.path}: {reason}")


class DatasetError(UserError, FileNotFoundError, ValueError):
    """The dataset on disk is missing or not in the expected layout; the message names the path."""


class CacheError(UserError, RuntimeError):
    """A feature cache that is missing, malformed, incomplete or read-only where it must not be."""


class DownloadError(UserError, RuntimeError):
    """A download, verification or unpacking step failed; the message says what to do."""


class TrainingError(UserError, RuntimeError):
    """Training cannot go on (non-finite loss, a checkpoint that does not belong to this cache)."""
