"""Benchmark 5: the training reader at page-cache speed, and what the store's checksums cost.

Stores of random float16 tokens of RN-101's shape (T=197, D=512) at K=1 and K=4 views are written
by FeatureCache (format 3: one crc32c-checked chunk per image view, keyed to its place). Side by
side, in one process, on the same tokens, all in the page cache, batches of one random view of
randomly ordered images:
- RAM gather: tokens[index, view] from a NumPy array in memory (the in-memory limit);
- memmap gather: the same from a NumPy memmap of a .npy of the tokens (the page-cache limit);
- TokenLoader streaming, forced (in_memory=False, max_memory_bytes=0: it cannot load the store);
- TokenLoader in memory (store loaded once, not timed), float16 batches as training gets them;
  both first without the prefetch thread (the loader's own rate: the goals), then with it (as
  training runs it: this do-nothing consumer and the thread then contend for the GIL, which a
  training step, waiting in torch or CUDA with the GIL released, does not);
- ShardReader.gather checking every read's crc32c, only a chunk's first read (what TokenLoader
  does: an epoch re-reads chunks an earlier one proved; a changed shard file is checked again),
  and none (the reader's checksum cost). The timed epochs follow a warm-up epoch, so the loader's
  rows are its steady state; the "every read" row is what a chunk's first read costs;
The contenders take turns (`--rounds` rounds), so a change of load on this shared VM hits them alike;
each ratio is the median of its rounds' ratios to the reference measured in the same round.
- streaming with `--read-threads` threads reading each batch (train.read_threads);
- extraction-side write of the same shards with and without the crc32c codec (write cost).
Peak anonymous RSS (the process's own memory; the mapped shard files' pages are page cache) of a
streaming epoch is measured in child processes at two store sizes.
Goals (issue "Feed a GPU"): streaming >= 10,000 views/s and >= 0.5x memmap; in memory >= 0.8x RAM.

    python bench/bench_reader.py --images 256 --json results/bench_reader.json
"""
from __future__ import annotations

import itertools
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import common
import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

from pipeline.store.cache import FeatureCache
from pipeline.store.create import create_or_open
from pipeline.store.loader import TokenLoader
from pipeline.store.shards import ShardReader

T, D = common.token_shape("RN101", 448)
RAM, MEMMAP = "RAM gather (NumPy array)", "memmap gather (page-cache limit)"
STREAM = "TokenLoader streaming (forced, memory cap 0)"


def make_store(path: Path, n: int, k: int, shard: int, seed: int = 0) -> np.ndarray:
    """A complete float16 store of n images x k views; returns its tokens (n, k, T, D)."""
    rng = np.random.default_rng(seed)
    tokens = rng.standard_normal((n, k, T, D), dtype=np.float32).astype(np.float16)
    cache = create_or_open(
        path, ids=[str(i) for i in range(n)], labels=np.zeros((n, 80), np.int8),
        classnames=[f"c{c}" for c in range(80)], views=k, num_tokens=T, dim=D,
        fingerprint={"bench": seed}, shard_size=shard, overwrite=True)
    for s in range(cache.num_shards):
        a, b = cache.shard_range(s)
        cache.write_shard(s, tokens[a:b], np.zeros(b - a, np.int8))
    return tokens


def interleaved_rates(steps: dict[str, Callable[[], int]], budget_s: float, rounds: int
                      ) -> dict[str, list[float]]:
    """Views/s of each `step()` (returns views done) in `rounds` rounds, the contenders taking
    turns for budget_s / rounds seconds each per round: a change of the machine's load over the
    run hits every contender alike (this VM is shared), and the spread shows in the rounds."""
    for step in steps.values():
        step()  # warm-up: first reads, page faults
    rates: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            n, start = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - start) < budget_s / rounds or n == 0:
                n += step()
            rates[name].append(n / elapsed)
    return rates


def epoch_batches(n: int, k: int, batch: int, epoch: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(epoch)
    order, views = rng.permutation(n), rng.integers(0, k, n)
    return [(order[i:i + batch], views[order[i:i + batch]]) for i in range(0, n, batch)]


def gather_step(array: np.ndarray, k: int, batch: int) -> Callable[[], int]:
    epochs = itertools.count(1)
    return lambda: sum(len(np.ascontiguousarray(array[i, v])) for i, v in
                       epoch_batches(len(array), k, batch, next(epochs)))


def loader_step(loader: TokenLoader) -> Callable[[], int]:
    epochs = itertools.count(1)
    return lambda: sum(len(b.index) for b in loader.epoch(next(epochs)))


def reader_step(cache: FeatureCache, verify: str, batch: int) -> Callable[[], int]:
    reader, epochs = ShardReader(cache, verify=verify), itertools.count(1)
    return lambda: sum(len(reader.gather(i, v)) for i, v in
                       epoch_batches(cache.num_images, cache.views, batch, next(epochs)))


def write_seconds(root: Path, tokens: np.ndarray, shard: int, crc: bool) -> float:
    """Seconds to write all shards of `tokens` through zarr, with or without the crc32c codec."""
    n, k = tokens.shape[:2]
    g = zarr.open_group(str(root / f"write-{crc}.zarr"), mode="w")
    a = g.create_array("tokens", shape=tokens.shape, dtype="float16", shards=(shard, k, T, D),
                       chunks=(1, 1, T, D), fill_value=float("nan"),
                       compressors=[Crc32cCodec()] if crc else None)
    with common.Timer() as t:
        for s in range(0, n, shard):
            a[s:s + shard] = tokens[s:s + shard]
    return t.seconds


CHILD = "--rss-child"


def _rss() -> int:
    """Anonymous resident bytes now (RssAnon of /proc/self/status: the process's own memory). The
    streaming reader maps the shard files (pipeline/store/shards.py): their pages are the page
    cache's, shared and dropped under pressure, and count in RssFile, not here."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


def child_rss(store: Path, batch: int) -> None:
    """Run two streaming epochs; print the peak growth (MiB) of anonymous RSS over the state after
    opening, sampled after every batch."""
    cache = FeatureCache.open(store)
    loader = TokenLoader(cache, batch, seed=0, in_memory=False, max_memory_bytes=0)
    base = peak = _rss()
    n = 0
    for e in range(2):
        for b in loader.epoch(e):
            n += len(b.index)
            peak = max(peak, _rss())
    print(n, (peak - base) / 2**20)


def rss_growth(store: Path, batch: int, mmap_threshold: bool) -> float:
    """Peak RSS growth of a streaming child; `mmap_threshold` fixes glibc's at 1 MiB, so freed
    batch buffers go back to the OS instead of staying cached in the malloc heap."""
    env = {**os.environ, **({"MALLOC_MMAP_THRESHOLD_": str(2**20)} if mmap_threshold else {})}
    out = subprocess.run([sys.executable, __file__, CHILD, str(store), str(batch)], check=True,
                         capture_output=True, text=True, env=env).stdout.split()
    return float(out[-1])


def main() -> None:
    p = common.parser(__doc__.splitlines()[0], images=256, views=4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--budget", type=float, default=4.0, help="seconds per measured rate, all rounds")
    p.add_argument("--rounds", type=int, default=5, help="turns each contender takes (median reported)")
    p.add_argument("--read-threads", default="2", help="comma-separated train.read_threads to time")
    args = p.parse_args()
    threads = [int(t) for t in args.read_threads.split(",") if int(t) > 1]
    shard, b = args.shard_size or 64, args.batch_size
    rows, results = [], {"rates": {}, "rss_mib": {}}
    with common.workdir(args.workdir) as root:
        for k in sorted({1, args.views}):
            n = args.images * (4 // k if k < 4 else 1)  # K=1 stores hold as many views as K=4
            tokens = make_store(root / f"k{k}.zarr", n, k, shard)
            np.save(root / f"k{k}.npy", tokens)
            memmap = np.load(root / f"k{k}.npy", mmap_mode="r")
            cache = FeatureCache.open(root / f"k{k}.zarr")
            stream = {"in_memory": False, "max_memory_bytes": 0}
            steps = {
                "RAM gather (NumPy array)": gather_step(tokens, k, b),
                "memmap gather (page-cache limit)": gather_step(memmap, k, b),
                "TokenLoader streaming (forced, memory cap 0)": loader_step(
                    TokenLoader(cache, b, seed=0, prefetch=0, **stream)),
                "TokenLoader in memory": loader_step(
                    TokenLoader(cache, b, seed=0, in_memory=True, prefetch=0)),
                "TokenLoader streaming, prefetch thread (2)": loader_step(
                    TokenLoader(cache, b, seed=0, **stream)),
                "TokenLoader in memory, prefetch thread (2)": loader_step(
                    TokenLoader(cache, b, seed=0, in_memory=True)),
                "ShardReader.gather, crc32c at every read (what a first read costs)": reader_step(
                    cache, "every", b),
                "ShardReader.gather, crc32c at a chunk's first read (training's default)": reader_step(
                    cache, "first", b),
                "ShardReader.gather, crc32c not checked": reader_step(cache, "none", b),
                **{f"TokenLoader streaming, {t} read threads": loader_step(
                    TokenLoader(cache, b, seed=0, prefetch=0, read_threads=t, **stream))
                   for t in threads},
            }
            rounds = interleaved_rates(steps, args.budget, args.rounds)
            results.setdefault("rounds", {})[f"K={k}"] = rounds
            rates = {name: float(np.median(r)) for name, r in rounds.items()}
            results["rates"][f"K={k}"] = rates
            ratios = results.setdefault("ratios", {})[f"K={k}"] = {}
            for name, rate in rates.items():
                ref = RAM if "RAM" in name or "in memory" in name else MEMMAP
                per_round = np.array(rounds[name]) / np.array(rounds[ref])  # same round, same load
                ratios[name] = float(np.median(per_round))
                rows.append([f"K={k}, {n} images: {name}",
                             f"{rate:,.0f} views/s ({min(rounds[name]):,.0f}-{max(rounds[name]):,.0f})",
                             f"{ratios[name]:.3f} ({per_round.min():.2f}-{per_round.max():.2f}; "
                             + ("RAM)" if ref == RAM else "memmap)")])
            if k == args.views:
                with_crc = write_seconds(root, tokens, shard, True)
                without = write_seconds(root, tokens, shard, False)
                results["write_seconds"] = {"crc32c": with_crc, "none": without}
                rows.append([f"K={k}: zarr write of all shards, crc32c / none",
                             f"{with_crc:.3f} s / {without:.3f} s", f"{with_crc / without:.3f}"])
            del tokens, memmap
        small, large = root / "k1.zarr", root / "large.zarr"
        make_store(large, 4 * args.images * 4, 1, shard, seed=1)
        batch_mib = b * T * D * 2 / 2**20
        for name, store in (("small", small), ("large", large)):
            c = FeatureCache.open(store)
            for fixed in (False, True):  # child processes: this one holds the stores in RAM
                growth = rss_growth(store, b, fixed)
                how = "malloc mmap threshold 1 MiB" if fixed else "default malloc"
                results["rss_mib"][f"{name}, {how}"] = {"store_mib": c.tokens_nbytes / 2**20,
                                                        "peak_growth_mib": growth}
                what = f"2 streaming epochs, store {c.tokens_nbytes / 2**20:,.0f} MiB ({how}): peak anonymous RSS growth"
                rows.append([what, f"{growth:.1f} MiB",
                             f"{growth / batch_mib:.1f} batches of {batch_mib:.1f} MiB"])
    k4, r4 = results["rates"][f"K={args.views}"], results["ratios"][f"K={args.views}"]
    stream = k4[STREAM]
    mem = r4["TokenLoader in memory"]
    every = r4["ShardReader.gather, crc32c at every read (what a first read costs)"]
    vs_mm = r4[STREAM]
    met = stream >= 10_000 and vs_mm >= 0.5 and mem >= 0.8
    verdict = (f"**K={args.views}: streaming {stream:,.0f} views/s = {vs_mm:.2f}x memmap (goal >= 10,000 "
               f"and >= 0.5x; every read checked: {every:.2f}x); in memory {mem:.2f}x RAM gather "
               f"(goal >= 0.8x)**: **{'met' if met else 'NOT met'}**")
    setup = (f"random float16 tokens {T} x {D} (RN-101 at 448 px), shards of {shard} images, batches "
             f"of {b} one-view samples in a global random order, warm page cache; the contenders take "
             f"turns in {args.rounds} rounds of {args.budget / args.rounds:.2g} s each: rate = median "
             "round (range), ratio = median of the rounds' ratios to the same round's reference (range)")
    common.report("Benchmark 5: reader", setup, ["what", "value", "ratio"], rows, verdict, args, results)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == CHILD:
        child_rss(Path(sys.argv[2]), int(sys.argv[3]))
    else:
        main()
