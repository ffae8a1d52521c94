"""Generated datasets in the official on-disk layouts, for tests and the smoke profile.

Planted signal: class k is a solid square of a class-specific saturated colour (hue k/C) on a
neutral grey noisy background, 1-3 squares per image, side 20-45 % of the image, so a model
that learns anything localised can separate the classes (docs/TESTING.md).
Each image is a pure function of (seed, split, index): growing a split never changes old images.
Squares are painted largest first, the order in which the COCO mask reader paints annotations,
so image pixels and masks agree where squares overlap.
"""
from __future__ import annotations

import colorsys
import io
import json
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree as ET

import numpy as np
from PIL import Image

from pipeline.data.classes import COCO_CATEGORY_IDS, COCO_CLASSES, CONTEXT59_CLASSES, VOC_CLASSES

JPEG_QUALITY = 95
_SPLIT_CODES = {"train": 0, "val": 1, "trainval": 2, "test": 3}


@dataclass(frozen=True)
class PlantedObject:
    """A square occupying pixels [x0, x0+side) x [y0, y0+side); cls indexes the class list."""
    cls: int
    x0: int
    y0: int
    side: int
    difficult: bool = False

    @property
    def polygon(self) -> list[float]:
        x1, y1 = self.x0 + self.side, self.y0 + self.side
        return [float(v) for v in (self.x0, self.y0, x1, self.y0, x1, y1, self.x0, y1)]


def class_colours(num_classes: int) -> np.ndarray:
    """(C, 3) uint8 fully saturated colours with hues evenly spaced around the circle."""
    rgb = [colorsys.hsv_to_rgb(k / num_classes, 1.0, 1.0) for k in range(num_classes)]
    return np.rint(np.array(rgb) * 255).astype(np.uint8)


def planted_sample(seed: int, split: str, index: int, image_size: int = 96, num_classes: int = 8,
                   difficult_rate: float = 0.0) -> tuple[np.ndarray, list[PlantedObject]]:
    """One image (H, W, 3) uint8 and its squares, largest first."""
    rng = np.random.default_rng([seed, _SPLIT_CODES[split], index])
    grey = rng.uniform(100, 156)
    noise = rng.normal(0.0, 12.0, size=(image_size, image_size, 1))  # same on R, G, B: neutral
    pixels = np.repeat(np.clip(np.rint(grey + noise), 0, 255), 3, axis=2).astype(np.uint8)
    objects = []
    for _ in range(int(rng.integers(1, 4))):
        side = int(rng.integers(round(0.20 * image_size), round(0.45 * image_size) + 1))
        x0, y0 = (int(v) for v in rng.integers(0, image_size - side + 1, size=2))
        objects.append(PlantedObject(int(rng.integers(num_classes)), x0, y0, side,
                                     bool(rng.random() < difficult_rate)))
    objects.sort(key=lambda o: -o.side)
    colours = class_colours(num_classes)
    for o in objects:
        pixels[o.y0:o.y0 + o.side, o.x0:o.x0 + o.side] = colours[o.cls]
    return pixels, objects


def make_planted_coco(root: str | Path, n_train: int, n_val: int, num_classes: int = 8,
                      image_size: int = 96, seed: int = 0) -> Path:
    """Write a COCO-2017-layout planted-signal dataset; categories are the first ``num_classes``
    real COCO classes (real ids and names). Returns ``root``."""
    if not 1 <= num_classes <= len(COCO_CLASSES):
        raise ValueError(f"num_classes must be in 1..{len(COCO_CLASSES)}, got {num_classes}")
    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    categories = [{"id": COCO_CATEGORY_IDS[k], "name": COCO_CLASSES[k], "supercategory": "planted"}
                  for k in range(num_classes)]
    ann_id = 1
    for split, count, first_id in (("train", n_train, 1), ("val", n_val, 1 + n_train)):
        image_dir = root / f"{split}2017"
        image_dir.mkdir(exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            image_id = first_id + i
            pixels, objects = planted_sample(seed, split, i, image_size, num_classes)
            file_name = f"{image_id:012d}.jpg"
            Image.fromarray(pixels).save(image_dir / file_name, quality=JPEG_QUALITY)
            images.append({"id": image_id, "file_name": file_name,
                           "height": image_size, "width": image_size})
            for o in objects:
                annotations.append({
                    "id": ann_id, "image_id": image_id, "category_id": COCO_CATEGORY_IDS[o.cls],
                    "segmentation": [o.polygon], "area": float(o.side * o.side),
                    "bbox": [float(o.x0), float(o.y0), float(o.side), float(o.side)], "iscrowd": 0})
                ann_id += 1
        payload = {"info": {"description": f"planted-signal synthetic data, seed {seed}"},
                   "images": images, "annotations": annotations, "categories": categories}
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(payload))
    return root


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map (bit-interleaved), flattened to 768 ints for ``putpalette``."""
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette += [r, g, b]
    return palette


def _voc_xml(image_id: str, size: int, objects: list[PlantedObject]) -> bytes:
    ann = ET.Element("annotation")
    ET.SubElement(ann, "filename").text = f"{image_id}.jpg"
    sz = ET.SubElement(ann, "size")
    for tag, value in (("width", size), ("height", size), ("depth", 3)):
        ET.SubElement(sz, tag).text = str(value)
    for o in objects:
        obj = ET.SubElement(ann, "object")
        ET.SubElement(obj, "name").text = VOC_CLASSES[o.cls]
        ET.SubElement(obj, "difficult").text = str(int(o.difficult))
        box = ET.SubElement(obj, "bndbox")  # VOC boxes are 1-based and inclusive
        for tag, value in (("xmin", o.x0 + 1), ("ymin", o.y0 + 1),
                           ("xmax", o.x0 + o.side), ("ymax", o.y0 + o.side)):
            ET.SubElement(box, tag).text = str(value)
    return ET.tostring(ann)


def _index_mask(size: int, objects: list[PlantedObject], offset: int) -> np.ndarray:
    """(H, W) uint8: 0 background, cls + offset inside squares, 255 on a 2-px ring at each edge."""
    mask = np.zeros((size, size), np.uint8)
    for o in objects:
        x0, y0, x1, y1 = o.x0, o.y0, o.x0 + o.side, o.y0 + o.side
        mask[max(y0 - 1, 0):y1 + 1, max(x0 - 1, 0):x1 + 1] = 255
        mask[y0 + 1:y1 - 1, x0 + 1:x1 - 1] = o.cls + offset
    return mask


def _write_split_file(path: Path, ids: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{i}\n" for i in ids))


def make_voc_layout(root: str | Path, n_images: int = 8, image_size: int = 64, seed: int = 0,
                    difficult_rate: float = 0.3) -> Path:
    """Write VOCdevkit/VOC2007 (XML, trainval/test halves, some difficult objects) and
    VOCdevkit/VOC2012 segmentation (palette PNGs with a 255 ring; train/val halves) of the same
    planted images. Image i's ground truth is ``planted_sample(seed, "trainval", i, image_size,
    20, difficult_rate)``. Returns the VOCdevkit folder."""
    devkit = Path(root) / "VOCdevkit"
    ids = [f"2007_{i:06d}" for i in range(n_images)]
    half = (n_images + 1) // 2
    for year in ("VOC2007", "VOC2012"):
        for sub in ("JPEGImages", "Annotations", "SegmentationClass"):
            (devkit / year / sub).mkdir(parents=True, exist_ok=True)
    palette = voc_palette()
    for i, image_id in enumerate(ids):
        pixels, objects = planted_sample(seed, "trainval", i, image_size, len(VOC_CLASSES),
                                         difficult_rate)
        for year in ("VOC2007", "VOC2012"):
            Image.fromarray(pixels).save(devkit / year / "JPEGImages" / f"{image_id}.jpg",
                                         quality=JPEG_QUALITY)
        (devkit / "VOC2007" / "Annotations" / f"{image_id}.xml").write_bytes(
            _voc_xml(image_id, image_size, objects))
        mask = Image.fromarray(_index_mask(image_size, objects, offset=1), "P")
        mask.putpalette(palette)
        mask.save(devkit / "VOC2012" / "SegmentationClass" / f"{image_id}.png")
    main = devkit / "VOC2007" / "ImageSets" / "Main"
    seg = devkit / "VOC2012" / "ImageSets" / "Segmentation"
    _write_split_file(main / "trainval.txt", ids[:half])
    _write_split_file(main / "test.txt", ids[half:])
    _write_split_file(seg / "train.txt", ids[:half])
    _write_split_file(seg / "val.txt", ids[half:])
    _write_split_file(seg / "trainval.txt", ids)
    return devkit


def make_context_layout(root: str | Path, n_images: int = 4, image_size: int = 64,
                        seed: int = 0) -> Path:
    """Write the mmseg PASCAL Context layout (VOCdevkit/VOC2010, SegmentationClassContext 8-bit
    PNGs: 0 background, 1..59 classes, no 255) with all images in train.txt and val.txt.
    Ground truth: ``planted_sample(seed, "val", i, image_size, 59)``. Returns the VOC2010 folder."""
    voc2010 = Path(root) / "VOCdevkit" / "VOC2010"
    for sub in ("JPEGImages", "SegmentationClassContext"):
        (voc2010 / sub).mkdir(parents=True, exist_ok=True)
    ids = [f"2008_{i:06d}" for i in range(n_images)]
    for i, image_id in enumerate(ids):
        pixels, objects = planted_sample(seed, "val", i, image_size, len(CONTEXT59_CLASSES))
        Image.fromarray(pixels).save(voc2010 / "JPEGImages" / f"{image_id}.jpg",
                                     quality=JPEG_QUALITY)
        mask = np.zeros((image_size, image_size), np.uint8)
        for o in objects:
            mask[o.y0:o.y0 + o.side, o.x0:o.x0 + o.side] = o.cls + 1
        Image.fromarray(mask, "L").save(voc2010 / "SegmentationClassContext" / f"{image_id}.png")
    for split in ("train", "val"):
        _write_split_file(voc2010 / "ImageSets" / "SegmentationContext" / f"{split}.txt", ids)
    return voc2010


CORRUPT_IMAGE_KINDS = ("missing", "zero_size", "random_bytes", "text_as_jpg", "truncated_jpeg",
                       "corrupt_png", "bomb_png")
CONVERTIBLE_IMAGE_KINDS = ("grayscale", "cmyk", "rgba", "la", "palette_transparent", "gray16",
                           "bilevel", "jpeg_named_png")


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def make_bad_images(directory: str | Path, seed: int = 0) -> dict[str, Path]:
    """Files for fault tests, keyed by kind: ``CORRUPT_IMAGE_KINDS`` must raise BadImageError,
    ``CONVERTIBLE_IMAGE_KINDS`` must load as RGB. "missing" is a path that is never created."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:48]  # a smooth image, so JPEG round trips stay close to it
    rgb = Image.fromarray(np.stack([xx * 5, yy * 7, 255 - xx * 3], axis=2).astype(np.uint8))
    jpeg, png = io.BytesIO(), io.BytesIO()
    rgb.save(jpeg, "JPEG", quality=90)
    rgb.save(png, "PNG")
    paths = {kind: d / name for kind, name in (
        ("missing", "missing.jpg"), ("zero_size", "zero_size.jpg"), ("random_bytes", "random.png"),
        ("text_as_jpg", "text.jpg"), ("truncated_jpeg", "truncated.jpg"),
        ("corrupt_png", "corrupt.png"),
        ("bomb_png", "bomb.png"), ("grayscale", "grayscale.jpg"), ("cmyk", "cmyk.jpg"),
        ("rgba", "rgba.png"), ("la", "la.png"), ("palette_transparent", "palette.png"),
        ("gray16", "gray16.png"), ("bilevel", "bilevel.png"), ("jpeg_named_png", "jpeg_named.png"))}
    paths["zero_size"].write_bytes(b"")
    paths["random_bytes"].write_bytes(rng.integers(0, 256, size=4096, dtype=np.uint8).tobytes())
    paths["text_as_jpg"].write_text("this is not an image\n")
    paths["truncated_jpeg"].write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) * 6 // 10])
    # Valid PNG signature, header and CRCs, but the compressed pixel stream is random bytes.
    ihdr = struct.pack(">IIBBBBB", 48, 32, 8, 2, 0, 0, 0)
    garbage = rng.integers(0, 256, size=512, dtype=np.uint8).tobytes()
    sig = b"\x89PNG\r\n\x1a\n"
    paths["corrupt_png"].write_bytes(sig + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", garbage)
                                     + _png_chunk(b"IEND", b""))
    # Declares 100000 x 100000 RGB (30 GB decoded) in a file of a few dozen bytes.
    bomb_ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    paths["bomb_png"].write_bytes(sig + _png_chunk(b"IHDR", bomb_ihdr)
                                  + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
                                  + _png_chunk(b"IEND", b""))
    rgb.convert("L").save(paths["grayscale"], quality=90)
    rgb.convert("CMYK").save(paths["cmyk"], quality=90)
    rgb.convert("RGBA").save(paths["rgba"])
    rgb.convert("LA").save(paths["la"])
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    palette.save(paths["palette_transparent"], transparency=0)
    gray16 = np.asarray(rgb.convert("L"), dtype=np.uint16) * 257  # 0..255 -> 0..65535
    Image.fromarray(gray16).save(paths["gray16"])
    rgb.convert("1").save(paths["bilevel"])
    paths["jpeg_named_png"].write_bytes(jpeg.getvalue())
    return paths
