"""ViT backbones in the params: which names are accepted, what a name implies (token stride, token
methods, no BatchNorm), each refusal one line naming its key."""
from pathlib import Path

import pytest

from pipeline.config.backbones import known_backbones, token_stride
from pipeline.config.params import ParamError, load_params

PARAMS = Path(__file__).resolve().parents[1] / "configs" / "params.yaml"
SIZES = ("backbone.image_size", "evaluate.seg.image_size", "evaluate.zs_mlr.image_size")


def vit(name: str, size: int, *extra: str):
    return load_params(PARAMS, [f"backbone.name={name}", *(f"{k}={size}" for k in SIZES), *extra])


@pytest.mark.parametrize("name, patch", [("ViT-B-16", 16), ("ViT-B-32", 32), ("ViT-L-14", 14),
                                         ("ViT-L-14-336", 14), ("tiny-ViT", 8)])
def test_openai_architecture_vits_are_accepted_with_their_patch_as_stride(name, patch):
    p = vit(name, 32 * patch)
    assert p.backbone.name == name and token_stride(name) == patch
    # "auto" token methods resolve to the ViT's: MaskCLIP tokens stored, CLIP Surgery's v-v scored
    assert (p.extract.tokens, p.evaluate.seg.tokens) == ("maskclip", "clip-surgery")


def test_resnets_keep_their_stride_and_default_tokens():
    p = load_params(PARAMS)
    assert token_stride(p.backbone.name) == 32
    assert (p.extract.tokens, p.evaluate.seg.tokens) == ("vproj", "vv")
    assert {"RN50", "RN101", "RN50x4", "tiny-RN", "tiny-ViT", "ViT-B-16"} <= known_backbones()


@pytest.mark.parametrize("name, why", [
    ("ViT-B-16-SigLIP", "Hugging Face"),  # timm tower, sigmoid loss
    ("EVA02-B-16", "timm"),
    ("coca_ViT-B-32", "CoCa"),
    ("ViT-L-14-CLIPA", "Hugging Face"),
    ("ViT-M-16-alt", "layer scale"),
    ("convnext_base", "timm"),
    ("RN102", "no open_clip model config"),
])
def test_other_towers_are_refused_in_one_line(name, why):
    with pytest.raises(ParamError, match=why) as err:
        load_params(PARAMS, [f"backbone.name={name}"])
    assert "backbone.name" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("key", SIZES)
def test_an_image_size_off_the_patch_grid_is_refused_naming_the_key(key):
    sizes = {k: 224 for k in SIZES} | {key: 200}  # 224 = 14 x 16: 200 is not a multiple of 16
    with pytest.raises(ParamError, match=rf"parameter '{key}' must be a positive multiple of 16, "
                                         "ViT-B-16's patch size, got 200") as err:
        load_params(PARAMS, ["backbone.name=ViT-B-16", *(f"{k}={v}" for k, v in sizes.items())])
    assert "\n" not in str(err.value)
    vit("ViT-L-14", 336)  # 336 is no multiple of 32, but of 14: a ViT-L/14 takes it


def test_recalibrating_a_vit_is_refused():
    with pytest.raises(ParamError, match="'backbone.recalibrate_bn': tiny-ViT is a ViT"):
        vit("tiny-ViT", 64, "backbone.recalibrate_bn=true", "backbone.pretrained=null")


@pytest.mark.parametrize("extra, key", [
    (("extract.tokens=vproj",), "extract.tokens"),  # a ResNet method asked of a ViT
    (("evaluate.seg.tokens=surgery",), "evaluate.seg.tokens"),
])
def test_token_methods_of_another_tower_are_refused(extra, key):
    with pytest.raises(ParamError, match=rf"parameter '{key}' must be a token method of tiny-ViT"):
        vit("tiny-ViT", 64, *extra)
    with pytest.raises(ParamError, match="'extract.tokens' must be a token method of RN101"):
        load_params(PARAMS, ["extract.tokens=clearclip"])
    with pytest.raises(ParamError, match="clearclip is a ViT method"):
        load_params(PARAMS, ["evaluate.seg.methods=[clip, clearclip]"])
    assert vit("tiny-ViT", 64, "extract.tokens=clearclip", "evaluate.seg.tokens=qk",
               "evaluate.seg.methods=[clip, clearclip, ours]").extract.tokens == "clearclip"
