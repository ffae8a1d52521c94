"""Stage `extract-features`: the frozen CLIP runs once; everything downstream reads the cache.

Train split: K augmented views per image (extract.views, seeded per image and view). Eval split:
one plain view resized with extract.eval_interpolation. Parameters read: data.*, backbone.*,
extract.*, paths.{data,cache}.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import paths
from pipeline.config.params import as_dict
from pipeline.config.schema import Params
from pipeline.data.datasets import DatasetError, MultiLabelDataset, load_multilabel
from pipeline.extraction.engine import extract
from pipeline.extraction.expected import expected_fingerprint
from pipeline.model.build import backbone_from_params


def load_split(params: Params, role: str) -> MultiLabelDataset:
    """role "train" or "val" -> the dataset split params name for it, with its folders checked."""
    d = params.data
    name = d.dataset
    root = paths.dataset_root(params.paths, name)
    split = {"train": d.train_split, "val": d.val_split}[role]
    dataset = load_multilabel(name, root, split, d.coco_val_images)
    if not dataset.records:
        raise DatasetError(f"{name} split {split!r} under {root} lists no images")
    for folder in sorted({r.path.parent for r in dataset.records}):
        if not folder.is_dir():
            raise DatasetError(f"{name}: image folder {folder} not found "
                               f"(split {split!r} under {root})")
    return dataset


def run(params: Params, split: str = "all", restart_on_change: bool = False,
        break_lock: bool = False) -> dict[str, Any]:
    """Build (or resume) the train and/or val caches; returns a summary per role.

    ``break_lock`` takes over a store's writer lock recorded by a process on another host.
    """
    ex, b = params.extract, params.backbone
    roles = ["train", "val"] if split == "all" else [split]
    datasets = {role: load_split(params, role) for role in roles}  # fail on layout before the model
    backbone = backbone_from_params(b, params=params) if not (ex.workers or ex.scheduler) else None
    summary: dict[str, Any] = {}
    for role, dataset in datasets.items():
        train = role == "train"
        stats: dict[str, Any] = {}
        cache = extract(
            dataset, paths.feature_store(params.paths, role), b, backbone=backbone,
            views=ex.views if train else 1, train_augment=train, seed=ex.seed,
            image_size=b.image_size, shard_size=ex.shard_size, batch_size=ex.batch_size,
            dtype=ex.dtype, compressor=None if ex.compressor in (None, "none") else "zstd",
            num_workers=ex.num_workers, on_bad_image=ex.on_bad_image, augment=as_dict(ex.augment),
            restart_on_change=restart_on_change, workers=ex.workers, scheduler=ex.scheduler,
            stats=stats, break_lock=break_lock, transforms=ex.transforms,
            eval_interpolation=ex.eval_interpolation, tokens=ex.tokens,
            record=expected_fingerprint(params, role).record)  # role and params record
        info = cache.summary()
        summary[role] = {
            "store": info["path"], "images": info["num_images"], "views": info["views"],
            "extracted_now": stats["images"], "seconds": round(stats["seconds"], 2),
            "images_per_s": round(stats["images_per_s"], 2),
            "bytes_per_view": info["nbytes_stored"] / (info["num_images"] * info["views"]),
            "nbytes_stored": info["nbytes_stored"], "num_files": info["num_files"],
            "bad_images": info["bad_images"]}
        s = summary[role]
        print(f"{role}: {s['images']} images x {s['views']} views -> {Path(s['store'])} | "
              f"extracted {s['extracted_now']} images at {s['images_per_s']:.2f} img/s | "
              f"{s['bytes_per_view'] / 1024:.1f} KiB per view on disk, {s['num_files']} files, "
              f"{s['bad_images']} bad images skipped")
    return summary
