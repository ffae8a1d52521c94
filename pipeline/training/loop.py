"""What one optimisation step and one evaluation of the projectors are (their files, checkpoint
and projectors, live in pipeline/training/checkpoints.py and are re-exported here).

Shared by `stages/train.py`, `stages/ablate.py` and InfoCLIP, so that a grid point of the
ablation and a solo run go through exactly the same arithmetic (same step, same batches).
Training never runs CLIP: tokens and the class text features come from the feature cache.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.config.schema import Evaluate, Params, Train
from pipeline.evaluation.metrics import mean_average_precision, mfi_figure_of_merit
from pipeline.model.build import head_from_params
from pipeline.model.heads import HeadOutput, UnmixHead, positive_scores
from pipeline.model.losses import asl_loss, mfi_loss
from pipeline.model.objective import uses_mfi
from pipeline.training.checkpoints import (  # noqa: F401  (re-exported: the training API in one import)
    TrainingError,
    cache_identity,
    load_checkpoint,
    load_projectors,
    save_checkpoint,
    save_projectors,
    validation_identity,
)

# aux(head=, out=, tokens=, labels=, text=) -> {name: scalar loss term, already weighted}: each term
# is added to the total and reported under its name (InfoCLIP: "compress", "distill").
AuxLoss = Callable[..., Mapping[str, Tensor]]


# -- schedule and optimiser ----------------------------------------------------------------------
def lr_at(epoch: float, train: Train) -> float:
    """Learning rate at fractional epoch `epoch` (e + step / steps_per_epoch).

    The constant `warmup_lr` (1e-5) for the first `warmup_epochs`, then cosine annealing of `lr`
    with period T = `epochs` started when the warm-up ends: lr = lr0 (1 + cos(pi (e - W) / T)) / 2.
    That is Dassl's ConstantWarmupScheduler around CosineAnnealingLR(T_max=epochs), which DualCoOp
    and the authors use: the wrapper holds the cosine back during the warm-up, so the cosine
    starts at lr0 on epoch W and the last epoch ends above 0. `lr_schedule` "epoch" steps it once
    per epoch as Dassl does (the released code); "step" evaluates the same curve at every step.
    """
    if train.lr_schedule == "epoch":
        epoch = math.floor(epoch)
    warmup, total, base = train.warmup_epochs, train.epochs, train.lr
    if epoch < warmup:
        return float(train.warmup_lr)
    return float(base * 0.5 * (1.0 + math.cos(math.pi * min((epoch - warmup) / total, 1.0))))


def label_mask_identity(labels: np.ndarray, fraction: float, seed: int) -> dict[str, Any]:
    """mask_identity of the partial labels drawn from the full `labels`."""
    return mask_identity(partial_labels(labels, fraction, seed), fraction, seed)


def mask_identity(masked: np.ndarray, fraction: float, seed: int) -> dict[str, Any]:
    """What a resumed run must agree on about its partial labels: fraction, seed and a digest of
    the labels actually trained on, `masked` = partial_labels(labels, fraction, seed) (N, C) int8
    (a different mask, or other labels, is another experiment)."""
    masked = np.ascontiguousarray(masked, dtype=np.int8)
    return {"fraction": float(fraction), "seed": int(seed), "shape": list(masked.shape),
            "kept": int((masked != -1).sum()), "sha256": hashlib.sha256(masked.tobytes()).hexdigest()}


def partial_labels(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Keep each (image, class) label with probability `fraction`, else -1 (unknown, ignored by
    ASL): the authors' 84.52 and 85.09 mAP logs trained on 90% of the labels. The mask is a function of
    (seed, shape) only, drawn once, so every epoch, a resumed run and an ablation point see the same."""
    labels = np.asarray(labels, dtype=np.int8)
    if fraction >= 1.0:
        return labels.copy()
    keep = np.random.default_rng((seed, 0x1AB5)).random(labels.shape) < fraction  # (N, C)
    return np.where(keep, labels, np.int8(-1)).astype(np.int8)


def projector_text(cache: Any, text_input: str) -> dict[str, Tensor]:
    """{positive, negative, plain} (C, D) float32 class text features fed to the text projector:
    "raw" encode_text output (the authors' training) or "normalised" (L2, their evaluation)."""
    prefix = {"raw": "raw_", "normalised": ""}[text_input]
    return {name: torch.from_numpy(cache.text_features(prefix + name)) for name in ("positive", "negative", "plain")}


def build_optimizer(params_iter: Iterable[Tensor], train: Train) -> torch.optim.Optimizer:
    """SGD with momentum and weight decay (paper), or Adam (smoke profile: SGD at the paper's lr
    does not move a toy problem, docs/TESTING.md, trap 2)."""
    kind, lr, wd = train.optimizer, train.lr, train.weight_decay
    if kind == "sgd":
        return torch.optim.SGD(params_iter, lr=lr, momentum=train.momentum, weight_decay=wd)
    if kind == "adam":
        return torch.optim.Adam(params_iter, lr=lr, weight_decay=wd)
    raise TrainingError(f"parameter 'train.optimizer' must be sgd or adam, got {kind!r}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def new_head(params: Params, embed_dim: int, device: torch.device) -> UnmixHead:
    """The head every run starts from: seeded by train.seed, so solo and ablation runs agree."""
    torch.manual_seed(params.train.seed)
    return head_from_params(params.model, embed_dim).to(device)


# -- precision -----------------------------------------------------------------------------------
def amp_dtype(device: torch.device, spec: str = "auto") -> torch.dtype | None:
    """Autocast dtype for the head: None (fp32) on CPU; bf16 on CUDA where supported, else fp16."""
    if spec == "fp32" or device.type != "cuda":
        return None
    if spec == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[spec]


def make_scaler(dtype: torch.dtype | None) -> torch.amp.GradScaler | None:
    """fp16 needs loss scaling; bf16 and fp32 do not."""
    return torch.amp.GradScaler("cuda") if dtype == torch.float16 else None


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def torch_threads(device: torch.device, spec: int | str = "auto") -> Any:
    """train.cpu_threads: intra-op threads for the head on CPU ("auto": torch's default), restored
    on exit. The head's ops take microseconds, where thread hand-offs cost more than they save."""
    if device.type != "cpu" or spec == "auto":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(spec))
    try:
        yield
    finally:
        torch.set_num_threads(before)


# -- one step ------------------------------------------------------------------------------------
def objective_terms(out: HeadOutput, labels: Tensor, train: Train, *, alpha: float | Tensor,
                    lam: float | Tensor, bn: str, use_mfi: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(total, asl, mfi) of one head's output: L = asl_weight * ASL (+ alpha * MFI when `use_mfi`).
    The arithmetic every trainer shares: loss_parts (train_step) and the ablation's stacked grid,
    whose alpha and MFI lambda are per-head tensors. bn: the MFI BatchNorm mode (the projector's)."""
    # Losses in fp32: the ASL log and the MFI squares are where half precision loses bits.
    a = train.asl
    asl = asl_loss(out.logits.float(), labels, gamma_neg=a.gamma_neg, gamma_pos=a.gamma_pos, clip=a.clip,
                   eps=a.eps)
    mfi = mfi_loss(out.text_pos.float(), out.text_neg.float(), lam=lam, form=train.mfi.form, bn=bn)
    total = train.asl_weight * asl  # 1 in the paper; the authors' code uses 0.999 * 0.05
    if use_mfi:
        total = total + alpha * mfi
    return total, asl, mfi


def loss_parts(head: UnmixHead, tokens: Tensor, labels: Tensor, text: Mapping[str, Tensor],
               train: Train, aux: AuxLoss | None = None,
               amp: torch.dtype | None = None) -> dict[str, Tensor]:
    """{total, asl, mfi, *aux terms} as tensors (graph kept) for L = asl_weight * ASL + alpha * MFI
    (+ aux terms), the head in training mode (objective_terms, then the aux terms).

    MFI is left out of L (still reported) when train.objective is "infoclip". tokens (B, T, D)
    and labels (B, C) on the head's device; text["negative"], text["positive"] (C, D); train is
    the params' train section.
    """
    head.train()
    with _autocast(tokens.device, amp):
        out: HeadOutput = head(tokens, text["negative"], text["positive"])
    total, asl, mfi = objective_terms(out, labels, train, alpha=train.alpha, lam=train.mfi.lambda_,
                                      bn=head.text_bn, use_mfi=uses_mfi(train.objective))
    parts: dict[str, Tensor] = {"asl": asl, "mfi": mfi}
    if aux is not None:  # InfoCLIP's compression / distillation terms
        for name, term in aux(head=head, out=out, tokens=tokens, labels=labels, text=text).items():
            parts[name] = term
            total = total + term
    return {"total": total, **parts}


def train_step(head: UnmixHead, optimizer: torch.optim.Optimizer, tokens: Tensor, labels: Tensor,
               text: Mapping[str, Tensor], train: Train, aux: AuxLoss | None = None, *,
               epoch: int = 0, step: int = 0, amp: torch.dtype | None = None,
               scaler: torch.amp.GradScaler | None = None) -> dict[str, float]:
    """One optimiser step on loss_parts' total; returns the loss parts as floats.

    The learning rate is whatever the optimiser holds (set_lr). A non-finite loss raises
    TrainingError naming `epoch` and `step` before any update.
    """
    parts = loss_parts(head, tokens, labels, text, train, aux, amp)
    total = parts["total"]
    values = {name: float(value.detach()) for name, value in parts.items()}
    if not all(math.isfinite(v) for v in values.values()):
        shown = ", ".join(f"{k}={v:.6g}" for k, v in values.items())
        raise TrainingError(f"non-finite loss at epoch {epoch} step {step}: {shown}")
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        total.backward()
        optimizer.step()
    else:
        scaler.scale(total).backward()
        scaler.step(optimizer)
        scaler.update()
    return values


# -- evaluation ----------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_head(head: UnmixHead, loader: Any, text: Mapping[str, Tensor],
                  stats: str = "running") -> tuple[np.ndarray, np.ndarray]:
    """Scores (N, C) and labels (N, C) over a loader (`.epoch(0)` is used) or an iterable of batches.

    Eval mode, nothing updated, always float32: autocast is switched off here even inside a caller's
    autocast region, so a per-epoch validation (and the best epoch picked from it) sees the scores
    the final evaluation computes; under bf16, scores a few 1e-3 apart round to ties and can rank
    another epoch first. stats (evaluate.text_bn.mlr): the text projector's BatchNorm uses its
    "running" statistics or those of the "batch" of 2C class prompts.
    """
    head.eval()
    device = text["positive"].device
    batches = loader.epoch(0) if hasattr(loader, "epoch") else loader
    scores, labels, index = [], [], []
    for batch in batches:
        index.append(batch.index)  # (B,)
        with torch.autocast(device_type=device.type, enabled=False):
            out = head(batch.tokens_on(device).float(), text["negative"].float(), text["positive"].float(),
                       stats)
        scores.append(positive_scores(out.logits.float()).cpu().numpy())  # (B, C)
        labels.append(batch.labels.numpy())  # (B, C)
    scores_ = np.concatenate(scores)  # (N, C)
    from pipeline.training.provenance import (
        require_finite,  # NaN tokens: named here, not inside sklearn
    )
    require_finite(scores_, np.concatenate(index), getattr(loader, "cache", None))
    return scores_, np.concatenate(labels)


@torch.no_grad()
def text_figure_of_merit(head: UnmixHead, plain: Tensor, stats: str = "running") -> dict[str, float]:
    """Paper Table 4 on the plain prompts "A photo of a {class}.": CLIP vs projected (eval mode).
    stats (evaluate.text_bn.mfi): the text BatchNorm's "running" statistics or the "batch" ones of
    these C prompts (the authors' figure script). float32, as evaluate_head."""
    head.eval()
    with torch.autocast(device_type=plain.device.type, enabled=False):
        projected = head.project_text(plain.float(), stats)
    return mfi_figure_of_merit(plain.float().cpu(), projected.float().cpu())


def merit_text(cache: Any, evaluate: Evaluate) -> dict[str, Tensor]:
    """The class text the figures of merit project: the evaluation's input (evaluate.text_input;
    the authors' figure script feeds L2-normalised features), whatever training was fed."""
    return projector_text(cache, evaluate.text_input)


def validation_metrics(head: UnmixHead, val_loader: Any, text: Mapping[str, Tensor],
                       merit: Mapping[str, Tensor], evaluate: Evaluate,
                       mean_ap: Callable = mean_average_precision) -> dict[str, float]:
    """One validation as every trainer reports it (train.json, the ablation grid): val mAP with the
    training text and the text BatchNorm statistics evaluate.text_bn.mlr, and paper Table 4 on the
    plain and the positive prompts of `merit` (merit_text) with evaluate.text_bn.mfi.

    Everything here runs in float32 whatever the training precision (also inside a trainer's
    autocast), so the best epoch by val mAP is the best epoch of the final fp32 evaluation
    (evaluate_head)."""
    bn = evaluate.text_bn
    scores, labels = evaluate_head(head, val_loader, text, stats=bn.mlr)
    plain = text_figure_of_merit(head, merit["plain"], stats=bn.mfi)
    pos = text_figure_of_merit(head, merit["positive"], stats=bn.mfi)
    return {"val_map": mean_ap(scores, labels), "mfi_before": plain["before"],
            "mfi_after": plain["after"], "mfi_reduction_pct": plain["reduction_pct"],
            "mfi_pos_before": pos["before"], "mfi_pos_after": pos["after"]}
