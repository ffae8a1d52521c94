"""Figures as PNG files (matplotlib Agg, no display): class-similarity heat-maps (paper Fig. 2)
and activation-map overlays (paper Fig. 1/4). Each function returns the number of panels drawn,
so tests can check the layout; files are written atomically (temp file + rename).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from pipeline.files import atomic_write

MAX_TICK_LABELS = 30  # above this many classes the axes carry no names (unreadable anyway)


def _save(fig: plt.Figure, path: str | Path, dpi: int) -> None:
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight"))
    finally:
        plt.close(fig)


def cosine_matrix(features: np.ndarray) -> np.ndarray:
    """(C, D) -> (C, C) cosine similarities of the rows."""
    f = np.asarray(features, dtype=np.float64)
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    return f @ f.T


def similarity_heatmaps(panels: Mapping[str, np.ndarray], classnames: Sequence[str], path: str | Path,
                        title: str = "", dpi: int = 100) -> int:
    """One heat-map per entry of `panels` (name -> features (C, D)), side by side, one colour scale.

    The title of each panel carries its mean off-diagonal similarity (the MFI figure of merit).
    """
    mats = {name: cosine_matrix(f) for name, f in panels.items()}
    num = len(classnames)
    side = min(3.0 + 0.18 * num, 12.0)
    fig, axes = plt.subplots(1, len(mats), figsize=(side * len(mats) + 1.0, side), squeeze=False)
    off = ~np.eye(num, dtype=bool)
    image = None
    for ax, (name, sim) in zip(axes[0], mats.items()):
        image = ax.imshow(sim, vmin=-1.0, vmax=1.0, cmap="coolwarm")
        ax.set_title(f"{name}\nmean off-diagonal {sim[off].mean():.2f}", fontsize=10)
        if num <= MAX_TICK_LABELS:
            ax.set_xticks(range(num), classnames, rotation=90, fontsize=7)
            ax.set_yticks(range(num), classnames, fontsize=7)
        else:
            ax.set_xticks([])
            ax.set_yticks([])
    assert image is not None, "similarity_heatmaps needs at least one panel"
    fig.colorbar(image, ax=list(axes[0]), fraction=0.03, label="cosine similarity")
    if title:
        fig.suptitle(title)
    _save(fig, path, dpi)
    return len(mats)


def activation_grid(images: Sequence[np.ndarray], maps: Mapping[str, Sequence[np.ndarray]],
                    path: str | Path, title: str = "", dpi: int = 100,
                    row_labels: Sequence[str] | None = None) -> int:
    """Rows = images; columns = the image, then one heat-map overlay per method.

    images: (H, W, 3) uint8 each; maps[method][i]: (H, W) activation in [0, 1] for image i.
    row_labels: a name per row, written left of its image (e.g. the class of each row).
    Returns the number of panels (rows x (1 + methods)).
    """
    cols = 1 + len(maps)
    fig, axes = plt.subplots(len(images), cols, figsize=(2.4 * cols, 2.4 * len(images)), squeeze=False)
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
            axes[i, 0].text(-0.05, 0.5, row_labels[i], transform=axes[i, 0].transAxes, fontsize=10,
                            rotation=90, ha="right", va="center")
    for ax in axes.ravel():
        ax.set_axis_off()
    if title:
        fig.suptitle(title)
    _save(fig, path, dpi)
    return len(images) * cols
