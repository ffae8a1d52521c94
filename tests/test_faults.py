"""Faults a user meets, through the `pipeline` CLI: each is survived or named, never a bare traceback.

- `pipeline train` SIGKILLed at seeded random points (a step, half-way through a checkpoint write)
  resumes (`--resume`) to the weights of an unbroken run; extraction SIGKILLed before a random zarr
  write, then re-run, gives the bytes of an unbroken run;
- a full disk / permission error during a shard write leaves that shard incomplete and names the
  store and the shard (simulated in the zarr store's `set`: chmod does not stop root, which CI is);
- fuzzed image files stop extraction naming the file, or are recorded as skipped;
- malformed COCO JSON / VOC XML and invalid parameters are one error naming the file or the key.
Injected extraction failures live in test_extract_faults.py; the cache's own write
ordering in test_cache.py; load_image per file kind in test_images.py.
"""
from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner, Result
from store_world import record_of

from pipeline.cli.app import main
from pipeline.config.schema import Backbone
from pipeline.data.datasets import load_multilabel
from pipeline.data.synthetic import make_bad_images, make_planted_coco, make_voc_layout
from pipeline.extraction.engine import extract
from pipeline.model.backbone import load_backbone
from pipeline.store.cache import FeatureCache
from pipeline.training.loop import load_projectors
from stages import train as train_stage

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "configs" / "params.yaml"
SIZE, CLASSES = 64, 4  # 64 px -> a 2x2 token grid: tiny and fast
BACKBONE = Backbone.model_validate({
    "name": "tiny-RN", "pretrained": None, "checkpoint": None, "sha256": None, "init_seed": 0,
    "image_size": SIZE, "precision": "fp32", "channels_last": False, "compile": False, "device": "cpu",
    "recalibrate_bn": False})


def cli(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def sets(tmp: Path, **extra: object) -> list[str]:
    """--params/--set arguments: tiny random backbone on generated data, everything under tmp."""
    values = {"paths.data": tmp / "data", "paths.cache": tmp / "cache", "paths.results": tmp / "results",
              "data.dataset": "synthetic", "backbone.name": "tiny-RN", "backbone.pretrained": "null",
              "backbone.image_size": SIZE, "backbone.device": "cpu", "backbone.channels_last": "false",
              "extract.num_workers": 0, "extract.shard_size": 4, "extract.views": 1, "train.device": "cpu",
              **{k.replace("__", "."): v for k, v in extra.items()}}
    return ["--params", str(PARAMS), *[a for k, v in values.items() for a in ("--set", f"{k}={v}")]]


def assert_clear_error(result: Result, *names: object) -> None:
    """Exit status 1 through click (not an escaped exception), one error line, each name in it."""
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert "Traceback" not in result.output and len(errors) == 1, result.output
    for name in names:
        assert str(name) in result.output, (name, result.output)


# -- SIGKILL at seeded random points of training and extraction ----------------------------------
EPOCHS, TRAIN_IMAGES, BATCH = 3, 16, 8
KILLS = range(3)  # three distinct kill points per run, drawn with a fixed seed
# seed 5 draws, for training, events 8, 6, 1: mid-epoch 3, half-way through checkpoint 2, before
# anything (then a plain re-run); for extraction it draws among ~all zarr writes.


def kill_point(events: int, draw: int, seed: int = 5) -> int:
    """The draw-th of three distinct event numbers in 1..events (seeded: the same in every run)."""
    return int(np.random.default_rng(seed).choice(np.arange(1, events + 1), len(KILLS), replace=False)[draw])

# Runs `pipeline <args>` and SIGKILLs itself at event number argv[1], counting each train step
# (killed before it) and each torch.save (killed after half the bytes, before the rename).
KILL_TRAINING = """
import os, signal, sys
import torch
import stages.train as stage
kill_at, count = int(sys.argv[1]), [0]
step, save = stage.train_step, torch.save
def killing_step(*args, **kwargs):
    count[0] += 1
    if count[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return step(*args, **kwargs)
def killing_save(obj, f, *args, **kwargs):
    save(obj, f, *args, **kwargs)
    count[0] += 1
    if count[0] == kill_at:
        f.flush()  # torch saves through a file object (pipeline.files.atomic_save)
        os.truncate(f.name, os.path.getsize(f.name) // 2)
        os.kill(os.getpid(), signal.SIGKILL)
stage.train_step, torch.save = killing_step, killing_save
from pipeline.cli.app import main
main(sys.argv[2:])
"""


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Train/val token stores of a planted dataset (extracted once, shared by the runs below)."""
    tmp = tmp_path_factory.mktemp("faults-train")
    data = make_planted_coco(tmp / "data" / "synthetic", TRAIN_IMAGES, 4, num_classes=CLASSES,
                             image_size=SIZE)
    backbone = load_backbone("tiny-RN", pretrained=None)
    for role in ("train", "val"):
        extract(load_multilabel("synthetic", data, role), tmp / "features" / f"{role}.zarr", BACKBONE,
                backbone=backbone, image_size=SIZE, shard_size=8, dtype="float32", progress=False,
                record=record_of(sets(tmp), role), trust_record=True)  # what the CLI's params read it as
    return tmp


def train_args(stores: Path, run: Path) -> list[str]:
    (run / "cache").mkdir(parents=True)
    (run / "cache" / "features").symlink_to(stores / "features")
    return ["train", *sets(run, paths__data=stores / "data", train__epochs=EPOCHS,
                           train__batch_size=BATCH, train__optimizer="adam", train__lr=0.01,
                           train__weight_decay=0, train__warmup_epochs=0)]


def projector_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_projectors(run / "cache" / "models" / "projectors.pt")[0].state_dict()


@pytest.fixture(scope="module")
def straight(stores: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    run = tmp_path_factory.mktemp("straight")
    result = cli(*train_args(stores, run))
    assert result.exit_code == 0, result.output
    return projector_weights(run)


@pytest.mark.slow
@pytest.mark.parametrize("draw", KILLS)
def test_training_sigkilled_at_a_random_point_resumes_to_the_uninterrupted_weights(
        stores: Path, straight: dict[str, torch.Tensor], tmp_path: Path, draw: int) -> None:
    events = EPOCHS * (TRAIN_IMAGES // BATCH) + EPOCHS + 1  # steps, checkpoints, projectors
    kill_at = kill_point(events, draw)
    args = train_args(stores, tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # same arithmetic as here
    proc = subprocess.run([sys.executable, "-c", KILL_TRAINING, str(kill_at), *args], cwd=ROOT,
                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]  # killed, not finished
    assert not (tmp_path / "cache" / "models" / "projectors.pt").exists()  # nothing half-trusted

    ckpt = tmp_path / "cache" / "models" / "last.pt"
    resumed = cli(*args, "--resume") if ckpt.exists() else cli(*args)  # killed before any epoch
    assert resumed.exit_code == 0, (kill_at, resumed.output)
    rows = (tmp_path / "results" / "plots" / "train.tsv").read_text().splitlines()[1:]
    assert [int(float(r.split("\t")[0])) for r in rows] == list(range(1, EPOCHS + 1))
    b = projector_weights(tmp_path)
    assert straight.keys() == b.keys()
    for k, value in straight.items():
        assert torch.equal(value, b[k]), (kill_at, k)


@pytest.mark.parametrize("objective", ["unmix", "unmix+infoclip"])
def test_training_steps_draw_nothing_from_the_global_torch_rng(
        stores: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, objective: str) -> None:
    """Why the checkpoint holds no global RNG state: a step draws nothing from it (no dropout; InfoCLIP samples tokens from its own
    generator, saved with the objective). The per-epoch val MI does draw (its throw-away LPAM's
    init, then set to the identity), but no number depends on those draws. A future dropout or
    unseeded sampling in a step fails this test: then checkpoint the RNG and test it."""
    drew = []
    step = train_stage.train_step

    def watched_step(*args, **kwargs):
        before = torch.get_rng_state()
        out = step(*args, **kwargs)
        drew.append(not torch.equal(before, torch.get_rng_state()))
        return out

    monkeypatch.setattr(train_stage, "train_step", watched_step)
    result = cli(*train_args(stores, tmp_path), "--set", f"train.objective={objective}")
    assert result.exit_code == 0, result.output
    assert len(drew) == EPOCHS * TRAIN_IMAGES // BATCH and not any(drew)


@pytest.mark.parametrize("objective", ["unmix", "unmix+infoclip"])
def test_resume_with_a_scrambled_global_rng_gives_the_same_weights(
        stores: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, objective: str) -> None:
    objective_set = ("--set", f"train.objective={objective}")
    straight = cli(*train_args(stores, tmp_path / "straight"), *objective_set)
    assert straight.exit_code == 0, straight.output
    args = [*train_args(stores, tmp_path / "resumed"), *objective_set]
    step = train_stage.train_step

    def crash_in_epoch_2(*a, **kw):
        if kw["epoch"] == 2:
            raise KeyboardInterrupt
        return step(*a, **kw)

    monkeypatch.setattr(train_stage, "train_step", crash_in_epoch_2)
    assert cli(*args).exit_code == 1  # click reports the KeyboardInterrupt as "Aborted!"
    monkeypatch.setattr(train_stage, "train_step", step)
    torch.manual_seed(12345)  # the global RNG is not where the interrupted run left it
    resumed = cli(*args, "--resume")
    assert resumed.exit_code == 0, resumed.output
    a, b = projector_weights(tmp_path / "straight"), projector_weights(tmp_path / "resumed")
    for k, value in a.items():
        assert torch.equal(value, b[k]), k


# Runs extract() on argv[2]'s dataset into argv[3], SIGKILLing itself before zarr's write number argv[1].
KILL_EXTRACTION = """
import os, signal, sys
import zarr
kill_at, count = int(sys.argv[1]), [0]
original = zarr.storage.LocalStore.set
async def killing_set(self, key, value):
    count[0] += 1
    if count[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return await original(self, key, value)
zarr.storage.LocalStore.set = killing_set
from pipeline.data.datasets import load_multilabel
from pipeline.extraction.engine import extract
from test_faults import BACKBONE, EXTRACT
extract(load_multilabel("synthetic", sys.argv[2], "train"), sys.argv[3], BACKBONE, **EXTRACT)
"""
EXTRACT = {"views": 2, "train_augment": True, "seed": 0, "image_size": SIZE, "shard_size": 4,
           "batch_size": 4, "dtype": "float32", "progress": False}


def store_files(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def extracted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, int]:
    """(dataset, reference store, number of zarr writes of an uninterrupted extraction)."""
    tmp = tmp_path_factory.mktemp("faults-extract")
    data = make_planted_coco(tmp / "synthetic", 10, 1, num_classes=CLASSES, image_size=SIZE)
    writes = [0]
    original = zarr.storage.LocalStore.set

    async def counting_set(self, key, value):
        writes[0] += 1
        return await original(self, key, value)

    zarr.storage.LocalStore.set = counting_set
    try:
        extract(load_multilabel("synthetic", data, "train"), tmp / "ref.zarr", BACKBONE, **EXTRACT)
    finally:
        zarr.storage.LocalStore.set = original
    return data, tmp / "ref.zarr", writes[0]


@pytest.mark.slow
@pytest.mark.parametrize("draw", KILLS)
def test_extraction_sigkilled_at_a_random_write_then_rerun_is_bit_identical(
        extracted: tuple[Path, Path, int], tmp_path: Path, draw: int) -> None:
    data, reference, writes = extracted
    kill_at = kill_point(writes, draw)
    store = tmp_path / "run.zarr"
    threads = str(torch.get_num_threads())  # the same thread count as here: the same rounding
    path = os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, "-c", KILL_EXTRACTION, str(kill_at), str(data), str(store)],
                          cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    extract(load_multilabel("synthetic", data, "train"), store, BACKBONE, **EXTRACT)  # the re-run
    a, b = store_files(reference), store_files(store)
    assert a.keys() == b.keys() and [k for k in a if a[k] != b[k]] == [], kill_at


# -- a failing shard write ------------------------------------------------------------------------
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES])
def test_failed_shard_write_leaves_it_incomplete_and_names_store_and_shard(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    make_planted_coco(tmp_path / "data" / "synthetic", 10, 2, num_classes=CLASSES, image_size=SIZE)
    store = tmp_path / "cache" / "features" / "train.zarr"  # 10 images, shards of 4 -> 3 shards
    original = zarr.storage.LocalStore.set

    async def failing_set(self, key, value):
        if key.startswith("tokens/c/1/"):  # shard 1's data file
            raise OSError(code, os.strerror(code), str(Path(self.root) / key))
        return await original(self, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", failing_set)
    args = ["extract-features", "--split", "train", *sets(tmp_path)]
    result = cli(*args)
    assert_clear_error(result, store, "shard 1", os.strerror(code))
    monkeypatch.undo()

    cache = FeatureCache.open(store)
    assert cache.incomplete_shards() == [1, 2] and cache.is_complete(0)
    assert not cache.valid[4:].any()  # nothing of the failed shard is trusted
    assert cli(*args).exit_code == 0  # space freed: the rerun fills in what is missing
    assert FeatureCache.open(store).incomplete_shards() == []


# -- fuzzed images --------------------------------------------------------------------------------
FUZZ = {  # make_bad_images kind -> what it stands for; each is written over a .jpg image file
    "random_bytes": "random bytes", "truncated_jpeg": "truncated JPEG", "zero_size": "0 bytes",
    "bomb_png": "PNG header declaring 100000x100000", "text_as_jpg": "text with an image extension",
    "corrupt_png": "PNG with a corrupt pixel stream"}
# random bytes and truncated JPEGs stopping extract() are in test_extract_faults.py; here they
# only join the skip run, through the CLI with DataLoader workers.


def fuzzed_dataset(tmp: Path, kinds: list[str]) -> list[Path]:
    """2 + 2 len(kinds) planted train images; image 1 + 2j replaced by fuzz kinds[j] (name kept)."""
    make_planted_coco(tmp / "data" / "synthetic", 2 + 2 * len(kinds), 1, num_classes=CLASSES,
                      image_size=SIZE)
    records = load_multilabel("synthetic", tmp / "data" / "synthetic", "train").records
    bad = make_bad_images(tmp / "bad")
    targets = []
    for j, kind in enumerate(kinds):
        target = records[1 + 2 * j].path
        shutil.copyfile(bad[kind], target)
        targets.append(target)
    shutil.copyfile(bad["rgba"], records[0].path)  # a valid PNG named .jpg: decoded by content
    return targets


@pytest.mark.parametrize("kind", [k for k in FUZZ if k not in ("random_bytes", "truncated_jpeg")])
def test_fuzzed_image_stops_extraction_naming_the_file(tmp_path: Path, kind: str) -> None:
    (target,) = fuzzed_dataset(tmp_path, [kind])
    result = cli("extract-features", "--split", "train", *sets(tmp_path))
    assert_clear_error(result, target, "--on-bad-image skip")
    cache = FeatureCache.open(tmp_path / "cache" / "features" / "train.zarr")
    assert not cache.complete.any()  # the bad image's shard (the only one) was never marked


def test_fuzzed_images_are_recorded_as_skipped(tmp_path: Path) -> None:
    targets = fuzzed_dataset(tmp_path, list(FUZZ))
    result = cli("extract-features", "--split", "train", "--on-bad-image", "skip",
                 *sets(tmp_path, extract__num_workers=2))  # bad files met in DataLoader workers
    assert result.exit_code == 0, result.output
    assert f"{len(FUZZ)} bad images skipped" in result.output
    cache = FeatureCache.open(tmp_path / "cache" / "features" / "train.zarr")
    ids = load_multilabel("synthetic", tmp_path / "data" / "synthetic", "train").records
    skipped = {ids[i].path for i in np.flatnonzero(cache.status == 1)}
    assert skipped == set(targets)  # each fuzzed file, and nothing else (the PNG named .jpg loads)
    assert cache.incomplete_shards() == [] and int(cache.valid.sum()) == len(ids) - len(FUZZ)
    assert not np.any(cache.tokens[np.flatnonzero(cache.status == 1)])  # skipped rows stay zero


# -- malformed annotations ------------------------------------------------------------------------
COCO_BREAKS = {
    "truncated": lambda s: s[: len(s) // 2],
    "a list, not an object": lambda s: "[]",
    "not UTF-8": lambda s: "\udcff",  # written with surrogateescape below: a raw 0xff byte
    "annotation without category_id": lambda s: s.replace('"category_id"', '"category"', 1),
    "image without file_name": lambda s: s.replace('"file_name"', '"name"', 1),
    "annotation of an unknown image": lambda s: s.replace('"image_id": ', '"image_id": 9999', 1),
}


@pytest.mark.parametrize("how", list(COCO_BREAKS))
def test_malformed_coco_json_is_one_error_naming_the_file(tmp_path: Path, how: str) -> None:
    root = make_planted_coco(tmp_path / "data" / "synthetic", 2, 1, num_classes=CLASSES, image_size=SIZE)
    ann = root / "annotations" / "instances_train2017.json"
    text = ann.read_text()
    assert '"category_id"' in text and '"file_name"' in text and '"image_id": ' in text
    ann.write_bytes(COCO_BREAKS[how](text).encode("utf-8", "surrogateescape"))
    assert_clear_error(cli("extract-features", "--split", "train", *sets(tmp_path)), ann)
    assert not (tmp_path / "cache").exists()  # refused before anything was written


VOC_BREAKS = {
    "truncated": lambda s: s[: len(s) // 2],
    "not XML": lambda s: "\x00\x01 not xml at all",
    "object without a name": lambda s: s.replace("<name>", "<label>", 1).replace("</name>", "</label>", 1),
    "difficult not a number": lambda s: s.replace("<difficult>0</difficult>", "<difficult>yes</difficult>", 1)
    .replace("<difficult>1</difficult>", "<difficult>yes</difficult>", 1),
}


@pytest.mark.parametrize("how", list(VOC_BREAKS))
def test_malformed_voc_xml_is_one_error_naming_the_file(tmp_path: Path, how: str) -> None:
    devkit = make_voc_layout(tmp_path / "data" / "voc2007", n_images=4, image_size=SIZE)
    first = (devkit / "VOC2007" / "ImageSets" / "Main" / "trainval.txt").read_text().split()[0]
    xml = devkit / "VOC2007" / "Annotations" / f"{first}.xml"
    text = xml.read_text()
    assert "<name>" in text and "<difficult>" in text
    xml.write_text(VOC_BREAKS[how](text))
    result = cli("extract-features", "--split", "train",
                 *sets(tmp_path, data__dataset="voc2007", data__train_split="trainval"))
    assert_clear_error(result, xml)
    assert not (tmp_path / "cache").exists()


# -- invalid parameters ---------------------------------------------------------------------------
@pytest.mark.parametrize("command, extra, key", [
    (["train"], ["--set", "train.lr=-0.002"], "train.lr"),
    (["ablate"], ["--set", "train.lr=-1"], "train.lr"),
    (["extract-features"], ["--set", "backbone.name=coca_ViT-B-32"], "backbone.name"),
    (["train"], ["--set", "backbone.name=RN102"], "backbone.name"),
    (["extract-features", "--views", "0"], [], "extract.views"),
    (["extract-features"], ["--set", "extract.views=0"], "extract.views"),
    (["train"], ["--set", "train.lrr=0.1"], "train.lrr"),
    (["train"], ["--set", "train.lr"], "train.lr"),
    (["ablate", "--lambda", "0.1,abc"], [], "--lambda"),
    (["ablate", "--alpha", "-1"], [], "--alpha"),
])
def test_invalid_parameter_is_rejected_by_the_cli_naming_the_key(tmp_path: Path, command: list[str],
                                                                 extra: list[str], key: str) -> None:
    result = cli(*command, *sets(tmp_path), *extra)
    assert result.exit_code in (1, 2) and isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output and key in result.output, result.output
    assert not (tmp_path / "cache").exists() and not (tmp_path / "results").exists()


def test_invalid_value_in_the_params_file_is_named(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(PARAMS.read_text().replace("  views: 4 ", "  views: 0 ", 1))
    assert "  views: 0 " in params.read_text()
    result = cli("extract-features", "--params", str(params))
    assert_clear_error(result, "extract.views")
