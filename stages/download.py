"""Stage `data` (`pipeline download`): check every dataset the params configure, fetch only what is
missing, or generate the planted-signal one.

Without --dataset (the DVC stage): every evaluation dataset is checked first (pipeline.data.datacheck;
a missing one fails before any work, or is skipped under `evaluate.missing: skip`), then the
training dataset is used as placed, downloaded only when absent. With --dataset: that one only.

For `synthetic` this also writes the smoke profile's backbone: a random-init tiny CLIP whose
BatchNorm statistics are recalibrated on the generated images. A random ModifiedResNet in eval
mode otherwise yields near-constant tokens (docs/TESTING.md, trap 1). This is done only
here, for the random test backbone, never for pretrained weights.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import paths
from pipeline.config.backbones import backbone_kind
from pipeline.config.schema import Params
from pipeline.data.datacheck import check_datasets, require_datasets
from pipeline.data.datasets import load_multilabel, require_reachable
from pipeline.data.download import download_dataset
from pipeline.data.synthetic import make_planted_coco
from pipeline.files import atomic_save
from pipeline.model.backbone import FrozenCLIP
from pipeline.model.recalibrate import RECALIBRATION_IMAGES, recalibrate_on_images
from pipeline.model.vit import load_any_backbone


def write_random_backbone(out: Path, name: str, init_seed: int, image_size: int, images: list[Path]) -> Path:
    """Random-init `name`, BatchNorm recalibrated on `images` (a ResNet; a ViT has no BatchNorm),
    saved as a plain state dict."""
    backbone = load_any_backbone(name, pretrained=None, init_seed=init_seed)
    if isinstance(backbone, FrozenCLIP):
        recalibrate_on_images(backbone, images, image_size)
    return atomic_save(backbone.model.state_dict(), out)  # the same bytes every run: DVC rebuilds nothing


def run(params: Params, dataset: str | None = None) -> dict[str, Any]:
    if dataset is None:
        return check_and_fetch(params)
    root = paths.dataset_root(params.paths, dataset)
    require_reachable(root)  # a symbolic link loop: one line, not mkdir's FileExistsError
    if dataset != "synthetic":
        return {"dataset": dataset, "files": [str(p) for p in download_dataset(dataset, root)]}
    return generate(params, root)


def check_and_fetch(params: Params) -> dict[str, Any]:
    """The DVC `data` stage: evaluation datasets checked first, then the training one in place
    (verified), fetched (only missing archives) or generated."""
    name = params.data.dataset
    require_reachable(paths.dataset_root(params.paths, name))
    skipped = require_datasets(params, whats=("seg", "zs-mlr"), training=False,  # before any work
                               generated_ok=name == "synthetic")
    root = paths.dataset_root(params.paths, name)
    if name == "synthetic":
        generate(params, root)
    else:
        training = [p for p in check_datasets(params) if p.need.what is None]
        if training:
            print(f"{name}: not in place under {root} ({training[0].message.split(': ', 1)[1]}); "
                  "downloading the missing archives", flush=True)
            download_dataset(name, root)
        require_datasets(params, whats=())  # the training dataset, in place now
        print(f"{name}: in place under {root}", flush=True)
    return {"dataset": name, "root": str(root),
            "skipped": [f"{p.need.dataset} ({p.need.what})" for p in skipped]}


def generate(params: Params, root: Path) -> dict[str, Any]:
    s = params.data.synthetic
    make_planted_coco(root, s.n_train, s.n_val, num_classes=s.num_classes,
                      image_size=s.image_size, seed=s.seed)
    train = load_multilabel("synthetic", root, "train")
    b = params.backbone
    ckpt = write_random_backbone(root / "backbone.pt", b.name, b.init_seed, b.image_size,
                                 [r.path for r in train.records[:RECALIBRATION_IMAGES]])
    how = "a recalibrated" if backbone_kind(b.name) == "resnet" else "a"
    print(f"generated planted-signal data in {root} and {how} random {b.name} at {ckpt}")
    return {"dataset": "synthetic", "root": str(root), "backbone": str(ckpt)}
