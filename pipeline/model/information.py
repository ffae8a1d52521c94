"""Matrix-based Renyi alpha-entropy and mutual information (Sanchez Giraldo et al. 2015; Yu et al. 2019).

Entropy is read off the spectrum of a trace-normalised Gram matrix, so no density is estimated:
for n samples, A = K / trace(K) and S_alpha(A) = 1/(1-alpha) log2 sum_i lambda_i(A)^alpha (bits).
The joint of two views of the same n samples is the Hadamard product, S(A, B) = S(A o B / tr(A o B)),
and I(A; B) = S(A) + S(B) - S(A, B). Used by InfoCLIP (docs/METHOD.md "InfoCLIP objective").

Kernels have ones on the diagonal (Gaussian; cosine of L2-normalised rows). That is what the
bounds need: with B of unit diagonal the spectrum of A o B is majorised by that of A (Bapat &
Sunder 1985) and S_alpha is Schur-concave, so S(A o B) >= max(S(A), S(B)) and I(A; B) <=
min(S(A), S(B)) for every alpha. The lower bound I >= 0 (subadditivity) is not a theorem for
alpha > 1: small negative values occur (a 3-point example in the tests gives -0.03 bits at
alpha = 2); for alpha <= 1 none were found. Note I(A; A) != S(A): the joint of A with itself
is the Hadamard square A o A.

Cost, for n samples of d features: the Gram matrix is O(n^2 d); alpha = 2 is O(n^2)
(sum lambda^2 = ||A||_F^2, no eigendecomposition); any other alpha is an O(n^3) eigendecomposition.
Keep n small (InfoCLIP subsamples tokens, n = 64 by default).

Gradients: spectral sums sum f(lambda_i) have the well-defined gradient V diag(f'(lambda)) V^T even
for repeated eigenvalues, and torch's eigvalsh backward uses exactly that form (no 1/(lambda_i -
lambda_j) terms, unlike eigenvector gradients), so the eigenvalue path is finite on degenerate
spectra (tested). It is O(n^3) and eigenvalues near 0 are masked (f'(0) is infinite for alpha <= 1),
so alpha = 2 is the default: exact, cheapest, and smooth.
"""
from __future__ import annotations

from typing import Literal

import torch

Kernel = Literal["gaussian", "linear"]

_EIG_FLOOR = 1e-12  # eigenvalues below this (after trace normalisation) count as exactly 0


def median_sigma(x: torch.Tensor) -> torch.Tensor:
    """Kernel width by the median heuristic: the median pairwise Euclidean distance of the rows.

    Scale-equivariant (sigma(c x) = c sigma(x)), so the Gram matrix, and every entropy, does not
    depend on the feature scale; Scott's rule n^(-1/(4+d)) (Yu et al.) assumes unit-variance features
    and tends to 1 for CLIP-sized d. Kept in the autograd graph: the estimator is then one fixed
    function of the features and the optimiser follows its true gradient. A detached width moves
    the objective under the optimiser (in a toy run, maximised MI rose and then fell).
    Falls back to 1 when all rows coincide.
    """
    x = x.to(torch.float64)
    n = x.shape[0]
    if n < 2:
        return torch.ones((), dtype=torch.float64, device=x.device)
    sq = _squared_distances(x)  # (n, n)
    off = sq[~torch.eye(n, dtype=torch.bool, device=x.device)]  # (n*(n-1),)
    med = off.median()  # median commutes with the monotone sqrt
    return torch.where(med > 0, med, torch.ones_like(med)).sqrt()  # where first: no inf * 0 at 0


def _squared_distances(x: torch.Tensor) -> torch.Tensor:
    """||x_i - x_j||^2 via the Gram expansion: O(n^2 d) time, O(n^2) memory; exact 0 diagonal."""
    sq_norm = (x * x).sum(dim=1)  # (n,)
    sq = sq_norm[:, None] + sq_norm[None, :] - 2.0 * (x @ x.T)  # (n, n)
    sq = sq.clamp_min(0.0)  # rounding can make it slightly negative
    return sq * (1.0 - torch.eye(x.shape[0], dtype=x.dtype, device=x.device))


def gram_matrix(
    x: torch.Tensor, kernel: Kernel = "gaussian", sigma: float | torch.Tensor | None = None
) -> torch.Tensor:
    """Gram matrix (n, n) in float64 of the rows of x (n, d), ones on the diagonal.

    gaussian: exp(-||x_i - x_j||^2 / (2 sigma^2)), sigma = `median_sigma(x)` when None.
    linear: cosine similarity of the L2-normalised rows. It is PSD with unit diagonal as it is;
    no clamping at 0 (that would break PSD) and no shift is needed. Entries may be negative.
    """
    x = x.to(torch.float64)
    if kernel == "gaussian":
        s = median_sigma(x) if sigma is None else torch.as_tensor(sigma, dtype=torch.float64)
        return torch.exp(-_squared_distances(x) / (2.0 * s.to(x.device) ** 2))
    if kernel == "linear":
        xn = torch.nn.functional.normalize(x, dim=1)  # (n, d)
        k = xn @ xn.T  # (n, n)
        return 0.5 * (k + k.T)  # exactly symmetric for eigvalsh
    raise ValueError(f"unknown kernel {kernel!r}: expected 'gaussian' or 'linear'")


def normalise_gram(k: torch.Tensor) -> torch.Tensor:
    """A = K / trace(K): a PSD matrix of unit trace, i.e. a density matrix whose spectrum sums to 1."""
    return k / torch.diagonal(k, dim1=-2, dim2=-1).sum(-1)[..., None, None]


def renyi_entropy(a: torch.Tensor, alpha: float = 2.0) -> torch.Tensor:
    """S_alpha(A) in bits of a PSD Gram matrix (normalised here to unit trace; idempotent).

    alpha = 2: -log2 ||A||_F^2, no eigendecomposition. alpha = 1: von Neumann (Shannon limit),
    -sum lambda log2 lambda. Else the eigenvalue formula in float64, eigenvalues clamped at 0.
    Ranges from 0 (rank one) to log2(n) (A = I / n).
    """
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    a = normalise_gram(a.to(torch.float64))
    if alpha == 2.0:
        return -torch.log2((a * a).sum(dim=(-2, -1)))
    lam = torch.linalg.eigvalsh(0.5 * (a + a.transpose(-2, -1)))  # (..., n) ascending
    keep = lam > _EIG_FLOOR
    safe = torch.where(keep, lam, torch.ones_like(lam))  # avoids inf * 0 = NaN in the backward
    if alpha == 1.0:
        return -torch.where(keep, safe * torch.log2(safe), torch.zeros_like(lam)).sum(-1)
    power_sum = torch.where(keep, safe**alpha, torch.zeros_like(lam)).sum(-1)
    return torch.log2(power_sum) / (1.0 - alpha)


def joint_entropy(a: torch.Tensor, b: torch.Tensor, alpha: float = 2.0) -> torch.Tensor:
    """S_alpha(A, B) = S_alpha(A o B / trace(A o B)) for two Gram matrices of the same n samples."""
    return renyi_entropy(normalise_gram(a.to(torch.float64)) * normalise_gram(b.to(torch.float64)), alpha)


def mutual_information(a: torch.Tensor, b: torch.Tensor, alpha: float = 2.0) -> torch.Tensor:
    """I_alpha(A; B) = S(A) + S(B) - S(A, B) in bits; symmetric, I <= min(S(A), S(B)).

    No negative value was found for alpha <= 1; for alpha > 1 it can dip slightly below 0
    (module docstring).
    """
    return renyi_entropy(a, alpha) + renyi_entropy(b, alpha) - joint_entropy(a, b, alpha)


def mutual_information_features(
    x: torch.Tensor,
    y: torch.Tensor,
    alpha: float = 2.0,
    kernel: Kernel = "gaussian",
    sigma_x: float | None = None,
    sigma_y: float | None = None,
) -> torch.Tensor:
    """I_alpha between paired feature batches x (n, d_x) and y (n, d_y), row i of each = sample i."""
    return mutual_information(
        gram_matrix(x, kernel, sigma_x), gram_matrix(y, kernel, sigma_y), alpha
    )

