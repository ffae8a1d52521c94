"""COCO layout (`annotations/instances_<split><year>.json`, `<split><year>/*.jpg`): image-level labels
and semantic masks rendered from instance annotations. Choices: see pipeline/data/datasets.py."""
from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO

from pipeline.data.classes import COCO_CATEGORY_IDS, COCO_CLASSES
from pipeline.data.records import ImageRecord, MultiLabelDataset, SegmentationDataset
from pipeline.errors import DatasetError

COCO_YEARS = {"coco2014": "2014", "coco2017": "2017", "synthetic": "2017"}


def coco_annotation_file(name: str, root: Path, split: str) -> Path:
    """The instances file a COCO-layout split's labels come from (whether or not it exists)."""
    return root / "annotations" / f"instances_{split}{COCO_YEARS[name]}.json"


def _coco_paths(name: str, root: Path, split: str) -> tuple[Path, Path]:
    year = COCO_YEARS[name]
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


def coco_multilabel(name: str, root: Path, split: str, val_images: str = "all") -> MultiLabelDataset:
    coco, column, names, ids, records = _open_coco(name, root, split)
    row = {image_id: r for r, image_id in enumerate(ids)}
    labels = np.zeros((len(ids), len(names)), np.int8)  # (N, C)
    for a in coco.dataset["annotations"]:  # crowd annotations count too
        labels[row[a["image_id"]], column[a["category_id"]]] = 1
    # the paper trains on the 82,081 annotated train2014 images; the authors also validated on the
    # 40,137 annotated val2014 images
    if split == "train" or val_images == "annotated":
        keep = labels.any(axis=1)
        records, labels = [r for r, k in zip(records, keep) if k], labels[keep]  # type: ignore[arg-type]  # numpy: any(axis=1) is an array
    return MultiLabelDataset(name, split, names, records, labels, root,
                             [coco_annotation_file(name, root, split)])


COCO_MASKS = ("official", "released")


def _mask_sources(coco: COCO) -> dict[int, int | None]:
    """For the "released" masks: image id -> the id whose annotations its mask shows. Walking the
    file's `images` list in order, an annotated image shows its own; an unannotated one keeps the
    last annotated image's mask before it (None: there is none, the mask is all background)."""
    sources: dict[int, int | None] = {}
    last = None
    for info in coco.dataset["images"]:
        if coco.imgToAnns.get(info["id"]):
            last = info["id"]
        sources[info["id"]] = last
    return sources


class _CocoMasks:
    """Semantic masks rendered from instance annotations (picklable for worker processes).

    masks "official" (default): crowd regions 255 (ignored) first, then objects painted in order
    of decreasing area (ties in file order) so small objects stay visible; an image without
    annotations is all background. "released" (the authors' cocoper.py, REFERENCE 4.3): every
    annotation painted as its class in annotation-file order, later ones winning, crowd ones
    included; an image without annotations keeps the mask of the last annotated image before it
    in the file's `images` order (at that image's size: the score maps are upsampled to it).
    """

    def __init__(self, coco: COCO, image_ids: list[int], column: dict[int, int],
                 masks: str = "official") -> None:
        if masks not in COCO_MASKS:
            raise ValueError(f"COCO masks must be one of {COCO_MASKS}, got {masks!r}")
        self.coco, self.image_ids, self.column, self.masks = coco, image_ids, column, masks
        self.sources = _mask_sources(coco) if masks == "released" else None

    def __call__(self, i: int) -> np.ndarray:
        image_id = self.image_ids[i]
        with warnings.catch_warnings():  # pycocotools' decode trips a numpy-2 copy= deprecation
            warnings.simplefilter("ignore", DeprecationWarning)
            if self.sources is None:
                return self._official(image_id)
            return self._released(image_id)

    def _official(self, image_id: int) -> np.ndarray:
        info = self.coco.imgs[image_id]
        mask = np.zeros((info["height"], info["width"]), np.uint8)  # (H, W)
        anns = self.coco.imgToAnns.get(image_id, [])
        for a in (a for a in anns if a.get("iscrowd", 0)):
            mask[self.coco.annToMask(a) > 0] = 255
        objects = [a for a in anns if not a.get("iscrowd", 0)]
        area = [a["area"] if "area" in a else float(self.coco.annToMask(a).sum()) for a in objects]
        for k in np.argsort(-np.asarray(area, float), kind="stable"):  # ties keep file order
            a = objects[k]
            mask[self.coco.annToMask(a) > 0] = 1 + self.column[a["category_id"]]
        return mask

    def _released(self, image_id: int) -> np.ndarray:
        assert self.sources is not None  # released masks only
        source = self.sources.get(image_id)
        info = self.coco.imgs[image_id if source is None else source]
        mask = np.zeros((info["height"], info["width"]), np.uint8)  # (H, W) of the source image
        if source is not None:
            for a in self.coco.imgToAnns[source]:  # annotation-file order; crowd ones too
                mask[self.coco.annToMask(a) > 0] = 1 + self.column[a["category_id"]]
        return mask


def coco_segmentation(name: str, root: Path, split: str, masks: str = "official") -> SegmentationDataset:
    """COCO-2017 semantic masks; `masks` "official" or "released" (see _CocoMasks)."""
    if masks not in COCO_MASKS:
        raise ValueError(f"COCO masks must be one of {COCO_MASKS}, got {masks!r}")
    coco, column, names, ids, records = _open_coco(name, root, split)
    return SegmentationDataset(name, split, ["background", *names], records, True,
                               _CocoMasks(coco, ids, column, masks))
