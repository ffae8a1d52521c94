"""A store brought up to date with changed inputs under unchanged settings (extraction only).

- Images added or removed (the ids differ from image f on): the shards from f's on are un-marked
  and their files removed, the arrays resized to the new image count and the ids rewritten, so
  the next shards extracted are exactly those; shards before f keep their tokens (same images in
  the same places, the same seeds).
- Labels changed (annotations edited, the images the same): the labels are rewritten; no token
  is recomputed.
- The annotation files' records and digest are recorded (fingerprint.inputs.annotations).

Every write gives the bytes a fresh extraction of the new inputs writes (the ids and labels
arrays are re-created as at creation, the others resized), so an updated store ends
byte-identical to a fresh one. Changed image *contents* are found by the extraction engine
(pipeline/extraction/inputs.py): it un-marks their shards.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

from pipeline.store.cache import LABEL_FILL, CacheError, FeatureCache
from pipeline.store.identity import INPUTS_KEY, digest, first_difference, settings


def write_ids_labels(group: zarr.Group, ids: list[str], labels: np.ndarray) -> None:
    """(Re-)create the ids (N,) str and labels (N, C) int8 arrays, one chunk each."""
    crc = [Crc32cCodec()]
    group.create_array("labels", shape=labels.shape, dtype="int8", chunks=labels.shape,
                       fill_value=LABEL_FILL, compressors=crc, overwrite=True)[:] = labels
    group.create_array("ids", shape=(len(ids),), dtype=str, chunks=(len(ids),), fill_value="",
                       compressors=crc, overwrite=True)[:] = np.array(ids)  # variable-length


def _same_settings(cache: FeatureCache, classnames: list[str], layout: Mapping[str, Any],
                   fingerprint: Mapping[str, Any]) -> bool:
    def fixed(lay: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in lay.items() if k != "num_images"}

    return (settings(cache.fingerprint) == settings(fingerprint) and cache.classnames == classnames
            and fixed(cache.layout) == fixed(layout))


def _drop_shards_from(cache: FeatureCache, first: int, num_images: int) -> None:
    """Un-mark and remove shards first.. (files and chunks), then resize to num_images."""
    for s in range(first, cache.num_shards):
        cache.unmark(s)
        cache.shard_file(s).unlink(missing_ok=True)
        for name in ("status", "keys", "inputs"):
            cache.chunk_file(name, s).unlink(missing_ok=True)
    s = cache.shard_size
    for array, shape in ((cache._tokens, (num_images, *cache._tokens.shape[1:])),
                         (cache._status, (num_images,)), (cache._keys, (num_images, cache.views)),
                         (cache._inputs, (num_images, cache._inputs.shape[1])),
                         (cache._complete, (-(-num_images // s),))):
        array.resize(shape)


def update_inputs(cache: FeatureCache, ids: list[str], labels: np.ndarray, classnames: list[str],
                  layout: Mapping[str, Any], fingerprint: Mapping[str, Any],
                  annotation_files: Mapping[str, Any]) -> FeatureCache:
    """Take changed ids / labels / annotation records (see the module docstring); returns the store
    reopened. Other settings are left to the caller's mismatch check."""
    if not _same_settings(cache, classnames, layout, fingerprint):
        return cache
    group, path, changed = cache._group, cache.path, False
    first = first_difference(list(cache.ids), ids)
    if first is not None:
        shard = first // cache.shard_size
        print(f"{path}: the image list changed from image {first} on ({cache.num_images} -> "
              f"{len(ids)} images): shards {shard}.. are extracted again")
        _drop_shards_from(cache, shard, len(ids))
    rewrite = first is not None
    if not rewrite:
        try:
            rewrite = digest("labels", cache.labels) != digest("labels", labels)
        except CacheError:  # lost or damaged: the dataset's labels are the ones to store
            rewrite = True
        if rewrite and digest("labels", labels) == cache.digests.get("labels"):
            print(f"{path}: rewriting damaged array labels from the dataset (digest checked)")
        elif rewrite:
            print(f"{path}: the annotations changed: refreshing the labels (no token is recomputed)")
    if rewrite:
        write_ids_labels(group, ids, labels)
        changed = True
    inputs = {**(fingerprint.get(INPUTS_KEY) or {}),
              "images": (cache.fingerprint.get(INPUTS_KEY) or {}).get("images")}
    attrs = {"layout": layout, "fingerprint": {**fingerprint, INPUTS_KEY: inputs},
             "digests": {"labels": digest("labels", labels), "ids": digest("ids", ids)},
             "annotation_files": annotation_files}
    old = {k: group.attrs.get(k) for k in attrs}
    if not fingerprint.get(INPUTS_KEY):  # a store made without input records: none to keep
        attrs["fingerprint"] = fingerprint
    if changed or old != attrs:
        group.attrs.update(attrs)
    return FeatureCache(path, "r+")
