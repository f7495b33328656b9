"""The verdicts' significance tests against closed forms and Monte-Carlo error rates."""

import math

import numpy as np
import pytest

from isoprobe.experiments.common import spearman
from isoprobe.experiments.stats import (
    ALPHA,
    mean_interval,
    median_interval,
    permutation_p,
    sign_test_p,
    slope,
    t_cdf,
    t_quantile,
    welch,
    welch_from_summaries,
)

#: Monte-Carlo trials behind every measured rate below, and the binomial 3-sigma slack on a rate ALPHA
TRIALS = 4000
SLACK = 3 * math.sqrt(ALPHA * (1 - ALPHA) / TRIALS)


@pytest.mark.parametrize("t", [-7.0, -1.3, -0.2, 0.0, 0.4, 2.0, 12.0])
def test_t_cdf_matches_the_closed_forms_of_one_two_and_three_degrees_of_freedom(t):
    assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
    assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
    s = t / math.sqrt(3)
    three = 0.5 + (s / (1 + s * s) + math.atan(s)) / math.pi
    assert t_cdf(t, 3) == pytest.approx(three, abs=1e-12)
    assert t_cdf(t, 1e7) == pytest.approx(0.5 * math.erfc(-t / math.sqrt(2)), abs=1e-6)


def test_t_quantile_inverts_the_cdf_and_matches_the_tables():
    for p, df, table in [(0.95, 2, 2.919986), (0.975, 4, 2.776445), (0.95, 10, 1.812461), (0.975, 1, 12.706205)]:
        q = t_quantile(p, df)
        assert q == pytest.approx(table, abs=1e-5)
        assert t_cdf(q, df) == pytest.approx(p, abs=1e-12)


def test_welch_matches_its_formula_and_a_known_example():
    d = welch([1.0, 2.0, 3.0], [4.0, 5.0, 7.0])
    se_a, se_b = 1 / math.sqrt(3), math.sqrt(7 / 3) / math.sqrt(3)
    assert d.diff == pytest.approx(10 / 3) and d.se == pytest.approx(math.hypot(se_a, se_b))
    assert d.df == pytest.approx(d.se**4 / (se_a**4 / 2 + se_b**4 / 2))
    assert d.p_greater == pytest.approx(1 - t_cdf(d.diff / d.se, d.df)) and d.direction() == "up"
    assert welch([4.0, 5.0, 7.0], [1.0, 2.0, 3.0]).direction() == "down"
    assert math.isnan(welch([1.0], [2.0, 3.0]).p_greater)  # one run: no test
    # a deterministic side (se 0) leaves the other's degrees of freedom
    assert welch_from_summaries(0.0, 0.0, 3, 1.0, 0.2, 3).df == pytest.approx(2.0)


def test_welch_false_up_rate_under_the_null_is_at_most_alpha():
    rng = np.random.default_rng(1)
    ups = sum(
        welch(rng.normal(0, 1, 3), rng.normal(0, s, 3)).direction() == "up"
        for s in (0.3, 1.0, 3.0)
        for _ in range(TRIALS // 3)
    )
    assert ups / (3 * (TRIALS // 3)) <= ALPHA + SLACK


def test_the_two_standard_error_rule_it_replaces_exceeds_that_rate_with_three_runs():
    rng = np.random.default_rng(2)
    n = 40_000
    a, b = rng.normal(0, 1, (n, 3)), rng.normal(0, 1, (n, 3))
    se = np.hypot(a.std(axis=1, ddof=1), b.std(axis=1, ddof=1)) / math.sqrt(3)
    rate = float(np.mean(b.mean(axis=1) - a.mean(axis=1) > 2 * se))
    assert rate > ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) / n)  # about 6%: the t quantile decides, not 2


def test_mean_interval_covers_the_mean_at_its_level():
    rng = np.random.default_rng(3)
    cover = 0
    for _ in range(TRIALS):
        _, lo, hi = mean_interval(rng.normal(5.0, 2.0, 4))
        cover += lo <= 5.0 <= hi
    assert abs(cover / TRIALS - 0.95) <= 3 * math.sqrt(0.95 * 0.05 / TRIALS)
    assert math.isnan(mean_interval([1.0])[1])


def test_sign_test_p_is_the_binomial_tail():
    assert sign_test_p(3, 3) == 0.125
    assert sign_test_p(4, 5) == pytest.approx(6 / 32)
    assert sign_test_p(0, 4) == 1.0
    with pytest.raises(ValueError):
        sign_test_p(5, 4)


def test_permutation_p_is_exact_on_a_perfect_ranking_and_uniform_under_the_null():
    data = np.arange(6.0)
    assert permutation_p(lambda labs: np.array([spearman(r, data) for r in labs]), -data) == pytest.approx(1 / 720)
    rng = np.random.default_rng(4)
    rejected = 0
    trials = 400
    for _ in range(trials):
        y = rng.normal(size=5)
        rejected += permutation_p(lambda labs, y=y: labs @ y, rng.normal(size=5)) <= ALPHA
    assert rejected / trials <= ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) / trials)


def test_permutation_p_samples_beyond_the_exact_limit():
    data = np.arange(9.0)
    p = permutation_p(lambda labs: labs @ data, -data, samples=2000, seed=0)
    assert 0 < p <= 2 / 2001


def test_slope_matches_polyfit_and_its_null_rate():
    rng = np.random.default_rng(5)
    x = np.repeat([1.0, 1.1, 1.3, 1.6], 3)
    y = 2 * x + rng.normal(0, 0.1, x.size)
    s = slope(x, y)
    assert s.diff == pytest.approx(np.polyfit(x, y, 1)[0])
    cov = np.polyfit(x, y, 1, cov="unscaled")[1] * ((y - np.polyval(np.polyfit(x, y, 1), x)) ** 2).sum() / (x.size - 2)
    assert s.se == pytest.approx(math.sqrt(cov[0, 0])) and s.df == x.size - 2 and s.direction() == "up"
    ups = sum(slope(x, rng.normal(size=x.size)).direction() == "up" for _ in range(TRIALS))
    assert ups / TRIALS <= ALPHA + SLACK
    assert math.isnan(slope([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]).diff)


def test_median_interval_order_statistics_and_coverage():
    # n = 6: [x(1), x(6)] covers with 1 − 2/64 = 96.9%; n = 5 cannot reach 95% (93.75%); n = 9: [x(2), x(8)]
    assert median_interval([5.0, 1, 4, 2, 6, 3])[1:] == (1.0, 6.0)
    assert all(math.isnan(v) for v in median_interval([1.0, 2, 3, 4, 5])[1:])
    assert median_interval(list(range(9)))[1:] == (1.0, 7.0)
    rng = np.random.default_rng(6)
    cover = sum(lo <= 0.0 <= hi for _, lo, hi in (median_interval(rng.standard_cauchy(9)) for _ in range(TRIALS)))
    assert cover / TRIALS >= 1 - 2 * 10 / 512 - SLACK  # exact coverage 96.1%, heavy tails or not
