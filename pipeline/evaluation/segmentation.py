"""Zero-shot semantic segmentation: per-method token score maps and the pixel labels they give.

Methods (paper Table 2 and the authors' released scripts, docs/METHOD.md "Evaluation as
released"), each a pair (image tokens, class text features) compared per token:
  "clip"              the attention pool's own q-k output for every token vs raw CLIP text (cosine);
  "clip-vproj"        DualCoOp's spatial tokens c_proj(v_proj(x)) vs raw CLIP text (cosine);
  "clip-surgery"      CLIP Surgery as released: its ResNet attention pool's tokens
                      (FrozenCLIP.surgery_tokens) and CLIP text, both L2-normalised, through
                      feature surgery with class weights from token 0 (`feature_surgery`);
  "clip-vv"           v-v tokens (the paper's description, FrozenCLIP.vv_tokens) vs raw CLIP text (cosine);
  "ours"              v-v tokens -> image projector vs text -> text projector -> normalise; the
                      image side per `ours_norm` (IMAGE_NORMS), the similarity a dot product;
  "clip-surgery+ours" CLIP Surgery's tokens -> image projector (per `cs_ours_norm`) and the
                      projected, normalised text through `feature_surgery` (CS_Ours);
  "clip-surgery-per-token"  this project's own variant: v-v tokens and CLIP text through feature
                      surgery whose class weights come from every token's own similarities
                      (`feature_surgery_per_token`; as the first public version of CLIP Surgery's
                      clip.py did), not the released computation;
  "clearclip"         a ViT only: ClearCLIP's last block (q-q attention, no residual, no MLP) vs
                      raw CLIP text (cosine).
On a ViT (model/vit.py) the same names take its token methods: "clip" its ordinary output tokens,
"clip-vproj" MaskCLIP's value path, "clip-surgery" / "clip-vv" CLIP Surgery's ViT v-v dual path
(with and without feature surgery). "ours" scores the token method `ours_tokens` (params
evaluate.seg.tokens: vv for a ResNet, clip-surgery for a ViT by default), `method_path`.
All token sets come from one trunk pass (FrozenTowers.token_paths). The mean token (position 0)
is dropped from the maps (feature surgery uses it for its class weights); the H x W grid gives a
(C, h, w) map per image.

Image-side normalisation of the projected methods (IMAGE_NORMS; f = tokens, h = image projector):
  "after"   h(f) / ||h(f)||: project the raw tokens, then normalise (the VOC and Context scripts'
            "ours"; the paper's cosine);
  "before"  h(f / ||f||), not normalised afterwards (the COCO script's "ours" and CS_Ours).
The text side is always the text projector's output L2-normalised.

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

from pipeline.config.backbones import backbone_kind
from pipeline.config.params import ParamError
from pipeline.data.augment import eval_view
from pipeline.evaluation.labels import (
    SOFTMAX_SCALE,  # noqa: F401 (importers know it as segmentation.SOFTMAX_SCALE)
    background_mask,
    labels,
    upsample,
    with_background,
)
from pipeline.model.backbone import PLAIN_TEMPLATE, POSITIVE_TEMPLATE, FrozenTowers
from pipeline.model.heads import UnmixHead

METHODS = ("clip", "clip-vproj", "clip-surgery", "clip-vv", "ours", "clip-surgery+ours",
           "clip-surgery-per-token")  # every backbone's
VIT_ONLY_METHODS = ("clearclip",)  # a ViT's token_paths only
METHOD_LABELS = {"clip": "CLIP (q-k)", "clip-vproj": "CLIP v-proj (DualCoOp tokens)",
                 "clip-surgery": "CLIP Surgery", "clip-vv": "CLIP-VV", "ours": "ours (Unmix-CLIP)",
                 "clip-surgery+ours": "CLIP Surgery + ours",
                 "clip-surgery-per-token": "CLIP Surgery, per-token weights (this project's)",
                 "clearclip": "ClearCLIP (ViT: q-q last block)"}
VIT_LABELS = {**METHOD_LABELS, "clip": "CLIP (ViT output tokens)", "clip-vproj": "MaskCLIP (value path)",
              "clip-surgery": "CLIP Surgery (ViT v-v path)", "clip-vv": "CLIP Surgery's v-v tokens (cosine)"}
PROJECTED = ("ours", "clip-surgery+ours")  # methods that need the trained head
SURGERY = ("clip-surgery", "clip-surgery+ours")  # feature surgery as released (weights from token 0)
TOKEN_PATH = {"clip": "qk", "clip-vproj": "vproj", "clip-surgery": "surgery", "clip-vv": "vv",
              "ours": "vv", "clip-surgery+ours": "surgery", "clip-surgery-per-token": "vv",
              "clearclip": "clearclip"}  # a ViT's token_paths reads vproj / vv / surgery as its own
IMAGE_NORMS = ("after", "before")  # projected methods: L2 after the image projector, or before it
BACKGROUND_RULES = ("none", "softmax", "max-score")
IGNORE_INDEX = 255


def method_labels(backbone_name: str) -> dict[str, str]:
    """Display names of the methods on this backbone: a ViT's say which ViT method they compute."""
    return VIT_LABELS if backbone_kind(backbone_name) == "vit" else METHOD_LABELS


def method_path(method: str, ours_tokens: str | None = None) -> str:
    """The backbone token path a method scores: TOKEN_PATH, with "ours" on `ours_tokens` when given."""
    return ours_tokens if method == "ours" and ours_tokens else TOKEN_PATH[method]


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


def feature_surgery(features: Tensor, text: Tensor) -> Tensor:
    """CLIP Surgery's released feature surgery (its clip.py clip_feature_surgery, no redundant
    features given) on features F (B, 1+N, D), token 0 first, and class texts T (C, D) ->
    similarity (B, 1+N, C). The caller normalises (or not) as the method prescribes.

    Definition: p = softmax_c(2 F_0 . T_c), once per image from token 0; w_c = p_c / mean_c p;
    feats[n, c] = F_n * T_c * w_c (element-wise over D); subtract the class mean of feats;
    sum over D. Summing first, that is w_c s_nc - mean_c' (w_c' s_nc') with s = F T^T, computed
    here without the (B, 1+N, C, D) tensor. With one class every map is 0: it needs the class set.
    """
    s = torch.einsum("bnd,cd->bnc", features, text)  # (B, 1+N, C)
    prob = (2.0 * s[:, :1]).softmax(dim=-1)  # (B, 1, C): token 0 only
    weighted = prob / prob.mean(dim=-1, keepdim=True) * s  # (B, 1+N, C)
    return weighted - weighted.mean(dim=-1, keepdim=True)


def feature_surgery_per_token(grid: Tensor, text: Tensor) -> Tensor:
    """This project's variant of feature surgery ("clip-surgery-per-token"): the class weights
    of every token come from that token's own similarities, not from token 0. On L2-normalised
    tokens f (B, D, H, W) and texts t (C, D) -> (B, C, H, W):
    s_c = f . t_c; w_c = softmax_c(2 s) / mean_c softmax_c(2 s); w_c s_c - mean_c' (w_c' s_c').
    """
    s = cosine_maps(grid, text)  # (B, C, H, W)
    prob = (2.0 * s).softmax(dim=1)
    weighted = prob / prob.mean(dim=1, keepdim=True) * s  # (B, C, H, W)
    return weighted - weighted.mean(dim=1, keepdim=True)


def project_image_tokens(head: UnmixHead, tokens: Tensor, norm: str) -> Tensor:
    """Tokens (B, T, D) through the image projector h -> (B, T, D'): norm "after" h(f) / ||h(f)||,
    "before" h(f / ||f||) left un-normalised (IMAGE_NORMS)."""
    if norm == "after":
        return head.project_tokens(tokens)
    if norm == "before":
        return head.image_projector(F.normalize(tokens, dim=-1))
    raise ParamError(f"image normalisation must be one of {IMAGE_NORMS}, got {norm!r}")


# `evaluate.prompt`: the paper evaluates with "A photo of a {class}." (plain); "positive" is the
# training prompt without the full stop. With pretrained CLIP the two are nearly the same feature;
# a random text tower puts them far apart, so the smoke profile evaluates with the training prompt.
PROMPTS = {"plain": PLAIN_TEMPLATE, "positive": POSITIVE_TEMPLATE}


def plain_text(backbone: FrozenTowers, classnames: Sequence[str], prompt: str = "plain",
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
def score_maps(backbone: FrozenTowers, head: UnmixHead | None, images: Tensor, texts: dict[str, Tensor],
               pos_interpolation: str = "bilinear", *, ours_norm: str = "after",
               cs_ours_norm: str = "before", ours_tokens: str | None = None) -> dict[str, Tensor]:
    """Per method in `texts`: score maps (B, C, h, w) on the token grid, float32 on the backbone's
    device (where the post-processing runs too). One trunk pass gives every token path needed;
    images are square (seg_view), so the grid is square. ours_norm / cs_ours_norm: the image-side
    normalisation of "ours" / "clip-surgery+ours" (IMAGE_NORMS); ours_tokens: the token method
    "ours" scores (None: TOKEN_PATH's)."""
    tokens = backbone.token_paths(images, sorted({method_path(m, ours_tokens) for m in texts}),
                                  pos_interpolation)
    return maps_from_tokens(tokens, head, texts, ours_norm=ours_norm, cs_ours_norm=cs_ours_norm,
                            ours_tokens=ours_tokens)


@torch.no_grad()
def maps_from_tokens(tokens: dict[str, Tensor], head: UnmixHead | None, texts: dict[str, Tensor], *,
                     ours_norm: str = "after", cs_ours_norm: str = "before",
                     ours_tokens: str | None = None) -> dict[str, Tensor]:
    """score_maps on token paths already computed (B, 1+hw, D) each: the one place that decides a
    method's features (tokens, or their projection, once per token path and normalisation) and its
    similarity (released feature surgery, the per-token variant, cosine, or the projected dot product).

    Projected methods get their text already projected and normalised (method_text)."""
    for norm in (ours_norm, cs_ours_norm):
        if norm not in IMAGE_NORMS:
            raise ParamError(f"image normalisation must be one of {IMAGE_NORMS}, got {norm!r}")
    projected: dict[tuple[str, str], Tensor] = {}
    maps: dict[str, Tensor] = {}
    for m, text in texts.items():
        path = method_path(m, ours_tokens)
        if m in PROJECTED:
            norm = ours_norm if m == "ours" else cs_ours_norm
            if (path, norm) not in projected:
                assert head is not None, "projected methods need the projectors"
                head.eval()
                device = next(head.parameters()).device
                projected[path, norm] = project_image_tokens(head, tokens[path].to(device), norm)
            features = projected[path, norm]  # (B, 1+hw, D')
        else:
            features = tokens[path]  # (B, 1+hw, D)
        text = text.to(features.device)
        if m == "clip-surgery":  # CLIP's tokens and text, both L2-normalised, as released
            maps[m] = token_grid(feature_surgery(F.normalize(features, dim=-1), F.normalize(text, dim=-1)))
        elif m == "clip-surgery+ours":  # the projected pair as it is (CS_Ours)
            maps[m] = token_grid(feature_surgery(features, text))
        elif m == "clip-surgery-per-token":
            maps[m] = feature_surgery_per_token(token_grid(features), text)
        elif m in PROJECTED:  # "ours": features . text, a cosine when ours_norm is "after"
            maps[m] = torch.einsum("bdhw,cd->bchw", token_grid(features), text).contiguous()
        else:
            maps[m] = cosine_maps(token_grid(features), text)
        if not torch.isfinite(maps[m]).all():  # an argmax of NaN is a label: never score it
            raise ParamError(f"non-finite {m} score maps from the backbone (with backbone.precision fp16 "
                             "this is an overflow: use fp32 or bf16)")
    return {m: s.float().contiguous() for m, s in maps.items()}


def normalise_minmax(scores: Tensor) -> Tensor:
    """Per class min-max over the positions: (C, h, w) -> (C, h, w) in [0, 1]; constant maps -> 0."""
    flat = scores.flatten(1)  # (C, HW)
    low = flat.min(dim=1, keepdim=True).values
    span = flat.max(dim=1, keepdim=True).values - low
    return ((flat - low) / span.clamp_min(1e-12)).view_as(scores)


def normalised_maps(scores: Tensor, size: tuple[int, int]) -> Tensor:
    """One image's score maps (C, h, w) -> normalised maps n (C, H, W) at the mask's size."""
    return upsample(normalise_minmax(scores), size)


def label_with_background(normalised: Tensor, rule: str, threshold: float) -> Tensor:
    """Normalised maps (C, H, W) -> labels (H, W): 0 = background, k + 1 = class k (VOC / COCO ids)."""
    if rule not in BACKGROUND_RULES:
        raise ParamError(f"evaluate.seg.background must be one of {BACKGROUND_RULES}, got {rule!r}")
    return with_background(normalised.argmax(dim=0), background_mask(normalised, rule, threshold))


def predict(scores: Tensor, size: tuple[int, int], background: str | None = None,
            threshold: float = 0.85) -> Tensor:
    """Label map (H, W) int64 from one image's score maps (C, h, w). background None: argmax over
    the C classes, labels 0..C-1; else label_with_background's labels under that rule (by
    labels.labels, the same computation: identical labels)."""
    if background is not None and background not in BACKGROUND_RULES:
        raise ParamError(f"evaluate.seg.background must be one of {BACKGROUND_RULES}, got {background!r}")
    label, is_background = labels(normalise_minmax(scores), size, background, threshold)
    return label if background is None else with_background(label, is_background)
