"""Projectors know the run they come from: `evaluate` and `figures` refuse inputs of another run
(one line naming the key, the old and the new value, and what to run), `report` lists them, and a
(re)training run deletes old projectors before its first epoch.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from store_world import record_of
from test_faults import BACKBONE, CLASSES, SIZE, assert_clear_error, cli, sets

from pipeline.config.params import as_dict, load_params
from pipeline.config.schema import Params
from pipeline.data.datasets import load_multilabel
from pipeline.data.synthetic import make_planted_coco
from pipeline.extraction.engine import extract
from pipeline.model.backbone import load_backbone
from pipeline.training import provenance
from pipeline.training.loop import TrainingError, load_projectors
from stages import train as train_stage

TRAIN = {"train__epochs": 2, "train__batch_size": 8, "train__optimizer": "adam", "train__lr": 0.01,
         "train__weight_decay": 0, "train__warmup_epochs": 0}


def build_stores(root: Path, init_seed: int = 0, roles: tuple[str, ...] = ("train", "val")) -> None:
    backbone = load_backbone("tiny-RN", pretrained=None, init_seed=init_seed)
    for role in roles:
        extract(load_multilabel("synthetic", root / "data" / "synthetic", role),
                root / "features" / f"{role}.zarr", BACKBONE.model_copy(update={"init_seed": init_seed}),
                backbone=backbone, image_size=SIZE, shard_size=8, dtype="float32", progress=False,
                record=record_of(args(root, root, backbone__init_seed=init_seed), role),
                trust_record=True)  # both stores one plain float32 view, read as the params' stores


def args(world: Path, run: Path, **extra: object) -> list[str]:
    return sets(run, paths__data=world / "data", **{**TRAIN, **extra})


def trained_world(root: Path) -> Path:
    """Planted data, its stores, and one trained run (cache/models) on them, under `root`."""
    make_planted_coco(root / "data" / "synthetic", 16, 8, num_classes=CLASSES, image_size=SIZE)
    build_stores(root)
    (root / "run" / "cache").mkdir(parents=True)
    (root / "run" / "cache" / "features").symlink_to(root / "features")
    result = cli("train", *args(root, root / "run"))
    assert result.exit_code == 0, result.output
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained_world(tmp_path_factory.mktemp("provenance"))


def copy_run(world: Path, run: Path, own_features: bool = False) -> Path:
    """A run folder with the trained projectors; the stores shared (symlink) or copied."""
    (run / "cache").mkdir(parents=True)
    shutil.copytree(world / "run" / "cache" / "models", run / "cache" / "models")
    if own_features:
        shutil.copytree(world / "features", run / "cache" / "features")
    else:
        (run / "cache" / "features").symlink_to(world / "features")
    return run


def params_of(world: Path, run: Path, **extra: object) -> Params:
    raw = args(world, run, **extra)
    return load_params(raw[1], [raw[i + 1] for i in range(2, len(raw), 2)])


def test_projectors_record_their_stores_backbone_and_params(world: Path) -> None:
    params = params_of(world, world / "run")
    _, meta = load_projectors(world / "run" / "cache" / "models" / "projectors.pt")
    rec = meta["provenance"]
    assert rec["weights_digest"] == "random:0" and rec["backbone"] == "tiny-RN"
    assert rec["params"]["train"]["mfi"]["lambda"] == params.train.mfi.lambda_
    assert rec["params"]["recipe"] == params.recipe and rec["params"]["model"] == as_dict(params.model)
    assert rec["val_store"]["fingerprint"]["dataset"]["split"] == "val"
    assert rec["train_store"]["layout"]["num_images"] == 16
    assert provenance.check(params) == []  # the run's own inputs: nothing to mark


def test_val_store_rebuilt_with_another_backbone_is_refused(world: Path, tmp_path: Path) -> None:
    run = copy_run(world, tmp_path, own_features=True)
    val = run / "cache" / "features" / "val.zarr"
    shutil.rmtree(val)
    backbone = load_backbone("tiny-RN", pretrained=None, init_seed=1)
    extract(load_multilabel("synthetic", world / "data" / "synthetic", "val"), val,
            BACKBONE.model_copy(update={"init_seed": 1}), backbone=backbone, image_size=SIZE, shard_size=8,
            dtype="float32", progress=False, record=record_of(args(world, run, backbone__init_seed=1), "val"),
            trust_record=True)  # as build_stores: read as the params' store
    result = cli("evaluate", "mlr", *args(world, run))  # the store is not what the params extract
    assert_clear_error(result, val, "backbone.init_seed: store 1, params 0",
                       "pipeline extract-features --split val")
    # rebuilt as the params say, but after the projectors were trained: they are refused
    shutil.rmtree(val)
    extract(load_multilabel("synthetic", world / "data" / "synthetic", "val"), val,
            BACKBONE, backbone=load_backbone("tiny-RN", pretrained=None), image_size=SIZE,
            shard_size=8, dtype="float16", progress=False,
            record=record_of(args(world, run), "val"), trust_record=True)
    result = cli("evaluate", "mlr", *args(world, run))
    assert_clear_error(result, val, "fingerprint.dtype: 'float32' then", "'float16' now", "pipeline train")
    assert not (run / "results" / "metrics" / "mlr.json").exists()
    lines = provenance.check(params_of(world, run))
    assert len(lines) == 1 and str(val) in lines[0]


@pytest.mark.parametrize("key, value, shown", [
    ("train.mfi.lambda", 0.5, "0.5 now"), ("model.softmax", "positive", "'positive' now"),
    ("train.lr", 0.02, "0.02 now")])
def test_projectors_trained_with_other_params_are_refused_naming_the_key(
        world: Path, tmp_path: Path, key: str, value: object, shown: str) -> None:
    run = copy_run(world, tmp_path)
    result = cli("evaluate", "mlr", *args(world, run, **{key.replace(".", "__"): value}))
    assert_clear_error(result, key, shown, "pipeline train", f"restore {key}")
    params = params_of(world, run, **{key.replace(".", "__"): value})
    assert [key in line for line in provenance.check(params)] == [True]


def test_where_and_how_fast_it_trained_does_not_count(world: Path, tmp_path: Path) -> None:
    run = copy_run(world, tmp_path)
    result = cli("evaluate", "mlr", *args(world, run, train__eval_every=3, train__cpu_threads=1))
    assert result.exit_code == 0, result.output
    assert (run / "results" / "metrics" / "mlr.json").exists()


@pytest.mark.parametrize("command", [["evaluate", "mfi"], ["evaluate", "mlr"], ["figures"]])
def test_another_backbone_is_refused_by_backbone_stages(world: Path, tmp_path: Path,
                                                        command: list[str]) -> None:
    run = copy_run(world, tmp_path)
    result = cli(*command, *args(world, run, backbone__init_seed=3))
    assert_clear_error(result, "backbone weights: 'random:0' then, 'random:3' now", "pipeline train")


def test_declared_digest_is_the_loaded_backbones(tmp_path: Path) -> None:
    assert provenance.declared_digest(BACKBONE) == load_backbone("tiny-RN", pretrained=None).weights_digest
    checkpoint = tmp_path / "tiny.pt"
    torch.save(load_backbone("tiny-RN", pretrained=None, init_seed=2).model.state_dict(), checkpoint)
    spec = BACKBONE.model_copy(update={"checkpoint": str(checkpoint)})
    loaded = load_backbone("tiny-RN", pretrained=None, checkpoint=checkpoint)
    assert provenance.declared_digest(spec) == loaded.weights_digest
    openai = BACKBONE.model_copy(update={"pretrained": "openai", "name": "RN50"})
    assert provenance.declared_digest(openai) == "RN50:openai"


def test_interrupted_retrain_leaves_no_projectors_and_report_marks_old_results(
        world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = copy_run(world, tmp_path)
    assert cli("evaluate", "mlr", *args(world, run)).exit_code == 0
    models = run / "cache" / "models"
    shutil.copyfile(models / "projectors.pt", models / "projectors-best.pt")
    params = params_of(world, run, train__mfi__lambda=0.5)  # a retrain with another lambda ...
    real_step, calls = train_stage.train_step, []

    def step_then_kill(*a, **kw):
        if not calls:  # deleted before the first epoch
            assert not list(models.glob("projectors*.pt"))
        calls.append(kw["epoch"])
        if kw["epoch"] == 2:
            raise KeyboardInterrupt  # ... killed in its second epoch
        return real_step(*a, **kw)

    monkeypatch.setattr(train_stage, "train_step", step_then_kill)
    with pytest.raises(KeyboardInterrupt):
        train_stage.run(params.model_copy(deep=True))
    assert sorted(p.name for p in models.iterdir()) == ["last.pt"]  # both projectors deleted
    for extra in ({"train__mfi__lambda": 0.5}, {}):  # neither the new nor the old params evaluate
        assert_clear_error(cli("evaluate", "mlr", *args(world, run, **extra)), "pipeline train")
    lines = provenance.check(params)
    assert len(lines) == 1 and "mlr.json" in lines[0] and "earlier run" in lines[0]


def test_results_older_than_the_projectors_are_marked(world: Path, tmp_path: Path) -> None:
    run = copy_run(world, tmp_path)
    assert cli("evaluate", "mlr", *args(world, run)).exit_code == 0
    params = params_of(world, run)
    assert provenance.check(params) == []
    assert cli("train", *args(world, run)).exit_code == 0  # newer projectors, same params
    (line,) = provenance.check(params)
    assert "mlr.json" in line and "mlr.md" in line and "pipeline evaluate" in line


def test_projectors_without_provenance_are_refused(world: Path, tmp_path: Path) -> None:
    run = copy_run(world, tmp_path)
    path = run / "cache" / "models" / "projectors-best.pt"  # the one evaluate.projectors (authors: best) reads
    blob = torch.load(path, weights_only=True)
    del blob["meta"]["provenance"]
    torch.save(blob, path)
    assert_clear_error(cli("evaluate", "mlr", *args(world, run)), path, "no provenance")
    with pytest.raises(TrainingError, match="no provenance"):
        provenance.require_current(params_of(world, run))


def test_report_check_names_a_damaged_projectors_file_instead_of_raising(world: Path,
                                                                         tmp_path: Path) -> None:
    run = copy_run(world, tmp_path)
    path = run / "cache" / "models" / "projectors-best.pt"  # the one evaluate.projectors (authors: best) reads
    path.write_bytes(path.read_bytes()[:100])
    (line,) = provenance.check(params_of(world, run))
    assert str(path) in line and "damaged" in line
