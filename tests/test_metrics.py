"""isoprobe.metrics against independent computations: numpy float64 eigenvalues, closed forms,
and the Theorem 1 inequality."""

import math

import numpy as np
import pytest
import torch

import isoprobe as ip


def _numpy_gap(G: np.ndarray) -> float:
    lam = np.linalg.eigvalsh(np.asarray(G, dtype=np.float64))
    return float(np.log(lam.mean()) - np.log(lam).mean())


def _spd_with_spectrum(lam: np.ndarray, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((len(lam), len(lam))))
    G = (Q * lam) @ Q.T
    return (G + G.T) / 2


def test_gram_is_items_as_rows():
    X = torch.randn(2, 3, 5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    G = ip.gram(X)
    assert G.shape == (2, 3, 5, 5)
    # entries near 0 (sums of 7 products of either sign): absolute rounding, at the Gram's scale
    ref = X[1, 2].numpy() @ X[1, 2].numpy().T
    np.testing.assert_allclose(G[1, 2].numpy(), ref, rtol=1e-13, atol=1e-13 * np.abs(ref).max())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gram_accumulates_half_precision_in_float32(dtype):
    X = torch.randn(4, 300, dtype=torch.float32).to(dtype)
    G = ip.gram(X)
    assert G.dtype == torch.float32
    ref = X.double().numpy() @ X.double().numpy().T
    np.testing.assert_allclose(G.numpy(), ref, rtol=1e-5, atol=1e-4)


def test_gap_matches_numpy_eigenvalues_batched():
    torch.manual_seed(0)
    X = torch.randn(2, 3, 6, 20, dtype=torch.float64)
    gap = ip.isometry_gap(ip.gram(X))
    assert gap.shape == (2, 3) and gap.dtype == torch.float64
    for idx in np.ndindex(2, 3):
        G = X[idx].numpy() @ X[idx].numpy().T
        assert gap[idx].item() == pytest.approx(_numpy_gap(G), rel=1e-12, abs=1e-14)
        assert ip.isometry(torch.from_numpy(G)).item() == pytest.approx(math.exp(-_numpy_gap(G)), rel=1e-12)


@pytest.mark.parametrize("rho", [0.0, 0.3, -0.7, 0.999, 1 - 1e-9])
def test_two_by_two_closed_form(rho):
    G = torch.tensor([[1.0, rho], [rho, 1.0]], dtype=torch.float64)
    expected = -0.5 * (math.log1p(-rho) + math.log1p(rho))
    assert ip.isometry_gap(G).item() == pytest.approx(expected, rel=1e-7, abs=1e-15)


def test_identity_scale_and_permutation_invariance():
    assert ip.isometry_gap(torch.eye(5)).item() == 0.0
    assert ip.isometry(7.5 * torch.eye(5)).item() == 1.0
    G = ip.gram(torch.randn(8, 12, dtype=torch.float64))
    gap = ip.isometry_gap(G).item()
    assert ip.isometry_gap(1e6 * G).item() == pytest.approx(gap, rel=1e-12)
    assert ip.isometry_gap(1e-6 * G).item() == pytest.approx(gap, rel=1e-12)
    perm = torch.randperm(8)
    assert ip.isometry_gap(G[perm][:, perm]).item() == pytest.approx(gap, rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_rank_deficient_is_exactly_infinite(dtype):
    X = torch.randn(3, 10, 4).to(dtype)  # n = 10 > d = 4
    G = ip.gram(X)
    gap = ip.isometry_gap(G)
    assert torch.all(gap == math.inf)
    assert torch.all(ip.isometry(G) == 0)
    assert ip.numerical_rank(G).tolist() == [4, 4, 4]


def test_zero_gram_and_duplicate_items_are_singular():
    assert ip.isometry_gap(torch.zeros(3, 3)).item() == math.inf
    x = torch.randn(1, 6, dtype=torch.float64)
    X = torch.cat([x, x, torch.randn(2, 6, dtype=torch.float64)])
    assert ip.isometry_gap(ip.gram(X)).item() == math.inf
    assert ip.lyapunov_gamma(ip.gram(X)).item() == math.inf


def test_near_singular_full_rank_is_finite_and_exact():
    lam = np.array([1.0, 0.5, 0.2, 1e-11])
    G = torch.from_numpy(_spd_with_spectrum(lam))
    expected = math.log(lam.mean()) - np.log(lam).mean()
    assert ip.isometry_gap(G).item() == pytest.approx(expected, rel=1e-4)
    assert ip.numerical_rank(G).item() == 4


def test_float32_input_gives_float64_answer_of_its_own_values():
    G32 = ip.gram(torch.randn(16, 64))
    assert G32.dtype == torch.float32
    gap = ip.isometry_gap(G32)
    assert gap.dtype == torch.float64
    assert gap.item() == pytest.approx(_numpy_gap(G32.double().numpy()), rel=1e-12)


def test_non_finite_input_gives_nan_not_exception():
    G = torch.eye(3, dtype=torch.float64).repeat(2, 1, 1)
    G[0, 1, 1] = math.nan
    gap = ip.isometry_gap(G)
    assert math.isnan(gap[0].item()) and gap[1].item() == 0.0


def test_not_psd_is_rejected():
    with pytest.raises(ValueError, match="positive semi-definite"):
        ip.isometry_gap(torch.diag(torch.tensor([1.0, -1.0], dtype=torch.float64)))


@pytest.mark.parametrize(
    "bad, fn",
    [
        (torch.ones(4), ip.isometry_gap),
        (torch.ones(3, 4), ip.isometry_gap),
        (torch.ones(0, 0), ip.isometry),
        (torch.ones(1, 1), ip.lyapunov_gamma),
        (torch.ones(5), ip.gram),
        (torch.ones(0, 5), ip.norm_variation_factor),
    ],
)
def test_bad_shapes_name_the_shape(bad, fn):
    with pytest.raises(ValueError, match=str(tuple(bad.shape)).replace("(", r"\(").replace(")", r"\)")):
        fn(bad)


def test_orthogonality_gap_against_direct_formula():
    G = ip.gram(torch.randn(2, 7, 9, dtype=torch.float64))
    got = ip.orthogonality_gap(G)
    for b in range(2):
        g = G[b].numpy()
        ref = np.linalg.norm(g / np.trace(g) - np.eye(7) / 7)
        assert got[b].item() == pytest.approx(ref, rel=1e-12)
    rank_one = torch.ones(5, 5)
    assert ip.orthogonality_gap(rank_one).item() == pytest.approx(math.sqrt(1 - 1 / 5), rel=1e-12)
    assert ip.orthogonality_gap(torch.eye(5)).item() == 0.0


def test_lyapunov_gamma_against_loop():
    X = torch.randn(6, 11, dtype=torch.float64)
    G = ip.gram(X).numpy()
    best = 0.0
    for i in range(6):
        for j in range(6):
            if i != j:
                c = abs(G[i, j]) / math.sqrt(G[i, i] * G[j, j])
                best = max(best, c / (1 - c))
    assert ip.lyapunov_gamma(torch.from_numpy(G)).item() == pytest.approx(best, rel=1e-12)
    assert ip.lyapunov_gamma(torch.eye(4)).item() == 0.0


def test_norm_variation_factor_against_numpy():
    X = torch.randn(3, 8, 5, dtype=torch.float64) * torch.rand(3, 8, 1, dtype=torch.float64)
    got = ip.norm_variation_factor(X)
    for b in range(3):
        a = np.linalg.norm(X[b].numpy(), axis=1)
        assert got[b].item() == pytest.approx(1 + np.var(a) / a.mean() ** 2, rel=1e-12)
    equal_norms = torch.nn.functional.normalize(torch.randn(5, 4), dim=-1)
    assert ip.norm_variation_factor(equal_norms).item() == pytest.approx(1.0, abs=1e-7)


def test_effective_rank_bounds_and_numpy():
    assert ip.effective_rank(torch.eye(6)).item() == pytest.approx(6.0, rel=1e-12)
    assert ip.effective_rank(torch.ones(6, 6)).item() == pytest.approx(1.0, rel=1e-9)
    G = ip.gram(torch.randn(5, 9, dtype=torch.float64))
    lam = np.linalg.eigvalsh(G.numpy())
    p = lam / lam.sum()
    assert ip.effective_rank(G).item() == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-12)


def test_theorem1_inequality_holds_for_random_items():
    """Joudaki et al. Theorem 1: I(G̃) ≥ I(G) · (norm-variation factor) after projecting to the sphere."""
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(200, 8, 16, dtype=torch.float64, generator=gen)
    X = X * torch.exp(torch.randn(200, 8, 1, dtype=torch.float64, generator=gen))
    before = ip.isometry(ip.gram(X))
    after = ip.isometry(ip.gram(torch.nn.functional.normalize(X, dim=-1)))
    bound = before * ip.norm_variation_factor(X)
    assert torch.all(after >= bound * (1 - 1e-12))
    assert torch.all(after > before)  # the norms vary, so normalising helps strictly
