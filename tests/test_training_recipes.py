"""Training semantics the recipes name (docs/METHOD.md "Training as released"): the text
BatchNorm's mode, raw text into the projector, partial labels, Dassl's per-epoch schedule, best/last projectors,
validation every N epochs and the CPU thread count. The planted-signal world of
tests/test_training.py is shared (its caches are built once per session).
"""
from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from test_training import fresh, shared_world, single_threaded

from pipeline.config import paths
from pipeline.config.params import as_dict, load_params, updated
from pipeline.config.schema import Params
from pipeline.model.heads import TextProjector
from pipeline.store.cache import FeatureCache
from pipeline.training.loop import (
    TrainingError,
    build_optimizer,
    label_mask_identity,
    load_projectors,
    lr_at,
    new_head,
    partial_labels,
    save_checkpoint,
    torch_threads,
    train_step,
)
from stages import train


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Params]:
    with single_threaded():
        yield shared_world(tmp_path_factory)


# -- schedule ------------------------------------------------------------------------------------
class _DasslConstantWarmup(torch.optim.lr_scheduler.LRScheduler):
    """Dassl's ConstantWarmupScheduler (dassl/optim/lr_scheduler.py), rewritten here: the wrapper
    steps itself during the warm-up, then only steps its successor."""

    def __init__(self, optimizer, successor, warmup_epoch: int, cons_lr: float) -> None:
        self.successor, self.warmup_epoch, self.cons_lr = successor, warmup_epoch, cons_lr
        super().__init__(optimizer)

    def step(self, epoch=None) -> None:
        if self.last_epoch >= self.warmup_epoch:
            self.successor.step(epoch)
            self._last_lr = self.successor.get_last_lr()
        else:
            super().step(epoch)

    def get_lr(self) -> list[float]:
        if self.last_epoch >= self.warmup_epoch:
            return self.successor.get_last_lr()
        return [self.cons_lr for _ in self.base_lrs]


@pytest.mark.parametrize("warmup", [0, 1, 2])
def test_epoch_schedule_equals_dassls_per_epoch_cosine_with_constant_warmup(warmup: int) -> None:
    cfg = updated(load_params(), {"train.warmup_epochs": warmup, "train.warmup_lr": 1e-5, "train.epochs": 7,
                                  "train.lr": 0.002, "train.lr_schedule": "epoch"}).train
    p = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([p], lr=cfg.lr)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=float(cfg.epochs))
    with warnings.catch_warnings():  # torch warns about step() order on the wrapper's first step
        warnings.simplefilter("ignore", UserWarning)
        scheduler = _DasslConstantWarmup(optimizer, cosine, warmup, cfg.warmup_lr) if warmup else cosine
        steps = 4
        for epoch in range(cfg.epochs):
            expected = optimizer.param_groups[0]["lr"]
            for step in range(steps):  # constant within the epoch
                assert lr_at(epoch + step / steps, cfg) == pytest.approx(expected, rel=1e-12, abs=1e-15)
            optimizer.step()
            scheduler.step()
    step_cfg = cfg.model_copy(update={"lr_schedule": "step"})  # the same curve, evaluated every step
    assert lr_at(warmup + 0.5, step_cfg) < lr_at(warmup + 0.5, cfg) == lr_at(warmup, step_cfg)


# -- text projector BatchNorm ----------------------------------------------------------------------
def _one_step(text_bn: str) -> tuple[dict, dict, torch.nn.Module]:
    params = load_params(profile="smoke", overrides=[f"model.text_bn={text_bn}"])
    g = torch.Generator().manual_seed(4)
    dim, classes = 32, 6
    text = {"negative": 3 * torch.randn(classes, dim, generator=g) + 1.0,
            "positive": 3 * torch.randn(classes, dim, generator=g) + 1.0}  # raw-like scale and offset
    tokens, labels = torch.randn(8, 5, dim, generator=g), (torch.rand(8, classes, generator=g) < 0.4).to(torch.int8)
    head = new_head(params, dim, torch.device("cpu"))
    bn = head.text_projector.net[1]
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    optimizer = build_optimizer(head.parameters(), params.train)
    train_step(head, optimizer, tokens, labels, text, params.train)
    return before, {"state": bn.state_dict(), "grad": (bn.weight.grad, bn.bias.grad)}, bn


def test_eval_mode_text_batchnorm_keeps_initial_statistics_and_learns_its_affine() -> None:
    before, after, bn = _one_step("eval")
    assert torch.equal(after["state"]["running_mean"], before["running_mean"])  # zeros
    assert torch.equal(after["state"]["running_var"], before["running_var"])  # ones
    assert int(after["state"]["num_batches_tracked"]) == 0
    for grad in after["grad"]:
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert not torch.equal(bn.weight.detach(), torch.ones_like(bn.weight))  # the step moved it

    before, after, _ = _one_step("train")
    assert not torch.allclose(after["state"]["running_mean"], before["running_mean"])
    assert not torch.allclose(after["state"]["running_var"], before["running_var"])
    assert int(after["state"]["num_batches_tracked"]) == 1


def test_raw_text_reaches_the_projector_when_text_input_is_raw(world: Params, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[torch.Tensor] = []
    real = TextProjector.forward

    def recording(self, text, stats=None):
        seen.append(text.detach().clone())
        return real(self, text, stats)

    monkeypatch.setattr(TextProjector, "forward", recording)
    cache = FeatureCache.open(paths.feature_store(world.paths, "train"))
    for text_input, prefix in (("raw", "raw_"), ("normalised", "")):
        seen.clear()
        train.run(fresh(world, tmp_path / text_input, epochs=1, text_input=text_input))
        expected = np.concatenate([cache.text_features(prefix + "negative"), cache.text_features(prefix + "positive")])
        np.testing.assert_array_equal(seen[0].numpy(), expected)  # the first training step's input
    raw_norms = np.linalg.norm(cache.text_features("raw_positive"), axis=1)
    assert not np.allclose(raw_norms, 1.0, atol=1e-3)  # raw really is another input than normalised


# -- partial labels ------------------------------------------------------------------------------
@pytest.mark.parametrize("fraction", [0.9, 0.5])
def test_partial_label_mask_keeps_each_label_with_its_probability(fraction: float) -> None:
    labels = (np.random.default_rng(0).random((4000, 20)) < 0.3).astype(np.int8)  # (N, C)
    masked = partial_labels(labels, fraction, seed=3)
    known = masked != -1
    n = labels.size
    assert abs(known.sum() - fraction * n) < 5 * math.sqrt(n * fraction * (1 - fraction))
    assert np.array_equal(masked[known], labels[known])  # kept labels are unchanged
    for value in (0, 1):  # positives and negatives are masked alike
        m = (labels == value).sum()
        assert abs(known[labels == value].sum() - fraction * m) < 5 * math.sqrt(m * fraction * (1 - fraction))
    assert np.array_equal(masked, partial_labels(labels, fraction, seed=3))  # a function of the seed
    assert not np.array_equal(masked, partial_labels(labels, fraction, seed=4))
    assert np.array_equal(partial_labels(labels, 1.0, seed=3), labels)


def test_partial_labels_are_the_same_every_epoch_and_refuse_another_mask_on_resume(world: Params,
                                                                                   tmp_path: Path) -> None:
    params = fresh(world, tmp_path, epochs=2, label_fraction=0.7)
    loader, _, _ = train.open_data(params, torch.device("cpu"))
    expected = partial_labels(loader.cache.labels, 0.7, params.train.seed)
    assert (expected == -1).any()
    for epoch in range(3):  # every epoch's batches carry the one mask drawn at the start
        for batch in loader.epoch(epoch):
            assert np.array_equal(batch.labels.numpy(), expected[batch.index])

    train.run(params)
    ckpt = paths.checkpoint(params.paths)
    state = torch.load(ckpt, weights_only=True)
    assert state["labels"] == label_mask_identity(loader.cache.labels, 0.7, params.train.seed)
    state["labels"] = {**state["labels"], "sha256": "0" * 64}  # as if trained on another mask
    save_checkpoint(ckpt, state)
    with pytest.raises(TrainingError, match="another partial-label mask"):
        train.run(updated(params, {"train.epochs": 3}), resume=True)
    other = updated(params, {"train.label_fraction": 0.8})
    with pytest.raises(TrainingError, match=r"other settings \(train.label_fraction\)"):
        train.run(other, resume=True)


# -- checkpoint selection and validation cadence -------------------------------------------------------
def test_best_and_last_projectors_follow_val_map_over_the_evaluated_epochs(world: Params, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    params = fresh(world, tmp_path, epochs=7, eval_every=2)
    scripted = iter([40.0, 70.0, 55.0, 60.0])  # the val mAP of the evaluated epochs 2, 4, 6, 7
    real_map = train.mean_average_precision  # still used for the label-frequency baseline (zeros)
    monkeypatch.setattr(train, "mean_average_precision",
                        lambda scores, labels: next(scripted) if scores.any() else real_map(scores, labels))
    heads: dict[int, dict] = {}
    real_save = train.save_checkpoint

    def recording_save(path, state):
        heads[state["epoch"]] = {k: v.clone() for k, v in state["head"].items()}
        real_save(path, state)

    monkeypatch.setattr(train, "save_checkpoint", recording_save)
    summary = train.run(params)

    assert summary["evaluated_epochs"] == [2, 4, 6, 7]  # every 2nd epoch and the last
    rows = summary["history"]
    assert [r["epoch"] for r in rows if not math.isnan(r["val_map"])] == [2, 4, 6, 7]
    assert summary["best"]["epoch"] == 4 and summary["best"]["val_map"] == 70.0
    assert summary["last"]["epoch"] == 7 and summary["last"]["val_map"] == 60.0
    for which, epoch in (("best", 4), ("last", 7)):
        head, meta = load_projectors(paths.projectors(params.paths, which))
        assert (meta["which"], meta["epoch"]) == (which, epoch)
        for k, v in head.state_dict().items():
            assert torch.equal(v, heads[epoch][k]), (which, k)
    assert paths.projectors(params.paths) == paths.projectors(params.paths, "last")  # the old signature
    metrics = json.loads((tmp_path / "results" / "details" / "train.json").read_text())
    assert (metrics["best"]["epoch"], metrics["last"]["epoch"]) == (4, 7)
    tsv = (tmp_path / "results" / "plots" / "train.tsv").read_text().splitlines()
    assert len(tsv) == 8 and tsv[1].split("\t")[5] == "nan"  # epoch 1: no validation


def test_cpu_threads_apply_to_the_head_step_and_are_restored(world: Params, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    with torch_threads(torch.device("cpu"), 3):
        assert torch.get_num_threads() == 3
    assert torch.get_num_threads() == before
    with torch_threads(torch.device("cpu"), "auto"):
        assert torch.get_num_threads() == before
    seen = []
    real_step = train.train_step

    def recording_step(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train, "train_step", recording_step)
    train.run(fresh(world, tmp_path, epochs=1, cpu_threads=2))
    assert set(seen) == {2} and torch.get_num_threads() == before


@pytest.mark.parametrize("change", ["evaluate.text_bn.mlr", "evaluate.text_input", "val store"])
def test_resume_is_refused_when_the_epochs_would_be_validated_differently(tmp_path: Path, change: str) -> None:
    """Best-epoch selection compares val mAPs across epochs: a resume that measures them another way
    (another val store, other BatchNorm statistics or text input) must not mix the two."""
    from types import SimpleNamespace

    from pipeline.training.checkpoints import TrainingError as CheckpointError
    from pipeline.training.checkpoints import (
        cache_identity,
        load_checkpoint,
        save_checkpoint,
        validation_identity,
    )

    params = load_params(profile="smoke")
    store = SimpleNamespace(fingerprint={"a": 1}, layout={"n": 4}, classnames=["x", "y"], path=tmp_path / "s")
    val = SimpleNamespace(fingerprint={"v": 1}, layout={"n": 2}, classnames=["x", "y"], path=tmp_path / "v")
    ckpt = tmp_path / "last.pt"
    save_checkpoint(ckpt, {"params": as_dict(params), "cache": cache_identity(store), "epoch": 1,
                           "validation": validation_identity(val, params.evaluate)})
    assert load_checkpoint(ckpt, store, params, validation=validation_identity(val, params.evaluate))
    later = params
    if change == "evaluate.text_bn.mlr":
        later = updated(params, {"evaluate.text_bn.mlr": "batch"})
    elif change == "evaluate.text_input":
        later = updated(params, {"evaluate.text_input": "raw"})
    else:
        val = SimpleNamespace(**{**vars(val), "fingerprint": {"v": 2}})
    with pytest.raises(CheckpointError, match="validated its epochs differently"):
        load_checkpoint(ckpt, store, later, validation=validation_identity(val, later.evaluate))


def test_resume_is_refused_when_train_epochs_is_below_the_checkpoints_epoch(tmp_path: Path) -> None:
    """Resuming a 3-epoch checkpoint with train.epochs 2 would train nothing and save projectors whose
    provenance says 2 epochs; the same or more epochs resume."""
    from types import SimpleNamespace

    from pipeline.training.checkpoints import TrainingError as CheckpointError
    from pipeline.training.checkpoints import cache_identity, load_checkpoint, save_checkpoint

    params = load_params(profile="smoke", overrides=["train.epochs=3"])
    store = SimpleNamespace(fingerprint={"a": 1}, layout={"n": 4}, classnames=["x", "y"], path=tmp_path / "s")
    ckpt = tmp_path / "last.pt"
    save_checkpoint(ckpt, {"params": as_dict(params), "cache": cache_identity(store), "epoch": 3})
    for epochs in (3, 4):
        assert load_checkpoint(ckpt, store, updated(params, {"train.epochs": epochs}))["epoch"] == 3
    shorter = updated(params, {"train.epochs": 2})
    with pytest.raises(CheckpointError, match=r"trained 3 epochs, more than train.epochs = 2: set "
                                              r"train.epochs to 3 or more") as err:
        load_checkpoint(ckpt, store, shorter)
    assert str(ckpt) in str(err.value) and "\n" not in str(err.value)
