"""The significance tests behind the reproductions' verdicts, each with a stated false-``held`` rate.

A verdict that rests on independent runs says ``held`` only when a test rejects "no effect" at
level :data:`ALPHA`: under the null, ``held`` comes at most with probability ``ALPHA``, and
with more runs a real effect passes more easily (the tests' power grows with the runs).

* :func:`welch` / :func:`welch_from_summaries`: the difference of two means with Welch's
  standard error and Welch–Satterthwaite degrees of freedom; one-sided p-values from Student's
  t distribution (:func:`t_cdf`), so three runs are judged at their own, wider, quantile
  (``t₀.₉₅(2) = 2.92``) and not at a normal ``2 SE``.
* :func:`slope`: a least-squares trend with its t test (``N − 2`` degrees of freedom).
* :func:`mean_interval`: the t confidence interval of a mean over runs.
* :func:`median_interval`: the distribution-free (order-statistic) interval of a median over runs.
* :func:`sign_test_p`: ``P(Bin(n, ½) ≥ k)``, the chance that ``k`` of ``n`` independent runs
  have one sign when each is a fair coin.
* :func:`permutation_p`: a permutation test over the labels a claim is about (every
  permutation when there are at most :data:`EXACT_PERMUTATIONS`, else a seeded sample).

Pure functions of numbers: no torch, no reproduction. Student's t CDF is the regularized
incomplete beta function ``P(T ≤ t) = 1 − ½ I_{ν/(ν+t²)}(ν/2, ½)`` for ``t ≥ 0``
(Abramowitz & Stegun 26.7.1), evaluated by its continued fraction (A&S 26.5.8).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "ALPHA",
    "EXACT_PERMUTATIONS",
    "Difference",
    "mean_interval",
    "median_interval",
    "permutation_p",
    "sign_test_p",
    "slope",
    "t_cdf",
    "t_quantile",
    "welch",
    "welch_from_summaries",
]

#: the false-``held`` rate of every verdict test (one-sided level)
ALPHA = 0.05
#: up to this many permutations, :func:`permutation_p` enumerates them all (7! = 5040)
EXACT_PERMUTATIONS = 5040


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz, A&S 26.5.8)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 400):
        even = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        odd = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        for num in (even, odd):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return f


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function ``I_x(a, b)`` for ``0 ≤ x ≤ 1``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """``P(T ≤ t)`` for Student's t with ``df > 0`` degrees of freedom (``±inf`` allowed)."""
    if not df > 0 or math.isnan(t):
        return math.nan
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    if math.isinf(df):
        return 0.5 * math.erfc(-t / math.sqrt(2.0))
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


@functools.lru_cache(maxsize=1024)
def t_quantile(p: float, df: float) -> float:
    """The ``p``-quantile of Student's t with ``df`` degrees of freedom (bisection on :func:`t_cdf`)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    lo, hi = -1.0, 1.0
    while t_cdf(lo, df) > p:
        lo *= 2.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
        if hi - lo < 1e-12 * max(1.0, abs(mid)):
            break
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class Difference:
    """``diff = mean(b) − mean(a)`` with its standard error ``se`` and Welch–Satterthwaite ``df``.

    ``p_greater`` is the one-sided p-value of "``b`` is larger" (``P(T ≥ diff/se)`` under equal
    means), ``p_less`` that of "``b`` is smaller". NaN when a side has fewer than two runs.
    """

    diff: float
    se: float
    df: float

    @property
    def t(self) -> float:
        if self.se > 0:
            return self.diff / self.se
        return math.nan if self.diff == 0 or math.isnan(self.diff) else math.copysign(math.inf, self.diff)

    @property
    def p_greater(self) -> float:
        return 1.0 - t_cdf(self.t, self.df)

    @property
    def p_less(self) -> float:
        return t_cdf(self.t, self.df)

    def direction(self, alpha: float = ALPHA) -> str:
        """``"up"`` if ``b > a`` at one-sided level ``alpha``, ``"down"`` if ``b < a``, else ``"tie"``."""
        if self.p_greater <= alpha:
            return "up"
        return "down" if self.p_less <= alpha else "tie"

    def as_dict(self) -> dict:
        return {"diff": self.diff, "se": self.se, "df": self.df, "p_greater": self.p_greater, "p_less": self.p_less}


def welch_from_summaries(mean_a: float, se_a: float, n_a: int, mean_b: float, se_b: float, n_b: int) -> Difference:
    """:class:`Difference` of two means given as (mean, standard error of the mean, runs).

    ``se = √(se_a² + se_b²)``, ``df = se⁴ / (se_a⁴/(n_a − 1) + se_b⁴/(n_b − 1))`` (Welch 1947);
    a side with no spread (``se = 0``, e.g. a deterministic bound) adds nothing to either.
    """
    if min(n_a, n_b) < 2 or math.isnan(se_a) or math.isnan(se_b):
        return Difference(mean_b - mean_a, math.nan, math.nan)
    se = math.hypot(se_a, se_b)
    parts = [s**4 / (n - 1) for s, n in ((se_a, n_a), (se_b, n_b)) if s > 0]
    df = se**4 / sum(parts) if parts else math.inf
    return Difference(mean_b - mean_a, se, df)


def welch(a: Sequence[float], b: Sequence[float]) -> Difference:
    """:class:`Difference` ``mean(b) − mean(a)`` of two independent samples (Welch's t test)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)

    def se(x: np.ndarray) -> float:
        return float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else math.nan

    return welch_from_summaries(float(a.mean()), se(a), len(a), float(b.mean()), se(b), len(b))


def mean_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """``(mean, lo, hi)``: the mean of ``values`` and its two-sided Student-t ``level`` interval
    ``mean ± t_{(1+level)/2}(n − 1)·s/√n`` (NaN bounds with fewer than two values)."""
    x = np.asarray(values, dtype=np.float64)
    m = float(x.mean()) if x.size else math.nan
    if x.size < 2 or not np.isfinite(x).all():
        return m, math.nan, math.nan
    half = t_quantile(0.5 + level / 2, x.size - 1) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return m, m - half, m + half


def median_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """``(median, lo, hi)``: the median of ``values`` and the distribution-free interval
    ``[x₍ₖ₎, x₍ₙ₊₁₋ₖ₎]`` of order statistics with the largest ``k`` whose coverage
    ``1 − 2·P(Bin(n, ½) ≤ k − 1)`` is at least ``level`` (NaN bounds when even ``k = 1`` falls
    short: ``n ≤ 5`` at 95%). Exact for any continuous law, so one wild run moves it by one rank."""
    x = np.sort(np.asarray(values, dtype=np.float64))
    n = x.size
    med = float(np.median(x)) if n else math.nan
    if n == 0 or np.isnan(x).any():
        return med, math.nan, math.nan
    k = 0
    while k + 1 <= n // 2 and 1 - 2 * (1 - sign_test_p(k + 1, n)) >= level:
        k += 1
    return (med, float(x[k - 1]), float(x[n - k])) if k else (med, math.nan, math.nan)


def sign_test_p(k: int, n: int) -> float:
    """``P(Bin(n, ½) ≥ k)``: the one-sided sign-test p-value of ``k`` of ``n`` independent runs
    agreeing in sign (``2^-n`` when all do)."""
    if not 0 <= k <= n:
        raise ValueError(f"need 0 ≤ k ≤ n, got k={k}, n={n}")
    return sum(math.comb(n, j) for j in range(k, n + 1)) / 2.0**n


def permutation_p(
    statistic: Callable[[np.ndarray], np.ndarray],
    labels: Sequence[float],
    samples: int = 20_000,
    seed: int = 0,
) -> float:
    """One-sided permutation p-value of a statistic of the ``labels``: the share of relabellings
    ``π`` with ``T(labels[π]) ≤ T(labels)`` (the identity included).

    ``statistic`` maps a ``(k, n)`` array of relabellings (one per row) to their ``k`` values.
    Exact over all ``n!`` permutations up to :data:`EXACT_PERMUTATIONS`, else over ``samples``
    seeded random ones plus the identity. When the labels carry no information about the data
    (exchangeable under the null), ``P(p ≤ α) ≤ α``.
    """
    lab = np.asarray(labels, dtype=np.float64)
    observed = float(np.asarray(statistic(lab[None, :])).ravel()[0])
    if math.isnan(observed):
        return math.nan
    if math.factorial(len(lab)) <= EXACT_PERMUTATIONS:
        index = np.array(list(itertools.permutations(range(len(lab)))))
    else:
        rng = np.random.default_rng(seed)
        index = np.vstack([np.arange(len(lab)), np.argsort(rng.random((samples, len(lab))), axis=1)])
    values = np.asarray(statistic(lab[index]), dtype=np.float64)
    return float(np.mean(values <= observed + 1e-12 * max(1.0, abs(observed))))


def slope(x: Sequence[float], y: Sequence[float]) -> Difference:
    """The least-squares slope of ``y`` on ``x`` as a :class:`Difference` (``diff`` = slope) with its
    standard error ``s/√Σ(x − x̄)²`` (``s²`` the residual variance, ``N − 2`` degrees of freedom):
    ``direction()`` tests a rising / falling trend at level :data:`ALPHA`."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    sxx = float(((x - x.mean()) ** 2).sum())
    if len(x) < 3 or sxx == 0 or not np.isfinite(y).all():
        return Difference(math.nan, math.nan, math.nan)
    b = float(((x - x.mean()) * (y - y.mean())).sum() / sxx)
    resid = y - y.mean() - b * (x - x.mean())
    return Difference(b, math.sqrt(float((resid**2).sum()) / (len(x) - 2) / sxx), len(x) - 2)
