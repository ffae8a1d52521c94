"""Evaluation metrics: MLR mAP, the MFI figure of merit, and segmentation mIoU (two protocols).

Core functions assume valid inputs (shapes agree, class ids in range) and say so.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable

import numpy as np
import torch
from sklearn.metrics import average_precision_score


def _numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def average_precision(scores: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> np.ndarray:
    """Per-class AP in % (C,): mean of precision at each positive in score order, no interpolation.

    Uses sklearn's average_precision_score per class. Labels 1 positive, 0 negative, -1 unknown:
    unknown entries are dropped for that class only. Classes without any positive give NaN.
    """
    scores, labels = _numpy(scores).astype(np.float64), _numpy(labels)  # (N, C) each
    ap = np.full(scores.shape[1], np.nan)
    for c in range(scores.shape[1]):
        known = labels[:, c] >= 0
        y = labels[known, c] == 1
        if y.any():
            ap[c] = 100.0 * average_precision_score(y, scores[known, c])
    return ap


def mean_average_precision(scores: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> float:
    """mAP in %: mean of per-class AP over the classes that have at least one positive."""
    return float(np.nanmean(average_precision(scores, labels)))


def mean_offdiagonal_similarity(features: np.ndarray | torch.Tensor) -> float:
    """Mean cosine similarity between distinct rows of features (C, D): the entanglement of class
    text features measured in paper Table 4 (lower = more disentangled)."""
    f = _numpy(features).astype(np.float64)
    f = f / np.linalg.norm(f, axis=1, keepdims=True)  # (C, D) unit rows
    sim = f @ f.T  # (C, C)
    num_classes = sim.shape[0]
    off = sim[~np.eye(num_classes, dtype=bool)]  # (C*(C-1),)
    return float(off.mean())


def mfi_figure_of_merit(
    before: np.ndarray | torch.Tensor, after: np.ndarray | torch.Tensor
) -> dict[str, float]:
    """Paper Table 4: mean off-diagonal similarity of class text features before (CLIP) and after
    (projected), and the relative reduction (before - after) / before in %."""
    b = mean_offdiagonal_similarity(before)
    a = mean_offdiagonal_similarity(after)
    return {"before": b, "after": a, "reduction_pct": (b - a) / b * 100.0}


def confusion_matrix(
    pred: np.ndarray | torch.Tensor,
    target: np.ndarray | torch.Tensor,
    num_classes: int,
    ignore_index: int = 255,
) -> np.ndarray:
    """(K, K) pixel counts, rows = target class, columns = predicted class; target pixels equal to
    ignore_index are excluded. Class ids are assumed to lie in [0, K)."""
    pred, target = _numpy(pred).ravel(), _numpy(target).ravel()
    keep = target != ignore_index
    index = target[keep].astype(np.int64) * num_classes + pred[keep].astype(np.int64)
    counts = np.bincount(index, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)  # (K, K)


def miou_dataset(conf: np.ndarray) -> tuple[float, np.ndarray]:
    """Dataset-level (mmseg IoUMetric) mIoU: intersections and unions accumulated over all images.

    Returns (mIoU %, per-class IoU % (K,)). A class absent from both predictions and targets has
    IoU NaN and is left out of the mean.
    """
    conf = np.asarray(conf, dtype=np.float64)
    inter = np.diag(conf)  # (K,)
    union = conf.sum(axis=0) + conf.sum(axis=1) - inter  # (K,)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = 100.0 * inter / union
    iou[union == 0] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN -> NaN, deliberately
        return float(np.nanmean(iou)), iou


def miou_per_image(
    preds: Iterable[np.ndarray | torch.Tensor],
    targets: Iterable[np.ndarray | torch.Tensor],
    num_classes: int,
    ignore_index: int = 255,
) -> float:
    """Per-image mIoU in % (authors' scripts): for each image, IoU of each class the model
    predicted on its non-ignored pixels, averaged over those classes; then averaged over images.

    Classes present in the target but never predicted do not count, so this is not comparable
    with the dataset-level (mmseg IoUMetric) number; report both, named. Images with no
    non-ignored pixel are skipped. num_classes is kept for symmetry with confusion_matrix.
    """
    image_means = []
    for pred, target in zip(preds, targets, strict=True):
        pred, target = _numpy(pred).ravel(), _numpy(target).ravel()
        keep = target != ignore_index
        pred, target = pred[keep], target[keep]
        if pred.size == 0:
            continue
        ious = []
        for c in np.unique(pred):
            p, t = pred == c, target == c
            ious.append(np.logical_and(p, t).sum() / np.logical_or(p, t).sum())
        image_means.append(np.mean(ious))
    return float(100.0 * np.mean(image_means)) if image_means else float("nan")
