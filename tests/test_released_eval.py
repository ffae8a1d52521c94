"""The released ZS3 evaluation selected by name (docs/RECIPES.md): evaluate.seg.{interpolation,
ours_norm, cs_ours_norm, coco_masks} reach the functions that compute them, per recipe and per
dataset, in `evaluate seg`, `figures` and `evaluate zs-mlr`; every ZS3 row names its variant and
the paper's Table 2 row; bad values are one line naming the key.

Generated layouts of all three ZS3 datasets (COCO-2017 with the 80 real classes, VOC 2012, PASCAL
Context), a random tiny-RN and untrained projectors: these tests are about what is computed, not
how well.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from pipeline.cli.app import main
from pipeline.config import paths
from pipeline.config.params import ParamError, as_dict, configure, load_params, updated
from pipeline.config.schema import Params
from pipeline.data.datasets import load_segmentation
from pipeline.data.synthetic import make_context_layout, make_planted_coco, make_voc_layout
from pipeline.evaluation.seg_eval import evaluate_segmentation
from pipeline.evaluation.sources import backbone_and_head
from pipeline.model.heads import UnmixHead
from pipeline.training import provenance
from pipeline.training.loop import save_projectors
from stages import evaluate, evaluate_seg, figures
from stages.download import write_random_backbone

REPO = Path(__file__).resolve().parents[1]
DATASETS = ["voc2012", "coco2017", "context59"]
KEYS = ("interpolation", "ours_norm", "cs_ours_norm", "coco_masks")
# (interpolation, ours_norm, cs_ours_norm, COCO masks) each dataset is evaluated with
EXPECTED = {
    "authors": {"voc2012": ("bicubic", "after", "before", "official"),
                "coco2017": ("bicubic", "before", "before", "released"),
                "context59": ("bilinear", "after", "before", "official")},
    "paper": dict.fromkeys(DATASETS, ("bicubic", "after", "after", "official")),
}


def _params(base: Path, recipe: str, *sets: str) -> Params:
    """Smoke params of `recipe` on `base`'s data, random tiny-RN, 96 px ZS3 input (3 x 3 tokens)."""
    p = load_params(REPO / "configs" / "params.yaml", [f"recipe={recipe}", *sets], profile="smoke")
    return updated(p, {
        "paths": {"data": str(base / "data"), "cache": str(base / "cache"), "results": str(base / "results")},
        "backbone.checkpoint": str(base / "backbone.pt"), "backbone.pretrained": None, "backbone.device": "cpu",
        "evaluate.seg.image_size": 96, "evaluate.projectors": "best", "figures.images": 1})


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The three ZS3 layouts under data/ and untrained projectors recorded for the authors recipe."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("released")
    coco = make_planted_coco(base / "data" / "coco2017", 1, 8, num_classes=80, image_size=64)
    annotations = coco / "annotations" / "instances_val2017.json"
    val = json.loads(annotations.read_text())
    val["annotations"][0]["iscrowd"] = 1  # official masks ignore it (255), released paint its class
    annotations.write_text(json.dumps(val))
    images = sorted((coco / "val2017").glob("*.jpg"))
    write_random_backbone(base / "backbone.pt", "tiny-RN", 0, 96, images)  # images tell apart
    make_voc_layout(base / "data" / "voc2012", n_images=4, image_size=64)
    make_context_layout(base / "data" / "context59", n_images=2, image_size=64)
    p = _params(base, "authors")
    torch.manual_seed(0)
    save_projectors(paths.projectors(p.paths, "best"), UnmixHead(64), {
        "model": as_dict(p.model), "embed_dim": 64, "classnames": [], "fingerprint": {}, "epoch": 0,
        "provenance": provenance.record(p, None, None, provenance.declared_digest(p.backbone))})
    yield base
    torch.set_num_threads(threads)


@pytest.mark.parametrize("recipe", ["authors", "paper"])
def test_each_recipe_sends_its_released_choices_to_every_dataset(base, recipe, monkeypatch):
    seen: dict[str, dict] = {}
    real_load, real_evaluate = evaluate_seg.load_segmentation, evaluate_seg.evaluate_segmentation

    def load(name, root, split, coco_masks="official"):
        seen[name] = {"coco_masks": coco_masks}
        return real_load(name, root, split, coco_masks=coco_masks)

    def evaluate_one_image(backbone, head, dataset, **kw):
        seen[dataset.name].update({k: kw[k] for k in KEYS[:3]})
        return real_evaluate(backbone, head, dataset, **{**kw, "limit": 1, "progress": False})

    monkeypatch.setattr(evaluate_seg, "load_segmentation", load)
    monkeypatch.setattr(evaluate_seg, "evaluate_segmentation", evaluate_one_image)
    params = _params(base, recipe, f"evaluate.seg.datasets=[{','.join(DATASETS)}]")
    metrics, table = evaluate_seg.evaluate_seg(params)
    assert {d: tuple(seen[d][k] for k in KEYS) for d in DATASETS} == EXPECTED[recipe]
    recorded = {d: metrics["datasets"][d]["variant"] for d in DATASETS}  # details name them too
    assert {d: tuple(v[k] for k in KEYS[:3]) for d, v in recorded.items()} == \
        {d: e[:3] for d, e in EXPECTED[recipe].items()}
    assert [recorded[d]["coco_masks"] for d in DATASETS] == [None, EXPECTED[recipe]["coco2017"][3], None]
    # every row: the method with its variant, then the paper's Table 2 row it stands beside
    ours = ("ours (per dataset, as each released script: image normalised after the projector (a "
            "cosine) on voc2012, context59; before the projector (not after) on coco2017) | Ours |"
            if recipe == "authors" else "ours (image normalised after the projector: a cosine, as "
            "the paper and the VOC / Context scripts) | Ours |")
    surgery_ours = "not after: the released CS_Ours" if recipe == "authors" else "the paper's cosine"
    for row in (f"| {ours}", "| clip (q-k tokens, cosine) | CLIP |", "| clip-vv (v-v tokens, cosine) | CLIP-VV |",
                "feature surgery weighted from token 0) | CLIP Surgery |", f"{surgery_ours}) | - |",
                "| method (variant) | paper Table 2 row |"):
        assert table.count(row) == 4, row  # once per protocol
    assert metrics["method_variants"]["clip-surgery"]["table2"] == "CLIP Surgery"
    assert "context59: 1 images, " + EXPECTED[recipe]["context59"][0] + " resize" in table


def test_authors_coco_ours_is_the_before_normalisation_on_released_masks(base):
    """The stage's numbers are evaluate_segmentation's with ours_norm "before" on released masks,
    and the other normalisation gives other numbers (so the first equality has teeth)."""
    params = _params(base, "authors", "evaluate.seg.datasets=[coco2017]",
                     "evaluate.seg.methods=[ours,clip-surgery+ours]")
    metrics, _ = evaluate_seg.evaluate_seg(params)
    stage = metrics["datasets"]["coco2017"]["methods"]
    backbone, head, _, _ = backbone_and_head(params)
    ev = params.evaluate
    kw = {"image_size": 96, "batch_size": ev.batch_size, "background": ev.seg.background, "progress": False,
              "methods": ["ours", "clip-surgery+ours"], "prompt": ev.prompt, "text_bn": ev.text_bn.seg,
              "voc_names": ev.voc_names, "interpolation": "bicubic", "cs_ours_norm": "before"}

    def run(norm: str, masks: str) -> dict:
        data = load_segmentation("coco2017", paths.dataset_root(params.paths, "coco2017"), "val",
                                 coco_masks=masks)
        return evaluate_segmentation(backbone, head, data, ours_norm=norm, **kw)["methods"]

    direct = run("before", "released")
    assert _same(stage, direct)
    assert any(v > 0 for by_v in stage.values() for r in by_v.values() for v in r.values() if not math.isnan(v))
    assert not _same(run("after", "released")["ours"], stage["ours"])
    assert not _same(run("before", "official"), stage)  # the crowd annotation: masks differ too


def _same(a, b) -> bool:
    """Nested dicts of numbers equal, NaN equal to NaN."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b or (math.isnan(a) and math.isnan(b))


def test_released_and_official_coco_masks_reach_the_scored_masks(base, monkeypatch):
    """coco_masks picks the masks the stage scores: the fixture's crowd annotation is ignored
    (255) in the official masks and painted as its class in the released ones."""
    root = base / "data" / "coco2017"
    released, official = (load_segmentation("coco2017", root, "val", coco_masks=m) for m in ("released", "official"))
    assert any((released.mask(i) != official.mask(i)).any() for i in range(len(released)))
    scored: list = []
    real = evaluate_seg.evaluate_segmentation

    def keep_masks(backbone, head, dataset, **kw):
        scored[:] = [dataset.mask(i) for i in range(len(dataset))]
        return real(backbone, head, dataset, **{**kw, "limit": 1, "progress": False})

    monkeypatch.setattr(evaluate_seg, "evaluate_segmentation", keep_masks)
    for recipe, expected in (("authors", released), ("paper", official)):
        evaluate_seg.evaluate_seg(_params(base, recipe, "evaluate.seg.datasets=[coco2017]",
                                          "evaluate.seg.methods=[clip]"))
        assert len(scored) == len(expected)
        assert all((m == expected.mask(i)).all() for i, m in enumerate(scored)), recipe


def test_figures_draw_ours_as_the_evaluation_computes_it(base, monkeypatch):
    seen: dict[str, object] = {}
    real_load, real_maps, real_view = figures.load_segmentation, figures.score_maps, figures.seg_view
    monkeypatch.setattr(figures, "load_segmentation", lambda *a, coco_masks: seen.update(
        masks=coco_masks) or real_load(*a, coco_masks=coco_masks))
    monkeypatch.setattr(figures, "score_maps", lambda *a, **kw: seen.update(
        norms=(kw["ours_norm"], kw["cs_ours_norm"])) or real_maps(*a, **kw))
    monkeypatch.setattr(figures, "seg_view", lambda image, size, interp: seen.update(
        interpolation=interp) or real_view(image, size, interp))
    monkeypatch.setattr(figures, "activation_grid", lambda *a, **kw: None)
    for name, expected in (("coco2017", ("released", ("before", "before"), "bicubic")),
                           ("context59", ("official", ("after", "before"), "bilinear"))):
        out = figures.run(_params(base, "authors", f"evaluate.seg.datasets=[{name}]",
                                  "figures.classes=[person]", "evaluate.seg.methods=[ours,clip-surgery+ours]"))
        assert (seen["masks"], seen["norms"], seen["interpolation"]) == expected, name
        assert out["variant"]["ours_norm"] == expected[1][0]


@pytest.mark.parametrize("recipe, norm", [("authors", "before"), ("paper", "after")])
def test_zs_mlr_regions_use_the_ours_of_their_dataset_family(base, recipe, norm, monkeypatch):
    """ZS-MLR on COCO-2014: `released` takes the COCO script's normalisation (variants.py)."""
    (base / "data" / "coco2014").mkdir(exist_ok=True)
    seen: dict = {}

    def zero_shot_mlr(backbone, head, dataset, **kw):
        seen.update(kw)
        return {"map": {"clip": 1.0, "regions": 2.0, "combined": 3.0}, "num_images": 1,
                "seconds_per_image": 0.1, "per_class_ap": {}}

    monkeypatch.setattr(evaluate, "load_multilabel", lambda *a: None)
    monkeypatch.setattr(evaluate, "zero_shot_mlr", zero_shot_mlr)
    metrics, table = evaluate.evaluate_zs_mlr(_params(base, recipe, "evaluate.zs_mlr.dataset=coco2014"))
    assert (seen["ours_norm"], seen["interpolation"]) == (norm, "bicubic")
    assert metrics["ours_norm"] == norm and f"normalised {norm} the projector" in table


@pytest.mark.parametrize("key, bad", [
    ("evaluate.seg.ours_norm", "sideways"), ("evaluate.seg.cs_ours_norm", "released"),
    ("evaluate.seg.coco_masks", "cocoapi"), ("evaluate.seg.interpolation", "nearest"),
    ("extract.eval_interpolation", "released"), ("evaluate.seg.methods", "[clip-surgery-token]")])
def test_bad_values_of_the_new_keys_are_one_line_naming_the_key(tmp_path, key, bad):
    with pytest.raises(ParamError, match=key.replace(".", r"\.")):
        load_params(REPO / "configs" / "params.yaml", [f"{key}={bad}"])
    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text())
    with pytest.raises(ParamError, match=key.replace(".", r"\.")):
        configure(path, overrides=[f"{key}={bad}"])
    assert path.read_text() == (REPO / "params.yaml").read_text()  # nothing written
    result = CliRunner().invoke(main, ["configure", "--params", str(path), "--set", f"{key}={bad}"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    (line,) = [x for x in result.output.splitlines() if x.strip()]
    assert line.startswith("Error:") and key in line


def test_recipes_name_the_released_evaluation_and_the_per_token_variant_is_opt_in():
    authors, paper = (load_params(REPO / "configs" / "params.yaml", [f"recipe={r}"]) for r in ("authors", "paper"))
    pick = (lambda p: (p.extract.eval_interpolation, *(getattr(p.evaluate.seg, k) for k in KEYS)))
    assert pick(authors) == ("bilinear", "released", "released", "before", "released")
    assert pick(paper) == ("bicubic", "bicubic", "after", "after", "official")
    assert "clip-surgery-per-token" not in authors.evaluate.seg.methods
    chosen = load_params(REPO / "configs" / "params.yaml",
                         ["evaluate.seg.methods=[clip-surgery,clip-surgery-per-token]"])
    assert chosen.evaluate.seg.methods == ["clip-surgery", "clip-surgery-per-token"]
