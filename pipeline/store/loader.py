"""Batches of cached tokens for training: each valid image once per epoch, one of its K views.

An epoch is a global shuffle of the valid images and a view per image, both functions of
(seed, epoch) only: any epoch can be replayed directly (resumed training is identical), and the
two I/O modes serve identical batches. A store that fits the memory budget is loaded once and
gathered in RAM; a larger one is streamed: each batch reads exactly its sampled (image, view)
chunks from the shard files (pipeline/store/shards.py: one copy per view from the mapped file, its
crc32c and key checked at the first read of the chunk and after its file changes), so the
process's own memory is bounded by the pooled batch buffers (prefetched, in use) plus 16 bytes of
shard index per stored view, whatever the store size (the mapped pages are page cache). Batches hold the store dtype (float16 by default): `Batch.tokens_on(device)` casts to float32
on the device, after a non-blocking copy of half the bytes. A background thread prepares the next
`prefetch` batches while the consumer computes.
"""
from __future__ import annotations

import os
import queue
import threading
import weakref
from collections.abc import Callable, Generator, Iterator
from typing import NamedTuple

import numpy as np
import torch

from pipeline.store.cache import FeatureCache
from pipeline.store.shards import ShardReader

_VIEWS, _ORDER = range(2)  # independent random streams per (seed, epoch)


def _dead() -> None:
    """A weak reference's answer once its object is gone: a new pool slot is free."""


class Batch(NamedTuple):
    tokens: torch.Tensor  # (B, T, D) in the store dtype (float16 | float32), pinned with CUDA
    labels: torch.Tensor  # (B, C) int8: 1 positive, 0 negative, -1 unknown
    index: np.ndarray  # type: ignore[assignment]  # (B,) image index into the cache (shadows tuple.index)
    view: np.ndarray  # (B,) which of the K views was used

    def tokens_on(self, device: torch.device | str) -> torch.Tensor:
        """(B, T, D) float32 on `device`: copied in the store dtype, cast there."""
        return self.tokens.to(device, non_blocking=True).float()


class _Raised:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def default_memory_budget() -> int:
    """A quarter of physical RAM (0, i.e. stream, where it cannot be read)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (ValueError, OSError, AttributeError):
        return 0


def resolve_read_threads(value: int | str) -> int:
    """train.read_threads: an int, or "auto": one thread per 4 cores this process may run on, 1 to
    8 (a 2-core VM's other core runs the head step; a GPU host's many cores read in parallel)."""
    if value != "auto":
        return int(value)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, cores // 4))


def prefetch_batches(batches: Generator[Batch, None, None], depth: int) -> Iterator[Batch]:
    """Run `batches` in a background thread `depth` items ahead; its exceptions re-raise here."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in batches:
                if not put(item):
                    return
            put(done)
        except BaseException as e:
            put(_Raised(e))

    thread = threading.Thread(target=work, name="TokenLoader-prefetch", daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, _Raised):
                raise item.exc
            yield item
    finally:
        stop.set()  # the consumer stopped early or failed: release the worker
        thread.join()
        batches.close()


class TokenLoader:
    """Epochs of batches over the valid images of a complete FeatureCache.

    view_policy "cycle" uses view epoch % K for every image; "random" draws a view per image
    from (seed, epoch). The epoch's batch count is `len(self)`.
    """

    def __init__(self, cache: FeatureCache, batch_size: int, view_policy: str = "random",
                 seed: int = 0, shuffle: bool = True, in_memory: bool | None = None, *,
                 drop_last: bool = False, prefetch: int = 2,
                 max_memory_bytes: int | None = None, pin_memory: bool | None = None,
                 labels: np.ndarray | None = None, read_threads: int = 1) -> None:
        if view_policy not in ("random", "cycle"):
            raise ValueError(f"view_policy must be 'random' or 'cycle', got {view_policy!r}")
        if batch_size < 1 or prefetch < 0:
            raise ValueError("batch_size must be >= 1, prefetch >= 0")
        cache.require_complete()
        self.cache = cache
        self.batch_size = batch_size
        self.view_policy = view_policy
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.prefetch = prefetch
        self.read_threads = read_threads  # streaming: threads reading one batch's views
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.valid = np.flatnonzero(cache.valid)  # (N_valid,) sorted image indices
        # (N, C) int8; `labels` replaces the stored ones (train.label_fraction's partial labels)
        self.labels = torch.from_numpy(np.asarray(cache.labels if labels is None else labels, dtype=np.int8))
        if in_memory is None:
            budget = default_memory_budget() if max_memory_bytes is None else max_memory_bytes
            in_memory = cache.tokens_nbytes <= budget
        self.in_memory = in_memory
        self._tokens: np.ndarray | None = None  # (N, K, T, D) once loaded
        self._reader: ShardReader | None = None
        # batch buffers (batch_size, T, D) and a weak reference to the view last given out of each
        self._pool: list[tuple[np.ndarray, Callable[[], np.ndarray | None]]] = []
        self._pool_lock = threading.Lock()  # epochs may be iterated from two threads

    def __len__(self) -> int:
        n, b = len(self.valid), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def _rng(self, epoch: int, stream: int) -> np.random.Generator:
        return np.random.default_rng((self.seed, epoch, stream))

    def views(self, epoch: int) -> np.ndarray:
        """(N,) view index per image for this epoch."""
        n, k = self.cache.num_images, self.cache.views
        if self.view_policy == "cycle":
            return np.full(n, epoch % k, dtype=np.int64)
        return self._rng(epoch, _VIEWS).integers(0, k, size=n)

    def order(self, epoch: int) -> np.ndarray:
        """(N_valid,) image indices in this epoch's order (the same in both I/O modes)."""
        return self._rng(epoch, _ORDER).permutation(self.valid) if self.shuffle else self.valid

    def epoch(self, e: int) -> Iterator[Batch]:
        batches = self._batches(e)
        return prefetch_batches(batches, self.prefetch) if self.prefetch else batches

    def _buffer(self, n: int) -> tuple[torch.Tensor, np.ndarray]:
        """A (n, T, D) batch tensor in the store dtype (pinned with CUDA) and its NumPy view, in
        memory no live batch uses.

        Without CUDA the buffers are pooled: a batch of RN-101 tokens is 6 MiB, and one taken
        from malloc while earlier batches are still held (the consumer's, the prefetched ones)
        can be fresh pages, faulted in by the copy (with the prefetch thread, bench_reader's
        shapes: 0.40x a memmap gather, 0.49x pooled). A pooled buffer is handed out again once
        nothing references the view given out with it (a weak reference to that view: a batch
        kept, or any tensor viewing it, keeps it alive)."""
        c = self.cache
        if self.pin_memory:  # CUDA's caching host allocator reuses freed pinned blocks
            x = torch.empty((n, c.num_tokens, c.dim), dtype=getattr(torch, c.dtype.name),
                            pin_memory=True)
            return x, x.numpy()
        with self._pool_lock:
            slot = next((j for j, (_, given) in enumerate(self._pool) if given() is None), None)
            if slot is None:
                base = np.empty((self.batch_size, c.num_tokens, c.dim), dtype=c.dtype)
                if len(self._pool) >= self.prefetch + 3:  # the consumer keeps batches: a fresh one
                    return torch.from_numpy(base[:n]), base[:n]
                self._pool.append((base, _dead))
                slot = len(self._pool) - 1
            out = self._pool[slot][0][:n]  # (n, T, D) view: C-contiguous
            self._pool[slot] = (self._pool[slot][0], weakref.ref(out))
        return torch.from_numpy(out), out

    def _load(self) -> np.ndarray:
        if self._tokens is None:
            c = self.cache
            data = np.empty((c.num_images, c.views, c.num_tokens, c.dim), dtype=c.dtype)
            for s in range(c.num_shards):
                start, stop = c.shard_range(s)
                data[start:stop] = c.read_shard(s)  # whole-shard zarr reads, crc32c checked
            self._tokens = data
        return self._tokens

    def _batches(self, epoch: int) -> Generator[Batch, None, None]:
        views, order = self.views(epoch), self.order(epoch)
        if self.in_memory:
            tokens = self._load()
        elif self._reader is None:
            self._reader = ShardReader(self.cache, threads=self.read_threads)  # crc32c: first reads
        else:
            self._reader.refresh()  # a shard file changed since: its chunks are checked again
        stop = min(len(self) * self.batch_size, len(order))
        for b in range(0, stop, self.batch_size):
            index = order[b : b + self.batch_size]
            view = views[index]
            x, out = self._buffer(len(index))
            if self.in_memory:
                # (B, T, D) gather of the (image, view) rows; mode "clip" writes straight into
                # `out` ("raise" buffers it), and the indices are valid by construction
                np.take(tokens.reshape(-1, *out.shape[1:]), index * self.cache.views + view, axis=0,
                        out=out, mode="clip")
            else:
                assert self._reader is not None  # opened above
                self._reader.gather(index, view, out)
            y = torch.from_numpy(self.labels.numpy()[index])  # (B, C): NumPy's take, 2x torch's
            yield Batch(x, y.pin_memory() if self.pin_memory else y, index, view)
            del x, out, y  # the consumer's batch alone keeps its buffer from the pool
