"""Parameters: one file, profile overlay, overrides, and a clear error naming each bad key."""
from pathlib import Path

import pytest

from pipeline.config import ParamError, load_params, parse_override

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "configs" / "params.yaml"


def test_defaults_reproduce_the_paper():
    p = load_params(PARAMS)
    assert p["backbone"]["name"] == "RN101" and p["backbone"]["pretrained"] == "openai"
    assert p["backbone"]["image_size"] == 448 and p["data"]["dataset"] == "coco2014"
    t = p["train"]
    assert (t["lr"], t["momentum"], t["weight_decay"], t["epochs"], t["batch_size"]) == (0.002, 0.9, 5e-4, 50, 32)
    assert (t["alpha"], t["mfi"]["lambda"], t["warmup_lr"]) == (7e-5, 0.2, 1e-5)


def test_override_is_parsed_as_yaml_and_nested():
    assert parse_override("train.mfi.lambda=0.5") == {"train": {"mfi": {"lambda": 0.5}}}
    p = load_params(PARAMS, ["train.mfi.lambda=0.5", "backbone.pretrained=null"])
    assert p["train"]["mfi"]["lambda"] == 0.5 and p["backbone"]["pretrained"] is None


def test_smoke_profile_overlays_defaults():
    p = load_params(PARAMS, profile="smoke")
    assert p["backbone"]["name"] == "tiny-RN" and p["data"]["dataset"] == "synthetic"
    assert p["train"]["momentum"] == 0.9  # untouched keys keep their defaults


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.lr=-1", "train.lr"),
        ("extract.views=0", "extract.views"),
        ("backbone.name=ViT-B-32", "backbone.name"),
        ("backbone.image_size=100", "backbone.image_size"),
        ("train.mfi.form=other", "train.mfi.form"),
        ("ablate.alphas=[]", "ablate.alphas"),
        ("train.no_such_key=1", "train.no_such_key"),
        ("train.device=gpu", "train.device"),
        ("train.precision=fp8", "train.precision"),
        ("ablate.epochs=0", "ablate.epochs"),
        ("train.warmup_epochs=50", "train.warmup_epochs"),
        ("evaluate.zs_mlr.region_mode=crop2", "evaluate.zs_mlr.region_mode"),
        ("train.lr=.nan", "train.lr"),
    ],
)
def test_invalid_param_is_rejected_naming_the_key(override, key):
    with pytest.raises(ParamError, match=key.replace(".", r"\.")):
        load_params(PARAMS, [override])


def test_missing_param_file_is_named(tmp_path):
    with pytest.raises(ParamError, match="nowhere.yaml"):
        load_params(tmp_path / "nowhere.yaml")


def test_valid_devices_are_accepted():
    for device in ("auto", "cpu", "cuda", "cuda:1"):
        assert load_params(PARAMS, [f"train.device={device}"])["train"]["device"] == device
