"""Direct shard reads (pipeline/store/shards.py) equal zarr's reads byte for byte, for every layout option,
and refuse a damaged chunk or index naming the store, the array, the shard and the image view."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from pipeline.store import shards
from pipeline.store.cache import CacheError, FeatureCache
from pipeline.store.create import create_or_open
from pipeline.store.shards import ShardReader

N, K, T, D, S, C = 11, 3, 5, 8, 4, 3  # 3 shards, the last partial


def make(path: Path, dtype: str = "float16", compressor: str | None = None) -> tuple[FeatureCache, np.ndarray]:
    rng = np.random.default_rng(0)
    cache = create_or_open(
        path, ids=[f"i{i}" for i in range(N)], labels=rng.integers(-1, 2, (N, C)), classnames=list("abc"),
        views=K, num_tokens=T, dim=D, fingerprint={"t": 1}, shard_size=S, dtype=dtype,
        compressor=compressor)
    tokens = rng.standard_normal((N, K, T, D)).astype(dtype)  # (N, K, T, D)
    tokens[2, 1] = 0  # a bad image's zeros, and repeated values that zstd compresses
    for s in range(cache.num_shards):
        a, b = cache.shard_range(s)
        cache.write_shard(s, tokens[a:b], np.zeros(b - a, np.int8))
    return cache, tokens


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("compressor", [None, "zstd"])
def test_direct_reads_equal_zarr_reads(tmp_path: Path, dtype: str, compressor: str | None) -> None:
    cache, tokens = make(tmp_path / "c.zarr", dtype, compressor)
    reader = ShardReader(cache)
    zarr_all = cache.tokens[:]  # zarr's own decoding, crc32c checked by its codec
    assert zarr_all.tobytes() == tokens.tobytes()
    for i in range(N):
        for v in range(K):
            out = np.empty((T, D), dtype=dtype)
            reader.read_into(i, v, out)
            assert out.tobytes() == zarr_all[i, v].tobytes(), (i, v)
    index, view = np.array([10, 0, 5, 5]), np.array([2, 1, 0, 2])
    assert reader.gather(index, view).tobytes() == zarr_all[index, view].tobytes()


def _chunk(cache: FeatureCache, i: int, v: int) -> tuple[int, int]:
    s = i // S
    offset, nbytes = ShardReader(cache).index(s)[(i - s * S) * K + v]
    return int(offset), int(nbytes)


@pytest.mark.parametrize("compressor", [None, "zstd"])
def test_flipped_byte_is_refused_naming_store_shard_image_view(tmp_path: Path, compressor) -> None:
    cache, _ = make(tmp_path / "c.zarr", compressor=compressor)
    offset, nbytes = _chunk(cache, 6, 2)  # shard 1
    f = cache.shard_file(1)
    raw = bytearray(f.read_bytes())
    raw[offset + nbytes // 2] ^= 0x10
    f.write_bytes(bytes(raw))
    with pytest.raises(CacheError) as err:
        ShardReader(cache).read_into(6, 2, np.empty((T, D), np.float16))
    msg = str(err.value)
    assert str(cache.path) in msg and "array tokens" in msg and "shard 1" in msg
    assert "image 6 view 2" in msg and "verify --repair" in msg
    other = np.empty((T, D), np.float16)
    ShardReader(cache).read_into(6, 1, other)  # its neighbours still read
    with pytest.raises(CacheError, match=r"array tokens, shard 1 .*damaged"):
        cache.read_shard(1)  # zarr's path too


def test_damaged_or_truncated_index_is_refused(tmp_path: Path) -> None:
    cache, _ = make(tmp_path / "c.zarr")
    f = cache.shard_file(0)
    raw = bytearray(f.read_bytes())
    raw[-10] ^= 0x01  # inside the index
    f.write_bytes(bytes(raw))
    with pytest.raises(CacheError, match=r"shard 0 .*index fails its crc32c"):
        ShardReader(cache).read_into(0, 0, np.empty((T, D), np.float16))
    with pytest.raises(CacheError, match="shard 0"):
        cache.read_shard(0)
    g = cache.shard_file(2)
    g.write_bytes(g.read_bytes()[:50])
    assert "truncated" in ShardReader(cache).check_shard(2)
    with pytest.raises(CacheError, match="shard 2"):
        cache.read_shard(2)


def _count_crc_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = shards.crc32c
    monkeypatch.setattr(shards, "crc32c", lambda data: calls.append(1) or real(data))
    return calls


@pytest.mark.parametrize("compressor", [None, "zstd"])
def test_a_chunk_is_checked_at_its_first_read_and_again_after_its_file_changes(
        tmp_path: Path, compressor: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    cache, tokens = make(tmp_path / "c.zarr", compressor=compressor)
    reader = ShardReader(cache)  # verify="first", training's default
    for s in range(cache.num_shards):
        reader.index(s)  # each index has its own crc32c: not counted below
    calls = _count_crc_calls(monkeypatch)
    per = 2 if compressor else 1  # zstd: the stored bytes' crc32c, then the values' (their key)
    index, view = np.repeat(np.arange(N), K), np.tile(np.arange(K), N)
    assert reader.gather(index, view).tobytes() == tokens.reshape(N * K, T, D).tobytes()
    assert len(calls) == N * K * per  # every chunk checked once...
    reader.refresh()  # ...no file changed...
    assert reader.gather(index, view).tobytes() == tokens.reshape(N * K, T, D).tobytes()
    assert len(calls) == N * K * per  # ...so a second pass reads proved chunks unchecked

    offset, nbytes = _chunk(cache, 6, 2)  # shard 1 (images 4..7), damaged in place after reading
    f = cache.shard_file(1)
    raw = bytearray(f.read_bytes())
    raw[offset + nbytes // 2] ^= 0x10
    f.write_bytes(bytes(raw))
    reader.refresh()  # the file's mtime/ctime changed: shard 1 is forgotten, the others are not
    with pytest.raises(CacheError, match="shard 1 .*image 6 view 2 fails its crc32c"):
        reader.read_into(6, 2, np.empty((T, D), np.float16))
    calls.clear()
    reader.gather(np.array([0, 4, 10]), np.array([0, 0, 0]))
    assert len(calls) == per  # image 4: shard 1 re-checked; images 0 and 10 still proved
    assert ShardReader(cache, verify="every").verify_shard(1) is not None  # `pipeline verify` sees it


def test_every_read_policy_checks_every_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache, _ = make(tmp_path / "c.zarr")
    reader = ShardReader(cache, verify="every")
    reader.gather(np.array([1]), np.array([1]))  # loads shard 0's index
    calls = _count_crc_calls(monkeypatch)
    for _ in range(3):
        reader.gather(np.array([1, 2]), np.array([1, 0]))
    assert len(calls) == 6
    with pytest.raises(ValueError, match="verify must be one of"):
        ShardReader(cache, verify="sometimes")


@pytest.mark.parametrize("compressor", [None, "zstd"])
def test_threaded_gather_equals_one_thread_and_names_a_damaged_chunk(
        tmp_path: Path, compressor: str | None) -> None:
    cache, tokens = make(tmp_path / "c.zarr", compressor=compressor)
    rng = np.random.default_rng(5)
    index, view = rng.integers(0, N, 40), rng.integers(0, K, 40)  # repeats, every shard
    one = ShardReader(cache).gather(index, view)
    threaded = ShardReader(cache, threads=3)
    assert threaded.gather(index, view).tobytes() == one.tobytes() == tokens[index, view].tobytes()
    offset = _chunk(cache, 9, 1)[0]  # shard 2
    f = cache.shard_file(2)
    raw = bytearray(f.read_bytes())
    raw[offset + 3] ^= 0x04
    f.write_bytes(bytes(raw))
    with pytest.raises(CacheError, match="shard 2 .*image 9 view 1 fails its crc32c"):
        ShardReader(cache, threads=3).gather(np.array([0, 9, 4, 1, 5, 8, 10]), np.array([0, 1, 2, 0, 1, 2, 0]))
    with pytest.raises(ValueError, match="threads must be >= 1"):
        ShardReader(cache, threads=0)


def _flip(path: Path, at: int, replace: bool) -> None:
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0x08
    if replace:  # a new file renamed over the old one, as zarr's own writes do
        tmp = path.with_name(path.name + ".new")
        tmp.write_bytes(bytes(raw))
        os.replace(tmp, path)
    else:
        path.write_bytes(bytes(raw))


@pytest.mark.parametrize("replace", [False, True])
def test_a_proved_chunk_is_checked_again_once_its_file_changed_within_an_epoch(
        tmp_path: Path, replace: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """No refresh between the reads: in place, the open file's fstat shows the write; replaced, the
    file is reopened (one descriptor kept open here, so reading shard 1 closes shard 0's)."""
    monkeypatch.setattr(shards, "_OPEN_FILES", 1)
    cache, _ = make(tmp_path / "c.zarr")
    reader = ShardReader(cache)
    out = np.empty((T, D), np.float16)
    reader.read_into(1, 2, out)  # shard 0: proved
    reader.read_into(5, 0, out)  # shard 1: shard 0's file is closed
    offset, nbytes = _chunk(cache, 1, 2)
    _flip(cache.shard_file(0), offset + nbytes // 3, replace)
    with pytest.raises(CacheError, match="shard 0 .*image 1 view 2 fails its crc32c"):
        reader.read_into(1, 2, out)


def test_unchecked_bytes_that_do_not_decompress_are_named(tmp_path: Path) -> None:
    cache, _ = make(tmp_path / "c.zarr", compressor="zstd")
    offset = _chunk(cache, 6, 0)[0]
    f = cache.shard_file(1)
    raw = bytearray(f.read_bytes())
    raw[offset: offset + 8] = b"\x00" * 8  # the zstd frame header
    f.write_bytes(bytes(raw))
    with pytest.raises(CacheError, match="shard 1 .*image 6 view 0 fails its crc32c"):
        ShardReader(cache, verify="none").read_into(6, 0, np.empty((T, D), np.float16))


@pytest.mark.parametrize("fingerprint", [{"t": 2}, {"t": 1}])  # other settings; same settings, other labels
def test_a_store_re_extracted_with_other_settings_under_a_reader_is_refused(
        tmp_path: Path, fingerprint: dict) -> None:
    cache, tokens = make(tmp_path / "c.zarr")
    reader = ShardReader(cache)
    out = np.empty((T, D), np.float16)
    reader.read_into(0, 0, out)
    rng = np.random.default_rng(1)
    other = create_or_open(  # same layout, other settings: chunks pass their crc32c
        cache.path, ids=[f"i{i}" for i in range(N)], labels=rng.integers(-1, 2, (N, C)),
        classnames=list("abc"), views=K, num_tokens=T, dim=D, fingerprint=fingerprint, shard_size=S,
        overwrite=True)
    for s in range(other.num_shards):
        a, b = other.shard_range(s)
        other.write_shard(s, tokens[a:b] + 1, np.zeros(b - a, np.int8))
    with pytest.raises(CacheError, match="re-extracted with other settings"):
        reader.read_into(0, 0, out)


@pytest.mark.parametrize("threads", [1, 3])
def test_a_batch_over_more_shards_than_files_kept_open_reads_in_groups(
        tmp_path: Path, threads: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shards, "_OPEN_FILES", 2)  # one shard's file per group, three shards
    cache, tokens = make(tmp_path / "c.zarr")
    index, view = np.array([10, 0, 5, 9, 1, 4, 8, 2]), np.array([2, 1, 0, 0, 2, 1, 1, 0])
    reader = ShardReader(cache, threads=threads)
    assert reader.gather(index, view).tobytes() == tokens[index, view].tobytes()
    assert len(reader._files) <= 2


def test_a_mapped_file_truncated_in_place_is_refused_not_read_past_its_end(tmp_path: Path) -> None:
    """Uncompressed chunks are copied from a mapping of the shard file: a file cut short in place
    after it was mapped is seen by the read's fstat (its size) before the mapping is touched, and
    refused naming it (reading the mapping past the new end would kill the process: SIGBUS)."""
    cache, tokens = make(tmp_path / "c.zarr")
    reader = ShardReader(cache)
    out = np.empty((T, D), np.float16)
    reader.read_into(5, 1, out)  # shard 1 indexed, mapped, chunk proved
    assert out.tobytes() == tokens[5, 1].tobytes() and 1 in reader._maps
    os.truncate(cache.shard_file(1), os.path.getsize(cache.shard_file(1)) // 2)
    damaged = r"shard 1 \(.*\): the shard index fails its crc32c"  # its end is no index now
    with pytest.raises(CacheError, match=damaged):
        reader.read_into(6, 0, out)
    with pytest.raises(CacheError, match=damaged):
        reader.gather(np.array([4, 7]), np.array([0, 2]))
