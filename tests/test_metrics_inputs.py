"""Input rules of the public metrics: asymmetric Grams are refused, non-finite in gives NaN out."""

from __future__ import annotations

import math

import numpy as np
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


# ---- one input check for every Gram function (issue 21, item 4)

CHECKED = [ip.isometry, ip.isometry_gap, ip.orthogonality_gap, ip.effective_rank, ip.numerical_rank, spectral_rank]


@pytest.mark.parametrize("metric", CHECKED + [ip.lyapunov_gamma], ids=lambda f: f.__name__)
def test_not_psd_is_refused_by_every_gram_function(metric):
    with pytest.raises(ValueError, match="not positive semi-definite: eigenvalue -1"):
        metric(-torch.eye(3, dtype=torch.float64))
    G = torch.eye(3, dtype=torch.float64).repeat(3, 1, 1)
    G[2, 0, 0] = -1e-3
    with pytest.raises(ValueError, match="not positive semi-definite"):
        metric(G)


@pytest.mark.parametrize("metric", CHECKED + [ip.lyapunov_gamma], ids=lambda f: f.__name__)
def test_psd_tolerance_passes_rounding_below_zero(metric):
    # λ_min = -n·eps·max G_ii: rounding, inside the stated tolerance of 100·n·eps·max G_ii
    lam = -3 * torch.finfo(torch.float64).eps
    Q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    G = Q @ torch.diag(torch.tensor([lam, 1.0, 1.0], dtype=torch.float64)) @ Q.T
    metric((G + G.T) / 2)  # no error


@pytest.mark.parametrize("metric", CHECKED + [ip.lyapunov_gamma], ids=lambda f: f.__name__)
def test_bool_gram_is_a_type_error_saying_what_to_pass(metric):
    with pytest.raises(TypeError, match=r"real numbers, got dtype torch.bool.*G.double\(\)"):
        metric(torch.eye(3, dtype=torch.bool))
    with pytest.raises(TypeError, match="real numbers, got a numpy array of dtype bool"):
        metric(np.eye(3, dtype=bool))


@pytest.mark.parametrize("metric", CHECKED + [ip.lyapunov_gamma], ids=lambda f: f.__name__)
def test_numpy_grams_give_the_tensor_answer(metric):
    X = torch.randn(4, 5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    G = ip.gram(X)
    torch.testing.assert_close(metric(G.numpy()), metric(G), rtol=0, atol=0)
    with pytest.raises(TypeError, match="torch.Tensor or a numpy array, got list"):
        metric(G[0].tolist())


def test_one_item_is_answered_where_defined():
    one = torch.tensor([[2.5]], dtype=torch.float64)
    assert ip.isometry(one).item() == 1.0 and ip.isometry_gap(one).item() == 0.0
    assert ip.effective_rank(one).item() == 1.0 and ip.numerical_rank(one).item() == 1.0
    assert ip.orthogonality_gap(one).item() == 0.0
    assert ip.norm_variation_factor(torch.ones(1, 4)).item() == 1.0
    zero = torch.zeros(1, 1, dtype=torch.float64)
    assert ip.isometry_gap(zero).item() == math.inf and ip.numerical_rank(zero).item() == 0.0
    with pytest.raises(ValueError, match="at least n = 2 items"):  # a maximum over pairs i ≠ j
        ip.lyapunov_gamma(one)


def test_effective_rank_of_a_zero_gram_agrees_with_the_numerical_rank():
    Z = torch.zeros(2, 3, 3, dtype=torch.float64)
    Z[1] = torch.diag(torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64))
    assert ip.effective_rank(Z).tolist() == [0.0, pytest.approx(2.0, rel=1e-12)]
    assert ip.numerical_rank(Z).tolist() == [0.0, 2.0]
