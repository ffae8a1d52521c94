"""`pipeline ablate`: every grid point of the one-pass, stacked grid equals its solo training run."""
from __future__ import annotations

import copy
import csv
from collections.abc import Iterator
from pathlib import Path

import matplotlib.image
import pytest
import torch
from test_training import fresh, shared_world, single_threaded, weights

from pipeline.config import paths
from pipeline.config.params import load_params, updated
from pipeline.config.schema import Params, Train
from pipeline.model.heads import UnmixHead
from pipeline.store.cache import FeatureCache
from pipeline.training.ablation import point_params
from pipeline.training.loop import TrainingError, build_optimizer, load_projectors, train_step
from pipeline.training.stacked import PARTS, StackedTrainer
from stages import ablate, train

EPOCHS = 2


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Params]:
    with single_threaded():
        yield shared_world(tmp_path_factory)


def assert_grid_equals_solo(world: Params, tmp_path: Path, result: dict, solo_sets: dict | None = None
                            ) -> list[dict]:
    summaries = []
    for i, (row, head) in enumerate(zip(result["rows"], result["heads"])):
        solo = updated(fresh(world, tmp_path / f"solo{i}"), solo_sets or {})
        solo = point_params(solo, row["lambda"], row["alpha"], result["epochs"])
        summary = train.run(solo)
        grid_weights, solo_weights = head.state_dict(), weights(solo)
        for k in solo_weights:
            assert torch.allclose(grid_weights[k], solo_weights[k], rtol=1e-5, atol=1e-7), (i, k)
        assert row["val_map"] == pytest.approx(summary["val_map"], abs=1e-6)
        assert row["mfi_after"] == pytest.approx(summary["mfi"]["after"], abs=1e-6)
        summaries.append(summary)
    return summaries


def test_each_grid_point_equals_its_solo_run(world: Params, tmp_path: Path) -> None:
    """Authors recipe defaults (text_bn eval, authors-features MFI, raw text, 90% labels, per-epoch lr);
    alpha = 0 makes lambda irrelevant: those two points are trained once and reported for both."""
    lambdas, alphas = [0.2, 1.0], [0.0, 2.0]
    params = updated(fresh(world, tmp_path / "grid"), {"ablate": {
        "lambdas": lambdas, "alphas": alphas, "epochs": EPOCHS, "lambda1s": [], "lambda2s": []}})
    result = ablate.run(params)
    assert result["epochs"] == EPOCHS != params.train.epochs  # ablate.epochs overrides train.epochs
    rows = result["rows"]
    assert [(r["lambda"], r["alpha"]) for r in rows] == [(lam, a) for lam in lambdas for a in alphas]
    assert result["trained"] == 3  # (0.2, 0) and (1.0, 0) share one head
    assert [r["trained_as"] for r in rows] == ["", "", "lambda=0.2, alpha=0", ""]
    assert rows[2]["val_map"] == rows[0]["val_map"]
    assert_grid_equals_solo(world, tmp_path, result)
    # the points are different runs: alpha changes the weights, lambda too once alpha > 0
    w = [h.state_dict()["text_projector.net.0.weight"] for h in result["heads"]]
    assert not torch.allclose(w[0], w[1]) and not torch.allclose(w[1], w[3])

    out = Path(result["out"])
    with (out / "ablation.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [(float(r["lambda"]), float(r["alpha"])) for r in table] == [(r["lambda"], r["alpha"]) for r in rows]
    assert [float(r["val_map"]) for r in table] == pytest.approx([r["val_map"] for r in rows])
    md = (out / "ablation.md").read_text().splitlines()
    assert sum(line.startswith("| ") for line in md) == 1 + len(rows)  # header + one line per point
    png = matplotlib.image.imread(out / "ablation.png")
    assert png.ndim == 3 and png.shape[0] > 100 and png.std() > 0  # a drawn figure, not a blank

    # every point's projectors, with that point's params, loadable as a solo run's
    for row, head in zip(rows, result["heads"]):
        saved, meta = load_projectors(out / "points" / f"lambda{row['lambda']:g}_alpha{row['alpha']:g}"
                                      / "projectors.pt")
        assert (meta["train"]["mfi"]["lambda"], meta["train"]["alpha"]) == (row["lambda"], row["alpha"])
        assert meta["epoch"] == EPOCHS and meta["val_map"] == row["val_map"]
        assert meta["fingerprint"] == FeatureCache.open(paths.feature_store(params.paths, "train")).fingerprint
        for k, v in head.state_dict().items():
            assert torch.equal(saved.state_dict()[k], v), k


def test_paper_recipe_grid_equals_solo(world: Params, tmp_path: Path) -> None:
    """text_bn train (BatchNorm running statistics stacked and updated per head), paper MFI form,
    normalised text, all labels, per-step cosine after a warm-up epoch."""
    sets = {"model": {"text_bn": "train"},
            "train": {"text_input": "normalised", "label_fraction": 1.0, "lr_schedule": "step",
                      "asl_weight": 1.0, "warmup_epochs": 1,
                      "mfi": {"form": "paper", "lambda": 0.2}}}
    params = updated(fresh(world, tmp_path / "grid"), {**sets, "ablate": {
        "lambdas": [0.2, 1.0], "alphas": [0.5], "epochs": EPOCHS, "lambda1s": [], "lambda2s": []}})
    result = ablate.run(params)
    assert result["trained"] == 2
    assert_grid_equals_solo(world, tmp_path, result, sets)
    bn = [h.state_dict()["text_projector.net.1.running_mean"] for h in result["heads"]]
    assert not torch.allclose(bn[0], bn[1])  # each head kept its own running statistics


def with_point(train: Train, alpha: float, lam: float) -> Train:
    """`train` with this grid point's alpha and MFI lambda."""
    return train.model_copy(update={"alpha": alpha, "mfi": train.mfi.model_copy(update={"lambda_": lam})})


def stacked_grid(alphas: list[float], lams: list[float], text_bn: str = "train",
                 batched: bool | None = None) -> tuple:
    cfg = updated(load_params(profile="smoke"), {"train": {
        "objective": "unmix", "optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0,
        "asl": {"gamma_neg": 2.0, "gamma_pos": 1.0, "clip": 0.05, "eps": 1e-6}, "asl_weight": 1.0,
        "mfi": {"form": "authors-features", "lambda": 0.0}}}).train
    cfgs = [with_point(cfg, a, lam) for a, lam in zip(alphas, lams)]
    torch.manual_seed(0)
    heads = [UnmixHead(16, text_bn=text_bn) for _ in cfgs]
    labels = [f"lambda={lam:g}, alpha={a:g}" for a, lam in zip(alphas, lams)]
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randn(4, 5, 16, generator=gen)  # (B, T, D)
    text = {"negative": torch.randn(3, 16, generator=gen), "positive": torch.randn(3, 16, generator=gen)}
    targets = (torch.rand(4, 3, generator=gen) < 0.5).long()  # (B, C)
    return StackedTrainer(heads, cfgs, labels, batched=batched), tokens, targets, text


@pytest.mark.parametrize("batched", [True, False], ids=["vmap", "sliced"])
def test_stacked_step_equals_train_step_per_head(batched: bool) -> None:
    """Both forwards of the stack (vmap: GPU / several threads; slices: one CPU thread) follow
    training.train_step head by head, BatchNorm running statistics (text_bn train) included."""
    alphas, lams = [0.0, 0.5, 2.0], [0.2, 0.2, 1.0]
    trainer, tokens, labels, text = stacked_grid(alphas, lams, batched=batched)
    solos = [copy.deepcopy(h) for h in trainer.heads]  # the initial heads, before any step
    cfgs = [with_point(trainer.cfg, a, lam) for a, lam in zip(alphas, lams)]
    optimizers = [build_optimizer(h.parameters(), c) for h, c in zip(solos, cfgs)]
    for step in range(4):
        parts = trainer.step(tokens, labels, text, 1e-3, epoch=1, step=step + 1)
        for h, (solo, opt, cfg) in enumerate(zip(solos, optimizers, cfgs)):
            values = train_step(solo, opt, tokens, labels, text, cfg)
            assert parts[h].tolist() == pytest.approx([values[n] for n in PARTS], rel=1e-5)
    for solo, head in zip(solos, trainer.unstacked()):
        for k, v in solo.state_dict().items():
            assert torch.allclose(head.state_dict()[k], v, rtol=1e-5, atol=1e-7), k


@pytest.mark.parametrize("batched", [True, False], ids=["vmap", "sliced"])
def test_nonfinite_loss_names_the_grid_point_and_updates_nothing(batched: bool) -> None:
    trainer, tokens, labels, text = stacked_grid([0.5, 0.5], [0.2, 1e38], batched=batched)  # lambda*off = inf
    before = {k: v.clone() for k, v in trainer.params.items()}
    with pytest.raises(TrainingError, match=r"epoch 3 step 7 for grid point lambda=1e\+38, alpha=0.5"):
        trainer.step(tokens, labels, text, 1e-3, epoch=3, step=7)
    for k, v in trainer.params.items():  # (BatchNorm running statistics follow the forward, as solo)
        assert torch.equal(v, before[k]), k  # neither the bad head nor the good one moved
    assert not trainer.optimizer.state  # no optimiser step either


@pytest.mark.parametrize("batched", [True, False], ids=["vmap", "sliced"])
def test_one_host_sync_per_step_for_the_whole_grid(monkeypatch: pytest.MonkeyPatch, batched: bool) -> None:
    trainer, tokens, labels, text = stacked_grid([0.0, 0.5, 0.5, 2.0], [0.2, 0.2, 1.0, 1.0],
                                                 batched=batched)
    calls = []
    for name in ("item", "cpu", "tolist", "numpy", "__float__", "__int__", "__bool__"):
        original = getattr(torch.Tensor, name)

        def counted(self: torch.Tensor, *args: object, _name: str = name, _f: object = original,
                    **kwargs: object) -> object:
            if not any(self is s["step"] for s in trainer.optimizer.state.values()):
                calls.append(_name)  # Adam's step counters are host tensors even on CUDA: no sync
            return _f(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    sums = torch.zeros(4, 3)
    for step in range(5):
        sums += trainer.step(tokens, labels, text, 1e-3, epoch=1, step=step + 1)
    monkeypatch.undo()
    assert calls == ["item"] * 5, calls


def test_cli_grid_overrides_params_grid(world: Params, tmp_path: Path) -> None:
    params = updated(fresh(world, tmp_path), {"ablate": {
        "lambdas": [0.2], "alphas": [0.05], "epochs": 1, "lambda1s": [], "lambda2s": []}})
    rows = ablate.run(params, lambdas=[0.0, 0.5], alphas=[0.1])["rows"]
    assert [(r["lambda"], r["alpha"]) for r in rows] == [(0.0, 0.1), (0.5, 0.1)]
