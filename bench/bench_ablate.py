"""Benchmark 3: a 3x3 lambda x alpha grid (`pipeline ablate`) vs one solo run (`pipeline train`).

Both train for the same epochs on the same cache with the same validation (every epoch) and the
same torch thread count. Times are each stage's own training-loop timer (validation excluded) and
the wall time of the whole stage call (validation, checkpoints, saving included). Points whose loss
is the same (alpha = 0 leaves lambda out of it) are trained once, so the grid's honest unit is its
number of distinct trainings: goal grid / solo <= 1.05 x that number (CPU: the stacked step does
the same FLOPs as the heads one by one; the goal is to add nothing to them). `--loop` also times
the head-by-head loop (training.train_step per head, 4 host syncs per head per step).
Reading one epoch of batches alone is timed too: the part the grid shares between its heads.
Tokens come from the extraction engine (--source images, default) or random tokens of the
backbone's shape (--source random: RN-101-sized training without running RN-101).

    python bench/bench_ablate.py                                       # quick: tiny-RN tokens
    python bench/bench_ablate.py --source random --backbone RN101 --image-size 448 --images 128
"""
from __future__ import annotations

import os
import statistics
from collections.abc import Callable

import common
import torch

from pipeline.config import paths
from pipeline.config.params import updated
from pipeline.config.schema import Params
from pipeline.store.cache import FeatureCache
from pipeline.store.loader import TokenLoader
from pipeline.training.ablation import distinct, grid, point_params
from stages import ablate, extract_features, train

GOAL = 1.05  # x the number of distinct trainings
LAMBDAS, ALPHAS = [0.0, 0.2, 1.0], [0.0, 7e-5, 1e-2]


def read_epoch_seconds(params: Params) -> float:
    """One epoch of batches from the train store, read the way `pipeline train` reads it."""
    cfg = params.train
    loader = TokenLoader(FeatureCache.open(paths.feature_store(params.paths, "train")), cfg.batch_size,
                         cfg.view_policy, seed=cfg.seed)
    for _ in loader.epoch(0):  # first pass loads the store (as the first training epoch does)
        pass
    with common.Timer() as t:
        for _ in loader.epoch(1):
            pass
    return t.seconds


def timed(fn: Callable[..., dict], params: Params, *args: object, **kwargs: object) -> tuple[float, float]:
    """(training-loop seconds, wall seconds) of one stage call on a copy of params."""
    with common.Timer() as wall:
        result = fn(params.model_copy(deep=True), *args, **kwargs)
        common.sync(params.train.device)
    loop = (result["train_seconds"] if "train_seconds" in result
            else sum(r["train_seconds"] for r in result["history"]))
    return loop, wall.seconds


def main() -> None:
    p = common.parser(__doc__.splitlines()[0], images=128)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32, help="train.batch_size")
    p.add_argument("--source", choices=["images", "random"], default="images")
    p.add_argument("--threads", default="1,2", help="comma-separated torch thread counts (CPU)")
    p.add_argument("--repeats", type=int, default=2, help="solo + grid pairs per thread count")
    p.add_argument("--loop", action="store_true", help="also time the head-by-head grid loop")
    p.add_argument("--profile", action="store_true", help="print torch.profiler's top ops of the grid")
    args = p.parse_args()
    threads = [int(t) for t in args.threads.split(",")] if args.device == "cpu" else [torch.get_num_threads()]

    with common.workdir(args.workdir) as root:
        n_val = max(8, args.images // 4)
        sections = {"train": {"epochs": args.epochs, "batch_size": args.batch_size, "eval_every": 1},
                    "ablate": {"epochs": args.epochs}, "extract": {"num_workers": 2}}
        if args.source == "images":
            dataset, source = common.prepare_images(args, root, n_val=n_val)
            params = common.make_params(args, root, dataset, **sections)
            extract_features.run(params, split="all")
            source = f"tokens extracted from {source}"
        else:
            params = common.make_params(args, root, "synthetic", **sections)
            tokens, dim = common.token_shape(args.backbone, args.image_size)
            common.random_token_stores(params, args.images, n_val, args.views, tokens, dim)
            source = f"random float16 tokens of {args.backbone}'s shape ({tokens} x {dim}), 80 classes"
        runs = [point_params(params, lam, a, None) for lam, a, _, _ in grid(LAMBDAS, ALPHAS)]
        points, trainings = len(runs), len(distinct(runs)[0])

        read = read_epoch_seconds(params)
        rows, results, before = [], {}, torch.get_num_threads()
        for n in threads:
            torch.set_num_threads(n)
            params = updated(params, {"train.cpu_threads": n})
            solo, stacked, loop = [], [], []
            for r in range(args.repeats):
                solo.append(timed(train.run, params))
                with common.profiled(args.profile and r == 0):
                    stacked.append(timed(ablate.run, params, LAMBDAS, ALPHAS))
                if args.loop and r == 0:
                    loop.append(timed(ablate.run, params, LAMBDAS, ALPHAS, stacked=False))
            ratios = [g[0] / s[0] for g, s in zip(stacked, solo)]
            med = statistics.median(ratios)
            results[n] = {"ratios": ratios, "solo": solo, "grid": stacked, "loop": loop,
                          "load": os.getloadavg()[0]}
            tag = f"{n} thread{'s' * (n > 1)}"
            rows += [
                [f"{tag}: one solo run (`pipeline train`), median of {len(solo)}",
                 statistics.median(s[0] for s in solo), statistics.median(s[1] for s in solo)],
                [f"{tag}: {points}-point grid, {trainings} heads stacked (`pipeline ablate`)",
                 statistics.median(g[0] for g in stacked), statistics.median(g[1] for g in stacked)],
            ]
            if loop:
                rows.append([f"{tag}: the same grid head by head (train_step per head)", loop[0][0],
                             loop[0][1]])
            rows.append([f"{tag}: grid / solo training time, median (range; load average)",
                         (f"{med:.3g} ({min(ratios):.3g}-{max(ratios):.3g}; "
                         f"{results[n]['load']:.1f})"), ""])
        torch.set_num_threads(before)
        rows.append([f"reading the cache alone ({args.epochs} epochs of batches, the shared part)",
                     args.epochs * read, ""])

    first = threads[0]  # the verdict: the first thread count asked for (1 = train.cpu_threads' default)
    best = statistics.median(results[first]["ratios"])
    limit = GOAL * trainings
    setup = (f"{args.epochs} epochs, {args.images} train images x {args.views} views, batch "
             f"{args.batch_size}, {n_val} val images (validated every epoch by both), device "
             f"{args.device}; {source}; lambdas {LAMBDAS} x alphas {ALPHAS}: {points} points, "
             f"{trainings} distinct trainings (alpha = 0 makes lambda irrelevant)")
    common.report("Benchmark 3: ablation grid vs solo run", setup,
                  ["what", "training seconds", "wall seconds (incl. validation)"], rows,
                  common.verdict(best, f"<= {GOAL:g} x {trainings} = {limit:.3g}", best <= limit,
                                 f"grid / solo training time ({first} thread{'s' * (first > 1)}, median)"),
                  args, {"ratio": best, "distinct_trainings": trainings, "points": points,
                         "by_threads": results, "read_epoch_seconds": read})


if __name__ == "__main__":
    main()
