"""A store answers for the params it is read with: its fingerprint records every value-affecting
key the `extract` stage of dvc.yaml declares (by construction: compared here with dvc.yaml), and
train, evaluate and export refuse a store extracted with other values, in one line naming the key,
the store's value, the params' value and the command to run."""
from __future__ import annotations

from typing import Any

import json
from pathlib import Path

import pytest
import yaml
from store_world import (
    ROOT,
    clear_error,
    cli,
    copy,
    ok,
    sets,
    store,
)

from pipeline.config.params import as_dict, flatten, load_params
from pipeline.config.schema import Params


def declared_leaf_keys(params: Params) -> set[str]:
    """The dotted leaf keys of every entry of the extract stage's `params:` in dvc.yaml."""
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["extract"]["do"]
    keys: set[str] = set()
    for entry in stage["params"]:
        value: Any = as_dict(params)
        for part in entry.split("."):
            value = value[part]
        keys |= set(flatten(value, entry + ".")) if isinstance(value, dict) and value else {entry}
    return keys


def test_the_fingerprint_records_every_value_key_the_extract_stage_declares(store_world: Path) -> None:
    from pipeline.extraction.expected import (
        EXTRACT_PARAMS,
        NOT_VALUES,
        ROLE_KEYS,
        expected_fingerprint,
    )

    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["extract"]["do"]
    assert tuple(stage["params"]) == EXTRACT_PARAMS  # the one list, mirrored
    params = load_params(sets(store_world)[1], sets(store_world)[3::2])
    declared = declared_leaf_keys(params)

    def under(key: str, prefixes) -> bool:
        return any(key == p or key.startswith(p + ".") for p in prefixes)

    for prefix in (*NOT_VALUES, *ROLE_KEYS["train"], *ROLE_KEYS["val"]):  # no stale exclusion
        assert any(under(k, (prefix,)) for k in declared), prefix
    for role, other in (("train", "val"), ("val", "train")):
        record = expected_fingerprint(params, role).params
        assert set(record) == {k for k in declared if not under(k, NOT_VALUES + ROLE_KEYS[other])}
        assert {"backbone.image_size", "extract.dtype", "extract.batch_size"} <= set(record)
        stored = json.loads((store(store_world, role) / "zarr.json").read_text())["attributes"]
        assert stored["fingerprint"]["params"] == record and stored["fingerprint"]["role"] == role
    assert {"extract.seed", "extract.views", "extract.augment.magnitude"} <= set(
        expected_fingerprint(params, "train").params)


@pytest.mark.parametrize("key, value, old", [
    ("backbone.image_size", 160, 64), ("extract.views", 3, 2), ("extract.seed", 1, 0),
    ("extract.augment.magnitude", 7, 9)])
def test_a_changed_extraction_param_is_refused_by_every_reader(store_world: Path, tmp_path: Path,
                                                               key: str, value: object, old: object) -> None:
    run = copy(store_world, tmp_path)
    changed = sets(run, **{key.replace(".", "__"): value})
    line = clear_error(cli("train", *changed), store(run, "train"), f"{key}: store {old!r}, params {value!r}",
                       "pipeline extract-features --split train")
    assert line.count(key) == 1
    clear_error(cli("evaluate", "mlr", *changed), f"{key}: store {old!r}, params {value!r}",
                "pipeline extract-features")
    clear_error(cli("export-cache", "--split", "train", "--out", tmp_path / "t.h5", *changed), key)
    ok(cli("export-cache", "--split", "train", "--out", tmp_path / "t.h5", *sets(run)))
    assert not (run / "results" / "metrics" / "mlr.json").exists()


def test_where_and_how_fast_it_extracts_does_not_count(store_world: Path, tmp_path: Path) -> None:
    run = copy(store_world, tmp_path)
    ok(cli("evaluate", "mlr", *sets(run, extract__num_workers=2, extract__shard_size=8,
                                    extract__on_bad_image="skip", backbone__device="auto")))


@pytest.mark.parametrize("change, key", [({"views": 1}, "extract.views"),
                                         ({"train_augment": False, "views": 1}, "role"),
                                         ({"image_size": 96}, "backbone.image_size"),
                                         ({"dtype": "float32"}, "extract.dtype")])
def test_the_python_api_refuses_a_record_of_other_params(store_world: Path, tmp_path: Path,
                                                         change: dict[str, Any], key: str) -> None:
    """extract(record=...) checks the record against its own arguments (readers trust it): a
    record of other params is refused naming the key; trust_record=True records it as given."""
    from store_world import SIZE

    from pipeline.data.datasets import load_multilabel
    from pipeline.errors import ParamError
    from pipeline.extraction.engine import extract
    from pipeline.extraction.expected import expected_fingerprint

    params = load_params(sets(store_world)[1], sets(store_world)[3::2])
    dataset = load_multilabel("synthetic", store_world / "data" / "synthetic", "train")
    args: dict[str, Any] = {"views": 2, "train_augment": True, "image_size": SIZE, "shard_size": 4,
                            "batch_size": 4, "augment": as_dict(params.extract.augment),
                            "dtype": params.extract.dtype, "progress": False, **change}
    record = expected_fingerprint(params, "train").record
    with pytest.raises(ParamError, match=f"{key} is .* in the record but .* in the arguments"):
        extract(dataset, tmp_path / "lie.zarr", params.backbone, record=record, **args)
    assert not (tmp_path / "lie.zarr").exists()  # refused before anything is written
    if change == {"views": 1}:  # told explicitly: recorded as given
        cache = extract(dataset, tmp_path / "told.zarr", params.backbone, record=record,
                        trust_record=True, **args)
        assert cache.fingerprint["params"] == record["params"] and cache.views == 1
