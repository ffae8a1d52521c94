"""Whether a result can be trusted: which run a projectors file comes from, and whether the current
inputs are that run's.

A projectors file records (`record`) the train store's fingerprint and layout, the val store's
fingerprint, the backbone weights digest and the model/train params (and recipe) it was trained
with. `pipeline train` deletes old projectors files before its first epoch (`invalidate`), so an
interrupted retrain leaves nothing stale to evaluate. `evaluate` and `figures` refuse projectors
whose inputs or params differ from the current ones (`require_current`, one line naming the key);
`report` lists the differences instead (`check`). Also here: refusing non-finite scores before sklearn sees them (`require_finite`),
and a store with no image left to use (`require_images`).
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import paths
from pipeline.config.params import as_dict
from pipeline.config.schema import Params, Paths
from pipeline.errors import TrainingError
from pipeline.extraction.expected import (
    expected_fingerprint,
    mismatch,
    require_expected,
    require_inputs,
)
from pipeline.model.projectors import check_which, read_state
from pipeline.model.weights import declared_digest
from pipeline.store.cache import CacheError, FeatureCache

# train keys that decide where and how fast a run goes, not what is learnt
SPEED_KEYS = ("device", "cpu_threads", "read_threads")
# train keys that change where or how fast a run goes, or which epochs are validated, not its weights
IGNORED_TRAIN_KEYS = (*SPEED_KEYS, "eval_every")
PROJECTORS_GLOB = "projectors*.pt"  # projectors.pt and projectors-best.pt
EVAL_RESULTS = ("mlr", "mfi", "seg", "zs-mlr")  # results/{metrics,tables}/<name>.* of `evaluate`
_SHOWN = 60  # characters of a value shown in a message


def without(section: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """A params section less `keys` (what two runs are compared on)."""
    return {k: v for k, v in section.items() if k not in keys}


def require_finite(scores: np.ndarray, index: np.ndarray, cache: Any = None) -> None:
    """Refuse (N, C) scores with a non-finite entry, naming the store and the images (index (N,)
    into the cache): a NaN token would otherwise surface as a ValueError deep inside sklearn."""
    bad = ~np.isfinite(scores).all(axis=1)  # (N,)
    if not bad.any():
        return
    rows = np.asarray(index)[bad]
    where = f"{cache.path}" if cache is not None else "the evaluated tokens"
    ids = [str(cache.ids[i]) for i in rows[:5]] if cache is not None else [str(i) for i in rows[:5]]
    more = f" and {len(rows) - 5} more" if len(rows) > 5 else ""
    raise CacheError(f"{where}: non-finite tokens for {len(rows)} images (ids {', '.join(ids)}{more}); "
                     "delete the store and re-run `pipeline extract-features`; if they come back, "
                     "extract with backbone.precision=fp32")


def require_images(cache: Any, role: str, purpose: str) -> None:
    """Refuse a complete store whose every image was skipped as bad (`--on-bad-image skip`): there
    is nothing to `purpose`, and the loops would end in an unrelated error (an empty concatenate,
    a learning rate never set) or, for a grid, in a table of untrained heads."""
    cache.require_complete()
    valid = cache.valid  # (N,) bool
    if len(valid) and not valid.any():
        raise CacheError(f"{cache.path}: all {len(valid)} {role} images were skipped as bad (extract "
                         f"--on-bad-image skip): nothing to {purpose}; fix or replace the image files "
                         "and re-run `pipeline extract-features`")


# -- recording -----------------------------------------------------------------------------------
def _plain(obj: Any) -> Any:
    """JSON-shaped copy (tuples -> lists), as a zarr attribute reads back and weights_only loads."""
    return json.loads(json.dumps(obj))


def trained_params(params: Params) -> dict[str, Any]:
    """The params a projectors file depends on: recipe, model, train (less IGNORED_TRAIN_KEYS)."""
    train = without(as_dict(params.train), IGNORED_TRAIN_KEYS)
    return _plain({"recipe": params.recipe, "model": as_dict(params.model), "train": train})


def record(params: Params, train_cache: Any, val_cache: Any,
           weights_digest: str | None = None) -> dict[str, Any]:
    """What a projectors file stores under meta["provenance"]. `weights_digest` defaults to the
    train store's; a store given as None (hand-made projectors in tests) is recorded as unknown."""
    if weights_digest is None and train_cache is not None:
        weights_digest = train_cache.fingerprint.get("backbone", {}).get("weights_digest")
    return _plain({
        "train_store": None if train_cache is None else {"fingerprint": train_cache.fingerprint,
                                                         "layout": train_cache.layout},
        "val_store": None if val_cache is None else {"fingerprint": val_cache.fingerprint},
        "weights_digest": weights_digest, "backbone": params.backbone.name,
        "params": trained_params(params)})


def projectors_files(paths_: Paths) -> list[Path]:
    """The projectors files (last and best) of this run's models folder that exist."""
    return sorted(paths.models_dir(paths_).glob(PROJECTORS_GLOB))


def used_projectors(params: Params) -> list[Path]:
    """The projectors file every evaluation of this run reads (evaluate.projectors), if it exists."""
    path = paths.projectors(params.paths, params.evaluate.projectors)
    return [path] if path.is_file() else []


def invalidate(paths_: Paths) -> list[Path]:
    """Delete the projectors files before a training run's first epoch; returns what it deleted."""
    gone = projectors_files(paths_)
    for path in gone:
        path.unlink(missing_ok=True)
    return gone


# -- comparing -----------------------------------------------------------------------------------
def differences(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, old, new) for every leaf that differs; a key absent on one side reads as None."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += differences(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [(prefix.rstrip("."), old, new)]


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN else text[:_SHOWN - 3] + "..."


def _first(differ: list[tuple[str, Any, Any]]) -> str:
    key, old, new = differ[0]
    more = f" (and {len(differ) - 1} more keys)" if len(differ) > 1 else ""
    return f"{key}: {_show(old)} then, {_show(new)} now{more}"


def mismatches(meta: Mapping[str, Any], params: Params, *, path: str | Path = "projectors",
               val_cache: Any = None, train_cache: Any = None,
               backbone_digest: str | None = None) -> list[str]:
    """One line per input of `meta`'s run that differs now (empty: all the same run).

    Params are always compared; the stores and the backbone digest when given.
    """
    rec = meta.get("provenance")
    if rec is None:
        return [f"{path} records no provenance (written by an older pipeline): run `pipeline train`"]
    out = []
    differ = differences(rec["params"], trained_params(params))
    if differ:
        out.append(f"{path} was trained with other params ({_first(differ)}): run `pipeline train`, "
                   f"or restore {differ[0][0]}")
    if backbone_digest is not None:
        old = rec["weights_digest"].split("+bn:")[0]
        differ = differences({"backbone.name": rec["backbone"], "backbone weights": old},
                       {"backbone.name": params.backbone.name,
                        "backbone weights": backbone_digest.split("+bn:")[0]})
        if differ:
            out.append(f"the backbone differs from the one {path} was trained on ({_first(differ)}): "
                       "run `pipeline extract-features` and `pipeline train`, or restore params "
                       "'backbone'")
    for role, cache in (("val", val_cache), ("train", train_cache)):
        if cache is None:
            continue
        old = rec[f"{role}_store"] or {"fingerprint": None, "layout": None}  # None: not recorded
        differ = differences(old["fingerprint"], _plain(cache.fingerprint), "fingerprint.")
        if role == "train":
            differ += differences(old["layout"], _plain(cache.layout), "layout.")
        if differ:
            out.append(f"{cache.path} was rebuilt after {path} was trained ({_first(differ)}): run "
                       f"`pipeline train`, or rebuild the {role} store as it was")
    return out


def _open_if_there(paths_: Paths, role: str, strict: bool) -> FeatureCache | None:
    store = paths.feature_store(paths_, role)
    if not store.exists():
        return None
    try:
        return FeatureCache.open(store)
    except CacheError:
        if strict:
            raise
        return None


def require_current(params: Params, *, val: bool = True, backbone: bool = True) -> FeatureCache | None:
    """For `evaluate` / `figures`: refuse projectors files whose params differ from `params`, whose
    train store (if present) or val store (`val`) was rebuilt since, or whose backbone differs from
    params.backbone (`backbone`), or that were trained on a train store other than the one the
    current params extract; and present stores other than those the current params extract
    (pipeline/extraction/expected.py), checked after the projectors' params and backbone and
    before their stores; with `val`, the val store's image files too (it is read next). A missing
    projectors file is left to the loader's message. Returns the val store so checked (None
    without `val`, or when it is absent): its reader need not check it again."""
    digest = declared_digest(params.backbone) if backbone else None
    caches = {"val_cache": _open_if_there(params.paths, "val", strict=True) if val else None,
              "train_cache": _open_if_there(params.paths, "train", strict=False)}
    metas = {path: read_state(path).get("meta", {}) for path in used_projectors(params)}
    for path, meta in metas.items():  # params and backbone of the projectors' run
        lines = mismatches(meta, params, path=path, backbone_digest=digest)
        if lines:
            raise TrainingError(lines[0])
    expected = {role: expected_fingerprint(params, role) for role in ("train", "val")}
    for role, cache in (("val", caches["val_cache"]), ("train", caches["train_cache"])):
        if cache is not None:  # the stores: what the current params extract?
            require_expected(cache, expected[role])
    if caches["val_cache"] is not None:  # the store evaluate reads: its images too
        require_inputs(caches["val_cache"], expected["val"])
    for path, meta in metas.items():  # the projectors' stores: these ones?
        lines = mismatches(meta, params, path=path, val_cache=caches["val_cache"],
                           train_cache=caches["train_cache"])
        if lines:
            raise CacheError(lines[0])
        trained_on = (meta.get("provenance") or {}).get("train_store")
        if trained_on:  # (the train store may be gone) what the current params extract?
            problem = mismatch(trained_on["fingerprint"], None, expected["train"],
                               f"the train store {path} was trained on")
            if problem:
                raise CacheError(f"{problem} and `pipeline train`")
    return caches["val_cache"]


def check(params: Params) -> list[str]:
    """For `report`: one line per input that comes from another run than the current projectors
    (params, stores, backbone, evaluation results older than the projectors); never raises for it."""
    files = used_projectors(params)
    results = _eval_results(params.paths)
    if not files:
        if results:
            chosen = paths.projectors(params.paths, params.evaluate.projectors)
            return [(f"no projectors at {chosen} (a training run started and did "
                     f"not finish?): {', '.join(str(r) for r in results)} come from an earlier run")]
        return []
    caches = {"val_cache": _open_if_there(params.paths, "val", strict=False),
              "train_cache": _open_if_there(params.paths, "train", strict=False)}
    digest = declared_digest(params.backbone)
    out: list[str] = []
    for role, cache in (("val", caches["val_cache"]), ("train", caches["train_cache"])):
        problem = None if cache is None else mismatch(
            cache.fingerprint, cache.annotation_files, expected_fingerprint(params, role), str(cache.path))
        out += [problem] if problem else []  # a store other than the current params extract
    for path in files:
        try:
            meta = read_state(path).get("meta", {})
            check_which(path, meta)  # not a file copied over another
        except TrainingError as err:
            out.append(str(err))
            continue
        out += mismatches(meta, params, path=path, backbone_digest=digest, **caches)
        stale = [r for r in results if r.stat().st_mtime < path.stat().st_mtime]
        if stale:
            out.append(f"{', '.join(str(r) for r in stale)} predate {path} (an earlier training run): "
                       "run `pipeline evaluate` and `pipeline figures` again")
    return out


def _eval_results(paths_: Paths) -> list[Path]:
    """Files written by `evaluate` and `figures` from the projectors."""
    found: Sequence[Path] = [
        *(paths.results_dir(paths_, "metrics", f"{n}.json") for n in EVAL_RESULTS),
        *(paths.results_dir(paths_, "tables", f"{n}.md") for n in EVAL_RESULTS),
        *sorted(paths.results_dir(paths_, "figures").glob("*.png")),
        *sorted(paths.results_dir(paths_, "heatmaps").glob("*.png"))]
    return [p for p in found if p.is_file()]
