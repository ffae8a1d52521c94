"""Zarr v3 cache of frozen-CLIP spatial tokens: written once per shard, resumable, read by training.

The layout (tokens (N, K, T, D) one shard file per `shard_size` images; labels, ids, status, the
per-shard completion marks, the chunks' keys, the images' input records and the class text
features) and its creation are in pipeline/store/create.py; writing in pipeline/store/writes.py.

No silent wrong result: every chunk (and each shard's index) carries a crc32c (zarr's
Crc32cCodec), so a flipped or zeroed byte fails the read; a missing chunk reads as a fill value
that validation refuses (NaN tokens or text, label -128, id "", status -1 in a complete shard);
each token chunk's key ties it to its store and place (pipeline/store/identity.py), and the ids
and labels to their recorded digests. Every such failure is a CacheError naming the store, the
array and the shard.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipeline.errors import CacheError
from pipeline.store.format import (  # noqa: F401  (the store's names, re-exported)
    FORMAT,
    FORMAT_VERSION,
    LABEL_FILL,
    RAW_TEXT_NAMES,
    REPAIR,
    TEXT_NAMES,
    rebuild,
)
from pipeline.store.identity import chunk_crcs, identity_problem, place_keys, store_id
from pipeline.store.identity import digest as identity_digest
from pipeline.store.lock import check_not_written
from pipeline.store.opening import open_array, open_group
from pipeline.store.shards import ShardReader
from pipeline.store.writes import ShardWrites

_ARRAYS = ("tokens", "labels", "ids", "status", "complete", "keys", "inputs")


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


class FeatureCache(ShardWrites):
    """Handle on one cache store. Picklable: it travels to worker processes as its path and mode.

    Opening checks the format, every array's metadata, and that the fingerprint gives the store id
    recorded with it (an edited fingerprint is refused); opened for reading (`check`, the default
    with mode "r") also that the ids and labels have the digests recorded when they were written.
    """

    def __init__(self, path: str | Path, mode: str = "r", check: bool | None = None) -> None:
        self.path = Path(path)
        self.mode = mode
        self.check = mode == "r" if check is None else check
        if not self.path.exists():
            raise CacheError(f"no feature cache at {self.path}: run `pipeline extract-features` first")
        if not (self.path.is_dir() and (self.path / "zarr.json").is_file()):
            raise CacheError(f"{self.path} exists but is not a feature cache (no zarr.json); "
                             f"remove it (`rm -r {self.path}`) or choose another path")
        self._group, attrs = open_group(self.path, mode)
        arrays = {name: open_array(self._group, self.path, name) for name in _ARRAYS}
        try:
            self.fingerprint: dict[str, Any] = attrs["fingerprint"]
            self.classnames: list[str] = list(attrs["classnames"])
            self.layout: dict[str, Any] = attrs["layout"]
            self.shard_size: int = self.layout["shard_size"]
            self.dtype = np.dtype(self.layout["dtype"])
        except (KeyError, TypeError, ValueError) as err:
            raise CacheError(f"{self.path / 'zarr.json'} lacks or garbles attribute {err}: "
                             f"{rebuild(self.path)}") from None
        self.digests: dict[str, str] = attrs.get("digests", {})  # sha256 of ids and labels
        self.annotation_files: dict[str, list[int]] = attrs.get("annotation_files", {})
        self.store_id = store_id(self.fingerprint)
        if attrs.get("store_id") != self.store_id:
            raise CacheError(f"{self.path / 'zarr.json'}: the fingerprint does not give the store id "
                             f"recorded with it ({str(attrs.get('store_id'))[:12]}, now {self.store_id[:12]}): "
                             f"edited by hand? The chunks belong to the settings they were written with; "
                             f"{rebuild(self.path)}")
        (self._tokens, self._labels, self._ids, self._status, self._complete, self._keys,
         self._inputs) = (arrays[n] for n in _ARRAYS)
        self.num_images, self.views, self.num_tokens, self.dim = self._tokens.shape
        self.num_shards: int = self._complete.shape[0]
        if self.check:
            self.check_digests()

    def check_digests(self) -> None:
        """The ids and labels arrays hold what was written: their digests are the recorded ones."""
        for name, read in (("ids", lambda: self.ids), ("labels", lambda: self.labels)):
            if identity_digest(name, read()) != self.digests.get(name):
                raise CacheError(f"{self.path}: array {name} does not have the digest recorded when it "
                                 f"was written (attrs digests.{name}): a chunk copied from another "
                                 f"store or edited; {REPAIR}")

    def __getstate__(self) -> dict[str, Any]:
        return {"path": str(self.path), "mode": self.mode}  # workers: the client checked it

    def __setstate__(self, state: dict[str, Any]) -> None:
        FeatureCache.__init__(self, state["path"], state["mode"], False)

    def __repr__(self) -> str:
        return f"FeatureCache({str(self.path)!r}, mode={self.mode!r})"

    @classmethod
    def open(cls, path: str | Path, mode: str = "r") -> FeatureCache:
        """Open an existing cache, complete or not (`require_complete` is the training gate)."""
        return cls(path, mode)

    def shard_range(self, s: int) -> tuple[int, int]:
        if not 0 <= s < self.num_shards:
            raise IndexError(f"shard {s} out of range 0..{self.num_shards - 1} in {self.path}")
        return s * self.shard_size, min((s + 1) * self.shard_size, self.num_images)

    def shard_file(self, s: int) -> Path:
        """The tokens shard file of shard s (zarr's default chunk key encoding, `c/` + `/`)."""
        return self.path / "tokens" / "c" / str(s) / "0" / "0" / "0"

    def chunk_file(self, name: str, chunk: int = 0) -> Path:
        """The chunk file of a metadata array (labels, ids, status, complete, keys, inputs, text/*)."""
        ndim = 2 if name in ("labels", "keys", "inputs") or name.startswith("text/") else 1
        return self.path / name / "c" / str(chunk) / Path(*["0"] * (ndim - 1))

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
        wrong = np.argwhere(chunk_crcs(out) != self.expected_crcs(s))  # this store's, in place?
        if wrong.size:
            raise CacheError(identity_problem(self, s, start + int(wrong[0][0]), int(wrong[0][1])))
        return out  # stored non-finite values are data (training names them; verify reports them)

    def expected_crcs(self, s: int) -> np.ndarray:
        """(n, K) uint32: the crc32c each token chunk of shard s must have in this store and place
        (its key XOR crc32c(store id, image, view); pipeline/store/identity.py)."""
        start, stop = self.shard_range(s)
        try:
            keys = np.asarray(self._keys[start:stop], dtype=np.uint32)  # (n, K), one chunk
        except (OSError, ValueError) as err:
            raise CacheError(f"{self.path}: array keys, shard {s} is damaged ({err}); {REPAIR}") from err
        return keys ^ place_keys(self.store_id, start, stop, self.views)

    def input_records(self, start: int, stop: int) -> np.ndarray:
        """(stop - start, 3) int64 (size, mtime_ns, crc32c) of images start..stop-1 as recorded
        when they were extracted (-1: unknown)."""
        try:
            return np.asarray(self._inputs[start:stop], dtype=np.int64)
        except (OSError, ValueError) as err:
            raise CacheError(f"{self.path}: array inputs, images {start}..{stop - 1} is damaged ({err}); "
                             f"{REPAIR}") from err

    def text_features(self, name: str) -> np.ndarray:
        if not self.has_text_feature(name):
            raise CacheError(f"{self.path} has no text/{name} features (names: {TEXT_NAMES}); "
                             "they are written by write_text_features during extract-features")
        array = open_array(self._group, self.path, f"text/{name}")  # its zarr.json readable
        value = np.asarray(self._get(f"text/{name}", array), dtype=np.float32)  # (C, D)
        if value.shape != (len(self.classnames), self.dim) or not np.isfinite(value).all():
            raise CacheError(f"{self.path}: array text/{name} is lost or damaged (shape {value.shape}, "
                             f"non-finite values); re-run `pipeline extract-features`")
        return value

    def has_text_feature(self, name: str) -> bool:
        return (self.path / "text" / name / "zarr.json").is_file()

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
