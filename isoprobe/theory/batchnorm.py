"""Closed-form predictions for the batch-norm MLPs of Meterez et al. (2024, §3): pure functions, no I/O.

The chain (Meterez et al. 2024, eq. 3–4) is ``H_{ℓ+1} = BN(W_ℓ H_ℓ)`` with ``H_ℓ ∈ R^{d×n}``
(features × samples), ``W_ℓ`` Haar-orthogonal and ``BN`` dividing each feature (row) by its
RMS over the batch, without mean reduction. ``φ`` is the isometry gap (Joudaki et al. 2023, Def. 1).

Rate of Theorem 1, as far as it can be recovered. The extracted paper text lost its formulas;
the theorem states that ``E φ(H_ℓ)`` decays exponentially in depth at a width-dependent rate,
and the authors' public notebook draws it as ``φ(H_0) · exp(-ℓ / k)`` with
``k = C d² (1 + d φ(H_0))`` and ``C = 0.015`` (:func:`meterez_bound`). That is a worst-case
bound whose constant was chosen for their widths (50, 100); it is not valid as drawn at small
widths. The sharp rate in the square case ``n = d`` follows from the same two Weingarten
moments the paper's Appendix A uses, ``E[O₁₁⁴] = 3/(d(d+2))`` and ``E[O₁₁² O₁₂²] = 1/(d(d+2))``
for Haar ``O`` (:func:`haar_fourth_moments`):

  write the rotated feature covariance ``W C Wᵀ = λ̄ (I + E)``, ``E = O diag(ε) Oᵀ``,
  ``Σ ε_k = 0``. The RMS batch norm rescales rows and columns to a unit diagonal, so the
  new covariance is ``I + F`` with ``F`` the off-diagonal part of ``E`` (to first order), and
  ``φ(I + F) = ‖F‖²_F / (2d) + O(‖F‖³)``. Since ``E Σ_i E_ii² = 2 Σ ε² / (d + 2)``,

      E[φ(H_{ℓ+1}) | H_ℓ] = d/(d+2) · φ(H_ℓ) + O(φ^{3/2}),

so near isometry ``φ`` decays like ``(d/(d+2))^ℓ``: rate ``log(1 + 2/d)`` per layer, about
``2/d`` (:func:`isometry_gap_rate`). This derivation is ours (the leading order of the
paper's Theorem 3 computation), stated so that the experiment has a sharp prediction to test.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "METEREZ_FIG1_C",
    "haar_fourth_moments",
    "isometry_gap_contraction",
    "isometry_gap_rate",
    "meterez_bound",
    "shaped_gains",
]

#: The constant ``C`` of ``k = C d² (1 + d φ₀)`` in the authors' Fig. 1 notebook (a plotting
#: choice, not a proven value).
METEREZ_FIG1_C = 0.015


def _check_width(d: int) -> int:
    if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1:
        raise ValueError(f"width d must be a positive integer, got {d!r}")
    return int(d)


def haar_fourth_moments(d: int) -> tuple[float, float]:
    """``(E[O₁₁⁴], E[O₁₁² O₁₂²]) = (3/(d(d+2)), 1/(d(d+2)))`` for ``O`` Haar on O(d).

    The two Weingarten integrals of Meterez et al., App. A (Lemma A.4's proof); a row of a Haar
    matrix is uniform on the sphere, whose fourth moments these are. The second needs ``d ≥ 2``.
    """
    d = _check_width(d)
    if d < 2:
        raise ValueError(f"E[O11² O12²] needs d >= 2, got d = {d}")
    return 3.0 / (d * (d + 2)), 1.0 / (d * (d + 2))


def isometry_gap_contraction(d: int) -> float:
    """Leading-order factor ``E[φ(H_{ℓ+1}) | H_ℓ] / φ(H_ℓ) = d / (d + 2)`` near isometry (``n = d``)."""
    d = _check_width(d)
    return d / (d + 2)


def isometry_gap_rate(d: int) -> float:
    """Asymptotic exponential rate ``log(1 + 2/d)`` of the isometry gap per layer (``n = d``)."""
    return math.log1p(2.0 / _check_width(d))


def meterez_bound(depth: np.ndarray | int, d: int, gap0: float, C: float = METEREZ_FIG1_C) -> np.ndarray:
    """Theorem 1 as drawn in the authors' Fig. 1: ``φ₀ · exp(-ℓ / (C d² (1 + d φ₀)))``.

    ``depth`` may be an array of layer indices; returns a float64 array of the same shape.
    """
    d = _check_width(d)
    if not (math.isfinite(gap0) and gap0 >= 0):
        raise ValueError(f"gap0 must be a finite isometry gap >= 0, got {gap0!r}")
    if not C > 0:
        raise ValueError(f"C must be positive, got {C!r}")
    ell = np.asarray(depth, dtype=np.float64)
    k = C * d**2 * (1.0 + d * gap0)
    return gap0 * np.exp(-ell / k)


def shaped_gains(depth: int, gain: float = 1.0, exponent: float = 0.0) -> np.ndarray:
    """Pre-activation gains ``γ_ℓ = gain · ℓ^(-exponent)``, ``ℓ = 1..depth`` (Meterez et al., App. E).

    App. E measures the per-layer explosion rate as a function of a constant gain, finds it
    shrinking as a power of the gain, and chooses a gain that decays polynomially in depth so
    that the summed rates behave like a convergent harmonic-type series; the "gain exponent"
    is that power (the authors' code applies ``(ℓ)^(-exponent)`` with layers counted from 1).
    ``exponent = 0`` is the unshaped activation.
    """
    if isinstance(depth, bool) or not isinstance(depth, (int, np.integer)) or depth < 1:
        raise ValueError(f"depth must be a positive integer, got {depth!r}")
    if not (math.isfinite(gain) and gain > 0):
        raise ValueError(f"gain must be a positive finite number, got {gain!r}")
    if not (math.isfinite(exponent) and exponent >= 0):
        raise ValueError(f"gain exponent must be finite and >= 0, got {exponent!r}")
    ell = np.arange(1, int(depth) + 1, dtype=np.float64)
    return gain * ell ** (-exponent)
