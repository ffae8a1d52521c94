"""Shared set-up for the bench scripts: arguments, data, params, feature stores, tables.

Every benchmark measures its pair of numbers in the same process, one after the other, so the
ratio holds on any machine even where the absolute times do not. Data: real COCO JPEGs from
../shared/data/coco2017-tiny when present (re-laid out as a COCO-2017 subset of the size asked
for), else generated planted-signal images. Backbones are random-init (no weights offline).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would interleave with the tables
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as `python bench/x.py` from anywhere

import numpy as np
import torch

from pipeline.config import paths
from pipeline.config.params import load_params, updated
from pipeline.config.schema import Params

REAL_COCO = REPO.parent / "shared" / "data" / "coco2017-tiny"
GENERATED_IMAGE_SIZE = 480  # about COCO's 640x480, so decoding costs what it would on real data


# -- arguments -----------------------------------------------------------------------------------
def parser(description: str, images: int, image_size: int = 224, views: int = 2) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--images", type=int, default=images, help="training images")
    p.add_argument("--backbone", default="tiny-RN", help="tiny-RN | RN50 | RN101 (random init)")
    p.add_argument("--image-size", type=int, default=image_size, help="input side, multiple of 32")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--views", type=int, default=views, help="augmented views per training image")
    p.add_argument("--shard-size", type=int, default=None,
                   help="images per Zarr shard (default: extract.shard_size of configs/params.yaml)")
    p.add_argument("--data", type=Path, default=REAL_COCO,
                   help="COCO-2017 layout folder of real JPEGs (generated images when absent)")
    p.add_argument("--generated", action="store_true", help="use generated images even if --data exists")
    p.add_argument("--workdir", type=Path, default=None, help="keep stores here (default: a temp dir)")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    return p


@contextmanager
def workdir(path: Path | None) -> Iterator[Path]:
    """The given folder (kept), or a temporary one removed afterwards."""
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    tmp = Path(tempfile.mkdtemp(prefix="unmix-bench-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- data ----------------------------------------------------------------------------------------
def _coco_subset(src: Path, dst: Path, n_train: int, n_val: int) -> None:
    """A COCO-2017 layout of n_train + n_val real images (symlinks) drawn from both splits of src;
    images are reused under new ids when more are asked for than src holds."""
    pool, anns, categories = [], {}, None
    for split in ("train", "val"):
        data = json.loads((src / "annotations" / f"instances_{split}2017.json").read_text())
        categories = data["categories"]
        pool += [(src / f"{split}2017" / im["file_name"], im) for im in data["images"]]
        for a in data["annotations"]:
            anns.setdefault(a["image_id"], []).append(a)
    pool.sort(key=lambda p: p[1]["id"])
    next_ann = 1
    for split, start, count in (("train", 0, n_train), ("val", n_train, n_val)):
        (dst / f"{split}2017").mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for j in range(start, start + count):
            path, im = pool[j % len(pool)]
            new_id = im["id"] + 10_000_000 * (j // len(pool))  # a repeat gets its own id
            name = f"{new_id:012d}.jpg"
            link = dst / f"{split}2017" / name
            if not link.exists():
                link.symlink_to(path.resolve())
            images.append({**im, "id": new_id, "file_name": name})
            for a in anns.get(im["id"], []):
                annotations.append({**a, "id": next_ann, "image_id": new_id})
                next_ann += 1
        (dst / "annotations").mkdir(parents=True, exist_ok=True)
        (dst / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(
            {"images": images, "annotations": annotations, "categories": categories}))


def prepare_images(args: argparse.Namespace, root: Path, n_val: int) -> tuple[str, str]:
    """Write the dataset under root/data; returns (params data.dataset, a description)."""
    real = args.data is not None and (args.data / "annotations").is_dir() and not args.generated
    if real:
        _coco_subset(args.data, root / "data" / "coco2017", args.images, n_val)
        return "coco2017", f"real COCO JPEGs from {args.data} ({args.images} train, {n_val} val)"
    from pipeline.data.synthetic import make_planted_coco

    make_planted_coco(root / "data" / "synthetic", args.images, n_val, num_classes=8,
                      image_size=GENERATED_IMAGE_SIZE)
    return "synthetic", (f"generated {GENERATED_IMAGE_SIZE}px JPEGs ({args.images} train, {n_val} val)")


def make_params(args: argparse.Namespace, root: Path, dataset: str, recipe: str | None = None,
                **sections: dict) -> Params:
    """configs/params.yaml with the bench's backbone, device, views and folders under root;
    `recipe` (default: the file's) and `sections` override further keys, e.g. train={"epochs": 1}."""
    sets = {
        "paths.data": root / "data", "paths.cache": root / "cache", "paths.results": root / "results",
        "data.dataset": dataset, "data.train_split": "train", "data.val_split": "val",
        "backbone.name": args.backbone, "backbone.pretrained": "null", "backbone.checkpoint": "null",
        "backbone.image_size": args.image_size, "backbone.device": args.device,
        "backbone.channels_last": str(args.device != "cpu").lower(),
        "extract.views": args.views, "train.device": args.device,
    }
    if args.shard_size:
        sets["extract.shard_size"] = args.shard_size
    if recipe:
        sets["recipe"] = recipe
    for section, values in sections.items():
        for key, value in values.items():
            sets[f"{section}.{key}"] = "null" if value is None else value
    return load_params(REPO / "configs" / "params.yaml", [f"{k}={v}" for k, v in sets.items()])


def recalibrate(params: Params, images: int = 16) -> Params:
    """Give the random backbone data-fitted BatchNorm statistics (docs/TESTING.md, trap 1),
    so its tokens vary between images as real features do; saved, and the params returned with it
    as backbone.checkpoint."""
    from pipeline.data.augment import eval_view
    from pipeline.data.datasets import load_multilabel
    from pipeline.model.build import backbone_from_params
    from pipeline.model.recalibrate import recalibrate_batchnorm

    data = load_multilabel(params.data.dataset, paths.dataset_root(params.paths, params.data.dataset), "train")
    backbone = backbone_from_params(params.backbone, params=params)
    size = params.backbone.image_size
    pixels = torch.stack([eval_view(data.image(i), size) for i in range(min(images, len(data)))])
    recalibrate_batchnorm(backbone, pixels.split(8))
    out = Path(params.paths.cache) / "backbone.pt"
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(backbone.model.state_dict(), out)
    return updated(params, {"backbone.checkpoint": str(out)})


def random_token_stores(params: Params, n_train: int, n_val: int, views: int, num_tokens: int,
                        dim: int, num_classes: int = 80, seed: int = 0) -> None:
    """Train/val stores of random float16 tokens in the layout a backbone would write, for timing
    code that reads tokens (training, ablation) at full RN-101 size without running RN-101."""
    from pipeline.extraction.expected import expected_fingerprint
    from pipeline.store.create import create_or_open

    rng = np.random.default_rng(seed)
    classnames = [f"class{c}" for c in range(num_classes)]
    for role, n, k in (("train", n_train, views), ("val", n_val, 1)):
        labels = (rng.random((n, num_classes)) < 0.05).astype(np.int8)  # (N, C), ~4 labels each
        expected = expected_fingerprint(params, role)  # recorded as what the params extract: readable
        cache = create_or_open(
            paths.feature_store(params.paths, role), ids=[f"{role}{i}" for i in range(n)], labels=labels,
            classnames=classnames, views=k, num_tokens=num_tokens, dim=dim,
            fingerprint={"source": "random tokens (bench)", "seed": seed, **expected.fingerprint()},
            shard_size=params.extract.shard_size, dtype="float16", overwrite=True,
            annotation_files=expected.annotation_files())
        for s in range(cache.num_shards):
            a, b = cache.shard_range(s)
            tokens = rng.standard_normal((b - a, k, num_tokens, dim), dtype=np.float32)  # (n, K, T, D)
            cache.write_shard(s, tokens.astype(np.float16), np.zeros(b - a, np.int8))
        raw = rng.standard_normal((3, num_classes, dim)).astype(np.float32)  # encode_text-like
        text = raw / np.linalg.norm(raw, axis=-1, keepdims=True)
        names = ("positive", "negative", "plain")
        cache.write_text_features({**dict(zip(names, text)), **{f"raw_{n}": r for n, r in zip(names, raw)}})


def tokens_nbytes(store: str | Path) -> int:
    """Bytes on disk of a store's tokens array alone (fixed metadata and text features excluded)."""
    return sum(f.stat().st_size for f in (Path(store) / "tokens").rglob("*") if f.is_file())


def token_shape(backbone: str, image_size: int) -> tuple[int, int]:
    """(T, D) of the spatial tokens: 1 + (S/32)^2 tokens of the CLIP embed dim."""
    dims = {"tiny-RN": 64, "RN50": 1024, "RN101": 512, "RN50x4": 640}
    return 1 + (image_size // 32) ** 2, dims[backbone]


# -- timing and reporting --------------------------------------------------------------------------
class Timer:
    def __enter__(self) -> Self:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@contextmanager
def profiled(enabled: bool, rows: int = 12) -> Iterator[None]:
    """torch.profiler over the block (CPU ops), its top ops by self time printed after."""
    if not enabled:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        yield
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def machine() -> str:
    """One line naming the hardware and the load (other processes skew absolute times)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu}, {os.cpu_count()} cores{gpu}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads; load average {load:.1f} at the end")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def report(title: str, setup: str, headers: Sequence[str], rows: Sequence[Sequence[Any]],
           verdict: str, args: argparse.Namespace, results: dict[str, Any]) -> None:
    """Print the table, the goal and its verdict; optionally save everything as JSON."""
    text = f"\n### {title}\n\n{setup}\n\n{markdown_table(headers, rows)}\n\n{verdict}\n\nMachine: {machine()}\n"
    print(text)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"title": title, "setup": setup, "headers": list(headers),
                                         "rows": [list(r) for r in rows], "verdict": verdict,
                                         "machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
                                         **results}, indent=2, default=str) + "\n")


def verdict(ratio: float, goal: str, met: bool, what: str) -> str:
    return f"**{what} = {ratio:,.3g}** (goal {goal}): **{'met' if met else 'NOT met'}**"


def render(json_files: Sequence[Path]) -> str:
    """The Markdown sections of saved results (`--json`), for bench/README.md."""
    out = []
    for path in json_files:
        r = json.loads(Path(path).read_text())
        out.append(f"### {r['title']}\n\n{r['setup']}\n\n{markdown_table(r['headers'], r['rows'])}\n\n"
                   f"{r['verdict']}\n\nMachine: {r['machine']}\n")
    return "\n".join(out)


if __name__ == "__main__":  # python bench/common.py results/*.json > numbers.md
    print(render([Path(p) for p in sys.argv[1:]]))
