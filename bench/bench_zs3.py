"""Benchmark 8: ZS3 post-processing (score maps -> labels -> confusion counts) against the
implementation it replaced, side by side with the backbone, per image.

What `pipeline evaluate seg` does per batch, split in two: the backbone (one trunk pass giving
every token path, then the six methods' score maps: segmentation.score_maps) and the
post-processing of every method and label space (bkgd / no_bkgd) of every image at its mask's own
size (the seg_eval loop: pipeline/evaluation/labels.py, MiouAccumulator). The old post-processing
(min-max, bilinear upsampling of all C maps to the mask, max / argmax / softmax over classes) is
copied below and runs on the same maps; both must give identical mIoU numbers (checked). The bare
backbone forward (FrozenCLIP.spatial_tokens) is timed alongside. Images and masks are decoded
before timing. Random-init backbone with recalibrated BatchNorm (no weights offline).
Goal (issue 22): post-processing >= 3x faster than the old one on a CPU.

    python bench/bench_zs3.py                          # 80 COCO-2017 images, tiny-RN, 128 px, 80 classes
    python bench/bench_zs3.py --background softmax     # the paper recipe's rule
"""
from __future__ import annotations

import time

import common
import numpy as np
import torch
import torch.nn.functional as F

from pipeline.data.datasets import load_segmentation
from pipeline.evaluation.labels import labels, with_background
from pipeline.evaluation.metrics import MiouAccumulator
from pipeline.evaluation.seg_eval import object_classes, variant_target, variants
from pipeline.evaluation.segmentation import (
    METHODS,
    SOFTMAX_SCALE,
    method_text,
    normalise_minmax,
    plain_text,
    score_maps,
    seg_view,
)
from pipeline.model.backbone import load_backbone
from pipeline.model.heads import UnmixHead
from pipeline.model.recalibrate import recalibrate_batchnorm

GOAL = 3.0
SIX = METHODS[:6]  # evaluate.seg.methods' default: all but this project's per-token variant


def old_post(maps: dict, masks: list, rule: str | None, threshold: float, acc: dict) -> None:
    """The replaced seg_eval loop body: normalised_maps, then label_with_background / argmax."""
    for j, mask in enumerate(masks):
        targets = {v: variant_target(mask, v) for v in acc[SIX[0]]}
        for m in SIX:
            flat = maps[m][j].flatten(1)
            low = flat.min(dim=1, keepdim=True).values
            span = flat.max(dim=1, keepdim=True).values - low
            normed = ((flat - low) / span.clamp_min(1e-12)).view_as(maps[m][j])
            normalised = F.interpolate(normed[None], size=mask.shape, mode="bilinear", align_corners=False)[0]
            for v, a in acc[m].items():
                if v == "bkgd":
                    best, label = normalised.max(dim=0)
                    if rule == "softmax":
                        best = (SOFTMAX_SCALE * normalised).softmax(dim=0).max(dim=0).values
                    pred = label + 1 if rule == "none" else torch.where(best < threshold, 0, label + 1)
                else:
                    pred = normalised.argmax(dim=0)
                a.update(pred.cpu().numpy(), targets[v])


def new_post(maps: dict, masks: list, rule: str | None, threshold: float, acc: dict) -> None:
    for j, mask in enumerate(masks):
        targets = {v: variant_target(mask, v) for v in acc[SIX[0]]}
        for m in SIX:
            objects, is_background = labels(normalise_minmax(maps[m][j]), mask.shape, rule, threshold)
            for v, a in acc[m].items():
                a.update(with_background(objects, is_background) if v == "bkgd" else objects, targets[v])


def main() -> None:
    p = common.parser(__doc__.splitlines()[0], images=80, image_size=128)
    p.add_argument("--background", default="none", help="none | softmax | max-score")
    p.add_argument("--threshold", type=float, default=0.85)
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args()
    device = torch.device(args.device)
    with common.workdir(args.workdir) as root:
        dataset, source = common.prepare_images(args, root, n_val=args.images)
        data = load_segmentation(dataset, root / "data" / dataset, "val")
        backbone = load_backbone(args.backbone, pretrained=None, device=args.device)
        size = args.image_size
        images = [seg_view(data.image(i), size) for i in range(len(data.records))]
        masks = [data.mask(i) for i in range(len(data.records))]
        recalibrate_batchnorm(backbone, [torch.stack(images[:16]).to(device)])
        torch.manual_seed(0)
        head = UnmixHead(backbone.embed_dim).to(device).eval()
        names = object_classes(data)
        texts = method_text(plain_text(backbone, names), head, SIX)
        rule = args.background if data.has_background else None
        batches = [torch.stack(images[a:a + args.batch_size]).to(device)
                   for a in range(0, len(images), args.batch_size)]
        batch_masks = [masks[a:a + args.batch_size] for a in range(0, len(masks), args.batch_size)]

        def accumulators() -> dict:
            return {m: {v: MiouAccumulator(len(names) + (v == "bkgd"), 0 if v == "bkgd" else None)
                        for v in variants(data.has_background)} for m in SIX}

        with torch.no_grad():
            backbone.spatial_tokens(batches[0])  # warm-up
            seconds = {"bare": 0.0, "backbone": 0.0, "old": 0.0, "new": 0.0}
            acc_old, acc_new = accumulators(), accumulators()
            for batch, ms in zip(batches, batch_masks):
                start = time.perf_counter()
                backbone.spatial_tokens(batch)
                common.sync(args.device)
                seconds["bare"] += time.perf_counter() - start
                start = time.perf_counter()
                maps = score_maps(backbone, head, batch, texts)
                common.sync(args.device)
                seconds["backbone"] += time.perf_counter() - start
                for name, post, acc in (("old", old_post, acc_old), ("new", new_post, acc_new)):
                    start = time.perf_counter()
                    post(maps, ms, rule, args.threshold, acc)
                    common.sync(args.device)
                    seconds[name] += time.perf_counter() - start
        identical = all(np.array_equal(acc_old[m][v].conf, acc_new[m][v].conf)
                        and all(np.array_equal(acc_old[m][v].per_image[p], acc_new[m][v].per_image[p],
                                               equal_nan=True) for p in acc_old[m][v].per_image)
                        for m in SIX for v in acc_old[m])  # every mIoU number derives from these
        n = len(images)
        per = {k: v / n for k, v in seconds.items()}
        ratio = per["old"] / per["new"]
        rows = [
            ["bare backbone forward (spatial tokens)", per["bare"], per["bare"] / per["bare"]],
            ["backbone: trunk + token paths + 6 methods' score maps", per["backbone"], per["backbone"] / per["bare"]],
            ["post-processing, old (C x H x W stack)", per["old"], per["old"] / per["bare"]],
            ["post-processing, new (labels.py)", per["new"], per["new"] / per["bare"]],
            ["evaluate seg per image, old (backbone + post)", per["backbone"] + per["old"],
             (per["backbone"] + per["old"]) / per["bare"]],
            ["evaluate seg per image, new (backbone + post)", per["backbone"] + per["new"],
             (per["backbone"] + per["new"]) / per["bare"]],
        ]
        setup = (f"{source}; {args.backbone} random-init (BatchNorm recalibrated) at {size} px on "
                 f"{args.device}; {len(names)} classes, methods {', '.join(SIX)}; background rule "
                 f"{rule} (threshold {args.threshold}); each mask at its own size; labels and every mIoU "
                 f"number old == new: **{identical}**")
        common.report("ZS3 post-processing: old vs new, per image", setup,
                      ["step", "seconds / image", "x bare forward"], rows,
                      common.verdict(ratio, f">= {GOAL:g}x", ratio >= GOAL and identical,
                                     "post-processing speed-up (old / new)"),
                      args, {"seconds_per_image": per, "identical": identical, "ratio": ratio})


if __name__ == "__main__":
    main()
