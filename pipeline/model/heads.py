"""Unmix-CLIP projectors and DualCoOp region logits: the only trained part of the model.

The frozen CLIP gives spatial image tokens (B, T, D) and class prompt features (C, D). Two small
projectors map both into a shared D'-dim space (D' = D/2) where the MFI loss pushes the class
text features apart; image-text logits use DualCoOp's class-specific region aggregation.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SIMILARITY_SCALE = 20.0  # cosine -> similarity s (DualCoOp)
LOGIT_SCALE = 5.0  # weighted sum of s -> logit (DualCoOp)
SOFTMAX_MODES = ("per_prompt", "positive")
IMAGE_PROJECTOR_KINDS = ("linear", "mlp")


BN_STATS = ("running", "batch")
TEXT_BN_MODES = ("eval", "train")


class TextProjector(nn.Module):
    """Linear(no bias) -> BatchNorm1d -> ReLU -> Linear(no bias), as in paper and authors' code.

    The BatchNorm normalises over the rows it is given, so the head projects the negative and
    positive prompts together (2C rows) in one call, as the authors' code does. `stats` overrides
    the module's mode for one call: "running" (its running statistics) or "batch" (the statistics
    of these rows, running statistics left untouched): the authors' ZS3 and MFI-figure scripts
    evaluate with the batch statistics of the evaluated class prompts.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim, bias=False),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim, bias=False),
        )

    def forward(self, text: Tensor, stats: str | None = None) -> Tensor:  # (P, D) -> (P, D')
        if stats is None:
            return self.net(text)
        if stats not in BN_STATS:
            raise ValueError(f"BatchNorm stats must be one of {BN_STATS}, got {stats!r}")
        first, bn, relu, last = self.net
        assert isinstance(bn, nn.BatchNorm1d)  # (what the type checker cannot see in a Sequential)
        h = first(text)  # (P, hidden)
        if stats == "batch":
            h = F.batch_norm(h, None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
        else:
            h = F.batch_norm(h, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=False, eps=bn.eps)
        return last(relu(h))


class ImageProjector(nn.Module):
    """Per-token image projector (B, T, D) -> (B, T, D').

    kind="linear": a single Linear(D -> D', no bias), the authors' code (default).
    kind="mlp": Linear(D -> hidden, no bias) -> ReLU -> Linear(hidden -> D', no bias), the
    paper's "MLP [512 -> 256]"; hidden defaults to D'.
    """

    def __init__(
        self, in_dim: int, out_dim: int, kind: str = "linear", hidden_dim: int | None = None
    ) -> None:
        super().__init__()
        if kind == "linear":
            self.net: nn.Module = nn.Linear(in_dim, out_dim, bias=False)
        elif kind == "mlp":
            hidden = out_dim if hidden_dim is None else hidden_dim
            self.net = nn.Sequential(
                nn.Linear(in_dim, hidden, bias=False),
                nn.ReLU(inplace=True),
                nn.Linear(hidden, out_dim, bias=False),
            )
        else:
            raise ValueError(f"image_projector kind must be one of {IMAGE_PROJECTOR_KINDS}, got {kind!r}")
        self.kind = kind

    def forward(self, tokens: Tensor) -> Tensor:  # (B, T, D) -> (B, T, D')
        return self.net(tokens)


def region_logits(image: Tensor, text: Tensor, softmax_mode: str = "per_prompt") -> Tensor:
    """DualCoOp class-specific region aggregation.

    image (B, T, D') and text (2C, D') [negatives; positives] must already be L2-normalised.
    s = 20 * cosine per token; weights = softmax of s over the T tokens; logit = 5 * sum_T(s * w).
    softmax_mode "per_prompt" (default, authors' Unmix-CLIP code): each of the 2C prompts gets its
    own weights. "positive" (original DualCoOp): weights from the positive prompt of each class,
    used for both its negative and positive prompt. Returns (B, 2, C), channel 0 negative.
    """
    num_prompts = text.shape[0]
    num_classes = num_prompts // 2
    s = SIMILARITY_SCALE * torch.einsum("btd,pd->bpt", image, text)  # (B, 2C, T)
    if softmax_mode == "per_prompt":
        w = s.softmax(dim=-1)  # (B, 2C, T)
    elif softmax_mode == "positive":
        w_pos = s[:, num_classes:].softmax(dim=-1)  # (B, C, T)
        w = torch.cat([w_pos, w_pos], dim=1)  # (B, 2C, T)
    else:
        raise ValueError(f"softmax_mode must be one of {SOFTMAX_MODES}, got {softmax_mode!r}")
    logits = LOGIT_SCALE * (s * w).sum(dim=-1)  # (B, 2C)
    return logits.view(-1, 2, num_classes)  # (B, 2, C)


def positive_scores(logits: Tensor) -> Tensor:
    """Ranking scores in [0, 1]: softmax over the (negative, positive) channels, positive one."""
    return logits.softmax(dim=1)[:, 1]  # (B, 2, C) -> (B, C)


class HeadOutput(NamedTuple):
    logits: Tensor  # (B, 2, C), channel 0 negative, 1 positive
    text_neg: Tensor  # (C, D') projected, L2-normalised negative prompt features
    text_pos: Tensor  # (C, D') projected, L2-normalised positive prompt features


class UnmixHead(nn.Module):
    """Text and image projectors plus region logits.

    Dimensions default to the paper's: proj_dim = D/2, text hidden = 3D/4
    (RN-101 512 -> 384 -> 256 and 512 -> 256; RN-50 1024 -> 768 -> 512 and 1024 -> 512).
    """

    def __init__(
        self,
        embed_dim: int,
        proj_dim: int | None = None,
        text_hidden: int | None = None,
        image_projector: str = "linear",
        softmax_mode: str = "per_prompt",
        text_bn: str = "train",
    ) -> None:
        super().__init__()
        if softmax_mode not in SOFTMAX_MODES:
            raise ValueError(f"softmax_mode must be one of {SOFTMAX_MODES}, got {softmax_mode!r}")
        if text_bn not in TEXT_BN_MODES:
            raise ValueError(f"text_bn must be one of {TEXT_BN_MODES}, got {text_bn!r}")
        self.text_bn = text_bn
        self.embed_dim = embed_dim
        self.proj_dim = embed_dim // 2 if proj_dim is None else proj_dim
        self.text_hidden = 3 * embed_dim // 4 if text_hidden is None else text_hidden
        self.softmax_mode = softmax_mode
        self.text_projector = TextProjector(embed_dim, self.text_hidden, self.proj_dim)
        self.image_projector = ImageProjector(embed_dim, self.proj_dim, kind=image_projector)

    def train(self, mode: bool = True) -> UnmixHead:
        """text_bn "eval" (the released training loop: the whole model in eval mode while training) keeps the
        text projector's BatchNorm at its running statistics, which are then never updated; its
        weight and bias still learn, so it acts as a per-feature affine."""
        super().train(mode)
        if mode and self.text_bn == "eval":
            self.text_projector.net[1].eval()
        return self

    def project_text(self, text: Tensor, stats: str | None = None) -> Tensor:
        """(P, D) -> (P, D') L2-normalised. stats None follows the module's mode (in training mode
        with text_bn "train", the statistics of these P rows); else see TextProjector."""
        return F.normalize(self.text_projector(text, stats), dim=-1)

    def project_tokens(self, tokens: Tensor) -> Tensor:
        """(B, T, D) -> (B, T, D') L2-normalised per token."""
        return F.normalize(self.image_projector(tokens), dim=-1)

    def forward(self, tokens: Tensor, text_neg: Tensor, text_pos: Tensor,
                stats: str | None = None) -> HeadOutput:
        """stats: the text BatchNorm's statistics for this call (see project_text)."""
        num_classes = text_pos.shape[0]
        # One call over [neg; pos] (2C, D) so BatchNorm sees both prompt sets (authors' code).
        text = self.project_text(torch.cat([text_neg, text_pos], dim=0), stats)  # (2C, D')
        image = self.project_tokens(tokens)  # (B, T, D')
        logits = region_logits(image, text, self.softmax_mode)  # (B, 2, C)
        return HeadOutput(logits, text[:num_classes], text[num_classes:])
