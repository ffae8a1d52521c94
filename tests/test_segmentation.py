"""Zero-shot segmentation and segment-driven ZS-MLR mechanics: score maps, feature surgery,
background rules, every mIoU protocol against independent counts, ignore index, VOC prompt names,
Context-59 unseen/seen, region views.

The backbone is a tiny random CLIP (BatchNorm recalibrated) and the head untrained: these tests
are about the arithmetic, not quality (tests/test_evaluate.py trains a head).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.data.augment import eval_view
from pipeline.data.classes import CONTEXT_UNSEEN_IN_COCO
from pipeline.data.datasets import load_segmentation
from pipeline.data.synthetic import make_context_layout, make_planted_coco, make_voc_layout
from pipeline.evaluation.metrics import PER_IMAGE_PROTOCOLS, miou_per_image
from pipeline.evaluation.seg_eval import evaluate_segmentation
from pipeline.evaluation.segmentation import (
    METHODS,
    label_with_background,
    method_text,
    normalise_minmax,
    plain_text,
    predict,
    score_maps,
    token_grid,
)
from pipeline.evaluation.zsmlr import region_probabilities, region_views
from pipeline.model.backbone import load_backbone
from pipeline.model.heads import UnmixHead
from pipeline.model.recalibrate import recalibrate_batchnorm

SIZE = 96  # network input: a 3 x 3 token grid


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 threads on 2 shared cores measured far slower for tiny tensors
    root = make_planted_coco(tmp_path_factory.mktemp("coco"), 1, 8, image_size=64)
    data = load_segmentation("synthetic", root, "val")
    backbone = load_backbone("tiny-RN", pretrained=None)
    recalibrate_batchnorm(backbone, [torch.stack([eval_view(data.image(i), SIZE) for i in range(8)])])
    torch.manual_seed(0)
    head = UnmixHead(backbone.embed_dim).eval()
    yield backbone, head, data
    torch.set_num_threads(threads)


def _run(model, dataset, **kwargs):
    backbone, head, _ = model
    return evaluate_segmentation(backbone, head, dataset, image_size=SIZE, batch_size=4,
                                 progress=False, keep_predictions=True, **kwargs)


def _independent_iou(preds, targets, num_classes):
    """Per-class IoU % by explicit pixel counting over all images, 255 ignored."""
    inter, union = np.zeros(num_classes), np.zeros(num_classes)
    for p, t in zip(preds, targets):
        valid = t != 255
        for c in range(num_classes):
            inter[c] += np.sum((p == c) & (t == c) & valid)
            union[c] += np.sum(((p == c) | (t == c)) & valid)
    with np.errstate(invalid="ignore"):
        return np.where(union > 0, 100 * inter / np.maximum(union, 1), np.nan)


def _independent_per_image(preds, targets):
    means = []
    for p, t in zip(preds, targets):
        valid = t != 255
        p, t = p[valid], t[valid]
        if p.size:
            means.append(np.mean([np.sum((p == c) & (t == c)) / np.sum((p == c) | (t == c))
                                  for c in np.unique(p)]))
    return 100 * np.mean(means)


def _variant_target(mask, variant):
    if variant != "no_bkgd":
        return mask
    return np.where((mask == 0) | (mask == 255), 255, mask.astype(np.int64) - 1)


def test_background_rules_softmax_and_max_score_disagree_and_none_never_predicts_it():
    # 1 x 4 pixels, 2 classes, already min-max normalised (each class spans [0, 1]):
    #   class 0: 1.0  0.90  0.0  0.5
    #   class 1: 0.0  0.89  1.0  0.0
    # max-score: max < 0.85 -> background: pixel 3 (0.5). softmax(100 n): pixel 1 has
    # p = 1 / (1 + e^-1) = 0.73 < 0.85 -> background; pixel 3 has p = 1 / (1 + e^-50) ~ 1 -> class 0.
    scores = torch.tensor([[[1.0, 0.90, 0.0, 0.5]], [[0.0, 0.89, 1.0, 0.0]]])  # (C, 1, 4)
    assert predict(scores, (1, 4), "max-score", 0.85).tolist() == [[1, 1, 2, 0]]  # 0 = bkgd, k + 1
    assert predict(scores, (1, 4), "softmax", 0.85).tolist() == [[1, 0, 2, 1]]
    assert predict(scores, (1, 4), "none", 0.85).tolist() == [[1, 1, 2, 1]]
    assert predict(scores, (1, 4)).tolist() == [[0, 0, 1, 0]]  # objects only, labels 0..C-1
    # Per-class min-max: an affine change of one class's scores changes nothing.
    rescaled = scores.clone()
    rescaled[1] = 10 * rescaled[1] - 3
    assert predict(rescaled, (1, 4), "softmax", 0.85).tolist() == [[1, 0, 2, 1]]
    # "none" never predicts background, whatever the maps.
    noise = torch.rand(5, 6, 7)
    assert (label_with_background(noise, "none", 0.99) > 0).all()
    with pytest.raises(ValueError, match="evaluate.seg.background"):
        label_with_background(noise, "threshold", 0.5)


def test_minmax_normalisation_is_per_class_over_pixels():
    scores = torch.randn(3, 5, 7)
    normed = normalise_minmax(scores)
    assert torch.allclose(normed.flatten(1).min(1).values, torch.zeros(3))
    assert torch.allclose(normed.flatten(1).max(1).values, torch.ones(3))
    assert normalise_minmax(torch.full((1, 2, 2), 0.3)).eq(0).all()  # constant map -> 0


def test_token_grid_drops_the_mean_token_and_is_row_major():
    tokens = torch.arange(2 * 7 * 3, dtype=torch.float32).view(2, 7, 3)  # (B, 1+2*3, D)
    grid = token_grid(tokens, (2, 3))  # (B, D, 2, 3)
    for i in range(2):
        for j in range(3):
            assert torch.equal(grid[:, :, i, j], tokens[:, 1 + 3 * i + j])


def test_predictions_take_each_masks_own_size():
    scores = torch.zeros(2, 3, 3)
    scores[0, :, :1] = 1.0  # class 0 on the left column, class 1 elsewhere
    scores[1, :, 1:] = 1.0
    pred = predict(scores, (37, 53)).numpy()
    assert pred.shape == (37, 53)
    assert (pred[:, :10] == 0).all() and (pred[:, -20:] == 1).all()


@pytest.mark.parametrize("background", ["none", "softmax"])
def test_coco_layout_metrics_equal_independent_counts(model, background):
    data = model[2]
    result = _run(model, data, background=background)
    masks = [data.mask(i) for i in range(len(data))]
    assert set(result["methods"]) == set(METHODS)
    for method in METHODS:
        for variant, k in (("bkgd", 9), ("no_bkgd", 8)):
            preds, targets = result["predictions"][method][variant], [_variant_target(m, variant) for m in masks]
            iou = _independent_iou(preds, targets, k)
            got = result["methods"][method][variant]
            assert np.allclose(list(result["per_class"][method][variant].values()), iou, equal_nan=True)
            assert got["dataset"] == pytest.approx(np.nanmean(iou))
            assert got["per-image-predicted"] == pytest.approx(_independent_per_image(preds, targets))
            for protocol in PER_IMAGE_PROTOCOLS:
                expected = miou_per_image(preds, targets, k, protocol=protocol,
                                          background=0 if variant == "bkgd" else None)
                assert got[protocol] == pytest.approx(expected, nan_ok=True)
        # no_bkgd predicts among objects only; bkgd's object labels are shifted by one.
        assert max(p.max() for p in result["predictions"][method]["no_bkgd"]) < 8
        if background == "none":
            assert all((p > 0).all() for p in result["predictions"][method]["bkgd"])


def test_ignore_index_and_background_on_voc_palette_masks(model, tmp_path):
    data = load_segmentation("voc2012", make_voc_layout(tmp_path, n_images=6, image_size=64), "val")
    masks = [data.mask(i) for i in range(len(data))]
    assert any((m == 255).any() for m in masks)  # the generated masks carry the 255 ring
    result = _run(model, data, background="max-score")
    for method in METHODS:
        bkgd, no_bkgd = result["methods"][method]["bkgd"], result["methods"][method]["no_bkgd"]
        for got, variant, k in ((bkgd, "bkgd", 21), (no_bkgd, "no_bkgd", 20)):
            targets = [_variant_target(m, variant) for m in masks]
            iou = _independent_iou(result["predictions"][method][variant], targets, k)
            assert got["dataset"] == pytest.approx(np.nanmean(iou))
        # Background comes only from thresholding: some pixels of every bkgd prediction are 0.
        assert all((p == 0).any() for p in result["predictions"][method]["bkgd"])


@pytest.mark.parametrize("voc_names, words", [
    ("authors", ("dining table", "potted plant", "tv/monitor")),
    ("official", ("diningtable", "pottedplant", "tvmonitor"))])
def test_voc_prompt_names_follow_evaluate_voc_names(model, tmp_path, monkeypatch, voc_names, words):
    data = load_segmentation("voc2012", make_voc_layout(tmp_path, n_images=1, image_size=64), "val")
    backbone = model[0]
    prompts = []
    original = backbone.text_features
    monkeypatch.setattr(backbone, "text_features",
                        lambda p, normalise=True: prompts.extend(p) or original(p, normalise))
    result = _run(model, data, voc_names=voc_names, methods=["clip"])
    assert result["classnames"][10] == "diningtable"  # class ids and names unchanged
    for word in words:
        assert f"A photo of a {word}." in prompts and word in result["prompt_names"]
    assert len(prompts) == 20


def test_context59_reports_unseen_and_seen_class_means(model, tmp_path):
    make_context_layout(tmp_path, n_images=3, image_size=64)
    data = load_segmentation("context59", tmp_path, "val")
    result = _run(model, data, methods=["ours"], voc_names="authors")
    got = result["methods"]["ours"]["all"]
    per_class = result["per_class"]["ours"]["all"]
    assert "pottedplant" in result["prompt_names"]  # authors' VOC names apply to VOC only
    iou = np.array(list(per_class.values()))
    unseen = np.array([c in CONTEXT_UNSEEN_IN_COCO for c in per_class])
    assert unseen.sum() == 30 and (~unseen).sum() == 29
    for key, sel in (("dataset_unseen", unseen), ("dataset_seen", ~unseen)):
        values = iou[sel]
        expected = np.nanmean(values) if np.isfinite(values).any() else np.nan
        assert got[key] == pytest.approx(expected, nan_ok=True)


def _per_token_surgery_by_definition(features, text):
    """Feature surgery with every token's own class weights, written out: features (N, D), text
    (C, D) normalised (this project's "clip-surgery-per-token"; the released form is checked in
    tests/test_released_zs3.py)."""
    prob = (2 * features @ text.T).softmax(-1)  # (N, C)
    w = prob / prob.mean(-1, keepdim=True)
    feats = features[:, None, :] * text[None, :, :] * w[:, :, None]  # (N, C, D) element-wise
    redundant = feats.mean(1, keepdim=True)  # the class-mean redundant feature
    return (feats - redundant).sum(-1)  # (N, C)


def test_per_token_surgery_maps_equal_feature_surgery_from_its_definition(model):
    backbone, head, data = model
    images = torch.stack([eval_view(data.image(i), SIZE) for i in range(2)])  # (2, 3, S, S)
    raw = plain_text(backbone, ["cat", "dog", "car", "tree"])  # (C, D)
    texts = method_text(raw, head, ["clip-surgery-per-token", "clip-vv"], "batch")
    maps = score_maps(backbone, head, images, texts)  # (B, C, h, w) each
    vv = backbone.vv_tokens(images)  # (B, 1+hw, D)
    for b in range(2):
        f = F.normalize(vv[b, 1:], dim=-1)  # (hw, D)
        expected = _per_token_surgery_by_definition(f, F.normalize(raw, dim=-1))  # (hw, C)
        got = maps["clip-surgery-per-token"][b].flatten(1).T  # (hw, C), row-major grid
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(maps["clip-surgery-per-token"], maps["clip-vv"])


def test_batch_statistics_need_two_classes(model):
    backbone, head, _ = model
    with pytest.raises(ValueError, match="at least 2"):
        method_text(plain_text(backbone, ["cat"]), head, ["ours"], "batch")


def test_region_views_mask_outside_and_crop_the_box():
    images = torch.randn(1, 3, 10, 10)
    labels = torch.zeros(1, 10, 10, dtype=torch.long)
    labels[0, 2:6, 1:4] = 3  # class 2, 12 % of the image
    labels[0, 9, 9] = 1  # class 0, 1 pixel: below min_area
    owners, views = region_views(images, labels, min_area=0.05, mode="mask")
    assert owners == [(0, 2)]
    inside = labels[0] == 3
    assert torch.equal(views[0][:, inside], images[0][:, inside]) and views[0][:, ~inside].eq(0).all()
    _, crops = region_views(images, labels, min_area=0.05, mode="crop")
    expected = F.interpolate(images[:, :, 2:6, 1:4], size=(10, 10), mode="bicubic", align_corners=False)
    assert torch.allclose(crops, expected)


def test_region_probabilities_are_zero_for_classes_not_segmented(model):
    backbone = model[0]
    images = torch.stack([eval_view(model[2].image(i), SIZE) for i in range(2)])  # (2, 3, S, S)
    labels = torch.zeros(2, SIZE, SIZE, dtype=torch.long)
    labels[0, :40, :40] = 2  # class 1 in image 0
    labels[1, 50:, :] = 4  # class 3 in image 1
    text = F.normalize(torch.randn(5, backbone.embed_dim), dim=-1)
    probs = region_probabilities(backbone, images, labels, text)
    nonzero = {tuple(i) for i in torch.nonzero(probs).tolist()}
    assert nonzero == {(0, 1), (1, 3)} and (probs <= 1).all()
