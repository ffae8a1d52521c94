"""Figures as PNG files (matplotlib Agg, no display): class-similarity heat-maps (paper Fig. 2)
and activation-map overlays (paper Fig. 1/4). Each function returns the number of panels drawn,
so tests can check the layout; files are written atomically (temp file + rename).

Every figure is at most MAX_WIDTH_PX wide at its dpi (panels shrink, heat-maps wrap onto more
rows) and uses matplotlib's constrained layout, which places the title above the column titles
and the colourbar beside the panels without overlap whatever the pictures' aspect ratio.
`*_figure` functions return the figure itself (tests measure its artists); the others save it.
"""
from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.patches import Patch

from pipeline.files import atomic_write

MAX_WIDTH_PX = 2000  # a figure fits a screen and a page at its dpi
PANEL_INCHES = 2.4  # an overlay panel's longer side
MIN_TICK_POINTS = 6.0  # tick labels below this are unreadable: label every k-th class instead
MAX_TICK_POINTS = 9.0
SCORE_LABEL = "score (min-max normalised per class)"


def _save(fig: plt.Figure, path: str | Path, dpi: int) -> None:
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight"))
    finally:
        plt.close(fig)


def _wrapped(title: str, width_inches: float, fontsize: float = 11.0) -> str:
    """The title in lines that fit the figure's width (a long file name must not widen the PNG)."""
    chars = max(20, int(width_inches * 72 / (0.65 * fontsize)))  # DejaVu Sans: ~0.6 em a glyph
    return "\n".join(textwrap.wrap(title, chars))


def cosine_matrix(features: np.ndarray) -> np.ndarray:
    """(C, D) -> (C, C) cosine similarities of the rows."""
    f = np.asarray(features, dtype=np.float64)
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    return f @ f.T


def _label_margin(points: float) -> float:
    """Inches beside a heat-map for its class names: ~14 characters (most COCO names fit)."""
    return 0.1 + 14 * 0.6 * points / 72


def heatmap_layout(num: int, panels: int, dpi: int = 100) -> tuple[float, float, int, int]:
    """(panel side in inches, tick label points, every k-th class labelled, panels per row) for
    `num` classes: the side grows with the classes up to 8 in, labels at the class spacing (at
    most MAX_TICK_POINTS); below MIN_TICK_POINTS every k-th class; rows of panels that fit
    MAX_WIDTH_PX with their labels and the colourbar."""
    side = min(max(3.0, 2.5 + 0.1 * num), 8.0)
    spacing = side * 72 / num  # points per class along an axis
    step = max(1, math.ceil(MIN_TICK_POINTS / spacing))
    points = min(MAX_TICK_POINTS, max(MIN_TICK_POINTS, spacing * step * 0.85))
    margin = _label_margin(points)
    per_row = max(1, min(panels, int((MAX_WIDTH_PX / dpi - 1.2) // (side + margin))))
    return side, points, step, per_row


def similarity_heatmaps(panels: Mapping[str, np.ndarray], classnames: Sequence[str], path: str | Path,
                        title: str = "", dpi: int = 100) -> int:
    """One heat-map per entry of `panels` (name -> features (C, D)), one colour scale, as many per
    row as fit MAX_WIDTH_PX (heatmap_layout). The title of each panel carries its mean
    off-diagonal similarity (the MFI figure of merit)."""
    fig = similarity_figure(panels, classnames, title, dpi)
    _save(fig, path, dpi)
    return len(panels)


def similarity_figure(panels: Mapping[str, np.ndarray], classnames: Sequence[str], title: str = "",
                      dpi: int = 100) -> plt.Figure:
    mats = {name: cosine_matrix(f) for name, f in panels.items()}
    num = len(classnames)
    side, points, step, per_row = heatmap_layout(num, len(mats), dpi)
    rows = math.ceil(len(mats) / per_row)
    margin = _label_margin(points)
    size = (per_row * (side + margin) + 1.2, rows * (side + margin + 0.5) + 0.6)
    fig, axes = plt.subplots(rows, per_row, figsize=size, squeeze=False, layout="constrained", dpi=dpi)
    off = ~np.eye(num, dtype=bool)
    image = None
    ticks = list(range(0, num, step))
    for ax, (name, sim) in zip(axes.ravel(), mats.items()):
        image = ax.imshow(sim, vmin=-1.0, vmax=1.0, cmap="coolwarm")
        ax.set_title(f"{name}\nmean off-diagonal {sim[off].mean():.2f}", fontsize=10)
        ax.set_xticks(ticks, [classnames[i] for i in ticks], rotation=90, fontsize=points)
        ax.set_yticks(ticks, [classnames[i] for i in ticks], fontsize=points)
    for ax in axes.ravel()[len(mats):]:
        ax.set_axis_off()
    assert image is not None, "similarity_heatmaps needs at least one panel"
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6, label="cosine similarity")
    if title:
        fig.suptitle(_wrapped(title, size[0], 12.0), fontsize=12.0)
    return fig


def panel_inches(aspect: float, cols: int, dpi: int = 100, extra: float = 1.6) -> tuple[float, float]:
    """(width, height) in inches of a panel of height/width `aspect`: its longer side
    PANEL_INCHES, smaller when `cols` of them and `extra` inches (labels, legend) would pass
    MAX_WIDTH_PX."""
    width, height = PANEL_INCHES * min(1.0, 1.0 / aspect), PANEL_INCHES * min(1.0, aspect)
    scale = min(1.0, (MAX_WIDTH_PX / dpi - extra - 0.4) / (cols * width))
    return width * scale, height * scale


def label_legend(colours: Mapping[str, Sequence[int]]) -> list[Patch]:
    """Legend entries: a patch of each label's colour (0-255 RGB) with its name."""
    return [Patch(facecolor=(rgb[0] / 255, rgb[1] / 255, rgb[2] / 255), edgecolor="0.5", label=name)
            for name, rgb in colours.items()]


def activation_figure(images: Sequence[np.ndarray], maps: Mapping[str, Sequence[np.ndarray]], title: str = "",
                      dpi: int = 100, row_labels: Sequence[str] | None = None,
                      label_panel: tuple[str, np.ndarray, Mapping[str, Sequence[int]]] | None = None
                      ) -> plt.Figure:
    """Rows = images; columns = the image, then one heat-map overlay per method (one colourbar),
    then, with `label_panel` (title, (H, W, 3) label colours, name -> colour), a label map in
    the first row and its legend right of the figure.

    images: (H, W, 3) uint8 each; maps[method][i]: (H, W) activation in [0, 1] for image i.
    row_labels: a name per row, written left of its image (e.g. the class of each row).
    """
    cols = 1 + len(maps) + (label_panel is not None)
    aspect = max(p.shape[0] / p.shape[1] for p in images)
    extra = 2.2 if label_panel is not None else 0.8  # inches for the legend / the row labels
    width, height = panel_inches(aspect, cols, dpi, extra)
    title = _wrapped(title, cols * width + extra)
    # the panels, then room enough for the column titles, the colourbar, the title's lines and the
    # legend: with less, constrained layout squeezes the title onto the column titles
    entries = len(label_panel[2]) + 1 if label_panel is not None else 0
    size = (cols * width + extra, max(len(images) * height + 1.6 + 0.25 * title.count("\n"), 0.22 * entries + 1.0))
    fig, axes = plt.subplots(len(images), cols, figsize=size, squeeze=False, layout="constrained", dpi=dpi)
    for i, picture in enumerate(images):
        axes[i, 0].imshow(picture)
        for j, (method, activations) in enumerate(maps.items(), start=1):
            axes[i, j].imshow(picture)
            axes[i, j].imshow(activations[i], cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
            if i == 0:
                axes[i, j].set_title(method, fontsize=10)
        if i == 0:
            axes[i, 0].set_title("image", fontsize=10)
        if row_labels is not None:
            axes[i, 0].set_ylabel(row_labels[i], fontsize=10)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
    if label_panel is not None:
        name, colours, legend = label_panel
        axes[0, -1].imshow(colours, interpolation="nearest")
        axes[0, -1].set_title(name, fontsize=10)
        for ax in axes[1:, -1]:
            ax.set_axis_off()
        fig.legend(handles=label_legend(legend), loc="outside right upper", fontsize=9, title="labels",
                   frameon=False)
    # under every column: a bar under the maps alone shrinks their rows and leaves the image and
    # label columns out of line with them
    fig.colorbar(ScalarMappable(Normalize(0.0, 1.0), cmap="jet"), ax=axes.ravel().tolist(),
                 location="bottom", shrink=0.6, aspect=50, label=SCORE_LABEL)
    if title:
        fig.suptitle(title, fontsize=11.0)
    return fig


def activation_grid(images: Sequence[np.ndarray], maps: Mapping[str, Sequence[np.ndarray]],
                    path: str | Path, title: str = "", dpi: int = 100,
                    row_labels: Sequence[str] | None = None,
                    label_panel: tuple[str, np.ndarray, Mapping[str, Sequence[int]]] | None = None) -> int:
    """activation_figure saved as a PNG. Returns the number of panels (rows x (1 + methods), and
    1 for the label map)."""
    fig = activation_figure(images, maps, title, dpi, row_labels, label_panel)
    _save(fig, path, dpi)
    return len(images) * (1 + len(maps)) + (label_panel is not None)
