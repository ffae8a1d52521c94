"""`backbone.recalibrate_bn`: a random backbone's BatchNorm statistics from the dataset's own images,
part of the weights digest (so feature stores notice), computed once and reused by every stage."""
from __future__ import annotations

from pathlib import Path

import torch

from pipeline.config.params import load_params, updated
from pipeline.config.schema import Params
from pipeline.data.augment import eval_view
from pipeline.data.datasets import load_multilabel
from pipeline.data.images import load_image
from pipeline.data.synthetic import make_planted_coco
from pipeline.model.backbone import TINY_MODEL, FrozenCLIP, load_backbone
from pipeline.model.build import backbone_from_params
from pipeline.model.recalibrate import recalibrate_batchnorm
from stages.download import write_random_backbone


def _params(tmp_path: Path, recalibrate: bool) -> Params:
    b = {"name": TINY_MODEL, "pretrained": None, "checkpoint": None, "sha256": None, "device": "cpu",
         "precision": "fp32", "channels_last": False, "compile": False, "init_seed": 0,
         "recalibrate_bn": recalibrate, "image_size": 64}
    return updated(load_params(), {"backbone": b, "data": {"dataset": "synthetic", "train_split": "train"},
                                   "paths": {"data": str(tmp_path / "data"), "cache": str(tmp_path / "cache")}})


def _backbone(tmp_path: Path, recalibrate: bool) -> FrozenCLIP:
    params = _params(tmp_path, recalibrate)
    return backbone_from_params(params.backbone, params=params)


def _spread(backbone, images: torch.Tensor) -> float:
    """Mean over token dimensions of the std across images of the mean token (a per-image summary)."""
    tokens = backbone.spatial_tokens(images).mean(dim=1)  # (N, T, D) -> (N, D)
    return float(tokens.std(dim=0).mean() / tokens.abs().mean())


def test_recalibrated_random_backbone_separates_images_and_changes_the_digest(tmp_path):
    root = make_planted_coco(tmp_path / "data" / "synthetic", 24, 8, num_classes=4, image_size=64)
    val = load_multilabel("synthetic", root, "val")
    images = torch.stack([eval_view(val.image(i), 64) for i in range(len(val))])  # (8, 3, 64, 64)

    plain = _backbone(tmp_path, False)
    recal = _backbone(tmp_path, True)
    assert recal.weights_digest.startswith(plain.weights_digest + "+bn:")
    assert _spread(recal, images) > 5 * _spread(plain, images)  # trap 1: near-constant tokens before

    stats = list((tmp_path / "cache" / "backbone").glob("bn-*.pt"))
    assert len(stats) == 1
    stamp = stats[0].stat().st_mtime_ns
    again = _backbone(tmp_path, True)  # another stage: the cached statistics
    assert again.weights_digest == recal.weights_digest
    assert torch.equal(again.spatial_tokens(images), recal.spatial_tokens(images))
    assert stats[0].stat().st_mtime_ns == stamp  # reused, not rewritten

    # the same file names with other pixels (the data regenerated with another seed): recalibrated again
    make_planted_coco(tmp_path / "data" / "synthetic", 24, 8, num_classes=4, image_size=64, seed=7)
    regenerated = _backbone(tmp_path, True)
    assert regenerated.weights_digest != recal.weights_digest
    assert stats[0].stat().st_mtime_ns != stamp


def test_data_stage_backbone_has_the_statistics_of_recalibrate_bn(tmp_path):
    """The smoke checkpoint of `pipeline download` and `backbone.recalibrate_bn` share one recalibration:
    the same BatchNorm statistics as batches of 32 cut from one stack of the images' plain views."""
    root = make_planted_coco(tmp_path / "data" / "synthetic", 40, 2, num_classes=4, image_size=64)
    files = [r.path for r in load_multilabel("synthetic", root, "train").records]  # 40: batches 32 + 8
    reference = load_backbone(TINY_MODEL, pretrained=None)
    recalibrate_batchnorm(reference, torch.stack([eval_view(load_image(p), 64) for p in files]).split(32))
    saved = torch.load(write_random_backbone(tmp_path / "b.pt", TINY_MODEL, 0, 64, files), weights_only=True)
    via_params = _backbone(tmp_path, True).model.state_dict()
    stats = [k for k in saved if "running_" in k]
    assert stats and all(torch.equal(saved[k], v) and torch.equal(via_params[k], v)
                         for k, v in reference.model.state_dict().items() if k in stats)
