"""What a feature store must record to be read with the current params, and the readers' check.

`expected_fingerprint(params, role)` is the ONE place that reads params for this: every other
function here takes its plain values. It gives the role, the params record (every key the
`extract` stage of dvc.yaml declares under `params:`, less those that change where or how fast
extraction runs or how the store is laid out, and less the other role's keys; a new `extract.*`
or `backbone.*` key joins the record by construction; tests/test_store_params.py compares the
lists with dvc.yaml), the weights digest the backbone params name, and the annotation files.

Extraction records `role` and `params` in the store's fingerprint (beside what it derives: the
resolved device, the loaded weights' digest, the input digests). Every reader (train, ablate,
evaluate, figures, export, `train --online`) calls `require_expected` (or `open_checked`): a
store whose role, params record, weights or annotation files differ from the current ones is
refused in one line: the key, the store's value, the params' value, and the command to run.
The readers of a store's tokens (`open_checked`: train, ablate, evaluate, export) also check its
image files (`require_inputs`): a stat per image against the recorded size and mtime, the bytes
read only where those differ, so a touched file passes and a changed one is refused, naming it
(an image without a record, missing at extraction or in a store made by hand, is not compared).
Where the dataset folder is absent (stores copied to a machine without the images) the input
files, annotations and images, are not checked, silently: there is nothing to compare with.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import paths
from pipeline.config.params import as_dict, flatten
from pipeline.config.schema import Params
from pipeline.data.datasets import annotation_files, load_multilabel
from pipeline.errors import CacheError
from pipeline.model.weights import declared_digest
from pipeline.store.cache import FeatureCache
from pipeline.store.identity import INPUTS_KEY, canonical
from pipeline.store.inputs import (
    FIELDS,
    UNKNOWN,
    annotation_records,
    changed_annotations,
    check_images,
    records_digest,
)

# The `extract` stage's params in dvc.yaml, in its order.
EXTRACT_PARAMS = ("recipe", "data.dataset", "data.train_split", "data.val_split",
                  "data.coco_val_images", "backbone", "extract")
# Declared keys that decide no stored number (a key or a section prefix):
NOT_VALUES = (
    "recipe",  # the recipe's values are resolved into the keys themselves
    "backbone.device",  # where it ran: the device type used is recorded (fingerprint backbone.device)
    "backbone.checkpoint", "backbone.sha256",  # which file: the weights digest stands for the weights
    "extract.shard_size", "extract.compressor",  # the layout on disk, not the values
    "extract.num_workers", "extract.workers", "extract.scheduler",  # how fast
    "extract.on_bad_image",  # whether a bad file stops the run; a skipped one is in `status`
)
# Keys of one role only: val/test stores hold one plain view of the evaluation split.
ROLE_KEYS = {"train": ("data.train_split", "extract.views", "extract.seed", "extract.augment"),
             "val": ("data.val_split", "data.coco_val_images", "extract.eval_interpolation")}
ABSENT = "<absent>"


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def declared_keys(flat: Mapping[str, Any], role: str) -> dict[str, Any]:
    """The params record of `role` from the flattened declared params (plain values)."""
    other = tuple(k for r, keys in ROLE_KEYS.items() if r != role for k in keys)
    return {k: v for k, v in sorted(flat.items()) if not _under(k, NOT_VALUES + other)}


@dataclass(frozen=True)
class Expected:
    """What the current params say a store of `role` must record (plain values)."""
    role: str
    store: Path
    params: dict[str, Any]  # dotted key -> value: the fingerprint's "params" record
    weights_digest: str | None  # None: the checkpoint file is missing
    root: Path  # the dataset root, which annotation file names are relative to
    sources: tuple[Path, ...]  # the annotation files
    dataset: str = ""  # data.dataset: the image list's reader (require_inputs)
    split: str = ""  # the role's split
    val_images: str = "all"  # data.coco_val_images

    @property
    def present(self) -> bool:
        """Whether the dataset folder is here (else the input files are not checked)."""
        return self.root.is_dir()

    @property
    def record(self) -> dict[str, Any]:
        """What extraction records in the fingerprint from the params."""
        return {"role": self.role, "params": self.params}

    def annotation_files(self) -> dict[str, list[int]]:
        return annotation_records(self.sources, self.root)

    def fingerprint(self) -> dict[str, Any]:
        """The least fingerprint `require_expected` accepts (hand-made stores in tests)."""
        return {**self.record, "backbone": {"weights_digest": self.weights_digest},
                INPUTS_KEY: {"annotations": records_digest(self.annotation_files()), "images": None}}


def expected_fingerprint(params: Params, role: str) -> Expected:
    """The ONE reader of params for store identity (see the module docstring)."""
    if role not in ROLE_KEYS:
        raise ValueError(f"role must be one of {sorted(ROLE_KEYS)}, got {role!r}")
    tree = as_dict(params)  # the declared keys as the params file spells them
    flat: dict[str, Any] = {}
    for key in EXTRACT_PARAMS:
        cursor: Any = tree
        for part in key.split("."):
            cursor = cursor[part]
        flat.update(flatten(cursor, key + ".") if isinstance(cursor, Mapping) and cursor else {key: cursor})
    root = paths.dataset_root(params.paths, params.data.dataset)
    split = params.data.train_split if role == "train" else params.data.val_split
    return Expected(role, paths.feature_store(params.paths, role), declared_keys(flat, role),
                    declared_digest(params.backbone), root,
                    tuple(annotation_files(params.data.dataset, root, split)),
                    params.data.dataset, split, params.data.coco_val_images)


def record_differences(record: Mapping[str, Any] | None, role: str, values: Mapping[str, Any]
                       ) -> list[tuple[str, Any, Any]]:
    """(key, record value, value used) where a role and params record (`extract(record=...)`)
    disagrees with what extraction is given: `role`, and `values`, the dotted params keys its
    arguments stand for (those of the role's record are compared; a key no argument gives, such
    as data.coco_val_images, is not)."""
    record = record or {}
    out = [] if record.get("role") == role else [("role", record.get("role", ABSENT), role)]
    recorded = record.get("params") or {}
    used = json.loads(canonical(declared_keys(values, role)))  # as params files spell values
    return out + [(k, recorded.get(k, ABSENT), v) for k, v in used.items() if recorded.get(k, ABSENT) != v]


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def differences(fingerprint: Mapping[str, Any], expected: Expected) -> list[tuple[str, Any, Any]]:
    """(key, store value, params value) for the role, each params-record key and the weights."""
    out = []
    if fingerprint.get("role") != expected.role:
        out.append(("role", fingerprint.get("role", ABSENT), expected.role))
    record = fingerprint.get("params")
    if not isinstance(record, Mapping):
        return [*out, ("params", "<none recorded>", "the current params")]
    out += [(k, record.get(k, ABSENT), expected.params.get(k, ABSENT))
            for k in sorted(record.keys() | expected.params.keys())
            if record.get(k, ABSENT) != expected.params.get(k, ABSENT)]
    stored = str((fingerprint.get("backbone") or {}).get("weights_digest")).split("+bn:")[0]
    if stored != (expected.weights_digest or "<checkpoint missing>"):
        out.append(("backbone weights", stored, expected.weights_digest or "<checkpoint missing>"))
    return out


def fix(expected: Expected) -> str:
    return f"run `pipeline extract-features --split {expected.role} --restart-on-change`"


def mismatch(fingerprint: Mapping[str, Any], annotations: Mapping[str, Any] | None,
             expected: Expected, where: str) -> str | None:
    """One line naming the first difference between a store's fingerprint (and, when given, its
    annotation records) and the current params and files, or None."""
    differ = differences(fingerprint, expected)
    if differ:
        key, old, new = differ[0]
        more = f" (and {len(differ) - 1} more)" if len(differ) > 1 else ""
        hint = f", a {old} store copied or moved here?" if key == "role" else ""
        return (f"{where}: {key}: store {_show(old)}, params {_show(new)}{more}{hint}: {fix(expected)}")
    if not expected.present:  # stores without their dataset: nothing to compare with
        return None
    now = expected.annotation_files()
    if annotations is not None:
        changed = changed_annotations(dict(annotations), now)
    else:
        recorded = (fingerprint.get(INPUTS_KEY) or {}).get("annotations")
        changed = [] if recorded == records_digest(now) else sorted(now)
    if changed:
        first = expected.root / changed[0]
        more = f" (and {len(changed) - 1} more files)" if len(changed) > 1 else ""
        return (f"{first}{more} changed since {where} was extracted (its labels come from it): run "
                f"`pipeline extract-features --split {expected.role}` to refresh the labels")
    return None


def require_expected(cache: FeatureCache, expected: Expected) -> None:
    """Refuse a store that differs from what the current params and files say (one line)."""
    problem = mismatch(cache.fingerprint, cache.annotation_files, expected, str(cache.path))
    if problem:
        raise CacheError(problem)


def changed_images(cache: FeatureCache, expected: Expected) -> str | None:
    """One line naming the first image file of the store whose bytes changed since extraction (or
    that is gone), or None; None without looking when the dataset folder is absent. The image
    list is the dataset's, read as extraction reads it (its annotation files are checked first)."""
    if not expected.present:
        return None
    dataset = load_multilabel(expected.dataset, expected.root, expected.split, expected.val_images)
    run = f"run `pipeline extract-features --split {expected.role}`"
    if [r.image_id for r in dataset.records] != list(cache.ids):
        return (f"{cache.path}: the images of {expected.dataset} split {expected.split!r} are not "
                f"those the store was extracted from: {run}")
    complete = np.flatnonzero(cache.complete)
    if not complete.size:
        return None
    index = np.concatenate([np.arange(*cache.shard_range(int(s))) for s in complete])
    recorded = np.concatenate([cache.input_records(*cache.shard_range(int(s))) for s in complete])
    known = recorded[:, FIELDS.index("size")] != UNKNOWN  # unknown: a file missing at extraction
    index, recorded = index[known], recorded[known]  # (skipped as bad) or no record (a hand-made store)
    check = check_images([dataset.records[i].path for i in index.tolist()], recorded)
    if not check.changed:
        return None  # a file touched or copied without its times (same bytes) passes
    changed = [int(index[j]) for j in check.changed]
    more = f" (and {len(changed) - 1} more images)" if len(changed) > 1 else ""
    return (f"{dataset.records[changed[0]].path}{more} changed since {cache.path} was extracted "
            f"(image {changed[0]}; its tokens come from it): {run} to re-extract its shard")


def require_inputs(cache: FeatureCache, expected: Expected) -> None:
    """Refuse a store whose image files changed since extraction (one line; see changed_images)."""
    problem = changed_images(cache, expected)
    if problem:
        raise CacheError(problem)


def open_checked(params: Params, role: str) -> FeatureCache:
    """Open the `role` store for reading and check it against the current params and files: its
    fingerprint, annotation files and image files."""
    expected = expected_fingerprint(params, role)
    cache = FeatureCache.open(expected.store)
    require_expected(cache, expected)
    require_inputs(cache, expected)
    return cache
