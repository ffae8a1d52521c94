"""Matrix-based Renyi entropy and mutual information: the properties of docs/METHOD.md "Matrix-based Rényi entropy"."""
import math

import numpy as np
import pytest
import torch

from pipeline.model.information import (
    gram_matrix,
    joint_entropy,
    median_sigma,
    mutual_information,
    mutual_information_features,
    normalise_gram,
    renyi_entropy,
)

ALPHAS = (0.5, 1.0, 1.01, 2.0, 3.0)


def _random_gram_pairs(count: int, seed: int):
    """Unit-diagonal Gram pairs of random sizes, widths, kernels, dependent or not."""
    g = torch.Generator().manual_seed(seed)
    for i in range(count):
        n = int(torch.randint(3, 33, (1,), generator=g))
        x = torch.randn(n, int(torch.randint(1, 8, (1,), generator=g)), generator=g)
        y = torch.randn(n, int(torch.randint(1, 8, (1,), generator=g)), generator=g)
        if i % 2:  # y depends on x
            y = x[:, :1] + 0.2 * y
        kernel = "linear" if i % 3 == 0 else "gaussian"
        yield gram_matrix(x, kernel), gram_matrix(y, kernel)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_entropy_is_log2_n_for_identity_and_zero_for_rank_one(alpha):
    n = 8
    assert renyi_entropy(torch.eye(n), alpha).item() == pytest.approx(math.log2(n), abs=1e-9)
    assert renyi_entropy(torch.ones(n, n), alpha).item() == pytest.approx(0.0, abs=1e-9)
    v = torch.randn(n, 1, dtype=torch.float64)
    assert renyi_entropy(v @ v.T, alpha).item() == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("alpha", (0.5, 1.0, 3.0))
def test_entropy_matches_numpy_eigenvalues(alpha):
    k = gram_matrix(torch.randn(20, 3))
    lam = np.clip(np.linalg.eigvalsh((k / torch.trace(k)).numpy()), 0, None)
    if alpha == 1.0:
        lam = lam[lam > 1e-12]
        expected = -(lam * np.log2(lam)).sum()
    else:
        expected = np.log2((lam**alpha).sum()) / (1 - alpha)
    assert renyi_entropy(k, alpha).item() == pytest.approx(expected, abs=1e-9)


def test_von_neumann_is_the_alpha_to_one_limit():
    k = gram_matrix(torch.randn(24, 4))
    s1 = renyi_entropy(k, 1.0).item()
    assert renyi_entropy(k, 1.0 + 1e-5).item() == pytest.approx(s1, abs=1e-4)
    assert renyi_entropy(k, 1.0 - 1e-5).item() == pytest.approx(s1, abs=1e-4)


def test_alpha2_fast_path_equals_eigenvalue_path_in_value_and_gradient():
    x = torch.randn(30, 5, dtype=torch.float64, requires_grad=True)
    fast = renyi_entropy(gram_matrix(x), 2.0)
    (g_fast,) = torch.autograd.grad(fast, x)
    a = normalise_gram(gram_matrix(x))
    eig = -torch.log2((torch.linalg.eigvalsh(a).clamp_min(0) ** 2).sum())
    (g_eig,) = torch.autograd.grad(eig, x)
    assert fast.item() == pytest.approx(eig.item(), abs=1e-10)
    torch.testing.assert_close(g_fast, g_eig, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_joint_entropy_is_at_least_each_marginal(alpha):
    for a, b in _random_gram_pairs(40, seed=1):
        joint = joint_entropy(a, b, alpha)
        assert joint >= renyi_entropy(a, alpha) - 1e-9
        assert joint >= renyi_entropy(b, alpha) - 1e-9


@pytest.mark.parametrize("alpha", ALPHAS)
def test_mutual_information_is_symmetric_and_below_the_smaller_entropy(alpha):
    for a, b in _random_gram_pairs(40, seed=2):
        i_ab = mutual_information(a, b, alpha)
        assert i_ab.item() == pytest.approx(mutual_information(b, a, alpha).item(), abs=1e-10)
        assert i_ab <= torch.minimum(renyi_entropy(a, alpha), renyi_entropy(b, alpha)) + 1e-9
        if alpha <= 1.0:  # subadditivity holds here; see the next test for alpha > 1
            assert i_ab >= -1e-9


def test_mutual_information_can_dip_below_zero_for_alpha_above_one():
    """Documents a limit of the estimator: the Hadamard joint is not subadditive for alpha > 1."""
    a = gram_matrix(torch.tensor([[-0.74], [-0.33], [-1.11]]), sigma=1.0)
    b = gram_matrix(torch.tensor([[-2.15], [0.01], [0.06]]), sigma=1.0)
    assert -0.05 < mutual_information(a, b, 2.0).item() < -0.01
    assert mutual_information(a, b, 1.0).item() > 0


@pytest.mark.parametrize("alpha", (1.0, 2.0))
def test_self_information_is_not_the_entropy(alpha):
    a = gram_matrix(torch.randn(16, 3))
    s = renyi_entropy(a, alpha)
    i_aa = mutual_information(a, a, alpha)
    hadamard_square = renyi_entropy(a * a, alpha)
    torch.testing.assert_close(i_aa, 2 * s - hadamard_square)
    assert i_aa < s - 0.05  # the joint of A with itself is A o A, whose entropy exceeds S(A)
    eye = torch.eye(16)  # the one case where A o A = A (up to scale): I(A; A) = S(A)
    assert mutual_information(eye, eye, alpha).item() == pytest.approx(math.log2(16), abs=1e-9)


@pytest.mark.parametrize("alpha", (1.0, 2.0))
def test_mutual_information_is_invariant_to_permuting_samples_together(alpha):
    x, y = torch.randn(20, 3), torch.randn(20, 2)
    y = y + x[:, :2]
    perm = torch.randperm(20)
    i = mutual_information_features(x, y, alpha)
    i_perm = mutual_information_features(x[perm], y[perm], alpha)
    assert i_perm.item() == pytest.approx(i.item(), abs=1e-9)


@pytest.mark.parametrize("alpha", (1.0, 2.0))
@pytest.mark.parametrize("seed", (0, 1, 2))
def test_dependent_features_carry_more_information_than_shuffled_ones(alpha, seed):
    """y = f(x) + noise against the same y with its rows shuffled: equal marginals, no dependence."""
    def information(dtype: torch.dtype) -> tuple[float, float]:  # the same draws, computed in dtype
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(96, 8, generator=g).to(dtype)
        w = torch.randn(8, 8, generator=g).to(dtype) / math.sqrt(8)
        y = torch.tanh(x @ w) + 0.05 * torch.randn(96, 8, generator=g).to(dtype)
        y_independent = y[torch.randperm(96, generator=g)]
        return (mutual_information_features(x, y, alpha).item(),
                mutual_information_features(x, y_independent, alpha).item())

    i_dep, i_ind = information(torch.float32)
    # measured: alpha 1 about 1.0 vs 0.6, alpha 2 about 0.22 vs 0.05 bits
    assert i_dep > i_ind + 0.1
    assert i_dep > 1.5 * i_ind
    # both by 10x their distance from the same numbers in float64
    dep64, ind64 = information(torch.float64)
    assert i_dep - i_ind - 0.1 >= 10 * (abs(i_dep - dep64) + abs(i_ind - ind64))
    assert i_dep - 1.5 * i_ind >= 10 * (abs(i_dep - dep64) + 1.5 * abs(i_ind - ind64))


def test_median_width_rule_is_scale_equivariant_so_information_is_scale_free():
    x, y = torch.randn(40, 4, dtype=torch.float64), torch.randn(40, 3, dtype=torch.float64)
    y = y + x[:, :3] ** 2
    assert median_sigma(7.0 * x).item() == pytest.approx(7.0 * median_sigma(x).item(), rel=1e-12)
    d = torch.cdist(x, x)
    off = d[~torch.eye(40, dtype=torch.bool)]
    assert median_sigma(x).item() == pytest.approx(off.median().item(), rel=1e-9)
    i = mutual_information_features(x, y).item()
    assert mutual_information_features(7.0 * x, 0.01 * y).item() == pytest.approx(i, abs=1e-9)


def test_gaussian_gram_matches_its_definition_and_linear_gram_is_a_correlation_matrix():
    x = torch.randn(12, 5, dtype=torch.float64)
    expected = torch.exp(-torch.cdist(x, x) ** 2 / (2 * 1.5**2))
    torch.testing.assert_close(gram_matrix(x, sigma=1.5), expected)
    k = gram_matrix(x, "linear")
    torch.testing.assert_close(torch.diagonal(k), torch.ones(12, dtype=torch.float64))
    assert torch.linalg.eigvalsh(k).min() > -1e-10
    assert (k < 0).any()  # not clamped: clamping would break positive semi-definiteness


@pytest.mark.parametrize("alpha", ALPHAS)
def test_near_singular_grams_give_finite_values_and_gradients(alpha):
    """Rank-one or nearly so: identical rows (median width falls back to 1), or a huge width."""
    base = torch.randn(1, 4, dtype=torch.float64)
    y = torch.randn(16, 2, dtype=torch.float64)
    jitter = 1e-7 * torch.randn(16, 4, dtype=torch.float64)
    for x0, sigma in ((base.repeat(16, 1), None), (base.repeat(16, 1) + jitter, 1.0), (base + jitter, 1e4)):
        x = x0.clone().requires_grad_(True)
        i = mutual_information(gram_matrix(x, sigma=sigma), gram_matrix(y), alpha)
        (grad,) = torch.autograd.grad(i, x)
        assert torch.isfinite(i) and torch.isfinite(grad).all()
        assert abs(i.item()) < 1e-6  # an (almost) all-ones Gram: x carries no information


def test_eigenvalue_gradient_is_finite_and_exact_on_a_fully_degenerate_spectrum():
    """A = I/n has one n-fold eigenvalue; compare with the eigen-free form via tr(A^3)."""
    n = 6
    a = (torch.eye(n, dtype=torch.float64) / n).requires_grad_(True)
    (g_eig,) = torch.autograd.grad(renyi_entropy(a, 3.0), a)
    a2 = a.detach().clone().requires_grad_(True)
    an = a2 / torch.trace(a2)
    (g_trace,) = torch.autograd.grad(-0.5 * torch.log2(torch.trace(an @ an @ an)), a2)
    assert torch.isfinite(g_eig).all()
    torch.testing.assert_close(g_eig, g_trace)
