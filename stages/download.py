"""Stage `download`: fetch and unpack a dataset, or generate the planted-signal one.

For `synthetic` this also writes the smoke profile's backbone: a random-init tiny CLIP whose
BatchNorm statistics are recalibrated on the generated images. A random ModifiedResNet in eval
mode otherwise yields near-constant tokens (TESTING-WITHOUT-WEIGHTS trap 1). This is done only
here, for the random test backbone, never for pretrained weights.
"""
from __future__ import annotations

from pathlib import Path

import torch

from pipeline import paths
from pipeline.augment import eval_view
from pipeline.backbone import load_backbone, recalibrate_batchnorm
from pipeline.datasets import load_multilabel
from pipeline.download import download_dataset
from pipeline.files import atomic_write
from pipeline.images import load_image
from pipeline.synthetic import make_planted_coco

RECALIBRATION_IMAGES = 128


def write_random_backbone(out: Path, name: str, init_seed: int, image_size: int, images: list[Path]) -> Path:
    """Random-init `name`, BatchNorm recalibrated on `images`, saved as a plain state dict."""
    backbone = load_backbone(name, pretrained=None, init_seed=init_seed)
    batch = torch.stack([eval_view(load_image(p), image_size) for p in images])  # (N, 3, S, S)
    recalibrate_batchnorm(backbone, batch.split(32))
    return atomic_write(out, lambda tmp: torch.save(backbone.model.state_dict(), tmp))


def run(params: dict, dataset: str) -> dict:
    root = paths.dataset_root(params, dataset)
    if dataset != "synthetic":
        return {"dataset": dataset, "files": [str(p) for p in download_dataset(dataset, root)]}
    s = params["data"]["synthetic"]
    make_planted_coco(root, s["n_train"], s["n_val"], num_classes=s["num_classes"],
                      image_size=s["image_size"], seed=s["seed"])
    train = load_multilabel("synthetic", root, "train")
    b = params["backbone"]
    ckpt = write_random_backbone(root / "backbone.pt", b["name"], b["init_seed"], b["image_size"],
                                 [r.path for r in train.records[:RECALIBRATION_IMAGES]])
    print(f"generated planted-signal data in {root} and a recalibrated random {b['name']} at {ckpt}")
    return {"dataset": dataset, "root": str(root), "backbone": str(ckpt)}
