"""What a dataset reader returns: image records with image-level labels (multi-label) or with a
mask per image (segmentation)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.data.images import load_image


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
    root: Path | None = None  # the dataset root the reader was given
    sources: list[Path] = field(default_factory=list)  # the annotation files the labels come from

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
    masks: Callable[[int], np.ndarray] = field(repr=False)

    def __len__(self) -> int:
        return len(self.records)

    def image(self, i: int) -> Image.Image:
        return load_image(self.records[i].path)

    def mask(self, i: int) -> np.ndarray:
        """(H, W) uint8 class indices, 255 = ignore."""
        return self.masks(i)
