"""Class names of every dataset, resolved by name in one place.

Orders are the datasets' own: COCO by category id, VOC alphabetical, PASCAL Context 59 as in
mmseg's ``PascalContextDataset59``. Label column k of a dataset is ``classnames(name)[k]``.
"""
from __future__ import annotations

COCO_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)

# The official instances_*.json category ids: 1..90 with 10 gaps (classes dropped before release).
COCO_CATEGORY_IDS: tuple[int, ...] = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28,
    31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55,
    56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84,
    85, 86, 87, 88, 89, 90,
)

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)

CONTEXT59_CLASSES: tuple[str, ...] = (
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle",
    "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow",
    "cup", "curtain", "dog", "door", "fence", "floor", "flower", "food", "grass", "ground", "horse",
    "keyboard", "light", "motorbike", "mountain", "mouse", "person", "plate", "platform",
    "pottedplant", "road", "rock", "sheep", "shelves", "sidewalk", "sign", "sky", "snow", "sofa",
    "table", "track", "train", "tree", "truck", "tvmonitor", "wall", "water", "window", "wood",
)

# Context-59 names that denote a COCO class under another name. The first six are the VOC/COCO
# spelling differences; the last two are judgement calls (a COCO laptop is a computer, COCO's
# handbag/backpack/suitcase are bags) that make the unseen set the paper's 30 classes.
# Deliberately NOT mapped: "light" (COCO has only traffic lights), "sign" (only stop signs),
# "plate", "food" (COCO has specific foods, not the category), "cloth", "flower".
CONTEXT_TO_COCO: dict[str, tuple[str, ...]] = {
    "aeroplane": ("airplane",),
    "motorbike": ("motorcycle",),
    "pottedplant": ("potted plant",),
    "sofa": ("couch",),
    "table": ("dining table",),
    "tvmonitor": ("tv",),
    "computer": ("laptop",),
    "bag": ("handbag", "backpack", "suitcase"),
}


def _seen_in_coco(name: str) -> bool:
    return name in COCO_CLASSES or name in CONTEXT_TO_COCO


CONTEXT_UNSEEN_IN_COCO: tuple[str, ...] = tuple(
    c for c in CONTEXT59_CLASSES if not _seen_in_coco(c))

SYNTHETIC_NUM_CLASSES = 8

_DATASETS: dict[str, tuple[str, ...]] = {
    "coco2014": COCO_CLASSES,
    "coco2017": COCO_CLASSES,
    "voc2007": VOC_CLASSES,
    "voc2012": VOC_CLASSES,
    "context59": CONTEXT59_CLASSES,
    "context59-unseen": CONTEXT_UNSEEN_IN_COCO,
    "synthetic": COCO_CLASSES[:SYNTHETIC_NUM_CLASSES],
}


def classnames(dataset: str) -> list[str]:
    """Object class names of a dataset, in label-column order (no background entry)."""
    try:
        return list(_DATASETS[dataset])
    except KeyError:
        raise KeyError(f"unknown dataset {dataset!r}; known: {sorted(_DATASETS)}") from None


# The authors' ZS3 / MFI scripts prompt three VOC classes with spaced names
# (docs/METHOD.md "Evaluation as released");
# class ids and order are unchanged, only the words in the prompt differ.
VOC_AUTHORS_NAMES: dict[str, str] = {
    "diningtable": "dining table", "pottedplant": "potted plant", "tvmonitor": "tv/monitor"}
VOC_NAME_STYLES = ("authors", "official")


VOC_DATASETS = ("voc2007", "voc2012")


def prompt_names(names: list[str], dataset: str, voc_names: str = "official") -> list[str]:
    """The words put into the prompts for `names` of `dataset`: on VOC datasets `voc_names`
    "authors" respells three classes as the authors' scripts did; "official" and every other
    dataset (Context-59 spells "pottedplant" too) keep the dataset's own names."""
    if voc_names not in VOC_NAME_STYLES:
        raise ValueError(f"evaluate.voc_names must be one of {VOC_NAME_STYLES}, got {voc_names!r}")
    if voc_names == "official" or dataset not in VOC_DATASETS:
        return list(names)
    return [VOC_AUTHORS_NAMES.get(n, n) for n in names]
