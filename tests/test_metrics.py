"""mAP, MFI figure of merit and the two mIoU protocols, against hand and independent computations."""
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from pipeline.evaluation.metrics import (
    average_precision,
    confusion_matrix,
    mean_average_precision,
    mean_offdiagonal_similarity,
    mfi_figure_of_merit,
    miou_dataset,
    miou_per_image,
)


def test_average_precision_hand_example_ignores_unknown_labels():
    # Class 0 in score order: unknown, +, -, +, -, +. Dropping the unknown, precision at each
    # positive is 1/1, 2/3, 3/5, so AP = (1 + 2/3 + 3/5) / 3 = 34/45. Counting the unknown as a
    # negative would give (1/2 + 2/4 + 3/6) / 3 = 1/2 instead.
    # Class 1 has no positive (only negatives and unknowns): NaN, left out of the mean.
    scores = np.array([[0.95, 0.1], [0.9, 0.2], [0.8, 0.3], [0.7, 0.4], [0.6, 0.5], [0.5, 0.6]])
    labels = np.array([[-1, 0], [1, -1], [0, 0], [1, 0], [0, -1], [1, 0]], dtype=np.int8)
    ap = average_precision(scores, labels)
    assert ap[0] == pytest.approx(100 * 34 / 45)
    assert math.isnan(ap[1])
    assert mean_average_precision(scores, labels) == pytest.approx(100 * 34 / 45)
    # Torch inputs are accepted too.
    assert mean_average_precision(torch.from_numpy(scores), torch.from_numpy(labels)) == pytest.approx(
        100 * 34 / 45)


def _ap_by_ranking(scores, positive):
    """Mean of precision at each positive in descending score order (no ties assumed)."""
    order = np.argsort(-scores)
    hits, precisions = 0, []
    for rank, i in enumerate(order, start=1):
        if positive[i]:
            hits += 1
            precisions.append(hits / rank)
    return 100 * np.mean(precisions)


def test_average_precision_equals_sklearn_and_ranking_definition():
    rng = np.random.default_rng(0)
    scores = rng.random((40, 5))
    labels = rng.integers(-1, 2, size=(40, 5)).astype(np.int8)
    ap = average_precision(scores, labels)
    for c in range(5):
        known = labels[:, c] >= 0
        y = labels[known, c] == 1
        assert ap[c] == pytest.approx(100 * average_precision_score(y, scores[known, c]))
        assert ap[c] == pytest.approx(_ap_by_ranking(scores[known, c], y))
    assert mean_average_precision(scores, labels) == pytest.approx(ap.mean())


def test_offdiagonal_similarity_and_figure_of_merit_by_hand():
    # cos([1,0],[0.8,0.6]) = 0.8 and cos([1,0],[0.6,0.8]) = 0.6; rows scaled to show it is cosine.
    before = np.array([[2.0, 0.0], [0.8, 0.6]])
    after = torch.tensor([[1.0, 0.0], [1.8, 2.4]])
    assert mean_offdiagonal_similarity(before) == pytest.approx(0.8)
    assert mean_offdiagonal_similarity(np.eye(4)) == pytest.approx(0.0)
    fom = mfi_figure_of_merit(before, after)
    assert fom["before"] == pytest.approx(0.8) and fom["after"] == pytest.approx(0.6)
    assert fom["reduction_pct"] == pytest.approx((0.8 - 0.6) / 0.8 * 100)  # 25 %


def _random_masks(rng, n, num_classes, shape=(6, 7)):
    preds = [rng.integers(0, num_classes, size=shape) for _ in range(n)]
    targets = [rng.integers(0, num_classes, size=shape) for _ in range(n)]
    for t in targets:
        t[rng.random(shape) < 0.2] = 255
    return preds, targets


def test_dataset_miou_equals_set_computation_over_all_pixels():
    rng = np.random.default_rng(1)
    num_classes = 5
    preds, targets = _random_masks(rng, 3, num_classes - 1)  # class 4 absent from both -> NaN
    conf = sum(confusion_matrix(p, t, num_classes) for p, t in zip(preds, targets))
    pred = np.concatenate([p.ravel() for p in preds])
    target = np.concatenate([t.ravel() for t in targets])
    keep = target != 255
    assert conf.sum() == keep.sum() and conf.shape == (5, 5)
    for i in range(num_classes):  # rows = target
        for j in range(num_classes):
            assert conf[i, j] == np.sum((target[keep] == i) & (pred[keep] == j))
    expected = []
    for c in range(num_classes):
        p_set = set(np.flatnonzero(keep & (pred == c)))
        t_set = set(np.flatnonzero(keep & (target == c)))
        union = p_set | t_set
        expected.append(100 * len(p_set & t_set) / len(union) if union else np.nan)
    miou, iou = miou_dataset(conf)
    np.testing.assert_allclose(iou, expected)
    assert math.isnan(iou[4])
    assert miou == pytest.approx(np.mean(expected[:4]))


def test_per_image_predicted_and_dataset_protocols_disagree_on_hand_example():
    # Image 1: target 0 0 0 0,    pred 0 0 0 0    -> predicted {0}: IoU(0) = 4/4 = 1.
    # Image 2: target 0 1 1 1 255, pred 1 1 1 1 0 -> the ignored pixel is dropped, so predicted
    #          {1}: IoU(1) = 3/4 (class 0, present in the target but not predicted, is not counted).
    # Per-image (authors): mean(1, 3/4) = 87.5 %.
    # Dataset (mmseg): class 0: inter 4, union 4 + 1 = 5 -> 0.8; class 1: inter 3, union 4 -> 0.75;
    # mIoU = (0.8 + 0.75) / 2 = 77.5 %.
    preds = [np.array([[0, 0, 0, 0]]), np.array([[1, 1, 1, 1, 0]])]
    targets = [np.array([[0, 0, 0, 0]]), np.array([[0, 1, 1, 1, 255]])]
    assert miou_per_image(preds, targets, num_classes=2, protocol="per-image-predicted") == pytest.approx(87.5)
    conf = sum(confusion_matrix(p, t, 2) for p, t in zip(preds, targets))
    np.testing.assert_array_equal(conf, [[4, 1], [0, 3]])
    miou, iou = miou_dataset(conf)
    assert miou == pytest.approx(77.5)
    np.testing.assert_allclose(iou, [80.0, 75.0])


def test_per_image_equals_dataset_for_one_image_predicting_exactly_its_classes():
    # With one image whose predicted classes are exactly its target classes, both protocols
    # average the same per-class IoUs.
    rng = np.random.default_rng(2)
    target = rng.integers(0, 4, size=(8, 8))
    pred = target.copy()
    flip = rng.random(target.shape) < 0.3
    pred[flip] = rng.integers(0, 4, size=int(flip.sum()))
    target[0, :4], pred[0, :4] = [0, 1, 2, 3], [0, 1, 2, 3]  # every class in both
    target[1, 0] = 255
    miou, _ = miou_dataset(confusion_matrix(pred, target, 4))
    assert miou_per_image([pred], [target], 4, protocol="per-image-predicted") == pytest.approx(miou)


def test_released_per_image_protocols_on_a_hand_example_where_all_figures_differ():
    # Labels 0 = background, 1..3 classes, 255 boundary.
    # Image A: target 0 1 1 1 2 2 255 255 / pred 1 1 1 2 2 1 3 1.
    #   Released rule: GT background (pixel 0) and 255 (pixels 6, 7) ignored -> pixels 1..5.
    #   class 1: pred {1,2,5}, target {1,2,3}: 2/4; class 2: pred {3,4}, target {4,5}: 1/3;
    #   class 3 is predicted only on an ignored pixel: present, IoU 0.
    #   positive_pred = (1/2 + 1/3 + 0) / 3 = 5/18; positive_only = (1/2 + 1/3) / 2 = 5/12.
    #   per-image-predicted (only 255 ignored, background a class; classes predicted on the
    #   non-ignored pixels 0..5 = {1, 2}): class 1 pred {0,1,2,5}: 2/5; class 2: 1/3 -> 11/30.
    # Image B: target 0 3 3 255 / pred 2 3 3 3; class 1 is absent from the image.
    #   Released: pixels 1, 2 -> class 3: 1; class 2 predicted only on GT background: 0.
    #   positive_pred = (1 + 0) / 2 = 1/2; positive_only = 1.
    #   per-image-predicted: pixels 0..2, predicted {2, 3}: class 2: 0/1, class 3: 1 -> 1/2.
    # Averages over images: (5/18 + 1/2) / 2 = 7/18; (5/12 + 1) / 2 = 17/24; (11/30 + 1/2) / 2 = 13/30.
    # Dataset-level over both (255 ignored): class 0: 0/2, class 1: 2/5, class 2: pred {A3,A4,B0},
    # target {A4,A5}: 1/4, class 3: 2/2 -> (0 + 0.4 + 0.25 + 1) / 4 = 41.25 %.
    preds = [np.array([[1, 1, 1, 2, 2, 1, 3, 1]]), np.array([[2, 3, 3, 3]])]
    targets = [np.array([[0, 1, 1, 1, 2, 2, 255, 255]]), np.array([[0, 3, 3, 255]])]
    assert miou_per_image(preds, targets, 4, protocol="per-image-positive-pred") == pytest.approx(100 * 7 / 18)
    assert miou_per_image(preds, targets, 4, protocol="per-image-positive-only") == pytest.approx(100 * 17 / 24)
    assert miou_per_image(preds, targets, 4, protocol="per-image-predicted") == pytest.approx(100 * 13 / 30)
    miou, _ = miou_dataset(sum(confusion_matrix(p, t, 4) for p, t in zip(preds, targets)))
    assert miou == pytest.approx(41.25)
    # Without a background class (Context-59 style), label 0 is an ordinary class: in image A the
    # pixel 0 (target 0, pred 1) then counts: class 1 pred {0,1,2,5}: 2/5, class 0: 0/1 (not present
    # in the prediction), so positive_pred = (2/5 + 1/3 + 0) / 3 = 11/45; image B: class 0 target
    # pixel 0 is predicted 2: class 2 0/1, class 3 1 -> 1/2. Mean (11/45 + 1/2) / 2 = 67/180.
    assert miou_per_image(preds, targets, 4, protocol="per-image-positive-pred", background=None) == \
        pytest.approx(100 * 67 / 180)
    with pytest.raises(ValueError, match="per-image protocol"):
        miou_per_image(preds, targets, 4, protocol="dataset")
