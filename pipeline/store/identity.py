"""What makes a chunk this store's chunk for its place: the store id and the keyed chunk checks.

The store id is the sha256 of the canonical JSON of the store's settings: its fingerprint less
`inputs` (the input digests, which change shard by shard as changed images are re-extracted). It
covers the role and split, the params record, the weights digest and every setting, so a store
extracted otherwise, or a fingerprint edited by hand, has another id.

Each token chunk (image i, view v) has a key in the `keys` array, written with its shard:

    key[i, v] = crc32c(chunk values) XOR crc32c(store id || i || v)

A reader computes crc32c of the chunk's values anyway (the codec's check of uncompressed chunks
is that same number), so checking the key costs one XOR and a compare: a chunk moved to another
place, two shard files swapped, a shard file or keys chunk copied from a store with another
fingerprint (another seed, another split), or an edited fingerprint all fail it, naming the image
and view. The `keys` array itself carries a crc32c per chunk, like every array of the store.
"""
from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from crc32c import crc32c

from pipeline.store.format import REPAIR

INPUTS_KEY = "inputs"  # fingerprint key of the input digests: not part of the store id


def canonical(value: Any) -> str:
    """The one JSON text of a JSON-shaped value (sorted keys, no spaces, ASCII)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def settings(fingerprint: Mapping[str, Any]) -> dict[str, Any]:
    """The fingerprint less its input digests: what the store id and a resume compare."""
    return {k: v for k, v in fingerprint.items() if k != INPUTS_KEY}


def store_id(fingerprint: Mapping[str, Any]) -> str:
    """sha256 (hex) of the canonical settings JSON (role and split are in the fingerprint)."""
    return hashlib.sha256(canonical(settings(fingerprint)).encode()).hexdigest()


def place_keys(sid: str, start: int, stop: int, views: int) -> np.ndarray:
    """(stop - start, views) uint32 crc32c(store id || image || view) of images start..stop-1."""
    prefix = bytes.fromhex(sid)
    return np.array([[crc32c(prefix + struct.pack("<QI", i, v)) for v in range(views)]
                     for i in range(start, stop)], dtype=np.uint32).reshape(stop - start, views)


def chunk_crcs(tokens: np.ndarray) -> np.ndarray:
    """(n, K) uint32 crc32c of each (image, view) chunk's bytes of C-contiguous (n, K, T, D) tokens."""
    tokens = np.ascontiguousarray(tokens)
    n, k = tokens.shape[:2]
    return np.array([[crc32c(tokens[i, v]) for v in range(k)] for i in range(n)],
                    dtype=np.uint32).reshape(n, k)


def shard_keys(sid: str, start: int, tokens: np.ndarray) -> np.ndarray:
    """(n, K) uint32 keys of the tokens of images start..start+n-1 (see the module docstring)."""
    n, k = tokens.shape[:2]
    return chunk_crcs(tokens) ^ place_keys(sid, start, start + n, k)


def digest(name: str, value: Any) -> str:
    """sha256 of the ids (joined by newlines) or of the int8 labels' bytes, recorded in attrs."""
    if name == "ids":
        data = "\n".join(str(i) for i in value).encode()
    else:
        data = np.ascontiguousarray(value, dtype=np.int8).tobytes()
    return hashlib.sha256(data).hexdigest()


def first_difference(old: Sequence[str], new: Sequence[str]) -> int | None:
    """The first index at which two image lists differ (the shorter one's length if one extends
    the other), None when they are equal."""
    for i, (a, b) in enumerate(zip(old, new)):
        if a != b:
            return i
    return None if len(old) == len(new) else min(len(old), len(new))


def identity_problem(cache: Any, s: int, i: int, v: int) -> str:
    """What is wrong when chunk (i, v) of shard s passes its crc32c but not its key."""
    where = f"{cache.path}: array tokens, shard {s} ({cache.shard_file(s)})"
    if not cache.chunk_file("keys", s).is_file():
        return f"{cache.path}: array keys, shard {s} is missing (a lost chunk); {REPAIR}"
    return (f"{where}: image {i} view {v} is not this store's chunk for that place (its key in array "
            "keys does not match: a shard file moved, swapped or copied from another store, or the "
            f"fingerprint in zarr.json edited); {REPAIR}")
