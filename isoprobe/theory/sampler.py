"""Random-init LayerNorm MLPs, simulated: the fast exact sampler and the dense reference.

Both compute the Gram matrices ``G_ℓ = x_ℓ x_ℓᵀ / d_ℓ`` (``ℓ = 0..L``) of the network of
:class:`~isoprobe.theory.spec.LNMLPSpec` on a fixed input batch, over ``runs`` independent
draws of the weights, as one ``(runs, L + 1, n, n)`` float64 tensor.

``"dense"`` multiplies by real random weights, ``O(d² n)`` per layer and run.

``"sampler"`` never forms ``W`` (derivation below): the activation and the
norm act on each feature (row of ``Wx``) identically, so one layer only needs the *law* of
the pre-activations ``H = X Wᵀ`` (``n × d_out``) given ``X`` (``n × d_in``, items as rows), and
that law depends on ``X`` only through its Gram ``G = X Xᵀ``:

* Gaussian weights (iid entries of variance ``v``; Xavier is the same with another ``v``): the
  ``d_out`` columns of ``H`` are iid ``N(0, v G)``, so ``H = sqrt(v) F Z`` with ``F Fᵀ = G`` and
  ``Z`` an ``n × d_out`` standard normal matrix;
* Haar (semi-)orthogonal weights ``W = s · M[:d_out, :d_in]`` (``M`` Haar on ``O(D)``,
  ``D = max(d_in, d_out)``, ``s = sqrt(D/d_in)``): write ``Xᵀ = U R`` with ``U`` a
  ``d_in × k`` orthonormal frame, ``k = min(n, d_in)``, ``Rᵀ R = G``; then ``M [U; 0]`` is a
  uniformly random ``D × k`` frame ``Q``, so ``Hᵀ = s · (Q R)[:d_out]``.

``F`` is the Cholesky factor of ``G`` where ``G`` is safely positive definite, and
``V Λ₊^{1/2}`` from the eigendecomposition ``G = V Λ Vᵀ`` where it is not (rank-deficient
``G``, which near-collapsed representations have); ``R = Fᵀ``, from the top ``k`` eigenpairs
when ``n > d_in``. Cost per layer:
``O(d n²)`` instead of ``O(d² n)``, with the same distribution of every ``G_ℓ`` (equal in law,
not draw by draw). All runs are one batched computation.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from isoprobe.activations import ActivationLike
from isoprobe.theory.spec import LayerPlan, LNMLPSpec

__all__ = ["METHODS", "sample_weight", "simulate", "simulate_spec", "weight_generator"]

METHODS = ("sampler", "dense")


def weight_generator(seed: int, run: int, layer: int, device: torch.device | str | None = None) -> torch.Generator:
    """The generator of the weights of one (run, layer): independent streams, stable by index.

    The dense reference and :class:`isoprobe.nets.LNMLP` draw the same ``W`` for the same
    ``(seed, run, layer)``.
    """
    state = np.random.SeedSequence([int(seed), int(run), int(layer)]).generate_state(2, np.uint64)
    gen = torch.Generator(device=torch.device(device) if device is not None else "cpu")
    gen.manual_seed(int(state[0] >> np.uint64(1)))
    return gen


def sample_weight(
    spec: LNMLPSpec,
    layer: LayerPlan,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """One weight matrix ``W`` (``d_out × d_in``) of the law ``spec.weights`` prescribes."""
    d_out, d_in = layer.d_out, layer.d_in
    if spec.weights == "orthogonal":
        D, k = max(d_in, d_out), min(d_in, d_out)
        Z = torch.randn(D, k, generator=generator, dtype=torch.float64, device=device)
        Q, R = torch.linalg.qr(Z)
        Q = Q * torch.sign(R.diagonal())  # Haar, not QR's biased signs (Mezzadri 2007)
        W = Q if d_out >= d_in else Q.mT
        return (W * math.sqrt(D / d_in)).to(dtype)
    std = math.sqrt(spec.weight_variance(d_in, d_out))
    return (torch.randn(d_out, d_in, generator=generator, dtype=torch.float64, device=device) * std).to(dtype)


def _factor(G: torch.Tensor, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``F`` (``... × n × k``) with ``F Fᵀ = G`` for a batch of PSD matrices, and a divergence flag.

    ``k = n`` (``rank=None``): the Cholesky factor where ``G`` is safely positive definite (it
    depends continuously on ``G``, so the same seed gives nearby draws for nearby inputs), and
    ``V Λ₊^{1/2}`` from the eigendecomposition where it is not (rank-deficient ``G``).
    ``k = rank < n``: the top-``k`` eigenpairs (``G`` has at most that rank; the rest is
    rounding). Each ``G`` is scaled by its mean diagonal for the decomposition, so magnitudes
    near the float range do not stall it. ``G`` with non-finite entries (an overflowed
    representation) is flagged in the second output and factored as the identity.
    """
    n = G.shape[-1]
    bad = ~torch.isfinite(G).flatten(-2).all(-1)
    eye = torch.eye(n, dtype=G.dtype, device=G.device)
    G = torch.where(bad[..., None, None], eye, (G + G.mT) / 2)
    scale = G.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(torch.finfo(G.dtype).tiny)[..., None, None]
    G = G / scale
    rtol = n * torch.finfo(G.dtype).eps  # numerical-rank tolerance, as in isoprobe.metrics

    def eigen_factor(G: torch.Tensor) -> torch.Tensor:
        lam, V = torch.linalg.eigh(G)
        lam = torch.where(lam > rtol * lam[..., -1:], lam, torch.zeros_like(lam))  # exact null space
        return V * lam.sqrt().unsqueeze(-2)

    if rank is None:
        F, info = torch.linalg.cholesky_ex(G)
        # trusted where every Schur complement is well above the rank tolerance (cf. metrics)
        ok = (info == 0) & (F.diagonal(dim1=-2, dim2=-1).square().amin(-1) > 1e4 * rtol)
        if not bool(ok.all()):
            F = F.clone()
            F[~ok] = eigen_factor(G[~ok])
    else:
        F = eigen_factor(G)[..., -rank:]
    return F * scale.sqrt(), bad


def _mark_diverged(H: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
    """NaN pre-activations (in place) for the runs whose representation overflowed."""
    if bool(bad.any()):
        H[bad] = torch.nan
    return H


def _gaussian_preactivation(G: torch.Tensor, d_out: int, variance: float, gen: torch.Generator) -> torch.Tensor:
    """``H`` (``R × n × d_out``) with iid columns ``N(0, variance · G)``: ``H = sqrt(v) F Z``."""
    F, bad = _factor(G)
    Z = torch.randn(*G.shape[:-1], d_out, generator=gen, dtype=G.dtype, device=G.device)
    return _mark_diverged((math.sqrt(variance) * F) @ Z, bad)


def _haar_preactivation(G: torch.Tensor, d_in: int, d_out: int, gen: torch.Generator) -> torch.Tensor:
    """``H = X Wᵀ`` in law, given ``G = X Xᵀ``, for Haar (semi-)orthogonal ``W`` of entry variance ``1/d_in``."""
    runs, n = G.shape[:2]
    D, k = max(d_in, d_out), min(n, d_in)
    F, bad = _factor(G, rank=None if k == n else k)  # Xᵀ = U R with R = Fᵀ (k × n)
    Z = torch.randn(runs, D, k, generator=gen, dtype=G.dtype, device=G.device)
    Q, T = torch.linalg.qr(Z)
    Q = Q * torch.sign(T.diagonal(dim1=-2, dim2=-1)).unsqueeze(-2)
    return _mark_diverged(math.sqrt(D / d_in) * (Q[:, :d_out] @ F.mT).mT, bad)


def _input(X0: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if not isinstance(X0, torch.Tensor):
        X0 = torch.as_tensor(np.asarray(X0))
    if X0.ndim != 2 or X0.shape[0] < 2 or X0.shape[1] < 2:
        raise ValueError(
            f"X0 must be shaped (n, d0) with n >= 2 items as rows and d0 >= 2 features, got {tuple(X0.shape)}"
        )
    if not torch.isfinite(X0).all():
        raise ValueError("X0 has non-finite entries")
    return X0.to(device=device, dtype=dtype)


def _check_runs(runs: int) -> None:
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
        raise ValueError(f"runs must be a positive integer, got {runs!r}")


def simulate_spec(
    spec: LNMLPSpec,
    X0: torch.Tensor,
    runs: int = 1,
    method: str = "sampler",
    seed: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Grams ``(runs, L + 1, n, n)`` of ``x_0..x_L`` of ``spec`` on ``X0`` (``n × d0``, items as rows).

    ``G_ℓ = x_ℓ x_ℓᵀ / d_ℓ``; index 0 is the normalised input ``LN(X0)``, identical in every
    run. ``method="sampler"`` is the fast sampler, ``"dense"`` the real-weight reference (see
    the module docstring); runs differ by their weights only. A run whose representation
    overflows (e.g. ``exp`` without normalisation) has non-finite Grams from that layer on,
    with either method; :func:`isoprobe.metrics.isometry_gap` gives NaN for them, which the
    reproductions count as collapsed.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    _check_runs(runs)
    device = torch.device(device) if device is not None else torch.device("cpu")
    X = spec.input_map(_input(X0, device, dtype)).expand(runs, *X0.shape).contiguous()
    G = X @ X.mT  # the raw Gram: recorded (over d) and, for the sampler, all the next layer needs
    grams = [G / X.shape[-1]]
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    for ell, layer in enumerate(spec.plan(X0.shape[1])):
        if method == "dense":
            H = torch.stack(
                [
                    X[r] @ sample_weight(spec, layer, weight_generator(seed, r, ell, device), dtype, device).mT
                    for r in range(runs)
                ]
            )
        elif spec.weights == "orthogonal":
            H = _haar_preactivation(G, layer.d_in, layer.d_out, gen)
        else:
            H = _gaussian_preactivation(G, layer.d_out, spec.weight_variance(layer.d_in, layer.d_out), gen)
        X = spec.block_map(H, layer)
        G = X @ X.mT
        grams.append(G / X.shape[-1])
    return torch.stack(grams, dim=1)


def simulate(
    act: ActivationLike,
    X0: torch.Tensor,
    depth: int,
    width: int,
    runs: int = 1,
    method: str = "sampler",
    weights: str = "gaussian",
    gain: float = 1.0,
    seed: int = 0,
    device: torch.device | str | None = None,
    **switches,
) -> torch.Tensor:
    """Grams ``(runs, depth + 1, n, n)`` of the normalised representation after each layer.

    The network is ``LNMLPSpec(act, depth, width, gain, weights, **switches)`` (switches:
    ``centering``, ``projection``, ``order``, ``widths``, ``xavier_gain``, ``eps``); ``X0`` is
    ``(n, d0)`` with items as rows. See :func:`simulate_spec`.
    """
    spec = LNMLPSpec(act=act, depth=depth, width=width, gain=gain, weights=weights, **switches)
    return simulate_spec(spec, X0, runs=runs, method=method, seed=seed, device=device)
