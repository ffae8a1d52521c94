"""Zarr v3 cache of frozen-CLIP spatial tokens: written once per shard, resumable, read by training.

The layout (tokens (N, K, T, D) one shard file per `shard_size` images; labels, ids, status, the
per-shard completion marks and the class text features) and its creation are in
pipeline/store/create.py.

No silent wrong result: every chunk (and each shard's index) carries a crc32c (zarr's
Crc32cCodec), so a flipped or zeroed byte fails the read; a missing chunk reads as a fill value
that validation refuses (NaN tokens or text, label -128, id "", status -1 in a complete shard).
Every such failure is a CacheError naming the store, the array and the shard.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

from pipeline.errors import CacheError
from pipeline.store.format import (  # noqa: F401  (the store's names, re-exported)
    FORMAT,
    FORMAT_VERSION,
    LABEL_FILL,
    RAW_TEXT_NAMES,
    REPAIR,
    TEXT_NAMES,
)
from pipeline.store.lock import check_not_written
from pipeline.store.shards import ShardReader

_ARRAYS = ("tokens", "labels", "ids", "status", "complete")


def status_problem(cache: FeatureCache, status: np.ndarray, start: int = 0) -> str | None:
    """None when `status` (images start, start+1, ... of complete shards) holds only 0 and 1, else
    what is wrong, naming the store, the shard and the image."""
    wrong = np.flatnonzero(~np.isin(status, (0, 1)))
    if wrong.size == 0:
        return None
    i = start + int(wrong[0])
    return (f"{cache.path}: array status, shard {i // cache.shard_size}: image {i} of a complete "
            f"shard has status {status[wrong[0]]} (a lost chunk)")


class FingerprintMismatch(CacheError):
    """An existing cache was built with different settings than the ones now requested."""


def _dir_stats(path: Path) -> tuple[int, int]:
    """(bytes, files) under `path`."""
    nbytes = nfiles = 0
    for root, _, files in os.walk(path):
        for f in files:
            nbytes += os.path.getsize(os.path.join(root, f))
            nfiles += 1
    return nbytes, nfiles


class FeatureCache:
    """Handle on one cache store. Picklable: it travels to worker processes as its path and mode."""

    def __init__(self, path: str | Path, mode: str = "r") -> None:
        self.path = Path(path)
        self.mode = mode
        if not self.path.exists():
            raise CacheError(f"no feature cache at {self.path}: run `pipeline extract-features` first")
        if not (self.path.is_dir() and (self.path / "zarr.json").is_file()):
            raise CacheError(f"{self.path} exists but is not a feature cache (no zarr.json); "
                             f"remove it (`rm -r {self.path}`) or choose another path")
        try:
            self._group = zarr.open_group(str(self.path), mode=mode)
            attrs = dict(self._group.attrs)
        except Exception as e:  # zarr raises several types for a damaged store
            raise CacheError(f"{self.path} is not a readable feature cache: {e}") from e
        if attrs.get("format") != FORMAT:
            raise CacheError(f"{self.path} is a zarr group but not a feature cache (attrs.format "
                             f"is {attrs.get('format')!r}, expected {FORMAT!r})")
        if attrs.get("format_version") != FORMAT_VERSION:
            raise CacheError(f"{self.path} has feature store format version "
                             f"{attrs.get('format_version')}, this code reads {FORMAT_VERSION}: "
                             f"re-extract it (`rm -r {self.path}` and `pipeline extract-features`, "
                             "or `pipeline extract-features --restart-on-change`)")
        try:
            arrays = {name: self._group[name] for name in _ARRAYS}
        except KeyError as e:
            raise CacheError(f"feature cache {self.path} lacks array {e}: `rm -r {self.path}` "
                             "and re-run extract-features") from None
        self.fingerprint: dict[str, Any] = attrs["fingerprint"]
        self.classnames: list[str] = list(attrs["classnames"])
        self.layout: dict[str, Any] = attrs["layout"]
        self.digests: dict[str, str] = attrs.get("digests", {})  # sha256 of ids and labels at creation
        self._tokens, self._labels, self._ids, self._status, self._complete = (
            arrays[n] for n in _ARRAYS)
        self.num_images, self.views, self.num_tokens, self.dim = self._tokens.shape
        self.shard_size: int = self.layout["shard_size"]
        self.num_shards: int = self._complete.shape[0]
        self.dtype = np.dtype(self.layout["dtype"])

    def __getstate__(self) -> dict[str, Any]:
        return {"path": str(self.path), "mode": self.mode}

    def __setstate__(self, state: dict[str, Any]) -> None:
        FeatureCache.__init__(self, state["path"], state["mode"])

    def __repr__(self) -> str:
        return f"FeatureCache({str(self.path)!r}, mode={self.mode!r})"

    @classmethod
    def open(cls, path: str | Path, mode: str = "r") -> FeatureCache:
        """Open an existing cache, complete or not (`require_complete` is the training gate)."""
        return cls(path, mode)

    # -- writing ------------------------------------------------------------------------------
    def shard_range(self, s: int) -> tuple[int, int]:
        if not 0 <= s < self.num_shards:
            raise IndexError(f"shard {s} out of range 0..{self.num_shards - 1} in {self.path}")
        return s * self.shard_size, min((s + 1) * self.shard_size, self.num_images)

    def shard_file(self, s: int) -> Path:
        """The tokens shard file of shard s (zarr's default chunk key encoding, `c/` + `/`)."""
        return self.path / "tokens" / "c" / str(s) / "0" / "0" / "0"

    def chunk_file(self, name: str, chunk: int = 0) -> Path:
        """The chunk file of a 1-d or 2-d metadata array (labels, ids, status, complete, text/*)."""
        ndim = 2 if name in ("labels",) or name.startswith("text/") else 1
        return self.path / name / "c" / str(chunk) / Path(*["0"] * (ndim - 1))

    def write_shard(self, s: int, tokens: np.ndarray, status: np.ndarray) -> None:
        """Write shard s, then mark it complete: a crash before the mark leaves it to be redone."""
        if self.mode == "r":
            raise CacheError(f"{self.path} is open read-only; use FeatureCache.open(path, mode='r+')")
        start, stop = self.shard_range(s)
        shape = (stop - start, self.views, self.num_tokens, self.dim)
        if tokens.shape != shape or np.shape(status) != shape[:1]:
            raise ValueError(f"shard {s} of {self.path} needs tokens {shape} and status {shape[:1]}, "
                             f"got {tokens.shape} and {np.shape(status)}")
        tokens = np.asarray(tokens, dtype=self.dtype)
        finite = np.isfinite(tokens).reshape(len(tokens), -1).all(axis=1)  # (n,) per image
        bad = np.flatnonzero(~finite & (np.asarray(status) == 0))
        if bad.size:  # never store a number that is not one (fp16 overflow, a broken backbone)
            ids = self.ids[start + bad]
            raise CacheError(f"{self.path}: the backbone gave non-finite tokens for image ids "
                             f"{', '.join(map(str, ids[:5]))}{' ...' if len(ids) > 5 else ''} (shard {s}); "
                             "nothing of the shard was written. With backbone.precision fp16 this is an "
                             "overflow: use fp32 or bf16")
        try:
            self.unmark(s)  # rewriting: unmark first so a crash midway is not trusted
            # the shard is recomputed whole: a damaged old file must not be read back (partial
            # last shards are read-modify-written by zarr)
            self.shard_file(s).unlink(missing_ok=True)
            self._tokens[start:stop] = tokens
            self._status[start:stop] = np.asarray(status, dtype=np.int8)
        except OSError as err:  # full disk, permissions: the shard stays incomplete
            raise CacheError(f"writing shard {s} (images {start}..{stop - 1}) of {self.path} failed: "
                             f"{err}; the shard is left incomplete and a re-run redoes it") from err
        self._complete[s] = True

    def unmark(self, s: int) -> None:
        """Mark shard s incomplete (a full-chunk write: works on a damaged mark too)."""
        self._complete[s] = False

    def write_text_features(self, features: Mapping[str, np.ndarray]) -> None:
        """Store class text features by name (positive / negative / plain / raw_*), each (C, D) float32."""
        for name, value in features.items():
            value = np.asarray(value, dtype=np.float32)
            if name not in TEXT_NAMES + RAW_TEXT_NAMES or value.shape != (len(self.classnames), self.dim):
                raise ValueError(f"text feature {name!r} must be one of {TEXT_NAMES + RAW_TEXT_NAMES} with shape "
                                 f"({len(self.classnames)}, {self.dim}), got {value.shape}")
            self._group.create_array(f"text/{name}", shape=value.shape, dtype="float32",
                                     chunks=value.shape, fill_value=float("nan"),
                                     compressors=[Crc32cCodec()], overwrite=True)[:] = value

    # -- reading ------------------------------------------------------------------------------
    def _get(self, name: str, array: zarr.Array, what: str = "") -> np.ndarray:
        """array[:] with a damaged chunk (crc32c mismatch, unreadable file) as a CacheError."""
        try:
            return array[:]
        except (OSError, ValueError) as err:
            raise CacheError(f"{self.path}: array {name}{what} is damaged ({err}); {REPAIR}") from err

    @property
    def complete(self) -> np.ndarray:
        return np.asarray(self._get("complete", self._complete), dtype=bool)  # (num_shards,)

    def is_complete(self, s: int) -> bool:
        return bool(self.complete[s])

    def incomplete_shards(self) -> list[int]:
        return [int(s) for s in np.flatnonzero(~self.complete)]

    def require_complete(self) -> None:
        """The training gate: every shard complete, and no writer holding the store."""
        check_not_written(self.path)
        missing = len(self.incomplete_shards())
        if missing:
            raise CacheError(f"cache incomplete: {missing} of {self.num_shards} shards missing in "
                             f"{self.path}; re-run `pipeline extract-features`")

    def _status_and_done(self) -> tuple[np.ndarray, np.ndarray]:
        """(N,) int8 status, checked, and (N,) bool "its shard is complete" (marks read once)."""
        status = np.asarray(self._get("status", self._status), dtype=np.int8)
        done = np.repeat(self.complete, self.shard_size)[: self.num_images]
        problem = status_problem(self, np.where(done, status, 0))  # incomplete shards: -1 until written
        if problem is not None:
            raise CacheError(f"{problem}; {REPAIR}")
        return status, done

    @property
    def status(self) -> np.ndarray:
        """(N,) int8; -1 (the fill) only in incomplete shards, else a CacheError."""
        return self._status_and_done()[0]

    @property
    def valid(self) -> np.ndarray:
        """(N,) bool: extracted (shard complete) and not a bad image."""
        status, done = self._status_and_done()
        return done & (status == 0)

    @property
    def labels(self) -> np.ndarray:
        labels = np.asarray(self._get("labels", self._labels), dtype=np.int8)  # (N, C)
        if not np.isin(labels, (-1, 0, 1)).all():
            i = int(np.flatnonzero(~np.isin(labels, (-1, 0, 1)).all(1))[0])
            raise CacheError(f"{self.path}: array labels holds {labels[i][~np.isin(labels[i], (-1, 0, 1))][0]}"
                             f" for image {i} (a lost or damaged chunk; valid: -1, 0, 1); {REPAIR}")
        return labels

    @property
    def ids(self) -> np.ndarray:
        ids = np.array(self._get("ids", self._ids).tolist(), dtype=str)  # (N,) fixed-width unicode
        if (ids == "").any():
            raise CacheError(f"{self.path}: array ids has {int((ids == '').sum())} empty ids "
                             f"(a lost chunk); {REPAIR}")
        return ids

    @property
    def tokens(self) -> zarr.Array:
        return self._tokens

    @property
    def tokens_nbytes(self) -> int:
        """Uncompressed size of all tokens (what loading them into RAM costs)."""
        return self.num_images * self.views * self.num_tokens * self.dim * self.dtype.itemsize

    def read_shard(self, s: int) -> np.ndarray:
        """(n, K, T, D) tokens of shard s; a damaged or lost shard file is a CacheError."""
        start, stop = self.shard_range(s)
        where = f"{self.path}: array tokens, shard {s} (images {start}..{stop - 1}, {self.shard_file(s)})"
        try:
            out = self._tokens[start:stop]
        except (OSError, ValueError) as err:  # a truncated or corrupted shard file
            raise CacheError(f"{where} is damaged ({err}); {REPAIR}") from err
        if not np.isfinite(out).all():  # NaN is the fill of a lost file or chunk: which is it?
            reader = ShardReader(self)
            problem = reader.check_shard(s)  # file, index and every chunk present
            reader.close()
            if problem is not None:
                raise CacheError(problem)  # ShardReader's problems end with REPAIR
        return out  # stored non-finite values are data (training names them; verify reports them)

    def text_features(self, name: str) -> np.ndarray:
        try:
            array = self._group[f"text/{name}"]
        except KeyError:
            raise CacheError(f"{self.path} has no text/{name} features (names: {TEXT_NAMES}); "
                             "they are written by write_text_features during extract-features") from None
        value = np.asarray(self._get(f"text/{name}", array), dtype=np.float32)  # (C, D)
        if value.shape != (len(self.classnames), self.dim) or not np.isfinite(value).all():
            raise CacheError(f"{self.path}: array text/{name} is lost or damaged (shape {value.shape}, "
                             f"non-finite values); re-run `pipeline extract-features`")
        return value

    def has_text_feature(self, name: str) -> bool:
        return "text" in self._group and name in self._group["text"]

    def has_text_features(self) -> bool:
        """Every text feature present and valid (a damaged one is rewritten by extract-features)."""
        try:
            for n in TEXT_NAMES + RAW_TEXT_NAMES:
                self.text_features(n)
        except CacheError:
            return False
        return True

    def nbytes_stored(self) -> int:
        return _dir_stats(self.path)[0]

    def num_files(self) -> int:
        return _dir_stats(self.path)[1]

    def summary(self) -> dict[str, Any]:
        nbytes, nfiles = _dir_stats(self.path)
        status = self.status
        return {"path": str(self.path), "num_images": self.num_images, "views": self.views,
                "num_tokens": self.num_tokens, "dim": self.dim, "dtype": self.dtype.name,
                "compressor": self.layout["compressor"], "shard_size": self.shard_size,
                "num_shards": self.num_shards, "complete_shards": int(self.complete.sum()),
                "bad_images": int((status == 1).sum()), "tokens_nbytes": self.tokens_nbytes,
                "nbytes_stored": nbytes, "num_files": nfiles, "fingerprint": self.fingerprint}
