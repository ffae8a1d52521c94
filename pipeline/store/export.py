"""Export a complete feature cache to one HDF5 file, for tools that do not read Zarr."""
from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np

from pipeline.store.cache import FORMAT, FORMAT_VERSION, RAW_TEXT_NAMES, TEXT_NAMES, FeatureCache


def export_hdf5(cache: FeatureCache, out_path: str | Path) -> Path:
    """Write tokens, labels, ids, status, text/* and attrs to `out_path`, atomically.

    Tokens are chunked per image view (1, 1, T, D) so a random (image, view) read is one chunk.
    The file is written under a temporary name and renamed, so `out_path` is either absent or whole.
    The fingerprint is stored as a JSON string attribute (HDF5 attributes hold no nested dicts).
    """
    cache.require_complete()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    n, k, t, d = cache.num_images, cache.views, cache.num_tokens, cache.dim
    try:
        with h5py.File(tmp, "w") as f:
            tokens = f.create_dataset("tokens", shape=(n, k, t, d), dtype=cache.dtype, chunks=(1, 1, t, d))
            for s in range(cache.num_shards):
                start, stop = cache.shard_range(s)
                tokens[start:stop] = cache.read_shard(s)  # (n_s, K, T, D)
            f.create_dataset("labels", data=cache.labels)
            f.create_dataset("status", data=cache.status)
            f.create_dataset("ids", data=cache.ids.astype(object), dtype=h5py.string_dtype())
            for name in TEXT_NAMES + RAW_TEXT_NAMES:
                if cache.has_text_feature(name):
                    f.create_dataset(f"text/{name}", data=cache.text_features(name))
            f.attrs["fingerprint"] = json.dumps(cache.fingerprint, sort_keys=True)
            f.attrs["layout"] = json.dumps(cache.layout, sort_keys=True)  # dtype, shard size, compressor
            f.attrs["classnames"] = np.array(cache.classnames, dtype=h5py.string_dtype())
            f.attrs["format"] = FORMAT
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["source"] = str(cache.path)
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return out_path
