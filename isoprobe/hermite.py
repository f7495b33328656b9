"""Hermite expansion, isometry strength β and the dual activation, by exact quadrature (Joudaki et al. 2023, §5.1).

For ``z ~ N(0, 1)`` and an activation ``σ`` with gain ``α`` (``σ_α(x) = σ(α x)``):

* normalised Hermite coefficients ``c_k = E[σ_α(z) He_k(z)/√k!]`` (Joudaki et al. 2023, §5.1);
  ``c_0 = E σ_α``, ``c_1 = E[z σ_α(z)]``, ``σ̄(1) = Σ_{k≥1} c_k² = Var σ_α(z)``;
* isometry strength ``β = 2 − c_1² / σ̄(1)`` (Definition 3, eq. 9), in ``[1, 2]``;
* dual activation ``σ̂(ρ) = E[σ_α(x) σ_α(y)] = Σ_k c_k² ρ^k`` for standard Gaussians ``x, y``
  with correlation ``ρ``, and its mean-reduced form ``σ̄(ρ) = σ̂(ρ) − c_0²``
  (Lemma B.5, eqs. 34–35);
* the mean-field map on a unit-diagonal Gram, ``ρ ↦ σ̄(ρ)/σ̄(1)`` (eq. 10, Theorem B.1).

Numerics (nothing here is Monte Carlo, nor plain Gauss–Hermite):

* One-dimensional Gaussian integrals use adaptive Gauss–Legendre on a window ``[−W, W]``
  outside which ``σ_α(z)² φ(z)`` is below ``e^-80`` of its peak (``W`` grows with the gain for
  fast-growing σ). Every interval is compared with its two off-centre halves and split until
  the difference is below ``1e-14`` of ``∫|f|`` (pro rata to its length). Declared kinks are
  breakpoints from the start; for a bare callable the subdivision finds them itself, and
  intervals that shrink to nothing mark its kinks (kept for the dual activation).
* ``c_k``: fixed Gauss–Legendre on that partition, refined to resolve the oscillation of
  ``He_k``, with the Hermite functions ``He_k(z)/√k! · φ(z)^{1/2}`` from their stable
  three-term recurrence.
* ``σ̂(ρ)``: the truncated series ``Σ_{k≤K} c_k² ρ^k`` (``K = 512``, or ``4096`` where the
  coefficients decay faster than any power) wherever its tail bound
  ``|ρ|^{K+1} (σ̄(1) − Σ_{k=1}^{K} c_k²)`` is below ``1e-13 σ̄(1)`` (all of ``[−1, 1]`` for the
  smooth activations at moderate gains). Close to ``ρ = ±1`` for non-smooth ones (ReLU: ``|ρ| > 0.96``) it is
  a Chebyshev interpolant in ``b = √(1 − |ρ|)`` (the dual activation of a piecewise-smooth σ
  is analytic in ``b``), built from a direct two-dimensional quadrature and accepted only when
  its Chebyshev tail is below ``1e-13 σ̄(1)`` (otherwise the direct quadrature answers every
  query). The direct quadrature writes ``σ̂(±(1 − b²)) = E_x[h_+(x) h_±(x)]`` with
  ``h_±(x) = E_z[σ_α(±(a x + b z))]``, ``a = √(1 − b²)`` (the Ornstein–Uhlenbeck semigroup
  split in two halves), splits the inner integral where ``a x + b z`` hits a kink, and grades
  the outer mesh geometrically towards the kink images ``κ/a`` where ``h`` varies on the
  scale ``b``. ``ρ = ±1`` exactly are one-dimensional integrals.

Results are cached per activation and gain (registry activations and plain functions, by
identity: do not change what a function computes between calls; an ``nn.Module`` or other
callable object is recomputed each call, since its state may change). Accuracy (see the tests):
β to ``1e-12`` for registry activations and to ``1e-9`` (in practice ``1e-14``) for bare
callables with kinks anywhere; ``σ̂`` to ``1e-12 σ̄(1)`` on all of ``[−1, 1]``. A bare callable
with a smooth feature much narrower than ``1/|α|`` that is not a kink is the one case where the
two-dimensional quadrature near ``ρ = ±1`` is not guaranteed (its kinks, and features sharper
than ``1e-3/|α|``, are found and handled).
"""

from __future__ import annotations

import functools
import json
import math
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from isoprobe.activations import Activation, ActivationLike, _format_table, get_activation

__all__ = [
    "ActivationStats",
    "activation_stats",
    "beta_report",
    "format_beta_rows",
    "gain_text",
    "beta_table",
    "dual_activation",
    "hermite_coefficients",
    "isometry_strength",
    "mean_field_map",
]

_EPS = float(np.finfo(np.float64).eps)
_GL_X, _GL_W = np.polynomial.legendre.leggauss(16)
_SPLIT = math.sqrt(2) - 1  # off-centre bisection: a kink at a round number never lands on a breakpoint
_PHASE = (math.sqrt(5) - 1) / 2  # offset of the uniform grid, for the same reason
_RTOL = 1e-14  # 1-D quadrature tolerance, relative to ∫|f|
_TAIL_NATS = 80.0  # window: σ²(1+z²)φ within e^-80 of its peak
_K_SERIES = 512  # Hermite coefficients kept for the dual series ...
_K_SMOOTH = 4096  # ... or this many, where they decay faster than any power (smooth σ, large gain)
_SERIES_TOL = 1e-13  # series tail and Chebyshev tail, relative to σ̄(1)
_CHEB_MAX = 128
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
_RHO_SLACK = 1e-12  # |ρ| up to 1 + this is rounding and counts as ±1


class ActivationStats(NamedTuple):
    """Hermite statistics of ``σ_α`` (Joudaki et al. 2023, §5.1): ``c0 = E σ_α(z)`` (offset),
    ``c1 = E[z σ_α(z)]``, ``var = σ̄(1) = Var σ_α(z) = Σ_{k≥1} c_k²`` (scale),
    ``beta = 2 − c1²/var`` (Definition 3)."""

    c0: float
    c1: float
    var: float
    beta: float


# ---------------------------------------------------------------------------------------------
# one-dimensional quadrature


def _phi(z: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * z * z - _LOG_SQRT_2PI)


def _gl_nodes(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """16-point Gauss–Legendre nodes and weights on each ``[a_i, b_i]``: shapes ``(..., 16)``."""
    half = 0.5 * (b - a)
    mid = 0.5 * (a + b)
    return mid[..., None] + half[..., None] * _GL_X, half[..., None] * _GL_W


def _gl_integrals(f: Callable[[np.ndarray], np.ndarray], a: np.ndarray, b: np.ndarray):
    """``∫ f`` and ``∫ |f|`` over each ``[a_i, b_i]``; ``f: (N,) -> (m, N)``; results ``(m, P)``."""
    z, w = _gl_nodes(a, b)
    fz = f(z.ravel()).reshape(-1, *z.shape)
    return (fz * w).sum(-1), (np.abs(fz) * w).sum(-1)


def _adaptive(
    f: Callable[[np.ndarray], np.ndarray], breaks: np.ndarray, max_intervals: int = 200_000
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Adaptive Gauss–Legendre ``∫ f`` over ``[breaks[0], breaks[-1]]`` (``f`` vector-valued).

    Returns the integrals ``(m,)`` and the final partition ``(a, b)``, sorted.
    """
    breaks = np.unique(breaks)
    a, b = breaks[:-1], breaks[1:]
    total = breaks[-1] - breaks[0]
    coarse, _ = _gl_integrals(f, a, b)
    val = np.zeros(coarse.shape[0])
    absval = np.zeros(coarse.shape[0])
    done_a, done_b = [], []
    n_done = 0
    while a.size:
        mid = a + _SPLIT * (b - a)
        lv, la = _gl_integrals(f, a, mid)
        rv, ra = _gl_integrals(f, mid, b)
        fine, fabs = lv + rv, la + ra
        scale = absval + fabs.sum(1)
        allowed = np.maximum(_RTOL * scale[:, None] * ((b - a) / total), 64 * _EPS * fabs)
        ok = (np.abs(fine - coarse) <= allowed).all(0)
        ok |= (b - a) <= 8 * _EPS * np.maximum(np.abs(a), np.abs(b)) + 1e-300
        val += fine[:, ok].sum(1)
        absval += fabs[:, ok].sum(1)
        done_a.append(a[ok])
        done_b.append(b[ok])
        n_done += int(ok.sum())
        keep = ~ok
        a, b, mid = a[keep], b[keep], mid[keep]
        a, b = np.concatenate([a, mid]), np.concatenate([mid, b])
        coarse = np.concatenate([lv[:, keep], rv[:, keep]], axis=1)
        if n_done + a.size > max_intervals:
            raise ValueError(
                "quadrature did not converge: the activation looks too irregular to integrate "
                "(is it deterministic, elementwise and square-integrable under a Gaussian?)"
            )
    pa, pb = np.concatenate(done_a), np.concatenate(done_b)
    order = np.argsort(pa)
    return val, pa[order], pb[order]


def _grid(lo: float, hi: float, step: float, phase: float = _PHASE) -> np.ndarray:
    """``lo``, ``hi`` and a uniform grid of spacing ``step`` between them, offset by ``phase·step``."""
    inner = lo + (np.arange(math.ceil((hi - lo) / step)) + phase) * step
    return np.concatenate([[lo], inner[inner < hi], [hi]])


def _find_kinks(f: Callable[[np.ndarray], np.ndarray], lo: float, hi: float, step: float) -> np.ndarray:
    """Points where adaptive subdivision of ``∫ f`` shrinks intervals below ``1e-3·step``.

    A smooth integrand needs no subdivision below ``step`` (the scale of the activation); a kink
    (a jump of σ or of one of its first derivatives) or a feature sharper than ``1e-3·step`` makes
    the intervals around it shrink towards it. A kink that happens to sit within ~1e-4 of a
    breakpoint is invisible to the rule on either side, so two subdivisions with different grid
    phases are run and their findings merged (within ``1e-3·step``, keeping the tighter one).
    """
    width = 1e-3 * step
    pos, size = [], []
    for phase in (_PHASE, _PHASE / 2):
        _, a, b = _adaptive(f, _grid(lo, hi, step, phase))
        tiny = np.flatnonzero((b - a) < width)
        for run in np.split(tiny, np.flatnonzero(np.diff(tiny) > 1) + 1) if tiny.size else []:
            j = run[np.argmin(b[run] - a[run])]
            pos.append(0.5 * (a[j] + b[j]))
            size.append(b[j] - a[j])
    if not pos:
        return np.zeros(0)
    order = np.argsort(pos)
    pos, size = np.asarray(pos)[order], np.asarray(size)[order]
    groups = np.split(np.arange(pos.size), np.flatnonzero(np.diff(pos) > width) + 1)
    return np.asarray([pos[g[np.argmin(size[g])]] for g in groups])


# ---------------------------------------------------------------------------------------------
# an activation at one gain, with everything the integrals need


_CHUNK = 16384


def _evaluator(act: Activation, gain: float) -> Callable[[np.ndarray], np.ndarray]:
    """``z ↦ σ(gain · z)`` on float64 numpy arrays of any shape, with clear errors.

    Evaluated in chunks into one output array, with torch held to one thread for the duration
    (restored after): the arrays are small to medium, and on shared cores torch's thread pool
    can make each call wait for a time slice (measured: 10–100× slower on a loaded 2-core box).
    """

    def call(chunk: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(chunk)
        try:
            with torch.no_grad():
                out = act.fn(t)
        except Exception as exc:  # the user's function failed: say which and why
            raise ValueError(f"activation {act.name!r} failed on a float64 tensor: {exc}") from exc
        if not isinstance(out, torch.Tensor) or out.shape != t.shape:
            raise ValueError(f"activation {act.name!r} must map a tensor to a tensor of the same shape (elementwise)")
        if out.dtype != torch.float64:
            raise ValueError(
                f"activation {act.name!r} returned {out.dtype} for a float64 input; exact quadrature "
                "needs it to compute in float64"
            )
        return out.detach().cpu().numpy()

    def sig(z: np.ndarray) -> np.ndarray:
        u = np.ascontiguousarray(z, dtype=np.float64).ravel() * gain
        out = np.empty_like(u)
        threads = torch.get_num_threads()
        if threads != 1:
            torch.set_num_threads(1)
        try:
            for i in range(0, u.size, _CHUNK):
                out[i : i + _CHUNK] = call(u[i : i + _CHUNK])
        finally:
            if threads != 1:
                torch.set_num_threads(threads)
        return out.reshape(np.shape(z))

    return sig


def _finite(values: np.ndarray, act: Activation, gain: float, z: np.ndarray) -> np.ndarray:
    bad = ~np.isfinite(values)
    if bad.any():
        where = float(np.asarray(z).ravel()[np.flatnonzero(bad.ravel())[0]]) * gain
        raise ValueError(
            f"activation {act.name!r} is not finite at x = {where:.6g} (gain {gain:g}); exact "
            "quadrature needs it finite in float64 for x = gain·z, |z| ≤ 64 (a fast-growing "
            "activation needs a smaller gain)"
        )
    return values


@dataclass
class _Context:
    """An activation at one gain: integration window, kinks (in z), partition and moments."""

    act: Activation
    gain: float

    def __post_init__(self) -> None:
        act, gain = self.act, self.gain
        raw = _evaluator(act, gain)
        self.sig = lambda z: _finite(raw(z), act, gain, z)
        self.h0 = min(1.0, 1.0 / abs(gain)) if gain != 0 else 1.0
        self.W = W = float(math.ceil(self._window(raw)))
        zk = [k / gain for k in act.kinks] if (act.kinks_known and gain != 0) else []
        zk = np.asarray([k for k in zk if -W < k < W], dtype=np.float64)
        # step 2, symmetric (W is an integer): the subdivision refines where σ_α needs it, and the
        # mirrored partition (for σ_α(−·)) adds no points
        grid = _grid(-W, W, 2.0, 0.5)

        def moments(z: np.ndarray) -> np.ndarray:
            s = self.sig(z) * _phi(z)
            return np.stack([s, z * s])

        if not act.kinks_known:
            zk = _find_kinks(moments, -W, W, self.h0)
        self.zkinks = np.unique(zk)
        (c0, c1), pa, pb = _adaptive(moments, np.concatenate([grid, self.zkinks]))
        self.partition = (pa, pb)
        self.breaks = np.append(pa, pb[-1])  # resolves σ_α: the 2-D quadrature maps it
        c0 = float(c0)
        (var,), _, _ = _adaptive(
            lambda z: ((self.sig(z) - c0) ** 2 * _phi(z))[None], np.concatenate([grid, self.zkinks])
        )
        self.c0, self.c1, self.var = c0, float(c1), float(var)
        self.constant = self.var <= 1e-24 * (c0 * c0 + self.var)
        self._near_one: dict[int, np.ndarray | None] = {}

    def _window(self, raw: Callable[[np.ndarray], np.ndarray]) -> float:
        """Half-width ``W``: ``σ_α(z)²(1+z²)φ(z)`` is below ``e^-80`` of its peak outside ``[−W, W]``
        (and ``W ≥ 13``, where ``φ`` alone is below ``e^-80`` of ``φ(0)``)."""
        z = np.linspace(-64.0, 64.0, 4097)
        s = _finite(np.abs(raw(z)), self.act, self.gain, z)
        with np.errstate(divide="ignore"):
            lg = 2 * np.log(s) + np.log1p(z * z) - 0.5 * z * z
        inside = lg >= lg.max() - _TAIL_NATS
        return max(math.sqrt(2 * _TAIL_NATS) + 0.5, float(np.abs(z[inside]).max()) + 0.5)

    def require_variance(self) -> None:
        if self.constant:
            raise ValueError(
                f"{self.act.name!r} at gain {self.gain:g} is constant under the Gaussian "
                "(Var σ = σ̄(1) = 0): β and the mean-field map are undefined"
            )

    # --- Hermite coefficients -----------------------------------------------------------

    def hermite(self, k_max: int) -> np.ndarray:
        """``c_0 … c_{k_max}`` by fixed Gauss–Legendre on the adaptive partition (which resolves
        ``σ_α``), refined so every piece is shorter than ``6/√(k_max+1)`` (a wavelength of
        ``He_k`` is about ``2π/√k``)."""
        pa, pb = self.partition
        step = 6.0 / math.sqrt(k_max + 1)
        parts = np.maximum(1, np.ceil((pb - pa) / step)).astype(np.int64)
        # piece j of interval i: [pa + (pb-pa) j/p, pa + (pb-pa)(j+1)/p]
        rep = np.repeat(np.arange(pa.size), parts)
        jj = np.arange(rep.size) - np.repeat(np.cumsum(parts) - parts, parts)
        lo = pa[rep] + (pb - pa)[rep] * (jj / parts[rep])
        hi = pa[rep] + (pb - pa)[rep] * ((jj + 1) / parts[rep])
        z, w = _gl_nodes(lo, hi)
        z, w = z.ravel(), w.ravel()
        root_phi = np.exp(-0.25 * z * z - 0.5 * _LOG_SQRT_2PI)  # φ(z)^{1/2}
        fw = self.sig(z) * root_phi * w
        coeffs = np.empty(k_max + 1)
        g_prev, g = np.zeros_like(z), root_phi  # Hermite functions He_k(z)/√k! · φ(z)^{1/2}
        for k in range(k_max + 1):
            coeffs[k] = fw @ g
            g_prev, g = g, (z * g - math.sqrt(k) * g_prev) / math.sqrt(k + 1)
        return coeffs

    # --- the dual activation ------------------------------------------------------------

    @functools.cached_property
    def coefficients(self) -> np.ndarray:
        """``c_0 … c_512``."""
        return self.hermite(_K_SERIES)

    def _tail(self, p: np.ndarray) -> float:
        """``σ̄(1) − Σ_{k=1}^{K} c_k²`` (clamped at rounding level): bounds the series' tail."""
        return max(self.var - p[1:].sum(), 0.0) + 1e-15 * self.var

    @functools.cached_property
    def series(self) -> tuple[np.ndarray, float]:
        """Coefficients ``c_k²`` (``c_0²`` included) and the radius ``r0`` within which the truncated
        series is exact to ``1e-13 σ̄(1)``: ``r0^{K+1} · tail ≤ 1e-13 σ̄(1)``.

        ``K = 512``; where the tail is too large but falls by more than 16× from ``K = 256`` to
        ``512`` (faster than any power: a smooth σ at a large gain), ``K = 4096`` instead."""
        p = self.coefficients**2
        tol = _SERIES_TOL * self.var
        tail = self._tail(p)
        if tail > tol and self._tail(p[: _K_SERIES // 2 + 1]) > 16 * tail:
            p = self.hermite(_K_SMOOTH) ** 2
            tail = self._tail(p)
        r0 = 1.0 if tail <= tol else (tol / tail) ** (1.0 / p.size)
        keep = np.flatnonzero(p > 1e-18 * (p.sum() + 1e-300))
        return p[: (keep[-1] + 1 if keep.size else 1)], r0

    @functools.cached_property
    def minus_one(self) -> float:
        """``σ̄(−1) = E[(σ_α(z) − c0)(σ_α(−z) − c0)]``."""
        brk = np.concatenate([_grid(-self.W, self.W, self.h0), self.zkinks, -self.zkinks])
        (v,), _, _ = _adaptive(lambda z: ((self.sig(z) - self.c0) * (self.sig(-z) - self.c0) * _phi(z))[None], brk)
        return float(v)

    def centered_dual_direct(self, sign: int, b: float) -> float:
        """``σ̄(sign·(1 − b²))`` for ``0 < b ≤ 1`` by two-dimensional quadrature (module docstring).

        With ``q`` the points of the 1-D partition of ``σ_α`` (for ``sign < 0`` together with their
        mirror images, the partition of ``σ_α(−·)``), kinks among them:
        outer integral over ``x`` on ``q/a`` (plus a grid of step 2 where that is coarser) and a
        mesh graded geometrically (ratio 4, from ``b/a`` up) around each kink image ``κ/a``;
        inner integral over ``z``, for each outer node, on a grid of step 2 and the points
        ``(q − a x)/b`` where ``a x + b z`` crosses a point of ``q``.
        """
        W, c0 = self.W, self.c0
        q = self.breaks if sign > 0 else np.union1d(self.breaks, -self.breaks)
        kinks = self.zkinks if sign > 0 else np.union1d(self.zkinks, -self.zkinks)
        a = math.sqrt((1 - b) * (1 + b))
        unit = _grid(-W, W, 2.0)
        outer = [unit if a < 0.5 else np.array([-W, W])]  # else q/a is already finer than that
        if a > 0:
            delta = b / a
            offs = delta * 4.0 ** np.arange(-1, max(1, math.ceil(math.log(2 * W / delta, 4)) + 1))
            grading = np.concatenate([-offs, [0.0], offs])
            outer += [q / a, (kinks[:, None] / a + grading[None, :]).ravel()]
        xb = np.unique(np.clip(np.concatenate(outer), -W, W))
        x, wx = _gl_nodes(xb[:-1], xb[1:])
        x, wx = x.ravel(), (wx * _phi(x)).ravel()

        # the points of q met by a x + b z for z in [−W, W] form one contiguous run per x
        lo = np.searchsorted(q, a * x - b * W)
        count = int((np.searchsorted(q, a * x + b * W, side="right") - lo).max()) + 2
        idx = np.clip(lo[:, None] - 1 + np.arange(count)[None, :], 0, q.size - 1)
        crossings = np.clip((q[idx] - a * x[:, None]) / b, -W, W)
        zb = np.sort(np.concatenate([np.broadcast_to(unit, (x.size, unit.size)), crossings], 1), axis=1)
        z, wz = _gl_nodes(zb[:, :-1], zb[:, 1:])
        wz = wz * _phi(z)
        u = a * x[:, None, None] + b * z
        h_plus = ((self.sig(u) - c0) * wz).sum((1, 2))
        if sign > 0:
            return float(wx @ (h_plus * h_plus))
        h_minus = ((self.sig(-u) - c0) * wz).sum((1, 2))
        return float(wx @ (h_plus * h_minus))

    def near_one(self, sign: int) -> np.ndarray | None:
        """Chebyshev coefficients of ``b ↦ σ̄(sign·(1 − b²))`` on ``[0, b0]``, ``b0 = √(1 − r0)``,
        built on first use; ``None`` if the interpolant did not converge (direct quadrature answers)."""
        if sign in self._near_one:
            return self._near_one[sign]
        _, r0 = self.series
        b0 = math.sqrt(1 - r0)
        end = self.var if sign > 0 else self.minus_one
        n, vals, coef = 12, None, None
        while n <= _CHEB_MAX:
            bs = 0.5 * b0 * (np.cos(np.pi * np.arange(n + 1) / n) + 1)
            if vals is None:
                vals = np.array([self.centered_dual_direct(sign, bj) for bj in bs[:-1]] + [end])
            else:  # the nodes for n contain those for n/2 at the even indices
                new = np.empty(n + 1)
                new[::2] = vals
                new[1::2] = [self.centered_dual_direct(sign, bj) for bj in bs[1::2]]
                vals = new
            c = _cheb_coefficients(vals)
            if np.abs(c[-3:]).max() <= _SERIES_TOL * self.var:
                coef = c
                break
            n *= 2
        self._near_one[sign] = coef
        return coef

    def centered_dual(self, rho: np.ndarray) -> np.ndarray:
        """``σ̄(ρ)`` for a 1-D array of ``ρ`` in ``[−1, 1]``."""
        p, r0 = self.series
        out = np.empty_like(rho)
        absr = np.abs(rho)
        in_series = absr <= r0
        exact = absr == 1
        out[in_series] = _power_series(p[1:], rho[in_series]) * rho[in_series] if p.size > 1 else 0.0
        for sign in (1, -1):
            sel = ~in_series & ~exact & (np.sign(rho) == sign)
            if not sel.any():
                continue
            b = np.sqrt(1 - absr[sel])
            coef = self.near_one(sign)
            if coef is not None:
                out[sel] = _chebyshev_eval(coef, 2 * b / math.sqrt(1 - r0) - 1)
            else:
                out[sel] = [self.centered_dual_direct(sign, bj) for bj in b]
        out[exact & (rho > 0)] = self.var
        if (exact & (rho < 0)).any():
            out[exact & (rho < 0)] = self.minus_one
        return out


def _power_series(p: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``Σ_k p_k x^k`` in blocks of ``B ≈ √K``: the powers ``x^0 … x^{B−1}`` once (a running
    product), one matrix-vector product per block, Horner's rule in ``x^B`` across blocks.
    (Matrix-vector, not one matrix-matrix product: BLAS threads cost more than they save here.)"""
    block = max(1, math.ceil(math.sqrt(p.size)))
    nb = -(-p.size // block)
    P = np.zeros(nb * block)
    P[: p.size] = p
    P = P.reshape(nb, block)
    V = np.empty((x.size, block))
    V[:, 0] = 1.0
    V[:, 1:] = x[:, None]
    V = np.cumprod(V, axis=1)
    xb = V[:, -1] * x
    out = V @ P[-1]
    for j in range(nb - 2, -1, -1):
        out = out * xb + V @ P[j]
    return out


def _cheb_coefficients(values: np.ndarray) -> np.ndarray:
    """Chebyshev coefficients from values at the Lobatto points ``cos(πj/n)``, ``j = 0..n``."""
    n = values.size - 1
    ext = np.concatenate([values, values[n - 1 : 0 : -1]])
    c = np.fft.rfft(ext).real / n
    c[0] /= 2
    c[n] /= 2
    return c[: n + 1]


def _chebyshev_eval(c: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Clenshaw's recurrence for ``Σ c_j T_j(t)``."""
    b1 = np.zeros_like(t)
    b2 = np.zeros_like(t)
    for cj in c[:0:-1]:
        b1, b2 = 2 * t * b1 - b2 + cj, b1
    return t * b1 - b2 + c[0]


@functools.lru_cache(maxsize=256)
def _cached_context(act: Activation, gain: float) -> _Context:
    return _Context(act, gain)


_CACHEABLE = (types.FunctionType, types.BuiltinFunctionType, functools.partial)


def _context(act: ActivationLike, gain: float) -> _Context:
    activation = get_activation(act)
    try:
        g = float(gain)
    except (TypeError, ValueError):
        raise TypeError(f"gain must be a number, got {type(gain).__name__}") from None
    if not math.isfinite(g):
        raise ValueError(f"gain must be finite, got {gain}")
    if isinstance(activation.fn, _CACHEABLE):
        return _cached_context(activation, g)
    return _Context(activation, g)


# ---------------------------------------------------------------------------------------------
# public API


def hermite_coefficients(act: ActivationLike, k_max: int, gain: float = 1.0) -> torch.Tensor:
    """Normalised Hermite coefficients ``c_k = E[σ(α z) He_k(z)/√k!]``, ``k = 0..k_max``.

    ``He_k`` are the probabilists' Hermite polynomials (Joudaki et al., Definition 2 and §5.1);
    returns a float64 tensor of length ``k_max + 1``.
    """
    if isinstance(k_max, bool) or not isinstance(k_max, (int, np.integer)) or k_max < 0:
        raise ValueError(f"k_max must be a non-negative integer, got {k_max!r}")
    ctx = _context(act, gain)
    coeffs = ctx.coefficients if k_max <= _K_SERIES else ctx.hermite(int(k_max))
    return torch.from_numpy(coeffs[: k_max + 1].copy())


def activation_stats(act: ActivationLike, gain: float = 1.0) -> ActivationStats:
    """``c0``, ``c1``, ``var = σ̄(1)`` and ``β = 2 − c1²/var`` of ``σ(α ·)`` (Joudaki et al. 2023, Definition 3).

    Raises ``ValueError`` where ``σ(α z)`` is constant (gain 0): β is undefined there.
    """
    ctx = _context(act, gain)
    ctx.require_variance()
    beta = 2.0 - ctx.c1 * ctx.c1 / ctx.var
    return ActivationStats(ctx.c0, ctx.c1, ctx.var, beta)


def isometry_strength(act: ActivationLike, gain: float = 1.0) -> float:
    """Isometry strength ``β_σ = 2 − c_1² / Σ_{k≥1} c_k²`` of ``σ(α ·)`` (Definition 3, eq. 9)."""
    return activation_stats(act, gain).beta


def _as_rho(rho: float | torch.Tensor) -> tuple[np.ndarray, bool, torch.Tensor | None]:
    if isinstance(rho, torch.Tensor):
        if rho.is_complex():
            raise ValueError("rho must be real")
        arr = rho.detach().to("cpu", torch.float64).numpy().ravel()
        scalar, ref = False, rho
    else:
        try:
            arr = np.array([float(rho)])
        except (TypeError, ValueError):
            raise TypeError(f"rho must be a float or a tensor, got {type(rho).__name__}") from None
        scalar, ref = True, None
    if not np.isfinite(arr).all() or (np.abs(arr) > 1 + _RHO_SLACK).any():
        bad = float(arr[~(np.abs(arr) <= 1 + _RHO_SLACK)][0])
        raise ValueError(f"correlations must lie in [-1, 1], got {bad}")
    return np.clip(arr, -1.0, 1.0), scalar, ref


def _apply(ctx: _Context, rho: float | torch.Tensor, fn: Callable[[np.ndarray], np.ndarray]):
    arr, scalar, ref = _as_rho(rho)
    uniq, inverse = np.unique(arr, return_inverse=True)
    vals = fn(uniq)[inverse]
    if scalar:
        return float(vals[0])
    return torch.from_numpy(vals).reshape(ref.shape).to(ref.device)


def dual_activation(
    act: ActivationLike, rho: float | torch.Tensor, gain: float = 1.0, centered: bool = False
) -> float | torch.Tensor:
    """Dual activation ``σ̂(ρ) = E[σ(αx) σ(αy)]``, ``x, y`` standard Gaussians with correlation ``ρ``
    (Lemma B.5, eqs. 34–35: ``σ̂(ρ) = Σ_k c_k² ρ^k``); ``centered=True`` gives
    ``σ̄(ρ) = σ̂(ρ) − c_0² = Σ_{k≥1} c_k² ρ^k``.

    ``rho``: a float (returns a float) or a tensor of any shape (returns a float64 tensor of that
    shape, elementwise, on ``rho``'s device); values in ``[−1, 1]``, where values up to ``1e-12``
    beyond ``±1`` count as rounding and are clipped, and anything else (NaN included) raises
    ``ValueError``. Accurate to ``1e-12 σ̄(1)`` everywhere, ``ρ = ±1`` included. The first call for
    an activation and gain builds the series (~10 ms) and, for a non-smooth σ with ``|ρ|`` near 1,
    an interpolant there (~50–150 ms); later calls evaluate every distinct ``ρ`` at once
    (~1–5 ms for a 100×100 matrix, see bench/RESULTS.md).
    """
    ctx = _context(act, gain)
    offset = 0.0 if centered else ctx.c0 * ctx.c0
    return _apply(ctx, rho, lambda r: ctx.centered_dual(r) + offset)


def mean_field_map(act: ActivationLike, rho: float | torch.Tensor, gain: float = 1.0) -> float | torch.Tensor:
    """Mean-field map on a unit-diagonal Gram, ``ρ ↦ σ̄(ρ)/σ̄(1)`` (eq. 10, Theorem B.1).

    Elementwise on a float or a tensor of any shape (e.g. a whole ``(n, n)`` correlation matrix:
    a diagonal of ones maps to ones); float64 result; ``rho`` as in :func:`dual_activation`.
    ``ValueError`` where ``σ(α ·)`` is constant.
    """
    ctx = _context(act, gain)
    ctx.require_variance()
    return _apply(ctx, rho, lambda r: ctx.centered_dual(r) / ctx.var)


# ---------------------------------------------------------------------------------------------
# the β table of the `isoprobe beta` command


def beta_table(activations: Sequence[ActivationLike], gains: Sequence[float] = (1.0,)) -> list[dict]:
    """One row per activation and gain: ``activation, gain, c0, c1, var, beta, beta_closed_form``
    (``None`` where no closed form is known)."""
    resolved = [get_activation(act) for act in activations]  # unknown names fail before any work
    rows = []
    for activation in resolved:
        for gain in gains:
            s = activation_stats(activation, gain)
            closed = activation.closed_form_beta
            rows.append(
                {
                    "activation": activation.name,
                    "gain": float(gain),
                    "c0": s.c0,
                    "c1": s.c1,
                    "var": s.var,
                    "beta": s.beta,
                    "beta_closed_form": None if closed is None else float(closed(float(gain))),
                }
            )
    return rows


def beta_report(activations: Sequence[ActivationLike], gains: Sequence[float] = (1.0,), as_json: bool = False) -> str:
    """:func:`beta_table` as a text table or as JSON."""
    return format_beta_rows(beta_table(activations, gains), as_json)


def gain_text(gain: float) -> str:
    """``gain`` in the fewest characters that read back as the same float (``1e+06``, ``0.1``,
    ``1.23456789``): ``:g`` when it round-trips, else the shortest repr."""
    short = f"{gain:g}"
    return short if float(short) == gain else repr(float(gain))


def format_beta_rows(rows: Sequence[dict], as_json: bool = False) -> str:
    """Rows of :func:`beta_table` as a text table (gains by :func:`gain_text`) or as JSON."""
    if as_json:
        return json.dumps(rows, indent=2)
    header = ("activation", "gain", "c0", "c1", "σ̄(1)", "β", "β closed form")
    body = []
    for r in rows:
        scale = max(abs(r["c0"]), abs(r["c1"]), math.sqrt(max(r["var"], 0.0)))  # the size of σ(αz) here
        cells = [_beta_cell(r["c0"], scale), _beta_cell(r["c1"], scale), _beta_cell(r["var"], scale**2)]
        cells += [_beta_cell(r["beta"], 1.0), _beta_cell(r["beta_closed_form"], 1.0)]
        body.append((r["activation"], gain_text(r["gain"]), *cells))
    return _format_table(header, body)


def _beta_cell(value: float | None, scale: float) -> str:
    """12 decimals; a value below 1e-4 in scientific notation with 12 significant digits (a small
    gain's c0, c1, σ̄(1) stay readable); a value below 1e-14 of its row's ``scale``, quadrature
    noise (c0 of an odd activation), as 0."""
    if value is None:
        return ""
    if abs(value) <= 1e-14 * scale:
        value = 0.0
    return f"{value:.12f}" if value == 0.0 or abs(value) >= 1e-4 else f"{value:.11e}"
