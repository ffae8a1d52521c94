"""Whether a shard marked complete can be trusted: the one check behind `extract-features`' recheck
before resuming (cheap: one token chunk per shard), `pipeline verify` (thorough: reads every
chunk) and FeatureCache.status.

A complete shard is sound when its completion mark reads, its status chunk reads with every image
0 (ok) or 1 (bad image; -1, the fill, in a complete shard is a lost chunk), its input records
read, and its tokens pass ShardReader.check_shard (file, index crc32c, chunk sizes, keys chunk, the
first chunk's crc32c and key) or, thorough, ShardReader.verify_shard (every chunk's crc32c and
key, finite tokens).
"""
from __future__ import annotations

import numpy as np

from pipeline.errors import CacheError
from pipeline.store.cache import FeatureCache, status_problem
from pipeline.store.shards import ShardReader


def read_marks(cache: FeatureCache) -> tuple[np.ndarray, dict[int, str]]:
    """(complete (num_shards,) bool, {shard: why} for each completion mark that cannot be read; such
    a shard counts as incomplete)."""
    try:
        return cache.complete, {}
    except CacheError:  # a damaged completion mark: read them one by one
        complete, damaged = np.zeros(cache.num_shards, dtype=bool), {}
        for s in range(cache.num_shards):
            try:
                complete[s] = bool(cache._complete[s])
            except (OSError, ValueError) as err:
                damaged[s] = f"{cache.path}: array complete, shard {s} is damaged ({err})"
        return complete, damaged


def shard_problem(cache: FeatureCache, reader: ShardReader, s: int, thorough: bool = False) -> str | None:
    """None when complete shard s is sound (see the module docstring), else what is wrong."""
    start, stop = cache.shard_range(s)
    try:
        status = cache._status[start:stop]  # (n,) one chunk
    except (OSError, ValueError) as err:
        return f"{cache.path}: array status, shard {s} is damaged ({err})"
    problem = status_problem(cache, status, start)
    if problem is None:
        try:
            cache.input_records(start, stop)
        except CacheError as err:
            problem = str(err)
    return problem or (reader.verify_shard(s) if thorough else reader.check_shard(s))


def unsound_shards(cache: FeatureCache, thorough: bool = False) -> tuple[np.ndarray, dict[int, str]]:
    """(the completion marks as read, {shard: what is wrong}) for every shard whose mark is damaged
    or that is marked complete but not sound; un-marking those makes extract-features redo them."""
    complete, damaged = read_marks(cache)
    reader = ShardReader(cache)
    try:
        for s in np.flatnonzero(complete).tolist():
            problem = shard_problem(cache, reader, s, thorough)
            if problem is not None:
                damaged[s] = problem
    finally:
        reader.close()
    return complete, damaged
