"""What every evaluation shares: the backbone and the projectors it reads (and which), dataset roots.

Every results JSON carries "source": the projectors file (best or last, its epoch) and the
recipe, and every table says the same in its first line, so a number never travels without
what produced it.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from pipeline.config import paths
from pipeline.config.schema import Params, Paths
from pipeline.data.datasets import require_reachable
from pipeline.errors import DatasetError, TrainingError
from pipeline.model.backbone import FrozenTowers
from pipeline.model.build import backbone_from_params, resolve_device
from pipeline.model.heads import UnmixHead
from pipeline.model.projectors import load_projectors

SEG_SPLIT = "val"
CONTEXT59_HELP = (
    "PASCAL Context 59 cannot be downloaded automatically: fetch VOC2010 trainval "
    "(http://host.robots.ox.ac.uk/pascal/VOC/voc2010/) and the Detail annotations "
    "trainval_merged.json (https://cs.stanford.edu/~roozbeh/pascal-context/), convert them with "
    "mmsegmentation's tools/dataset_converters/pascal_context.py into "
    "{root}/VOCdevkit/VOC2010/{{SegmentationClassContext,ImageSets/SegmentationContext}}, or drop it "
    "with --set 'evaluate.seg.datasets=[voc2012,coco2017]'")


def backbone_and_head(params: Params) -> tuple[FrozenTowers, UnmixHead, dict, dict]:
    """The frozen backbone, the evaluated projectors, their meta and their source
    (pipeline.evaluation.sources.source)."""
    device = resolve_device(params.backbone.device)
    backbone = backbone_from_params(params.backbone, device, params=params)
    head, meta, src = load_head(params, device, backbone.embed_dim)
    return backbone, head, meta, src


def dataset_root(paths_: Paths, name: str) -> Path:
    """The dataset's root, or a DatasetError naming it and how to get the data."""
    root = paths.dataset_root(paths_, name)
    require_reachable(root)
    if not root.exists():
        how = CONTEXT59_HELP.format(root=root) if name == "context59" else \
            f"run `pipeline download --dataset {name}`"
        raise DatasetError(f"dataset {name}: {root} not found; {how}")
    return root


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def load_head(params: Params, device: torch.device, embed_dim: int | None = None
              ) -> tuple[UnmixHead, dict, dict]:
    """(head in eval mode, its meta, its source) for evaluate.projectors (best | last).
    Refuses a head trained for another backbone width."""
    path = paths.projectors(params.paths, params.evaluate.projectors)
    head, meta = load_projectors(path, device, which=params.evaluate.projectors)
    if embed_dim is not None and meta["embed_dim"] != embed_dim:
        raise TrainingError(f"projectors at {path} were trained on {meta['embed_dim']}-d tokens but "
                            f"backbone {params.backbone.name} gives {embed_dim}-d: retrain them")
    return head, meta, source(params, path, meta)


def source(params: Params, path: Path, meta: dict) -> dict:
    """What produced a result: the projectors file, which one and its epoch, the recipe, the
    backbone and its token methods (trained on: extract.tokens; scored by ZS3 `ours`: evaluate.seg.tokens)."""
    return {"projectors": {"which": params.evaluate.projectors, "path": str(path),
                           "epoch": meta.get("epoch")},
            "recipe": params.recipe, "backbone": params.backbone.name,
            "tokens": {"train": params.extract.tokens, "seg": params.evaluate.seg.tokens}}


def source_line(src: dict) -> str:
    """The provenance sentence every table starts with."""
    p = src["projectors"]
    tokens = src.get("tokens") or {}
    backbone = (f"; backbone: {src['backbone']}, tokens: {tokens.get('train')} (trained on), "
                f"{tokens.get('seg')} (ZS3 ours)") if src.get("backbone") else ""
    return (f"Projectors: {p['which']} ({p['path']}, epoch {p['epoch']}); "
            f"recipe: {src['recipe']}{backbone}.")
