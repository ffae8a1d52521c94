"""Turn params into objects (device, frozen backbone, head) in one place, so every stage agrees.

The backbone is where a run can silently mean nothing: random weights print one loud line, a
pretrained tag that is neither cached nor reachable fails in seconds naming `backbone.checkpoint`
and `backbone.pretrained: null`, and `backbone.recalibrate_bn` (random init only) re-estimates the
BatchNorm statistics on the training dataset's own images (else a random ModifiedResNet maps every
image to nearly the same tokens; TESTING-WITHOUT-WEIGHTS trap 1).
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import torch

from pipeline.backbone import FrozenCLIP, load_backbone
from pipeline.heads import UnmixHead
from pipeline.weights import check_pretrained_available

RECALIBRATION_IMAGES = 128  # first training images (sorted by id), one un-augmented view each
RECALIBRATION_BATCH = 32


def resolve_device(spec: str | None = "auto") -> torch.device:
    """'auto' -> the first CUDA device when present, else CPU."""
    if spec in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def is_random(b: dict) -> bool:
    """params['backbone'] describes random weights (no checkpoint, no pretrained tag)."""
    return not b.get("checkpoint") and b.get("pretrained") in (None, "random")


def random_warning(b: dict) -> str:
    fix = "" if b.get("recalibrate_bn") else "; set 'backbone.recalibrate_bn: true' at least"
    return (f"WARNING: backbone {b['name']} has RANDOM weights (backbone.pretrained: null, no "
            f"backbone.checkpoint): every number of this run means nothing{fix}")


def backbone_from_params(params: dict, device: torch.device | None = None) -> FrozenCLIP:
    """The frozen backbone of params['backbone'] (BatchNorm recalibrated when asked, which needs
    params['data'] and params['paths'] too: the statistics come from the training images)."""
    from pipeline.config import ParamError

    b = params["backbone"]
    if b.get("recalibrate_bn") and not is_random(b):
        raise ParamError("'backbone.recalibrate_bn' changes the weights' BatchNorm statistics: only for "
                         "random init (backbone.pretrained: null, no backbone.checkpoint); set it false")
    pretrained = None if b["checkpoint"] else b["pretrained"]
    if pretrained not in (None, "random"):
        check_pretrained_available(b["name"], pretrained)
    backbone = load_backbone(
        b["name"], pretrained=pretrained, checkpoint=b["checkpoint"], sha256=b["sha256"],
        device=device or resolve_device(b["device"]), precision=b["precision"],
        channels_last=b["channels_last"], compile=b["compile"], init_seed=b["init_seed"])
    if is_random(b):
        print(random_warning(b), file=sys.stderr, flush=True)
        if b.get("recalibrate_bn"):
            recalibrate_on_dataset(backbone, params)
    return backbone


def recalibrate_on_dataset(backbone: FrozenCLIP, params: dict) -> None:
    """BatchNorm statistics from the first training images; cached under paths.cache/backbone so
    every stage (and every Dask worker) gets the same statistics without recomputing them."""
    from pipeline import paths
    from pipeline.backbone import recalibrate_batchnorm
    from pipeline.config import ParamError
    from pipeline.files import atomic_write

    if "data" not in params or "paths" not in params:
        raise ParamError("'backbone.recalibrate_bn' needs the dataset: pass the whole params")
    b, d = params["backbone"], params["data"]
    key = f"{b['name']}-seed{b['init_seed']}-{b['image_size']}px-{d['dataset']}-{d['train_split']}"
    stats_file = Path(params["paths"]["cache"]) / "backbone" / f"bn-{key}.pt"
    norms = {n: m for n, m in backbone.model.visual.named_modules()
             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    from pipeline.augment import eval_view
    from pipeline.datasets import load_multilabel
    from pipeline.images import load_image

    dataset = load_multilabel(d["dataset"], paths.dataset_root(params), d["train_split"])
    records = dataset.records[:RECALIBRATION_IMAGES]
    # reused only for the same image bytes, weights and precision: regenerated or replaced images
    # (same names) recalibrate again
    images = hashlib.sha256()
    for r in records:
        images.update(hashlib.sha256(Path(r.path).read_bytes()).digest())
    identity = {"images": images.hexdigest(), "weights": backbone.weights_digest, "precision": b["precision"]}
    if stats_file.exists():
        saved = torch.load(stats_file, map_location="cpu", weights_only=True)
        if saved.get("identity") == identity:
            for name, m in norms.items():
                m.running_mean.copy_(saved["stats"][f"{name}.mean"])
                m.running_var.copy_(saved["stats"][f"{name}.var"])
            backbone.weights_digest = saved["weights_digest"]
            return
    batches = (torch.stack([eval_view(load_image(r.path), b["image_size"])
                            for r in records[i:i + RECALIBRATION_BATCH]])  # (B, 3, S, S)
               for i in range(0, len(records), RECALIBRATION_BATCH))
    recalibrate_batchnorm(backbone, batches)
    stats = {f"{n}.{k}": getattr(m, f"running_{k}").detach().cpu().clone()
             for n, m in norms.items() for k in ("mean", "var")}
    atomic_write(stats_file, lambda tmp: torch.save(
        {"stats": stats, "weights_digest": backbone.weights_digest, "identity": identity}, tmp))
    print(f"backbone {b['name']}: BatchNorm statistics recalibrated on {len(records)} "
          f"{d['dataset']} {d['train_split']} images -> {stats_file}", file=sys.stderr, flush=True)


def head_from_params(model: dict, embed_dim: int) -> UnmixHead:
    """`model` is the params['model'] section (stored in checkpoints to rebuild the head)."""
    return UnmixHead(
        embed_dim,
        proj_dim=model["proj_dim"],
        text_hidden=model["text_hidden"],
        image_projector=model["image_projector"],
        softmax_mode=model["softmax"],
        text_bn=model.get("text_bn", "train"),  # projectors saved before the recipes trained in train mode
    )
