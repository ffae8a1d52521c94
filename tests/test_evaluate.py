"""The evaluation stage end to end on planted-signal data: a tiny random CLIP (BatchNorm
recalibrated), projectors trained in the fixture, a val feature cache, then every evaluation.

Numbers are not quality claims: they show that a head which learned the planted signal beats
the same CLIP without projectors through the stage's own code paths.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import paths
from pipeline.config.params import load_params
from pipeline.data.augment import eval_view
from pipeline.data.datasets import DatasetError, load_multilabel
from pipeline.data.synthetic import make_planted_coco
from pipeline.evaluation import sources as evaluation
from pipeline.evaluation.metrics import mean_average_precision
from pipeline.evaluation.segmentation import PROMPTS
from pipeline.extraction.expected import expected_fingerprint
from pipeline.model.backbone import load_backbone
from pipeline.model.heads import positive_scores
from pipeline.model.recalibrate import recalibrate_batchnorm
from pipeline.store.create import create_or_open
from pipeline.training import provenance
from pipeline.training.loop import (
    TrainingError,
    build_optimizer,
    new_head,
    save_projectors,
    train_step,
)
from stages import evaluate

REPO = Path(__file__).resolve().parents[1]
N_TRAIN, N_VAL, PIXELS, STEPS, LR = 48, 16, 96, 300, 3e-3
BEST_EPOCH, LAST_EPOCH = 7, 9


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """params pointing at a generated dataset, a saved backbone, trained projectors and a val cache."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 threads on 2 shared cores measured ~30x slower for the tiny head
    base = tmp_path_factory.mktemp("evaluate")
    params = load_params(REPO / "configs" / "params.yaml", profile="smoke")
    params["paths"] = {"data": str(base / "data"), "cache": str(base / "cache"),
                       "results": str(base / "results")}
    params["backbone"].update(checkpoint=str(base / "backbone.pt"), device="cpu")
    size = params["evaluate"]["seg"]["image_size"]
    root = make_planted_coco(paths.dataset_root(params, "synthetic"), N_TRAIN, N_VAL, image_size=PIXELS)
    train, val = (load_multilabel("synthetic", root, s) for s in ("train", "val"))
    backbone = load_backbone("tiny-RN", pretrained=None)
    x_train = torch.stack([eval_view(train.image(i), size) for i in range(len(train))])  # (N, 3, S, S)
    x_val = torch.stack([eval_view(val.image(i), size) for i in range(len(val))])
    recalibrate_batchnorm(backbone, [x_train])  # random-init backbone only (TESTING trap 1)
    torch.save(backbone.model.state_dict(), params["backbone"]["checkpoint"])
    text = backbone.class_text_features(train.classnames)  # {positive, negative, plain}: (C, D)
    tokens = backbone.spatial_tokens(x_train)  # (N, T, D)
    # Train-mode text BatchNorm and the paper's ASL weight: the authors' eval-mode BatchNorm at its
    # initial statistics and 0.05 x ASL reach only ~38 mAP here in 300 steps (67 this way).
    params["model"]["text_bn"] = "train"
    params["train"]["text_input"] = "normalised"  # what the head below is trained on
    head = new_head(params, backbone.embed_dim, torch.device("cpu"))
    optimizer = build_optimizer(head.parameters(), {**params["train"], "lr": LR})
    labels = torch.from_numpy(train.labels).long()
    cfg = {**params["train"], "asl_weight": 1.0}
    for step in range(STEPS):
        train_step(head, optimizer, tokens, labels, text, cfg, step=step)
    val_tokens = backbone.spatial_tokens(x_val)  # (N, T, D)
    expected = expected_fingerprint(params, "val")  # what the readers check, as the CLI records it
    cache = create_or_open(
        paths.feature_store(params, "val"), ids=[r.image_id for r in val.records], labels=val.labels,
        classnames=val.classnames, views=1, num_tokens=val_tokens.shape[1], dim=backbone.embed_dim,
        fingerprint={"test": "evaluate", **expected.fingerprint()}, shard_size=N_VAL, dtype="float32",
        annotation_files=expected.annotation_files())
    cache.write_shard(0, val_tokens[:, None].numpy(), np.zeros(N_VAL, np.int8))
    raw = backbone.class_text_features(val.classnames, normalise=False)
    cache.write_text_features({**{k: v.numpy() for k, v in text.items()},
                               **{f"raw_{k}": v.numpy() for k, v in raw.items()}})
    meta = {"model": params["model"], "embed_dim": backbone.embed_dim, "classnames": train.classnames,
            "fingerprint": {"test": "evaluate"},
            "provenance": provenance.record(params, None, cache, provenance.declared_digest(params["backbone"]))}
    params["evaluate"]["text_bn"] = {"mlr": "running", "mfi": "running", "seg": "running"}  # as trained
    params["evaluate"]["projectors"] = "best"
    save_projectors(paths.projectors(params, "best"), head, {**meta, "epoch": BEST_EPOCH})
    last = new_head(params, backbone.embed_dim, torch.device("cpu"))  # a different head as "last"
    last.load_state_dict(head.state_dict())
    with torch.no_grad():
        last.text_projector.net[0].weight.mul_(-1.0)
    save_projectors(paths.projectors(params, "last"), last, {**meta, "epoch": LAST_EPOCH})
    # The ablation's alpha = 0 point for the MFI control row (params equal but alpha and lambda).
    point = copy.deepcopy(params)
    point["train"]["alpha"], point["train"]["mfi"]["lambda"] = 0.0, 0.123
    control = new_head(params, backbone.embed_dim, torch.device("cpu"))
    with torch.no_grad():
        control.text_projector.net[0].weight.add_(0.5 * torch.randn(control.text_projector.net[0].weight.shape))
    save_projectors(paths.results_dir(params, "ablation", "points", "lambda0.123-alpha0", "projectors.pt"),
                    control, {**meta, "epoch": 3, "params": point})
    metrics = evaluate.run(params, what="all")
    yield {"params": params, "metrics": metrics, "backbone": backbone, "head": head.eval(),
           "last": last.eval(), "control": control.eval(), "val_tokens": val_tokens, "text": text, "val": val,
           "train_tokens": tokens, "train": train}
    torch.set_num_threads(threads)


def _written(params: dict, what: str) -> tuple[dict, str]:
    metrics = json.loads(paths.results_dir(params, "details", f"{what}.json").read_text())
    return metrics, paths.results_dir(params, "tables", f"{what}.md").read_text()


def test_mlr_projectors_beat_zero_shot_clip_and_match_a_direct_forward(world):
    metrics, table = _written(world["params"], "mlr")
    text = world["text"]
    with torch.no_grad():  # independent of the TokenLoader / scoring path
        logits = world["head"](world["val_tokens"], text["negative"], text["positive"]).logits
    direct = mean_average_precision(positive_scores(logits), world["val"].labels)
    assert metrics["ours"]["map"] > metrics["clip"]["map"] + 10.0
    assert metrics["ours"]["map"] == pytest.approx(direct, abs=1e-6)
    assert "| CLIP |" in table and "| ours (Unmix-CLIP) |" in table
    assert set(metrics["per_class"]) == {"clip", "ours"}


def _mean_offdiagonal(features: torch.Tensor) -> float:
    f = features.double().numpy()
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    sim = f @ f.T  # (C, C)
    return (sim.sum() - np.trace(sim)) / (len(f) * (len(f) - 1))


def test_mfi_has_four_rows_per_class_set_matching_independent_cosines(world):
    metrics, table = _written(world["params"], "mfi")
    params = world["params"]
    assert set(metrics["class_sets"]) == set(params["evaluate"]["mfi"]["class_sets"])
    assert metrics["control"]["source"] == "ablation" and metrics["control"]["epoch"] == 3
    assert "lambda0.123-alpha0" in metrics["control"]["path"] and "from the ablation point" in table
    names = world["val"].classnames
    template = PROMPTS[params["evaluate"]["prompt"]]
    raw = world["backbone"].text_features([template.format(c) for c in names])  # (C, D)
    untrained = new_head(params, world["backbone"].embed_dim, torch.device("cpu")).eval()
    with torch.no_grad():  # running statistics, as the fixture's evaluate.text_bn.mfi says
        expected = {"clip": raw, "untrained": untrained.project_text(raw, stats="running"),
                    "alpha0": world["control"].project_text(raw, stats="running"),
                    "trained": world["head"].project_text(raw, stats="running")}
    m = metrics["class_sets"]["synthetic"]
    assert list(m["rows"]) == ["clip", "untrained", "alpha0", "trained"]
    for row, features in expected.items():
        assert m["rows"][row] == pytest.approx(_mean_offdiagonal(features), abs=1e-6)
    assert len({round(v, 6) for v in m["rows"].values()}) == 4
    assert m["reduction_pct"]["trained"] == pytest.approx(100 * (m["before"] - m["after"]) / m["before"])
    for name, m in metrics["class_sets"].items():
        with Image.open(m["figure"]) as png:
            assert png.format == "PNG" and png.width > 200 and png.height > 100
        for label in ("CLIP (no projector)", "untrained projector",
                      "projector trained with alpha = 0 (no MFI loss)", "trained projector (ours)"):
            assert sum(line.startswith(f"| {name} |") and f"| {label} |" in line
                       for line in table.splitlines()) == 1
    assert f"Projectors: best ({paths.projectors(params, 'best')}, epoch {BEST_EPOCH}); recipe: authors" in table


def test_mfi_without_control_says_so(world):
    params = copy.deepcopy(world["params"])
    params["evaluate"]["mfi"]["control"] = "none"
    params["evaluate"]["mfi"]["class_sets"] = ["synthetic"]
    metrics = evaluate.run(params, what="mfi")["mfi"]
    assert list(metrics["class_sets"]["synthetic"]["rows"]) == ["clip", "untrained", "trained"]
    assert metrics["control"] == {"source": "none"}
    params["evaluate"]["mfi"]["control"] = "ablation"
    params["paths"]["results"] = str(Path(params["paths"]["results"]) / "elsewhere")  # no ablation points
    with pytest.raises(TrainingError, match="evaluate.mfi.control"):
        evaluate.run(params, what="mfi")


def test_mfi_loads_the_evaluated_projectors_once(world, monkeypatch):
    params = copy.deepcopy(world["params"])
    params["evaluate"]["mfi"] = {"class_sets": ["synthetic"], "control": "none"}
    loaded, load = [], evaluation.load_projectors
    monkeypatch.setattr(evaluation, "load_projectors", lambda path, device: loaded.append(path) or load(path, device))
    evaluate.run(params, what="mfi")
    assert loaded == [paths.projectors(params, params["evaluate"]["projectors"])]


def test_best_and_last_projectors_both_evaluate_and_results_name_which(world):
    params = copy.deepcopy(world["params"])
    params["evaluate"]["mfi"] = {"class_sets": ["synthetic"], "control": "none"}
    names = world["val"].classnames
    raw = world["backbone"].text_features([PROMPTS[params["evaluate"]["prompt"]].format(c) for c in names])
    for which, head, epoch in (("best", world["head"], BEST_EPOCH), ("last", world["last"], LAST_EPOCH)):
        params["evaluate"]["projectors"] = which
        evaluate.run(params, what="mfi")
        metrics, table = _written(params, "mfi")
        assert metrics["source"]["projectors"] == {"which": which, "epoch": epoch,
                                                   "path": str(paths.projectors(params, which))}
        assert metrics["source"]["recipe"] == "authors"
        assert f"Projectors: {which} ({paths.projectors(params, which)}, epoch {epoch})" in table
        with torch.no_grad():
            after = _mean_offdiagonal(head.project_text(raw, stats="running"))
        assert metrics["class_sets"]["synthetic"]["after"] == pytest.approx(after, abs=1e-6)


def test_seg_ours_beats_no_projector_baselines_on_object_pixels(world):
    metrics, table = _written(world["params"], "seg")
    result = metrics["datasets"]["synthetic"]["methods"]
    assert set(result) == set(world["params"]["evaluate"]["seg"]["methods"])
    # The projectors on the same v-v tokens beat those tokens without them. (A quality claim on a
    # tiny random backbone whose head learned colour on the v-proj tokens: nothing more is claimed.)
    for protocol in ("dataset", "per-image-positive-only"):
        assert result["ours"]["no_bkgd"][protocol] > result["clip-vv"]["no_bkgd"][protocol] + 1.0, protocol
    for protocol in ("per-image-positive-pred", "per-image-predicted"):
        assert all(0.0 <= result[m]["bkgd"][protocol] <= 100.0 for m in result)
    synthetic = metrics["datasets"]["synthetic"]
    assert synthetic["num_images"] == N_VAL and synthetic["seconds_per_image"] > 0
    headline = metrics["protocol"]
    assert headline == "per-image-positive-pred" and metrics["background"] == "none"
    assert synthetic["headline"]["ours"]["bkgd"] == result["ours"]["bkgd"][headline]
    assert set(metrics["per_class"]["iou_dataset"]["synthetic"]["ours"]) == {"bkgd", "no_bkgd"}
    for row in ("| CLIP (q-k) |", "| CLIP v-proj (DualCoOp tokens) |", "| CLIP Surgery |", "| CLIP-VV |",
                "| ours (Unmix-CLIP) |", "| CLIP Surgery + ours |", "protocol `dataset`",
                "protocol `per-image-positive-pred` (headline)", "protocol `per-image-positive-only`",
                "protocol `per-image-predicted`", "synthetic (bkgd)", "synthetic (no bkgd)", "Projectors: best"):
        assert row in table
    assert table.index("(headline)") < table.index("protocol `dataset`")


def test_zs_mlr_reports_clip_regions_and_combination(world):
    metrics, table = _written(world["params"], "zs-mlr")
    assert set(metrics["map"]) == {"clip", "regions", "combined"} and "Projectors: best" in table
    assert all(0.0 < v <= 100.0 for v in metrics["map"].values())
    assert metrics["num_images"] == N_VAL and "CLIP (global)" in table


def test_zs_mlr_raw_text_input_encodes_the_prompts_once_and_clip_keeps_normalised_features(world, monkeypatch):
    """text_input raw: one text encoding; CLIP's own (global) scores are those of normalised input."""
    from pipeline.evaluation.zsmlr import zero_shot_mlr
    backbone, dataset = world["backbone"], world["val"]
    kw = {"image_size": world["params"]["evaluate"]["seg"]["image_size"], "limit": 4, "progress": False}
    normalised = zero_shot_mlr(backbone, world["head"], dataset, **kw)
    encoded, encode = [], backbone.text_features
    monkeypatch.setattr(backbone, "text_features",
                        lambda prompts, **k: encoded.append(k.get("normalise", True)) or encode(prompts, **k))
    raw = zero_shot_mlr(backbone, world["head"], dataset, text_input="raw", **kw)
    assert encoded == [False]
    np.testing.assert_array_equal(raw["scores"]["clip"], normalised["scores"]["clip"])


@pytest.mark.parametrize("name, hint", [("voc2012", "pipeline download --dataset voc2012"),
                                        ("context59", "cannot be downloaded automatically")])
def test_missing_dataset_root_names_the_path_and_how_to_get_it(world, name, hint):
    params = copy.deepcopy(world["params"])
    params["evaluate"]["seg"]["datasets"] = [name]
    with pytest.raises(DatasetError) as err:
        evaluate.run(params, what="seg")
    assert str(paths.dataset_root(params, name)) in str(err.value) and hint in str(err.value)


def test_mfi_control_match_ignores_only_how_a_run_ran_and_its_mfi_settings(world):
    """A saved alpha = 0 control serves params that differ in speed settings (threads, device,
    validation cadence) or in alpha / MFI / epochs, and no others."""
    from stages.evaluate_mfi import _comparable
    base = copy.deepcopy(world["params"])
    for key, value in (("read_threads", 7), ("cpu_threads", 3), ("device", "cuda"), ("eval_every", 5),
                       ("alpha", 0.5), ("epochs", 99)):
        other = copy.deepcopy(base)
        other["train"][key] = value
        assert _comparable(other) == _comparable(base), key
    for key, value in (("lr", 0.123), ("seed", 11), ("batch_size", 3)):
        other = copy.deepcopy(base)
        other["train"][key] = value
        assert _comparable(other) != _comparable(base), key


def test_mfi_control_refuses_points_when_the_train_store_is_unrecorded_and_names_a_damaged_one(world, tmp_path):
    """None == None is no evidence of one train store: an unrecorded run takes no ablation point."""
    from stages.evaluate_mfi import ablation_control
    params = copy.deepcopy(world["params"])
    params["paths"]["results"] = str(tmp_path / "results")
    point = copy.deepcopy(params)
    point["train"]["alpha"] = 0.0
    meta = {"model": params["model"], "embed_dim": world["backbone"].embed_dim, "epoch": 1, "params": point}
    path = paths.results_dir(params, "ablation", "points", "alpha0", "projectors.pt")
    save_projectors(path, world["control"], meta)  # no fingerprint recorded
    assert ablation_control(params, None) is None
    save_projectors(path, world["control"], {**meta, "fingerprint": {"test": "evaluate"}})
    found, blob = ablation_control(params, {"test": "evaluate"})
    assert found == path and blob["meta"]["epoch"] == 1
    assert torch.equal(blob["head"]["text_projector.net.0.weight"], world["control"].text_projector.net[0].weight)
    path.write_bytes(path.read_bytes()[:100])  # truncated
    with pytest.raises(TrainingError, match=str(path)):
        ablation_control(params, {"test": "evaluate"})


@pytest.mark.slow
def test_mfi_control_trained_by_the_training_stage_in_its_own_folder(world):
    """No matching ablation point: the alpha = 0 control is trained with stages.train.run into
    cache/controls/control-alpha0/, leaving the run's own projectors and results alone, and reused."""
    params = copy.deepcopy(world["params"])
    params["evaluate"]["mfi"] = {"class_sets": ["synthetic"], "control": "train"}
    params["ablate"]["epochs"] = 2
    train, tokens = world["train"], world["train_tokens"]
    expected = expected_fingerprint(params, "train")
    cache = create_or_open(
        paths.feature_store(params, "train"), ids=[r.image_id for r in train.records], labels=train.labels,
        classnames=train.classnames, views=1, num_tokens=tokens.shape[1], dim=tokens.shape[2],
        fingerprint={"test": "evaluate", **expected.fingerprint()}, shard_size=N_TRAIN, dtype="float32",
        annotation_files=expected.annotation_files())
    cache.write_shard(0, tokens[:, None].numpy(), np.zeros(N_TRAIN, np.int8))
    raw = world["backbone"].class_text_features(train.classnames, normalise=False)
    cache.write_text_features({**{k: v.numpy() for k, v in world["text"].items()},
                               **{f"raw_{k}": v.numpy() for k, v in raw.items()}})
    for which in ("best", "last"):  # the run's projectors now record the train store they came from
        blob = torch.load(paths.projectors(params, which), weights_only=True)
        blob["meta"]["provenance"]["train_store"] = {"fingerprint": cache.fingerprint, "layout": cache.layout}
        torch.save(blob, paths.projectors(params, which))
    own = {which: paths.projectors(params, which).stat().st_mtime_ns for which in ("best", "last")}
    metrics = evaluate.run(params, what="mfi")["mfi"]
    control = Path(metrics["control"]["path"])
    assert metrics["control"]["source"] == "train" and metrics["control"]["epoch"] == 2
    assert control.parent.parent == (Path(params["paths"]["cache"]) / "controls" / "control-alpha0").resolve()
    assert list(metrics["class_sets"]["synthetic"]["rows"]) == ["clip", "untrained", "alpha0", "trained"]
    assert {w: paths.projectors(params, w).stat().st_mtime_ns for w in own} == own
    assert not paths.results_dir(params, "metrics", "train.json").exists()
    blob = torch.load(control, weights_only=True)
    assert blob["meta"]["epoch"] == 2
    stamp = control.stat().st_mtime_ns
    evaluate.run(params, what="mfi")  # same params: the control is reused, not retrained
    assert control.stat().st_mtime_ns == stamp


def test_missing_seg_dataset_is_skipped_and_named_when_asked(world):
    params = copy.deepcopy(world["params"])
    params["evaluate"]["seg"]["datasets"] = ["context59", "synthetic"]
    params["evaluate"]["seg"]["methods"] = ["clip"]
    params["evaluate"]["missing"] = "skip"
    metrics = evaluate.run(params, what="seg")["seg"]
    assert metrics["skipped"] == ["context59"] and list(metrics["datasets"]) == ["synthetic"]
    assert "skipped (evaluate.missing skip): context59" in _written(params, "seg")[1]
    params["evaluate"]["seg"]["datasets"] = ["context59"]
    with pytest.raises(DatasetError, match="none of evaluate.seg.datasets"):
        evaluate.run(params, what="seg")
