"""Benchmark 3: a 3x3 lambda x alpha grid (`pipeline ablate`) vs one solo run (`pipeline train`).

Both train for the same epochs on the same cache. Times are the training loops only (each
stage's own timer; validation excluded), plus the wall time of each whole stage call. Reading
one epoch of batches alone is timed too: it is the part the grid shares between its 9 heads.
Tokens come from the extraction engine (--source images, default) or, to time RN-101-sized
training without running RN-101, from random tokens of the backbone's shape (--source random).
Goal (issue 7): grid time <= 2x solo time.

    python bench/bench_ablate.py                                       # quick: tiny-RN tokens
    python bench/bench_ablate.py --source random --backbone RN101 --image-size 448 --images 512
"""
from __future__ import annotations

import copy

import common

from pipeline import paths
from pipeline.cache import FeatureCache
from pipeline.loader import TokenLoader
from stages import ablate, extract_features, train

GOAL = 2.0
LAMBDAS, ALPHAS = [0.0, 0.2, 1.0], [0.0, 7e-5, 1e-2]


def read_epoch_seconds(params: dict) -> float:
    """One epoch of batches from the train store, read the way `pipeline train` reads it."""
    cfg = params["train"]
    loader = TokenLoader(FeatureCache.open(paths.feature_store(params, "train")), cfg["batch_size"],
                         cfg["view_policy"], seed=cfg["seed"])
    for _ in loader.epoch(0):  # first pass loads the store (as the first training epoch does)
        pass
    with common.Timer() as t:
        for _ in loader.epoch(1):
            pass
    return t.seconds


def main() -> None:
    p = common.parser(__doc__.splitlines()[0], images=128)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32, help="train.batch_size")
    p.add_argument("--source", choices=["images", "random"], default="images")
    p.add_argument("--profile", action="store_true", help="print torch.profiler's top ops of the grid")
    args = p.parse_args()

    with common.workdir(args.workdir) as root:
        n_val = max(8, args.images // 4)
        sections = {"train": {"epochs": args.epochs, "batch_size": args.batch_size},
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

        read = read_epoch_seconds(params)
        with common.Timer() as solo_wall:
            solo = sum(r["train_seconds"] for r in train.run(copy.deepcopy(params))["history"])
        with common.Timer() as grid_wall, common.profiled(args.profile):
            grid = ablate.run(copy.deepcopy(params), LAMBDAS, ALPHAS)["train_seconds"]

    points, ratio = len(LAMBDAS) * len(ALPHAS), grid / solo
    rows = [
        ["one solo run (`pipeline train`)", solo, solo_wall.seconds],
        [f"{points}-point grid (`pipeline ablate`), one pass per epoch", grid, grid_wall.seconds],
        [f"{points} solo runs one after another (estimate: {points} x solo)", points * solo,
         points * solo_wall.seconds],
        [f"reading the cache alone ({args.epochs} epochs of batches, the shared part)",
         args.epochs * read, ""],
    ]
    setup = (f"{args.epochs} epochs, {args.images} train images x {args.views} views, batch "
             f"{args.batch_size}, {n_val} val images, device {args.device}; {source}; "
             f"lambdas {LAMBDAS} x alphas {ALPHAS}")
    common.report("Benchmark 3: ablation grid vs solo run", setup,
                  ["what", "training seconds", "wall seconds (incl. validation)"], rows,
                  common.verdict(ratio, f"<= {GOAL:g}x", ratio <= GOAL, "grid / solo training time"),
                  args, {"ratio": ratio, "solo_seconds": solo, "grid_seconds": grid,
                         "read_epoch_seconds": read})


if __name__ == "__main__":
    main()
