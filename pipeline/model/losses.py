"""Unmix-CLIP losses: ASL for multi-label recognition and MFI for disentangled text features.

Labels are 1 positive, 0 negative, -1 unknown (contributes nothing). Inputs are assumed valid.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.config.schema import (
    MFI_FORMS,  # the one list of names (schema.py declares the parameter)
)

BN_EPS = 1e-5  # BatchNorm1d's default


def asl_loss(
    logits: Tensor,
    labels: Tensor,
    gamma_neg: float = 2.0,
    gamma_pos: float = 1.0,
    clip: float = 0.05,
    eps: float = 1e-6,
) -> Tensor:
    """Asymmetric loss in DualCoOp's softmax variant, as used by the Unmix-CLIP authors (eq. 2).

    Probabilities come from a softmax over the (negative, positive) channels, not a sigmoid. The
    negative probability is shifted by the margin `clip` (capped at 1) to discard easy negatives.
    The focusing weight (1 - p_t)^gamma is a constant (no gradient), as in the reference code.
    Summed, not averaged, over the batch. logits (B, 2, C), labels (B, C).
    """
    p = logits.softmax(dim=1)  # (B, 2, C)
    p_neg, p_pos = p[:, 0], p[:, 1]  # (B, C) each
    p_neg_shifted = (p_neg + clip).clamp(max=1.0) if clip > 0 else p_neg
    y_pos = (labels == 1).to(p.dtype)
    y_neg = (labels == 0).to(p.dtype)  # -1 (unknown) is in neither set
    loss_pos = y_pos * torch.log(p_pos.clamp(min=eps))
    loss_neg = y_neg * torch.log(p_neg_shifted.clamp(min=eps))
    with torch.no_grad():
        p_t = p_pos * y_pos + p_neg_shifted * y_neg
        gamma = gamma_pos * y_pos + gamma_neg * y_neg
        weight = torch.pow(1.0 - p_t, gamma)
    return -(weight * (loss_pos + loss_neg)).sum()


def _diag_offdiag_penalty(c: Tensor, lam: float | Tensor) -> Tensor:
    """sum_i (c_ii - 1)^2 + lam * sum_{i != j} c_ij^2 for a square matrix c."""
    diag = torch.diagonal(c)
    on = (diag - 1.0).pow(2).sum()
    off = c.pow(2).sum() - diag.pow(2).sum()
    return on + lam * off


def _mfi_batchnorm(t: Tensor, bn: str) -> Tensor:
    """BatchNorm1d(D', affine=False) over the rows of t: batch statistics ("train") or its initial
    running statistics mean 0, var 1 ("eval", as in the released training loop: the identity up to eps)."""
    if bn == "train":
        return F.batch_norm(t, None, None, training=True, eps=BN_EPS)
    if bn == "eval":
        return t / math.sqrt(1.0 + BN_EPS)
    raise ValueError(f"MFI BatchNorm mode must be 'train' or 'eval', got {bn!r}")


def _mfi_paper(text: Tensor, lam: float | Tensor) -> Tensor:
    t = F.normalize(text, dim=-1)  # (C, D')
    return _diag_offdiag_penalty(t @ t.T, lam)  # S: (C, C) cosine similarities


def _mfi_classes(text: Tensor, lam: float | Tensor, bn: str) -> Tensor:
    z = _mfi_batchnorm(F.normalize(text, dim=-1), bn)  # (C, D')
    return _diag_offdiag_penalty(z @ z.T, lam)  # c = z z^T: (C, C)


def _mfi_features(text: Tensor, lam: float | Tensor, bn: str) -> Tensor:
    z = _mfi_batchnorm(F.normalize(text, dim=-1), bn)  # (2C, D')
    return _diag_offdiag_penalty(z.T @ z, lam)  # c = z^T z: (D', D'), no division by the rows


def mfi_loss(text_pos: Tensor, text_neg: Tensor | None = None, lam: float | Tensor = 0.2,
             form: str = "paper", bn: str = "train") -> Tensor:
    """Mutual Feature Information loss on projected class text features (C, D'), by named form.

    "paper" (paper eq. 1): S = cosine-similarity matrix of the C positive prompt features;
    sum_i (S_ii - 1)^2 + lam * sum_{i != j} S_ij^2 (paper lam = 0.2); text_neg unused.
    "authors-classes" (the C x C file in the authors' repository, not imported by their training):
    z = BatchNorm1d(D', affine=False)(normalised t') per prompt set, c = z z^T, the same penalty,
    positives and negatives summed (lam = 1). With batch statistics trace(c) = C * D', so the
    diagonal target is never reached for D' > 1 (a floor of C (D' - 1)^2).
    "authors-features" (what the authors' training imports): the 2C rows [negatives; positives]
    normalised, z = BatchNorm1d(D', affine=False)(t), c = z^T z (D' x D'), same penalty (lam 0.0051).
    bn: the BatchNorm's mode, following the text projector's (`model.text_bn`): "eval" in the
    released training loop, where it is the identity up to its eps.
    """
    if form == "paper":
        return _mfi_paper(text_pos, lam)
    if form not in MFI_FORMS:
        raise ValueError(f"mfi form must be one of {MFI_FORMS}, got {form!r}")
    if text_neg is None:
        raise ValueError(f"mfi_loss(form={form!r}) needs text_neg (the negative prompt set)")
    if form == "authors-classes":
        return _mfi_classes(text_pos, lam, bn) + _mfi_classes(text_neg, lam, bn)
    return _mfi_features(torch.cat([text_neg, text_pos]), lam, bn)
