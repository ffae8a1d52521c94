"""Zero-shot semantic segmentation: per-method token score maps and the pixel labels they give.

Methods (paper Table 2 and the authors' released scripts, REFERENCE.md 4.2), each a pair (image
tokens, class text features) compared per token:
  "clip"              the attention pool's own q-k output for every token vs raw CLIP text (cosine);
  "clip-vproj"        DualCoOp's spatial tokens c_proj(v_proj(x)) vs raw CLIP text (cosine);
  "clip-surgery"      v-v tokens vs raw CLIP text through CLIP Surgery's feature surgery;
  "clip-vv"           v-v tokens vs raw CLIP text (cosine);
  "ours"              v-v tokens -> image projector vs text -> text projector (cosine);
  "clip-surgery+ours" the projected pair of "ours" through feature surgery.
All token sets come from one trunk pass (FrozenCLIP.token_paths). The mean token (position 0)
is dropped; the H x W grid gives a (C, h, w) map per image.

Maps to labels (CLIP Surgery's get_similarity_map order): every class's map is min-max
normalised over the image's tokens, n_c = (s_c - min s_c) / (max s_c - min s_c) (a constant map
gives 0), then upsampled bilinearly to the ground-truth mask's own size (the mask is never
resized); a pixel takes argmax_c n_c. Background rules (datasets with a background class):
  "none"      argmax over the classes only: background is never predicted (as released);
  "softmax"   background where max_c softmax_c(100 n(x)) < threshold (GEM; the authors'
              commented-out code), the softmax taken per pixel after the upsampling;
  "max-score" background where max_c n_c(x) < threshold.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from pipeline.config.params import ParamError
from pipeline.data.augment import eval_view
from pipeline.model.backbone import PLAIN_TEMPLATE, POSITIVE_TEMPLATE, FrozenCLIP
from pipeline.model.heads import UnmixHead

METHODS = ("clip", "clip-vproj", "clip-surgery", "clip-vv", "ours", "clip-surgery+ours")
METHOD_LABELS = {"clip": "CLIP (q-k)", "clip-vproj": "CLIP v-proj (DualCoOp tokens)",
                 "clip-surgery": "CLIP Surgery", "clip-vv": "CLIP-VV", "ours": "ours (Unmix-CLIP)",
                 "clip-surgery+ours": "CLIP Surgery + ours"}
PROJECTED = ("ours", "clip-surgery+ours")  # methods that need the trained head
SURGERY = ("clip-surgery", "clip-surgery+ours")
TOKEN_PATH = {"clip": "qk", "clip-vproj": "vproj", "clip-surgery": "vv", "clip-vv": "vv",
              "ours": "vv", "clip-surgery+ours": "vv"}
BACKGROUND_RULES = ("none", "softmax", "max-score")
SOFTMAX_SCALE = 100.0  # GEM: softmax over classes of 100 x the normalised maps
IGNORE_INDEX = 255


def seg_view(image: Image.Image, size: int, interpolation: str = "bicubic") -> Tensor:
    """ZS3 network input: Resize((S, S), interpolation) and CLIP normalisation -> (3, S, S);
    the test-time view (augment.eval_view), so the API and the evaluation see the same pixels."""
    return eval_view(image, size, interpolation)


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


def feature_surgery(grid: Tensor, text: Tensor) -> Tensor:
    """CLIP Surgery's feature surgery (its clip_feature_surgery without given redundant features)
    on L2-normalised tokens f (B, D, H, W) and texts t (C, D) -> (B, C, H, W).

    Definition: s_c = f . t_c; w_c = softmax_c(2 s) / mean_c softmax_c(2 s) (restrains obvious
    classes); the element-wise features w_c (f * t_c) minus their class mean (the redundant
    feature), summed over D. Summing first, that is w_c s_c - mean_c' (w_c' s_c'), computed here
    without the (B, HW, C, D) tensor. With one class every map is 0: it needs the class set.
    """
    s = cosine_maps(grid, text)  # (B, C, H, W)
    prob = (2.0 * s).softmax(dim=1)
    weighted = prob / prob.mean(dim=1, keepdim=True) * s  # (B, C, H, W)
    return weighted - weighted.mean(dim=1, keepdim=True)


# `evaluate.prompt`: the paper evaluates with "A photo of a {class}." (plain); "positive" is the
# training prompt without the full stop. With pretrained CLIP the two are nearly the same feature;
# a random text tower puts them far apart, so the smoke profile evaluates with the training prompt.
PROMPTS = {"plain": PLAIN_TEMPLATE, "positive": POSITIVE_TEMPLATE}


def plain_text(backbone: FrozenCLIP, classnames: Sequence[str], prompt: str = "plain",
               normalise: bool = True) -> Tensor:
    """CLIP text features (C, D) of the evaluation prompt (default: the paper's ZS3 / MFI prompt);
    `normalise` False gives the raw encode_text output (evaluate.text_input raw)."""
    return backbone.text_features([PROMPTS[prompt].format(c) for c in classnames], normalise=normalise)


@torch.no_grad()
def project_classes(head: UnmixHead, text: Tensor, stats: str) -> Tensor:
    """Class prompts (C, D) through the text projector with BatchNorm `stats` ("running" or "batch":
    the statistics of these C prompts, as the authors' ZS3 / MFI scripts ran) -> (C, D')."""
    if stats == "batch" and text.shape[0] < 2:
        raise ParamError(f"evaluate.text_bn 'batch' takes BatchNorm statistics over the evaluated "
                         f"class prompts and needs at least 2, got {text.shape[0]}: use 'running'")
    head.eval()
    return head.project_text(text.to(next(head.parameters()).device), stats=stats)


def method_text(raw_text: Tensor, head: UnmixHead | None, methods: Sequence[str],
                stats: str = "running") -> dict[str, Tensor]:
    """Class text features per method: CLIP's for the baselines, projected for PROJECTED ones."""
    texts = {m: raw_text for m in methods if m not in PROJECTED}
    if any(m in PROJECTED for m in methods):
        if head is None:
            raise ValueError(f"methods {[m for m in methods if m in PROJECTED]} need trained projectors")
        projected = project_classes(head, raw_text, stats)  # (C, D')
        texts.update({m: projected for m in methods if m in PROJECTED})
    return texts


@torch.no_grad()
def score_maps(backbone: FrozenCLIP, head: UnmixHead | None, images: Tensor, texts: dict[str, Tensor],
               pos_interpolation: str = "bilinear") -> dict[str, Tensor]:
    """Per method in `texts`: score maps (B, C, h, w) on the token grid, float32 on the backbone's
    device (where the post-processing runs too). One trunk pass gives every token path needed;
    images are square (seg_view), so the grid is square."""
    tokens = backbone.token_paths(images, sorted({TOKEN_PATH[m] for m in texts}), pos_interpolation)
    return maps_from_tokens(tokens, head, texts)


@torch.no_grad()
def maps_from_tokens(tokens: dict[str, Tensor], head: UnmixHead | None, texts: dict[str, Tensor]
                     ) -> dict[str, Tensor]:
    """score_maps on token paths already computed (B, 1+hw, D) each: the one place that decides a
    method's grid (projected once for every PROJECTED method) and its similarity (surgery or cosine)."""
    projected = None
    if any(m in PROJECTED for m in texts):
        assert head is not None, "projected methods need the projectors"
        head.eval()
        device = next(head.parameters()).device
        projected = token_grid(head.project_tokens(tokens["vv"].to(device)))  # (B, D', h, w)
    maps: dict[str, Tensor] = {}
    for m, text in texts.items():
        grid = projected if projected is not None and m in PROJECTED \
            else token_grid(tokens[TOKEN_PATH[m]])  # (B, D, h, w)
        text = text.to(grid.device)
        maps[m] = feature_surgery(grid, text) if m in SURGERY else cosine_maps(grid, text)
        if not torch.isfinite(maps[m]).all():  # an argmax of NaN is a label: never score it
            raise ParamError(f"non-finite {m} score maps from the backbone (with backbone.precision fp16 "
                             "this is an overflow: use fp32 or bf16)")
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


def normalised_maps(scores: Tensor, size: tuple[int, int]) -> Tensor:
    """One image's score maps (C, h, w) -> normalised maps n (C, H, W) at the mask's size."""
    return upsample(normalise_minmax(scores), size)


def label_with_background(normalised: Tensor, rule: str, threshold: float) -> Tensor:
    """Normalised maps (C, H, W) -> labels (H, W): 0 = background, k + 1 = class k (VOC / COCO ids)."""
    if rule not in BACKGROUND_RULES:
        raise ParamError(f"evaluate.seg.background must be one of {BACKGROUND_RULES}, got {rule!r}")
    best, label = normalised.max(dim=0)  # (H, W) each
    if rule == "none":
        return label + 1
    if rule == "softmax":
        best = (SOFTMAX_SCALE * normalised).softmax(dim=0).max(dim=0).values  # (H, W)
    return torch.where(best < threshold, 0, label + 1)


def predict(scores: Tensor, size: tuple[int, int], background: str | None = None,
            threshold: float = 0.85) -> Tensor:
    """Label map (H, W) int64 from one image's score maps (C, h, w). background None: argmax over
    the C classes, labels 0..C-1; else label_with_background's labels under that rule."""
    normalised = normalised_maps(scores, size)
    if background is None:
        return normalised.argmax(dim=0)
    return label_with_background(normalised, background, threshold)
