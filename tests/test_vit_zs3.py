"""ZS3 and the API on a ViT: each method scores the ViT token method it names, "ours" the one
evaluate.seg.tokens names, against maps computed by hand from FrozenViT's own tokens."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.api.weights import recorded_tokens
from pipeline.evaluation.segment_maps import token_paths_for
from pipeline.evaluation.segmentation import (
    METHOD_LABELS,
    feature_surgery,
    method_labels,
    score_maps,
    token_grid,
)
from pipeline.model.heads import UnmixHead
from pipeline.model.vit import TINY_VIT, load_vit

C = 4


@pytest.fixture(scope="module")
def world():
    torch.manual_seed(0)
    backbone = load_vit(TINY_VIT, pretrained=None)
    head = UnmixHead(backbone.embed_dim).eval()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    text = F.normalize(torch.randn(C, backbone.embed_dim, generator=torch.Generator().manual_seed(2)), dim=-1)
    return backbone, head, images, text


def cosine(tokens: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """(B, 1+hw, D) tokens vs (C, D) texts -> (B, C, h, w) cosine maps, written out."""
    grid = token_grid(tokens)  # (B, D, h, w)
    return torch.einsum("bdhw,cd->bchw", grid / grid.norm(dim=1, keepdim=True), text / text.norm(dim=1, keepdim=True))


@pytest.mark.parametrize("method, vit_method", [("clip", "qk"), ("clip-vproj", "maskclip"),
                                                ("clip-vv", "clip-surgery"), ("clearclip", "clearclip")])
def test_baselines_score_the_vit_token_method_they_name(world, method, vit_method):
    backbone, _, images, text = world
    maps = score_maps(backbone, None, images, {method: text})[method]
    tokens = backbone.token_paths(images, (vit_method,))[vit_method]
    torch.testing.assert_close(maps, cosine(tokens, text), rtol=1e-5, atol=1e-6)


def test_clip_surgery_is_feature_surgery_on_the_vit_surgery_path(world):
    backbone, _, images, text = world
    maps = score_maps(backbone, None, images, {"clip-surgery": text})["clip-surgery"]
    tokens = backbone.vv_tokens(images)
    expected = token_grid(feature_surgery(F.normalize(tokens, dim=-1), text))
    torch.testing.assert_close(maps, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ours_tokens", [None, "clip-surgery", "qk", "clearclip"])
def test_ours_projects_the_tokens_evaluate_seg_tokens_names(world, ours_tokens):
    backbone, head, images, text = world
    projected = F.normalize(head.project_text(text, stats="running"), dim=-1)
    maps = score_maps(backbone, head, images, {"ours": projected}, ours_tokens=ours_tokens)["ours"]
    method = ours_tokens or "clip-surgery"  # the default: the ResNet's "vv", CLIP Surgery's path here
    tokens = backbone.token_paths(images, (method,))[method]
    image = head.image_projector(tokens)
    image = image / image.norm(dim=-1, keepdim=True)  # ours_norm "after"
    expected = torch.einsum("bdhw,cd->bchw", token_grid(image), projected)
    torch.testing.assert_close(maps, expected, rtol=1e-5, atol=1e-6)
    other = "qk" if method != "qk" else "maskclip"  # and the check has teeth: another method differs
    assert (score_maps(backbone, head, images, {"ours": projected}, ours_tokens=other)["ours"]
            - maps).abs().max() > 1e-3


def test_the_api_reads_the_token_methods_the_projectors_record():
    assert recorded_tokens({}) == {"train": "vproj", "seg": "vv"}  # a ResNet's, a ViT reads as its own
    store = {"provenance": {"train_store": {"fingerprint": {"backbone": {"tokens": "clearclip"}}}}}
    assert recorded_tokens(store) == {"train": "clearclip", "seg": "vv"}
    use = {**store, "use": {"tokens": {"train": "maskclip", "seg": "qk"}}}
    assert recorded_tokens(use) == {"train": "maskclip", "seg": "qk"}
    assert token_paths_for(["ours", "clip"], "qk", "clearclip") == ["clearclip", "qk"]


def test_figures_and_panels_name_the_vit_methods():
    assert method_labels("tiny-ViT")["clip-vproj"].startswith("MaskCLIP")
    assert method_labels("tiny-RN")["clip-vproj"] == METHOD_LABELS["clip-vproj"]
    assert set(method_labels("tiny-ViT")) == set(METHOD_LABELS)
