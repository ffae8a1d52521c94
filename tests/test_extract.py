"""Feature extraction: the store holds what the annotations and the seeded views say, it refuses
to mix settings, layout errors are one clear message, and Dask writes the bytes one process does."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.cli.app import main
from pipeline.config.schema import Backbone
from pipeline.data.augment import eval_view, train_view, view_seed
from pipeline.data.classes import VOC_CLASSES
from pipeline.data.datasets import load_multilabel
from pipeline.data.images import load_image
from pipeline.data.synthetic import make_planted_coco, make_voc_layout, planted_sample
from pipeline.extraction.engine import extract
from pipeline.store.cache import FeatureCache, FingerprintMismatch
from stages.download import write_random_backbone

ROOT = Path(__file__).resolve().parents[1]
SIZE, CLASSES, N_TRAIN, N_VAL = 64, 5, 10, 3
KW = {"views": 2, "train_augment": True, "seed": 0, "image_size": SIZE, "shard_size": 4,
      "batch_size": 8, "progress": False}


def backbone_params(checkpoint: Path | None, **change: object) -> Backbone:
    params = {"name": "tiny-RN", "pretrained": None, "sha256": None, "init_seed": 0,
              "checkpoint": str(checkpoint) if checkpoint else None, "image_size": SIZE,
              "precision": "fp32", "channels_last": False, "compile": False, "device": "cpu",
              "recalibrate_bn": False}
    params.update(change)
    return Backbone.model_validate(params)


@pytest.fixture(scope="module")
def coco(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A planted COCO-layout dataset and a tiny random CLIP with BatchNorm recalibrated on it
    (a fresh one maps every image to nearly the same tokens, which would make equality vacuous)."""
    root = make_planted_coco(tmp_path_factory.mktemp("coco") / "synthetic", N_TRAIN, N_VAL,
                             num_classes=CLASSES, image_size=SIZE)
    images = [r.path for r in load_multilabel("synthetic", root, "train").records]
    ckpt = write_random_backbone(root / "backbone.pt", "tiny-RN", 0, SIZE, images)
    return root, ckpt


@pytest.fixture(scope="module")
def train_store(coco, tmp_path_factory: pytest.TempPathFactory) -> tuple[object, FeatureCache]:
    root, ckpt = coco
    dataset = load_multilabel("synthetic", root, "train")
    store = tmp_path_factory.mktemp("store") / "train.zarr"
    return dataset, extract(dataset, store, backbone_params(ckpt), **KW)


def test_coco_store_matches_annotations_and_few_files(train_store) -> None:
    dataset, cache = train_store

    # Labels from the generator itself, not from the JSON the reader parsed.
    expected = np.zeros((N_TRAIN, CLASSES), np.int8)
    for i in range(N_TRAIN):
        for o in planted_sample(0, "train", i, SIZE, CLASSES)[1]:
            expected[i, o.cls] = 1
    store = FeatureCache.open(cache.path)
    grid = SIZE // 32
    assert store.tokens.shape == (N_TRAIN, 2, 1 + grid * grid, 64)  # (N, K, T, D), tiny-RN D=64
    assert store.tokens.dtype == np.float16 and store.labels.dtype == np.int8
    assert np.array_equal(store.labels, expected)
    assert list(store.ids) == [str(1 + i) for i in range(N_TRAIN)]  # COCO image ids 1..N
    assert store.classnames == dataset.classnames and (store.status == 0).all()
    assert store.complete.all() and store.num_shards == 3
    text = cache.text_features("positive")
    assert text.shape == (CLASSES, 64) and np.allclose(np.linalg.norm(text, axis=1), 1, atol=1e-5)
    # One file per shard of tokens: the store stays a modest number of files.
    token_files = [p for p in (cache.path / "tokens").rglob("*") if p.is_file()
                   and p.name != "zarr.json"]
    assert len(token_files) == store.num_shards


def test_recomputed_view_equals_stored_tokens(coco, train_store) -> None:
    dataset, cache = train_store
    ckpt = coco[1]
    from pipeline.model.backbone import load_backbone
    backbone = load_backbone("tiny-RN", pretrained=None, checkpoint=ckpt)
    # Shard 1 = images 4..7, recomputed independently from the seeds, in the same batch layout.
    views = torch.stack([train_view(load_image(dataset.records[i].path), SIZE, view_seed(0, i, k))
                         for i in range(4, 8) for k in range(2)])  # (8, 3, S, S)
    tokens = backbone.spatial_tokens(views).numpy().astype(np.float16).reshape(4, 2, 5, 64)
    stored = cache.tokens[4:8]  # (4, K, T, D)
    assert stored.tobytes() == tokens.tobytes()
    # ...and the check has teeth: views and images differ from one another in the store.
    assert np.abs(stored[:, 0] - stored[:, 1]).max() > 1e-2
    assert np.abs(stored[0] - stored[1]).max() > 1e-2


def test_voc_store_matches_annotations_with_plain_eval_view(tmp_path: Path) -> None:
    devkit = make_voc_layout(tmp_path / "voc2007", n_images=8, image_size=SIZE, difficult_rate=0.3)
    dataset = load_multilabel("voc2007", devkit.parent, "test")  # images 4..7 of the layout
    cache = extract(dataset, tmp_path / "test.zarr", backbone_params(None), image_size=SIZE,
                    shard_size=3, batch_size=4, dtype="float32", progress=False)
    expected = np.zeros((4, len(VOC_CLASSES)), np.int8)
    for row, i in enumerate(range(4, 8)):
        for o in planted_sample(0, "trainval", i, SIZE, len(VOC_CLASSES), 0.3)[1]:
            expected[row, o.cls] |= not o.difficult  # difficult objects do not make a label
    assert cache.tokens.shape == (4, 1, 5, 64) and cache.tokens.dtype == np.float32
    assert np.array_equal(cache.labels, expected)
    assert list(cache.ids) == [f"2007_{i:06d}" for i in range(4, 8)]
    assert cache.classnames == list(VOC_CLASSES)
    assert cache.fingerprint["augment"] == {"enabled": False, "interpolation": "bicubic"}
    from pipeline.model.backbone import load_backbone
    plain = torch.stack([eval_view(load_image(r.path), SIZE) for r in dataset.records[3:4]])
    expected_tokens = load_backbone("tiny-RN", pretrained=None).spatial_tokens(plain)  # (1, T, D)
    assert np.allclose(cache.tokens[3, 0], expected_tokens[0].numpy(), atol=1e-6)


def test_changed_parameter_is_refused_naming_the_key(coco, tmp_path: Path) -> None:
    root, _ = coco
    dataset = load_multilabel("synthetic", root, "val")
    kw = dict(KW, shard_size=2)
    store = tmp_path / "val.zarr"
    extract(dataset, store, backbone_params(None), **kw)
    before = {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()}
    for change, key in (({"image_size": 96}, "fingerprint.image_size: stored 64, requested 96"),
                        ({"views": 3}, "fingerprint.views: stored 2, requested 3")):
        with pytest.raises(FingerprintMismatch, match=key):
            extract(dataset, store, backbone_params(None), **{**kw, **change})
    other = backbone_params(None, init_seed=1)  # other weights: same architecture, other digest
    with pytest.raises(FingerprintMismatch, match="fingerprint.backbone.weights_digest"):
        extract(dataset, store, other, **kw)
    assert before == {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()}  # untouched
    # The same settings resume (nothing left to do); restart_on_change starts afresh.
    stats: dict = {}
    extract(dataset, store, backbone_params(None), **kw, stats=stats)
    assert stats["images"] == 0
    fresh = extract(dataset, store, other, **{**kw, "views": 3}, restart_on_change=True,
                    stats=stats)
    assert stats["images"] == N_VAL and fresh.complete.all() and fresh.views == 3
    assert fresh.fingerprint["backbone"]["weights_digest"] == "random:1"


def _cli(tmp_path: Path, data: Path, *sets: str):
    args = ["extract-features", "--params", str(ROOT / "configs" / "params.yaml"),
            "--split", "train",
            "--set", f"paths.data={data}", "--set", f"paths.cache={tmp_path / 'cache'}",
            "--set", "backbone.name=tiny-RN", "--set", "backbone.pretrained=null",
            "--set", f"backbone.image_size={SIZE}", "--set", "extract.num_workers=0"]
    for item in sets:
        args += ["--set", item]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output and result.output.count("Error:") == 1
    return result.output


def test_missing_annotation_file_or_image_folder_is_one_clear_error(tmp_path: Path) -> None:
    data = tmp_path / "data"
    root = make_planted_coco(data / "synthetic", 2, 2, num_classes=2, image_size=SIZE)
    (root / "annotations" / "instances_train2017.json").unlink()
    out = _cli(tmp_path, data, "data.dataset=synthetic")
    assert str(root / "annotations" / "instances_train2017.json") in out

    root = make_planted_coco(data / "synthetic", 2, 2, num_classes=2, image_size=SIZE)
    for f in (root / "train2017").iterdir():
        f.unlink()
    (root / "train2017").rmdir()
    assert str(root / "train2017") in _cli(tmp_path, data, "data.dataset=synthetic")

    devkit = make_voc_layout(data / "voc2007", n_images=4, image_size=SIZE)
    jpegs = devkit / "VOC2007" / "JPEGImages"
    for f in jpegs.iterdir():
        f.unlink()
    jpegs.rmdir()
    out = _cli(tmp_path, data, "data.dataset=voc2007", "data.train_split=trainval")
    assert str(jpegs) in out
    assert not (tmp_path / "cache").exists()  # nothing written before the layout is checked


@pytest.mark.slow
@pytest.mark.parametrize("transforms", ["workers", "device"])
def test_two_dask_workers_write_the_same_bytes_as_one_process(coco, tmp_path: Path,
                                                              transforms: str) -> None:
    root, ckpt = coco
    dataset = load_multilabel("synthetic", root, "val")
    kw = dict(KW, shard_size=2, transforms=transforms)  # 3 images -> 2 shards -> 2 tasks
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # Dask workers run one thread each; oneDNN rounds per thread count
    try:
        one = extract(dataset, tmp_path / "one.zarr", backbone_params(ckpt), **kw)
    finally:
        torch.set_num_threads(threads)
    environ = dict(os.environ)
    two = extract(dataset, tmp_path / "dask.zarr", backbone_params(ckpt), **kw, workers=2)
    assert dict(os.environ) == environ  # LocalCluster's OMP_NUM_THREADS=1 etc. do not leak
    for name in ("tokens", "status", "complete", "labels", "text/positive", "text/plain"):
        a, b = one._group[name][:], two._group[name][:]
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), name
    assert two.complete.all() and np.abs(two.tokens[:]).max() > 0


def test_num_workers_auto_is_the_cores_this_process_may_use() -> None:
    import os

    from pipeline.extraction.engine import resolve_num_workers

    assert resolve_num_workers("auto") == len(os.sched_getaffinity(0)) >= 1
    assert resolve_num_workers(3) == 3 and resolve_num_workers(0) == 0
