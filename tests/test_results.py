"""Headline metrics for DVC, full details beside them, and a report that marks foreign inputs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config.params import DEFAULT_PARAMS, as_dict, load_params
from pipeline.config.schema import Params
from pipeline.results.outputs import count_values, headline, run_identity, stamp, write_results

ROOT = Path(__file__).resolve().parents[1]
CLASSES = [f"class{i}" for i in range(80)]


def _params(tmp_path: Path, *overrides: str) -> Params:
    return load_params(ROOT / DEFAULT_PARAMS, [f"paths.results={tmp_path / 'results'}", *overrides])


def _seg_full(datasets, methods) -> dict:
    """The evaluation's shape: dataset -> methods -> variant -> both protocols + per-class IoUs."""
    return {d: {"methods": {m: {"all": {"dataset": 10.0 + i + j, "per-image-positive-pred": 50.0 + i + j,
                                        "per_class_iou": dict.fromkeys(CLASSES, 0.5)}}
                            for j, m in enumerate(methods)}, "num_images": 5}
            for i, d in enumerate(datasets)}


@pytest.mark.parametrize("protocol", ["dataset", "per-image-positive-pred"])
def test_seg_headline_is_the_chosen_protocol_per_dataset_and_method(tmp_path, protocol):
    params = _params(tmp_path, f"evaluate.seg.protocol={protocol}")
    full = _seg_full(["voc2012", "coco2017", "context59"], ["clip", "clip-vv", "ours"])
    head = headline("seg", full, params.evaluate.seg)
    assert head == {d: {m: v["all"][protocol] for m, v in r["methods"].items()} for d, r in full.items()}


def test_full_run_headline_fits_forty_values_and_details_keep_per_class(tmp_path):
    params = _params(tmp_path)
    methods = ["clip", "clip-vproj", "clip-surgery", "clip-vv", "ours", "clip-surgery+ours"]
    fulls = {
        "train": {"val_map": 80.1, "mfi": {"before": 0.7, "after": 0.2, "reduction_pct": 71.0},
                  "loss": {"asl": 1.0}, "seconds_per_epoch": 3.0},
        "mlr": {m: {"map": 60.0, "per_class_ap": dict.fromkeys(CLASSES, 0.6)} for m in ("clip", "ours")},
        "mfi": {s: {"before": 0.7, "after": 0.1, "reduction_pct": 85.0, "num_classes": 20,
                    "figure": "x.png"} for s in ("voc", "coco", "context59", "context_unseen")},
        "seg": _seg_full(["voc2012", "coco2017", "context59"], methods),
        "zs-mlr": {"map": {"clip": 78.0, "regions": 70.0, "combined": 80.0},
                   "per_class_ap": {"clip": dict.fromkeys(CLASSES, 0.7)}, "num_images": 9},
    }
    total = sum(count_values(write_results(params, what, full)) for what, full in fulls.items())
    assert total <= 40
    metrics = [json.loads(p.read_text()) for p in (tmp_path / "results" / "metrics").glob("*.json")]
    assert "per_class" not in json.dumps(metrics)
    details = json.loads((tmp_path / "results" / "details" / "mlr.json").read_text())
    assert details["ours"]["per_class_ap"] == dict.fromkeys(CLASSES, 0.6)
    assert details["run"] == run_identity(params)


def test_report_marks_inputs_from_another_run_and_never_refuses(tmp_path, monkeypatch):
    from stages import report

    monkeypatch.chdir(tmp_path)
    ours = _params(tmp_path, "data.dataset=coco2014")
    other = _params(tmp_path, "data.dataset=coco2014", "train.lr=0.5")
    assert run_identity(ours)["digest"] != run_identity(other)["digest"]
    write_results(ours, "train", {"val_map": 85.0, "mfi": {"after": 0.1, "reduction_pct": 80.0}})
    write_results(ours, "mlr", {"ours": {"map": 84.0}, "clip": {"map": 60.0}}, table="## MLR\n\nt")
    stamp(other, tmp_path / "results" / "ablation")
    (tmp_path / "results" / "ablation" / "ablation.md").write_text("| grid |")

    text = Path(report.run(ours)["report"]).read_text()
    top = text.split("## Paper vs this run")[0]
    assert "inputs from another run" in top and "ablation/ comes from run" in top
    assert "details/mlr.json" not in top  # same run as the projectors: not flagged
    assert "| Table 1: MLR mAP, COCO-2014 (DualCoOp 83.6, DualCoOp++ 85.1) | 85.3 | 84.00 |" in text
    assert text.count("## MLR") == 1  # the stage's own heading, not doubled
    assert "RANDOM" not in text  # default weights are pretrained

    random_run = _params(tmp_path, "backbone.pretrained=null")
    text = Path(report.run(random_run)["report"]).read_text()
    assert "WARNING: this run used a RANDOM backbone" in text
    assert "trained with other params than params.yaml now" in text


def test_demo_summary_quotes_the_headline_numbers(tmp_path):
    from stages.demo import summary_table

    params = _params(tmp_path)
    write_results(params, "mlr", {"clip": {"map": 25.86}, "ours": {"map": 98.61}})
    write_results(params, "mfi", {"coco": {"before": 0.9291, "after": 0.5237, "reduction_pct": 43.6}})
    text = summary_table(tmp_path / "results", {"data": 1.0, "train": 2.25}, _params(tmp_path))
    assert "| MLR val mAP | 25.9 | 98.6 |" in text
    assert "| MFI figure of merit, coco classes | 0.929 | 0.524 |" in text
    assert "| seconds | 1 | 2 | 3 |" in text


@pytest.mark.parametrize("recipe, other", [("authors", "paper"), ("paper", "authors")])
def test_every_result_names_its_recipe_and_what_differs_from_the_other(tmp_path, recipe, other):
    from pipeline.config.params import load_recipe
    from pipeline.results.report import recipe_lines

    params = _params(tmp_path, f"recipe={recipe}", "train.alpha=0.5")
    write_results(params, "mlr", {"ours": {"map": 50.0}}, {"ours": 50.0}, "## mlr")
    summary = json.loads((tmp_path / "results" / "recipe.json").read_text())
    mine, theirs = load_recipe(recipe), load_recipe(other)
    assert summary["recipe"] == recipe
    # every recipe key the two recipes set differently (alpha is overridden, so its own row says 0.5)
    expected = {k for k in mine if mine[k] != theirs[k]}
    assert set(summary[f"differs_from_{other}"]) == expected
    assert summary[f"differs_from_{other}"]["train.alpha"] == {recipe: 0.5, other: theirs["train.alpha"]}
    assert summary["overridden"] == {"train.alpha": {"value": 0.5, "recipe": mine["train.alpha"]}}
    text = "\n".join(recipe_lines(tmp_path / "results"))
    assert f"Recipe **{recipe}**" in text and "`train.mfi.form`" in text
    # the recipe's own value under its name, this run's beside it, and what set it
    assert (f"| `train.alpha` | {mine['train.alpha']} | {theirs['train.alpha']} | 0.5 | "
            "params.yaml / --set |") in text
    form = f"| `train.mfi.form` | {mine['train.mfi.form']} | {theirs['train.mfi.form']} | " \
        f"{mine['train.mfi.form']} | recipe |"
    assert form in text


def test_recipe_table_tells_a_profiles_value_from_an_override(tmp_path):
    """The smoke profile sets a recipe key (train.alpha): the table names the profile for it, and
    params.yaml / --set for a value no profile gives; the recipe column keeps the recipe's value."""
    from pipeline.config.params import load_profile, load_recipe
    from pipeline.results.report import recipe_lines

    params = load_params(ROOT / DEFAULT_PARAMS, [f"paths.results={tmp_path / 'results'}", "recipe=authors",
                                                 "train.mfi.lambda=0.5"], profile="smoke")
    write_results(params, "mlr", {"ours": {"map": 50.0}}, {"ours": 50.0}, "## mlr")
    mine, smoke = load_recipe("authors"), load_profile("smoke")["train"]
    assert mine["train.alpha"] != smoke["alpha"]  # else the profile would not override the recipe
    text = "\n".join(recipe_lines(tmp_path / "results"))
    alpha = text.split("| `train.alpha` |")[1].splitlines()[0]
    assert alpha.startswith(f" {mine['train.alpha']} |") and alpha.endswith(f"| {smoke['alpha']} | profile smoke |")
    lam = text.split("| `train.mfi.lambda` |")[1].splitlines()[0]
    assert lam.startswith(f" {mine['train.mfi.lambda']} |") and lam.endswith("| 0.5 | params.yaml / --set |")


def test_report_names_the_last_and_best_projectors_and_which_one_evaluations_use(tmp_path):
    from stages import report

    params = _params(tmp_path, f"paths.cache={tmp_path / 'cache'}")
    write_results(params, "train", {
        "last": {"epoch": 50, "val_map": 84.52, "projectors": "cache/models/projectors.pt"},
        "best": {"epoch": 37, "val_map": 85.09, "projectors": "cache/models/projectors-best.pt"}})
    text = Path(report.run(params)["report"]).read_text()
    assert "| last | `cache/models/projectors.pt` | 50 | 84.52 | no |" in text
    assert "| best | `cache/models/projectors-best.pt` | 37 | 85.09 | yes |" in text  # authors: best
    assert "| Table 1: MLR mAP, COCO-2014 (DualCoOp 83.6, DualCoOp++ 85.1) | 85.3 | - |" in text


def test_paper_table_names_the_seg_protocol_the_numbers_were_made_with(tmp_path):
    from pipeline.results.report import paper_table

    made = _params(tmp_path, "evaluate.seg.protocol=dataset", "evaluate.seg.background=softmax")
    full = {"protocol": "dataset", "background": "softmax",
            "datasets": _seg_full(["voc2012"], ["clip", "clip-vv", "clip-surgery", "ours"])}
    write_results(made, "seg", full)
    now = _params(tmp_path, "evaluate.seg.protocol=per-image-positive-pred", "evaluate.seg.background=none")
    text = paper_table(tmp_path / "results", now)[0]
    assert "(`dataset`, background `softmax`)" in text


def test_run_digest_ignores_only_where_and_how_fast_training_ran(tmp_path):
    """The speed keys the projectors' record skips (provenance.IGNORED_TRAIN_KEYS) do not make
    another run; a key that changes the weights does."""
    from pipeline.training.provenance import IGNORED_TRAIN_KEYS

    base = run_identity(_params(tmp_path))["digest"]
    faster = _params(tmp_path, "train.device=cpu", "train.cpu_threads=3", "train.read_threads=5",
                     "train.eval_every=7")
    assert set(IGNORED_TRAIN_KEYS) == {"device", "cpu_threads", "read_threads", "eval_every"}
    assert all(as_dict(faster.train)[k] != as_dict(_params(tmp_path).train)[k] for k in IGNORED_TRAIN_KEYS)
    assert run_identity(faster)["digest"] == base
    assert run_identity(_params(tmp_path, "train.lr=0.5"))["digest"] != base
