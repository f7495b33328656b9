"""The depth bounds of Joudaki et al. (2023) for the mean-field Grams ``G_ℓ``, as functions.

Theorem 4 (eq. 11): ``−log I(G_ℓ) ≤ C · n · β^(−ℓ)``. The paper's figures draw it with ``C = 1``
(Fig. 3). Appendix B proves it (Theorem B.4, eqs. 26–33) with an explicit constant: for a
unit-diagonal input Gram ``G_0`` (the network normalises its input, so ``G_0`` is the cosine
matrix of the input items),

    −log I(G_ℓ) ≤ 2n γ(G_0) β^(−ℓ) ≤ 4n det(G_0)^(−1) β^(−ℓ)          (eqs. 31–32)

i.e. ``C = 4 / det(G_0) = 4 exp(−n log I(G_0))`` (:func:`theorem4_constant`). The proof
needs ``(n − 1) γ(G_ℓ) ≤ 1/2`` (the Gershgorin lower bound of Lemma B.3 and
``−log(1 − x) ≤ 2x``), which Corollary B.2 guarantees from the depth
``ℓ₀ = ⌈log(2 (n − 1) γ(G_0)) / log β⌉`` on (:func:`theorem4_min_depth`; the extracted text
states the condition as ``ℓ ≳ β⁻¹(−n log I(G_0) + log 4n)``, which is garbled; the condition
above is the one the proof uses).

Corollary B.2 (eq. 22): ``γ(G_ℓ) ≤ γ(G_0) β^(−ℓ)`` with the Lyapunov potential ``γ``
(Definition 4, :func:`isoprobe.metrics.lyapunov_gamma`), at every depth.

All curves are float64 numpy arrays over ``ℓ = 0..depth``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from isoprobe.metrics import isometry_gap, lyapunov_gamma
from isoprobe.theory.mean_field import cosine_matrix

__all__ = ["corollary_b2_bound", "theorem4_bound", "theorem4_constant", "theorem4_min_depth"]


def _check_beta(beta: float) -> float:
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta >= 1):
        raise ValueError(f"beta must be a finite isometry strength >= 1, got {beta!r}")
    return float(beta)


def _check_depth(depth: int) -> int:
    if isinstance(depth, bool) or not isinstance(depth, (int, np.integer)) or depth < 0:
        raise ValueError(f"depth must be an integer >= 0, got {depth!r}")
    return int(depth)


def _unit_input(G0: torch.Tensor) -> torch.Tensor:
    C = cosine_matrix(torch.as_tensor(G0))
    if C.ndim != 2:
        raise ValueError(f"G0 must be one (n, n) Gram, got shape {tuple(C.shape)}")
    if math.isinf(isometry_gap(C).item()):
        raise ValueError("G0 is singular (aligned or duplicated inputs): Theorem 4 assumes non-aligned inputs")
    return C


def theorem4_bound(n: int, beta: float, depth: int, C: float = 1.0) -> np.ndarray:
    """``C · n · β^(−ℓ)`` for ``ℓ = 0..depth`` (Theorem 4; ``C = 1`` is the paper's plotted form)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
        raise ValueError(f"n must be an integer >= 2, got {n!r}")
    if not (C > 0):
        raise ValueError(f"C must be positive, got {C!r}")
    ell = np.arange(_check_depth(depth) + 1, dtype=np.float64)
    return C * n * _check_beta(beta) ** (-ell)


def theorem4_constant(G0: torch.Tensor) -> float:
    """Appendix B's constant ``C = 4 / det(G_0)`` for the cosine matrix ``G_0`` of the inputs.

    ``+inf`` when ``det(G_0)`` underflows (the bound is then vacuous); ``ValueError`` for a
    singular ``G_0``.
    """
    C0 = _unit_input(G0)
    log_c = math.log(4.0) + C0.shape[-1] * isometry_gap(C0).item()  # −log det = n · gap (unit diagonal)
    return math.exp(log_c) if log_c < 709 else math.inf


def theorem4_min_depth(G0: torch.Tensor, beta: float) -> float:
    """Smallest ``ℓ`` with ``γ(G_0) β^(−ℓ) ≤ 1/(2(n − 1))``: from there on the proof of Theorem 4 applies.

    ``0`` if ``G_0`` already qualifies, ``math.inf`` if it never will (``β = 1``).
    """
    C0 = _unit_input(G0)
    beta = _check_beta(beta)
    n = C0.shape[-1]
    gamma0 = lyapunov_gamma(C0).item()
    target = 1.0 / (2 * (n - 1))
    if gamma0 <= target:
        return 0
    if beta == 1.0:
        return math.inf
    return math.ceil(math.log(gamma0 / target) / math.log(beta))


def corollary_b2_bound(G0: torch.Tensor, beta: float, depth: int) -> np.ndarray:
    """``γ(G_0) β^(−ℓ)`` for ``ℓ = 0..depth`` (Corollary B.2), ``G_0`` the inputs' cosine matrix."""
    gamma0 = lyapunov_gamma(_unit_input(G0)).item()
    ell = np.arange(_check_depth(depth) + 1, dtype=np.float64)
    return gamma0 * _check_beta(beta) ** (-ell)
