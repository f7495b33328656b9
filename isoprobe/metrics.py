"""Isometry statistics of Gram matrices: pure functions on tensors.

Every function is batched over any leading dimensions: a Gram argument is shaped
``(..., n, n)`` and a feature argument ``(..., n, d)`` with the ``n`` items as rows. Results are
float64 tensors shaped ``(...)``, whatever the input dtype: half-precision and float32 inputs
give the float64 answer of their own values.

Definitions (Joudaki, Daneshmand & Bach 2023, Definition 1 and §3):

* isometry            ``I(G) = det(G)^(1/n) / (tr(G)/n)``, geometric over arithmetic mean of
                      the eigenvalues, in ``[0, 1]``;
* isometry gap        ``-log I(G) = log(mean λ) - mean(log λ)``, in ``[0, +inf]``;
* orthogonality gap   ``‖G/tr(G) - I/n‖_F`` (Daneshmand et al. 2021);
* Lyapunov potential  ``γ(G) = max_{i≠j} |Ĝ_ij| / (1 - |Ĝ_ij|)`` on the cosine matrix
                      ``Ĝ_ij = G_ij / sqrt(G_ii G_jj)`` (Joudaki et al., Definition 4);
* norm-variation factor ``1 + (1/n) Σ_i (a_i - ā)² / ā²`` of the item norms ``a_i = ‖x_i‖``
                      (Theorem 1, eq. 5);
* effective rank      ``exp(-Σ p_i log p_i)`` with ``p = λ / Σ λ``.

Numerics. The spectral part runs in float64: a Cholesky log-determinant where ``G`` is safely
positive definite, the eigenvalues where it is not. ``G`` counts as singular when its numerical
rank (eigenvalues above ``rtol · λ_max``; by default ``rtol = n · eps`` of ``G``'s own dtype, the
convention of ``numpy.linalg.matrix_rank``) is below ``n``; a singular ``G`` (``n > d`` among
them) has isometry exactly 0 and gap exactly ``+inf``, never NaN nor a huge finite number.
A zero Gram (all items zero) counts as singular too.

Inputs are checked, by one check shared by every function taking ``G``: a ``torch.Tensor`` or
a numpy array of real numbers (integer or floating; bool is a ``TypeError``, complex a
``ValueError``), square ``(..., n, n)`` with ``n >= 1`` (``n >= 2`` for :func:`lyapunov_gamma`,
a maximum over pairs of items), symmetric beyond rounding (``max |G - Gᵀ| ≤ sqrt(eps) ·
max |G|``) and positive semi-definite within rounding (``λ_min(G) ≥ -100 · n · eps · max_i
G_ii``), eps of ``G``'s dtype; a violation is a ``ValueError`` naming it (and the matrix of a
batch). One item is answered where the quantity is defined: ``I = 1``, gap 0, effective and
numerical rank 1, orthogonality gap 0 for a nonzero ``1 × 1`` Gram. Non-finite in, NaN out: a matrix (or
feature block) with a NaN or inf entry gives NaN from every function (``numerical_rank``
included, hence its float64 result), the other matrices of a batch are unaffected; that is the
one documented source of NaN and callers that record statistics flag it.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

__all__ = [
    "SpectralStats",
    "effective_rank",
    "gram",
    "isometry",
    "isometry_gap",
    "lyapunov_gamma",
    "norm_variation_factor",
    "numerical_rank",
    "orthogonality_gap",
    "spectral_stats",
]

# Cholesky is trusted only when its smallest pivot is this many rank tolerances above zero;
# below that the eigenvalues decide (pivots bound λ_min from above, not from below).
_CHOLESKY_MARGIN = 100.0


def _as_tensor(x: object, what: str) -> torch.Tensor:
    """``x`` as a real numeric tensor (a numpy array is converted, sharing its memory); else a
    ``TypeError`` (not an array; bool or non-numeric dtype) or ``ValueError`` (complex)."""
    if isinstance(x, np.ndarray):
        if x.dtype == np.bool_ or x.dtype.kind not in "iufc":
            raise TypeError(f"{what} must hold real numbers, got a numpy array of dtype {x.dtype}")
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor or a numpy array, got {type(x).__name__}")
    if x.dtype == torch.bool:
        raise TypeError(f"{what} must hold real numbers, got dtype torch.bool; convert it first, e.g. {what}.double()")
    if x.is_complex():
        raise ValueError(f"{what} must be real, got dtype {x.dtype}")
    return x


def _check_features(X: object) -> torch.Tensor:
    """Items as rows ``(..., n, d)``, ``n >= 1``, real and numeric (:func:`_as_tensor`)."""
    X = _as_tensor(X, "X")
    if X.ndim < 2 or X.shape[-2] < 1:
        raise ValueError(f"X must be shaped (..., n, d) with n >= 1 items as rows, got shape {tuple(X.shape)}")
    return X


#: A Gram counts as positive semi-definite when ``λ_min(G) ≥ -_PSD_SLACK · n · eps · max_i G_ii``.
_PSD_SLACK = 100.0


def _check_gram(G: object, min_n: int = 1, factorised: bool = False) -> torch.Tensor:
    """The one input check of every function taking a Gram ``G`` (module docstring).

    ``G`` as a tensor (:func:`_as_tensor`: numpy arrays accepted, bool refused), square
    ``(..., n, n)`` with ``n >= min_n``, symmetric beyond rounding (:func:`_check_symmetric`)
    and positive semi-definite within rounding: ``λ_min(G) ≥ -100 · n · eps · max_i G_ii`` (eps
    of G's dtype), tested by a Cholesky factorisation of ``G + 100 · n · eps · max_i G_ii · I``.
    A matrix with a NaN or inf entry passes (it gives NaN out). ``factorised``: the caller
    factorises ``G`` itself (:func:`_spectral_stats`: a Cholesky factor proves ``G`` positive
    definite, its eigenvalue path applies this tolerance), so the PSD test is left to it."""
    G = _as_tensor(G, "G")
    if G.ndim < 2 or G.shape[-1] != G.shape[-2]:
        raise ValueError(f"G must be square, shaped (..., n, n); got shape {tuple(G.shape)}")
    if G.shape[-1] < min_n:
        raise ValueError(
            f"G must have at least n = {min_n} item{'s' * (min_n > 1)}, got shape {tuple(G.shape)} (n = {G.shape[-1]})"
        )
    G = _check_symmetric(G)
    return G if factorised else _check_psd(G)


def _check_psd(G: torch.Tensor) -> torch.Tensor:
    """``G`` unchanged, or ``ValueError`` if a finite matrix of it has an eigenvalue below
    ``-_PSD_SLACK · n · eps · max_i G_ii`` (a Cholesky factorisation of the shifted matrix)."""
    if G.numel() == 0:
        return G
    G64, finite = _finite_or_eye(G)
    n = G64.shape[-1]
    diag = G64.diagonal(dim1=-2, dim2=-1)
    shift = _PSD_SLACK * _default_rtol(G) * diag.amax(-1).clamp_min(0)
    shift = shift.clamp_min(torch.finfo(torch.float64).tiny ** 0.5)
    eye = torch.eye(n, dtype=G64.dtype, device=G64.device)
    info = torch.linalg.cholesky_ex(G64 + shift[..., None, None] * eye).info
    bad = (info != 0) & finite
    if bool(bad.any()):
        worst = int(torch.nonzero(bad.flatten())[0].item())
        lam = torch.linalg.eigvalsh(G64.reshape(-1, n, n)[worst])[0].item()
        _not_psd(lam, worst if bad.numel() > 1 else None)
    return G


def _not_psd(lam: float, index: int | None) -> None:
    raise ValueError(
        f"G is not positive semi-definite: eigenvalue {lam:.3e} below zero beyond rounding"
        + ("" if index is None else f" (matrix {index} of the batch)")
        + "; pass a Gram matrix X Xᵀ (isoprobe.gram(X))"
    )


def _check_symmetric(G: torch.Tensor) -> torch.Tensor:
    """``G`` unchanged, or ``ValueError`` if a finite matrix of it is not symmetric beyond
    rounding: ``max |G - Gᵀ| > sqrt(eps) · max |G|`` (eps of G's dtype), one pass over G."""
    eps = torch.finfo(G.dtype if G.dtype.is_floating_point else torch.float64).eps
    asym = (G - G.mT).abs().amax((-2, -1))
    scale = G.abs().amax((-2, -1))
    bad = asym > eps**0.5 * scale  # False for non-finite matrices (NaN comparisons): NaN out instead
    if bool(bad.any()):
        worst = int(torch.argmax(torch.where(bad, asym / scale, torch.zeros_like(asym))).item())
        rel = (asym / scale).flatten()[worst].item()
        raise ValueError(
            f"G is not symmetric: max |G - Gᵀ| is {rel:.3g} of max |G|"
            + (f" (matrix {worst} of the batch)" if bad.numel() > 1 else "")
            + "; pass a Gram matrix X Xᵀ (isoprobe.gram(X))"
        )
    return G


def _finite_or_eye(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(G64, finite)``: float64 ``G`` with every matrix holding a NaN or inf replaced by the
    identity (so that no factorisation sees it), and the ``(...)`` mask of the finite ones."""
    G64 = G.to(torch.float64)
    finite = torch.isfinite(G64).flatten(-2).all(-1)
    eye = torch.eye(G64.shape[-1], dtype=G64.dtype, device=G64.device)
    return torch.where(finite[..., None, None], G64, eye), finite


def _nan_unless(values: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
    return torch.where(finite, values, torch.full_like(values, torch.nan))


def _default_rtol(G: torch.Tensor) -> float:
    eps = torch.finfo(G.dtype).eps if G.dtype.is_floating_point else torch.finfo(torch.float64).eps
    return G.shape[-1] * eps


def gram(X: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Gram matrix ``G = X Xᵀ`` of items stacked as rows: ``(..., n, d) -> (..., n, n)``.

    Accumulated in float32 or better: half-precision (and integer) inputs are promoted to
    float32, float32 and float64 stay. ``dtype`` forces the accumulation dtype (e.g. float64 for
    a reference).
    """
    X = _check_features(X)
    if dtype is None:
        dtype = X.dtype if X.dtype in (torch.float32, torch.float64) else torch.float32
    Xa = X.to(dtype)
    return Xa @ Xa.mT


class SpectralStats(NamedTuple):
    """What every isometry statistic of a Gram needs, computed once, all float64 ``(...)``.

    ``log_mean_eig = log(tr(G)/n)``; ``mean_log_eig = log det(G) / n`` (``-inf`` if singular);
    ``rank`` the numerical rank (``n`` on the Cholesky path, which proves full rank), float64
    from :func:`spectral_stats` (NaN, like the other two, where ``G`` is not finite).
    """

    log_mean_eig: torch.Tensor
    mean_log_eig: torch.Tensor
    rank: torch.Tensor


def _eigen_stats(G64: torch.Tensor, rtol: float, psd_rtol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean log eigenvalue, numerical rank) from eigenvalues; -inf where rank < n.
    ``ValueError`` where ``λ_min < -_PSD_SLACK · psd_rtol · max_i G_ii`` (:func:`_check_gram`)."""
    eig = torch.linalg.eigvalsh(G64)
    tol = rtol * eig[..., -1:].clamp_min(0)
    floor = _PSD_SLACK * psd_rtol * G64.diagonal(dim1=-2, dim2=-1).amax(-1).clamp_min(0)
    if bool((eig[..., 0] < -floor).any()):
        _not_psd(eig[..., 0].min().item(), None)
    above = eig > tol
    rank = above.sum(-1)
    n = G64.shape[-1]
    mean_log = torch.where(above, eig, torch.ones_like(eig)).log().sum(-1) / n
    mean_log = torch.where(rank == n, mean_log, torch.full_like(mean_log, -torch.inf))
    return mean_log, rank


def _cholesky_mean_log(G64: torch.Tensor, rtol: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched Cholesky of finite float64 Grams: ``(mean log eigenvalue, trusted, L)``.

    ``log det G = 2 Σ log L_ii``; ``trusted`` where the factorisation succeeded with a smallest
    pivot ``L_ii²`` above ``_CHOLESKY_MARGIN · rtol · max_i G_ii`` (``mean_log`` is 0 elsewhere).
    No host synchronisation.
    """
    n = G64.shape[-1]
    L, info = torch.linalg.cholesky_ex(G64)
    pivots = L.diagonal(dim1=-2, dim2=-1).square()
    scale = G64.diagonal(dim1=-2, dim2=-1).amax(-1).clamp_min(torch.finfo(torch.float64).tiny)
    trusted = (info == 0) & (pivots.amin(-1) > _CHOLESKY_MARGIN * rtol * scale)
    mean_log = torch.where(trusted, pivots.log().sum(-1) / n, torch.zeros_like(scale))
    return mean_log, trusted, L


def _finite_matrices(G: torch.Tensor) -> torch.Tensor:
    """Which matrices of ``(..., n, n)`` have only finite entries: a sum is finite iff every
    entry is (an overflowing sum of finite entries is checked entry by entry). One pass."""
    finite = torch.isfinite(G.sum((-2, -1)))
    if not bool(finite.all()):
        finite = torch.isfinite(G).flatten(-2).all(-1)
    return finite


def _spectral_stats(G: torch.Tensor, rtol: float | None = None) -> tuple[SpectralStats, torch.Tensor, torch.Tensor]:
    """:func:`spectral_stats` of a Gram shaped ``(..., n, n)``, ``n >= 2`` (not checked again)
    and its Cholesky part: ``(stats, trusted, L)`` (``L`` is valid where ``trusted``), for
    callers that reuse the factor (rank-one updates of ``G``). ``rank`` is int64, finite or not."""
    psd_rtol = _default_rtol(G)
    if rtol is None:
        rtol = psd_rtol
    G64 = G.to(torch.float64)
    n = G64.shape[-1]
    finite = _finite_matrices(G64)
    if not bool(finite.all()):
        G64 = torch.where(finite[..., None, None], G64, torch.eye(n, dtype=G64.dtype, device=G64.device))
    log_mean = (G64.diagonal(dim1=-2, dim2=-1).sum(-1) / n).log()
    mean_log, trusted, L = _cholesky_mean_log(G64, rtol)
    rank = torch.full_like(mean_log, n, dtype=torch.int64)

    untrusted = ~trusted
    if bool(untrusted.any()):
        eig_mean_log, eig_rank = _eigen_stats(G64[untrusted], rtol, psd_rtol)
        mean_log = mean_log.masked_scatter(untrusted, eig_mean_log)
        rank = rank.masked_scatter(untrusted, eig_rank)

    nan = torch.full_like(log_mean, torch.nan)
    log_mean = torch.where(finite, log_mean, nan)
    mean_log = torch.where(finite, mean_log, nan)
    return SpectralStats(log_mean, mean_log, rank), trusted & finite, L


def spectral_stats(G: torch.Tensor, rtol: float | None = None) -> SpectralStats:
    """Float64 log mean and mean log of the eigenvalues of ``G``, and its numerical rank.

    Cholesky log-determinant (``log det G = 2 Σ log L_ii``) where the factorisation succeeds
    with a smallest pivot well above the rank tolerance, eigenvalues elsewhere. ``G`` is checked
    (module docstring): not symmetric is a ``ValueError``, not finite gives NaN in all three.
    """
    G = _check_gram(G, factorised=True)
    stats, _, _ = _spectral_stats(G, rtol)
    return stats._replace(rank=_nan_unless(stats.rank.to(torch.float64), _finite_matrices(G)))


def isometry_gap(G: torch.Tensor, rtol: float | None = None) -> torch.Tensor:
    """Isometry gap ``-log I(G) = log(tr(G)/n) - log det(G)/n`` (Joudaki et al., §3).

    ``(..., n, n) -> (...)`` float64, in ``[0, +inf]``; ``+inf`` exactly when ``G`` is singular
    (numerical rank below ``n``, see the module docstring for ``rtol``).
    """
    G = _check_gram(G, factorised=True)
    return _gap_of(_spectral_stats(G, rtol)[0], G.shape[-1])


def _gap_of(stats: SpectralStats, n: int) -> torch.Tensor:
    """``log mean λ - mean log λ`` from :class:`SpectralStats`: 0 for a rounding hair below
    zero, ``+inf`` where the rank is below ``n`` (a zero G has rank 0), NaN where G was not finite."""
    gap = stats.log_mean_eig - stats.mean_log_eig
    gap = torch.where(gap < 0, torch.zeros_like(gap), gap)
    return torch.where(stats.rank < n, torch.full_like(gap, torch.inf), gap)


def isometry(G: torch.Tensor, rtol: float | None = None) -> torch.Tensor:
    """Isometry ``I(G) = det(G)^(1/n) / (tr(G)/n)`` (Joudaki et al., Definition 1), in [0, 1]."""
    return torch.exp(-isometry_gap(G, rtol))


def numerical_rank(G: torch.Tensor, rtol: float | None = None) -> torch.Tensor:
    """Number of eigenvalues of ``G`` above ``rtol · λ_max`` (default ``rtol = n · eps``), as
    float64 (a whole number; NaN for a matrix with a NaN or inf entry)."""
    G = _check_gram(G)
    if rtol is None:
        rtol = _default_rtol(G)
    G64, finite = _finite_or_eye(G)
    eig = torch.linalg.eigvalsh(G64)
    return _nan_unless((eig > rtol * eig[..., -1:].clamp_min(0)).sum(-1).to(torch.float64), finite)


def orthogonality_gap(G: torch.Tensor) -> torch.Tensor:
    """Orthogonality gap ``‖G/tr(G) - I_n/n‖_F`` (Daneshmand et al. 2021). NaN for a zero G
    and for non-finite entries."""
    G64, finite = _finite_or_eye(_check_gram(G))
    return _nan_unless(_orthogonality_gap(G64), finite)


def _orthogonality_gap(G: torch.Tensor) -> torch.Tensor:
    """:func:`orthogonality_gap` of a checked ``G``: ``‖G - (tr G / n) I‖_F / tr G`` in float64."""
    D = G.to(torch.float64, copy=True)
    n = D.shape[-1]
    trace = D.diagonal(dim1=-2, dim2=-1).sum(-1)
    D.diagonal(dim1=-2, dim2=-1).sub_((trace / n)[..., None])
    return torch.linalg.matrix_norm(D) / trace


def lyapunov_gamma(G: torch.Tensor) -> torch.Tensor:
    """Lyapunov potential ``γ(G) = max_{i≠j} |Ĝ_ij| / (1 - |Ĝ_ij|)`` (Joudaki et al., Def. 4).

    ``Ĝ`` is the cosine matrix; ``n >= 2`` (a maximum over pairs of items). Two parallel items give ``+inf``; a zero item or a non-finite
    entry gives NaN.
    """
    G64, finite = _finite_or_eye(_check_gram(G, min_n=2))
    n = G64.shape[-1]
    d = G64.diagonal(dim1=-2, dim2=-1).sqrt()
    cos = (G64 / (d[..., :, None] * d[..., None, :])).abs()
    off = ~torch.eye(n, dtype=torch.bool, device=G64.device)
    m = cos[..., off].amax(-1).clamp(max=1.0)  # |cos| > 1 only by rounding
    return _nan_unless(m / (1 - m), finite)


def norm_variation_factor(X: torch.Tensor) -> torch.Tensor:
    """Norm-variation factor ``1 + (1/n) Σ_i (a_i - ā)² / ā²``, ``a_i = ‖x_i‖`` (Theorem 1, eq. 5).

    ``X`` shaped ``(..., n, d)``, items as rows; float64 ``(...)``, at least 1 (NaN if all
    items are zero).
    """
    a = torch.linalg.vector_norm(_check_features(X).to(torch.float64), dim=-1)
    a_bar = a.mean(-1)
    return 1 + ((a - a_bar[..., None]) ** 2).mean(-1) / a_bar**2


def effective_rank(G: torch.Tensor) -> torch.Tensor:
    """Effective rank ``exp(-Σ p_i log p_i)``, ``p = λ / Σλ`` (Roy & Vetterli 2007), in [1, n]
    for a nonzero ``G``; NaN for a matrix with a NaN or inf entry.

    A zero ``G`` has no spectrum to normalise (``p`` is 0/0); its effective rank is 0, its rank
    (:func:`numerical_rank` says 0 as well): the effective rank never exceeds the rank, and a
    batch holding one zero Gram (a dead layer) still gets an answer for the others."""
    G64, finite = _finite_or_eye(_check_gram(G))
    eig = torch.linalg.eigvalsh(G64).clamp_min(0)
    total = eig.sum(-1, keepdim=True)
    p = eig / total.clamp_min(torch.finfo(torch.float64).tiny)
    plogp = torch.where(p > 0, p * p.log(), torch.zeros_like(p))
    erank = torch.where(total[..., 0] > 0, torch.exp(-plogp.sum(-1)), torch.zeros_like(total[..., 0]))
    return _nan_unless(erank, finite)
