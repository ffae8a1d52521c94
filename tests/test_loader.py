"""TokenLoader: each valid image once per epoch, deterministic in (seed, epoch), both I/O modes agree."""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.store.cache import CacheError, FeatureCache
from pipeline.store.create import create_or_open
from pipeline.store.loader import TokenLoader

N, K, T, D, S, C = 45, 3, 4, 6, 8, 5  # 6 shards, the last with 5 images
BAD = {3, 17, 40}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[FeatureCache, np.ndarray]:
    rng = np.random.default_rng(0)
    cache = create_or_open(
        tmp_path_factory.mktemp("loader") / "c.zarr", ids=[str(i) for i in range(N)],
        labels=rng.integers(-1, 2, (N, C)).astype(np.int8), classnames=[f"c{i}" for i in range(C)],
        views=K, num_tokens=T, dim=D, fingerprint={"test": 1}, shard_size=S)
    tokens = rng.standard_normal((N, K, T, D)).astype(np.float16)  # (N, K, T, D)
    status = np.array([int(i in BAD) for i in range(N)], dtype=np.int8)
    for s in range(cache.num_shards):
        a, b = cache.shard_range(s)
        cache.write_shard(s, tokens[a:b], status[a:b])
    return cache, tokens


def run_epoch(loader: TokenLoader, e: int) -> tuple[np.ndarray, np.ndarray, list]:
    batches = list(loader.epoch(e))
    return (np.concatenate([b.index for b in batches]), np.concatenate([b.view for b in batches]), batches)


def check_tokens(batches: list, tokens: np.ndarray, labels: np.ndarray) -> None:
    for b in batches:
        assert b.tokens.dtype == torch.float16 and b.tokens.shape == (len(b.index), T, D)  # store dtype
        assert b.tokens.numpy().tobytes() == tokens[b.index, b.view].tobytes()
        on = b.tokens_on("cpu")
        assert on.dtype == torch.float32 and np.array_equal(on.numpy(), tokens[b.index, b.view].astype(np.float32))
        assert np.array_equal(b.labels.numpy(), labels[b.index])


@pytest.mark.parametrize("in_memory", [True, False])
@pytest.mark.parametrize("policy", ["cycle", "random"])
def test_each_valid_image_once_per_epoch_with_stored_tokens(store, in_memory: bool, policy: str) -> None:
    cache, tokens = store
    loader = TokenLoader(cache, batch_size=7, view_policy=policy, seed=3, in_memory=in_memory)
    valid = np.array(sorted(set(range(N)) - BAD))
    for e in range(3):
        index, view, batches = run_epoch(loader, e)
        assert np.array_equal(np.sort(index), valid)  # exactly once, bad images excluded
        assert len(batches) == len(loader) == -(-len(valid) // 7)
        assert all(len(b.index) == 7 for b in batches[:-1])
        check_tokens(batches, tokens, cache.labels)
        if policy == "cycle":
            assert (view == e % K).all()
        else:
            assert np.array_equal(view, loader.views(e)[index]) and len(np.unique(view)) == K


def test_order_is_deterministic_per_epoch_and_replayable(store) -> None:
    cache, _ = store
    for in_memory in (True, False):
        a = TokenLoader(cache, batch_size=5, seed=1, in_memory=in_memory)
        first = [run_epoch(a, e)[:2] for e in range(3)]
        b = TokenLoader(cache, batch_size=5, seed=1, in_memory=in_memory)
        idx2, view2, batches2 = run_epoch(b, 2)  # epoch 2 directly, as after a resume
        assert np.array_equal(idx2, first[2][0]) and np.array_equal(view2, first[2][1])
        again = run_epoch(TokenLoader(cache, batch_size=5, seed=1, in_memory=not in_memory), 2)
        assert all(torch.equal(x.tokens, y.tokens) for x, y in zip(batches2, again[2]))
        assert not np.array_equal(first[0][0], first[1][0])  # a new order each epoch
        assert not np.array_equal(first[0][1], first[1][1])  # and new random views
        other_seed = run_epoch(TokenLoader(cache, batch_size=5, seed=2, in_memory=in_memory), 0)[0]
        assert not np.array_equal(other_seed, first[0][0])


def test_memory_and_streaming_serve_identical_epochs(store) -> None:
    """An epoch is a function of (seed, epoch) only: the two I/O modes give the same batches."""
    cache, tokens = store
    for e in range(3):
        mem = run_epoch(TokenLoader(cache, batch_size=6, seed=4, in_memory=True), e)
        stream = run_epoch(TokenLoader(cache, batch_size=6, seed=4, in_memory=False), e)
        assert np.array_equal(mem[0], stream[0]) and np.array_equal(mem[1], stream[1])
        assert [len(b.index) for b in mem[2]] == [len(b.index) for b in stream[2]]
        for a, b in zip(mem[2], stream[2]):
            assert torch.equal(a.tokens, b.tokens) and torch.equal(a.labels, b.labels)
        check_tokens(stream[2], tokens, cache.labels)
    ordered = [run_epoch(TokenLoader(cache, batch_size=6, shuffle=False, in_memory=m), 0)[0] for m in (True, False)]
    assert np.array_equal(ordered[0], ordered[1]) and np.array_equal(ordered[0], np.sort(ordered[0]))


@pytest.mark.parametrize("prefetch", [0, 2])
@pytest.mark.parametrize("in_memory", [True, False])
def test_kept_batches_are_never_overwritten_and_dropped_ones_reused(store, in_memory: bool,
                                                                    prefetch: int) -> None:
    """Batch buffers are pooled: one is filled again only once no batch or tensor views it. A
    batch and a slice of another kept over three epochs still hold their tokens; once the
    consumer drops its batches, epochs run in at most prefetch + 3 buffers (none faulted anew)."""
    cache, tokens = store
    loader = TokenLoader(cache, batch_size=5, seed=2, in_memory=in_memory, prefetch=prefetch,
                         pin_memory=False)
    first = list(loader.epoch(0))
    kept, part, part_of = first[0], first[1].tokens[1:3], first[1]
    expected = kept.tokens.clone(), part.clone(), tokens[part_of.index[1:3], part_of.view[1:3]]
    del first, part_of
    for e in range(1, 4):
        for _ in loader.epoch(e):
            pass
    assert torch.equal(kept.tokens, expected[0]) and torch.equal(part, expected[1])
    check_tokens([kept], tokens, cache.labels)
    assert part.numpy().tobytes() == expected[2].tobytes()
    del kept, part
    buffers = {b.tokens.data_ptr() for e in range(4, 8) for b in loader.epoch(e)}
    assert len(buffers) <= prefetch + 3


def test_reader_threads_serve_the_same_batches(store) -> None:
    cache, tokens = store
    one = run_epoch(TokenLoader(cache, batch_size=8, seed=3, in_memory=False), 2)
    three = run_epoch(TokenLoader(cache, batch_size=8, seed=3, in_memory=False, read_threads=3), 2)
    assert np.array_equal(one[0], three[0]) and np.array_equal(one[1], three[1])
    check_tokens(three[2], tokens, cache.labels)


def test_read_threads_auto_is_one_per_four_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.store.loader import resolve_read_threads
    for cores, threads in ((2, 1), (4, 1), (16, 4), (64, 8)):
        monkeypatch.setattr("os.sched_getaffinity", lambda pid, n=cores: set(range(n)))
        assert resolve_read_threads("auto") == threads
    assert resolve_read_threads(3) == 3


def test_shuffle_is_global_across_shards(store) -> None:
    """Not a shard-block order: the first batch mixes images of many shards."""
    cache, _ = store
    first = next(iter(TokenLoader(cache, batch_size=12, seed=0, in_memory=False).epoch(0)))
    assert len(np.unique(first.index // S)) >= 4


def test_streaming_reads_only_the_sampled_views(store, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.store.shards import ShardReader
    cache, _ = store
    calls: list[tuple[int, int]] = []
    real = ShardReader._read  # every chunk read goes through it
    monkeypatch.setattr(ShardReader, "_read", lambda self, i, v, *rest, **kw: calls.append((i, v))
                        or real(self, i, v, *rest, **kw))
    monkeypatch.setattr(FeatureCache, "read_shard", lambda *a: pytest.fail("streaming loaded a shard"))
    loader = TokenLoader(cache, batch_size=4, view_policy="random", seed=2, in_memory=False)
    index, view, _ = run_epoch(loader, 1)
    assert sorted(calls) == sorted(zip(index.tolist(), view.tolist()))  # one chunk per sample


def test_a_chunk_damaged_between_epochs_stops_the_next_epoch(tmp_path: Path) -> None:
    """Streaming checks a chunk's crc32c at its first read only; a shard file written since is
    checked again, so a chunk the first epoch proved cannot be served damaged by the second."""
    from pipeline.store.shards import ShardReader
    rng = np.random.default_rng(1)
    cache = create_or_open(
        tmp_path / "c.zarr", ids=[str(i) for i in range(16)], labels=np.zeros((16, C), np.int8),
        classnames=[f"c{i}" for i in range(C)], views=1, num_tokens=T, dim=D,
        fingerprint={"test": 2}, shard_size=S)
    tokens = rng.standard_normal((16, 1, T, D)).astype(np.float16)
    for s in range(cache.num_shards):
        a, b = cache.shard_range(s)
        cache.write_shard(s, tokens[a:b], np.zeros(b - a, np.int8))
    loader = TokenLoader(cache, batch_size=4, seed=0, in_memory=False)
    check_tokens(run_epoch(loader, 0)[2], tokens, np.zeros((16, C), np.int8))
    offset = ShardReader(cache).index(1)[3, 0]  # image 11, view 0
    f = cache.shard_file(1)
    raw = bytearray(f.read_bytes())
    raw[int(offset) + 7] ^= 0x01
    f.write_bytes(bytes(raw))
    with pytest.raises(CacheError, match="shard 1 .*image 11 view 0 fails its crc32c"):
        run_epoch(loader, 1)


def test_drop_last_and_memory_budget(store) -> None:
    cache, _ = store
    loader = TokenLoader(cache, batch_size=8, drop_last=True, in_memory=False)
    batches = list(loader.epoch(0))
    assert len(batches) == len(loader) == (N - len(BAD)) // 8 and all(len(b.index) == 8 for b in batches)
    assert TokenLoader(cache, 8, max_memory_bytes=cache.tokens_nbytes).in_memory
    assert not TokenLoader(cache, 8, max_memory_bytes=cache.tokens_nbytes - 1).in_memory


def test_prefetch_thread_error_reaches_consumer(store, monkeypatch: pytest.MonkeyPatch) -> None:
    cache, _ = store
    from pipeline.store.shards import ShardReader
    real = ShardReader._read  # every chunk read goes through it
    seen: list[int] = []

    def failing(self, i, v, *rest, **kw):
        seen.append(i)
        if len(seen) == 9:
            raise OSError("unreadable chunk (injected)")
        return real(self, i, v, *rest, **kw)

    monkeypatch.setattr(ShardReader, "_read", failing)
    loader = TokenLoader(cache, batch_size=4, view_policy="cycle", in_memory=False, prefetch=1)
    got = []
    with pytest.raises(OSError, match="injected"):
        got.extend(loader.epoch(0))
    assert len(got) == 2  # the two batches before the failure arrived first
    assert not any(t.name == "TokenLoader-prefetch" for t in threading.enumerate())


def test_stopping_early_releases_the_prefetch_thread(store) -> None:
    cache, _ = store
    it = TokenLoader(cache, batch_size=2, in_memory=True, prefetch=1).epoch(0)
    next(it)
    it.close()
    assert not any(t.name == "TokenLoader-prefetch" for t in threading.enumerate())


def test_incomplete_cache_is_refused(tmp_path: Path) -> None:
    cache = create_or_open(tmp_path / "c.zarr", ids=["a", "b", "c"], labels=np.zeros((3, 2)),
                                        classnames=["x", "y"], views=1, num_tokens=2, dim=2,
                                        fingerprint={}, shard_size=2)
    cache.write_shard(0, np.zeros((2, 1, 2, 2)), np.zeros(2))
    with pytest.raises(CacheError, match="cache incomplete: 1 of 2 shards missing"):
        TokenLoader(cache, batch_size=2)
