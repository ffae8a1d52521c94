"""BatchNorm recalibration of a random-init backbone (docs/TESTING.md, trap 1).

A fresh ModifiedResNet at its initial BatchNorm statistics maps all images to nearly the same
tokens; re-estimating the statistics on real images makes a random backbone separate them. ONLY
for random-init backbones (tests, the smoke profile's `backbone.recalibrate_bn`), never for
pretrained weights.
"""
from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from pipeline.config.schema import Params
from pipeline.model.backbone import FrozenCLIP, FrozenTowers

RECALIBRATION_IMAGES = 128  # first training images (sorted by id), one un-augmented view each
RECALIBRATION_BATCH = 32


def recalibrate_batchnorm(backbone: FrozenCLIP, batches: Iterable[torch.Tensor]) -> None:
    """Re-estimate the image tower's BatchNorm running statistics on ``batches`` of images.

    Statistics are reset and averaged cumulatively (momentum=None) over a train-mode forward of the
    trunk without gradients; the tower goes back to eval. ``weights_digest`` gets a
    "+bn:<hash of the new statistics>" suffix so caches notice.
    """
    visual = backbone.model.visual
    norms = [m for m in visual.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    seen = 0
    visual.train()
    try:
        with torch.no_grad():
            for images in batches:
                backbone._trunk_eager(backbone._prepare(images))  # the trunk holds every BatchNorm
                seen += 1
    finally:
        visual.eval()
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
    if seen == 0:
        raise ValueError("recalibrate_batchnorm needs at least one batch of images")
    stats = hashlib.sha256()
    for m in norms:
        assert m.running_mean is not None and m.running_var is not None  # CLIP's BatchNorms track them
        stats.update(m.running_mean.detach().cpu().numpy().tobytes())
        stats.update(m.running_var.detach().cpu().numpy().tobytes())
    base = backbone.weights_digest.split("+bn:")[0]
    backbone.weights_digest = f"{base}+bn:{stats.hexdigest()[:16]}"


def recalibrate_on_images(backbone: FrozenCLIP, images: Sequence[str | Path], image_size: int) -> None:
    """recalibrate_batchnorm on one un-augmented view of each image file, RECALIBRATION_BATCH at a time."""
    from pipeline.data.augment import eval_view
    from pipeline.data.images import load_image

    batches = (torch.stack([eval_view(load_image(p), image_size)
                            for p in images[i:i + RECALIBRATION_BATCH]])  # (B, 3, S, S)
               for i in range(0, len(images), RECALIBRATION_BATCH))
    recalibrate_batchnorm(backbone, batches)


def recalibrate_on_dataset(backbone: FrozenTowers, params: Params) -> None:
    """BatchNorm statistics from the first training images; cached under paths.cache/backbone so
    every stage (and every Dask worker) gets the same statistics without recomputing them."""
    from pipeline.config import paths
    from pipeline.data.datasets import load_multilabel

    if not isinstance(backbone, FrozenCLIP):  # build.backbone_from_params refuses a ViT before this
        raise TypeError(f"{backbone.name}: only a ModifiedResNet has BatchNorm statistics to recalibrate")
    b, d = params.backbone, params.data
    stats_file = bn_state_file(params)

    dataset = load_multilabel(d.dataset, paths.dataset_root(params.paths, d.dataset), d.train_split)
    records = dataset.records[:RECALIBRATION_IMAGES]
    # reused only for the same image bytes, weights and precision: regenerated or replaced images
    # (same names) recalibrate again
    images = hashlib.sha256()
    for r in records:
        images.update(hashlib.sha256(Path(r.path).read_bytes()).digest())
    identity = {"images": images.hexdigest(), "weights": backbone.weights_digest, "precision": b.precision}
    if stats_file.exists():
        saved = torch.load(stats_file, map_location="cpu", weights_only=True)
        if saved.get("identity") == identity:
            apply_bn_state(backbone, saved)
            return
    recalibrate_on_images(backbone, [r.path for r in records], b.image_size)
    save_bn_state(backbone, stats_file, identity)
    print(f"backbone {b.name}: BatchNorm statistics recalibrated on {len(records)} "
          f"{d.dataset} {d.train_split} images -> {stats_file}", file=sys.stderr, flush=True)


def bn_state_file(params: Params) -> Path:
    """Where recalibrate_on_dataset keeps the statistics of params' random backbone (a projectors
    file records it, with its sha256, so `segment` and the API rebuild exactly that backbone)."""
    b, d = params.backbone, params.data
    key = f"{b.name}-seed{b.init_seed}-{b.image_size}px-{d.dataset}-{d.train_split}"
    return Path(params.paths.cache) / "backbone" / f"bn-{key}.pt"


def _norms(backbone: FrozenCLIP) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    return {n: m for n, m in backbone.model.visual.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def is_bn_state(saved: object) -> bool:
    """A file recalibrate_on_dataset wrote: {"stats", "weights_digest", "identity"}."""
    return isinstance(saved, dict) and isinstance(saved.get("stats"), dict) and "weights_digest" in saved


def apply_bn_state(backbone: FrozenCLIP, saved: dict) -> None:
    """Put a bn_state_file's statistics (read with weights_only) into the random backbone they were
    computed for; its weights_digest becomes the recorded "...+bn:<hash>" one."""
    for name, m in _norms(backbone).items():
        assert m.running_mean is not None and m.running_var is not None  # CLIP's BatchNorms track them
        m.running_mean.copy_(saved["stats"][f"{name}.mean"])
        m.running_var.copy_(saved["stats"][f"{name}.var"])
    backbone.weights_digest = saved["weights_digest"]


def save_bn_state(backbone: FrozenCLIP, path: Path, identity: dict) -> None:
    """The image tower's BatchNorm statistics and weights digest, atomically (apply_bn_state reads
    them back); `identity` says which images and weights they were computed from."""
    from pipeline.files import atomic_save

    stats = {f"{n}.{k}": getattr(m, f"running_{k}").detach().cpu().clone()
             for n, m in _norms(backbone).items() for k in ("mean", "var")}
    atomic_save({"stats": stats, "weights_digest": backbone.weights_digest, "identity": identity}, path)
