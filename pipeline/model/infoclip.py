"""InfoCLIP objectives (Yuan et al. 2025, docs/METHOD.md "InfoCLIP objective") on tokens and text features.

The pretrained model (teacher) is frozen CLIP: its spatial tokens and class text features. The
fine-tuned model (student) is the projected feature space (UnmixHead's projectors). Both give a
pixel-text alignment map, one row per token over the K class texts. A Learnable Pixel-Text
Alignment Module (LPAM) refines the teacher's map, and two matrix-based Renyi mutual informations
(pipeline/model/information.py) regularise training:

- compression (information bottleneck): minimise I(teacher tokens; LPAM(teacher alignment)),
  so the LPAM keeps only the part of CLIP's noisy token-level alignment that matters;
- distillation: maximise I(LPAM(teacher alignment); student alignment), returned negated.

Trainer contract: `out = loss_fn(teacher_tokens, teacher_text, student_tokens, student_text)` and
    total = L_task + lambda1 * out["compress"] + lambda2 * out["distill"]
minimised; both terms are in bits and already signed for minimisation. The LPAM's parameters
must be in the optimiser (they belong to this module). Teacher inputs are detached here, so no
gradient reaches CLIP even if its tensors require grad; gradients reach the student tensors
(hence the projectors) and the LPAM.

Cost per call with n = num_tokens sampled tokens: the three Gram matrices are O(n^2 (D + 2K));
alpha = 2 (default) adds O(n^2), any other alpha six O(n^3) eigendecompositions. Tokens are
sampled from the B*T of the batch so n stays fixed (64 by default) whatever the batch size.

What distillation rewards: I(T; S) <= min(S(T), S(S)), and a copy of the teacher's map is not the
maximiser (I(A; A) = 2 S(A) - S(A o A) <= S(A)); the student is pushed towards maps whose sample
similarity structure determines the teacher's, not towards the teacher's values.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .information import Kernel, gram_matrix, mutual_information

AlignmentMode = Literal["softmax", "cosine"]


def alignment_scores(
    tokens: torch.Tensor, text: torch.Tensor, temperature: float = 0.01, mode: AlignmentMode = "softmax"
) -> torch.Tensor:
    """Pixel-text scores (..., K) before normalisation: cosine / temperature ("softmax") or cosine.

    tokens (..., D) and text (K, D) are assumed L2-normalised. temperature 0.01 is CLIP's logit
    scale of 100. In "cosine" mode the temperature is unused: a Gram matrix with the median width
    is invariant to the scale of its features anyway.
    """
    cos = tokens @ text.T  # (..., K)
    return cos / temperature if mode == "softmax" else cos


def normalise_alignment(scores: torch.Tensor, mode: AlignmentMode = "softmax") -> torch.Tensor:
    """Softmax over the K texts ("softmax") or the scores unchanged ("cosine")."""
    if mode == "softmax":
        return scores.softmax(dim=-1)
    if mode == "cosine":
        return scores
    raise ValueError(f"unknown alignment mode {mode!r}: expected 'softmax' or 'cosine'")


def alignment_map(
    tokens: torch.Tensor, text: torch.Tensor, temperature: float = 0.01, mode: AlignmentMode = "softmax"
) -> torch.Tensor:
    """Alignment map (B, T, K) of normalised tokens (B, T, D) with normalised text (K, D)."""
    return normalise_alignment(alignment_scores(tokens, text, temperature, mode), mode)


class LPAM(nn.Module):
    """Learnable Pixel-Text Alignment Module: per-token residual K -> K map on the teacher's scores.

    LPAM(s) = normalise(s + s W + b) with W (K, K) and b (K,) initialised to zero, i.e. a 1x1
    linear layer initialised to the identity. Why this form: at initialisation LPAM(s) is exactly
    CLIP's own alignment, so the losses start from the pretrained knowledge and only move it as the
    bottleneck asks; acting per token over the class axis lets it re-weight and mix classes that
    CLIP confuses, without mixing positions; K^2 + K parameters are negligible; the softmax (or
    none, in "cosine" mode) keeps its output the same kind of map as the student's.
    The paper's LPAM is larger (about 0.53M parameters, architecture not reproduced here); this is
    the smallest map with the stated role. It is tied to the K training texts, which is fine: it
    only enters the training losses, never inference.
    """

    def __init__(self, num_classes: int, mode: AlignmentMode = "softmax") -> None:
        super().__init__()
        self.mode = mode
        self.mix = nn.Linear(num_classes, num_classes)
        nn.init.zeros_(self.mix.weight)
        nn.init.zeros_(self.mix.bias)

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        """scores (..., K) from `alignment_scores` -> refined alignment map (..., K)."""
        return normalise_alignment(scores + self.mix(scores), self.mode)


def sample_token_indices(
    total: int, num_tokens: int | None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """num_tokens distinct indices into the B*T flattened tokens (all of them when None or >= total).

    Drawn on the CPU from `generator` (the global RNG when None) so a seeded generator gives the
    same subset on any device.
    """
    if num_tokens is None or num_tokens >= total:
        return torch.arange(total)
    return torch.randperm(total, generator=generator)[:num_tokens]


class InfoCLIPLoss(nn.Module):
    """Compression and distillation terms of InfoCLIP; holds the LPAM (see module docstring).

    num_classes: K, the number of text rows passed in (e.g. C plain prompts, or 2C for
    [negatives; positives]). num_tokens: tokens sampled per call for the n x n Gram matrices.
    alpha: Renyi order (2 = eigenvalue-free). kernel: Gram kernel of information.gram_matrix
    (Gaussian with the median width by default). temperature: the teacher's, 0.01 = CLIP's logit
    scale 100, fitted to CLIP's narrow cosine range. student_temperature: 0.05 = the 20x cosine
    scale of heads.region_logits; at 0.01 the projected space's wider cosines saturate the
    softmax into one-hot rows and the distillation gradient vanishes (measured: MI stalls).
    Inputs are assumed well-formed (the trainer's job).
    """

    def __init__(
        self,
        num_classes: int,
        num_tokens: int | None = 64,
        alpha: float = 2.0,
        kernel: Kernel = "gaussian",
        temperature: float = 0.01,
        student_temperature: float = 0.05,
        mode: AlignmentMode = "softmax",
    ) -> None:
        super().__init__()
        self.lpam = LPAM(num_classes, mode)
        self.num_tokens = num_tokens
        self.alpha = alpha
        self.kernel: Kernel = kernel
        self.temperature = temperature
        self.student_temperature = student_temperature
        self.mode: AlignmentMode = mode

    def forward(
        self,
        teacher_tokens: torch.Tensor,
        teacher_text: torch.Tensor,
        student_tokens: torch.Tensor,
        student_text: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """teacher_tokens (B,T,D), teacher_text (K,D), student_tokens (B,T,D'), student_text (K,D').

        Returns compress (minimise), distill (= -mi, minimise) and mi_student_teacher (detached,
        for logging), scalars in bits of the student's dtype. Rows are L2-normalised here.
        """
        b, t, _ = student_tokens.shape
        if teacher_tokens.shape[:2] != (b, t) or teacher_text.shape[0] != student_text.shape[0]:
            raise ValueError(
                f"teacher tokens {tuple(teacher_tokens.shape)} / text {tuple(teacher_text.shape)} do not "
                f"pair with student tokens {tuple(student_tokens.shape)} / text {tuple(student_text.shape)}"
            )
        idx = sample_token_indices(b * t, self.num_tokens, generator).to(student_tokens.device)

        t_tok = F.normalize(teacher_tokens.detach().reshape(b * t, -1)[idx], dim=-1)  # (n, D)
        t_txt = F.normalize(teacher_text.detach(), dim=-1)  # (K, D)
        s_tok = F.normalize(student_tokens.reshape(b * t, -1)[idx], dim=-1)  # (n, D')
        s_txt = F.normalize(student_text, dim=-1)  # (K, D')

        teacher_align = self.lpam(alignment_scores(t_tok, t_txt, self.temperature, self.mode))  # (n, K)
        student_align = alignment_map(s_tok, s_txt, self.student_temperature, self.mode)  # (n, K)

        g_input = gram_matrix(t_tok, self.kernel)  # (n, n), constant
        g_teacher = gram_matrix(teacher_align, self.kernel)  # (n, n)
        g_student = gram_matrix(student_align, self.kernel)  # (n, n)
        compress = mutual_information(g_input, g_teacher, self.alpha)
        mi = mutual_information(g_teacher, g_student, self.alpha)
        dtype = student_tokens.dtype
        return {
            "compress": compress.to(dtype),
            "distill": (-mi).to(dtype),
            "mi_student_teacher": mi.detach().to(dtype),
        }
