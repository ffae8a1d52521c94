"""The projectors file: the trained head and the record of what made it, read by every evaluation,
`segment`, `query` and the API. Written atomically, loadable with weights_only=True; a damaged file
is one TrainingError naming it, and so is one whose weights are not finite, or one that is not the
epoch its name (projectors.pt: last, projectors-best.pt: best) or evaluate.projectors asks for.
"""
from __future__ import annotations

import errno
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pipeline.config.paths import PROJECTORS
from pipeline.config.schema import Model
from pipeline.errors import TrainingError
from pipeline.files import atomic_save
from pipeline.model.build import head_from_params
from pipeline.model.heads import UnmixHead

ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive
PICKLE_PROTO = b"\x80"  # a pickle stream's first byte (protocol 2+): torch's legacy format


def read_state(path: str | Path, what: str = "projectors file") -> Any:
    """torch.load(path) on CPU with weights_only; a truncated or garbled file is a TrainingError.

    torch raises EOFError (empty), RuntimeError (zip directory missing), OSError 22 (truncated
    inside a record) or UnpicklingError (not a torch file). "Damaged" is said only of files that
    are what they claim to be (empty, or a zip archive as torch.save writes: truncated or garbled);
    any other file (README.md passed as --projectors) is not a `what` at all.
    """
    if Path(path).is_file() and not _looks_like_torch(Path(path), legacy=True):  # before torch reads it:
        # its weights-only unpickler meets other bytes with whatever error they happen to cause
        raise TrainingError(f"{path} is not a {what} (not a file torch.save writes): check the path")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # the unpickler's KeyError / ValueError on garbled bytes too
        if isinstance(err, OSError) and err.errno not in (None, errno.EINVAL):
            raise  # missing, unreadable: not damage (the CLI names disk errors itself)
        if not _looks_like_torch(Path(path), legacy=True):
            raise TrainingError(f"{path} is not a {what} (not a file torch.save writes): check the "
                                "path") from err
        raise TrainingError(f"{path} is damaged (truncated?): delete it and re-run "
                            "`pipeline train`") from err


def _looks_like_torch(path: Path, legacy: bool = False) -> bool:
    """Empty (a write cut short) or a zip whose records are torch's (<name>/data.pkl), or a zip
    too truncated to list: what torch.save leaves behind when damaged. `legacy`: a pickle stream
    (torch.save before torch 1.6, _use_new_zipfile_serialization=False) counts too."""
    with open(path, "rb") as f:
        head = f.read(len(ZIP_MAGIC))
    if not head:
        return True
    if head != ZIP_MAGIC:
        return legacy and head[:1] == PICKLE_PROTO
    try:
        with zipfile.ZipFile(path) as archive:
            return any(n.endswith("/data.pkl") or n == "data.pkl" for n in archive.namelist())
    except (zipfile.BadZipFile, OSError, EOFError):
        return True  # the zip's central directory is gone: truncated


def save_projectors(path: str | Path, head: UnmixHead | Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
    """Trained head for evaluation (a module or its state_dict). meta: model (params section),
    embed_dim, classnames, fingerprint, which ("last" | "best"), epoch and its val_map (plain
    Python values, so the file loads with weights_only=True)."""
    state = head.state_dict() if isinstance(head, torch.nn.Module) else head
    state = {k: v.detach().cpu().clone() for k, v in state.items()}
    atomic_save({"head": state, "meta": dict(meta)}, path)


def load_projectors(path: str | os.PathLike, device: torch.device | str = "cpu",
                    which: str | None = None) -> tuple[UnmixHead, dict]:
    """(head in eval mode on `device`, meta) from a save_projectors file; `which` ("last" | "best",
    evaluate.projectors) is the epoch the caller asks for (check_which)."""
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"no trained projectors at {path}: run `pipeline train` first")
    blob = read_state(path)
    check_which(path, blob.get("meta", {}), which)
    return head_from_blob(blob, device, source=path)


def check_which(path: str | Path, meta: Mapping[str, Any], which: str | None = None) -> None:
    """Refuse a file whose record (meta "which" and "epoch", as `pipeline train` writes them) is not
    what its name says (projectors.pt: last, projectors-best.pt: best) or `which` asks for: a file
    copied over another would report one epoch and hold another's weights. Files that record no
    "which" (ablation points, older files) are not checked."""
    recorded, epoch = meta.get("which"), meta.get("epoch")
    if recorded is None:
        return
    named = {name: kind for kind, name in PROJECTORS.items()}.get(Path(path).name)
    for wanted, by in ((named, "its name"), (which, "evaluate.projectors")):
        if wanted is not None and recorded != wanted:
            raise TrainingError(f"{path} holds the projectors of the {recorded} epoch (epoch {epoch}), not "
                                f"the {wanted} one that {by} says (copied over?): re-run `pipeline train`, "
                                f"or put back the file `pipeline train` wrote")
    trained = ((meta.get("provenance") or {}).get("params") or {}).get("train") or {}
    epochs = trained.get("epochs")
    if isinstance(epoch, int) and isinstance(epochs, int) and not (
            epoch == epochs if recorded == "last" else 1 <= epoch <= epochs):
        raise TrainingError(f"{path} records the {recorded} epoch as epoch {epoch} of a {epochs}-epoch "
                            "run: the file was edited or mixed up; re-run `pipeline train`")


def recorded_model(model: Mapping[str, Any]) -> Model:
    """The typed model section a projectors file records (meta["model"]). Files saved before the
    recipes record no text_bn: they trained the text projector's BatchNorm in train mode."""
    return Model.model_validate({"text_bn": "train", **model})


def head_from_blob(blob: dict, device: torch.device | str = "cpu",
                   source: str | Path = "the projectors file") -> tuple[UnmixHead, dict]:
    """(head in eval mode on `device`, meta) from a save_projectors file's contents (read from
    `source`); non-finite weights are refused naming it, before any score is computed."""
    meta = blob["meta"]
    bad = [k for k, v in blob["head"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise TrainingError(f"{source} is damaged: non-finite values in its weights ({', '.join(bad[:3])}"
                            f"{' ...' if len(bad) > 3 else ''}); delete it and re-run `pipeline train`")
    head = head_from_params(recorded_model(meta["model"]), meta["embed_dim"])
    head.load_state_dict(blob["head"])
    return head.to(device).eval(), meta
