"""A store's input files now against what it recorded: extraction redoes exactly the shards whose
images changed (`recheck_inputs`); `pipeline verify --inputs` lists every change (`input_report`).

Cheap when nothing changed: one stat per image against the recorded size and mtime_ns, and a
read of the bytes (crc32c) only where those differ (pipeline/store/inputs.py). Images added or
removed and changed labels are the store's update at reopening (pipeline/store/update.py).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.records import MultiLabelDataset
from pipeline.store.cache import FeatureCache
from pipeline.store.identity import first_difference
from pipeline.store.inputs import ImageCheck, annotation_records, changed_annotations, check_images

_SHOWN = 5


def check_complete_shards(cache: FeatureCache, paths: Sequence[str | Path]) -> tuple[np.ndarray, ImageCheck]:
    """(indices of the images of complete shards, their ImageCheck; indices into those)."""
    complete = np.flatnonzero(cache.complete)
    index = np.concatenate([np.arange(*cache.shard_range(int(s))) for s in complete]) \
        if complete.size else np.zeros(0, np.int64)
    recorded = np.concatenate([cache.input_records(*cache.shard_range(int(s))) for s in complete]) \
        if complete.size else np.zeros((0, 3), np.int64)
    return index, check_images([paths[i] for i in index.tolist()], recorded)


def recheck_inputs(cache: FeatureCache, paths: Sequence[str | Path]) -> list[int]:
    """Un-mark (and return) the complete shards holding an image whose file changed since it was
    extracted; record the new stat of files whose bytes did not change (touched, copied)."""
    index, check = check_complete_shards(cache, paths)
    changed = [int(index[j]) for j in check.changed]
    shards = sorted({i // cache.shard_size for i in changed})
    for i in changed[:_SHOWN]:
        print(f"{cache.path}: image {i} ({paths[i]}) changed since it was extracted")
    if len(changed) > _SHOWN:
        print(f"{cache.path}: ... and {len(changed) - _SHOWN} more changed images")
    for s in shards:
        print(f"{cache.path}: shard {s} is extracted again (a changed image)")
        cache.unmark(s)
    touched = {int(index[j]): rec for j, rec in check.touched.items()
               if int(index[j]) // cache.shard_size not in shards}
    if touched:
        cache.write_inputs(touched)
    return shards


def input_report(cache: FeatureCache, dataset: MultiLabelDataset) -> dict[str, Any]:
    """What changed in a store's inputs: {"added", "removed": image ids, "changed": image paths,
    "annotations": annotation file names, "from_image": the first changed position or None}."""
    old, new = list(cache.ids), [r.image_id for r in dataset.records]
    first = first_difference(old, new)
    stop = len(old) if first is None else first  # images before it are the same ones in place
    paths = [r.path for r in dataset.records[:stop]]
    index, check = check_complete_shards(cache, paths + [Path("/nonexistent")] * (len(old) - stop))
    changed = [str(paths[int(index[j])]) for j in check.changed if int(index[j]) < stop]
    now = annotation_records(dataset.sources, dataset.root) if dataset.root else {}
    return {"added": sorted(set(new) - set(old)), "removed": sorted(set(old) - set(new)),
            "moved_from": first, "changed": changed,
            "annotations": changed_annotations(cache.annotation_files, now)}
