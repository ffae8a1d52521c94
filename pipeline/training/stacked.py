"""Many heads trained as one: the grid points of an ablation in one forward, backward and update.

The heads' parameters and buffers are stacked along a new first dim H (torch.func.stack_module_state)
and one UnmixHead's own forward runs over them (torch.func.functional_call), so every point keeps the
exact semantics of `training.train_step` (text projector BatchNorm eval|train, with its running
statistics stacked and updated per head; MFI form; ASL). On a GPU or several CPU threads the forward
is vmapped (one set of batched kernels instead of H); on one CPU thread it runs head after head on
slices of the stack, where each head's intermediates stay in cache. The loss of head h depends on its own parameters only, so the gradient of the summed totals
is each head's own gradient, and SGD / Adam update elementwise: each head follows its solo run.

One host sync per step: every head's loss parts stay on the device (the caller accumulates them)
and a single `.item()` checks that all totals are finite before any update is applied.
InfoCLIP's terms (their own LPAM and token sampler per point) are not stacked: `LoopTrainer` runs
those grids head by head through `training.train_step`.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call, stack_module_state, vmap

from pipeline.config.schema import Train
from pipeline.model.heads import UnmixHead
from pipeline.model.objective import trainable_parameters, uses_mfi
from pipeline.training.loop import (
    TrainingError,
    _autocast,
    build_optimizer,
    make_scaler,
    objective_terms,
    set_lr,
    train_step,
)

PARTS = ("total", "asl", "mfi")  # columns of the (H, parts) tensor a step returns


def nonfinite_error(parts: Tensor, names: Sequence[str], labels: Sequence[str], epoch: int,
                    step: int) -> TrainingError:
    """The error for a step whose (H, parts) losses are not all finite, naming the grid points."""
    values = parts.detach().cpu()
    bad = [h for h in range(values.shape[0]) if not torch.isfinite(values[h]).all()]
    shown = "; ".join(f"{labels[h]}: " + ", ".join(f"{n}={float(v):.6g}" for n, v in zip(names, values[h]))
                      for h in bad)
    return TrainingError(f"non-finite loss at epoch {epoch} step {step} for grid point {shown}; "
                         "no update was applied")


class StackedTrainer:
    """H heads (same architecture, same train params but alpha / MFI lambda) as one stacked model.

    heads: the initial heads (copied into the stack); cfgs: each head's train section;
    labels: how errors name each head, e.g. "lambda=0.2, alpha=0.01".
    """

    parts = PARTS

    def __init__(self, heads: Sequence[UnmixHead], cfgs: Sequence[Train],
                 labels: Sequence[str], amp: torch.dtype | None = None, batched: bool | None = None) -> None:
        self.heads, self.cfg, self.labels, self.amp = list(heads), cfgs[0], list(labels), amp
        device = next(heads[0].parameters()).device
        # batched (vmap) forward: one kernel per op for all heads, what a GPU or several CPU threads
        # need; one thread on CPU runs the heads' forwards one after the other on slices of the
        # stack instead (each head's intermediates stay in cache: 1.3-1.5x faster measured at
        # RN-101 size), still one backward, one update and one sync for the grid.
        self.batched = device.type != "cpu" or torch.get_num_threads() > 1 if batched is None else batched
        self.params, self.buffers = stack_module_state(self.heads)  # {name: (H, ...)}
        self.base = copy.deepcopy(self.heads[0]).to("meta").train()  # the forward, no storage
        use = uses_mfi(self.cfg.objective)
        self.alpha = torch.tensor([float(c.alpha) if use else 0.0 for c in cfgs], device=device)
        self.lam = torch.tensor([float(c.mfi.lambda_) for c in cfgs], device=device)
        self.use_mfi = use
        self.optimizer = build_optimizer(list(self.params.values()), self.cfg)
        self.scaler = make_scaler(amp)

    def _loss(self, params: dict[str, Tensor], buffers: dict[str, Tensor], tokens: Tensor,
              labels: Tensor, neg: Tensor, pos: Tensor, alpha: Tensor, lam: Tensor) -> Tensor:
        """One head's (total, asl, mfi), as training.train_step computes them (objective_terms)."""
        with _autocast(tokens.device, self.amp):
            out = functional_call(self.base, (params, buffers), (tokens, neg, pos))
        return torch.stack(objective_terms(out, labels, self.cfg, alpha=alpha, lam=lam,
                                           bn=self.base.text_bn, use_mfi=self.use_mfi))

    def step(self, tokens: Tensor, labels: Tensor, text: Mapping[str, Tensor], lr: float, *,
             epoch: int = 0, step: int = 0) -> Tensor:
        """One update of every head on the batch; returns the detached (H, 3) loss parts on the device.

        tokens (B, T, D) float, labels (B, C) on the heads' device. Raises TrainingError naming the
        grid point(s) if any head's loss is not finite; then no head is updated.
        """
        neg, pos = text["negative"], text["positive"]
        if self.batched:
            parts = vmap(self._loss, in_dims=(0, 0, None, None, None, None, 0, 0))(
                self.params, self.buffers, tokens, labels, neg, pos, self.alpha, self.lam)  # (H, 3)
        else:  # views of the stack: BatchNorm's in-place running-statistics updates write through
            params = {k: v.unbind(0) for k, v in self.params.items()}
            buffers = {k: v.unbind(0) for k, v in self.buffers.items()}
            parts = torch.stack([self._loss({k: v[h] for k, v in params.items()},
                                            {k: v[h] for k, v in buffers.items()}, tokens, labels,
                                            neg, pos, self.alpha[h], self.lam[h])
                                 for h in range(len(self.heads))])  # (H, 3)
        if not bool(torch.isfinite(parts).all().item()):  # the step's one host sync
            raise nonfinite_error(parts, self.parts, self.labels, epoch, step)
        set_lr(self.optimizer, lr)
        self.optimizer.zero_grad(set_to_none=True)
        total = parts[:, 0].sum()  # d total / d params of head h = d total_h / d params_h
        if self.scaler is None:
            total.backward()
            self.optimizer.step()
        else:
            self.scaler.scale(total).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        return parts.detach()

    @torch.no_grad()
    def unstacked(self) -> list[UnmixHead]:
        """The H heads holding the stack's current weights and buffers (for evaluation, saving)."""
        for h, head in enumerate(self.heads):
            state = head.state_dict()
            for name, value in {**self.params, **self.buffers}.items():
                state[name].copy_(value[h])
        return self.heads


class LoopTrainer:
    """The same interface, head by head through training.train_step (InfoCLIP objectives: each
    point has its own LPAM and token sampler). Syncs once per head per step (train_step's checks)."""

    def __init__(self, heads: Sequence[UnmixHead], cfgs: Sequence[Train],
                 labels: Sequence[str], auxes: Sequence[Any], amp: torch.dtype | None = None) -> None:
        self.heads, self.cfgs, self.labels, self.auxes, self.amp = list(heads), cfgs, labels, auxes, amp
        self.optimizers = [build_optimizer(trainable_parameters(h, x), c)
                           for h, x, c in zip(heads, auxes, cfgs)]
        self.scalers = [make_scaler(amp) for _ in heads]
        self.parts = PARTS + (("compress", "distill", "mi_student_teacher")
                              if auxes and auxes[0] is not None else ())

    def step(self, tokens: Tensor, labels: Tensor, text: Mapping[str, Tensor], lr: float, *,
             epoch: int = 0, step: int = 0) -> Tensor:
        rows = []
        for head, aux, opt, scaler, cfg, label in zip(self.heads, self.auxes, self.optimizers,
                                                      self.scalers, self.cfgs, self.labels):
            set_lr(opt, lr)
            try:
                values = train_step(head, opt, tokens, labels, text, cfg, aux, epoch=epoch, step=step,
                                    amp=self.amp, scaler=scaler)
            except TrainingError as err:
                raise TrainingError(f"grid point {label}: {err}; no update was applied to it") from err
            if aux is not None:
                values["mi_student_teacher"] = float(aux.last_mi)
            rows.append([values[n] for n in self.parts])
        return torch.tensor(rows)

    def unstacked(self) -> list[UnmixHead]:
        return self.heads
