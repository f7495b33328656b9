"""The mean-field (infinite-width) Gram recursion of the LayerNorm MLP (Joudaki et al. eq. 10, App. B.1).

At infinite width the features of one layer are iid over the rows, so the Gram of the next
layer is an expectation over ``h ∼ N(0, K)``, where ``K`` is the pre-activations' covariance.
Every item has the same squared norm per feature ``q`` in this limit (the input is
normalised, and each layer treats items alike), so the state is ``(q, C)`` with ``C`` the
unit-diagonal cosine matrix, and the recorded Gram is ``G_ℓ = q_ℓ C_ℓ``. With the
pre-activation gain ``g = α · sqrt(preact_var · q)`` and ``σ_g(z) = σ(g z)``, Lemma B.5 gives
``E σ_g(h_i) σ_g(h_j) = σ̂_g(C_ij)`` (dual activation) and, after subtracting the true mean
``c₀(g)``, ``σ̄_g(C_ij)``. One layer, order ``act-norm``:

* centering that removes the true mean (``layer``, or ``mean-field`` while ``q = 1`` so that
  the fixed ``c₀`` is the true mean): ``K = σ̄_g(C)``; otherwise with ``c`` subtracted
  (``c = c₀`` at the nominal gain, or 0 for ``none``) and ``m = c₀(g)``:
  ``K = σ̂_g(C) − 2 c m + c²``;
* ``C ← K / K_ii``; ``q ← 1`` (layer projection), ``K_ii / σ̄(1)`` (mean-field projection,
  ``σ̄(1)`` at the nominal gain), ``K_ii`` (none).

With the paper's switches (centering and projection each ``layer`` or ``mean-field``, Gaussian
or orthogonal weights) ``q`` stays exactly 1 and this is eq. (10):
``G_{ℓ+1} = σ̄(G_ℓ)/σ̄(1)`` elementwise (:func:`isoprobe.hermite.mean_field_map`).

Order ``norm-act``: the pre-activation is centred (its mean is already 0 in the limit) and
projected to unit variance (``layer``) or not (``none``), then ``C ← σ̂_g(C)/σ̂_g(1)``,
``q ← σ̂_g(1)`` with ``g = α`` (layer projection) or ``α · sqrt(preact_var · q)`` (none).
"""

from __future__ import annotations

import math

import torch

from isoprobe.activations import ActivationLike
from isoprobe.hermite import dual_activation, mean_field_map
from isoprobe.theory.spec import LayerPlan, LNMLPSpec

__all__ = ["cosine_matrix", "mean_field_grams", "mean_field_spec"]


def cosine_matrix(G: torch.Tensor) -> torch.Tensor:
    """``G_ij / sqrt(G_ii G_jj)`` in float64, with an exact unit diagonal."""
    if not isinstance(G, torch.Tensor) or G.ndim < 2 or G.shape[-1] != G.shape[-2] or G.shape[-1] < 2:
        raise ValueError(f"G must be a square (..., n, n) tensor with n >= 2, got {getattr(G, 'shape', G)!r}")
    G = G.to(torch.float64)
    if not bool(torch.isfinite(G).all()):
        raise ValueError("G has non-finite entries")
    d = G.diagonal(dim1=-2, dim2=-1)
    if not bool((d > 0).all()):
        raise ValueError("G has a zero (or negative) diagonal entry: an item of norm 0 has no direction")
    s = d.rsqrt()
    C = G * s[..., :, None] * s[..., None, :]
    return C.clamp(-1.0, 1.0).diagonal_scatter(torch.ones_like(d), dim1=-2, dim2=-1)


def _with_unit_diagonal(K: torch.Tensor, diag: float) -> torch.Tensor:
    C = (K / diag).clamp(-1.0, 1.0)
    return C.diagonal_scatter(torch.ones(C.shape[-1], dtype=C.dtype), dim1=-2, dim2=-1)


def _act_norm_step(spec: LNMLPSpec, layer: LayerPlan, C: torch.Tensor, q: float) -> tuple[torch.Tensor, float]:
    g = spec.gain * math.sqrt(layer.preact_var * q)
    st = spec.stats(g)
    true_mean = spec.centering == "layer" or (spec.centering == "mean-field" and q == 1.0)
    if true_mean:
        C_next = _with_unit_diagonal(mean_field_map(spec.activation, C, gain=g), 1.0)
        diag = float(st.var)
    else:
        c = layer.offset if spec.centering == "mean-field" else 0.0
        m = float(st.c0)
        K = dual_activation(spec.activation, C, gain=g) - 2 * c * m + c * c
        diag = float(st.var) + (m - c) ** 2
        C_next = _with_unit_diagonal(K, diag)
    if spec.projection == "layer":
        q_next = 1.0
    elif spec.projection == "mean-field":
        # σ̄(1) at the nominal gain equals diag exactly when g is the nominal gain
        q_next = 1.0 if (true_mean and g == layer.gain) else diag / layer.scale
    else:
        q_next = diag
    return C_next, q_next


def _norm_act_step(spec: LNMLPSpec, layer: LayerPlan, C: torch.Tensor, q: float) -> tuple[torch.Tensor, float]:
    g = spec.gain if spec.projection == "layer" else spec.gain * math.sqrt(layer.preact_var * q)
    st = spec.stats(g)
    diag = float(st.var) + float(st.c0) ** 2  # σ̂_g(1)
    return _with_unit_diagonal(dual_activation(spec.activation, C, gain=g), diag), diag


def mean_field_spec(spec: LNMLPSpec, G0: torch.Tensor, in_features: int | None = None) -> torch.Tensor:
    """Mean-field Grams ``(L + 1, n, n)`` of ``x_0..x_L`` for ``spec`` (module docstring).

    ``G0`` is the Gram of the normalised input ``x_0 = LN(X0)`` (:meth:`LNMLPSpec.input_gram`,
    or index 0 of a simulation); only its cosine matrix is used, and returned as ``G_0``.
    Computed on the CPU in float64, whatever ``G0``'s device. ``in_features``
    (default ``spec.width``) matters only for Xavier weights, whose variance depends on the
    fan-in and fan-out. Raises ``ValueError`` if the recursion leaves the floating-point range
    (e.g. ``exp`` without projection, whose variance grows like ``exp(2q)``).
    """
    C = cosine_matrix(torch.as_tensor(G0).cpu())  # n × n: the recursion runs on the CPU
    if C.ndim != 2:
        raise ValueError(f"G0 must be one (n, n) Gram, got shape {tuple(G0.shape)}")
    q = 1.0
    step = _act_norm_step if spec.order == "act-norm" else _norm_act_step
    out = [C]
    for ell, layer in enumerate(spec.plan(in_features or spec.width), start=1):
        try:
            C, q = step(spec, layer, C, q)
        except ValueError as exc:  # from the quadrature, e.g. at an extreme effective gain
            raise ValueError(f"mean-field recursion of {spec.name}, layer {ell} (q = {q:.3g}): {exc}") from exc
        if not (math.isfinite(q) and q > 0 and bool(torch.isfinite(C).all())):
            raise ValueError(
                f"the mean-field recursion of {spec.name} left the floating-point range at layer {ell} "
                f"(per-feature second moment q = {q:.3g}); the finite-width network diverges too"
            )
        out.append(q * C)
    return torch.stack(out)


def mean_field_grams(
    act: ActivationLike,
    G0: torch.Tensor,
    depth: int,
    gain: float = 1.0,
    centering: str = "mean-field",
    projection: str = "mean-field",
    **switches,
) -> torch.Tensor:
    """Mean-field Grams ``(depth + 1, n, n)``: ``G ← σ̄(G)/σ̄(1)`` and its variants.

    The network is ``LNMLPSpec(act, depth, gain=gain, centering=..., projection=..., **switches)``
    (``order``, ``weights``, ``widths``, ``xavier_gain``, ``width``); see
    :func:`mean_field_spec`. With the defaults this is eq. (10) of Joudaki et al., accurate to
    the dual activation's quadrature (1e-10).
    """
    spec = LNMLPSpec(act=act, depth=depth, gain=gain, centering=centering, projection=projection, **switches)
    return mean_field_spec(spec, G0)
