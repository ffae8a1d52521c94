"""Parameters: recipe < file < profile < --set, one strict schema, one line naming each bad key."""
from pathlib import Path

import pytest
import yaml

from pipeline.config.params import (
    ParamError,
    as_dict,
    configure,
    load_params,
    load_recipe,
    parse_override,
    recipe_keys,
    recipe_summary,
    updated,
)
from pipeline.config.schema import RECIPES, Params, Train

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "configs" / "params.yaml"


def test_defaults_are_the_authors_run():
    p = load_params(PARAMS)
    assert p.recipe == "authors"
    assert p.backbone.name == "RN101" and p.backbone.pretrained == "openai"
    assert p.backbone.image_size == 448 and p.data.dataset == "coco2014"
    t = p.train
    assert (t.lr, t.momentum, t.weight_decay, t.epochs, t.batch_size) == (0.002, 0.9, 5e-4, 50, 32)
    assert (t.asl_weight, t.alpha, t.warmup_lr) == (0.04995, 0.001, 1e-5)
    assert as_dict(t.mfi) == {"form": "authors-features", "lambda": 0.0051}
    assert (t.label_fraction, t.text_input, t.lr_schedule) == (0.9, "raw", "epoch")
    assert p.model.text_bn == "eval" and p.evaluate.projectors == "best"


def test_paper_recipe_switches_every_recipe_key():
    p = load_params(PARAMS, ["recipe=paper"])
    t = p.train
    assert (t.asl_weight, t.alpha, t.mfi.form, t.mfi.lambda_) == (1.0, 7e-5, "paper", 0.2)
    assert p.model.text_bn == "train" and p.data.coco_val_images == "all"


def test_recipes_control_the_same_keys():
    keys = [sorted(load_recipe(name)) for name in RECIPES]
    assert all(k == keys[0] for k in keys) and keys[0] == recipe_keys()


def test_file_value_wins_over_recipe_and_is_reported(tmp_path):
    text = PARAMS.read_text().replace("  alpha: recipe ", "  alpha: 0.05 ")
    path = tmp_path / "params.yaml"
    path.write_text(text)
    p = load_params(path)
    assert p.train.alpha == 0.05
    summary = recipe_summary(p)
    assert summary["overridden"] == {"train.alpha": {"value": 0.05, "recipe": 0.001}}
    assert summary["differs_from_paper"]["train.mfi.form"] == {"authors": "authors-features", "paper": "paper"}


def test_precedence_recipe_file_profile_set():
    assert load_params(PARAMS, profile="smoke").train.alpha == 0.05  # profile > recipe
    assert load_params(PARAMS, ["train.alpha=0.5"], profile="smoke").train.alpha == 0.5  # --set > profile


def test_override_is_parsed_as_yaml_1_2_and_nested():
    assert parse_override("train.mfi.lambda=0.5") == {"train": {"mfi": {"lambda": 0.5}}}
    p = load_params(PARAMS, ["train.mfi.lambda=0.5", "backbone.pretrained=null", "train.lr=1e-3"])
    assert p.train.mfi.lambda_ == 0.5 and p.backbone.pretrained is None
    assert p.train.lr == 1e-3


def test_yaml_1_2_numbers_in_the_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(PARAMS.read_text().replace("  lr: 0.002", "  lr: 2e-3"))
    assert load_params(path).train.lr == 2e-3


def test_smoke_profile_overlays_defaults():
    p = load_params(PARAMS, profile="smoke")
    assert p.backbone.name == "tiny-RN" and p.data.dataset == "synthetic"
    assert p.train.momentum == 0.9  # untouched keys keep their defaults


@pytest.mark.parametrize("profile, dataset", [("coco", "coco2014"), ("voc", "voc2007"), ("cpu-trial", "coco2017")])
def test_dataset_profiles(profile, dataset):
    assert load_params(PARAMS, profile=profile).data.dataset == dataset


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.lr=-1", "train.lr"),
        ("extract.views=0", "extract.views"),
        ("backbone.name=ViT-B-16-SigLIP", "backbone.name"),
        ("backbone.image_size=100", "backbone.image_size"),
        ("train.mfi.form=other", "train.mfi.form"),
        ("train.mfi.form=authors", "train.mfi.form"),  # the old name: the error lists the new forms
        ("ablate.alphas=[]", "ablate.alphas"),
        ("train.no_such_key=1", "train.no_such_key"),
        ("train.device=gpu", "train.device"),
        ("train.precision=fp8", "train.precision"),
        ("ablate.epochs=0", "ablate.epochs"),
        ("train.warmup_epochs=50", "train.warmup_epochs"),
        ("evaluate.zs_mlr.region_mode=crop2", "evaluate.zs_mlr.region_mode"),
        ("train.lr=.nan", "train.lr"),
        ("evaluate.batch_size=0", "evaluate.batch_size"),
        ("evaluate.batch_size=-1", "evaluate.batch_size"),
        ("model.proj_dim=-5", "model.proj_dim"),
        ("train.asl.clip=.nan", "train.asl.clip"),
        ("train.seed='0'", "train.seed"),
        ("train.batch_size=true", "train.batch_size"),
        ("evaluate.seg.datasets=[voc2012,pascal]", "evaluate.seg.datasets"),
        ("train.label_fraction=0", "train.label_fraction"),
        ("recipe=mine", "recipe"),
        ("train.lr=[1", "train.lr"),  # bad YAML: one line, not a traceback
    ],
)
def test_invalid_param_is_rejected_naming_the_key(override, key):
    with pytest.raises(ParamError, match=key.replace(".", r"\.")):
        load_params(PARAMS, [override])


def test_the_old_mfi_form_error_names_the_new_forms():
    with pytest.raises(ParamError, match="authors-features"):
        load_params(PARAMS, ["train.mfi.form=authors"])


def test_unknown_key_in_the_file_is_refused_with_a_suggestion(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(PARAMS.read_text().replace("    lambda: recipe", "    lamda: 0.5"))
    with pytest.raises(ParamError, match=r"unknown parameter 'train\.mfi\.lamda' \(did you mean 'train\.mfi\.lambda'"):
        load_params(path)


def test_missing_key_in_the_file_is_named(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(PARAMS.read_text().replace("  eval_every: 1 ", "  # eval_every "))
    with pytest.raises(ParamError, match=r"missing parameter 'train\.eval_every'"):
        load_params(path)


def test_missing_param_file_is_named(tmp_path):
    with pytest.raises(ParamError, match="nowhere.yaml"):
        load_params(tmp_path / "nowhere.yaml")


def test_valid_devices_are_accepted():
    for device in ("auto", "cpu", "cuda", "cuda:1"):
        assert load_params(PARAMS, [f"train.device={device}"]).train.device == device


def test_configure_writes_a_profile_into_the_file_keeping_comments(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(PARAMS.read_text())
    changed = configure(path, profile="voc", recipe="paper", overrides=["train.epochs=3"])
    assert {"data.dataset", "recipe", "train.epochs"} <= set(changed)
    text = path.read_text()
    assert "# The single source of parameters" in text and "# authors | paper" in text
    p = load_params(path)
    assert (p.recipe, p.data.dataset, p.train.epochs) == ("paper", "voc2007", 3)
    assert yaml.safe_load(text)["train"]["alpha"] == "recipe"  # recipe keys still defer


def test_configure_refuses_a_bad_value_without_writing(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(PARAMS.read_text())
    with pytest.raises(ParamError, match="train.epochs"):
        configure(path, overrides=["train.epochs=0"])
    assert path.read_text() == PARAMS.read_text()


def test_params_are_the_typed_schema_and_record_as_params_yaml_names():
    p = load_params(PARAMS, ["train.mfi.lambda=0.5"])
    assert isinstance(p, Params) and isinstance(p.train, Train) and p.train.mfi.lambda_ == 0.5
    recorded = as_dict(p)
    assert recorded["train"]["mfi"] == {"form": "authors-features", "lambda": 0.5}  # what files record
    assert Params.model_validate(recorded) == p  # and read back typed
    assert Train.model_validate(recorded["train"]) == p.train


def test_updated_is_a_validated_copy():
    p = load_params(PARAMS)
    q = updated(p, {"train.lr": 0.01, "train.mfi.lambda": 0.3, "paths": {"results": "elsewhere"}})
    assert (q.train.lr, q.train.mfi.lambda_, q.paths.results, q.paths.cache) == (0.01, 0.3, "elsewhere", "cache")
    assert (p.train.lr, p.train.mfi.lambda_, p.paths.results) == (0.002, 0.0051, "results")  # untouched
    with pytest.raises(ParamError, match=r"parameter 'train\.lr'"):
        updated(p, {"train.lr": -1})
    with pytest.raises(ParamError, match=r"unknown parameter 'train\.lamda'"):
        updated(p, {"train.lamda": 1})
