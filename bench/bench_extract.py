"""Benchmark 1: `pipeline extract-features` throughput vs the bare frozen backbone forward.

Engine: stages.extract_features.run(params, split="train"), what the CLI command calls: decode,
augment K views (DataLoader workers, or on the device with --transforms device), forward,
float16 conversion and Zarr shard writes; its
own timer (model and store set-up excluded). Bare: the backbone's spatial_tokens alone on the same
preprocessed batches (same views, same batch composition), tensors already in memory.
Goal (issue 7): engine images/s >= 0.9 x bare images/s; the same for a ViT (issue 23) in the
same run: `--vit` (default tiny-ViT, "none" to skip) gets its own rows, measured after the ResNet's
on the same images (its stored tokens: MaskCLIP's value path, FrozenViT.spatial_tokens).

    python bench/bench_extract.py                                    # quick: tiny-RN and tiny-ViT, 224 px
    python bench/bench_extract.py --device cuda --backbone RN101 --vit ViT-B-16 --image-size 224
    python bench/bench_extract.py --backbone RN101 --image-size 448 --images 16 --views 1
    python bench/bench_extract.py --device cuda --backbone RN101 --image-size 448 --transforms device
"""
from __future__ import annotations

import shutil
import statistics

import common
import torch

from pipeline.config import paths
from pipeline.config.params import as_dict
from pipeline.data.augment import normalise_pixels
from pipeline.extraction.views import DEFAULT_AUGMENT, ViewSpec, view_batches
from pipeline.model.build import backbone_from_params
from stages import extract_features

GOAL = 0.9


def batches(n: int, shard_size: int, batch_images: int) -> list[range]:
    """The engine's batches: image ranges of batch_images, never crossing a shard boundary."""
    out = []
    for start in range(0, n, shard_size):
        stop = min(start + shard_size, n)
        out += [range(i, min(i + batch_images, stop)) for i in range(start, stop, batch_images)]
    return out


def bare_forward(backbone, pixels: list[torch.Tensor], device: str) -> float:
    """Seconds for spatial_tokens over every batch; pixels[j] is batch j, (b, K, 3, S, S)."""
    with common.Timer() as t:
        for batch in pixels:
            backbone.spatial_tokens(batch.flatten(0, 1))  # (bK, T, D)
        common.sync(device)
    return t.seconds


def measure(args, root, dataset: str, recipe: str | None, name: str) -> tuple[list[list], float, dict]:
    """Rows (bare, preprocessing, engine), the engine / bare ratio and the raw seconds for one backbone."""
    params = common.make_params(args, root, dataset, extract={
        "batch_size": args.batch_size, "num_workers": args.num_workers,
        "transforms": args.transforms}, recipe=recipe, backbone={"name": name})
    ex = params.extract
    data = extract_features.load_split(params, "train")
    spec = ViewSpec(tuple(str(r.path) for r in data.records), args.views, True, ex.seed,
                    args.image_size, {**DEFAULT_AUGMENT, **as_dict(ex.augment)},
                    transforms=args.transforms)
    index = batches(len(data), ex.shard_size, max(1, args.batch_size // args.views))
    with common.Timer() as prep:  # the engine's preprocessing, in this one process
        pixels = [normalise_pixels(p) for _, p, _ in  # (b, K, 3, S, S)
                  view_batches(spec, [list(r) for r in index], torch.device(args.device))]
        common.sync(args.device)
    backbone = backbone_from_params(params.backbone, params=params)
    backbone.spatial_tokens(pixels[0][:1].flatten(0, 1))  # warm-up: first-call kernel selection

    bare, engine = [bare_forward(backbone, pixels, args.device)], []
    store = paths.feature_store(params.paths, "train")
    for _ in range(args.repeats):
        shutil.rmtree(store, ignore_errors=True)
        summary = extract_features.run(params, split="train")["train"]
        engine.append(summary["seconds"])
        bare.append(bare_forward(backbone, pixels, args.device))
    shutil.rmtree(store, ignore_errors=True)
    n = len(data)
    bare_s, engine_s = statistics.median(bare), statistics.median(engine)
    rows = [
        [f"{name} bare forward: spatial_tokens ({ex.tokens}) on preprocessed batches", n / bare_s,
         n * args.views / bare_s, bare_s],
        [f"{name} preprocessing alone: decode + K views (1 process, transforms {args.transforms})",
         n / prep.seconds, n * args.views / prep.seconds, prep.seconds],
        [f"{name} `pipeline extract-features` engine ({args.num_workers} workers, writes)", n / engine_s,
         n * args.views / engine_s, engine_s],
    ]
    raw = {"bare_seconds": bare, "engine_seconds": engine, "prep_seconds": prep.seconds, "images": n,
           "tokens": ex.tokens, "recipe": params.recipe}
    return rows, bare_s / engine_s, raw


def main() -> None:
    p = common.parser(__doc__.splitlines()[0], images=32)
    p.add_argument("--batch-size", type=int, default=32, help="views per forward pass (extract.batch_size)")
    p.add_argument("--num-workers", type=int, default=2, help="decode/augment processes (extract.num_workers)")
    p.add_argument("--repeats", type=int, default=1, help="engine runs (bare runs: one more)")
    p.add_argument("--transforms", choices=("workers", "device"), default="workers",
                   help="extract.transforms: decode/augment in the workers or on the device")
    p.add_argument("--recipe", choices=("authors", "paper"), default=None,
                   help="default: paper with --transforms device (torchvision RandAugment), "
                        "else params.yaml's")
    p.add_argument("--vit", default="tiny-ViT", help="the ViT measured after --backbone (none: skip)")
    args = p.parse_args()
    recipe = args.recipe or ("paper" if args.transforms == "device" else None)
    names = [args.backbone] + ([] if args.vit == "none" else [args.vit])

    with common.workdir(args.workdir) as root:
        dataset, source = common.prepare_images(args, root, n_val=0)
        rows, ratios, raw = [], {}, {}
        for name in names:
            more, ratios[name], raw[name] = measure(args, root, dataset, recipe, name)
            rows += more
        n = raw[names[0]]["images"]
        setup = (f"{' and '.join(names)} (random init), {args.image_size} px, {n} images x {args.views} "
                 f"views, recipe {raw[names[0]]['recipe']}, extract.transforms {args.transforms}, "
                 f"{args.batch_size} views per forward, device {args.device}; {source}; median of "
                 f"{args.repeats} engine / {args.repeats + 1} bare runs each; tokens stored as float16")
        verdicts = "; ".join(common.verdict(r, f">= {GOAL}", r >= GOAL, f"{name}: engine / bare forward")
                             for name, r in ratios.items())
        common.report("Benchmark 1: extraction throughput", setup,
                      ["what", "images/s", "views/s", "seconds"], rows, verdicts, args,
                      {"ratio": ratios[names[0]], "ratios": ratios, **raw[names[0]], "runs": raw})


if __name__ == "__main__":
    main()
