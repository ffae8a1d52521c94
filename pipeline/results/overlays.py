"""What the `segment` and `query` overlays show besides the score maps: the pictures and maps
shrunk for drawing, and the label map in the colours of the label PNG (the PASCAL VOC palette:
0 black, 1 dark red, 2 green, ...) with a legend naming each colour (plots.activation_figure).
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.data.synthetic import voc_palette

PANEL_SIDE = 480  # pixels: overlays are drawn from images shrunk to this (twice a panel's width)


def panel_view(picture: Image.Image, maps: np.ndarray, max_side: int = PANEL_SIDE
               ) -> tuple[np.ndarray, np.ndarray]:
    """Picture (h, w, 3) uint8 and maps (C, h, w) shrunk to at most `max_side` pixels a side: a
    panel is ~240 px wide, and drawing full-size images costs seconds per figure."""
    scale = min(1.0, max_side / max(picture.size))
    size = (max(1, round(picture.height * scale)), max(1, round(picture.width * scale)))
    small = F.interpolate(torch.from_numpy(maps)[None], size=size, mode="bilinear",
                          align_corners=False, antialias=scale < 1.0)[0]  # (C, h, w)
    return np.asarray(picture.resize(size[::-1], Image.Resampling.BILINEAR)), small.numpy()


def palette_colours() -> np.ndarray:
    """(256, 3) uint8: the label PNG's colour of every label value."""
    return np.asarray(voc_palette(), dtype=np.uint8).reshape(256, 3)


def label_colours(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W) uint8 labels -> (h, w, 3) uint8 colours at `size` (nearest: labels never blend)."""
    small = Image.fromarray(labels).resize(size[::-1], Image.Resampling.NEAREST)
    return palette_colours()[np.asarray(small)]


def legend_colours(names: Mapping[int, str]) -> dict[str, tuple[int, int, int]]:
    """Legend entry (name) -> the palette colour of its label value, in label order."""
    colours = palette_colours()
    return {name: (int(colours[v][0]), int(colours[v][1]), int(colours[v][2])) for v, name in sorted(names.items())}
