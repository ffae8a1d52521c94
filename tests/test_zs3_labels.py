"""The ZS3 labels of both label spaces from one stack (pipeline/evaluation/labels.py) are the
per-variant loop's, bit for bit: that loop is kept here (`reference_labels`,
`reference_evaluation`) and compared on random maps with ties, duplicate and constant classes,
every background rule, odd sizes and token grids, values at the threshold, and on a dataset.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.data.augment import eval_view
from pipeline.data.datasets import load_segmentation
from pipeline.data.synthetic import make_planted_coco
from pipeline.evaluation.labels import labels
from pipeline.evaluation.metrics import MiouAccumulator
from pipeline.evaluation.seg_eval import (
    evaluate_segmentation,
    object_classes,
    variant_target,
    variants,
)
from pipeline.evaluation.segmentation import (
    BACKGROUND_RULES,
    METHODS,
    SOFTMAX_SCALE,
    method_text,
    plain_text,
    predict,
    score_maps,
    seg_view,
)
from pipeline.model.backbone import load_backbone
from pipeline.model.heads import UnmixHead
from pipeline.model.recalibrate import recalibrate_batchnorm


# -- the implementation replaced (as it was before labels.py) -------------------------------------
def reference_normalised(scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    flat = scores.flatten(1)
    low = flat.min(dim=1, keepdim=True).values
    span = flat.max(dim=1, keepdim=True).values - low
    normed = ((flat - low) / span.clamp_min(1e-12)).view_as(scores)
    return F.interpolate(normed[None], size=size, mode="bilinear", align_corners=False)[0]


def reference_with_background(normalised: torch.Tensor, rule: str, threshold: float) -> torch.Tensor:
    best, label = normalised.max(dim=0)
    if rule == "none":
        return label + 1
    if rule == "softmax":
        best = (SOFTMAX_SCALE * normalised).softmax(dim=0).max(dim=0).values
    return torch.where(best < threshold, 0, label + 1)


def reference_labels(scores: torch.Tensor, size: tuple[int, int], rule: str | None,
                     threshold: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(objects-only argmax, background-variant labels or None)."""
    normalised = reference_normalised(scores, size)
    return normalised.argmax(dim=0), None if rule is None else reference_with_background(normalised, rule, threshold)


def new_labels(scores: torch.Tensor, size: tuple[int, int], rule: str | None,
               threshold: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    objects = predict(scores, size)
    return objects, None if rule is None else predict(scores, size, rule, threshold)


# -- random maps ----------------------------------------------------------------------------------
def _maps(kind: str, num: int, grid: tuple[int, int], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    h, w = grid
    if kind == "smooth":  # CLIP-like: low-rank token x text similarities
        scores = torch.randn(num, 8, generator=g) @ torch.randn(8, h * w, generator=g)
    elif kind == "ties":  # few distinct levels: exact ties between classes and at nodes
        scores = torch.randint(0, 4, (num, h * w), generator=g).float()
    else:  # duplicate classes, a constant one, and noise
        scores = torch.rand(num, h * w, generator=g)
        if num > 3:
            scores[2], scores[3], scores[1] = scores[0], scores[0], 0.25
    return scores.view(num, h, w)


CASES = [("smooth", 80, (4, 4), (150, 200)), ("smooth", 21, (7, 7), (133, 150)),
         ("ties", 80, (4, 4), (141, 190)), ("ties", 5, (3, 5), (101, 77)),
         ("dupes", 20, (14, 14), (125, 170)), ("dupes", 3, (2, 2), (37, 53)),
         ("smooth", 1, (4, 4), (64, 64)), ("ties", 7, (1, 4), (5, 7)), ("smooth", 80, (14, 14), (120, 161))]


@pytest.mark.parametrize("kind,num,grid,size", CASES)
@pytest.mark.parametrize("rule", [None, *BACKGROUND_RULES])
def test_labels_are_the_reference_labels_bit_for_bit(kind, num, grid, size, rule):
    scores = _maps(kind, num, grid, seed=num + grid[0])
    for threshold in (0.85, 0.5):  # 0.5: exactly a node value of the "ties" maps
        expected = reference_labels(scores, size, rule, threshold)
        got = new_labels(scores, size, rule, threshold)
        assert torch.equal(got[0], expected[0])
        assert (got[1] is None) == (expected[1] is None)
        if expected[1] is not None:
            assert torch.equal(got[1], expected[1])


def test_threshold_decisions_at_the_reference_value_itself_agree():
    """A threshold equal to a pixel's own softmax maximum / top value: the tightest margin."""
    scores = _maps("smooth", 80, (4, 4), seed=3)
    normalised = reference_normalised(scores, (120, 160))
    soft = (SOFTMAX_SCALE * normalised).softmax(dim=0).max(dim=0).values.flatten()
    top = normalised.max(dim=0).values.flatten()
    for rule, values in (("softmax", soft), ("max-score", top)):
        for pixel in (0, 777, 5000, 19199):
            threshold = float(values[pixel])
            expected = reference_labels(scores, (120, 160), rule, threshold)[1]
            assert torch.equal(predict(scores, (120, 160), rule, threshold), expected)


# -- a dataset, every method: identical numbers ---------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = make_planted_coco(tmp_path_factory.mktemp("coco"), 1, 6, image_size=72)
    data = load_segmentation("synthetic", root, "val")
    backbone = load_backbone("tiny-RN", pretrained=None)
    recalibrate_batchnorm(backbone, [torch.stack([eval_view(data.image(i), 96) for i in range(6)])])
    torch.manual_seed(0)
    yield backbone, UnmixHead(backbone.embed_dim).eval(), data
    torch.set_num_threads(threads)


def reference_evaluation(backbone, head, dataset, background: str, threshold: float) -> dict:
    """The replaced evaluate_segmentation loop: normalised maps, then max / argmax / softmax."""
    names = object_classes(dataset)
    texts = method_text(plain_text(backbone, names), head, METHODS)
    acc = {m: {v: MiouAccumulator(len(names) + (v == "bkgd"), 0 if v == "bkgd" else None)
               for v in variants(dataset.has_background)} for m in METHODS}
    images = torch.stack([seg_view(dataset.image(i), 96) for i in range(len(dataset.records))])
    maps = score_maps(backbone, head, images, texts)
    for i in range(len(dataset.records)):
        mask = dataset.mask(i)
        for m in METHODS:
            normalised = reference_normalised(maps[m][i], mask.shape)
            for v, a in acc[m].items():
                pred = (reference_with_background(normalised, background, threshold) if v == "bkgd"
                        else normalised.argmax(dim=0))
                a.update(pred.numpy(), variant_target(mask, v))
    return {m: {v: a.result()[0] for v, a in acc[m].items()} for m in METHODS}


@pytest.mark.parametrize("background", BACKGROUND_RULES)
def test_evaluate_segmentation_numbers_equal_the_replaced_loop(world, background):
    backbone, head, data = world
    threshold = 0.6
    got = evaluate_segmentation(backbone, head, data, image_size=96, batch_size=4, progress=False,
                                background=background, threshold=threshold, methods=METHODS,
                                prompt="plain", text_input="normalised", interpolation="bicubic",
                                voc_names="official")["methods"]
    expected = reference_evaluation(backbone, head, data, background, threshold)
    assert got.keys() == expected.keys()
    for m in METHODS:
        for v in expected[m]:
            for protocol, value in expected[m][v].items():
                assert got[m][v][protocol] == value or (np.isnan(value) and np.isnan(got[m][v][protocol]))


# -- CUDA: the reference computation on the device, counts on the device ---------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("rule", [None, *BACKGROUND_RULES])
def test_cuda_labels_and_counts_equal_the_reference_on_the_device(rule):
    scores = _maps("ties", 80, (4, 4), seed=2).cuda()
    expected = reference_labels(scores, (427, 640), rule, 0.5)
    got = new_labels(scores, (427, 640), rule, 0.5)
    assert got[0].is_cuda and torch.equal(got[0], expected[0])
    if rule is not None:
        assert torch.equal(got[1], expected[1])
    target = torch.randint(0, 81, (427, 640)).numpy()
    target[:10] = 255
    on_device, on_host = MiouAccumulator(81, 0), MiouAccumulator(81, 0)
    on_device.update(got[0], target)
    on_host.update(got[0].cpu().numpy(), target)
    assert np.array_equal(on_device.conf, on_host.conf)
    assert on_device.per_image == on_host.per_image


def test_labels_dispatch_keeps_the_device():
    scores = _maps("smooth", 4, (4, 4), seed=0)
    label, mask = labels(scores, (8, 8), "softmax", 0.85)
    assert label.device == scores.device and mask is not None and mask.dtype == torch.bool
