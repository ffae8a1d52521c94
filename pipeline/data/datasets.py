"""Dataset readers: official on-disk layouts -> image records plus labels or masks.

Resolved by name in one place (``coco2014``, ``coco2017``, ``voc2007``, ``voc2012``,
``context59``, ``synthetic`` = COCO-2017 layout). Layout problems (missing folders, malformed
JSON/XML/PNG) raise ``DatasetError`` naming the file and the layout expected; unreadable image
files are left to ``pipeline.data.images.load_image`` so one bad JPEG skips one image, not a dataset.

Choices:
- COCO image labels: categories of ALL its annotations, crowd ones included. Training splits keep
  only images with at least one annotation (train2014: 82,081 of 82,783 images, the paper's count);
  evaluation splits keep every image, unannotated ones with all-zero labels (val2014: 40,504), or
  with ``val_images="annotated"`` (param data.coco_val_images) only the annotated ones, as the
  authors' run did (val2014: 40,137). Images are sorted by id.
- VOC2007 difficult objects are skipped: a class present only as difficult is 0 (negative), as
  REFERENCE section 3 says; a class with any non-difficult instance is 1. No -1 labels are produced.
- COCO masks: crowd regions 255 (ignore) first, then objects painted in order of decreasing area
  so small objects stay visible; class value 1 + contiguous index; 0 where no object (background).
- Context-59 masks follow mmseg ``reduce_zero_label``: 0 (background/unlabelled) -> 255, k -> k-1.
"""
from __future__ import annotations

import contextlib
import io
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from xml.etree import ElementTree as ET

import numpy as np
from PIL import Image
from pycocotools.coco import COCO

from pipeline.data.classes import COCO_CATEGORY_IDS, COCO_CLASSES, CONTEXT59_CLASSES, VOC_CLASSES
from pipeline.data.images import load_image
from pipeline.errors import DatasetError

_COCO_YEARS = {"coco2014": "2014", "coco2017": "2017", "synthetic": "2017"}


@dataclass(frozen=True)
class ImageRecord:
    path: Path
    image_id: str


@dataclass
class MultiLabelDataset:
    name: str
    split: str
    classnames: list[str]
    records: list[ImageRecord]
    labels: np.ndarray  # (N, C) int8: 1 positive, 0 negative

    def __len__(self) -> int:
        return len(self.records)

    def image(self, i: int) -> Image.Image:
        return load_image(self.records[i].path)


@dataclass
class SegmentationDataset:
    name: str
    split: str
    classnames: list[str]  # classnames[k] is mask value k
    records: list[ImageRecord]
    has_background: bool  # True: value 0 is "background"; False: value 0 is classnames[0]
    masks: Callable[[int], np.ndarray] = field(repr=False, default=None)

    def __len__(self) -> int:
        return len(self.records)

    def image(self, i: int) -> Image.Image:
        return load_image(self.records[i].path)

    def mask(self, i: int) -> np.ndarray:
        """(H, W) uint8 class indices, 255 = ignore."""
        return self.masks(i)


# ---------------------------------------------------------------- COCO layout

def _coco_paths(name: str, root: Path, split: str) -> tuple[Path, Path]:
    year = _COCO_YEARS[name]
    ann, image_dir = root / "annotations" / f"instances_{split}{year}.json", root / f"{split}{year}"
    expected = (f"expected {root}/annotations/instances_{split}{year}.json "
                f"and {root}/{split}{year}/*.jpg")
    for path in (ann, image_dir):
        if not path.exists():
            raise DatasetError(f"{name}: {path} not found ({expected})")
    return ann, image_dir


def _load_coco(ann: Path) -> COCO:
    try:
        data = json.loads(ann.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(f"{ann}: not readable COCO JSON ({err})") from err
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data, dict)
               or not isinstance(data.get(k), list)]
    if missing:
        raise DatasetError(f"{ann}: not a COCO instances file (missing lists {missing})")
    coco = COCO()
    coco.dataset = data
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            coco.createIndex()
    except (KeyError, TypeError) as err:
        raise DatasetError(f"{ann}: malformed COCO entry (missing {err})") from err
    return coco


def _coco_categories(coco: COCO, name: str, ann: Path) -> tuple[dict[int, int], list[str]]:
    """Category id -> contiguous index (id order), and the names in that order."""
    cats = sorted(coco.dataset["categories"], key=lambda c: c["id"])
    nameless = [c["id"] for c in cats if not isinstance(c.get("name"), str)]
    if nameless:
        raise DatasetError(f"{ann}: category id {nameless[0]} has no 'name' ({len(nameless)} such)")
    ids, names = [c["id"] for c in cats], [c["name"] for c in cats]
    if name != "synthetic" and (tuple(ids) != COCO_CATEGORY_IDS or tuple(names) != COCO_CLASSES):
        raise DatasetError(f"{ann}: categories are not the 80 COCO classes with ids 1..90")
    return {cid: k for k, cid in enumerate(ids)}, names


def _coco_records(coco: COCO, image_dir: Path, ann: Path) -> tuple[list[int], list[ImageRecord]]:
    ids = sorted(coco.imgs)
    missing = [i for i in ids if not isinstance(coco.imgs[i].get("file_name"), str)]
    if missing:
        raise DatasetError(f"{ann}: image entry id {missing[0]} has no 'file_name' "
                           f"({len(missing)} such entries)")
    return ids, [ImageRecord(image_dir / coco.imgs[i]["file_name"], str(i)) for i in ids]


def _check_annotations(coco: COCO, column: dict[int, int], ann: Path) -> None:
    for a in coco.dataset["annotations"]:
        if a["image_id"] not in coco.imgs or a["category_id"] not in column:
            raise DatasetError(f"{ann}: annotation {a.get('id')} refers to unknown image "
                               f"{a['image_id']} or category {a['category_id']}")


def _open_coco(name: str, root: Path, split: str
               ) -> tuple[COCO, dict[int, int], list[str], list[int], list[ImageRecord]]:
    """Load and check one COCO annotation file: (coco, category column, names, image ids, records)."""
    ann, image_dir = _coco_paths(name, root, split)
    coco = _load_coco(ann)
    column, names = _coco_categories(coco, name, ann)
    _check_annotations(coco, column, ann)
    ids, records = _coco_records(coco, image_dir, ann)
    return coco, column, names, ids, records


def _coco_multilabel(name: str, root: Path, split: str, val_images: str = "all") -> MultiLabelDataset:
    coco, column, names, ids, records = _open_coco(name, root, split)
    row = {image_id: r for r, image_id in enumerate(ids)}
    labels = np.zeros((len(ids), len(names)), np.int8)  # (N, C)
    for a in coco.dataset["annotations"]:  # crowd annotations count too
        labels[row[a["image_id"]], column[a["category_id"]]] = 1
    # the paper trains on the 82,081 annotated train2014 images; the authors also validated on the
    # 40,137 annotated val2014 images
    if split == "train" or val_images == "annotated":
        keep = labels.any(axis=1)
        records, labels = [r for r, k in zip(records, keep) if k], labels[keep]
    return MultiLabelDataset(name, split, names, records, labels)


class _CocoMasks:
    """Semantic masks rendered from instance annotations (picklable for worker processes)."""

    def __init__(self, coco: COCO, image_ids: list[int], column: dict[int, int]) -> None:
        self.coco, self.image_ids, self.column = coco, image_ids, column

    def __call__(self, i: int) -> np.ndarray:
        info = self.coco.imgs[self.image_ids[i]]
        mask = np.zeros((info["height"], info["width"]), np.uint8)  # (H, W)
        anns = self.coco.imgToAnns[info["id"]]
        with warnings.catch_warnings():  # pycocotools' decode trips a numpy-2 copy= deprecation
            warnings.simplefilter("ignore", DeprecationWarning)
            for a in (a for a in anns if a.get("iscrowd", 0)):
                mask[self.coco.annToMask(a) > 0] = 255
            objects = [a for a in anns if not a.get("iscrowd", 0)]
            area = [a["area"] if "area" in a else float(self.coco.annToMask(a).sum())
                    for a in objects]
            for k in np.argsort(-np.asarray(area, float), kind="stable"):  # ties keep file order
                a = objects[k]
                mask[self.coco.annToMask(a) > 0] = 1 + self.column[a["category_id"]]
        return mask


def _coco_segmentation(name: str, root: Path, split: str) -> SegmentationDataset:
    coco, column, names, ids, records = _open_coco(name, root, split)
    return SegmentationDataset(name, split, ["background", *names], records, True,
                               _CocoMasks(coco, ids, column))


# ---------------------------------------------------------------- VOC layouts

def _voc_dir(root: Path, year: str, needs: str) -> Path:
    """Accept root = VOC{year} itself, its VOCdevkit parent, or the folder holding VOCdevkit."""
    for candidate in (root, root / f"VOC{year}", root / "VOCdevkit" / f"VOC{year}"):
        if (candidate / needs).is_dir():
            return candidate
    raise DatasetError(f"no PASCAL VOC{year} under {root}: expected "
                       f"{root}/VOCdevkit/VOC{year}/{needs}/ "
                       f"(root may also be VOCdevkit or VOC{year})")


def _split_ids(split_file: Path) -> list[str]:
    if not split_file.is_file():
        raise DatasetError(f"split file {split_file} not found")
    return [line.split()[0] for line in split_file.read_text().splitlines() if line.strip()]


def _voc_labels(xml_path: Path) -> np.ndarray:
    """(C,) int8: 1 if the class has a non-difficult object; difficult-only classes stay 0."""
    try:
        objects = ET.parse(xml_path).getroot().findall("object")
    except (OSError, ET.ParseError) as err:
        raise DatasetError(f"{xml_path}: not readable VOC XML ({err})") from err
    labels = np.zeros(len(VOC_CLASSES), np.int8)
    for obj in objects:
        cls = (obj.findtext("name") or "").strip()
        if cls not in VOC_CLASSES:
            raise DatasetError(f"{xml_path}: unknown VOC class {cls!r}")
        difficult = (obj.findtext("difficult") or "0").strip()
        if difficult not in ("0", "1"):
            raise DatasetError(f"{xml_path}: <difficult> must be 0 or 1, got {difficult!r}")
        if difficult == "0":
            labels[VOC_CLASSES.index(cls)] = 1
    return labels


def _voc2007_multilabel(root: Path, split: str) -> MultiLabelDataset:
    voc = _voc_dir(root, "2007", "ImageSets/Main")
    ids = _split_ids(voc / "ImageSets" / "Main" / f"{split}.txt")
    labels = np.stack([_voc_labels(voc / "Annotations" / f"{i}.xml") for i in ids]) if ids \
        else np.zeros((0, len(VOC_CLASSES)), np.int8)
    records = [ImageRecord(voc / "JPEGImages" / f"{i}.jpg", i) for i in ids]
    return MultiLabelDataset("voc2007", split, list(VOC_CLASSES), records, labels)


class _PngMasks:
    """Index PNG masks (palette or 8-bit grey); optional mmseg reduce_zero_label."""

    def __init__(self, paths: list[Path], num_values: int, reduce_zero_label: bool) -> None:
        self.paths, self.num_values, self.reduce_zero_label = paths, num_values, reduce_zero_label

    def __call__(self, i: int) -> np.ndarray:
        path = self.paths[i]
        try:
            with Image.open(path) as img:
                if img.mode not in ("P", "L"):
                    raise DatasetError(f"{path}: mask mode {img.mode}, expected a palette (P) "
                                       "or 8-bit (L) PNG of class indices, not colours")
                mask = np.array(img, dtype=np.uint8)  # (H, W) palette indices, not colours
        except DatasetError:
            raise
        except (OSError, ValueError, SyntaxError) as err:
            raise DatasetError(f"{path}: mask not readable ({err})") from err
        if self.reduce_zero_label:  # mmseg: 0 -> 255, k -> k - 1, 255 stays 255
            mask[mask == 0] = 255
            mask = mask - 1
            mask[mask == 254] = 255
        bad = (mask >= self.num_values) & (mask != 255)
        if bad.any():
            raise DatasetError(f"{path}: mask value {int(mask[bad].max())} outside "
                               f"0..{self.num_values - 1} and 255")
        return mask


def _voc_segmentation(name: str, root: Path, split: str) -> SegmentationDataset:
    if name == "voc2012":
        voc = _voc_dir(root, "2012", "ImageSets/Segmentation")
        sets, mask_dir = "Segmentation", "SegmentationClass"
        classes, background, reduce_zero = ["background", *VOC_CLASSES], True, False
    else:
        voc, sets, mask_dir = (_voc_dir(root, "2010", "ImageSets/SegmentationContext"),
                               "SegmentationContext", "SegmentationClassContext")
        classes, background, reduce_zero = list(CONTEXT59_CLASSES), False, True
    ids = _split_ids(voc / "ImageSets" / sets / f"{split}.txt")
    if not (voc / mask_dir).is_dir():
        raise DatasetError(f"{name}: mask folder {voc / mask_dir} not found")
    records = [ImageRecord(voc / "JPEGImages" / f"{i}.jpg", i) for i in ids]
    masks = _PngMasks([voc / mask_dir / f"{i}.png" for i in ids], len(classes), reduce_zero)
    return SegmentationDataset(name, split, classes, records, background, masks)


# ---------------------------------------------------------------- by name

COCO_VAL_IMAGES = ("annotated", "all")


def load_multilabel(name: str, root: str | Path, split: str, val_images: str = "all") -> MultiLabelDataset:
    """Image-level labels of ``split``: coco2014, coco2017, synthetic (COCO-2017), voc2007.

    val_images (COCO layouts, splits other than train): "all" images, or only the "annotated" ones
    (data.coco_val_images; train splits always keep only annotated images)."""
    if val_images not in COCO_VAL_IMAGES:
        raise ValueError(f"val_images must be one of {COCO_VAL_IMAGES}, got {val_images!r}")
    root = Path(root)
    if name in _COCO_YEARS:
        return _coco_multilabel(name, root, split, val_images)
    if name == "voc2007":
        return _voc2007_multilabel(root, split)
    raise DatasetError(f"no multi-label reader for dataset {name!r} "
                       f"(known: {sorted([*_COCO_YEARS, 'voc2007'])})")


def load_segmentation(name: str, root: str | Path, split: str) -> SegmentationDataset:
    """Semantic masks of ``split``: voc2012, coco2017, synthetic (COCO-2017 layout), context59."""
    root = Path(root)
    if name in ("coco2017", "synthetic"):
        return _coco_segmentation(name, root, split)
    if name in ("voc2012", "context59"):
        return _voc_segmentation(name, root, split)
    raise DatasetError(f"no segmentation reader for dataset {name!r} "
                       "(known: coco2017, context59, synthetic, voc2012)")
