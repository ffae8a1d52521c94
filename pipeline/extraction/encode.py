"""Encoding shards: the frozen CLIP over a shard's views, written as one unit (one shard file and
its completion mark). Shared by the in-process engine and the Dask workers."""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch

from pipeline.data.augment import normalise_pixels
from pipeline.errors import BadImageError
from pipeline.extraction.views import ViewSpec, view_batches
from pipeline.model.backbone import FrozenTowers
from pipeline.store.cache import FeatureCache
from pipeline.store.inputs import file_records

log = logging.getLogger(__name__)


class InjectedFailure(RuntimeError):
    """Raised by the ``fail_after_shards`` test hook to simulate a crash part-way."""


def shard_batches(cache: FeatureCache, shards: Sequence[int], batch_images: int) -> list[list[int]]:
    """Image-index batches in shard order; no batch crosses a shard boundary."""
    batches = []
    for s in shards:
        start, stop = cache.shard_range(s)
        batches += [list(range(i, min(i + batch_images, stop)))
                    for i in range(start, stop, batch_images)]
    return batches


def encode_views(backbone: FrozenTowers, pixels: torch.Tensor, dtype: np.dtype,
                 tokens: str | None = None) -> np.ndarray:
    """(b, K, 3, S, S) uint8 views -> (b, K, T, D) tokens (the backbone's token method `tokens`,
    None: its spatial tokens) in the cache dtype; the views are copied to the backbone's device as
    uint8 (unless made there) and normalised there."""
    b, k = pixels.shape[:2]
    views = normalise_pixels(pixels.flatten(0, 1).to(backbone.device, non_blocking=True))  # (bK, 3, S, S)
    out = backbone.tokens(views, tokens)  # (bK, T, D) float32
    return out.reshape(b, k, *out.shape[1:]).cpu().numpy().astype(dtype)  # (b, K, T, D)


def encode_shards(backbone: FrozenTowers, cache: FeatureCache, shards: Sequence[int], spec: ViewSpec,
                  *, batch_images: int, num_workers: int = 0, on_bad_image: str = "error",
                  on_images: Callable[[int], None] = lambda n: None,
                  fail_after_shards: int | None = None, tokens: str | None = None) -> list[tuple[str, str]]:
    """Compute and write every shard in ``shards``; returns the skipped (path, reason) pairs.

    on_bad_image "error" raises BadImageError before the shard is written (it stays incomplete);
    "skip" stores zero tokens with status 1. ``tokens``: the token method stored (encode_views).
    ``fail_after_shards`` (tests) writes the first batch of the next shard straight into the tokens
    array, as a crash mid-write would, then raises.
    """
    batches = view_batches(spec, shard_batches(cache, shards, batch_images), backbone.device,
                           num_workers)
    bad: list[tuple[str, str]] = []
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    written = 0
    for index, pixels, reasons in batches:
        status = np.array([bool(r) for r in reasons], dtype=np.int8)  # (b,) 1 = bad image
        for i, reason in zip(index, reasons):
            if reason:
                if on_bad_image == "error":
                    raise BadImageError(spec.path(i), f"{reason} (pass --on-bad-image skip to "
                                        "record it and go on)")
                log.warning("skipping bad image %s: %s", spec.path(i), reason)
                bad.append((spec.path(i), reason))
        encoded = encode_views(backbone, pixels, cache.dtype, tokens)  # (b, K, T, D)
        encoded[status == 1] = 0
        parts.append((encoded, status))
        s = index[0] // cache.shard_size
        start, stop = cache.shard_range(s)
        if fail_after_shards is not None and written >= fail_after_shards:
            cache.tokens[start:start + len(index)] = encoded  # partial data, never marked complete
            raise InjectedFailure(f"injected failure in shard {s} after {written} shards")
        if index[-1] + 1 == stop:  # the files' records: size, mtime_ns, crc32c of their bytes
            cache.write_shard(s, np.concatenate([p[0] for p in parts]),
                              np.concatenate([p[1] for p in parts]),
                              file_records(spec.path(i) for i in range(start, stop)))
            parts, written = [], written + 1
        on_images(len(index))
    return bad
