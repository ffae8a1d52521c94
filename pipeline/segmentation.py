"""Zero-shot semantic segmentation from token score maps (paper Table 2): CLIP, CLIP-VV, ours.

Three methods, each a pair (image tokens, class text features) compared by cosine per token:
  "clip"    DualCoOp spatial tokens (plain v_proj/c_proj) vs raw CLIP text of PLAIN_TEMPLATE;
  "clip-vv" CLIP Surgery v-v tokens vs the same raw text;
  "ours"    v-v tokens through the trained image projector vs text through the text projector.
The mean token (position 0) is dropped; the H x W grid gives a (C, h, w) map per image, which is
upsampled bilinearly to the ground-truth mask's own size.

"Normalised score" (what the 0.85 background threshold is compared with): for every class c
separately, the image's cosine map is min-max normalised over the image's h x w tokens,
n_c = (s_c - min s_c) / (max s_c - min s_c) (a constant map gives 0), then upsampled bilinearly
to the mask size. This is CLIP Surgery's get_similarity_map order; normalising after the
upsampling instead differs only where no output pixel centre falls on a token centre (bilinear
weights are convex, so upsampled scores stay in [0, 1]) and costs ~2.5x more on 80-class COCO
masks. A pixel takes argmax_c n_c(x); on datasets with a background class it becomes
background where max_c n_c(x) < threshold.

Both mIoU protocols are accumulated in one pass (REFERENCE.md "Protocol warning"): the dataset
level confusion matrix (mmseg IoUMetric) and the authors' per-image mean over predicted classes.
Runs in one process, batch-wise with a progress bar; there is no Dask scale-out.
"""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from pipeline.augment import eval_view
from pipeline.backbone import PLAIN_TEMPLATE, POSITIVE_TEMPLATE, FrozenCLIP
from pipeline.classes import CONTEXT_UNSEEN_IN_COCO
from pipeline.heads import UnmixHead
from pipeline.metrics import confusion_matrix, miou_dataset

METHODS = ("clip", "clip-vv", "ours")
METHOD_LABELS = {"clip": "CLIP", "clip-vv": "CLIP-VV", "ours": "ours (Unmix-CLIP)"}
IGNORE_INDEX = 255


def token_grid(tokens: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
    """(B, 1+HW, D) tokens -> (B, D, H, W), the mean token dropped; grid None means square."""
    spatial = tokens[:, 1:]  # (B, HW, D)
    if grid is None:
        side = math.isqrt(spatial.shape[1])
        grid = (side, side)
    batch, _, dim = spatial.shape
    return spatial.transpose(1, 2).reshape(batch, dim, *grid)  # (B, D, H, W)


def cosine_maps(grid: Tensor, text: Tensor) -> Tensor:
    """Cosine similarity of every grid token (B, D, H, W) with every class text (C, D) -> (B, C, H, W)."""
    maps = torch.einsum("bdhw,cd->bchw", F.normalize(grid, dim=1), F.normalize(text, dim=-1))
    return maps.contiguous()  # einsum returns channels-last strides: interpolate is ~4x slower on them


# `evaluate.prompt`: the paper evaluates with "A photo of a {class}." (plain); "positive" is the
# training prompt without the full stop. With pretrained CLIP the two are nearly the same feature;
# a random text tower puts them far apart, so the smoke profile evaluates with the training prompt.
PROMPTS = {"plain": PLAIN_TEMPLATE, "positive": POSITIVE_TEMPLATE}


def plain_text(backbone: FrozenCLIP, classnames: Sequence[str], prompt: str = "plain") -> Tensor:
    """Raw CLIP text features (C, D) of the evaluation prompt (default: the paper's ZS3 / MFI prompt)."""
    return backbone.text_features([PROMPTS[prompt].format(c) for c in classnames])


@torch.no_grad()
def method_text(raw_text: Tensor, head: UnmixHead | None, methods: Sequence[str]) -> dict[str, Tensor]:
    """Class text features per method: raw for the baselines, projected (eval mode) for "ours"."""
    texts = {m: raw_text for m in methods if m != "ours"}
    if "ours" in methods:
        head.eval()
        texts["ours"] = head.project_text(raw_text.to(next(head.parameters()).device))  # (C, D')
    return texts


@torch.no_grad()
def score_maps(backbone: FrozenCLIP, head: UnmixHead | None, images: Tensor, texts: dict[str, Tensor],
               pos_interpolation: str = "bilinear") -> dict[str, Tensor]:
    """Per method in `texts`: cosine maps (B, C, h, w) on the token grid, float32 on the backbone's
    device, where the post-processing runs too (upsampling 80 class maps to a COCO mask costs
    ~0.1 s per image and method on one CPU core).

    The v-v tokens are computed once and shared by "clip-vv" and "ours"; with "clip" too, one trunk
    pass gives both token sets. Images are square (eval_view), so the token grid is square.
    """
    maps: dict[str, Tensor] = {}
    needs_vv = "clip-vv" in texts or "ours" in texts
    if "clip" in texts and needs_vv:
        tokens, vv = backbone.spatial_and_vv_tokens(images, pos_interpolation)  # 2 x (B, 1+hw, D)
    elif "clip" in texts:
        tokens = backbone.spatial_tokens(images)  # (B, 1+hw, D)
    elif needs_vv:
        vv = backbone.vv_tokens(images, pos_interpolation)  # (B, 1+hw, D)
    if "clip" in texts:
        maps["clip"] = cosine_maps(token_grid(tokens), texts["clip"].to(tokens.device))
    if needs_vv:
        if "clip-vv" in texts:
            maps["clip-vv"] = cosine_maps(token_grid(vv), texts["clip-vv"].to(vv.device))
        if "ours" in texts:
            head.eval()
            projected = head.project_tokens(vv.to(texts["ours"].device))  # (B, 1+hw, D')
            maps["ours"] = cosine_maps(token_grid(projected), texts["ours"])
    return {m: s.float() for m, s in maps.items()}


def normalise_minmax(scores: Tensor) -> Tensor:
    """Per class min-max over the positions: (C, h, w) -> (C, h, w) in [0, 1]; constant maps -> 0."""
    flat = scores.flatten(1)  # (C, HW)
    low = flat.min(dim=1, keepdim=True).values
    span = flat.max(dim=1, keepdim=True).values - low
    return ((flat - low) / span.clamp_min(1e-12)).view_as(scores)


def upsample(scores: Tensor, size: tuple[int, int]) -> Tensor:
    """(C, h, w) -> (C, H, W), bilinear, align_corners=False."""
    return F.interpolate(scores[None], size=size, mode="bilinear", align_corners=False)[0]


def normalised_argmax(scores: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """One image's cosine maps (C, h, w) -> (max normalised score, its class 0..C-1), each (H, W)."""
    return upsample(normalise_minmax(scores), size).max(dim=0)


def with_background(best: Tensor, label: Tensor, threshold: float) -> Tensor:
    """Labels 0 = background (max normalised score < threshold), k + 1 = class k (VOC / COCO ids)."""
    return torch.where(best < threshold, 0, label + 1)


def predict(scores: Tensor, size: tuple[int, int], threshold: float | None) -> np.ndarray:
    """Label map (H, W) int64 from one image's cosine maps (C, h, w).

    threshold None: argmax over the C classes, labels 0..C-1. Otherwise with_background's labels.
    """
    best, label = normalised_argmax(scores, size)
    return (label if threshold is None else with_background(best, label, threshold)).cpu().numpy()


@dataclass
class MiouAccumulator:
    """Both protocols for one (method, variant) from per-image confusion matrices.

    The per-image protocol is computed from the image's confusion matrix: the classes it
    predicted on non-ignored pixels are its non-empty columns, and IoU = diag / (row + col - diag),
    the same numbers as metrics.miou_per_image without a second pass over the pixels.
    """
    num_classes: int
    conf: np.ndarray = field(init=False)
    image_mious: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.conf = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def update(self, pred: np.ndarray, target: np.ndarray) -> None:
        conf = confusion_matrix(pred, target, self.num_classes, IGNORE_INDEX)  # (K, K), rows = target
        self.conf += conf
        predicted = conf.sum(axis=0) > 0  # (K,)
        if predicted.any():  # else every pixel is ignored: the image does not count
            inter = np.diag(conf)[predicted]
            union = conf.sum(axis=0)[predicted] + conf.sum(axis=1)[predicted] - inter
            self.image_mious.append(float(np.mean(inter / union)))

    def result(self, names: Sequence[str], subsets: dict[str, Sequence[int]] | None = None) -> dict:
        miou, iou = miou_dataset(self.conf)
        out: dict[str, Any] = {
            "miou_dataset": miou,
            "miou_per_image": float(100.0 * np.mean(self.image_mious)) if self.image_mious else float("nan"),
            "per_class_iou": {n: float(v) for n, v in zip(names, iou)},
        }
        for subset, index in (subsets or {}).items():
            values = iou[list(index)]
            out[f"miou_dataset_{subset}"] = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
        return out


def variants(has_background: bool) -> tuple[str, ...]:
    """"bkgd": background class by threshold; "no_bkgd": GT background ignored, objects only;
    "all": datasets without a background class (Context-59: 0 = first class, 255 ignored)."""
    return ("bkgd", "no_bkgd") if has_background else ("all",)


def variant_target(mask: np.ndarray, variant: str) -> np.ndarray:
    """Ground truth in the variant's label space: "no_bkgd" shifts 1..C to 0..C-1 and ignores 0."""
    if variant != "no_bkgd":
        return mask
    target = mask.astype(np.int64) - 1
    target[(mask == 0) | (mask == IGNORE_INDEX)] = IGNORE_INDEX
    return target


def class_subsets(dataset_name: str, classnames: Sequence[str]) -> dict[str, list[int]]:
    """Context-59: indices of the 30 classes unseen in COCO and the 29 seen (issue 8)."""
    if dataset_name != "context59":
        return {}
    unseen = [i for i, c in enumerate(classnames) if c in CONTEXT_UNSEEN_IN_COCO]
    return {"unseen": unseen, "seen": [i for i in range(len(classnames)) if i not in unseen]}


def load_batch(dataset: Any, indices: Sequence[int], image_size: int) -> tuple[Tensor, list[np.ndarray]]:
    """Network inputs (B, 3, S, S) and the ground-truth masks (each its own H x W)."""
    images = torch.stack([eval_view(dataset.image(i), image_size) for i in indices])  # (B, 3, S, S)
    return images, [dataset.mask(i) for i in indices]


def object_classes(dataset: Any) -> list[str]:
    """Class names that get a text prompt: a background entry (mask value 0) is not one."""
    names = list(dataset.classnames)
    return names[1:] if dataset.has_background else names


def evaluate_segmentation(backbone: FrozenCLIP, head: UnmixHead | None, dataset: Any, *,
                          image_size: int, batch_size: int = 16, threshold: float = 0.85,
                          pos_interpolation: str = "bilinear", methods: Sequence[str] = METHODS,
                          limit: int | None = None, progress: bool = True,
                          keep_predictions: bool = False, prompt: str = "plain") -> dict:
    """mIoU of every method and variant on a SegmentationDataset (both protocols, named).

    Returns {"methods": {method: {variant: {...}}}, "num_images", "seconds_per_image",
    "classnames" (object classes), "has_background"}; with keep_predictions also
    "predictions": {method: {variant: [label map per image]}} (memory grows with the dataset).
    "ours" needs `head`.
    """
    names = object_classes(dataset)
    num = len(dataset.records) if limit is None else min(limit, len(dataset.records))
    subsets = class_subsets(dataset.name, names)
    texts = method_text(plain_text(backbone, names, prompt), head, methods)
    acc = {m: {v: MiouAccumulator(len(names) + (v == "bkgd")) for v in variants(dataset.has_background)}
           for m in methods}
    kept: dict[str, dict[str, list[np.ndarray]]] = {m: {v: [] for v in acc[m]} for m in methods}
    start = time.perf_counter()
    bar = tqdm(total=num, desc=f"seg {dataset.name}", unit="img", disable=not progress)
    for first in range(0, num, batch_size):
        indices = list(range(first, min(first + batch_size, num)))
        images, masks = load_batch(dataset, indices, image_size)
        maps = score_maps(backbone, head, images, texts, pos_interpolation)
        for j, mask in enumerate(masks):
            for m in methods:
                best, label = normalised_argmax(maps[m][j], mask.shape)  # (H, W) each
                for v, a in acc[m].items():
                    pred = (with_background(best, label, threshold) if v == "bkgd" else label).cpu().numpy()
                    a.update(pred, variant_target(mask, v))
                    if keep_predictions:
                        kept[m][v].append(pred)
        bar.update(len(indices))
    bar.close()
    seconds = (time.perf_counter() - start) / max(num, 1)
    results = {m: {v: a.result((["background"] if v == "bkgd" else []) + names,
                               {k: [i + (v == "bkgd") for i in idx] for k, idx in subsets.items()})
                   for v, a in acc[m].items()} for m in methods}
    out = {"methods": results, "num_images": num, "seconds_per_image": seconds,
           "classnames": names, "has_background": bool(dataset.has_background)}
    return {**out, "predictions": kept} if keep_predictions else out
