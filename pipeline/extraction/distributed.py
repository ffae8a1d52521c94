"""Dask scale-out of feature extraction: one task per incomplete shard, written by its worker.

Each worker process builds the backbone once (cached per backbone params in this module) and
writes its shard region straight into the store, which is why the store must be on a filesystem
every worker sees. Shards are independent files (tokens) and independent completion chunks, so
workers never write the same object; the client process holds the store's writer lock
(pipeline/store/lock.py) for the whole run and its workers write under it. The numbers equal a
single-process run: views come from per-(image, view) seeds, weights from the seeded init or the checkpoint file, and each shard is
encoded in the same batches as in-process. On CPU that holds at equal torch thread counts only:
LocalCluster workers run one thread, and oneDNN's convolutions round differently per thread count
(tiny-RN: 4e-4 of the float16 tokens differed by one ulp between 1 and 2 threads).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipeline.config.schema import Backbone
from pipeline.data.images import BadImageError
from pipeline.extraction.encode import encode_shards
from pipeline.model.backbone import FrozenTowers
from pipeline.model.build import backbone_from_params
from pipeline.store.cache import FeatureCache

log = logging.getLogger(__name__)

_BACKBONES: dict[str, FrozenTowers] = {}  # per worker process: backbone params (JSON) -> model


def worker_backbone(backbone_params: Backbone) -> FrozenTowers:
    """The backbone for these params, built on first use in this process and kept."""
    key = backbone_params.model_dump_json()
    if key not in _BACKBONES:
        _BACKBONES[key] = backbone_from_params(backbone_params)
    return _BACKBONES[key]


def extract_shard_task(store_path: str, shard: int, spec: Any, backbone_params: Backbone,
                       weights_digest: str, batch_images: int, on_bad_image: str,
                       tokens: str | None = None) -> dict[str, Any]:
    """Encode and write one shard; returns {"shard", "images", "bad"} or {"shard", "error"}.

    A bad image in "error" mode comes back as data (path, reason), not as an exception:
    BadImageError does not survive pickling, and the client raises it naming the file.
    """
    backbone = worker_backbone(backbone_params)
    if backbone.weights_digest != weights_digest:
        raise RuntimeError(f"worker backbone weights {backbone.weights_digest} differ from the "
                           f"client's {weights_digest}: is the checkpoint the same file "
                           "everywhere?")
    cache = FeatureCache.open(store_path, mode="r+")
    start, stop = cache.shard_range(shard)
    try:
        bad = encode_shards(backbone, cache, [shard], spec.subset(start, stop),
                            batch_images=batch_images, num_workers=0, on_bad_image=on_bad_image,
                            tokens=tokens)
    except BadImageError as err:
        return {"shard": shard, "error": (str(err.path), err.reason)}
    return {"shard": shard, "images": stop - start, "bad": bad}


def _absolute(backbone_params: Backbone) -> Backbone:
    """A relative checkpoint path means the client's working directory; workers may differ."""
    if not backbone_params.checkpoint:
        return backbone_params
    return backbone_params.model_copy(update={"checkpoint": str(Path(backbone_params.checkpoint).resolve())})


def extract_distributed(cache: FeatureCache, shards: Sequence[int], spec: Any,
                        backbone_params: Backbone, weights_digest: str, *,
                        batch_images: int, on_bad_image: str, workers: int = 0,
                        scheduler: str | None = None,
                        on_images: Callable[[int], None] = lambda n: None,
                        tokens: str | None = None) -> list[tuple[str, str]]:
    """Run ``shards`` as tasks on a LocalCluster of ``workers`` processes (one thread each) or on
    the scheduler at ``scheduler``; returns the skipped (path, reason) pairs."""
    from dask.distributed import Client, LocalCluster, as_completed

    # LocalCluster sets OMP_NUM_THREADS=1, PYTHONHASHSEED etc. in this process's environment for
    # its workers and leaves them there; they are put back afterwards for later subprocesses.
    environ = dict(os.environ)
    cluster = client = None
    bad: list[tuple[str, str]] = []
    try:
        if scheduler:
            client = Client(scheduler)
        else:
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                   dashboard_address=None)
            client = Client(cluster)
        params, store = _absolute(backbone_params), str(cache.path.resolve())
        futures = [client.submit(extract_shard_task, store, s, spec.subset(*cache.shard_range(s)),
                                 params, weights_digest, batch_images, on_bad_image, tokens, pure=False)
                   for s in shards]
        for future in as_completed(futures):
            result = future.result()
            if "error" in result:
                client.cancel(futures)
                raise BadImageError(result["error"][0], f"{result['error'][1]} (pass "
                                    "--on-bad-image skip to record it and go on)")
            for path, reason in result["bad"]:
                log.warning("skipping bad image %s: %s", path, reason)
            bad += result["bad"]
            on_images(result["images"])
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
        for key in set(os.environ) - set(environ):
            del os.environ[key]
        os.environ.update(environ)
    return bad
