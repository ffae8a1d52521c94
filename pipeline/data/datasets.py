"""Dataset readers by name: official on-disk layouts -> image records plus labels or masks.

Resolved by name in one place (``coco2014``, ``coco2017``, ``voc2007``, ``voc2012``,
``context59``, ``synthetic`` = COCO-2017 layout). Layout problems (missing folders, malformed
JSON/XML/PNG) raise ``DatasetError`` naming the file and the layout expected; unreadable image
files are left to ``pipeline.data.images.load_image`` so one bad JPEG skips one image, not a dataset.

Choices:
- COCO image labels: categories of ALL its annotations, crowd ones included. Training splits keep
  only images with at least one annotation (train2014: 82,081 of 82,783 images, the paper's count);
  evaluation splits keep every image, unannotated ones with all-zero labels (val2014: 40,504), or
  with ``val_images="annotated"`` (param data.coco_val_images) only the annotated ones, as the
  authors' code does (val2014: 40,137). Images are sorted by id.
- VOC2007 difficult objects are skipped: a class present only as difficult is 0 (negative), as
  docs/METHOD.md "Datasets and labels" says; a class with any non-difficult instance is 1. No -1 labels are produced.
- COCO masks: crowd regions 255 (ignore) first, then objects painted in order of decreasing area
  so small objects stay visible; class value 1 + contiguous index; 0 where no object (background).
  ``coco_masks="released"`` renders them as the authors' script did instead (pipeline/data/coco.py).
- Context-59 masks follow mmseg ``reduce_zero_label``: 0 (background/unlabelled) -> 255, k -> k-1.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

from pipeline.data.coco import COCO_YEARS, coco_annotation_file, coco_multilabel, coco_segmentation
from pipeline.data.records import (  # noqa: F401  (the readers' types, importable from here)
    ImageRecord,
    MultiLabelDataset,
    SegmentationDataset,
)
from pipeline.data.voc import voc2007_annotation_files, voc2007_multilabel, voc_segmentation
from pipeline.errors import DatasetError

COCO_VAL_IMAGES = ("annotated", "all")


def link_problem(path: str | Path) -> str | None:
    """What makes `path` unreachable through a symbolic link on the way (a link that loops, or that
    points at nothing), or None; a path that is simply absent is the callers' "not found"."""
    path = Path(path)
    for p in [*reversed(path.parents), path]:  # the outermost broken link first
        if not p.is_symlink():
            continue
        try:
            os.stat(p)
        except OSError as err:
            if err.errno == errno.ELOOP:
                return f"{p} is a symbolic link that loops (-> {os.readlink(p)})"
            if err.errno in (errno.ENOENT, errno.ENOTDIR):
                return f"{p} is a symbolic link to {os.readlink(p)}, which does not exist"
    return None


def require_reachable(root: str | Path) -> None:
    """DatasetError naming the broken link on the way to a dataset root (see link_problem)."""
    problem = link_problem(root)
    if problem:
        on_the_way = "" if problem.startswith(f"{root} ") else f", on the way to dataset folder {root}"
        raise DatasetError(f"{problem}{on_the_way}: make it point at the dataset's folder, or remove it "
                           "(`pipeline download` then fetches or generates the data there)")


def load_multilabel(name: str, root: str | Path, split: str, val_images: str = "all") -> MultiLabelDataset:
    """Image-level labels of ``split``: coco2014, coco2017, synthetic (COCO-2017), voc2007.

    val_images (COCO layouts, splits other than train): "all" images, or only the "annotated" ones
    (data.coco_val_images; train splits always keep only annotated images)."""
    if val_images not in COCO_VAL_IMAGES:
        raise ValueError(f"val_images must be one of {COCO_VAL_IMAGES}, got {val_images!r}")
    root = Path(root)
    require_reachable(root)
    if name in COCO_YEARS:
        return coco_multilabel(name, root, split, val_images)
    if name == "voc2007":
        return voc2007_multilabel(root, split)
    raise DatasetError(f"no multi-label reader for dataset {name!r} "
                       f"(known: {sorted([*COCO_YEARS, 'voc2007'])})")


def annotation_files(name: str, root: str | Path, split: str) -> list[Path]:
    """The files ``load_multilabel(name, root, split)`` takes its image list and labels from,
    found without parsing them (a feature store records and compares their digests)."""
    root = Path(root)
    if name in COCO_YEARS:
        return [coco_annotation_file(name, root, split)]
    if name == "voc2007":
        return voc2007_annotation_files(root, split)
    raise DatasetError(f"no multi-label reader for dataset {name!r} "
                       f"(known: {sorted([*COCO_YEARS, 'voc2007'])})")


def load_segmentation(name: str, root: str | Path, split: str, coco_masks: str = "official"
                      ) -> SegmentationDataset:
    """Semantic masks of ``split``: voc2012, coco2017, synthetic (COCO-2017 layout), context59.

    coco_masks (COCO layouts only; other datasets ignore it): "official" or "released", see
    pipeline/data/coco.py _CocoMasks."""
    root = Path(root)
    require_reachable(root)
    if name in ("coco2017", "synthetic"):
        return coco_segmentation(name, root, split, coco_masks)
    if name in ("voc2012", "context59"):
        return voc_segmentation(name, root, split)
    raise DatasetError(f"no segmentation reader for dataset {name!r} "
                       "(known: coco2017, context59, synthetic, voc2012)")
