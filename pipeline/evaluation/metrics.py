"""Evaluation metrics: MLR mAP, the MFI figure of merit, and segmentation mIoU (dataset-level and
three per-image protocols, each named).

Core functions assume valid inputs (shapes agree, class ids in range) and say so.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

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


PER_IMAGE_PROTOCOLS = ("per-image-positive-pred", "per-image-positive-only", "per-image-predicted")
MIOU_PROTOCOLS = ("dataset", *PER_IMAGE_PROTOCOLS)


def image_figures(conf: np.ndarray, present: np.ndarray, background: int | None = 0) -> dict[str, float]:
    """One image's per-image mIoU figures (fractions, NaN where the image does not count).

    conf (K, K): the image's confusion matrix (rows = target) over its non-ignored pixels;
    present (K,) bool: the classes its prediction contains anywhere, ignored pixels included.
    - "per-image-positive-pred" / "per-image-positive-only" (authors' released scripts,
      docs/METHOD.md "Evaluation as released"): ground-truth `background` pixels are ignored too; per-class IoU over the
      remaining pixels, a class with an empty union scoring 0 (torchmetrics
      MulticlassJaccardIndex(average=None)); positive-pred = mean over `present` classes (a class
      predicted only on ignored pixels, or the ignored background itself, scores 0 there);
      positive-only = mean over the classes with IoU > 0 (NaN if none).
    - "per-image-predicted" (this project's earlier per-image figure): ground-truth background is
      a class; mean IoU over the classes predicted on non-ignored pixels (NaN if none).
    """
    conf = np.asarray(conf, dtype=np.float64)
    inter, col, row = np.diag(conf), conf.sum(axis=0), conf.sum(axis=1)
    predicted = col > 0
    out = {"per-image-predicted": float(np.mean(inter[predicted] / (col + row - inter)[predicted]))
           if predicted.any() else float("nan")}
    if background is not None:
        conf = conf.copy()
        conf[background, :] = 0  # ground-truth background pixels dropped (set to the ignored index)
        inter, col, row = np.diag(conf), conf.sum(axis=0), conf.sum(axis=1)
    union = col + row - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)  # (K,), empty -> 0
    out["per-image-positive-pred"] = float(iou[present].mean()) if present.any() else float("nan")
    positive = iou > 0
    out["per-image-positive-only"] = float(iou[positive].mean()) if positive.any() else float("nan")
    return out


def nanmean_percent(values: Iterable[float]) -> float:
    """100 x the mean over the finite values (NaN when there is none): averaging over images."""
    arr = np.asarray(list(values), dtype=np.float64)
    return float(100.0 * arr[np.isfinite(arr)].mean()) if np.isfinite(arr).any() else float("nan")


def _device_counts(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                   ignore_index: int) -> tuple[np.ndarray, np.ndarray]:
    """confusion_matrix and the predicted-anywhere classes by torch.bincount where the label maps
    are (a GPU): only (K, K) + (K,) counts leave the device."""
    pred, target = pred.flatten().long(), target.flatten().long()
    keep = target != ignore_index
    counts = torch.bincount(target[keep] * num_classes + pred[keep], minlength=num_classes**2)
    present = torch.bincount(pred, minlength=num_classes)[:num_classes] > 0
    return counts.view(num_classes, num_classes).cpu().numpy(), present.cpu().numpy()


@dataclass
class MiouAccumulator:
    """Every mIoU protocol in one pass over images: the dataset-level confusion matrix and each
    image's per-image figures. `background`: the label of the ground-truth background class
    (ignored by the positive-* per-image protocols), None without one."""
    num_classes: int
    background: int | None = None
    ignore_index: int = 255
    conf: np.ndarray = field(init=False)
    per_image: dict[str, list[float]] = field(init=False)

    def __post_init__(self) -> None:
        self.conf = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)
        self.per_image = {p: [] for p in PER_IMAGE_PROTOCOLS}

    def update(self, pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor) -> None:
        """One image: pred and target label maps of the same shape."""
        k = self.num_classes
        if isinstance(pred, torch.Tensor) and pred.device.type != "cpu":  # counted on the device
            conf, present = _device_counts(pred, torch.as_tensor(target, device=pred.device), k,
                                           self.ignore_index)
        else:  # confusion_matrix with ignored targets as an extra row K: one bincount, no masking
            flat = _numpy(pred).ravel().astype(np.int64, copy=False)
            truth = _numpy(target).ravel().astype(np.int64)
            rows = np.where(truth == self.ignore_index, k, truth)
            counts = np.bincount(rows * k + flat, minlength=(k + 1) * k).reshape(k + 1, k)
            conf, present = counts[:k], counts.sum(axis=0) > 0  # (K, K) rows = target; (K,) all pixels
        self.conf += conf
        for protocol, value in image_figures(conf, present, self.background).items():
            self.per_image[protocol].append(value)

    def result(self, subsets: dict[str, Sequence[int]] | None = None) -> tuple[dict, np.ndarray]:
        """({protocol: mIoU %, "dataset_<subset>": ...}, per-class dataset IoU % (K,))."""
        miou, iou = miou_dataset(self.conf)
        out: dict[str, Any] = {"dataset": miou}
        out.update({p: nanmean_percent(v) for p, v in self.per_image.items()})
        for subset, index in (subsets or {}).items():
            values = iou[list(index)]
            out[f"dataset_{subset}"] = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
        return out, iou


def miou_per_image(
    preds: Iterable[np.ndarray | torch.Tensor],
    targets: Iterable[np.ndarray | torch.Tensor],
    num_classes: int,
    ignore_index: int = 255,
    protocol: str = "per-image-positive-pred",
    background: int | None = 0,
) -> float:
    """Per-image mIoU in %, one of PER_IMAGE_PROTOCOLS (see image_figures), nanmean over images.

    Labels lie in [0, num_classes); target pixels equal to ignore_index are ignored, and for the
    two positive-* protocols so are target pixels of class `background` (None: no background
    class, e.g. PASCAL Context 59). None of these is comparable with the dataset-level figure
    (miou_dataset): report them side by side, named.
    """
    if protocol not in PER_IMAGE_PROTOCOLS:
        raise ValueError(f"per-image protocol must be one of {PER_IMAGE_PROTOCOLS}, got {protocol!r}")
    acc = MiouAccumulator(num_classes, background, ignore_index)
    for pred, target in zip(preds, targets, strict=True):
        acc.update(pred, target)
    return nanmean_percent(acc.per_image[protocol])
