"""Pieces shared by the paper modules: numbers of curves, slope fits, seeding, plots, sites.

A paper module (:mod:`~isoprobe.experiments.joudaki`, :mod:`~isoprobe.experiments.meterez`, ...)
imports from here and from :mod:`isoprobe.experiments.base`, never from another paper module.
Nothing here knows a reproduction: these are plain functions of arrays, rows and axes.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from isoprobe.metrics import isometry_gap

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from isoprobe.nets import LNMLP

__all__ = [
    "DANESHMAND",
    "FIG7_ACTS",
    "JOUDAKI",
    "METEREZ",
    "NORM_RISE_TOL",
    "draw_site_axis",
    "fit_slope",
    "gap_curves",
    "log_axes_with_ticks",
    "mean_curve",
    "new_figure",
    "norm_site_gaps",
    "plot_depth_curves",
    "rule_norms_never_raise",
    "run_curves",
    "run_generator",
    "single_thread",
    "site_gaps",
    "site_order",
    "spearman",
]

#: the papers, as the reproductions name them
JOUDAKI = "Joudaki, Daneshmand & Bach, NeurIPS 2023 (arXiv 2305.18399)"
METEREZ = "Meterez et al. 2024"
DANESHMAND = "Daneshmand et al. 2021"

#: the activations of the paper's Fig. 7, by β (Fig. 2 uses them too, at initialisation and trained)
FIG7_ACTS = ["sigmoid", "selu", "elu", "tanh", "silu", "relu", "gelu"]


#: Fig. 2's tolerance for a norm layer "not raising" the gap: a relative rise a log-scale plot cannot show
NORM_RISE_TOL = 1e-2


# --- numbers of curves --------------------------------------------------------------------


def gap_curves(grams: torch.Tensor) -> tuple[np.ndarray, int]:
    """Isometry gaps of a stack of Grams, with non-finite Grams counted as collapsed.

    A Gram with non-finite entries (the representation overflowed, e.g. ``exp`` without
    normalisation) has no finite isometry; it is reported as ``+inf`` (collapsed), never NaN,
    and the number of such Grams is returned alongside.
    """
    gaps = isometry_gap(grams).cpu().numpy()
    overflow = int(np.isnan(gaps).sum())
    return np.where(np.isnan(gaps), np.inf, gaps), overflow


def mean_curve(values: np.ndarray) -> np.ndarray:
    """Mean over runs (axis 0) per layer; ``+inf`` where any run collapsed (never NaN)."""
    values = np.asarray(values, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        m = values.mean(axis=0)
    return np.where(np.isinf(values).any(axis=0), np.inf, m)


def run_curves(
    rows: Sequence[dict], value: str = "gap", index: str = "layer", length: int | None = None, **match: Any
) -> np.ndarray:
    """``(runs, length)`` array of column ``value`` of the tidy ``rows`` that match ``match``.

    Row ``r`` goes to line ``r["run"]`` (runs sorted; a deterministic curve, ``run = ""``,
    comes last) and column ``int(r[index])``; ``length`` defaults to the largest index + 1.
    Missing entries are NaN. ``KeyError`` if no row matches.
    """
    sel = [r for r in rows if all(r[k] == v for k, v in match.items())]
    if not sel:
        raise KeyError(f"no rows match {match}")
    runs = sorted({r["run"] for r in sel}, key=lambda v: (isinstance(v, str), v))
    line = {run: i for i, run in enumerate(runs)}
    if length is None:
        length = max(int(r[index]) for r in sel) + 1
    out = np.full((len(runs), length), np.nan)
    for r in sel:
        out[line[r["run"]], int(r[index])] = float(r[value])
    return out


def fit_slope(x: Sequence[float], y: Sequence[float]) -> float:
    """Least-squares slope of ``y`` on ``x``; NaN with fewer than 2 finite points."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 2 or np.ptp(x[ok]) == 0:
        return math.nan
    return float(np.polyfit(x[ok], y[ok], 1)[0])


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation: the Pearson correlation of the ranks (ties: average ranks).

    ``±inf`` values rank as the extremes; NaN if either input is constant.
    """

    def ranks(v: np.ndarray) -> np.ndarray:
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(1, len(v) + 1)
        for value in np.unique(v):
            tie = v == value
            r[tie] = r[tie].mean()
        return r

    ra, rb = ranks(np.asarray(a, dtype=np.float64)), ranks(np.asarray(b, dtype=np.float64))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / denom) if denom > 0 else math.nan


# --- seeding and threads ------------------------------------------------------------------


@contextmanager
def single_thread() -> Iterator[None]:
    """Run torch's CPU ops on one thread, restoring the setting after.

    These nets are long chains of tiny matrices (width 8–200): intra-op threading costs more
    than it gains there and collapses when another process holds the other cores
    (bench/bench_bn_mlp.py measures it).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_generator(seed: int, run: int, salt: int = 0) -> torch.Generator:
    """The generator of run ``run`` under the user's ``seed`` (``salt`` separates series that
    must not share draws): seeded with ``seed · 1000003 + 7919 · run + salt``."""
    return torch.Generator().manual_seed(seed * 1_000_003 + 7919 * run + salt)


# --- plots --------------------------------------------------------------------------------


def new_figure(
    panels: int, ncols: int | None = None, size: tuple[float, float] = (4.2, 3.4)
) -> tuple[Figure, list[Axes]]:
    """``(fig, axes)`` with ``panels`` axes in a grid (``axes`` a flat list).

    A bare ``matplotlib.figure.Figure``: no pyplot state, no backend switch, nothing to close.
    """
    from matplotlib.figure import Figure

    ncols = ncols or min(panels, 4)
    nrows = math.ceil(panels / ncols)
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    flat = list(axes.ravel())
    for ax in flat[panels:]:
        ax.set_visible(False)
    return fig, flat[:panels]


def plot_depth_curves(
    ax: Axes,
    values: np.ndarray,
    label: str,
    color: str | None = None,
    bound: np.ndarray | None = None,
    bound_label: str | None = None,
    layers: np.ndarray | None = None,
    ylabel: str = r"isometry gap  $-\log I(G_\ell)$",
    log: bool = True,
) -> int:
    """Mean over runs (solid) with the min–max spread (shaded) of ``values`` (runs × layers).

    ``bound`` is drawn dashed in the same colour. Collapsed values (``+inf``) are never
    dropped: each layer that has some is marked at the top edge of the axes with a triangle,
    the legend entry says how many there are, and the mean line stops there. Returns the
    number of collapsed values. ``log``: a log y axis, once the axes hold a positive finite
    value (while every value so far has collapsed there is nothing to log-scale, and the
    axis stays linear).
    """
    values = np.atleast_2d(np.asarray(values, dtype=np.float64))
    x = np.arange(values.shape[1]) if layers is None else np.asarray(layers)
    inf = np.isinf(values)
    n_inf = int(inf.sum())
    finite = np.where(inf, np.nan, values)
    mean = mean_curve(values)
    with warnings.catch_warnings():  # all-inf layers give all-NaN slices: no line there
        warnings.simplefilter("ignore", RuntimeWarning)
        lo, hi = np.nanmin(finite, axis=0), np.nanmax(finite, axis=0)
    text = label + (f"  [{n_inf} collapsed (+inf), at top]" if n_inf else "")
    (line,) = ax.plot(x, np.where(np.isinf(mean), np.nan, mean), "-", color=color, label=text, lw=1.6)
    color = line.get_color()
    ax.fill_between(x, lo, hi, color=color, alpha=0.18, lw=0)
    if n_inf:
        cols = inf.any(axis=0)
        ax.plot(
            x[cols],
            np.full(cols.sum(), 0.97),
            "^",
            color=color,
            ms=6,
            clip_on=False,
            transform=ax.get_xaxis_transform(),
        )
    if bound is not None:
        ax.plot(x[: len(bound)], bound, "--", color=color, lw=1.2, label=bound_label)
    if log and ax.dataLim.y1 > 0 and np.isfinite(ax.dataLim.y1):
        ax.set_yscale("log")
    ax.set_xlabel(r"layer $\ell$")
    ax.set_ylabel(ylabel)
    return n_inf


def log_axes_with_ticks(ax: Axes, xticks: Sequence[float]) -> None:
    """Log–log axes with the x ticks at the given values, written plainly."""
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log"), ax.set_yscale("log")
    ax.set_xticks(list(xticks), [str(x) for x in xticks])
    ax.xaxis.set_minor_formatter(NullFormatter())


# --- the sites of an LN-MLP (Joudaki et al. Fig. 2, at initialisation and trained) --------


def site_gaps(net: LNMLP, x: torch.Tensor) -> list[dict]:
    """Gaps of every site of one forward of an :class:`~isoprobe.nets.LNMLP`: rows ``{layer,
    site, gap, theorem1_holds}``, all from one :class:`~isoprobe.hooks.Probe` (the norms, and the
    fc layers as named sites); a collapsed site has ``gap = +inf``."""
    from isoprobe.hooks import Probe

    with torch.no_grad(), Probe(net, sites=["norm", "layers.*.fc"]) as probe:
        net(x)
    by_key = {(r.site, r.point): r for r in probe.records}
    rows = []
    for ell in range(len(net.layers) + 1):
        norm = "input_norm" if ell == 0 else f"layers.{ell - 1}.norm"
        pre = by_key[norm, "pre"]
        if ell == 0:
            rows.append(dict(layer=0, site="input", gap=pre.isometry_gap, theorem1_holds=""))
        else:
            fc = by_key[f"layers.{ell - 1}.fc", "post"].isometry_gap
            rows.append(dict(layer=ell, site="fc", gap=fc, theorem1_holds=""))
            rows.append(dict(layer=ell, site="act", gap=pre.isometry_gap, theorem1_holds=""))
        for point in ("centered", "normalized"):
            r = by_key[norm, point]
            t1 = "" if r.theorem1_holds is None else int(r.theorem1_holds)
            rows.append(dict(layer=ell, site=f"norm:{point}", gap=r.isometry_gap, theorem1_holds=t1))
        rows.append(dict(layer=ell, site="norm", gap=by_key[norm, "post"].isometry_gap, theorem1_holds=""))
    return [{**r, "gap": math.inf if r["gap"] is None else r["gap"]} for r in rows]


def site_order(depth: int) -> list[tuple[int, str]]:
    """The plotted sites ``(layer, site)`` of a depth-``depth`` LN-MLP, in forward order: the
    input and its norm, then fc, act and norm of every layer (each norm follows its input)."""
    return [(0, "input"), (0, "norm")] + [(ell, s) for ell in range(1, depth + 1) for s in ("fc", "act", "norm")]


def draw_site_axis(ax: Axes, order: Sequence[tuple[int, str]], fontsize: float = 7) -> None:
    """Shade the norm (blue) and activation (green) columns of a plot over ``order``
    (:func:`site_order`) and label its x ticks ``input, norm-0, fc-1, act-1, norm-1, …``."""
    for i, (_, s) in enumerate(order):
        if s in ("norm", "act"):
            ax.axvspan(i - 0.5, i + 0.5, color="tab:blue" if s == "norm" else "tab:green", alpha=0.12, lw=0)
    names = [s if ell == 0 and s == "input" else f"{s}-{ell}" for ell, s in order]
    ax.set_xticks(np.arange(len(order)), names, rotation=90, fontsize=fontsize)
    ax.set_xlabel("site (blue: layer norm, green: activation)")


def norm_site_gaps(values: np.ndarray, order: Sequence[tuple[int, str]]) -> tuple[np.ndarray, np.ndarray]:
    """``(before, after)``: the gaps into and out of every norm site of ``values`` (``(..., sites)``
    in :func:`site_order`; a norm's input is the site just before it), flattened."""
    cols = [i for i, (_, s) in enumerate(order) if s == "norm"]
    values = np.asarray(values, dtype=np.float64)
    return values[..., [i - 1 for i in cols]].ravel(), values[..., cols].ravel()


def rule_norms_never_raise(
    before: Sequence[float], after: Sequence[float], tol: float = NORM_RISE_TOL
) -> tuple[bool, int, float]:
    """``(held, rises, worst)`` for norm layers with input gaps ``before`` and output gaps ``after``
    (Corollary 2: projecting onto the sphere never lowers isometry).

    ``rises`` counts outputs above their input; ``worst`` is the largest relative rise
    ``(after − before)/before`` (``inf`` when a finite gap becomes ``+inf``; a collapsed input,
    ``before = +inf``, cannot be raised). Holds iff ``worst ≤ tol``; NaN anywhere does not hold.
    """
    b, a = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    if b.shape != a.shape or b.size == 0 or np.isnan(b).any() or np.isnan(a).any():
        return False, 0, math.nan
    up = (a > b) & np.isfinite(b)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(up, np.where(b > 0, (a - b) / np.where(b > 0, b, 1.0), np.inf), 0.0)
    worst = float(rel.max())
    return bool(worst <= tol), int(up.sum()), worst
