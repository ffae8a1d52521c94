"""The evaluation stage end to end on planted-signal data: a tiny random CLIP (BatchNorm
recalibrated), projectors trained in the fixture, a val feature cache, then every evaluation.

Numbers are not quality claims: they show that a head which learned the planted signal beats
the same CLIP without projectors through the stage's own code paths.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import paths
from pipeline.augment import eval_view
from pipeline.backbone import load_backbone, recalibrate_batchnorm
from pipeline.cache import FeatureCache
from pipeline.config import load_params
from pipeline.datasets import DatasetError, load_multilabel
from pipeline.heads import positive_scores
from pipeline.metrics import mean_average_precision
from pipeline.segmentation import PROMPTS
from pipeline.synthetic import make_planted_coco
from pipeline.training import build_optimizer, new_head, save_projectors, train_step
from stages import evaluate

REPO = Path(__file__).resolve().parents[1]
N_TRAIN, N_VAL, PIXELS, STEPS, LR = 48, 16, 96, 300, 3e-3


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """params pointing at a generated dataset, a saved backbone, trained projectors and a val cache."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 threads on 2 shared cores measured ~30x slower for the tiny head
    base = tmp_path_factory.mktemp("evaluate")
    params = load_params(REPO / "configs" / "params.yaml", profile="smoke")
    params["paths"] = {"data": str(base / "data"), "cache": str(base / "cache"),
                       "results": str(base / "results")}
    params["backbone"].update(checkpoint=str(base / "backbone.pt"), device="cpu")
    size = params["evaluate"]["seg"]["image_size"]
    root = make_planted_coco(paths.dataset_root(params, "synthetic"), N_TRAIN, N_VAL, image_size=PIXELS)
    train, val = (load_multilabel("synthetic", root, s) for s in ("train", "val"))
    backbone = load_backbone("tiny-RN", pretrained=None)
    x_train = torch.stack([eval_view(train.image(i), size) for i in range(len(train))])  # (N, 3, S, S)
    x_val = torch.stack([eval_view(val.image(i), size) for i in range(len(val))])
    recalibrate_batchnorm(backbone, [x_train])  # random-init backbone only (TESTING trap 1)
    torch.save(backbone.model.state_dict(), params["backbone"]["checkpoint"])
    text = backbone.class_text_features(train.classnames)  # {positive, negative, plain}: (C, D)
    tokens = backbone.spatial_tokens(x_train)  # (N, T, D)
    head = new_head(params, backbone.embed_dim, torch.device("cpu"))
    optimizer = build_optimizer(head.parameters(), {**params["train"], "lr": LR})
    labels = torch.from_numpy(train.labels).long()
    for step in range(STEPS):
        train_step(head, optimizer, tokens, labels, text, params["train"], step=step)
    save_projectors(paths.projectors(params), head, {
        "model": params["model"], "embed_dim": backbone.embed_dim, "classnames": train.classnames,
        "fingerprint": {"test": "evaluate"}, "epoch": 0})
    val_tokens = backbone.spatial_tokens(x_val)  # (N, T, D)
    cache = FeatureCache.create_or_open(
        paths.feature_store(params, "val"), ids=[r.image_id for r in val.records], labels=val.labels,
        classnames=val.classnames, views=1, num_tokens=val_tokens.shape[1], dim=backbone.embed_dim,
        fingerprint={"test": "evaluate"}, shard_size=N_VAL, dtype="float32")
    cache.write_shard(0, val_tokens[:, None].numpy(), np.zeros(N_VAL, np.int8))
    cache.write_text_features({k: v.numpy() for k, v in text.items()})
    metrics = evaluate.run(params, what="all")
    yield {"params": params, "metrics": metrics, "backbone": backbone, "head": head.eval(),
           "val_tokens": val_tokens, "text": text, "val": val}
    torch.set_num_threads(threads)


def _written(params: dict, what: str) -> tuple[dict, str]:
    metrics = json.loads(paths.results_dir(params, "details", f"{what}.json").read_text())
    return metrics, paths.results_dir(params, "tables", f"{what}.md").read_text()


def test_mlr_projectors_beat_zero_shot_clip_and_match_a_direct_forward(world):
    metrics, table = _written(world["params"], "mlr")
    assert metrics["ours"]["map"] > metrics["clip"]["map"] + 10.0
    text = world["text"]
    with torch.no_grad():  # independent of the TokenLoader / evaluate_head path
        logits = world["head"](world["val_tokens"], text["negative"], text["positive"]).logits
    direct = mean_average_precision(positive_scores(logits), world["val"].labels)
    assert metrics["ours"]["map"] == pytest.approx(direct, abs=1e-6)
    assert "| CLIP |" in table and "| ours (Unmix-CLIP) |" in table


def _mean_offdiagonal(features: torch.Tensor) -> float:
    f = features.double().numpy()
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    sim = f @ f.T  # (C, C)
    return (sim.sum() - np.trace(sim)) / (len(f) * (len(f) - 1))


def test_mfi_before_after_match_independent_cosines_and_heatmaps_exist(world):
    metrics, table = _written(world["params"], "mfi")
    assert set(metrics) == set(world["params"]["evaluate"]["mfi"]["class_sets"])
    names = world["val"].classnames
    template = PROMPTS[world["params"]["evaluate"]["prompt"]]
    raw = world["backbone"].text_features([template.format(c) for c in names])  # (C, D)
    with torch.no_grad():
        projected = world["head"].project_text(raw)  # eval mode: BatchNorm running statistics
    m = metrics["synthetic"]
    assert m["before"] == pytest.approx(_mean_offdiagonal(raw), abs=1e-6)
    assert m["after"] == pytest.approx(_mean_offdiagonal(projected), abs=1e-6)
    assert m["reduction_pct"] == pytest.approx(100 * (m["before"] - m["after"]) / m["before"], abs=1e-6)
    for name, m in metrics.items():
        with Image.open(m["figure"]) as png:
            assert png.format == "PNG" and png.width > 200 and png.height > 100
        assert f"| {name} | {m['num_classes']} |" in table


def test_seg_ours_beats_no_projector_baselines_on_object_pixels(world):
    metrics, table = _written(world["params"], "seg")
    result = metrics["synthetic"]["methods"]
    for protocol in ("miou_dataset", "miou_per_image"):
        ours = result["ours"]["no_bkgd"][protocol]
        assert ours > result["clip"]["no_bkgd"][protocol] + 2.0
        assert ours > result["clip-vv"]["no_bkgd"][protocol] + 2.0
    assert metrics["synthetic"]["num_images"] == N_VAL and metrics["synthetic"]["seconds_per_image"] > 0
    for row in ("| CLIP |", "| CLIP-VV |", "| ours (Unmix-CLIP) |", "dataset-level", "per-image",
                "synthetic (bkgd)", "synthetic (no bkgd)"):
        assert row in table


def test_zs_mlr_reports_clip_regions_and_combination(world):
    metrics, table = _written(world["params"], "zs-mlr")
    assert set(metrics["map"]) == {"clip", "regions", "combined"}
    assert all(0.0 < v <= 100.0 for v in metrics["map"].values())
    assert metrics["num_images"] == N_VAL and "CLIP (global)" in table


@pytest.mark.parametrize("name, hint", [("voc2012", "pipeline download --dataset voc2012"),
                                        ("context59", "cannot be downloaded automatically")])
def test_missing_dataset_root_names_the_path_and_how_to_get_it(world, name, hint):
    params = copy.deepcopy(world["params"])
    params["evaluate"]["seg"]["datasets"] = [name]
    with pytest.raises(DatasetError) as err:
        evaluate.run(params, what="seg")
    assert str(paths.dataset_root(params, name)) in str(err.value) and hint in str(err.value)
