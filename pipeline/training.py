"""What one optimisation step, one evaluation and one checkpoint of the projectors are.

Shared by `stages/train.py`, `stages/ablate.py` and InfoCLIP, so that a grid point of the
ablation and a solo run go through exactly the same arithmetic (same step, same batches).
Training never runs CLIP: tokens and the class text features come from the feature cache.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.build import head_from_params
from pipeline.files import atomic_write
from pipeline.heads import HeadOutput, UnmixHead, positive_scores
from pipeline.losses import asl_loss, mfi_loss
from pipeline.metrics import mfi_figure_of_merit
from pipeline.objective import uses_mfi

# aux(head=, out=, tokens=, labels=, text=) -> {name: scalar loss term, already weighted}: each term
# is added to the total and reported under its name (InfoCLIP: "compress", "distill").
AuxLoss = Callable[..., Mapping[str, Tensor]]

# train-section keys a resumed run may change without making its result a different experiment.
# Extending `epochs` on resume is a warm restart of the cosine schedule: not the same as a longer run.
_RESUMABLE_CHANGES = ("epochs", "device")


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, a checkpoint that does not belong to this cache)."""


# -- schedule and optimiser ----------------------------------------------------------------------
def lr_at(epoch: float, train_params: Mapping[str, Any]) -> float:
    """Learning rate at fractional epoch `epoch` (e + step / steps_per_epoch).

    Cosine annealing of `lr` to 0 over all `epochs` (the paper: 50), with the first
    `warmup_epochs` replaced by the constant `warmup_lr` (1e-5): Dassl's ConstantWarmupScheduler
    around CosineAnnealingLR(T_max=epochs), which DualCoOp and the authors use. `lr_schedule`
    "epoch" steps it once per epoch as Dassl does (the authors' run); "step" evaluates it per step.
    """
    if train_params.get("lr_schedule", "step") == "epoch":
        epoch = math.floor(epoch)
    warmup, total, base = train_params["warmup_epochs"], train_params["epochs"], train_params["lr"]
    if epoch < warmup:
        return float(train_params["warmup_lr"])
    return float(base * 0.5 * (1.0 + math.cos(math.pi * min(epoch / total, 1.0))))


def partial_labels(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Keep each (image, class) label with probability `fraction`, else -1 (unknown, ignored by
    ASL): the authors' logged 85.09 mAP run trained on 90% of the labels. The mask is a function of
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


def build_optimizer(params_iter: Iterable[Tensor], train_params: Mapping[str, Any]) -> torch.optim.Optimizer:
    """SGD with momentum and weight decay (paper), or Adam (smoke profile: SGD at the paper's lr
    does not move a toy problem, TESTING-WITHOUT-WEIGHTS.md trap 2)."""
    kind, lr, wd = train_params["optimizer"], train_params["lr"], train_params["weight_decay"]
    if kind == "sgd":
        return torch.optim.SGD(params_iter, lr=lr, momentum=train_params["momentum"], weight_decay=wd)
    if kind == "adam":
        return torch.optim.Adam(params_iter, lr=lr, weight_decay=wd)
    raise TrainingError(f"parameter 'train.optimizer' must be sgd or adam, got {kind!r}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def new_head(params: Mapping[str, Any], embed_dim: int, device: torch.device) -> UnmixHead:
    """The head every run starts from: seeded by train.seed, so solo and ablation runs agree."""
    torch.manual_seed(params["train"]["seed"])
    return head_from_params(params["model"], embed_dim).to(device)


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


# -- one step ------------------------------------------------------------------------------------
def train_step(head: UnmixHead, optimizer: torch.optim.Optimizer, tokens: Tensor, labels: Tensor,
               text: Mapping[str, Tensor], cfg: Mapping[str, Any], aux: AuxLoss | None = None, *,
               epoch: int = 0, step: int = 0, amp: torch.dtype | None = None,
               scaler: torch.amp.GradScaler | None = None) -> dict[str, float]:
    """One optimiser step on L = asl_weight * ASL + alpha * MFI (+ aux terms); returns the loss parts.

    MFI is left out of L (still reported) when cfg["objective"] is "infoclip".

    tokens (B, T, D) and labels (B, C) on the head's device; text["negative"], text["positive"]
    (C, D); cfg is params["train"]. The learning rate is whatever the optimiser holds (set_lr).
    A non-finite loss raises TrainingError naming `epoch` and `step` before any update.
    """
    head.train()
    with _autocast(tokens.device, amp):
        out: HeadOutput = head(tokens, text["negative"], text["positive"])
    # Losses in fp32: the ASL log and the MFI squares are where half precision loses bits.
    asl = asl_loss(out.logits.float(), labels, **cfg["asl"])
    mfi = mfi_loss(out.text_pos.float(), out.text_neg.float(), lam=cfg["mfi"]["lambda"],
                   form=cfg["mfi"]["form"], bn=head.text_bn)  # the MFI BatchNorm follows the projector's
    parts: dict[str, Tensor] = {"asl": asl, "mfi": mfi}
    # train.objective "infoclip" drops MFI from the loss (still reported); pipeline/objective.py
    # asl_weight: 1 in the paper; the authors' code uses 0.999 * 0.05
    total = cfg["asl_weight"] * asl
    if uses_mfi(cfg.get("objective", "unmix")):
        total = total + cfg["alpha"] * mfi
    if aux is not None:  # InfoCLIP's compression / distillation terms
        for name, term in aux(head=head, out=out, tokens=tokens, labels=labels, text=text).items():
            parts[name] = term
            total = total + term
    parts = {"total": total, **parts}
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
                  amp: torch.dtype | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Scores (N, C) and labels (N, C) over a loader (`.epoch(0)` is used) or an iterable of batches.

    Eval mode: the text projector's BatchNorm uses its running statistics, nothing is updated.
    """
    head.eval()
    device = text["positive"].device
    batches = loader.epoch(0) if hasattr(loader, "epoch") else loader
    scores, labels, index = [], [], []
    for batch in batches:
        index.append(batch.index)  # (B,)
        with _autocast(device, amp):
            out = head(batch.tokens.to(device, non_blocking=True), text["negative"], text["positive"])
        scores.append(positive_scores(out.logits.float()).cpu().numpy())  # (B, C)
        labels.append(batch.labels.numpy())  # (B, C)
    from pipeline.provenance import require_finite  # NaN tokens: named here, not inside sklearn
    require_finite(np.concatenate(scores), np.concatenate(index), getattr(loader, "cache", None))
    return np.concatenate(scores), np.concatenate(labels)


@torch.no_grad()
def text_figure_of_merit(head: UnmixHead, plain: Tensor) -> dict[str, float]:
    """Paper Table 4 on the plain prompts "A photo of a {class}.": raw CLIP vs projected (eval mode)."""
    head.eval()
    return mfi_figure_of_merit(plain.float().cpu(), head.project_text(plain.float()).cpu())


# -- files ---------------------------------------------------------------------------------------
def _atomic_save(obj: Any, path: str | Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def cache_identity(cache: Any) -> dict[str, Any]:
    """What a checkpoint must agree on with the train cache it resumes on."""
    return {"fingerprint": cache.fingerprint, "layout": cache.layout, "classnames": cache.classnames}


def save_checkpoint(path: str | Path, state: Mapping[str, Any]) -> None:
    """Write the resume state atomically (temp file + rename).

    state: head, optimizer, scaler (or None), epoch (completed), rng (torch CPU/CUDA states),
    params, cache (cache_identity of the train cache), history (per-epoch metric rows).
    """
    _atomic_save(dict(state), path)


def capture_rng() -> dict[str, Any]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"torch": torch.get_rng_state(), "cuda": cuda}


def restore_rng(rng: Mapping[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def _diff_keys(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            keys += _diff_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            keys.append(f"{prefix}{k}")
    return keys


def load_checkpoint(path: str | Path, cache: Any, params: Mapping[str, Any]) -> dict[str, Any]:
    """Read a resume state and refuse it unless it belongs to this train cache and these settings."""
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"--resume: no checkpoint at {path}; train without --resume first")
    from pipeline.provenance import read_state  # a damaged file: one line, not a torch traceback
    state = read_state(path)
    differ = _diff_keys(state["cache"], cache_identity(cache))
    if differ:
        raise TrainingError(
            f"checkpoint {path} was written for a different train cache than {cache.path} "
            f"(fingerprint differs in: {', '.join(differ)}); delete {path} or train without --resume")
    old_train = {k: v for k, v in state["params"]["train"].items() if k not in _RESUMABLE_CHANGES}
    new_train = {k: v for k, v in params["train"].items() if k not in _RESUMABLE_CHANGES}
    differ = _diff_keys({"model": state["params"]["model"], "train": old_train},
                        {"model": params["model"], "train": new_train})
    if differ:
        raise TrainingError(f"checkpoint {path} was written with other settings ({', '.join(differ)}); "
                            f"resuming would mix two experiments: delete {path} or restore the params")
    return state


def save_projectors(path: str | Path, head: UnmixHead, meta: Mapping[str, Any]) -> None:
    """Final head for evaluation. meta: model (params section), embed_dim, classnames, fingerprint,
    epoch (plain Python values, so the file loads with weights_only=True)."""
    state = {k: v.detach().cpu() for k, v in head.state_dict().items()}
    _atomic_save({"head": state, "meta": dict(meta)}, path)


def load_projectors(path: str | Path, device: torch.device | str = "cpu") -> tuple[UnmixHead, dict]:
    """(head in eval mode on `device`, meta) from a save_projectors file."""
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"no trained projectors at {path}: run `pipeline train` first")
    from pipeline.provenance import read_state  # a damaged file: one line, not a torch traceback
    blob = read_state(path)
    meta = blob["meta"]
    head = head_from_params(meta["model"], meta["embed_dim"])
    head.load_state_dict(blob["head"])
    return head.to(device).eval(), meta
