"""The writing half of FeatureCache (a mixin): a shard is written whole (tokens, status, keys,
input records), then marked complete; text features; the input digests of a finished store."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

from pipeline.errors import CacheError
from pipeline.store.format import RAW_TEXT_NAMES, TEXT_NAMES
from pipeline.store.identity import INPUTS_KEY, shard_keys
from pipeline.store.inputs import FIELDS, UNKNOWN, records_digest


class ShardWrites:
    """Mixin of FeatureCache; every attribute used here is set by FeatureCache.__init__."""

    path: Path
    mode: str
    store_id: str
    fingerprint: dict[str, Any]
    classnames: list[str]
    views: int
    num_tokens: int
    dim: int
    num_images: int
    dtype: np.dtype
    _group: zarr.Group
    _tokens: zarr.Array
    _status: zarr.Array
    _complete: zarr.Array

    if TYPE_CHECKING:  # FeatureCache's reading half, which these methods call
        def shard_range(self, s: int) -> tuple[int, int]: ...
        def shard_file(self, s: int) -> Path: ...
        def input_records(self, start: int, stop: int) -> np.ndarray: ...
        @property
        def ids(self) -> np.ndarray: ...
    _keys: zarr.Array
    _inputs: zarr.Array

    def _writable(self) -> None:
        if self.mode == "r":
            raise CacheError(f"{self.path} is open read-only; use FeatureCache.open(path, mode='r+')")

    def write_shard(self, s: int, tokens: np.ndarray, status: np.ndarray,
                    inputs: np.ndarray | None = None) -> None:
        """Write shard s (tokens (n, K, T, D), status (n,), the images' input records (n, 3): size,
        mtime_ns, crc32c, or None: unknown), then mark it complete: a crash before the mark leaves
        it to be redone. Each chunk's key (pipeline/store/identity.py) is written with it."""
        self._writable()
        start, stop = self.shard_range(s)
        shape = (stop - start, self.views, self.num_tokens, self.dim)
        if tokens.shape != shape or np.shape(status) != shape[:1]:
            raise ValueError(f"shard {s} of {self.path} needs tokens {shape} and status {shape[:1]}, "
                             f"got {tokens.shape} and {np.shape(status)}")
        records = np.full((shape[0], len(FIELDS)), UNKNOWN, np.int64) if inputs is None \
            else np.asarray(inputs, dtype=np.int64).reshape(shape[0], len(FIELDS))
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        finite = np.isfinite(tokens).reshape(len(tokens), -1).all(axis=1)  # (n,) per image
        bad = np.flatnonzero(~finite & (np.asarray(status) == 0))
        if bad.size:  # never store a number that is not one (fp16 overflow, a broken backbone)
            ids = self.ids[start + bad]
            raise CacheError(f"{self.path}: the backbone gave non-finite tokens for image ids "
                             f"{', '.join(map(str, ids[:5]))}{' ...' if len(ids) > 5 else ''} (shard {s}); "
                             "nothing of the shard was written. With backbone.precision fp16 this is an "
                             "overflow: use fp32 or bf16")
        keys = shard_keys(self.store_id, start, tokens)  # (n, K) uint32
        try:
            self.unmark(s)  # rewriting: unmark first so a crash midway is not trusted
            # the shard is recomputed whole: a damaged old file must not be read back (partial
            # last shards are read-modify-written by zarr)
            self.shard_file(s).unlink(missing_ok=True)
            self._tokens[start:stop] = tokens
            self._status[start:stop] = np.asarray(status, dtype=np.int8)
            self._keys[start:stop] = keys
            self._inputs[start:stop] = records
        except OSError as err:  # full disk, permissions: the shard stays incomplete
            raise CacheError(f"writing shard {s} (images {start}..{stop - 1}) of {self.path} failed: "
                             f"{err}; the shard is left incomplete and a re-run redoes it") from err
        self._complete[s] = True

    def unmark(self, s: int) -> None:
        """Mark shard s incomplete (a full-chunk write: works on a damaged mark too)."""
        self._complete[s] = False

    def write_inputs(self, records: Mapping[int, tuple[int, int, int]]) -> None:
        """Record new (size, mtime_ns, crc32c) of images whose files were touched, bytes unchanged."""
        self._writable()
        for i, record in sorted(records.items()):
            self._inputs[i] = np.asarray(record, dtype=np.int64)

    def finish_inputs(self) -> None:
        """Record the digest of every image's record in fingerprint.inputs.images (a complete store)."""
        self._writable()
        digest = records_digest(self.input_records(0, self.num_images)[:, FIELDS.index("crc32c")])
        inputs = dict(self.fingerprint.get(INPUTS_KEY) or {})
        if inputs.get("images") != digest:
            self.fingerprint = {**self.fingerprint, INPUTS_KEY: {**inputs, "images": digest}}
            self._group.attrs.update({"fingerprint": self.fingerprint})

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
