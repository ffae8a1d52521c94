"""The projectors file: the trained head and the record of what made it, read by every evaluation,
`segment`, `query` and the API. Written atomically, loadable with weights_only=True; a damaged file
is one TrainingError naming it.
"""
from __future__ import annotations

import errno
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pipeline.config.schema import Model
from pipeline.errors import TrainingError
from pipeline.files import atomic_save
from pipeline.model.build import head_from_params
from pipeline.model.heads import UnmixHead


def read_state(path: str | Path) -> Any:
    """torch.load(path) on CPU with weights_only; a truncated or garbled file is a TrainingError.

    torch raises EOFError (empty), RuntimeError (zip directory missing), OSError 22 (truncated
    inside a record) or UnpicklingError (not a torch file) for the same cause: a damaged file.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        if isinstance(err, OSError) and err.errno not in (None, errno.EINVAL):
            raise  # missing, unreadable: not damage (the CLI names disk errors itself)
        raise TrainingError(f"{path} is damaged (truncated?): delete it and re-run "
                            "`pipeline train`") from err


def save_projectors(path: str | Path, head: UnmixHead | Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
    """Trained head for evaluation (a module or its state_dict). meta: model (params section),
    embed_dim, classnames, fingerprint, which ("last" | "best"), epoch and its val_map (plain
    Python values, so the file loads with weights_only=True)."""
    state = head.state_dict() if isinstance(head, torch.nn.Module) else head
    state = {k: v.detach().cpu().clone() for k, v in state.items()}
    atomic_save({"head": state, "meta": dict(meta)}, path)


def load_projectors(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[UnmixHead, dict]:
    """(head in eval mode on `device`, meta) from a save_projectors file."""
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"no trained projectors at {path}: run `pipeline train` first")
    return head_from_blob(read_state(path), device)


def recorded_model(model: Mapping[str, Any]) -> Model:
    """The typed model section a projectors file records (meta["model"]). Files saved before the
    recipes record no text_bn: they trained the text projector's BatchNorm in train mode."""
    return Model.model_validate({"text_bn": "train", **model})


def head_from_blob(blob: dict, device: torch.device | str = "cpu") -> tuple[UnmixHead, dict]:
    """(head in eval mode on `device`, meta) from a save_projectors file's contents."""
    meta = blob["meta"]
    head = head_from_params(recorded_model(meta["model"]), meta["embed_dim"])
    head.load_state_dict(blob["head"])
    return head.to(device).eval(), meta
