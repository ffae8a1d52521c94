"""Where every artefact lives, derived from `paths.*` params in one place (dvc.yaml mirrors it)."""
from __future__ import annotations

from pathlib import Path

from pipeline.config.schema import Paths


def dataset_root(paths: Paths, dataset: str) -> Path:
    return Path(paths.data) / dataset


def feature_store(paths: Paths, role: str) -> Path:
    """role: 'train' or 'val' (the evaluation split)."""
    return Path(paths.cache) / "features" / f"{role}.zarr"


def models_dir(paths: Paths) -> Path:
    return Path(paths.cache) / "models"


def checkpoint(paths: Paths) -> Path:
    """Latest training state (resume point), written atomically every epoch."""
    return models_dir(paths) / "last.pt"


PROJECTORS = {"last": "projectors.pt", "best": "projectors-best.pt"}


def projectors(paths: Paths, which: str = "last") -> Path:
    """Trained projectors read by the evaluation stages (evaluate.projectors): those of the "last"
    epoch, or of the "best" epoch by val mAP among the evaluated ones."""
    if which not in PROJECTORS:
        raise ValueError(f"projectors: which must be one of {sorted(PROJECTORS)}, got {which!r}")
    return models_dir(paths) / PROJECTORS[which]


def results_dir(paths: Paths, *parts: str) -> Path:
    return Path(paths.results).joinpath(*parts)
