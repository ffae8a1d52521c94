"""What a run of the projectors minimises (`train.objective`), and InfoCLIP as a plug-in loss term.

- "unmix": L = ASL + alpha * MFI (the paper);
- "infoclip": L = ASL + lambda1 * compress + lambda2 * distill (no MFI);
- "unmix+infoclip": L = ASL + alpha * MFI + lambda1 * compress + lambda2 * distill.

InfoCLIP (docs/METHOD.md "InfoCLIP objective"; math in pipeline/model/infoclip.py) enters `training.train_step` as its
`aux` callable, an nn.Module that owns the LPAM (whose parameters go into the optimiser and the
checkpoint, with the token-sampling generator's state). Who is who:
- teacher = frozen CLIP: the cached tokens of the batch and the cached CLIP features of the
  positive prompts "A photo of a {class}" (C rows). Positive, not plain ("... {class}."), because
  they are the rows the head already projects in its forward pass: the student text is
  `HeadOutput.text_pos` itself, so InfoCLIP costs no second text-projector pass and, above all, no
  second BatchNorm update of the text projector's running statistics. The plain prompts, which
  zero-shot evaluation uses, differ by a full stop; how close their features are depends on the
  text tower (cosine about 0.75 in the random test tower, tests/test_training.py).
- student = the projected space: `head.project_tokens` of the same sampled tokens and `text_pos`.

Cost: n = `train.infoclip.num_tokens` tokens are drawn per batch from its B*T (without
replacement, by a CPU generator seeded by train.seed), before the image projector, so the student
side projects n tokens, not B*T. The loss builds three n x n Gram matrices in float64,
O(n^2 (D + 2C)) time and O(n^2) memory, plus O(n^2) for the alpha = 2 entropies (other alphas: six
O(n^3) eigendecompositions). n is fixed whatever the batch size: n = 64 is 4096 kernel entries per
matrix. The sample is also the estimator's noise: MI over 64 of 6,304 RN-101 tokens per batch
is a stochastic estimate whose expectation, not each value, is what training follows.
Measured per step (CPU, 1 thread, fastest of 20-100 steps, shared 2-core machine): B 32, T 197,
D 512, C 80 (RN-101, COCO): unmix step ~94 ms, InfoCLIP forward + backward ~8 ms at n = 64 (+9%),
~38 ms at n = 256 (+40%, the n^2 terms take over); smoke scale (B 32, T 17, D 64, C 8): ~3.4 ms on
a ~2 ms step: the fixed cost of many small float64 ops (kernel widths, Gram matrices, backward).

The lambdas weigh bits against the ASL, which is summed over B x C terms (hundreds to thousands
per batch): on the planted-signal data lambda2 of order 50 was needed to move the alignment
(tests/test_objective.py); scale them with the batch size and class count.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.config.schema import InfoClip, Train
from pipeline.model.heads import HeadOutput, UnmixHead
from pipeline.model.infoclip import InfoCLIPLoss, sample_token_indices

OBJECTIVES = ("unmix", "infoclip", "unmix+infoclip")


def uses_mfi(objective: str) -> bool:
    """Whether alpha * MFI is part of the loss."""
    return objective in ("unmix", "unmix+infoclip")


def uses_infoclip(objective: str) -> bool:
    """Whether InfoCLIP's compression and distillation terms are part of the loss."""
    return objective in ("infoclip", "unmix+infoclip")


def infoclip_loss(infoclip: InfoClip, num_classes: int) -> InfoCLIPLoss:
    """InfoCLIPLoss from the params section train.infoclip, for tokens already sampled (num_tokens=None)."""
    return InfoCLIPLoss(num_classes, num_tokens=None, alpha=infoclip.alpha, kernel=infoclip.kernel,
                        temperature=infoclip.temperature,
                        student_temperature=infoclip.student_temperature, mode=infoclip.mode)


def sample_tokens(tokens: Tensor, num_tokens: int | None, generator: torch.Generator) -> Tensor:
    """(B, T, D) -> (1, n, D): n of the B*T tokens, the same rows for teacher and student."""
    b, t, d = tokens.shape
    idx = sample_token_indices(b * t, num_tokens, generator).to(tokens.device)  # (n,)
    return tokens.reshape(b * t, d)[idx].unsqueeze(0)  # (1, n, D)


class InfoCLIPObjective(nn.Module):
    """`aux` of training.train_step, terms already weighted: {"compress": lambda1 * I(tokens; LPAM
    map), "distill": -lambda2 * I(LPAM map; student map)}. After each call `last_mi` holds the
    unweighted, detached I(teacher; student) of that batch (bits), for logging: not a loss term."""

    def __init__(self, num_classes: int, infoclip: InfoClip, seed: int = 0) -> None:
        super().__init__()
        self.loss = infoclip_loss(infoclip, num_classes)  # holds the LPAM
        self.lambda1, self.lambda2 = float(infoclip.lambda1), float(infoclip.lambda2)
        self.num_tokens: int | None = infoclip.num_tokens
        self.generator = torch.Generator().manual_seed(seed)  # own stream: no global RNG, so grid = solo
        self.last_mi: Tensor | None = None

    def forward(self, *, head: UnmixHead, out: HeadOutput, tokens: Tensor, labels: Tensor,
                text: Mapping[str, Tensor]) -> dict[str, Tensor]:
        # frozen input: the student's gradient stops at the projector, never reaches CLIP's tokens
        teacher = sample_tokens(tokens.detach(), self.num_tokens, self.generator)  # (1, n, D)
        student = head.project_tokens(teacher.float())  # (1, n, D')
        terms = self.loss(teacher, text["positive"], student, out.text_pos.float())
        self.last_mi = terms["mi_student_teacher"]
        return {"compress": self.lambda1 * terms["compress"], "distill": self.lambda2 * terms["distill"]}

    def get_extra_state(self) -> dict[str, Tensor]:
        return {"generator": self.generator.get_state()}  # resumed runs draw the same token subsets

    def set_extra_state(self, state: Mapping[str, Tensor]) -> None:
        self.generator.set_state(state["generator"])


def build_objective(train: Train, num_classes: int,
                    device: torch.device | str = "cpu") -> InfoCLIPObjective | None:
    """The aux module of the train section (None for "unmix"); its generator is seeded by train.seed."""
    if not uses_infoclip(train.objective):
        return None
    return InfoCLIPObjective(num_classes, train.infoclip, seed=train.seed).to(device)


def trainable_parameters(head: nn.Module, objective: nn.Module | None) -> list[nn.Parameter]:
    """What the optimiser updates: the projectors, then the LPAM when InfoCLIP is on."""
    return list(head.parameters()) + ([] if objective is None else list(objective.parameters()))


@torch.no_grad()
def clip_alignment_mi(head: UnmixHead, batches: Iterable[Any], text: Mapping[str, Tensor],
                      infoclip: InfoClip, max_batches: int = 8, seed: int = 0) -> float:
    """Mean over up to `max_batches` batches of I(CLIP alignment; student alignment), bits.

    The distillation estimator with an identity LPAM (CLIP's own map, nothing learned), on
    n = num_tokens tokens per batch drawn by a generator seeded with `seed`: one fixed yardstick
    for any run and objective, "unmix" included, of how much of CLIP's token-text alignment the
    projected space keeps. Head in eval mode; `batches` yield Batch (val tokens).
    """
    head.eval()
    device = text["positive"].device
    loss = infoclip_loss(infoclip, text["positive"].shape[0]).to(device)  # fresh LPAM = identity
    generator = torch.Generator().manual_seed(seed)
    student_text = head.project_text(torch.cat([text["negative"], text["positive"]]).float())  # (2C, D')
    student_text = student_text[text["negative"].shape[0]:]  # (C, D') positives; eval BN: rows independent
    values = []
    for i, batch in enumerate(batches):
        if i == max_batches:
            break
        tokens = batch.tokens_on(device)  # (B, T, D) float32
        teacher = sample_tokens(tokens, infoclip.num_tokens, generator)  # (1, n, D)
        out = loss(teacher, text["positive"], head.project_tokens(teacher), student_text)
        values.append(float(out["mi_student_teacher"]))
    return float(sum(values) / max(len(values), 1))
