"""Where every artefact lives, derived from `paths.*` params in one place (dvc.yaml mirrors it)."""
from __future__ import annotations

from pathlib import Path


def dataset_root(params: dict, dataset: str | None = None) -> Path:
    return Path(params["paths"]["data"]) / (dataset or params["data"]["dataset"])


def feature_store(params: dict, role: str) -> Path:
    """role: 'train' or 'val' (the evaluation split)."""
    return Path(params["paths"]["cache"]) / "features" / f"{role}.zarr"


def models_dir(params: dict) -> Path:
    return Path(params["paths"]["cache"]) / "models"


def checkpoint(params: dict) -> Path:
    """Latest training state (resume point), written atomically every epoch."""
    return models_dir(params) / "last.pt"


PROJECTORS = {"last": "projectors.pt", "best": "projectors-best.pt"}


def projectors(params: dict, which: str = "last") -> Path:
    """Trained projectors read by the evaluation stages (evaluate.projectors): those of the "last"
    epoch, or of the "best" epoch by val mAP among the evaluated ones."""
    if which not in PROJECTORS:
        raise ValueError(f"projectors: which must be one of {sorted(PROJECTORS)}, got {which!r}")
    return models_dir(params) / PROJECTORS[which]


def results_dir(params: dict, *parts: str) -> Path:
    return Path(params["paths"]["results"]).joinpath(*parts)
