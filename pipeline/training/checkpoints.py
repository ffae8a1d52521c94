"""The resume checkpoint of a training run, refused when it belongs to another cache, other settings
or another label mask. Written atomically (temp file + rename), loadable with weights_only=True.
The projectors file itself is pipeline/model/projectors.py (re-exported here).
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.config.params import as_dict
from pipeline.config.schema import Evaluate, Params
from pipeline.errors import TrainingError
from pipeline.files import atomic_save
from pipeline.model.projectors import (  # noqa: F401  (re-exported: the training API in one import)
    head_from_blob,
    load_projectors,
    read_state,
    save_projectors,
)
from pipeline.training.provenance import SPEED_KEYS, differences, without

# train-section keys a resumed run may change without making its result a different experiment.
# Extending `epochs` on resume is a warm restart of the cosine schedule: not the same as a longer run.
_RESUMABLE_CHANGES = ("epochs", *SPEED_KEYS)


def _atomic_save(obj: Any, path: str | Path) -> None:
    atomic_save(obj, path)


def cache_identity(cache: Any) -> dict[str, Any]:
    """What a checkpoint must agree on with the train cache it resumes on."""
    return {"fingerprint": cache.fingerprint, "layout": cache.layout, "classnames": cache.classnames}


def save_checkpoint(path: str | Path, state: Mapping[str, Any]) -> None:
    """Write the resume state atomically (temp file + rename).

    state: head, optimizer, scaler (or None), epoch (completed),
    params (as_dict of the run's params), cache (cache_identity of the train cache), history
    (per-epoch metric rows).
    """
    _atomic_save(dict(state), path)


def validation_identity(val_cache: Any, evaluate: Evaluate) -> dict[str, Any]:
    """What every validated epoch of one run is measured with: the val store and how the text goes
    in. Best-epoch selection compares val mAPs across epochs, so a resume must not change it."""
    return {"store": cache_identity(val_cache), "text_bn": as_dict(evaluate.text_bn),
            "text_input": evaluate.text_input}


def load_checkpoint(path: str | Path, cache: Any, params: Params,
                    labels: Mapping[str, Any] | None = None,
                    validation: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Read a resume state and refuse it unless it belongs to this train cache and these settings,
    has trained no more than train.epochs (and, given `labels` = label_mask_identity of this run,
    was trained on the same label mask)."""
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"--resume: no checkpoint at {path}; train without --resume first")
    state = read_state(path, "training checkpoint")
    differ = [k for k, _, _ in differences(state["cache"], cache_identity(cache))]
    if differ:
        raise TrainingError(
            f"checkpoint {path} was written for a different train cache than {cache.path} "
            f"(fingerprint differs in: {', '.join(differ)}); delete {path} or train without --resume")
    recorded = state["params"]  # the params dict the checkpoint was written with
    old_train = without(recorded["train"], _RESUMABLE_CHANGES)
    new_train = without(as_dict(params.train), _RESUMABLE_CHANGES)
    differ = [k for k, _, _ in differences({"model": recorded["model"], "train": old_train},
                                           {"model": as_dict(params.model), "train": new_train})]
    if differ:
        raise TrainingError(f"checkpoint {path} was written with other settings ({', '.join(differ)}); "
                            f"resuming would mix two experiments: delete {path} or restore the params")
    epochs, done = params.train.epochs, state["epoch"]
    if done > epochs:  # nothing would run, and the projectors would record the smaller epochs
        raise TrainingError(f"checkpoint {path} has trained {done} epochs, more than train.epochs = "
                            f"{epochs}: set train.epochs to {done} or more, or delete {path} and train "
                            "without --resume")
    if validation is not None:
        differ = [k for k, _, _ in differences(dict(state.get("validation") or {}), dict(validation))]
        if differ:
            raise TrainingError(
                f"checkpoint {path} validated its epochs differently ({', '.join(differ)}): the best "
                f"epoch would compare two measures; delete {path} or restore the val store / params")
    if labels is not None and dict(state.get("labels") or {}) != dict(labels):
        raise TrainingError(f"checkpoint {path} was trained on another partial-label mask "
                            f"({state.get('labels')} vs {dict(labels)}): delete {path} or train "
                            "without --resume")
    return state
