"""Dataset readers against hand-written and generated annotations, and real samples if present."""
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from matplotlib.path import Path as PolygonPath
from PIL import Image
from pycocotools import mask as mask_utils
from scipy.ndimage import binary_erosion

from pipeline.data.classes import (
    COCO_CATEGORY_IDS,
    COCO_CLASSES,
    CONTEXT59_CLASSES,
    CONTEXT_TO_COCO,
    CONTEXT_UNSEEN_IN_COCO,
    VOC_CLASSES,
    classnames,
)
from pipeline.data.datasets import DatasetError, load_multilabel, load_segmentation
from pipeline.data.synthetic import (
    class_colours,
    make_context_layout,
    make_planted_coco,
    make_voc_layout,
    planted_sample,
    voc_palette,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
COCO_TINY, VOC_SAMPLES = SHARED / "coco2017-tiny", SHARED / "voc2012-seg-samples"


def test_class_lists_and_the_30_context_classes_unseen_in_coco():
    assert len(COCO_CLASSES) == len(set(COCO_CLASSES)) == 80 and len(VOC_CLASSES) == 20
    assert list(COCO_CATEGORY_IDS) == sorted(set(COCO_CATEGORY_IDS)) and COCO_CATEGORY_IDS[-1] == 90
    assert len(set(range(1, 91)) - set(COCO_CATEGORY_IDS)) == 10
    assert len(CONTEXT59_CLASSES) == len(set(CONTEXT59_CLASSES)) == 59
    assert set(CONTEXT_TO_COCO) <= set(CONTEXT59_CLASSES)
    assert all(set(v) <= set(COCO_CLASSES) for v in CONTEXT_TO_COCO.values())
    seen = [c for c in CONTEXT59_CLASSES if c in COCO_CLASSES or c in CONTEXT_TO_COCO]
    assert len(seen) == 29 and len(CONTEXT_UNSEEN_IN_COCO) == 30
    assert set(CONTEXT_UNSEEN_IN_COCO) == set(CONTEXT59_CLASSES) - set(seen)
    assert not set(CONTEXT_UNSEEN_IN_COCO) & set(COCO_CLASSES)
    assert {"sky", "wall", "road", "grass"} <= set(CONTEXT_UNSEEN_IN_COCO)
    assert classnames("synthetic") == list(COCO_CLASSES[:8])
    assert classnames("voc2012") == list(VOC_CLASSES)
    assert classnames("coco2014") == classnames("coco2017") and len(classnames("context59")) == 59
    with pytest.raises(KeyError, match="imagenet"):
        classnames("imagenet")


def _cid(name: str) -> int:
    return COCO_CATEGORY_IDS[COCO_CLASSES.index(name)]


def _ann(ann_id, image_id, name, segmentation, area, iscrowd=0):
    return {"id": ann_id, "image_id": image_id, "category_id": _cid(name),
            "segmentation": segmentation, "area": area, "iscrowd": iscrowd}


def _square(x, y, s):
    return [[x, y, x + s, y, x + s, y + s, x, y + s]]


def _write_coco_val(root: Path, images: list[dict], anns: list[dict]) -> Path:
    """A COCO-2017 layout under `root` whose val annotation file holds `images` and `anns`."""
    cats = [{"id": c, "name": n} for c, n in zip(COCO_CATEGORY_IDS, COCO_CLASSES, strict=True)]
    (root / "annotations").mkdir()
    (root / "val2017").mkdir()
    (root / "annotations" / "instances_val2017.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return root


@pytest.fixture
def coco_root(tmp_path):
    """Ids out of order, a crowd (uncompressed RLE) car, an image without annotations."""
    crowd = np.zeros((20, 30), np.uint8)
    crowd[0:4, 20:30] = 1
    counts = [int(c) for c in _rle_counts(crowd)]
    with warnings.catch_warnings():  # pycocotools decode under numpy 2
        warnings.simplefilter("ignore", DeprecationWarning)
        rle = mask_utils.frPyObjects({"size": [20, 30], "counts": counts}, 20, 30)
        decoded = mask_utils.decode(rle)
    assert np.array_equal(decoded, crowd)  # the hand-made RLE is what it claims to be
    crowd_rle = {"size": [20, 30], "counts": counts}
    anns = [_ann(1, 30, "dog", _square(0, 0, 5), 25),
            _ann(2, 10, "person", _square(2, 2, 12), 144),
            _ann(3, 10, "car", crowd_rle, 40, iscrowd=1),
            _ann(4, 10, "tie", _square(5, 5, 3), 9),
            _ann(5, 30, "toothbrush", _square(6, 6, 2), 4),
            _ann(6, 30, "dog", _square(9, 9, 4), 16)]
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "height": 20, "width": 30}
              for i in (30, 10, 20)]
    return _write_coco_val(tmp_path, images, anns)


def _rle_counts(binary: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE, column-major runs starting with zeros (independent of pycocotools)."""
    flat = binary.flatten(order="F")
    runs, value, run = [], 0, 0
    for v in flat:
        if v == value:
            run += 1
        else:
            runs.append(run)
            value, run = v, 1
    return runs + [run]


def test_coco_labels_include_crowd_and_keep_unannotated_images(coco_root):
    ds = load_multilabel("coco2017", coco_root, "val")
    assert [r.image_id for r in ds.records] == ["10", "20", "30"]  # sorted by id
    assert ds.records[0].path == coco_root / "val2017" / "000000000010.jpg"
    expected = np.zeros((3, 80), np.int8)
    for row, names in ((0, ["person", "car", "tie"]), (2, ["dog", "toothbrush"])):
        expected[row, [COCO_CLASSES.index(n) for n in names]] = 1
    assert ds.labels.dtype == np.int8 and np.array_equal(ds.labels, expected)
    assert ds.classnames == list(COCO_CLASSES)


def test_coco_val_images_annotated_drops_unannotated_images_all_keeps_them(tmp_path):
    """data.coco_val_images: the authors' val2014 kept only annotated images (40,137 of 40,504)."""
    root = make_planted_coco(tmp_path, n_train=6, n_val=9, num_classes=4, image_size=32, seed=1)
    ann = root / "annotations" / "instances_val2017.json"
    data = json.loads(ann.read_text())
    ids = sorted(im["id"] for im in data["images"])
    bare = set(ids[1::3])  # every third val image loses its annotations
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] not in bare]
    ann.write_text(json.dumps(data))
    train_ann = root / "annotations" / "instances_train2017.json"
    train_data = json.loads(train_ann.read_text())
    train_ids = sorted(im["id"] for im in train_data["images"])
    train_data["annotations"] = [a for a in train_data["annotations"] if a["image_id"] != train_ids[0]]
    train_ann.write_text(json.dumps(train_data))

    every = load_multilabel("synthetic", root, "val", val_images="all")
    annotated = load_multilabel("synthetic", root, "val", val_images="annotated")
    assert [r.image_id for r in every.records] == [str(i) for i in ids]
    assert [r.image_id for r in annotated.records] == [str(i) for i in ids if i not in bare]
    assert not every.labels[[ids.index(i) for i in bare]].any()  # all-zero rows, dropped above
    keep = [ids.index(i) for i in ids if i not in bare]
    assert np.array_equal(annotated.labels, every.labels[keep]) and annotated.labels.any(1).all()
    assert load_multilabel("synthetic", root, "val").labels.shape == every.labels.shape  # default: all
    for val_images in ("all", "annotated"):  # train splits always keep annotated images only
        train = load_multilabel("synthetic", root, "train", val_images=val_images)
        assert [r.image_id for r in train.records] == [str(i) for i in train_ids[1:]]
    with pytest.raises(ValueError, match="val_images"):
        load_multilabel("synthetic", root, "val", val_images="some")


def test_coco_masks_crowd_ignored_and_small_objects_on_top(coco_root):
    ds = load_segmentation("coco2017", coco_root, "val")
    assert ds.has_background and ds.classnames[0] == "background" and len(ds.classnames) == 81
    expected = np.zeros((20, 30), np.uint8)
    expected[0:4, 20:30] = 255  # the crowd car
    expected[2:14, 2:14] = 1 + COCO_CLASSES.index("person")
    expected[5:8, 5:8] = 1 + COCO_CLASSES.index("tie")  # smaller, listed later: painted last anyway
    mask = ds.mask(0)
    assert mask.dtype == np.uint8 and np.array_equal(mask, expected)
    assert not ds.mask(1).any()  # no annotations: all background
    dog, brush = 1 + COCO_CLASSES.index("dog"), 1 + COCO_CLASSES.index("toothbrush")
    assert (ds.mask(2)[6:8, 6:8] == brush).all() and (ds.mask(2)[9:13, 9:13] == dog).all()


@pytest.fixture
def coco_paint_order_root(tmp_path):
    """Images in file order 7, 5, 3, 9, 1 (ids sorted: 1, 3, 5, 7, 9); 5 and 9 annotated.
    Image 5 (10 x 12), annotations in file order: person rows 1:7 cols 1:7 (area 36); a crowd car
    rows 0:3 cols 5:12 (RLE, area 21), over the person; a dog rows 4:7 cols 4:7 (area 9); a cat
    rows 5:10 cols 0:5 (area 25), over the dog. Image 9 (10 x 12): a bird rows 2:6 cols 2:6."""
    crowd = np.zeros((10, 12), np.uint8)
    crowd[0:3, 5:12] = 1
    anns = [_ann(1, 5, "person", _square(1, 1, 6), 36),
            _ann(2, 5, "car", {"size": [10, 12], "counts": _rle_counts(crowd)}, 21, iscrowd=1),
            _ann(3, 5, "dog", _square(4, 4, 3), 9),
            _ann(4, 5, "cat", _square(0, 5, 5), 25),
            _ann(5, 9, "bird", _square(2, 2, 4), 16)]
    sizes = {7: (6, 8), 5: (10, 12), 3: (8, 8), 9: (10, 12), 1: (6, 6)}
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "height": h, "width": w} for i, (h, w) in sizes.items()]
    return _write_coco_val(tmp_path, images, anns)


def test_coco_masks_released_paint_in_file_order_and_carry_the_previous_mask(coco_paint_order_root):
    person, car, dog, cat, bird = (1 + COCO_CLASSES.index(n) for n in ("person", "car", "dog", "cat", "bird"))
    official = load_segmentation("coco2017", coco_paint_order_root, "val")
    released = load_segmentation("coco2017", coco_paint_order_root, "val", coco_masks="released")
    assert [r.image_id for r in released.records] == ["1", "3", "5", "7", "9"]  # sorted by id

    # image 5: official = crowd 255 first, then by decreasing area (person, cat, dog)
    five_official = np.zeros((10, 12), np.uint8)
    five_official[0:3, 5:12] = 255
    five_official[1:7, 1:7] = person
    five_official[5:10, 0:5] = cat
    five_official[4:7, 4:7] = dog
    # released = file order (person, crowd car as its class, dog, cat), later ones win
    five_released = np.zeros((10, 12), np.uint8)
    five_released[1:7, 1:7] = person
    five_released[0:3, 5:12] = car
    five_released[4:7, 4:7] = dog
    five_released[5:10, 0:5] = cat
    nine = np.zeros((10, 12), np.uint8)
    nine[2:6, 2:6] = bird
    assert np.array_equal(official.mask(2), five_official)
    assert np.array_equal(released.mask(2), five_released)
    # they differ on the crowd's 21 pixels (255 or person vs car) and 2 dog-vs-cat pixels
    assert (five_official != five_released).sum() == 21 + 2
    assert np.array_equal(official.mask(4), nine) and np.array_equal(released.mask(4), nine)

    # unannotated images: official all background at their own size; released keeps the mask of
    # the last annotated image before them in the file's images order (7: none before it)
    for i, size in ((0, (6, 6)), (1, (8, 8)), (3, (6, 8))):
        assert official.mask(i).shape == size and not official.mask(i).any()
    assert np.array_equal(released.mask(1), five_released)  # image 3 follows image 5 in the file
    assert np.array_equal(released.mask(0), nine)  # image 1 follows image 9
    assert released.mask(3).shape == (6, 8) and not released.mask(3).any()  # image 7 comes first
    with pytest.raises(ValueError, match="COCO masks"):
        load_segmentation("coco2017", coco_paint_order_root, "val", coco_masks="crowd")


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return make_planted_coco(tmp_path_factory.mktemp("planted"), n_train=12, n_val=6, seed=3)


def test_planted_coco_labels_match_the_generator(planted):
    ds = load_multilabel("synthetic", planted, "train")
    assert len(ds) == 12 and ds.labels.shape == (12, 8) and ds.classnames == list(COCO_CLASSES[:8])
    for i, record in enumerate(ds.records):
        _, objects = planted_sample(3, "train", i, 96, 8)
        assert set(np.flatnonzero(ds.labels[i])) == {o.cls for o in objects}
        assert Image.open(record.path).size == (96, 96)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools decode under numpy 2
def test_coco_polygon_masks_agree_with_independent_rasterisation(planted):
    """pycocotools' polygon fill == pixels whose centre lies inside the polygon (matplotlib)."""
    ds = load_segmentation("synthetic", planted, "val")
    coco = ds.masks.coco
    yy, xx = np.mgrid[0:96, 0:96]
    centres = np.stack([xx.ravel() + 0.5, yy.ravel() + 0.5], axis=1)  # (H*W, 2) pixel centres
    for ann in coco.dataset["annotations"]:
        corners = np.array(ann["segmentation"][0]).reshape(-1, 2)
        inside = PolygonPath(corners).contains_points(centres).reshape(96, 96)
        assert np.array_equal(coco.annToMask(ann).astype(bool), inside)
        assert inside.sum() == ann["area"]


def test_planted_semantic_masks_match_painted_squares_and_image_colours(planted):
    ds = load_segmentation("synthetic", planted, "val")
    colours = class_colours(8).astype(int)
    for i in range(len(ds)):
        _, objects = planted_sample(3, "val", i, 96, 8)
        expected = np.zeros((96, 96), np.uint8)
        for o in sorted(objects, key=lambda o: -o.side):
            expected[o.y0:o.y0 + o.side, o.x0:o.x0 + o.side] = o.cls + 1
        mask = ds.mask(i)
        assert np.array_equal(mask, expected)
        pixels = np.asarray(ds.image(i)).astype(int)  # the JPEG: colours where the mask says
        for value in set(np.unique(mask)) - {0}:
            core = binary_erosion(mask == value, iterations=2)  # JPEG chroma blurs 1-2 px edges
            mean = pixels[core].mean(0)
            assert np.abs(mean - colours[value - 1]).max() < 12
            assert np.argmin(np.abs(colours - mean).sum(1)) == value - 1  # separable by colour


def _write_voc2007(root: Path, objects_by_id: dict[str, list[tuple[str, str | None]]]) -> Path:
    voc = root / "VOCdevkit" / "VOC2007"
    (voc / "Annotations").mkdir(parents=True)
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    for image_id, objects in objects_by_id.items():
        body = "".join(f"<object><name>{n}</name>" + (f"<difficult>{d}</difficult>" if d else "")
                       + "</object>" for n, d in objects)
        (voc / "Annotations" / f"{image_id}.xml").write_text(f"<annotation>{body}</annotation>")
    (voc / "ImageSets" / "Main" / "test.txt").write_text("\n".join(objects_by_id) + "\n")
    return voc


def test_voc2007_difficult_objects_are_skipped(tmp_path):
    voc = _write_voc2007(tmp_path, {
        "000001": [("dog", "0"), ("cat", "1")],  # cat only difficult -> 0
        "000002": [("cat", "1"), ("cat", "0"), ("person", None)],  # no tag = not difficult
        "000003": [("bus", "1")],
    })
    expected = np.zeros((3, 20), np.int8)
    expected[0, VOC_CLASSES.index("dog")] = 1
    expected[1, [VOC_CLASSES.index("cat"), VOC_CLASSES.index("person")]] = 1
    for root in (tmp_path, tmp_path / "VOCdevkit", voc):  # any of the three roots
        ds = load_multilabel("voc2007", root, "test")
        assert np.array_equal(ds.labels, expected)
        assert ds.records[1].path == voc / "JPEGImages" / "000002.jpg"


def test_generated_voc_layout_reads_back_with_difficult_rule(tmp_path):
    make_voc_layout(tmp_path, n_images=10, seed=1)
    ds = load_multilabel("voc2007", tmp_path, "trainval")
    seen_difficult_only = False
    for i in range(len(ds)):
        _, objects = planted_sample(1, "trainval", i, 64, 20, 0.3)
        easy = {o.cls for o in objects if not o.difficult}
        seen_difficult_only |= bool({o.cls for o in objects} - easy)
        assert set(np.flatnonzero(ds.labels[i])) == easy
    assert seen_difficult_only  # the fixture really exercises the rule


def test_voc2012_palette_png_read_as_indices_not_colours(tmp_path):
    devkit = make_voc_layout(tmp_path, n_images=4)
    indices = np.random.default_rng(0).choice([*range(21), 255], size=(64, 64)).astype(np.uint8)
    png = Image.fromarray(indices, "P")
    png.putpalette(voc_palette())
    png.save(devkit / "VOC2012" / "SegmentationClass" / "2007_000002.png")
    ds = load_segmentation("voc2012", tmp_path, "val")
    assert [r.image_id for r in ds.records] == ["2007_000002", "2007_000003"]
    assert ds.has_background and ds.classnames == ["background", *VOC_CLASSES]
    assert np.array_equal(ds.mask(0), indices)
    assert set(np.unique(ds.mask(1))) <= {0, *range(1, 21), 255} and 255 in ds.mask(1)


def test_context59_mmseg_reduce_zero_label(tmp_path):
    voc2010 = make_context_layout(tmp_path, n_images=2)
    raw = np.array([[0, 1, 2], [59, 255, 30]], np.uint8)
    Image.fromarray(raw, "L").save(voc2010 / "SegmentationClassContext" / "2008_000000.png")
    ds = load_segmentation("context59", tmp_path, "val")
    assert not ds.has_background and len(ds.classnames) == 59
    assert np.array_equal(ds.mask(0), np.array([[255, 0, 1], [58, 255, 29]], np.uint8))
    assert len(CONTEXT_UNSEEN_IN_COCO) == 30
    Image.fromarray(raw + 1, "L").save(voc2010 / "SegmentationClassContext" / "2008_000001.png")
    with pytest.raises(DatasetError, match="2008_000001.png"):
        ds.mask(1)  # value 60 is not a Context-59 class


def test_layout_errors_name_the_path(tmp_path, coco_root):
    with pytest.raises(DatasetError, match="instances_train2017.json") as info:
        load_multilabel("coco2017", coco_root, "train")
    assert isinstance(info.value, FileNotFoundError)
    bad = coco_root / "annotations" / "instances_val2017.json"
    bad.write_text("{not json")
    with pytest.raises(DatasetError, match="instances_val2017.json"):
        load_multilabel("coco2017", coco_root, "val")
    with pytest.raises(DatasetError, match="VOCdevkit/VOC2007"):
        load_multilabel("voc2007", tmp_path / "nowhere", "test")
    voc = _write_voc2007(tmp_path / "v", {"000001": [("dog", "0")]})
    (voc / "Annotations" / "000001.xml").write_text("<annotation><object>")
    with pytest.raises(DatasetError, match="000001.xml"):
        load_multilabel("voc2007", tmp_path / "v", "test")
    with pytest.raises(DatasetError, match="no multi-label reader"):
        load_multilabel("imagenet", tmp_path, "val")


def test_rgb_colour_masks_are_rejected(tmp_path):
    devkit = make_voc_layout(tmp_path, n_images=2)
    colour_mask = devkit / "VOC2012" / "SegmentationClass" / "2007_000001.png"
    Image.new("RGB", (64, 64), (128, 0, 0)).save(colour_mask)
    with pytest.raises(DatasetError, match="2007_000001.png.*palette"):
        load_segmentation("voc2012", tmp_path, "val").mask(0)


@pytest.mark.skipif(not COCO_TINY.is_dir(), reason="../shared/data/coco2017-tiny absent")
@pytest.mark.parametrize("split", ["train", "val"])
def test_real_coco_sample_loads(split):
    raw = json.loads((COCO_TINY / "annotations" / f"instances_{split}2017.json").read_text())
    ds = load_multilabel("coco2017", COCO_TINY, split)
    assert len(ds) == len(raw["images"]) == 80 and (ds.labels.sum(0) >= 1).all()  # each class once+
    cats_of = {}
    for a in raw["annotations"]:
        cats_of.setdefault(str(a["image_id"]), set()).add(COCO_CATEGORY_IDS.index(a["category_id"]))
    for record, row in zip(ds.records, ds.labels, strict=True):
        assert set(np.flatnonzero(row)) == cats_of.get(record.image_id, set())
    seg = load_segmentation("coco2017", COCO_TINY, split)
    for i in (0, 1):
        image, mask = seg.image(i), seg.mask(i)
        assert mask.shape == (image.height, image.width) and mask.max() <= 255
        assert set(np.unique(mask)) - {0, 255} <= {1 + c for c in cats_of[seg.records[i].image_id]}


@pytest.mark.skipif(not VOC_SAMPLES.is_dir(), reason="../shared/data/voc2012-seg-samples absent")
def test_real_voc2012_samples_load():
    ds = load_segmentation("voc2012", VOC_SAMPLES, "val")
    assert len(ds) == 14
    for i in range(len(ds)):
        mask = ds.mask(i)
        assert mask.shape == (ds.image(i).height, ds.image(i).width)
        values = set(np.unique(mask))
        assert values <= {*range(21), 255} and values - {0, 255}  # some object in every crop
