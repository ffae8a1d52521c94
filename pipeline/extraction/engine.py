"""Feature extraction: the frozen CLIP runs once over a dataset; its spatial tokens go to the cache.

Work is organised by cache shard: every incomplete shard is recomputed from scratch and written
with ``FeatureCache.write_shard`` (data first, then the completion mark), so an interrupted run
resumes where it stopped and ends with exactly the bytes of an uninterrupted one. Batches never
cross a shard boundary, so each shard's forward passes are the same however the work is split
(resume, Dask tasks). Decoding and augmentation run in DataLoader worker processes, overlapped
with the model, or on the backbone's device (``transforms``, pipeline/extraction/views.py); with
``workers``/``scheduler`` shards become Dask tasks (pipeline/extraction/distributed.py).
"""
from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from pipeline.config.backbones import token_stride
from pipeline.config.params import as_dict, flatten
from pipeline.config.schema import Backbone
from pipeline.data.datasets import MultiLabelDataset
from pipeline.errors import ParamError
from pipeline.extraction.encode import (  # noqa: F401  (InjectedFailure: re-exported for tests)
    InjectedFailure,
    encode_shards,
)
from pipeline.extraction.expected import record_differences
from pipeline.extraction.inputs import recheck_inputs
from pipeline.extraction.views import DEFAULT_AUGMENT, TRANSFORMS, ViewSpec
from pipeline.model.backbone import FrozenTowers
from pipeline.model.build import backbone_from_params
from pipeline.store.cache import CacheError, FeatureCache, FingerprintMismatch
from pipeline.store.create import create_or_open
from pipeline.store.inputs import annotation_records, records_digest
from pipeline.store.integrity import unsound_shards
from pipeline.store.lock import StoreLock

log = logging.getLogger(__name__)


def package_version() -> str:
    try:
        return importlib.metadata.version("unmix-pipeline")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def resolve_num_workers(value: int | str) -> int:
    """extract.num_workers: an int, or "auto" = the cores this process may run on."""
    if value == "auto":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0
    return int(value)


def _size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024:
            return f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} TiB"


def require_disk_space(cache: FeatureCache, todo: int) -> int:
    """Print the store's size and what `todo` images still add, and refuse (CacheError naming both
    numbers) when the store's disk has less free space than that; returns the bytes to write.
    Tokens only (labels, status and metadata are kilobytes); uncompressed, an upper bound under zstd.
    A ViT-L/14 at 448 px with 4 views is about 0.5 TB for COCO-14's 82,783 images."""
    per_image = cache.views * cache.num_tokens * cache.dim * cache.dtype.itemsize
    needed = todo * per_image
    free = shutil.disk_usage(cache.path).free
    print(f"{cache.path}: {cache.num_images} images x {cache.views} views x {cache.num_tokens} tokens x "
          f"{cache.dim} {cache.dtype.name} = {_size(cache.num_images * per_image)}; "
          f"{_size(needed)} still to write, {_size(free)} free there", flush=True)
    if needed > free:
        raise CacheError(f"{cache.path}: the store needs {needed} bytes ({_size(needed)}) more but its "
                         f"disk has {free} bytes ({_size(free)}) free: free space, or set paths.cache "
                         "to a larger disk (or lower extract.views / backbone.image_size)")
    return needed


def recheck_complete(cache: FeatureCache) -> list[int]:
    """Un-mark (and return) the shards whose completion mark is damaged or that fail the cheap
    soundness check (pipeline/store/integrity.py: status chunk 0/1, shard file, index crc32c and chunk
    sizes). Reads no tokens: `pipeline verify` reads everything."""
    _, damaged = unsound_shards(cache)
    for s, why in damaged.items():
        print(f"{why}: un-marking shard {s}, it is extracted again")
        cache.unmark(s)
    return list(damaged)


def fingerprint(dataset: MultiLabelDataset, backbone: FrozenTowers, *, views: int,
                train_augment: bool, seed: int, image_size: int, dtype: str,
                augment: dict[str, Any], precision: str, batch_images: int,
                transforms: str = "workers", record: dict[str, Any] | None = None,
                annotations: str | None = None, eval_interpolation: str = "bicubic",
                tokens: str = "vproj") -> dict[str, Any]:
    """Everything that changes the stored numbers; a store built otherwise is refused, not mixed.

    Besides the weights and the views this includes what changes the last bits of the forward:
    precision, memory layout, compilation, images per forward and the device type (TF32 on CUDA).
    Views made on the device (other decoder and resize kernels) add ``transforms: device``.
    ``record`` is the role and params record the stage derives from the params
    (pipeline/extraction/expected.py; readers compare them; None from the Python API: readers
    then refuse the store). ``inputs`` holds the annotation files' digest and, once every shard
    is written, the images' (pipeline/store/inputs.py); they are not part of the store id.
    An un-augmented (eval) store records its resize, ``augment: {enabled: False, interpolation}``;
    train stores' fingerprints do not change with it. ``tokens``, the token method stored, is
    recorded as backbone.tokens unless it is "vproj" (the ResNet tokens every store held before
    the key existed: their fingerprints stay as they were).
    """
    made_on_device = {"transforms": "device"} if transforms == "device" else {}
    method = {} if tokens == "vproj" else {"tokens": tokens}
    return {
        "backbone": {"name": backbone.name, "weights_digest": backbone.weights_digest,
                     "precision": precision, "channels_last": backbone.channels_last,
                     "compile": backbone.compiled, "device": backbone.device.type,
                     "batch_images": batch_images, **method},
        "image_size": image_size,
        "views": views,
        "augment": ({"enabled": True, **augment} if train_augment
                    else {"enabled": False, "interpolation": eval_interpolation}),
        **made_on_device,
        "seed": seed if train_augment else None,
        "dtype": dtype,
        "dataset": {"name": dataset.name, "split": dataset.split},
        "package_version": package_version(),
        "role": (record or {}).get("role"),
        "params": (record or {}).get("params"),
        "inputs": {"annotations": annotations, "images": None},
    }


def _check_record(record: dict[str, Any], dataset: MultiLabelDataset, backbone_params: Backbone, *,
                  train_augment: bool, **used: Any) -> None:
    """Refuse a role and params record that disagrees with the arguments extraction runs with."""
    role = "train" if train_augment else "val"
    values = {**flatten(as_dict(backbone_params), "backbone."), "backbone.image_size": used.pop("image_size"),
              "data.dataset": dataset.name, f"data.{role}_split": dataset.split,
              **flatten({"augment": used.pop("augment")}, "extract."),
              **{f"extract.{k}": v for k, v in used.items()}}
    differ = record_differences(record, role, values)
    if differ:
        key, old, new = differ[0]
        raise ParamError(f"extract(record=...): {key} is {old!r} in the record but {new!r} in the "
                         "arguments: pass expected_fingerprint(params, role).record of the params "
                         "the arguments come from (or trust_record=True to record it as given)")


def extract(dataset: MultiLabelDataset, store_path: str | Path, backbone_params: Backbone, *,
            views: int = 1, train_augment: bool = False, seed: int = 0, image_size: int = 448,
            shard_size: int = 64, batch_size: int = 32, dtype: str = "float16",
            compressor: str | None = None, num_workers: int | str = 0, on_bad_image: str = "error",
            augment: dict[str, Any] | None = None, restart_on_change: bool = False,
            progress: bool = True, workers: int = 0, scheduler: str | None = None,
            fail_after_shards: int | None = None, stats: dict[str, Any] | None = None,
            backbone: FrozenTowers | None = None, break_lock: bool = False,
            transforms: str = "workers", record: dict[str, Any] | None = None,
            eval_interpolation: str = "bicubic", tokens: str | None = None,
            trust_record: bool = False) -> FeatureCache:
    """Extract (or resume) the spatial tokens of ``dataset`` into the store at ``store_path``.

    ``backbone_params`` is the params' backbone section (Dask workers rebuild the model from it;
    ``backbone`` may pass an already built one for the in-process path). ``batch_size`` counts
    views per forward pass. Eval splits use ``views=1, train_augment=False``. A store with another
    fingerprint raises FingerprintMismatch naming the keys, or is deleted with
    ``restart_on_change``. ``stats``, when given, is filled with images, seconds, images_per_s
    and the bad (path, reason) pairs. The whole run holds the store's writer lock
    (pipeline/store/lock.py; ``break_lock`` takes over one recorded on another host); shards marked
    complete are re-checked cheaply first (recheck_complete), so a lost shard file is redone.
    ``num_workers`` "auto" means one DataLoader worker per core this process may run on.
    ``transforms`` "device" decodes and augments on the backbone's device (pipeline/extraction/device_views.py;
    train views need augment randaugment "torchvision", eval stores take any recipe).
    ``record`` (role and params record, from the stage: expected_fingerprint(params, role).record)
    goes into the fingerprint, once checked against these arguments (role "train" for augmented
    views, the views, seed, augmentation, image size, dtype, dataset, split, backbone params):
    readers trust it, so a record of other params is refused (ParamError naming the key), unless
    ``trust_record`` says to record it as given (test stores standing in for others). Changed inputs
    under the same settings are brought up to date, not refused: images added or removed redo the
    shards from the first changed one, a changed image file redoes its shard, changed annotations
    rewrite the labels only (pipeline/store/update.py, pipeline/extraction/inputs.py).
    ``eval_interpolation`` (bicubic | bilinear) resizes the un-augmented views of an eval store.
    ``tokens`` is the backbone's token method stored (None: its default, `spatial_tokens`); the
    store is (N, K, 1 + h*w, D), h, w = image_size / the backbone's token stride, token 0 the
    class (ViT) or mean (ResNet) token. Before encoding, the bytes still to write are printed and
    compared with the free space of the store's disk (`require_disk_space`).
    """
    if on_bad_image not in ("error", "skip"):
        raise ValueError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
    if not train_augment and views != 1:
        raise ValueError(f"views={views} without augmentation would store {views} identical copies")
    # the built backbone's own stride when one is given (any name), else the params' name's
    given = backbone.stride if backbone is not None else token_stride(backbone_params.name)
    stride = given if isinstance(given, int) else given[0]
    if not isinstance(given, int) and given[0] != given[1]:
        raise ValueError(f"square views need square patches; {backbone_params.name} has {given}")
    if image_size % stride:
        raise ValueError(f"image_size must be a multiple of the backbone's token stride {stride}, "
                         f"got {image_size}")
    augment = {**DEFAULT_AUGMENT, **(augment or {})}
    if record is not None and not trust_record:
        _check_record(record, dataset, backbone_params, train_augment=train_augment, views=views,
                      seed=seed, image_size=image_size, augment=augment, dtype=dtype,
                      batch_size=batch_size, transforms=transforms,
                      eval_interpolation=eval_interpolation, **({"tokens": tokens} if tokens else {}))
    if transforms not in TRANSFORMS:
        raise ValueError(f"transforms must be one of {TRANSFORMS}, got {transforms!r}")
    if transforms == "device" and train_augment and augment["randaugment"] == "package":
        raise ValueError("extract.transforms: device cannot run extract.augment.randaugment: package "
                         "(the `randaugment` package works on PIL images only): use transforms "
                         "workers or randaugment torchvision")
    backbone = backbone or backbone_from_params(backbone_params)
    tokens = tokens or backbone.default_tokens
    grid = image_size // stride
    annotation_files = annotation_records(dataset.sources, dataset.root) if dataset.root else {}
    layout: dict[str, Any] = {
        "ids": [r.image_id for r in dataset.records], "labels": dataset.labels,
        "classnames": dataset.classnames, "views": views, "num_tokens": 1 + grid * grid,
        "dim": backbone.embed_dim, "shard_size": shard_size, "dtype": dtype,
        "compressor": compressor,
        "fingerprint": fingerprint(dataset, backbone, views=views, train_augment=train_augment,
                                seed=seed, image_size=image_size, dtype=dtype, augment=augment,
                                precision=backbone.precision,
                                batch_images=max(1, batch_size // views), transforms=transforms,
                                record=record, annotations=records_digest(annotation_files),
                                eval_interpolation=eval_interpolation, tokens=tokens),
        "annotation_files": annotation_files, "update": True}
    with StoreLock(store_path, break_lock=break_lock):  # one writer per store, for the whole run
        try:
            cache = create_or_open(store_path, **layout)
        except CacheError as err:  # other settings, or an older cache format
            if not restart_on_change:
                if isinstance(err, FingerprintMismatch):
                    raise FingerprintMismatch(f"{err}\n(from the CLI: `pipeline extract-features "
                                              "--restart-on-change`)") from None
                raise
            log.warning("%s\nrestart_on_change: deleting it and starting fresh", err)
            cache = create_or_open(store_path, **layout, overwrite=True)
        for leftover in cache.path.rglob("*.partial"):  # zarr's temp file of a write a kill cut short
            log.info("removing %s, left by an interrupted run", leftover)
            leftover.unlink()
        recheck_complete(cache)
        recheck_inputs(cache, [r.path for r in dataset.records])
        if not cache.has_text_features():
            raw = backbone.class_text_features(cache.classnames, normalise=False)  # each (C, D)
            text = {**{k: torch.nn.functional.normalize(v, dim=-1) for k, v in raw.items()},
                    **{f"raw_{k}": v for k, v in raw.items()}}
            cache.write_text_features({k: v.cpu().numpy() for k, v in text.items()})

        shards = cache.incomplete_shards()
        todo = sum(b - a for a, b in map(cache.shard_range, shards))
        require_disk_space(cache, todo)
        # absolute paths: Dask workers on other hosts may run in another working directory
        spec = ViewSpec(tuple(str(r.path.resolve()) for r in dataset.records), views, train_augment, seed,
                        image_size, augment, transforms=transforms,
                        eval_interpolation=eval_interpolation)
        batch_images = max(1, batch_size // views)
        bar = tqdm(total=todo, unit="img", desc=f"extract {dataset.name}/{dataset.split}",
                   disable=not progress or not todo, smoothing=0.1)
        start = time.perf_counter()
        try:
            if shards and (workers > 0 or scheduler):
                from pipeline.extraction.distributed import extract_distributed
                bad = extract_distributed(cache, shards, spec, backbone_params, backbone.weights_digest,
                                          batch_images=batch_images, on_bad_image=on_bad_image,
                                          workers=workers, scheduler=scheduler, on_images=bar.update,
                                          tokens=tokens)
            elif shards:
                bad = encode_shards(backbone, cache, shards, spec, batch_images=batch_images,
                                    num_workers=resolve_num_workers(num_workers), on_bad_image=on_bad_image,
                                    on_images=bar.update, fail_after_shards=fail_after_shards,
                                    tokens=tokens)
            else:
                bad = []
        finally:
            bar.close()
        seconds = time.perf_counter() - start
        if stats is not None:
            stats.update(images=todo, seconds=seconds, images_per_s=todo / seconds if todo else 0.0,
                         bad=bad)
        cache.require_complete()
        cache.finish_inputs()
        return cache

