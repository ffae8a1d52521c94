"""Benchmark 6: the input check of a complete store of COCO-14 train's size, when nothing changed.

`extract-features` (and `verify --inputs`) compare every image file with the record the store
holds for it (size, mtime_ns, crc32c; pipeline/store/inputs.py): one stat per image, the bytes
read only where the size or mtime differ. Here: 82,081 image entries (COCO-2014 train) as tiny
files, a complete store of tiny tokens recording them (shards of 256), then
pipeline.extraction.inputs.check_complete_shards timed (read every shard's records, stat every
file) with nothing changed, and again after every file was touched (mtime changed, bytes not:
each file is then read and its crc32c compared: what a copy without times costs, tiny files here).
Also the annotation digest (crc32c) of a file of COCO-14 train's annotation size (332 MB).
Goal (issue 20): nothing changed < 10 s.

    python bench/bench_inputs.py --images 82081 --json results/bench_inputs.json
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import common
import numpy as np

from pipeline.extraction.inputs import check_complete_shards
from pipeline.store.cache import FeatureCache
from pipeline.store.create import create_or_open
from pipeline.store.inputs import annotation_records, file_records

COCO14_TRAIN, ANNOTATION_MB = 82_081, 332


def make(root: Path, n: int, shard: int) -> tuple[FeatureCache, list[Path]]:
    """n tiny image files and a complete store (1 view of 1 x 8 tokens) recording them."""
    images = root / "train2014"
    images.mkdir(parents=True, exist_ok=True)
    paths = [images / f"{i:012d}.jpg" for i in range(n)]
    for i, p in enumerate(paths):
        p.write_bytes(i.to_bytes(8, "little"))
    cache = create_or_open(root / "train.zarr", ids=[str(i) for i in range(n)],
                           labels=np.zeros((n, 80), np.int8), classnames=[f"c{c}" for c in range(80)],
                           views=1, num_tokens=1, dim=8, fingerprint={"bench": "inputs"},
                           shard_size=shard, overwrite=True)
    tokens = np.zeros((shard, 1, 1, 8), np.float16)
    for s in range(cache.num_shards):
        a, b = cache.shard_range(s)
        cache.write_shard(s, tokens[: b - a], np.zeros(b - a, np.int8), file_records(paths[a:b]))
    return FeatureCache.open(root / "train.zarr"), paths


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    p = common.parser(__doc__.splitlines()[0], images=COCO14_TRAIN)
    p.add_argument("--repeats", type=int, default=3, help="timed checks (median reported)")
    args = p.parse_args()
    shard = args.shard_size or 256
    with common.workdir(args.workdir) as root:
        build, (cache, paths) = timed(lambda: make(root, args.images, shard))
        runs = [timed(lambda: check_complete_shards(cache, paths)) for _ in range(args.repeats)]
        quiet = float(np.median([t for t, _ in runs]))
        assert not runs[0][1][1].changed and not runs[0][1][1].touched
        for path in paths:
            os.utime(path, ns=(10**18, 10**18))
        touched_s, (_, touched) = timed(lambda: check_complete_shards(cache, paths))
        assert len(touched.touched) == len(paths) and not touched.changed
        big = root / "instances_train2014.json"
        with open(big, "wb") as f:
            f.write(os.urandom(1 << 20) * ANNOTATION_MB)
        ann_s, _ = timed(lambda: annotation_records([big], root))
    rows = [[f"{args.images:,} images, nothing changed (stat each, records of {cache.num_shards} shards)",
             f"{quiet:.2f} s ({min(t for t, _ in runs):.2f}-{max(t for t, _ in runs):.2f})",
             f"{quiet / args.images * 1e6:.1f} us per image"],
            [f"{args.images:,} images, every file touched (each read, crc32c compared)",
             f"{touched_s:.2f} s", f"{touched_s / args.images * 1e6:.1f} us per image"],
            [f"annotation file of {ANNOTATION_MB} MB: crc32c (page cache)", f"{ann_s:.2f} s",
             f"{ANNOTATION_MB / ann_s:,.0f} MB/s"],
            ["building the store and the files (not part of the check)", f"{build:.1f} s", ""]]
    met = quiet < 10
    verdict = (f"**input check of a complete store of {args.images:,} images, nothing changed: "
               f"{quiet:.2f} s** (goal < 10 s): **{'met' if met else 'NOT met'}**")
    setup = (f"{args.images:,} image files of 8 bytes in one folder (local disk, warm dentry and page "
             f"cache), a complete store recording them in shards of {shard}; median of {args.repeats} checks")
    common.report("Benchmark 6: input check", setup, ["what", "seconds", "rate"], rows, verdict, args,
                  {"nothing_changed_s": quiet, "all_touched_s": touched_s, "annotation_s": ann_s})


if __name__ == "__main__":
    main()
