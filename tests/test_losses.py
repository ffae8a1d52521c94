"""ASL and MFI losses against independent evaluations of their formulas."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.model.losses import asl_loss, mfi_loss


def _asl_by_hand(logits, labels, gamma_neg=2.0, gamma_pos=1.0, clip=0.05, eps=1e-6):
    """Elementwise Python evaluation of DualCoOp's softmax ASL."""
    total = 0.0
    batch, _, classes = logits.shape
    for b in range(batch):
        for c in range(classes):
            y = int(labels[b, c])
            if y == -1:
                continue
            x0, x1 = float(logits[b, 0, c]), float(logits[b, 1, c])
            p_pos = math.exp(x1) / (math.exp(x0) + math.exp(x1))
            p_neg = min(1.0 - p_pos + clip, 1.0)
            if y == 1:
                total += -((1 - p_pos) ** gamma_pos) * math.log(max(p_pos, eps))
            else:
                total += -((1 - p_neg) ** gamma_neg) * math.log(max(p_neg, eps))
    return total


def test_asl_equals_elementwise_formula_with_unknown_labels():
    gen = torch.Generator().manual_seed(1)
    logits = 3 * torch.randn(5, 2, 7, generator=gen, dtype=torch.float64)
    labels = torch.randint(-1, 2, (5, 7), generator=gen)
    assert (labels == -1).any() and (labels == 0).any() and (labels == 1).any()
    got = asl_loss(logits, labels)
    assert got.ndim == 0
    assert math.isclose(float(got), _asl_by_hand(logits, labels), rel_tol=1e-12)
    for kw in ({"gamma_neg": 4.0, "gamma_pos": 0.0, "clip": 0.0}, {"clip": 0.2, "eps": 1e-3}):
        assert math.isclose(float(asl_loss(logits, labels, **kw)), _asl_by_hand(logits, labels, **kw),
                            rel_tol=1e-12)


def test_unknown_labels_contribute_nothing():
    logits = torch.randn(3, 2, 4)
    labels = torch.tensor([[1, 0, -1, -1], [-1, -1, -1, -1], [0, 1, 1, -1]])
    kept = labels != -1
    # Changing logits at unknown entries changes neither loss nor gradient elsewhere.
    other = logits.clone()
    other[:, :, ~kept.any(0)] += 5.0
    other[1] -= 3.0
    torch.testing.assert_close(asl_loss(logits, labels), asl_loss(other, labels))
    x = logits.clone().requires_grad_()
    asl_loss(x, labels).backward()
    assert float(x.grad.permute(1, 0, 2)[:, ~kept].abs().sum()) == 0.0


def test_focusing_weight_carries_no_gradient():
    gen = torch.Generator().manual_seed(2)
    logits = 1.5 * torch.randn(4, 2, 6, generator=gen, dtype=torch.float64)
    labels = torch.randint(-1, 2, (4, 6), generator=gen)
    clip = 0.05
    x = logits.clone().requires_grad_()
    asl_loss(x, labels, clip=clip).backward()

    # Analytic gradient with the weight w held constant. With p1 = softmax(x)[1], p0 = 1 - p1:
    # d log p1 / d(x0, x1) = (-p0, p0); d log(p0 + clip) / d(x0, x1) = p0 p1 / (p0 + clip) * (1, -1)
    # (zero where p0 + clip >= 1, the cap). Loss = -sum w * log-term.
    p = logits.softmax(dim=1)
    p0, p1 = p[:, 0], p[:, 1]
    shifted = (p0 + clip).clamp(max=1.0)
    y_pos, y_neg = (labels == 1).double(), (labels == 0).double()
    w_pos = (1 - p1) ** 1.0
    w_neg = (1 - shifted) ** 2.0
    d_neg = torch.where(p0 + clip < 1, p0 * p1 / (p0 + clip), torch.zeros_like(p0))
    grad0 = -(y_pos * w_pos * (-p0) + y_neg * w_neg * d_neg)
    grad1 = -(y_pos * w_pos * p0 + y_neg * w_neg * (-d_neg))
    expected = torch.stack([grad0, grad1], dim=1)
    torch.testing.assert_close(x.grad, expected, rtol=1e-10, atol=1e-12)

    # The check is sensitive: letting gradient flow through w gives a different answer.
    z = logits.clone().requires_grad_()
    q = z.softmax(dim=1)
    q_shift = (q[:, 0] + clip).clamp(max=1.0)
    attached = -(y_pos * (1 - q[:, 1]) * q[:, 1].log() + y_neg * (1 - q_shift) ** 2 * q_shift.log())
    attached.sum().backward()
    assert not torch.allclose(z.grad, expected)


def _mfi_paper_by_hand(t, lam):
    t = np.asarray(t, dtype=np.float64)
    n = len(t)
    total = 0.0
    for i in range(n):
        for j in range(n):
            s = float(t[i] @ t[j]) / (np.linalg.norm(t[i]) * np.linalg.norm(t[j]))
            total += (s - 1) ** 2 if i == j else lam * s**2
    return total


def _mfi_authors_by_hand(t, lam, eps=1e-5):
    t = np.asarray(t, dtype=np.float64)
    t = t / np.linalg.norm(t, axis=1, keepdims=True)
    mean = t.mean(axis=0)
    var = ((t - mean) ** 2).mean(axis=0)  # biased, as BatchNorm in training mode
    z = (t - mean) / np.sqrt(var + eps)
    n = len(z)
    total = 0.0
    for i in range(n):
        for j in range(n):
            c = float(z[i] @ z[j])
            total += (c - 1) ** 2 if i == j else lam * c**2
    return total


# -- docs/METHOD.md formulas, written with NumPy only (no project helper) ----------------------------
EPS = 1e-5  # BatchNorm1d's eps


def _np_bn(t, bn):
    """BatchNorm1d(affine=False) over the rows: batch statistics ("train") or the initial running
    statistics mean 0, variance 1 ("eval")."""
    if bn == "train":
        return (t - t.mean(axis=0)) / np.sqrt(t.var(axis=0) + EPS)  # np.var is the biased one
    return (t - 0.0) / np.sqrt(1.0 + EPS)


def _np_penalty(c, lam):
    off = ~np.eye(len(c), dtype=bool)
    return float(((np.diag(c) - 1) ** 2).sum() + lam * (c[off] ** 2).sum())


def _np_unit(t):
    t = np.asarray(t, dtype=np.float64)
    return t / np.linalg.norm(t, axis=1, keepdims=True)


def _np_mfi(form, pos, neg, lam, bn):
    if form == "paper":  # eq. 1: S = cosine similarities of the C positive prompts
        s = _np_unit(pos) @ _np_unit(pos).T
        return _np_penalty(s, lam)
    if form == "authors-classes":  # c = z z^T per prompt set, summed
        return sum(_np_penalty(_np_bn(_np_unit(t), bn) @ _np_bn(_np_unit(t), bn).T, lam) for t in (pos, neg))
    z = _np_bn(_np_unit(np.concatenate([neg, pos])), bn)  # authors-features: (2C, D')
    return _np_penalty(z.T @ z, lam)  # c = z^T z: (D', D')


@pytest.mark.parametrize("bn", ["train", "eval"])
@pytest.mark.parametrize("form", ["paper", "authors-classes", "authors-features"])
def test_each_mfi_form_equals_its_reference_formula(form, bn):
    g = np.random.default_rng(7)
    common = g.normal(size=12)  # CLIP-like: the classes share a direction
    pos, neg = common + g.normal(size=(5, 12)), common + g.normal(size=(5, 12))  # (C, D')
    for lam in (0.2, 1.0, 0.0051):
        got = mfi_loss(torch.from_numpy(pos), torch.from_numpy(neg), lam=lam, form=form, bn=bn)
        assert float(got) == pytest.approx(_np_mfi(form, pos, neg, lam, bn), rel=1e-10)
    if form != "paper":  # the BatchNorm mode matters to the authors' forms only
        other = {"train": "eval", "eval": "train"}[bn]
        assert float(mfi_loss(torch.from_numpy(pos), torch.from_numpy(neg), lam=1.0, form=form, bn=other)) \
            != pytest.approx(_np_mfi(form, pos, neg, 1.0, bn), rel=1e-3)


def test_authors_classes_in_eval_mode_is_the_paper_form_with_lambda_one_on_both_sets():
    """With the initial statistics z = t / sqrt(1 + eps), so c = S / (1 + eps): every off-diagonal
    term shrinks by (1 + eps)^-2 and each diagonal one is (eps / (1 + eps))^2 instead of 0, a
    relative difference below 2 eps = 2e-5 (tolerance 3e-5); the batch-statistics mode differs."""
    g = torch.Generator().manual_seed(3)
    pos, neg = torch.randn(6, 8, generator=g, dtype=torch.float64), torch.randn(6, 8, generator=g, dtype=torch.float64)
    paper = mfi_loss(pos, lam=1.0, form="paper") + mfi_loss(neg, lam=1.0, form="paper")
    got = mfi_loss(pos, neg, lam=1.0, form="authors-classes", bn="eval")
    assert float(got) == pytest.approx(float(paper), rel=3e-5)
    assert float(got) != float(paper)  # the eps is there
    assert float(mfi_loss(pos, neg, lam=1.0, form="authors-classes", bn="train")) \
        != pytest.approx(float(paper), rel=1e-2)


def test_old_form_name_authors_is_refused():
    with pytest.raises(ValueError, match="authors-classes"):
        mfi_loss(torch.randn(3, 4), torch.randn(3, 4), form="authors")


def test_mfi_paper_is_zero_for_orthogonal_features_and_positive_otherwise():
    q, _ = torch.linalg.qr(torch.randn(8, 5, dtype=torch.float64))  # (8, 5) orthonormal columns
    ortho = q.T * torch.tensor([[0.5], [2.0], [1.0], [3.0], [0.1]], dtype=torch.float64)  # (5, 8)
    assert float(mfi_loss(ortho, lam=0.2)) == pytest.approx(0.0, abs=1e-20)
    entangled = torch.randn(5, 8, dtype=torch.float64) + 2.0  # shared component
    loss = mfi_loss(entangled, lam=0.2)
    assert float(loss) > 0
    assert float(loss) == pytest.approx(_mfi_paper_by_hand(entangled, 0.2), rel=1e-12)
    # Negative prompts play no part in the paper's form.
    torch.testing.assert_close(mfi_loss(entangled, torch.randn(5, 8, dtype=torch.float64)), loss)


def test_mfi_authors_matches_independent_batchnorm_computation():
    pos = torch.randn(6, 4, dtype=torch.float64)
    neg = torch.randn(6, 4, dtype=torch.float64)
    got = mfi_loss(pos, neg, lam=1.0, form="authors-classes", bn="train")
    expected = _mfi_authors_by_hand(pos, 1.0) + _mfi_authors_by_hand(neg, 1.0)
    assert float(got) == pytest.approx(expected, rel=1e-10)
    for form in ("authors-classes", "authors-features"):
        with pytest.raises(ValueError, match="text_neg"):
            mfi_loss(pos, form=form)


def test_mfi_authors_classes_with_batch_statistics_has_trace_floor():
    # Standardised columns over C rows give trace(z z^T) = C * D', so with lam = 0 the diagonal
    # term is at least C * (D' - 1)^2 (Jensen) and never reaches 0 for D' > 1.
    classes, dim = 6, 4
    loss = mfi_loss(torch.randn(classes, dim), torch.randn(classes, dim), lam=0.0, form="authors-classes",
                    bn="train")
    assert float(loss) >= 2 * classes * (dim - 1) ** 2 - 1e-3
    # Two opposite classes t and -t: every column standardises to (+1, -1), so z_1 = 1, z_2 = -1,
    # c = [[D', -D'], [-D', D']] and the loss per set is 2 (D' - 1)^2 + lam * 2 D'^2
    # (BatchNorm eps 1e-5 against column variances >= 0.028 here moves this by well under 0.1%).
    t = torch.rand(dim, dtype=torch.float64) + 0.5
    pair = torch.stack([t, -t])  # (2, D')
    lam = 0.3
    per_set = 2 * (dim - 1) ** 2 + lam * 2 * dim**2
    got = mfi_loss(pair, pair, lam=lam, form="authors-classes", bn="train")
    assert float(got) == pytest.approx(2 * per_set, rel=1e-3)


def test_mfi_rejects_unknown_form():
    with pytest.raises(ValueError, match="form"):
        mfi_loss(torch.randn(3, 4), form="barlow")


def test_train_step_total_is_weighted_asl_plus_alpha_mfi():
    """The paper's L = ASL + alpha*MFI and the authors' 0.999*0.05*ASL + 0.001*MFI are one formula."""
    from pipeline.config.params import load_params
    from pipeline.model.heads import UnmixHead
    from pipeline.training.loop import train_step

    train = load_params(Path(__file__).resolve().parents[1] / "configs" / "params.yaml").train
    g = torch.Generator().manual_seed(0)
    tokens, text = torch.randn(4, 5, 16, generator=g), torch.randn(6, 16, generator=g)
    labels = torch.randint(0, 2, (4, 3), generator=g)
    for asl_weight, alpha in ((1.0, 7e-5), (0.999 * 0.05, 0.001)):
        torch.manual_seed(0)
        head = UnmixHead(16)
        cfg = train.model_copy(update={"asl_weight": asl_weight, "alpha": alpha})
        parts = train_step(head, torch.optim.SGD(head.parameters(), lr=0.0), tokens, labels,
                           {"negative": text[:3], "positive": text[3:]}, cfg)
        assert parts["total"] == pytest.approx(asl_weight * parts["asl"] + alpha * parts["mfi"], rel=1e-6)
