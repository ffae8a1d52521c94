"""Faults during extraction: an injected failure or a SIGKILL part-way, then a re-run, gives the
bytes of an uninterrupted run; corrupt and truncated JPEGs stop with the file's name or are
recorded and skipped."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.cli.app import main
from pipeline.config.schema import Backbone
from pipeline.data.datasets import load_multilabel
from pipeline.data.images import BadImageError, load_image
from pipeline.data.synthetic import make_bad_images, make_planted_coco
from pipeline.extraction.distributed import _BACKBONES, extract_shard_task
from pipeline.extraction.engine import InjectedFailure, ViewSpec, extract
from pipeline.store.cache import FeatureCache

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64
BACKBONE = Backbone.model_validate({
    "name": "tiny-RN", "pretrained": None, "checkpoint": None, "sha256": None, "init_seed": 0,
    "image_size": SIZE, "precision": "fp32", "channels_last": False, "compile": False, "device": "cpu",
    "recalibrate_bn": False})
KW = {"views": 2, "train_augment": True, "seed": 0, "image_size": SIZE, "shard_size": 4,
      "batch_size": 4, "progress": False}  # 2 images per forward, 2 batches per shard


def files(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes()
            for p in sorted(store.rglob("*")) if p.is_file()}


def assert_same_bytes(a: Path, b: Path) -> None:
    fa, fb = files(a), files(b)
    assert fa.keys() == fb.keys()
    assert [k for k in fa if fa[k] != fb[k]] == []


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_planted_coco(tmp_path_factory.mktemp("data") / "synthetic", 24, 10,
                             num_classes=4, image_size=SIZE)


def test_injected_failure_then_rerun_is_bit_identical(data: Path, tmp_path: Path) -> None:
    dataset = load_multilabel("synthetic", data, "val")  # 10 images -> shards of 4, 4, 2
    reference = extract(dataset, tmp_path / "ref.zarr", BACKBONE, **KW)
    with pytest.raises(InjectedFailure):
        extract(dataset, tmp_path / "run.zarr", BACKBONE, **KW, fail_after_shards=1)
    broken = FeatureCache.open(tmp_path / "run.zarr")
    assert broken.complete.tolist() == [True, False, False]
    assert np.array_equal(broken.tokens[:4], reference.tokens[:4])  # complete shard: its data
    assert np.array_equal(broken.tokens[4:6], reference.tokens[4:6])  # data written, not marked
    # never written: NaN (the fill value), so a lost shard file can never pass for data
    assert np.isnan(broken.tokens[6:]).all() and (broken.status[4:] == -1).all()

    # zarr writes a file under a temporary name, then renames it: a kill mid-write leaves that.
    (tmp_path / "run.zarr" / "tokens" / "c" / "1" / "0" / "0" / "0.7f3a.partial").write_bytes(b"x")
    stats: dict = {}
    extract(dataset, tmp_path / "run.zarr", BACKBONE, **KW, stats=stats)
    assert stats["images"] == 6  # shard 0 was kept, shards 1 and 2 redone
    assert_same_bytes(tmp_path / "ref.zarr", tmp_path / "run.zarr")


SLOW_WRITER = """
import sys, time
from pipeline.store.cache import FeatureCache
original = FeatureCache.write_shard
def slow_write(self, s, tokens, status, *inputs):
    start, stop = self.shard_range(s)
    self.tokens[start:stop] = tokens  # the data lands, then a pause before the completion mark
    time.sleep(0.5)                  # so the kill most likely falls between the two
    original(self, s, tokens, status, *inputs)
FeatureCache.write_shard = slow_write
from pipeline.cli.app import main
main(sys.argv[1:])
"""


def _any_shard_complete(store: Path) -> bool:
    try:
        return bool(FeatureCache.open(store).complete.any())
    except Exception:
        return False


@pytest.mark.slow
def test_killed_subprocess_then_rerun_is_bit_identical(data: Path, tmp_path: Path) -> None:
    def args(cache: Path) -> list[str]:
        sets = [f"paths.data={data.parent}", f"paths.cache={cache}", "data.dataset=synthetic",
                "backbone.name=tiny-RN", "backbone.pretrained=null", f"backbone.image_size={SIZE}",
                "backbone.channels_last=false", "backbone.device=cpu", "extract.views=2",
                "extract.shard_size=4", "extract.batch_size=4", "extract.num_workers=0"]
        return ["extract-features", "--params", str(ROOT / "configs" / "params.yaml"),
                "--split", "train", *[x for s in sets for x in ("--set", s)]]

    threads = str(torch.get_num_threads())  # the same thread count as here: the same rounding
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    log = (tmp_path / "stderr.txt").open("wb")  # a file, not a pipe: a full pipe would block it
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, *args(tmp_path / "run")], env=env,
                            stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    store = tmp_path / "run" / "features" / "train.zarr"
    deadline = time.monotonic() + 240
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if _any_shard_complete(store):
                break
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "stderr.txt").read_text()[-2000:]

    killed = FeatureCache.open(store)
    done = killed.complete
    assert 1 <= done.sum() < killed.num_shards  # interrupted part-way
    ref = CliRunner().invoke(main, args(tmp_path / "ref"))
    assert ref.exit_code == 0, ref.output
    reference = FeatureCache.open(tmp_path / "ref" / "features" / "train.zarr")
    for s in np.flatnonzero(done):  # no shard is marked complete without its data
        assert np.array_equal(killed.read_shard(s), reference.read_shard(s))

    rerun = CliRunner().invoke(main, args(tmp_path / "run"))
    assert rerun.exit_code == 0, rerun.output
    assert_same_bytes(tmp_path / "ref" / "features" / "train.zarr", store)


@pytest.fixture
def dirty(data: Path, tmp_path: Path) -> tuple[Path, dict[int, Path]]:
    """A copy of the val split with a truncated JPEG (image 1), a corrupt one (image 5) and a
    CMYK JPEG (image 6, must be converted, not rejected)."""
    root = make_planted_coco(tmp_path / "dirty", 24, 10, num_classes=4, image_size=SIZE)
    records = load_multilabel("synthetic", root, "val").records
    bad = make_bad_images(tmp_path / "bad")
    for i, kind in ((1, "truncated_jpeg"), (5, "random_bytes"), (6, "cmyk")):
        records[i].path.write_bytes(bad[kind].read_bytes())
    return root, {1: records[1].path, 5: records[5].path}


@pytest.mark.parametrize("transforms", ["workers", "device"])
def test_bad_images_stop_naming_the_file_or_are_recorded_and_skipped(data, dirty, tmp_path,
                                                                      transforms) -> None:
    root, bad = dirty
    dataset = load_multilabel("synthetic", root, "val")
    kw = {**KW, "transforms": transforms}  # device: reasons and zeros exactly as the workers'
    with pytest.raises(BadImageError, match=str(bad[1])) as err:
        extract(dataset, tmp_path / "error.zarr", BACKBONE, **kw)
    assert "truncated" in str(err.value).lower() and "--on-bad-image skip" in str(err.value)
    assert not FeatureCache.open(tmp_path / "error.zarr").complete.any()

    stats: dict = {}
    cache = extract(dataset, tmp_path / "skip.zarr", BACKBONE, **kw, on_bad_image="skip",
                    stats=stats)
    assert cache.status.tolist() == [0, 1, 0, 0, 0, 1, 0, 0, 0, 0] and cache.complete.all()
    assert [p for p, _ in stats["bad"]] == [str(bad[1]), str(bad[5])]
    for path, reason in stats["bad"]:
        with pytest.raises(BadImageError) as direct:
            load_image(path)
        assert reason == direct.value.reason  # load_image's own words, either way
    tokens = cache.tokens[:]
    assert not tokens[[1, 5]].any()
    clean = extract(load_multilabel("synthetic", data, "val"), tmp_path / "clean.zarr", BACKBONE,
                    **kw).tokens[:]
    unchanged = [0, 2, 3, 4, 7, 8, 9]  # other images' tokens do not depend on their batch-mates
    assert np.array_equal(tokens[unchanged], clean[unchanged])
    assert tokens[6].any() and not np.array_equal(tokens[6], clean[6])  # CMYK: converted, its own


def test_dask_shard_task_reports_bad_image_and_loads_backbone_once(dirty, tmp_path) -> None:
    root, bad = dirty
    dataset = load_multilabel("synthetic", root, "val")
    with pytest.raises(BadImageError):
        extract(dataset, tmp_path / "t.zarr", BACKBONE, **KW)  # creates the store, no shard done
    store = str(tmp_path / "t.zarr")
    spec = ViewSpec(tuple(str(r.path) for r in dataset.records), 2, True, 0, SIZE)
    digest = "random:0"
    _BACKBONES.clear()
    result = extract_shard_task(store, 0, spec.subset(0, 4), BACKBONE, digest, 2, "error")
    assert result == {"shard": 0, "error": (str(bad[1]), result["error"][1])}
    assert not FeatureCache.open(store).is_complete(0)
    result = extract_shard_task(store, 1, spec.subset(4, 8), BACKBONE, digest, 2, "skip")
    assert result["images"] == 4 and [p for p, _ in result["bad"]] == [str(bad[5])]
    cache = FeatureCache.open(store)
    assert cache.complete.tolist() == [False, True, False]
    assert cache.status[4:8].tolist() == [0, 1, 0, 0]
    assert len(_BACKBONES) == 1  # two tasks, one model
    with pytest.raises(RuntimeError, match="differ"):
        extract_shard_task(store, 2, spec.subset(8, 10), BACKBONE, "random:7", 2, "skip")
