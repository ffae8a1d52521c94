"""User- and disk-caused failures end in one line naming the file or key and what to do, never a
bare traceback: damaged checkpoints and projectors, NaN tokens in the val store, a COCO category
without a name, a zip with a symbolic link, a full disk while a store is created, and any project
error type raised by a lazily imported module."""
from __future__ import annotations

import errno
import importlib
import inspect
import json
import os
import pkgutil
import shutil
import stat
import zipfile
from pathlib import Path

import click
import numpy as np
import pytest
import torch
import zarr
from test_faults import BACKBONE, CLASSES, SIZE, assert_clear_error, cli, sets
from test_provenance import args, params_of, trained_world

import pipeline
from pipeline.cli import app as cli_module
from pipeline.data.datasets import load_multilabel
from pipeline.data.download import Archive, DownloadError, download_dataset
from pipeline.data.synthetic import make_planted_coco
from pipeline.errors import UserError
from pipeline.extraction.engine import extract
from pipeline.model.backbone import load_backbone
from pipeline.store.cache import CacheError, FeatureCache
from pipeline.training import provenance
from pipeline.training.loop import TrainingError, load_projectors

POISONED = 5  # val image whose tokens the backbone returns as NaN


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained_world(tmp_path_factory.mktemp("tracebacks"))


def run_copy(world: Path, run: Path) -> Path:
    (run / "cache").mkdir(parents=True)
    shutil.copytree(world / "run" / "cache" / "models", run / "cache" / "models")
    (run / "cache" / "features").symlink_to(world / "features")
    return run


DAMAGE = {  # how a file is damaged -> its new bytes (torch raises a different error for each)
    "empty": lambda b: b"",
    "first bytes": lambda b: b[:10],
    "half": lambda b: b[: len(b) // 2],
    "last bytes missing": lambda b: b[:-10],
    "not a torch file": lambda b: b"garbage" * 100,
}


@pytest.mark.parametrize("how", list(DAMAGE))
def test_damaged_checkpoint_is_named_on_resume(world: Path, tmp_path: Path, how: str) -> None:
    run = run_copy(world, tmp_path)
    ckpt = run / "cache" / "models" / "last.pt"
    ckpt.write_bytes(DAMAGE[how](ckpt.read_bytes()))
    result = cli("train", *args(world, run), "--resume")
    if how == "not a torch file":  # "damaged" only for what torch.save wrote
        assert_clear_error(result, ckpt, "is not a training checkpoint", "check the path")
        return
    assert_clear_error(result, ckpt, "damaged", "delete it and re-run `pipeline train`")


@pytest.mark.parametrize("how", list(DAMAGE))
def test_damaged_projectors_are_named_by_evaluate(world: Path, tmp_path: Path, how: str) -> None:
    run = run_copy(world, tmp_path)
    path = run / "cache" / "models" / "projectors-best.pt"  # what evaluate.projectors (authors: best) reads
    path.write_bytes(DAMAGE[how](path.read_bytes()))
    said = ("is not a projectors file", "check the path") if how == "not a torch file" else \
        ("damaged", "pipeline train")  # "damaged" only for what torch.save wrote
    assert_clear_error(cli("evaluate", "mlr", *args(world, run)), path, *said)
    with pytest.raises(TrainingError, match=said[0]):
        load_projectors(path)
    assert not (run / "results" / "metrics" / "mlr.json").exists()


def segment_args(world: Path, run: Path) -> list[str]:
    image = min((world / "data" / "synthetic" / "val2017").glob("*.jpg"))
    return ["segment", str(image), "--classes", "person,car", "--out", str(run / "seg"), *args(world, run)]


def test_projectors_copied_over_the_best_are_refused_naming_the_file(world: Path, tmp_path: Path) -> None:
    """projectors.pt copied over projectors-best.pt: `evaluate` reported "best (epoch N)" for the
    last epoch's weights."""
    run = run_copy(world, tmp_path)
    models = run / "cache" / "models"
    shutil.copyfile(models / "projectors.pt", models / "projectors-best.pt")
    for command in (["evaluate", "mlr", *args(world, run)], segment_args(world, run)):
        assert_clear_error(cli(*command), models / "projectors-best.pt", "of the last epoch (epoch 2)",
                           "not the best one", "pipeline train")
    assert not (run / "results" / "metrics" / "mlr.json").exists()
    with pytest.raises(TrainingError, match="not the best one that its name says"):
        load_projectors(models / "projectors-best.pt")  # the API's and `segment --projectors`' loader
    with pytest.raises(TrainingError, match="not the best one that evaluate.projectors says"):
        load_projectors(models / "projectors.pt", which="best")
    lines = provenance.check(params_of(world, run))  # `report` lists it
    assert any("projectors-best.pt holds the projectors of the last epoch" in line for line in lines)


def test_non_finite_projector_weights_are_named_as_the_damaged_file(world: Path, tmp_path: Path) -> None:
    """NaN weights were blamed on the val store ("non-finite tokens ... delete the store"), and by
    `segment` on fp16 overflow."""
    run = run_copy(world, tmp_path)
    path = run / "cache" / "models" / "projectors-best.pt"
    blob = torch.load(path, weights_only=True)
    name = next(k for k, v in blob["head"].items() if v.is_floating_point())
    blob["head"][name][0] = float("nan")
    torch.save(blob, path)
    for command in (["evaluate", "mlr", *args(world, run)], segment_args(world, run)):
        result = cli(*command)
        assert_clear_error(result, path, "is damaged: non-finite values in its weights", name,
                           "delete it and re-run `pipeline train`")
        assert "val.zarr" not in result.output and "fp16" not in result.output
    with pytest.raises(TrainingError, match=f"{path} is damaged"):
        load_projectors(path)


def test_nan_tokens_stop_extraction_naming_the_store_and_image(world: Path, tmp_path: Path) -> None:
    """A backbone that returns NaN for one image (as fp16 overflow would): extraction stops naming the
    store and the image before anything of the shard is stored, so no later stage sees the NaN
    (before: train and evaluate ran a whole epoch and died in sklearn)."""
    backbone = load_backbone("tiny-RN", pretrained=None)
    real = backbone.spatial_tokens

    def nan_for_one(images: torch.Tensor) -> torch.Tensor:
        tokens = real(images)  # (B, T, D): the whole split is one batch here
        tokens[POISONED] = float("nan")
        return tokens

    backbone.spatial_tokens = nan_for_one
    data = load_multilabel("synthetic", world / "data" / "synthetic", "val")
    store = tmp_path / "features" / "val.zarr"
    with pytest.raises(CacheError, match=rf"val\.zarr: the backbone gave non-finite tokens for image ids "
                                         rf"{data.records[POISONED].image_id}\b"):
        extract(data, store, BACKBONE, backbone=backbone, image_size=SIZE, shard_size=8,
                dtype="float32", progress=False)
    assert not FeatureCache.open(store).complete.any()


@pytest.mark.parametrize("command", [["download"], ["download", "--dataset", "synthetic"],
                                     ["extract-features", "--split", "val"], ["evaluate", "seg"]])
@pytest.mark.parametrize("link", ["loop", "dangling"])
def test_a_dataset_folder_behind_a_broken_symbolic_link_is_one_line(tmp_path: Path, command: list[str],
                                                                   link: str) -> None:
    """data/synthetic -> itself: `download` ended in an OSError traceback (mkdir), `extract-features`
    said the annotations were "not found"."""
    (tmp_path / "data").mkdir()
    root = tmp_path / "data" / "synthetic"
    root.symlink_to("synthetic" if link == "loop" else tmp_path / "gone")
    result = cli(*command, *sets(tmp_path, evaluate__seg__datasets="[synthetic]",
                                 evaluate__zs_mlr__dataset="synthetic", evaluate__zs_mlr__split="val"))
    what = "is a symbolic link that loops (-> synthetic)" if link == "loop" else \
        f"is a symbolic link to {tmp_path / 'gone'}, which does not exist"
    assert_clear_error(result, f"{root} {what}", "point at the dataset's folder, or remove it")


@pytest.fixture(scope="module")
def all_bad(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """role -> a run whose `role` images are all undecodable, extracted with --on-bad-image skip."""
    runs = {}
    for role in ("train", "val"):
        run = tmp_path_factory.mktemp(f"all-bad-{role}")
        make_planted_coco(run / "data" / "synthetic", 8, 4, num_classes=CLASSES, image_size=SIZE)
        for image in (run / "data" / "synthetic" / f"{role}2017").glob("*.jpg"):
            image.write_bytes(b"not a jpeg")
        result = cli("extract-features", "--on-bad-image", "skip", *sets(run))
        assert result.exit_code == 0, result.output
        runs[role] = run
    return runs


@pytest.mark.parametrize("role, command", [
    ("train", ["train"]), ("val", ["train"]), ("train", ["ablate"]), ("val", ["ablate"]),
    ("val", ["evaluate", "mlr"])])
def test_every_image_skipped_as_bad_is_one_line(all_bad: dict[str, Path], role: str,
                                                command: list[str]) -> None:
    """All train images skipped: `train` died on an unset learning rate (UnboundLocalError), `ablate`
    exited 0 with a table of untrained heads; all val images: an empty numpy concatenate."""
    run = all_bad[role]
    result = cli(*command, *sets(run, train__epochs=2, train__batch_size=4, train__warmup_epochs=0,
                                 ablate__epochs=1, ablate__lambdas="[0.2]", ablate__alphas="[0.0]"))
    purpose = "train on" if role == "train" else "evaluate"
    assert_clear_error(result, run / "cache" / "features" / f"{role}.zarr",
                       f"all {8 if role == 'train' else 4} {role} images were skipped as bad",
                       f"nothing to {purpose}", "pipeline extract-features")
    assert not (run / "results" / "ablation" / "ablation.md").exists()


def test_coco_category_without_a_name_is_named(tmp_path: Path) -> None:
    root = make_planted_coco(tmp_path / "data" / "synthetic", 2, 2, num_classes=CLASSES, image_size=SIZE)
    ann = root / "annotations" / "instances_val2017.json"
    data = json.loads(ann.read_text())
    category = data["categories"][1]
    del category["name"]
    ann.write_text(json.dumps(data))
    result = cli("extract-features", "--split", "val", *sets(tmp_path))
    assert_clear_error(result, ann, f"category id {category['id']} has no 'name'")
    assert not (tmp_path / "cache").exists()


def test_zip_with_a_symbolic_link_is_refused_naming_the_member(tmp_path: Path) -> None:
    buf = tmp_path / "toy.zip"
    with zipfile.ZipFile(buf, "w") as zf:
        link = zipfile.ZipInfo("toy/images")  # a link where the archive then puts files
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "../elsewhere")
        zf.writestr("toy/images/a.jpg", b"x")
    archive = Archive("http://127.0.0.1:9/toy.zip", "toy.zip", ("toy",))
    with pytest.raises(DownloadError, match=r"toy.zip: refused member 'toy/images', a symbolic link"):
        download_dataset("toy", tmp_path, registry={"toy": (archive,)}, progress=False)
    assert not (tmp_path / "toy").exists() and not list(tmp_path.glob(".unpack-*"))


def test_full_disk_while_creating_a_store_is_one_line(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    make_planted_coco(tmp_path / "data" / "synthetic", 2, 4, num_classes=CLASSES, image_size=SIZE)
    store = tmp_path / "cache" / "features" / "val.zarr"
    original = zarr.storage.LocalStore.set

    async def full_disk(self, key, value):
        if Path(self.root).name != "val.zarr":  # the store's temporary directory: its creation
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(self.root) / key))
        return await original(self, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", full_disk)
    result = cli("extract-features", "--split", "val", *sets(tmp_path))
    assert_clear_error(result, store.parent, "val.zarr", os.strerror(errno.ENOSPC))
    monkeypatch.undo()
    assert not store.exists()  # no half-created store
    assert cli("extract-features", "--split", "val", *sets(tmp_path)).exit_code == 0
    assert FeatureCache.open(store).incomplete_shards() == []


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (ENOSPC on every write)")
def test_full_disk_while_saving_a_checkpoint_is_one_line_and_keeps_last_pt(world: Path, tmp_path: Path) -> None:
    """torch.save on a full disk raised its own RuntimeError (a 54-line traceback)."""
    run = run_copy(world, tmp_path)
    ckpt = run / "cache" / "models" / "last.pt"
    before = ckpt.read_bytes()
    (ckpt.parent / f".last.tmp-{os.getpid()}.pt").symlink_to("/dev/full")  # atomic_write's temp name
    result = cli("train", *args(world, run))
    assert_clear_error(result, f"{ckpt}: {os.strerror(errno.ENOSPC)}", "free some space",
                       "completed work is kept")
    assert ckpt.read_bytes() == before
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["last.pt"]  # no temporary file left


def test_every_project_error_type_becomes_one_line() -> None:
    """Each exception class defined in pipeline/ is a UserError the CLI prints as one line (or a
    declared internal one), so a new error type cannot escape as a traceback unnoticed."""
    internal = tuple(getattr(importlib.import_module(m), n) for m, n in cli_module._INTERNAL_ERRORS)
    seen = 0
    for info in pkgutil.walk_packages(pipeline.__path__, "pipeline."):
        module = importlib.import_module(info.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == info.name and issubclass(cls, Exception):
                seen += 1
                assert issubclass(cls, (UserError, *internal)), f"{info.name}.{cls.__name__} is not mapped"
    assert seen >= 10  # the walk reached the subpackages


def raising_stage(monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    """`stages.<any>` becomes a module whose run() raises `error`."""
    def run() -> None:
        raise error

    monkeypatch.setattr(importlib, "import_module", lambda name: type("Stage", (), {"run": run}))


@pytest.mark.parametrize("error", [
    CacheError("store x is bad"), OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/d/f.zarr"),
    OSError(errno.EROFS, os.strerror(errno.EROFS), "/ro/f")])
def test_run_stage_turns_user_and_disk_errors_into_one_line(error: Exception,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    raising_stage(monkeypatch, error)
    with pytest.raises(click.ClickException) as err:
        cli_module.run_stage("x")
    assert str(error.filename if isinstance(error, OSError) else error) in err.value.message


@pytest.mark.parametrize("error", [ZeroDivisionError("bug"), OSError(errno.EIO, "I/O error", "/f")])
def test_run_stage_leaves_bugs_and_other_os_errors_as_tracebacks(
        error: Exception, monkeypatch: pytest.MonkeyPatch) -> None:
    raising_stage(monkeypatch, error)
    with pytest.raises(type(error)):
        cli_module.run_stage("x")


def test_nan_check_is_exact() -> None:
    from pipeline.training.provenance import require_finite
    scores = np.zeros((4, 3))
    require_finite(scores, np.arange(4))
    scores[2, 1] = np.inf
    with pytest.raises(CacheError, match=r"1 images \(ids 12\)"):
        require_finite(scores, np.array([10, 11, 12, 13]))
