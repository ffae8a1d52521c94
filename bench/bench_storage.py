"""Benchmark 4: bytes per view on disk and random mini-batch read rates, Zarr vs memmap vs HDF5.

Two float16 stores of the same tokens are written by the extraction engine, one with compressor
none and one with zstd. Read rates (views/s) on the same arrays:
- TokenLoader streaming (in_memory=False): epochs of shuffled float16 mini-batches, what training
  does on a store larger than its memory budget; and in memory (a store that fits), for reference;
- raw per-sample reads of random (image, view) pairs, `batch` at a time: the Zarr store's tokens
  array, a NumPy memmap (.npy) and HDF5 (pipeline.store.export.export_hdf5, chunked per view).
Everything was just written, so the files sit in the page cache: this measures decoding and
indexing cost, not the disk. No goal is set for storage in issue 7; the ratios are for comparison.
Tokens come from the extraction engine on a BatchNorm-recalibrated random backbone (its tokens
vary between images; real CLIP tokens may compress differently), or --source random.

    python bench/bench_storage.py                                      # quick: tiny-RN, 224 px
    python bench/bench_storage.py --source random --backbone RN101 --image-size 448 --images 512
"""
from __future__ import annotations

import shutil
import time

import common
import h5py
import numpy as np

from pipeline.config import paths
from pipeline.config.params import updated
from pipeline.store.cache import FeatureCache
from pipeline.store.create import create_or_open
from pipeline.store.export import export_hdf5
from pipeline.store.loader import TokenLoader
from stages import extract_features


def build_stores(args, root) -> tuple[dict[str, FeatureCache], str]:
    """{"none": cache, "zstd": cache} holding the same tokens, and a description of them."""
    stores = {}
    if args.source == "images":
        dataset, source = common.prepare_images(args, root, n_val=0)
        params = common.make_params(args, root, dataset, extract={"num_workers": 2})
        params = common.recalibrate(params)
        for comp in ("none", "zstd"):
            params = updated(params, {"extract.compressor": comp})
            extract_features.run(params, split="train")
            stores[comp] = FeatureCache.open(shutil.move(paths.feature_store(params.paths, "train"),
                                                         root / f"{comp}.zarr"))
        return stores, f"tokens extracted from {source} (BatchNorm-recalibrated random backbone)"
    params = common.make_params(args, root, "synthetic")
    t, d = common.token_shape(args.backbone, args.image_size)
    common.random_token_stores(params, args.images, 1, args.views, t, d)
    none = FeatureCache.open(paths.feature_store(params.paths, "train"))
    zstd = create_or_open(
        root / "zstd.zarr", ids=list(none.ids), labels=none.labels, classnames=none.classnames,
        views=none.views, num_tokens=none.num_tokens, dim=none.dim, fingerprint=none.fingerprint,
        shard_size=none.shard_size, compressor="zstd")
    for s in range(none.num_shards):
        zstd.write_shard(s, none.read_shard(s), none.status[slice(*none.shard_range(s))])
    return {"none": none, "zstd": zstd}, f"random float16 tokens of {args.backbone}'s shape"


def per_sample_rate(read, pairs: np.ndarray, batch: int, budget_s: float) -> float:
    """Views/s reading (image, view) pairs one at a time, in mini-batches, for up to budget_s."""
    done = 0
    with common.Timer() as t:
        for b in range(0, len(pairs), batch):
            out = np.stack([read(i, k) for i, k in pairs[b:b + batch]])  # (B, T, D)
            done += len(out)
            if time.perf_counter() - t.start > budget_s:
                break
    return done / t.seconds


def loader_rate(cache: FeatureCache, batch: int, budget_s: float, in_memory: bool = False) -> float:
    """Views/s of TokenLoader epochs (one view per image each, float16 torch batches), after a
    warm-up epoch (which, in memory, loads the store), for >= one epoch and about budget_s / 2 s."""
    loader = TokenLoader(cache, batch, "random", seed=0, in_memory=in_memory)
    sum(len(b.index) for b in loader.epoch(0))  # warm-up: thread start, first chunk decoders
    n, epoch = 0, 1
    with common.Timer() as t:
        while n == 0 or time.perf_counter() - t.start < budget_s / 2:
            n += sum(len(b.index) for b in loader.epoch(epoch))
            epoch += 1
    return n / t.seconds


def main() -> None:
    p = common.parser(__doc__.splitlines()[0], images=256)
    p.add_argument("--batch-size", type=int, default=32, help="views per mini-batch")
    p.add_argument("--budget", type=float, default=10.0, help="max seconds per per-sample reader")
    p.add_argument("--source", choices=["images", "random"], default="images")
    args = p.parse_args()

    with common.workdir(args.workdir) as root:
        stores, source = build_stores(args, root)
        none = stores["none"]
        n, k, t, d = none.num_images, none.views, none.num_tokens, none.dim
        tokens = np.concatenate([none.read_shard(s) for s in range(none.num_shards)])  # (N, K, T, D)
        np.save(root / "tokens.npy", tokens)
        memmap = np.load(root / "tokens.npy", mmap_mode="r")
        h5_path = export_hdf5(none, root / "tokens.h5")
        pairs = np.random.default_rng(0).permutation([(i, v) for i in range(n) for v in range(k)])
        b = args.batch_size

        rates = {"TokenLoader streaming, zarr none": loader_rate(none, b, args.budget),
                 "TokenLoader streaming, zarr zstd": loader_rate(stores["zstd"], b, args.budget),
                 "TokenLoader in memory (store loaded once)": loader_rate(none, b, args.budget, True)}
        with h5py.File(h5_path, "r") as f:
            readers = {"per-sample, zarr none": none.tokens,
                       "per-sample, zarr zstd": stores["zstd"].tokens,
                       "per-sample, NumPy memmap": memmap,
                       "per-sample, HDF5 (export_hdf5)": f["tokens"]}
            for name, array in readers.items():
                rates[name] = per_sample_rate(lambda i, v, a=array: np.asarray(a[i, v]), pairs, b,
                                              args.budget)
        raw = t * d * tokens.itemsize
        sizes = {"zarr tokens array, compressor none": common.tokens_nbytes(none.path),
                 "zarr tokens array, compressor zstd": common.tokens_nbytes(stores["zstd"].path),
                 "zarr whole store, compressor none": none.nbytes_stored(),
                 "NumPy .npy": (root / "tokens.npy").stat().st_size, "HDF5": h5_path.stat().st_size}

    memmap_rate = rates["per-sample, NumPy memmap"]
    rows = [[f"size: {name}", f"{size / (n * k) / 1024:.1f} KiB/view", f"{size / (n * k) / raw:.3f}"]
            for name, size in sizes.items()]
    rows += [[f"read: {name}", f"{rate:,.0f} views/s", f"{rate / memmap_rate:.3f}"]
             for name, rate in rates.items()]
    setup = (f"{n} images x {k} views, tokens {t} x {d} float16 ({raw / 1024:.1f} KiB raw per view), "
             f"shard {none.shard_size} images, mini-batches of {b} random views, warm page cache; {source}")
    zstd_saving = 1 - (sizes["zarr tokens array, compressor zstd"]
                       / sizes["zarr tokens array, compressor none"])
    streaming = rates["TokenLoader streaming, zarr none"] / memmap_rate
    common.report(
        "Benchmark 4: storage", setup,
        ["what", "value", "ratio (size: to raw float16 T x D x 2 B; read: to memmap)"],
        rows, f"**zstd saves {100 * zstd_saving:.1f}% of the bytes; TokenLoader streaming reads at "
        f"{streaming:.3g}x the memmap per-sample rate** (goal: none set in issue 7; informational)",
        args, {"rates_views_per_s": rates, "bytes": sizes, "raw_bytes_per_view": raw})


if __name__ == "__main__":
    main()
