"""Creating a feature store, or reopening it for resume only when it was built with the same settings.

Layout of the group at `path` (one directory), format version 3:
  tokens   (N, K, T, D) float16|float32  one shard file per `shard_size` images; inner chunk
                                         (1, 1, T, D), one per image view, so a sampled view is one
                                         read (pipeline/store/shards.py); fill NaN
  labels   (N, C) int8     1 positive, 0 negative, -1 unknown; fill -128  (written at creation)
  ids      (N,) str        image ids; fill ""                             (written at creation)
  status   (N,) int8       0 ok, 1 bad image (excluded from training), -1 not extracted yet
  complete (num_shards,) bool, chunk 1: one tiny object per shard, so writers of different
                           shards never touch the same file
  keys     (N, K) uint32   per token chunk crc32c(values) XOR crc32c(store id, image, view), chunk
                           (shard_size, K), written with its shard (pipeline/store/identity.py); fill 0
  inputs   (N, 3) int64    per image (size, mtime_ns, crc32c) of its file when extracted, chunk
                           (shard_size, 3), written with its shard (pipeline/store/inputs.py); fill -1
  text/{positive,negative,plain,raw_*} (C, D) float32; fill NaN           (write_text_features)
  attrs: format, format_version, layout, fingerprint, classnames, digests (sha256 of labels and
         ids), store_id (of the fingerprint less its inputs), annotation_files ({name: [size, crc32c]})

Every chunk carries a crc32c (zarr's Crc32cCodec) and every fill value is one that validation
refuses (pipeline/store/cache.py). Float16 tokens compress poorly: zstd level 3 saved 8% (ratio 1.09) on
Gaussian float16 tokens of RN-101 shape, so the default is no compressor; `compressor="zstd"` is
there for slow disks.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from pipeline.config.params import flatten  # an empty mapping is a value, so {} differs from absent
from pipeline.store.cache import (
    FORMAT,
    FORMAT_VERSION,
    CacheError,
    FeatureCache,
    FingerprintMismatch,
)
from pipeline.store.identity import digest as _digest
from pipeline.store.identity import settings, store_id
from pipeline.store.inputs import FIELDS, UNKNOWN
from pipeline.store.update import update_inputs, write_ids_labels


def _is_cache_dir(path: Path) -> bool:
    """Whether `path` holds a feature cache of any format version (safe to delete on --overwrite)."""
    try:
        meta = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("attributes", {}).get("format") == FORMAT


def create_or_open(path: str | Path, *, ids: Sequence[str], labels: np.ndarray, classnames: Sequence[str],
                   views: int, num_tokens: int, dim: int, fingerprint: Mapping[str, Any],
                   shard_size: int = 64, dtype: str = "float16", compressor: str | None = None,
                   overwrite: bool = False, annotation_files: Mapping[str, Any] | None = None,
                   update: bool = False) -> FeatureCache:
    """Create the store, or reopen it for resume if it was built with identical settings.

    Different settings raise FingerprintMismatch naming each differing key. `overwrite` removes
    an existing cache (only a directory that is a cache or empty) and starts fresh. `update`
    (extraction) takes other ids, labels and input digests under the same settings as changed
    inputs (pipeline/store/update.py): shards from the first changed image on are un-marked and
    the labels rewritten; without it they are a mismatch too. `annotation_files` is recorded
    ({relative name: [size, crc32c]}).
    """
    path = Path(path)
    labels = np.asarray(labels, dtype=np.int8)
    ids = [str(i) for i in ids]
    fingerprint = json.loads(json.dumps(dict(fingerprint)))  # tuples -> lists, as stored
    annotation_files = json.loads(json.dumps(dict(annotation_files or {})))
    if dtype not in ("float16", "float32"):
        raise CacheError(f"cache dtype must be float16 or float32, got {dtype!r}")
    if compressor not in (None, "zstd"):
        raise CacheError(f"cache compressor must be None or 'zstd', got {compressor!r}")
    if labels.ndim != 2 or labels.shape != (len(ids), len(classnames)) or not ids:
        raise CacheError(f"labels shape {labels.shape} does not match {len(ids)} ids x "
                         f"{len(classnames)} classnames")
    layout = {"num_images": len(ids), "views": views, "num_tokens": num_tokens, "dim": dim,
              "shard_size": shard_size, "dtype": dtype, "compressor": compressor}
    if overwrite and path.exists():
        if any(path.iterdir()) and not _is_cache_dir(path):
            raise CacheError(f"refusing to overwrite {path}: it is not a feature cache (no readable "
                             f"zarr.json naming the format); if it is a damaged one, `rm -r {path}`")
        shutil.rmtree(path)
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        _create(path, ids, labels, list(classnames), layout, fingerprint, annotation_files)
    cache = FeatureCache(path, "r+")
    _repair_metadata(cache, ids, labels, update)
    if update:
        cache = update_inputs(cache, ids, labels, list(classnames), layout, fingerprint, annotation_files)
    _check_same(cache, ids, labels, list(classnames), layout, fingerprint)
    return cache


def _repair_metadata(cache: FeatureCache, ids: list[str], labels: np.ndarray, update: bool) -> None:
    """Rewrite a damaged, lost or foreign labels / ids chunk (its digest not the recorded one) from
    the dataset, only when the dataset's gives the recorded digest (the same bytes): tokens never
    end up under other images. With `update` labels are left to update_inputs (they never decide
    tokens)."""
    recorded = cache.digests
    for name, value, data in (("labels", labels, lambda: cache.labels),
                              ("ids", np.array(ids), lambda: cache.ids)):
        if update and name == "labels":
            continue
        try:
            if _digest(name, data()) != recorded.get(name):
                raise CacheError(f"{cache.path}: array {name} does not have its recorded digest")
        except CacheError as err:
            if recorded.get(name) != _digest(name, value):
                raise FingerprintMismatch(
                    f"{err}; the dataset's {name} differ from those the store was built with, so "
                    f"they cannot repair it: `rm -r {cache.path}` and re-run extract-features") from err
            print(f"{cache.path}: rewriting damaged array {name} from the dataset (digest checked)")
            getattr(cache, f"_{name}")[:] = value


def _create(path: Path, ids: list[str], labels: np.ndarray, classnames: list[str],
            layout: Mapping[str, Any], fingerprint: Mapping[str, Any],
            annotation_files: Mapping[str, Any]) -> None:
    """Build in a temporary directory, then rename: a store at `path` is never half-created."""
    n, k, t, d, s = (layout[x] for x in ("num_images", "views", "num_tokens", "dim", "shard_size"))
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        g = zarr.open_group(str(tmp), mode="w-")
        crc = [Crc32cCodec()]  # after bytes (and zstd): checks what is on disk
        g.create_array("tokens", shape=(n, k, t, d), dtype=layout["dtype"], shards=(s, k, t, d),
                       chunks=(1, 1, t, d), fill_value=float("nan"),  # a lost file reads as NaN, not 0
                       compressors=[ZstdCodec(level=3), *crc] if layout["compressor"] else crc)
        write_ids_labels(g, ids, labels)
        g.create_array("status", shape=(n,), dtype="int8", chunks=(s,), fill_value=-1,
                       compressors=crc)
        g.create_array("complete", shape=(-(-n // s),), dtype="bool", chunks=(1,), fill_value=False,
                       compressors=crc)
        g.create_array("keys", shape=(n, k), dtype="uint32", chunks=(s, k), fill_value=0,
                       compressors=crc)
        g.create_array("inputs", shape=(n, len(FIELDS)), dtype="int64", chunks=(s, len(FIELDS)),
                       fill_value=UNKNOWN, compressors=crc)
        g.attrs.update({"format": FORMAT, "format_version": FORMAT_VERSION, "layout": layout,
                        "fingerprint": fingerprint, "classnames": classnames,
                        "digests": {"labels": _digest("labels", labels), "ids": _digest("ids", ids)},
                        "store_id": store_id(fingerprint), "annotation_files": annotation_files})
        try:
            os.rename(tmp, path)  # replaces an empty directory; fails if another process won
        except OSError:
            if not (path / "zarr.json").is_file():
                raise
    except OSError as err:  # full disk, permissions: nothing is left at `path`
        raise CacheError(f"cannot create {path}: {err.strerror or err}; free space (or fix "
                         "permissions) and re-run `pipeline extract-features`") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_same(cache: FeatureCache, ids: list[str], labels: np.ndarray, classnames: list[str],
                layout: Mapping[str, Any], fingerprint: Mapping[str, Any]) -> None:
    old = {**flatten(settings(cache.fingerprint), "fingerprint."), **flatten(cache.layout, "layout."),
           "classnames": cache.classnames}
    new = {**flatten(settings(fingerprint), "fingerprint."), **flatten(layout, "layout."),
           "classnames": classnames}
    diffs = [f"  {k}: stored {old.get(k, '<absent>')!r}, requested {new.get(k, '<absent>')!r}"
             for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]
    if not diffs:
        if list(cache.ids) != ids:
            diffs.append("  ids: the image list differs")
        elif not np.array_equal(cache.labels, labels):
            diffs.append(f"  labels: {int((cache.labels != labels).any(1).sum())} images differ")
    if diffs:
        raise FingerprintMismatch(
            f"feature cache {cache.path} was built with different settings:\n" + "\n".join(diffs)
            + f"\nto start fresh: `rm -r {cache.path}` or pass --overwrite")
