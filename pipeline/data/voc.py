"""PASCAL VOC layouts (VOC2007 image labels from XML, VOC2012 and Context-59 index-PNG masks).
Choices: see pipeline/data/datasets.py."""
from __future__ import annotations

from pathlib import Path
from xml.etree import ElementTree as ET

import numpy as np
from PIL import Image

from pipeline.data.classes import CONTEXT59_CLASSES, VOC_CLASSES
from pipeline.data.records import ImageRecord, MultiLabelDataset, SegmentationDataset
from pipeline.errors import DatasetError


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


def voc2007_annotation_files(root: Path, split: str) -> list[Path]:
    """The split file and the XML file of each image it lists: what a VOC2007 split's labels
    come from (the XML files of a split file that cannot be read are not listed)."""
    main = _voc_dir(root, "2007", "ImageSets/Main")
    split_file = main / "ImageSets" / "Main" / f"{split}.txt"
    try:
        ids = _split_ids(split_file)
    except DatasetError:
        return [split_file]
    return [split_file, *(main / "Annotations" / f"{i}.xml" for i in ids)]


def voc2007_multilabel(root: Path, split: str) -> MultiLabelDataset:
    voc = _voc_dir(root, "2007", "ImageSets/Main")
    ids = _split_ids(voc / "ImageSets" / "Main" / f"{split}.txt")
    labels = np.stack([_voc_labels(voc / "Annotations" / f"{i}.xml") for i in ids]) if ids \
        else np.zeros((0, len(VOC_CLASSES)), np.int8)
    records = [ImageRecord(voc / "JPEGImages" / f"{i}.jpg", i) for i in ids]
    sources = [voc / "ImageSets" / "Main" / f"{split}.txt", *(voc / "Annotations" / f"{i}.xml" for i in ids)]
    return MultiLabelDataset("voc2007", split, list(VOC_CLASSES), records, labels, root, sources)


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


def voc_segmentation(name: str, root: Path, split: str) -> SegmentationDataset:
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
