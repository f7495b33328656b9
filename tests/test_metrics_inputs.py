"""Input rules of the public metrics: asymmetric Grams are refused, non-finite in gives NaN out."""

from __future__ import annotations

import math

import pytest
import torch

import isoprobe as ip


def spectral_log_mean_eig(G):
    return ip.spectral_stats(G).log_mean_eig


def spectral_mean_log_eig(G):
    return ip.spectral_stats(G).mean_log_eig


def spectral_rank(G):
    return ip.spectral_stats(G).rank


GRAM_METRICS = [
    ip.isometry,
    ip.isometry_gap,
    ip.orthogonality_gap,
    ip.lyapunov_gamma,
    ip.effective_rank,
    ip.numerical_rank,
    spectral_log_mean_eig,
    spectral_mean_log_eig,
    spectral_rank,
]


@pytest.mark.parametrize("metric", GRAM_METRICS, ids=lambda f: f.__name__)
def test_asymmetric_gram_is_a_value_error_naming_the_asymmetry(metric):
    with pytest.raises(ValueError, match="not symmetric"):
        metric(torch.tensor([[1.0, 2.0], [0.0, 1.0]]))
    G = torch.eye(3, dtype=torch.float64).repeat(2, 1, 1)
    G[1, 0, 2] = 0.5
    with pytest.raises(ValueError, match="matrix 1 of the batch"):
        metric(G)


@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e8])
def test_symmetry_tolerance_is_relative_to_the_matrix_scale(scale):
    torch.manual_seed(0)
    X = torch.randn(6, 10, dtype=torch.float64)
    G = scale * (X @ X.T)
    noise = torch.zeros_like(G)
    noise[0, 1] = 1e-12 * G.abs().max()  # rounding-sized asymmetry: accepted at every scale
    expected = ip.isometry_gap(G)
    assert ip.isometry_gap(G + noise).item() == pytest.approx(expected.item(), rel=1e-9)
    noise[0, 1] = 1e-4 * G.abs().max()  # a real asymmetry: refused at every scale
    with pytest.raises(ValueError, match="not symmetric"):
        ip.isometry_gap(G + noise)
    X32 = torch.randn(64, 300)
    ip.isometry_gap(X32 @ X32.T)  # a float32 product X Xᵀ is symmetric to rounding


@pytest.mark.parametrize("metric", GRAM_METRICS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("bad", ["one-nan", "all-nan", "inf"])
def test_non_finite_in_nan_out_and_the_batch_unaffected(metric, bad):
    torch.manual_seed(1)
    X = torch.randn(3, 4, 8, dtype=torch.float64)
    G = X @ X.mT
    clean = metric(G)
    if bad == "one-nan":
        G[1, 2, 2] = math.nan
    elif bad == "all-nan":
        G[1] = math.nan
    else:
        G[1, 0, 3] = G[1, 3, 0] = math.inf
    out = metric(G)
    assert out.dtype == torch.float64 and torch.isnan(out[1])
    assert torch.equal(out[[0, 2]], clean[[0, 2]].to(torch.float64))


def test_norm_variation_factor_and_gram_propagate_nan():
    X = torch.randn(2, 4, 5, dtype=torch.float64)
    X[0, 1, 2] = math.nan
    assert torch.isnan(ip.norm_variation_factor(X)[0]) and torch.isfinite(ip.norm_variation_factor(X)[1])
    assert torch.isnan(ip.isometry_gap(ip.gram(X))[0])


def test_numerical_rank_counts_as_whole_numbers():
    X = torch.randn(5, 3, dtype=torch.float64)
    assert ip.numerical_rank(X @ X.T).item() == 3.0


def test_spectral_stats_rank_is_the_numerical_rank_as_float64():
    torch.manual_seed(2)
    X = torch.randn(2, 5, 3, dtype=torch.float64)
    G = X @ X.mT
    G[1] = torch.eye(5, dtype=torch.float64)
    G = torch.cat([G, torch.zeros(1, 5, 5, dtype=torch.float64)])  # a zero Gram: rank 0, not NaN
    stats = ip.spectral_stats(G)
    assert stats.rank.dtype == torch.float64 and torch.equal(stats.rank, ip.numerical_rank(G))
    assert stats.rank.tolist() == [3.0, 5.0, 0.0]
