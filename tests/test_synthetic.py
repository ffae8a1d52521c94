"""Generated datasets: deterministic, valid COCO/VOC files, and a signal a model can find."""
import hashlib
import json
from pathlib import Path
from xml.etree import ElementTree as ET

import numpy as np
import pytest
from PIL import Image

from pipeline.data.classes import COCO_CATEGORY_IDS, COCO_CLASSES, VOC_CLASSES
from pipeline.data.synthetic import (
    CONVERTIBLE_IMAGE_KINDS,
    CORRUPT_IMAGE_KINDS,
    class_colours,
    make_bad_images,
    make_planted_coco,
    make_voc_layout,
    voc_palette,
)


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return make_planted_coco(tmp_path_factory.mktemp("a"), n_train=10, n_val=4, seed=5)


def test_same_seed_same_bytes_other_seed_differs(planted, tmp_path):
    again = make_planted_coco(tmp_path / "b", n_train=10, n_val=4, seed=5)
    assert _tree_digest(planted) == _tree_digest(again)
    other = make_planted_coco(tmp_path / "c", n_train=10, n_val=4, seed=6)
    first = "train2017/000000000001.jpg"
    assert _tree_digest(other)[first] != _tree_digest(planted)[first]


def test_growing_a_split_keeps_its_first_images(planted, tmp_path):
    small = make_planted_coco(tmp_path / "s", n_train=3, n_val=1, seed=5)
    for name in ("000000000001.jpg", "000000000002.jpg", "000000000003.jpg"):
        old, new = small / "train2017" / name, planted / "train2017" / name
        assert old.read_bytes() == new.read_bytes()


def test_annotations_are_valid_coco_squares(planted):
    data = json.loads((planted / "annotations" / "instances_train2017.json").read_text())
    expected = list(zip(COCO_CATEGORY_IDS[:8], COCO_CLASSES[:8], strict=True))
    assert [(c["id"], c["name"]) for c in data["categories"]] == expected
    per_image = {}
    for a in data["annotations"]:
        xs, ys = np.array(a["segmentation"][0][0::2]), np.array(a["segmentation"][0][1::2])
        shoelace = 0.5 * abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1)))
        x, y, w, h = a["bbox"]
        assert (x, y, x + w, y + h) == (xs.min(), ys.min(), xs.max(), ys.max()) and w == h
        assert a["area"] == shoelace == w * h and a["iscrowd"] == 0
        assert 0.2 * 96 - 1 <= w <= 0.45 * 96 + 1 and x + w <= 96 and y + h <= 96
        per_image[a["image_id"]] = per_image.get(a["image_id"], 0) + 1
    assert len({a["id"] for a in data["annotations"]}) == len(data["annotations"])
    assert set(per_image) == {im["id"] for im in data["images"]}
    assert set(per_image.values()) <= {1, 2, 3}
    val = json.loads((planted / "annotations" / "instances_val2017.json").read_text())
    assert not {im["id"] for im in data["images"]} & {im["id"] for im in val["images"]}


def test_class_colours_are_far_apart():
    for n in (8, 20):
        colours = class_colours(n).astype(int)
        gaps = np.abs(colours[:, None] - colours[None]).sum(-1)  # (C, C) L1 distance
        # A hue step of 360/n degrees moves one channel of a saturated colour by 255 * (360/n) / 60.
        assert gaps[~np.eye(n, dtype=bool)].min() >= 255 * 6 / n - 1  # -1: rounding to uint8
        assert (colours.max(1) == 255).all() and (colours.min(1) == 0).all()  # fully saturated


def test_background_is_neutral_grey(planted):
    data = json.loads((planted / "annotations" / "instances_val2017.json").read_text())
    path = planted / "val2017" / data["images"][0]["file_name"]
    pixels = np.asarray(Image.open(path)).astype(int)
    free = np.ones(pixels.shape[:2], bool)
    for a in data["annotations"]:
        if a["image_id"] == data["images"][0]["id"]:
            x, y, w, h = (int(v) for v in a["bbox"])
            free[max(y - 2, 0):y + h + 2, max(x - 2, 0):x + w + 2] = False
    spread = pixels[free].max(1) - pixels[free].min(1)  # per-pixel channel spread: 0 for grey
    assert spread.mean() < 4 and 60 < pixels[free].mean() < 200


def test_voc_layout_files(tmp_path):
    devkit = make_voc_layout(tmp_path, n_images=6, seed=0, difficult_rate=0.5)
    voc07, voc12 = devkit / "VOC2007", devkit / "VOC2012"
    trainval = (voc07 / "ImageSets" / "Main" / "trainval.txt").read_text().split()
    test = (voc07 / "ImageSets" / "Main" / "test.txt").read_text().split()
    assert len(trainval) == len(test) == 3 and not set(trainval) & set(test)
    difficult = 0
    for image_id in trainval + test:
        root = ET.parse(voc07 / "Annotations" / f"{image_id}.xml").getroot()
        for obj in root.findall("object"):
            assert obj.findtext("name") in VOC_CLASSES
            difficult += int(obj.findtext("difficult"))
        png = Image.open(voc12 / "SegmentationClass" / f"{image_id}.png")
        assert png.mode == "P" and png.getpalette()[:63] == voc_palette()[:63]
        assert 255 in np.asarray(png) and (voc12 / "JPEGImages" / f"{image_id}.jpg").is_file()
    assert difficult > 0


def test_voc_palette_is_the_standard_colour_map():
    palette = np.array(voc_palette()).reshape(256, 3)
    # Known entries of the VOC colour map: background, aeroplane, bicycle, person, void.
    assert palette[0].tolist() == [0, 0, 0] and palette[1].tolist() == [128, 0, 0]
    assert palette[2].tolist() == [0, 128, 0] and palette[15].tolist() == [192, 128, 128]
    assert palette[255].tolist() == [224, 224, 192]


def test_bad_image_kinds_are_all_written(tmp_path):
    files = make_bad_images(tmp_path)
    assert set(files) == set(CORRUPT_IMAGE_KINDS) | set(CONVERTIBLE_IMAGE_KINDS)
    assert not files["missing"].exists() and files["zero_size"].stat().st_size == 0
    assert all(files[k].is_file() for k in files if k != "missing")
    assert Image.open(files["cmyk"]).mode == "CMYK"
    assert Image.open(files["gray16"]).mode.startswith("I")
