"""Unmix-CLIP losses: ASL for multi-label recognition and MFI for disentangled text features.

Labels are 1 positive, 0 negative, -1 unknown (contributes nothing). Inputs are assumed valid.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

MFI_FORMS = ("paper", "authors")


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


def _diag_offdiag_penalty(c: Tensor, lam: float) -> Tensor:
    """sum_i (c_ii - 1)^2 + lam * sum_{i != j} c_ij^2 for a square matrix c."""
    diag = torch.diagonal(c)
    on = (diag - 1.0).pow(2).sum()
    off = c.pow(2).sum() - diag.pow(2).sum()
    return on + lam * off


def _mfi_paper(text: Tensor, lam: float) -> Tensor:
    t = F.normalize(text, dim=-1)  # (C, D')
    return _diag_offdiag_penalty(t @ t.T, lam)  # S: (C, C) cosine similarities


def _mfi_authors(text: Tensor, lam: float) -> Tensor:
    t = F.normalize(text, dim=-1)  # (C, D')
    # BatchNorm1d(D', affine=False) with batch statistics over the C rows; no running stats.
    z = F.batch_norm(t, None, None, training=True, eps=1e-5)  # (C, D')
    return _diag_offdiag_penalty(z @ z.T, lam)  # c = z z^T: (C, C)


def mfi_loss(
    text_pos: Tensor, text_neg: Tensor | None = None, lam: float = 0.2, form: str = "paper"
) -> Tensor:
    """Mutual Feature Information loss on projected class text features (C, D').

    form="paper" (paper eq. 1, the default): S = cosine-similarity matrix of the C positive
    prompt features; sum_i (S_ii - 1)^2 + lam * sum_{i != j} S_ij^2 (paper lam = 0.2).
    text_neg is not used: the paper defines MFI over the class features only.
    form="authors" (authors' code): z = BatchNorm1d(D', affine=False) in training mode applied to
    the L2-normalised features over the C rows, c = z z^T (no division), same penalty on c,
    computed for the positive and the negative prompt sets and summed (authors' lam = 1).
    Note: each column of z has zero mean and unit (biased) variance over the C rows, so
    trace(c) = C * D' (up to the BatchNorm eps); the diagonal target of 1 is therefore never
    reached for D' > 1 and this form has a positive floor of C * (D' - 1)^2.
    """
    if form == "paper":
        return _mfi_paper(text_pos, lam)
    if form == "authors":
        if text_neg is None:
            raise ValueError("mfi_loss(form='authors') needs text_neg (the negative prompt set)")
        return _mfi_authors(text_pos, lam) + _mfi_authors(text_neg, lam)
    raise ValueError(f"mfi form must be one of {MFI_FORMS}, got {form!r}")
