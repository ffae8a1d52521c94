"""InfoCLIP losses: alignment maps, LPAM, where gradients go, and that distillation raises MI."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model.infoclip import (
    LPAM,
    InfoCLIPLoss,
    alignment_map,
    alignment_scores,
    sample_token_indices,
)
from pipeline.model.information import gram_matrix, mutual_information

B, T, D, DS, K = 2, 10, 16, 8, 5


def _clustered_teacher(seed: int = 0):
    """CLIP-like teacher: tokens and texts share a common direction (cosines in a narrow range, as
    CLIP's are), each token leaning to one of the K classes, so its alignment map is informative."""
    g = torch.Generator().manual_seed(seed)
    classes = F.normalize(torch.randn(K, D, generator=g), dim=-1)  # (K, D)
    common = F.normalize(torch.randn(D, generator=g), dim=0)  # (D,)
    which = torch.randint(0, K, (B, T), generator=g)
    lean = classes[which] + 0.5 * torch.randn(B, T, D, generator=g)  # (B, T, D)
    tokens = F.normalize(common + 0.1 * lean, dim=-1)  # (B, T, D)
    text = F.normalize(classes + 3.0 * common, dim=-1)  # (K, D)
    return tokens, text


def test_alignment_map_is_a_softmax_over_classes_of_scaled_cosine():
    tokens, text = _clustered_teacher()
    a = alignment_map(tokens, text, temperature=0.05)
    cos = torch.einsum("btd,kd->btk", tokens, text)
    expected = torch.exp(cos / 0.05) / torch.exp(cos / 0.05).sum(-1, keepdim=True)
    torch.testing.assert_close(a, expected)
    torch.testing.assert_close(alignment_map(tokens, text, mode="cosine"), cos)


def test_lpam_starts_as_the_identity_on_the_teacher_alignment():
    tokens, text = _clustered_teacher()
    lpam = LPAM(K)
    scores = alignment_scores(tokens, text, 0.01)
    torch.testing.assert_close(lpam(scores), alignment_map(tokens, text, 0.01))
    assert sum(p.numel() for p in lpam.parameters()) == K * K + K


def test_gradients_reach_student_and_lpam_but_not_the_frozen_teacher():
    g = torch.Generator().manual_seed(0)
    backbone = nn.Linear(12, D).requires_grad_(False)  # stand-in for frozen CLIP
    projector = nn.Linear(D, DS, bias=False)  # the trained image projector
    images = torch.randn(B, T, 12, generator=g)
    teacher_tokens = backbone(images)  # (B, T, D)
    teacher_text = torch.randn(K, D, generator=g, requires_grad=True)  # would take grad if reached
    student_text = torch.randn(K, DS, generator=g, requires_grad=True)
    loss_fn = InfoCLIPLoss(K, num_tokens=16)
    with torch.no_grad():  # a non-identity LPAM, so every LPAM parameter has a gradient path
        loss_fn.lpam.mix.weight.normal_(0, 0.1, generator=g)
    out = loss_fn(teacher_tokens, teacher_text, projector(teacher_tokens), student_text, generator=g)
    (out["compress"] + out["distill"]).backward()
    assert all(p.grad is None for p in backbone.parameters())
    assert teacher_text.grad is None
    assert projector.weight.grad is not None and projector.weight.grad.abs().sum() > 0
    assert student_text.grad is not None and student_text.grad.abs().sum() > 0
    for p in loss_fn.lpam.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_compression_term_trains_only_the_lpam():
    teacher_tokens, teacher_text = _clustered_teacher()
    student = torch.randn(B, T, DS, requires_grad=True)
    loss_fn = InfoCLIPLoss(K, num_tokens=None)
    out = loss_fn(teacher_tokens, teacher_text, student, torch.randn(K, DS))
    out["compress"].backward()
    assert student.grad is None
    assert loss_fn.lpam.mix.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("alpha", (1.0, 2.0))
def test_terms_equal_the_information_of_the_sampled_tokens(alpha):
    """Recompute both terms from information.py on the same seeded token subset."""
    teacher_tokens, teacher_text = _clustered_teacher()
    student, student_text = torch.randn(B, T, DS), torch.randn(K, DS)
    out = InfoCLIPLoss(K, num_tokens=12, alpha=alpha)(
        teacher_tokens, teacher_text, student, student_text, generator=torch.Generator().manual_seed(3)
    )
    idx = sample_token_indices(B * T, 12, torch.Generator().manual_seed(3))
    t_tok = teacher_tokens.reshape(B * T, D)[idx]  # (12, D)
    s_tok = F.normalize(student.reshape(B * T, DS)[idx], dim=-1)  # (12, DS)
    g_in = gram_matrix(t_tok)
    g_t = gram_matrix(alignment_map(t_tok, teacher_text))  # identity LPAM at init
    g_s = gram_matrix(alignment_map(s_tok, F.normalize(student_text, dim=-1), temperature=0.05))
    assert out["compress"].item() == pytest.approx(mutual_information(g_in, g_t, alpha).item(), abs=1e-5)
    assert out["distill"].item() == pytest.approx(-mutual_information(g_t, g_s, alpha).item(), abs=1e-5)
    assert out["mi_student_teacher"].item() == pytest.approx(-out["distill"].item())
    assert not out["mi_student_teacher"].requires_grad


def test_token_subsampling_is_seeded_and_pairs_teacher_with_student_rows():
    teacher_tokens, teacher_text = _clustered_teacher()
    loss_fn = InfoCLIPLoss(K, num_tokens=12, student_temperature=0.01)  # student = teacher map

    wide = InfoCLIPLoss(K, num_tokens=12, student_temperature=0.01).double()  # the same, in float64

    def mi(student, seed, dtype=torch.float32):
        loss = loss_fn if dtype == torch.float32 else wide
        text, generator = teacher_text.to(dtype), torch.Generator().manual_seed(seed)
        out = loss(teacher_tokens.to(dtype), text, student.to(dtype), text, generator)
        return out["mi_student_teacher"].item()

    assert mi(teacher_tokens, 1) == mi(teacher_tokens, 1)
    assert mi(teacher_tokens, 1) != mi(teacher_tokens, 2)
    # a student identical to the teacher shares its rows, a shifted copy does not: if the sampled
    # rows were not paired, both would look alike
    shifted = teacher_tokens.roll(shifts=3, dims=1)
    paired, unpaired = mi(teacher_tokens, 1), mi(shifted, 1)
    assert paired > unpaired + 0.1
    # by 10x its distance from the same numbers in float64 (a fresh LPAM is the identity in both)
    drift = (abs(paired - mi(teacher_tokens, 1, torch.float64))
             + abs(unpaired - mi(shifted, 1, torch.float64)))
    assert paired - unpaired - 0.1 >= 10 * drift, (paired, unpaired, drift)


def _distil(dtype: torch.dtype) -> tuple[float, float]:
    """MI student-teacher (bits) before and after 20 Adam steps on free student tokens, in `dtype`."""
    teacher_tokens, teacher_text = (t.to(dtype) for t in _clustered_teacher())
    g = torch.Generator().manual_seed(1)
    student = torch.randn(B, T, DS, generator=g).to(dtype).requires_grad_(True)  # free student tokens
    student_text = torch.randn(K, DS, generator=g).to(dtype)
    loss_fn = InfoCLIPLoss(K, num_tokens=None).to(dtype)  # all B*T tokens: no sampling noise
    opt = torch.optim.Adam([student], lr=0.05)
    before = loss_fn(teacher_tokens, teacher_text, student, student_text)["mi_student_teacher"].item()
    for _ in range(20):
        opt.zero_grad()
        loss_fn(teacher_tokens, teacher_text, student, student_text)["distill"].backward()
        opt.step()
    after = loss_fn(teacher_tokens, teacher_text, student, student_text)["mi_student_teacher"].item()
    return before, after


def test_maximising_distillation_with_adam_increases_mutual_information():
    before, after = _distil(torch.float32)
    # measured on this set-up: 0.05 -> 0.16 bits (Gaussian kernel, median width)
    assert after > before + 0.05, (before, after)
    # by 10x its distance from the same optimisation run in float64
    wide = _distil(torch.float64)
    drift = abs(before - wide[0]) + abs(after - wide[1])
    assert after - before - 0.05 >= 10 * drift, (before, after, wide)


@pytest.mark.parametrize("mode,alpha,kernel", [("cosine", 2.0, "gaussian"), ("softmax", 1.0, "linear")])
def test_other_modes_give_finite_losses_and_gradients(mode, alpha, kernel):
    teacher_tokens, teacher_text = _clustered_teacher()
    student = torch.randn(B, T, DS, requires_grad=True)
    loss_fn = InfoCLIPLoss(K, num_tokens=16, alpha=alpha, kernel=kernel, mode=mode)
    out = loss_fn(teacher_tokens, teacher_text, student, torch.randn(K, DS))
    (out["compress"] + out["distill"]).backward()
    assert all(torch.isfinite(v) for v in out.values())
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


def test_mismatched_teacher_and_student_shapes_are_rejected():
    teacher_tokens, teacher_text = _clustered_teacher()
    with pytest.raises(ValueError, match="do not pair"):
        InfoCLIPLoss(K)(teacher_tokens, teacher_text, torch.randn(B, T + 1, DS), torch.randn(K, DS))
