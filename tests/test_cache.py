"""Feature cache: round trip, crash safety, resume/fingerprint checks, multi-process writers, HDF5."""
from __future__ import annotations

import json
import multiprocessing as mp
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr

from pipeline.store.cache import CacheError, FeatureCache, FingerprintMismatch
from pipeline.store.create import create_or_open
from pipeline.store.export import export_hdf5

N, K, T, D, S, C = 10, 3, 5, 8, 4, 6  # 10 images in shards of 4 -> 3 shards, the last partial
FP = {"backbone": "tiny-RN", "weights": "abc123", "image_size": 96, "views": K, "aug": {"cutout": True}}


def spec(**change: object) -> dict:
    rng = np.random.default_rng(1)
    kw = {"ids": [f"img{i:03d}" for i in range(N)], "labels": rng.integers(-1, 2, (N, C)).astype(np.int8),
          "classnames": [f"class{c}" for c in range(C)], "views": K, "num_tokens": T, "dim": D,
          "fingerprint": FP, "shard_size": S}
    kw.update(change)
    return kw


def shard_data(s: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic tokens/status for shard s (image 5 is a bad image)."""
    start, stop = s * S, min((s + 1) * S, N)
    tokens = np.random.default_rng(100 + s).standard_normal((stop - start, K, T, D)).astype(np.float16)
    status = np.array([int(i == 5) for i in range(start, stop)], dtype=np.int8)
    return tokens, status


def write_all(cache: FeatureCache, shards: list[int] | None = None) -> None:
    for s in range(cache.num_shards) if shards is None else shards:
        cache.write_shard(s, *shard_data(s))


def assert_stores_identical(a: FeatureCache, b: FeatureCache) -> None:
    for name in ("tokens", "labels", "status", "complete"):
        x, y = a._group[name][:], b._group[name][:]
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), name  # bit-identical


def test_round_trip_shapes_dtypes_and_few_files(tmp_path: Path) -> None:
    kw = spec()
    cache = create_or_open(tmp_path / "c.zarr", **kw)
    assert cache.incomplete_shards() == [0, 1, 2]
    write_all(cache)
    text = {n: np.random.default_rng(i).standard_normal((C, D)) for i, n in enumerate(("positive", "negative", "plain"))}
    cache.write_text_features(text)

    c = FeatureCache.open(tmp_path / "c.zarr")
    expected = np.concatenate([shard_data(s)[0] for s in range(3)])  # (N, K, T, D)
    assert c.tokens.shape == (N, K, T, D) and c.tokens.dtype == np.float16
    assert np.array_equal(c.tokens[:], expected)
    assert np.array_equal(c.read_shard(2), expected[8:10])
    assert c.labels.dtype == np.int8 and np.array_equal(c.labels, kw["labels"])
    assert list(c.ids) == kw["ids"] and c.classnames == kw["classnames"]
    assert c.fingerprint == FP
    for n, v in text.items():
        assert c.text_features(n).dtype == np.float32
        assert np.array_equal(c.text_features(n), v.astype(np.float32))
    assert c.complete.all() and c.incomplete_shards() == []
    c.require_complete()
    assert np.array_equal(c.valid, np.arange(N) != 5)  # the bad image is excluded
    # Sharding: one data file per shard for tokens (plus its zarr.json), one per complete flag.
    token_files = [p for p in (tmp_path / "c.zarr" / "tokens").rglob("*") if p.is_file()]
    assert len(token_files) == c.num_shards + 1
    assert c.num_files() == sum(1 for p in (tmp_path / "c.zarr").rglob("*") if p.is_file())
    assert c.num_files() < 35  # + keys and inputs: a zarr.json and one chunk per shard each
    assert c.nbytes_stored() >= expected.nbytes  # uncompressed by default
    assert c.summary()["bad_images"] == 1 and c.summary()["complete_shards"] == 3


def test_zstd_and_float32_options(tmp_path: Path) -> None:
    c = create_or_open(tmp_path / "z.zarr", **spec(compressor="zstd", dtype="float32"))
    tokens, status = shard_data(0)
    c.write_shard(0, tokens, status)
    assert c.tokens.dtype == np.float32
    assert np.array_equal(c.read_shard(0), tokens.astype(np.float32))
    assert c.summary()["compressor"] == "zstd"


@pytest.mark.parametrize("failing", ["tokens", "status"])
def test_shard_marked_complete_only_after_its_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   failing: str) -> None:
    clean = create_or_open(tmp_path / "clean.zarr", **spec())
    write_all(clean)
    cache = create_or_open(tmp_path / "crash.zarr", **spec())
    write_all(cache, [0])

    original = zarr.storage.LocalStore.set

    async def crashing_set(self, key, value):  # a crash inside the data write of shard 1
        if key.startswith(f"{failing}/c/1"):
            raise OSError("disk full (injected)")
        return await original(self, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", crashing_set)
    with pytest.raises(CacheError, match=r"shard 1 .*injected"):
        cache.write_shard(1, *shard_data(1))
    monkeypatch.undo()

    reopened = FeatureCache.open(tmp_path / "crash.zarr")
    assert reopened.incomplete_shards() == [1, 2]
    assert not reopened.valid[4:8].any()  # nothing of the crashed shard is trusted
    with pytest.raises(CacheError, match="cache incomplete: 2 of 3 shards missing"):
        reopened.require_complete()
    resumed = create_or_open(tmp_path / "crash.zarr", **spec())
    write_all(resumed, resumed.incomplete_shards())
    assert_stores_identical(resumed, clean)


def test_rewriting_a_complete_shard_unmarks_it_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = create_or_open(tmp_path / "c.zarr", **spec())
    write_all(cache)
    original = zarr.storage.LocalStore.set

    async def crashing_set(self, key, value):
        if key.startswith("tokens/c/0"):
            raise OSError("injected")
        return await original(self, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", crashing_set)
    with pytest.raises(CacheError, match="left incomplete"):
        cache.write_shard(0, *shard_data(0))
    assert cache.incomplete_shards() == [0]


def test_same_fingerprint_resumes_and_shows_progress(tmp_path: Path) -> None:
    path = tmp_path / "c.zarr"
    write_all(create_or_open(path, **spec()), [0, 2])
    again = create_or_open(path, **spec(fingerprint={**FP, "views": K}))
    assert again.incomplete_shards() == [1] and list(again.complete) == [True, False, True]
    assert np.array_equal(again.read_shard(2), shard_data(2)[0])  # resume keeps finished work


@pytest.mark.parametrize("change, key, old, new", [
    ({"fingerprint": {**FP, "image_size": 448}}, "fingerprint.image_size", "96", "448"),
    ({"fingerprint": {**FP, "backbone": "RN101"}}, "fingerprint.backbone", "'tiny-RN'", "'RN101'"),
    ({"fingerprint": {**FP, "aug": {"cutout": False}}}, "fingerprint.aug.cutout", "True", "False"),
    ({"views": 2, "fingerprint": {**FP, "views": 2}}, "layout.views", "3", "2"),
    ({"fingerprint": {**FP, "extra": {}}}, "fingerprint.extra", "'<absent>'", "{}"),  # {} is a setting
])
def test_different_fingerprint_is_refused_naming_the_key(tmp_path: Path, change: dict, key: str,
                                                         old: str, new: str) -> None:
    path = tmp_path / "c.zarr"
    create_or_open(path, **spec())
    with pytest.raises(FingerprintMismatch) as err:
        create_or_open(path, **spec(**change))
    msg = str(err.value)
    assert str(path) in msg and f"{key}: stored {old}, requested {new}" in msg
    assert f"rm -r {path}" in msg and "--overwrite" in msg
    fresh = create_or_open(path, overwrite=True, **spec(**change))
    assert fresh.incomplete_shards() == [0, 1, 2] and fresh.fingerprint == change["fingerprint"]


def test_changed_labels_or_ids_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.zarr"
    kw = spec()
    create_or_open(path, **kw)
    labels = kw["labels"].copy()
    labels[3] = 1 - np.abs(labels[3])
    with pytest.raises(FingerprintMismatch, match="labels: 1 images differ"):
        create_or_open(path, **spec(labels=labels))
    with pytest.raises(FingerprintMismatch, match="ids"):
        create_or_open(path, **spec(ids=kw["ids"][::-1]))


@pytest.mark.parametrize("name", ["ids", "labels"])
def test_a_lost_ids_or_labels_chunk_is_repaired_only_from_the_same_dataset(tmp_path: Path, name: str) -> None:
    """A lost chunk is rewritten from the dataset only when the dataset's ids / labels have the digest
    recorded at creation: another image list of the same length must not inherit the tokens."""
    path = tmp_path / "c.zarr"
    kw = spec()
    write_all(create_or_open(path, **kw))
    other = {"ids": kw["ids"][::-1], "labels": kw["labels"][::-1].copy()}[name]
    for chunk in (path / name / "c").rglob("*"):
        if chunk.is_file():
            chunk.unlink()  # the chunk is lost: it reads as its (refused) fill value
    with pytest.raises(FingerprintMismatch, match=f"dataset's {name} differ"):
        create_or_open(path, **{**kw, name: other})
    repaired = create_or_open(path, **kw)  # the same dataset: repaired byte for byte
    assert list(repaired.ids) == kw["ids"] and np.array_equal(repaired.labels, kw["labels"])


def test_non_cache_directory_is_a_clear_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match="not a feature cache"):
        create_or_open(junk, **spec())
    with pytest.raises(CacheError, match="refusing to overwrite"):
        create_or_open(junk, overwrite=True, **spec())
    assert (junk / "notes.txt").read_text() == "mine"
    other = zarr.open_group(str(tmp_path / "other.zarr"), mode="w")
    other.attrs["x"] = 1
    with pytest.raises(CacheError, match="zarr group but not a feature cache"):
        FeatureCache.open(tmp_path / "other.zarr")
    with pytest.raises(CacheError, match="refusing to overwrite"):
        create_or_open(tmp_path / "other.zarr", overwrite=True, **spec())
    with pytest.raises(CacheError, match="no feature cache at"):
        FeatureCache.open(tmp_path / "missing.zarr")
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty directory is simply a place to create the cache
    assert create_or_open(empty, **spec()).num_shards == 3


def _write_in_worker(cache: FeatureCache, shards: list[int]) -> list[int]:
    write_all(cache, shards)
    return cache.incomplete_shards()


def test_two_processes_writing_disjoint_shards_equal_one_process(tmp_path: Path) -> None:
    single = create_or_open(tmp_path / "single.zarr", **spec())
    write_all(single)
    shared = create_or_open(tmp_path / "shared.zarr", **spec())
    assert pickle.loads(pickle.dumps(shared)).path == shared.path  # travels as its path
    with mp.get_context("spawn").Pool(2) as pool:
        pool.starmap(_write_in_worker, [(shared, [0, 2]), (shared, [1])])
    assert shared.incomplete_shards() == []
    assert_stores_identical(shared, single)


def test_export_hdf5_round_trips(tmp_path: Path) -> None:
    cache = create_or_open(tmp_path / "c.zarr", **spec())
    with pytest.raises(CacheError, match="incomplete"):
        export_hdf5(cache, tmp_path / "early.h5")
    assert not (tmp_path / "early.h5").exists()
    write_all(cache)
    text = {n: np.full((C, D), i, np.float32) for i, n in enumerate(("positive", "negative", "plain"))}
    cache.write_text_features(text)
    out = export_hdf5(cache, tmp_path / "out" / "cache.h5")
    assert sorted(p.name for p in out.parent.iterdir()) == ["cache.h5"]  # no temp file left
    with h5py.File(out, "r") as f:
        assert f["tokens"].dtype == np.float16 and f["tokens"].chunks == (1, 1, T, D)
        assert f["tokens"][:].tobytes() == cache.tokens[:].tobytes()
        assert np.array_equal(f["labels"][:], cache.labels) and np.array_equal(f["status"][:], cache.status)
        assert [s.decode() for s in f["ids"][:]] == list(cache.ids)
        for n, v in text.items():
            assert np.array_equal(f[f"text/{n}"][:], v)
        assert json.loads(f.attrs["fingerprint"]) == FP
        assert list(f.attrs["classnames"]) == cache.classnames


def test_every_array_carries_crc32c_and_tokens_one_chunk_per_view(tmp_path: Path) -> None:
    """Format 3: a crc32c codec on every chunk of every array (and on each shard's index)."""
    cache = create_or_open(tmp_path / "c.zarr", **spec())
    write_all(cache)
    cache.write_text_features({"positive": np.ones((C, D))})
    g = zarr.open_group(str(tmp_path / "c.zarr"), mode="r")
    sharding = g["tokens"].metadata.codecs[0]
    assert sharding.chunk_shape == (1, 1, T, D)
    assert [c.to_dict()["name"] for c in sharding.codecs][-1] == "crc32c"
    assert [c.to_dict()["name"] for c in sharding.index_codecs][-1] == "crc32c"
    for name in ("labels", "ids", "status", "complete", "keys", "inputs", "text/positive"):
        assert g[name].metadata.codecs[-1].to_dict()["name"] == "crc32c", name
    assert g["labels"].fill_value == -128 and np.isnan(g["text/positive"].fill_value)
    assert g.attrs["format_version"] == 3
