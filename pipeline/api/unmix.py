"""Python API: trained Unmix-CLIP projectors on any image and any words.

    model = UnmixCLIP.from_files("cache/models/projectors-best.pt")  # every default from its record
    result = model.segment(["a.jpg", "b.jpg"], ["person", "dog", "horse"], background="max-score")
    result.label_maps[0]        # (H, W) uint8: 0 background, 1..C the classes in the given order
    result.score_maps[0]        # (C, H, W) float32 normalised scores in [0, 1]
    result.image_scores         # (N, C) image-level scores in [0, 1]

Class names are free text: the text projector applies to any CLIP text feature, so words unseen
in training work too. The backbone is the one the projectors record (meta), with weights from
`checkpoint` / `pretrained` (or where the record says); other weights are refused. Every other
default (image size and resize, prompt templates, text input, background rule and threshold) comes
from the file's record (pipeline/api/record.py) unless given: the `segment` and `query` commands
call this API with the same defaults.

Open vocabulary by default: the text projector's BatchNorm uses its running statistics
(text_bn="running"), so one class works and a class's score maps (clip, clip-vv, ours) do not
depend on the other names asked; text_bn="batch" takes the statistics of the queried classes, as
the released ZS3 scripts do. Feature surgery (the clip-surgery methods), the softmax background,
the label map and class-aggregated image scores compare the classes asked by definition.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from pipeline.api.names import check_background, class_list, template_list
from pipeline.api.record import record_options, use_of
from pipeline.api.views import maps_by_shape, resize_rule, view_grid
from pipeline.api.weights import (
    backbone_from_use,
    recorded_image_size,
    recorded_tokens,
    recorded_train_text_input,
    resolve_backbone,
)
from pipeline.config.params import ParamError
from pipeline.data.augment import INTERPOLATIONS
from pipeline.data.dense_view import dense_view
from pipeline.data.images import load_image
from pipeline.evaluation.segment_maps import label_map
from pipeline.model.backbone import (
    NEGATIVE_TEMPLATE,
    PLAIN_TEMPLATE,
    POSITIVE_TEMPLATE,
    FrozenTowers,
)
from pipeline.model.build import resolve_device
from pipeline.model.heads import BN_STATS, UnmixHead
from pipeline.model.projectors import load_projectors

ImageLike = str | os.PathLike | Image.Image
TEXT_MEMO = 16  # prompt sets whose CLIP features a model keeps (each a few (C, D) tensors)


@dataclass
class TextFeatures:
    classes: list[str]
    templates: list[str]
    raw: Tensor  # (C, D) CLIP text features, averaged over the templates
    projected: Tensor  # (C, D') through the text projector, L2-normalised
    stats: str  # text projector BatchNorm statistics: running | batch (over these C classes)


@dataclass
class ImageTokens:
    spatial: Tensor  # (B, 1+hw, D) DualCoOp tokens (what the projectors were trained on)
    vv: Tensor  # (B, 1+hw, D) CLIP Surgery v-v tokens (segmentation)
    projected: Tensor  # (B, 1+hw, D') v-v tokens through the image projector, L2-normalised
    grid: tuple[int, int] = (0, 0)  # (h, w) tokens: the view's sides / the backbone's stride


@dataclass
class SegmentationResult:
    """Per image: a label map and score maps per method, and image-level class scores."""
    classes: list[str]
    sources: list[str]  # file path, or "<image i>" for an in-memory image
    background: str
    threshold: float
    templates: list[str]
    text_bn: str
    image_scores: np.ndarray  # (N, C) the head's region scores with the pos/neg prompts
    method_label_maps: dict[str, list[np.ndarray]]  # method -> per image (H, W) uint8
    method_score_maps: dict[str, list[np.ndarray]]  # method -> per image (C, H, W) float32 in [0, 1]
    resize: str = "keep"  # the network's view: keep (aspect ratio) | square (the evaluation's)
    input_sizes: list[tuple[int, int]] = field(default_factory=list)  # per image (H, W) of that view

    def __len__(self) -> int:
        return len(self.sources)

    @property
    def label_maps(self) -> list[np.ndarray]:
        """Unmix-CLIP's label maps (H, W) uint8: 0 background, k + 1 class k."""
        return self.method_label_maps["ours"]

    @property
    def score_maps(self) -> list[np.ndarray]:
        """Unmix-CLIP's normalised score maps (C, H, W) float32."""
        return self.method_score_maps["ours"]

    def legend(self) -> dict[int, str]:
        return {0: "background", **{k + 1: c for k, c in enumerate(self.classes)}}

    def pixel_fractions(self, index: int, method: str = "ours") -> dict[str, float]:
        """Share of the image's pixels per label name (background only under a background rule)."""
        labels = self.method_label_maps[method][index]
        counts = np.bincount(labels.ravel(), minlength=len(self.classes) + 1) / labels.size
        names = self.legend()
        return {names[v]: float(counts[v]) for v in names if v > 0 or self.background != "none"}

    def summary(self, index: int) -> dict[str, Any]:
        """What the `segment` command writes as the image's JSON."""
        height, width = self.label_maps[index].shape
        return {"image": self.sources[index], "height": height, "width": width,
                "classes": list(self.classes), "labels": {str(k): v for k, v in self.legend().items()},
                "background": self.background, "threshold": self.threshold,
                "templates": list(self.templates), "text_bn": self.text_bn, "resize": self.resize,
                "input_size": list(self.input_sizes[index]) if self.input_sizes else None,
                "image_scores": {c: float(s) for c, s in zip(self.classes, self.image_scores[index])},
                "pixel_fractions": self.pixel_fractions(index)}


def _image_list(images: ImageLike | Sequence[ImageLike]) -> list[ImageLike]:
    if isinstance(images, (str, os.PathLike, Image.Image)):
        return [images]
    return list(images)


def _load(item: ImageLike, index: int) -> tuple[Image.Image, str]:
    """(RGB image, its source name); files go through load_image (BadImageError names the file)."""
    if isinstance(item, Image.Image):
        return item.convert("RGB"), getattr(item, "filename", "") or f"<image {index}>"
    return load_image(item), str(item)


class UnmixCLIP:
    """A frozen CLIP and trained projectors, ready for free-text queries on images."""

    def __init__(self, backbone: FrozenTowers, head: UnmixHead, meta: dict | None = None, *,
                 image_size: int | None = None, text_bn: str = "running",
                 score_text_bn: str = "running", text_input: str = "normalised",
                 pos_interpolation: str = "bilinear", interpolation: str = "bicubic", batch_size: int = 8,
                 templates: str | Sequence[str] = PLAIN_TEMPLATE, background: str = "none",
                 threshold: float = 0.85, source: str = "", resize: str = "keep") -> None:
        for name, value in (("text_bn", text_bn), ("score_text_bn", score_text_bn)):
            if value not in BN_STATS:
                raise ParamError(f"{name} must be one of {BN_STATS}, got {value!r}")
        if text_input not in ("raw", "normalised"):
            raise ParamError(f"text_input must be raw or normalised, got {text_input!r}")
        if interpolation not in INTERPOLATIONS:
            raise ParamError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {interpolation!r}")
        check_background(background, threshold)
        self.templates, self.background, self.threshold = template_list(templates), background, float(threshold)
        self.backbone, self.head = backbone, head.eval()
        self.meta = dict(meta or {})
        native = backbone.image_size  # a ViT's may be (H, W): the square view takes its longer side
        self.image_size = image_size or recorded_image_size(self.meta) or (
            native if isinstance(native, int) else max(native))
        self.text_bn, self.score_text_bn, self.text_input = text_bn, score_text_bn, text_input
        self.pos_interpolation, self.batch_size, self.source = pos_interpolation, batch_size, source
        self.interpolation = interpolation  # the image resize (evaluate.seg.interpolation)
        self.resize = resize_rule(resize)  # keep the aspect ratio, or the evaluation's square
        self.tokens = recorded_tokens(self.meta)  # {"train": image-level scores, "seg": "ours"}
        # (classes, templates, normalise) -> (C, D): the frozen text tower gives the same features
        # every time, so `segment` called per chunk (and `query`) encodes each prompt set once
        self._text_memo: dict[tuple, Tensor] = {}

    @classmethod
    def from_files(cls, projectors: str | os.PathLike, checkpoint: str | os.PathLike | None = None,
                   pretrained: str | None = None, device: str = "auto", *, sha256: str | None = None,
                   init_seed: int | None = None, name: str | None = None, precision: str = "fp32",
                   channels_last: bool = False, **options: Any) -> UnmixCLIP:
        """Projectors file + the backbone it records. Weights: `checkpoint` (a local file, or the
        recorded BatchNorm statistics of a random backbone) or `pretrained` (an open_clip tag,
        "random" for a seeded random init); both None: the recorded ones (from where the record
        says; older files: a tag or a random seed). Refuses weights whose digest differs from the
        recorded one (WeightsError naming the expected file). `name` is only for projectors that
        record no backbone. `options` go to the constructor (image_size, text_bn, templates,
        background, ...); those not given come from the file's record (record_options)."""
        dev = resolve_device(device)
        head, meta = load_projectors(projectors, dev)
        if use_of(meta) is not None:
            backbone = backbone_from_use(meta, projectors, checkpoint=checkpoint, pretrained=pretrained,
                                         sha256=sha256, init_seed=init_seed, device=dev, precision=precision,
                                         channels_last=channels_last)
        else:
            backbone = resolve_backbone(meta, projectors, checkpoint=checkpoint, pretrained=pretrained,
                                        sha256=sha256, init_seed=init_seed or 0, name=name, device=dev,
                                        precision=precision, channels_last=channels_last)
        return cls(backbone, head, meta, source=os.fspath(projectors),  # as given, not resolved
                   **{**record_options(meta), **options})

    # -- text ------------------------------------------------------------------------------------
    def _prompt_features(self, classes: list[str], templates: list[str], text_input: str | None = None
                         ) -> Tensor:
        """(C, D) CLIP text features of every class, averaged over the templates (CLIP's prompt
        ensembling: mean of the L2-normalised features, normalised again; raw input: plain mean).
        text_input None: the maps' (`self.text_input`)."""
        normalise = (text_input or self.text_input) == "normalised"
        key = (tuple(classes), tuple(templates), normalise)
        if key not in self._text_memo:
            prompts = [t.replace("{}", c) for t in templates for c in classes]
            feats = self.backbone.text_features(prompts, normalise=normalise)  # (T*C, D)
            mean = feats.view(len(templates), len(classes), -1).mean(dim=0)  # (C, D)
            if len(self._text_memo) >= TEXT_MEMO:
                del self._text_memo[next(iter(self._text_memo))]  # the oldest
            self._text_memo[key] = torch.nn.functional.normalize(mean, dim=-1) if normalise else mean
        return self._text_memo[key].clone()  # the caller's to change

    @torch.no_grad()
    def text_features(self, classes: str | Iterable[str], template: str | Iterable[str] | None = None,
                      stats: str | None = None) -> TextFeatures:
        """Raw (ensembled) CLIP features of the class prompts and their projection (C, D').
        template None: the model's templates (the record's)."""
        classes = class_list(classes)
        templates = template_list(self.templates if template is None else template)
        stats = stats or self.text_bn
        if stats == "batch" and len(classes) < 2:
            raise ParamError(f"text BatchNorm statistics 'batch' (--text-bn, API text_bn) are taken "
                             f"over the queried classes and need at least 2, got {classes}: query more "
                             "classes or use 'running' (the default)")
        raw = self._prompt_features(classes, templates)
        projected = self.head.project_text(raw.to(next(self.head.parameters()).device), stats=stats)
        return TextFeatures(classes, templates, raw, projected, stats)

    # -- images ----------------------------------------------------------------------------------
    def _view(self, picture: Image.Image, resize: str) -> Tensor:
        """(3, H, W): the aspect ratio kept, short side image_size (data.dense_view), or the
        evaluation's (3, S, S) (resize "square": segmentation.seg_view is the same eval_view)."""
        return dense_view(picture, self.image_size, self.backbone.stride, resize, self.interpolation)

    @torch.no_grad()
    def image_tokens(self, images: ImageLike | Sequence[ImageLike], resize: str | None = None) -> ImageTokens:
        """Spatial, v-v and projected v-v tokens of the images (one trunk pass) at image_size, in
        one batch: with resize "keep" the images must share their view's size (one shape)."""
        resize = resize_rule(resize or self.resize)
        views = [self._view(_load(item, i)[0], resize) for i, item in enumerate(_image_list(images))]
        shapes = sorted({tuple(v.shape[1:]) for v in views})
        if len(shapes) > 1:
            raise ParamError(f"images of different shapes make views of sizes {shapes}: call image_tokens "
                             "once per shape, or use resize='square'")
        batch = torch.stack(views)  # (B, 3, H, W)
        train, seg = self.tokens["train"], self.tokens["seg"]
        tokens = self.backbone.token_paths(batch, (train, seg), self.pos_interpolation)
        projected = self.head.project_tokens(tokens[seg].to(next(self.head.parameters()).device))
        grid = view_grid(batch, self.backbone, resize) or (math.isqrt(tokens[seg].shape[1] - 1),) * 2
        return ImageTokens(tokens[train], tokens[seg], projected, grid)

    @torch.no_grad()
    def segment(self, images: ImageLike | Sequence[ImageLike], classes: str | Iterable[str],
                background: str | None = None, threshold: float | None = None,
                template: str | Iterable[str] | None = None, methods: Sequence[str] = ("ours",),
                progress: bool = False, resize: str | None = None) -> SegmentationResult:
        """Label and score maps at each image's own size, and image-level scores, for free-text
        classes (a list of names). `methods` adds baselines (any of segmentation.METHODS) beside
        "ours" (always computed). `background`: none | softmax | max-score with `threshold` (see
        pipeline/evaluation/segment_maps.py); None: the model's (the record's), as `template`.
        `resize` (None: the model's): "keep" the aspect ratio (data/dense_view.py; images of one
        view size share a batch) or "square", the released evaluation's view."""
        resize = resize_rule(resize or self.resize)
        background = self.background if background is None else background
        threshold = self.threshold if threshold is None else threshold
        check_background(background, threshold)
        text = self.text_features(classes, template)
        methods = list(dict.fromkeys([*methods, "ours"]))
        trained_on = recorded_train_text_input(self.meta)  # the region scores see the training text
        pos = self._prompt_features(text.classes, [POSITIVE_TEMPLATE], trained_on)  # (C, D)
        neg = self._prompt_features(text.classes, [NEGATIVE_TEMPLATE], trained_on)  # (C, D)
        items = _image_list(images)
        sources, scores, sizes = [], [], []
        labels: dict[str, list[np.ndarray]] = {m: [] for m in methods}
        normalised: dict[str, list[np.ndarray]] = {m: [] for m in methods}
        bar = tqdm(total=len(items), unit="img", desc="segment", disable=not progress)
        for first in range(0, len(items), self.batch_size):
            loaded = [_load(item, first + j) for j, item in enumerate(items[first:first + self.batch_size])]
            sources += [s for _, s in loaded]
            views = [self._view(p, resize) for p, _ in loaded]  # (3, H, W) each
            sizes += [(int(v.shape[1]), int(v.shape[2])) for v in views]
            chunk_scores, chunk = maps_by_shape(
                self.backbone, self.head, views, [(p.height, p.width) for p, _ in loaded],
                (text.raw, text.projected, neg, pos), methods, resize, self.pos_interpolation, self.score_text_bn, self.tokens)
            scores.append(chunk_scores.cpu().numpy())
            for m in methods:  # (C, H, W) at the picture's own size -> its (H, W) labels
                labels[m] += [label_map(n, background, threshold).to(torch.uint8).cpu().numpy() for n in chunk[m]]
                normalised[m] += [n.cpu().numpy() for n in chunk[m]]
            bar.update(len(loaded))
        bar.close()
        image_level = np.concatenate(scores) if scores else np.zeros((0, len(text.classes)), np.float32)
        return SegmentationResult(text.classes, sources, background, float(threshold), text.templates,
                                  text.stats, image_level, labels, normalised, resize, sizes)

    def describe(self) -> dict[str, Any]:
        """Which model this is, for output files."""
        return {"projectors": self.source, "backbone": self.backbone.name,
                "weights_digest": self.backbone.weights_digest, "image_size": self.image_size,
                "interpolation": self.interpolation, "pos_interpolation": self.pos_interpolation,
                "resize": self.resize, "tokens": dict(self.tokens),
                "recipe": (use_of(self.meta) or {}).get("recipe"),
                "text_bn": self.text_bn, "score_text_bn": self.score_text_bn,
                "text_input": self.text_input, "trained_classes": list(self.meta.get("classnames", []))}

