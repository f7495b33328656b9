"""Batch-norm MLP (isoprobe.nets.bn_mlp) and its closed forms (isoprobe.theory.batchnorm)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from isoprobe.experiments.meterez import single_thread
from isoprobe.metrics import gram, isometry, isometry_gap, norm_variation_factor
from isoprobe.nets.bn_mlp import (
    BNMLP,
    RMSBatchNorm,
    ShapedActivation,
    first_layer_grad_log_norms,
    gaussian_,
    haar_orthogonal_,
)
from isoprobe.theory.batchnorm import (
    haar_fourth_moments,
    isometry_gap_contraction,
    isometry_gap_rate,
    meterez_bound,
    shaped_gains,
)

f64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Chains of tiny matrices: one intra-op thread is faster, and robust to a busy machine."""
    with single_thread():
        yield


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- batch norm


@pytest.mark.parametrize("eps", [0.0, 1e-3])
def test_rms_batchnorm_matches_hand_computation(eps):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 5)) * rng.uniform(0.1, 10, size=5)
    expected = x / np.sqrt((x**2).sum(axis=0) / x.shape[0] + eps)
    got = RMSBatchNorm(eps)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-14, atol=0)
    # every feature of the output has RMS exactly 1 over the batch when eps = 0
    if eps == 0:
        np.testing.assert_allclose((got**2).mean(axis=0), 1.0, rtol=1e-14)


def test_rms_batchnorm_rejects_bad_input():
    with pytest.raises(ValueError, match="n >= 2"):
        RMSBatchNorm()(torch.ones(1, 4))
    with pytest.raises(ValueError, match=r"\(n, d\)"):
        RMSBatchNorm()(torch.ones(3, 4, 5))
    with pytest.raises(ValueError, match="eps"):
        RMSBatchNorm(-1.0)


def test_standard_batchnorm_block_uses_batch_statistics():
    net = BNMLP(6, 5, 2, norm="batchnorm", generator=_gen(1), dtype=f64)
    x = torch.randn(9, 6, dtype=f64, generator=_gen(2))
    pre = (x @ net.blocks[0].fc.weight.T).detach().numpy()
    expected = (pre - pre.mean(0)) / np.sqrt(pre.var(0) + 1e-5)  # biased variance, torch's eps
    got = net.hidden(x)[1].detach().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    assert isinstance(net.blocks[1].norm, nn.BatchNorm1d)


def test_no_norm_is_plain_linear_chain():
    net = BNMLP(4, 4, 3, norm="none", weights="gaussian", generator=_gen(3), dtype=f64)
    x = torch.randn(5, 4, dtype=f64, generator=_gen(4))
    h = x
    for block in net.blocks:
        h = h @ block.fc.weight.T
    torch.testing.assert_close(net.hidden(x)[-1], h, rtol=1e-14, atol=1e-14)


# ----------------------------------------------------------------------------- weights


@pytest.mark.parametrize("shape", [(50, 50), (30, 70), (70, 30)])
def test_haar_orthogonal_is_orthogonal_to_1e_12(shape):
    W = haar_orthogonal_(torch.empty(shape, dtype=f64), generator=_gen(5))
    small = min(shape)
    P = W @ W.T if shape[0] <= shape[1] else W.T @ W
    assert (P - torch.eye(small, dtype=f64)).abs().max().item() < 1e-12


def test_every_weight_of_an_orthogonal_net_is_orthogonal():
    net = BNMLP(20, 16, 4, d_out=10, generator=_gen(6), dtype=f64)
    for name, W in net.named_parameters():
        P = W @ W.T if W.shape[0] <= W.shape[1] else W.T @ W
        assert (P - torch.eye(P.shape[0], dtype=f64)).abs().max().item() < 1e-12, name


def test_haar_orthogonal_has_haar_moments():
    """Monte Carlo against closed forms; a QR without the sign correction gives E[Q11] ≈ -0.47."""
    d, N = 4, 4000
    g = _gen(7)
    Q = torch.stack([haar_orthogonal_(torch.empty(d, d, dtype=f64), g) for _ in range(N)])
    q11 = Q[:, 0, 0].numpy()
    tr = Q.diagonal(dim1=-2, dim2=-1).sum(-1).numpy()
    m4, m22 = haar_fourth_moments(d)
    se = 1 / math.sqrt(N)
    assert abs(q11.mean()) < 5 * se * math.sqrt(1 / d)
    assert abs((q11**2).mean() - 1 / d) < 5 * se * 0.25
    assert abs((q11**4).mean() - m4) < 5 * se * 0.2
    assert abs((Q[:, 0, 0] ** 2 * Q[:, 0, 1] ** 2).mean().item() - m22) < 5 * se * 0.1
    # Diaconis–Shahshahani: E tr Q = 0 and E (tr Q)^2 = 1 on O(d)
    assert abs(tr.mean()) < 5 * se
    assert abs((tr**2).mean() - 1) < 5 * se * 2


def test_haar_fourth_moments_against_uniform_sphere_monte_carlo():
    d = 6
    u = np.random.default_rng(8).normal(size=(200_000, d))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    m4, m22 = haar_fourth_moments(d)
    assert (u[:, 0] ** 4).mean() == pytest.approx(m4, rel=0.02)
    assert (u[:, 0] ** 2 * u[:, 1] ** 2).mean() == pytest.approx(m22, rel=0.02)


def test_gaussian_init_variance():
    W = gaussian_(torch.empty(300, 200, dtype=f64), generator=_gen(9))
    assert W.mean().item() == pytest.approx(0.0, abs=5 / math.sqrt(60_000) / math.sqrt(200))
    assert W.var().item() == pytest.approx(1 / 200, rel=0.03)


def test_weights_are_reproducible_from_the_generator():
    a = BNMLP(5, 6, 3, generator=_gen(10))
    b = BNMLP(5, 6, 3, generator=_gen(10))
    for (_, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q)


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("norm", ["rms", "batchnorm", "none"])
def test_gradcheck_small_float64_net(norm):
    net = BNMLP(
        5, 4, 3, d_out=3, norm=norm, activation="tanh", gain=1.5, gain_exponent=0.5, generator=_gen(11), dtype=f64
    )
    x = torch.randn(6, 5, dtype=f64, generator=_gen(12), requires_grad=True)
    w = net.blocks[0].fc.weight.detach().clone().requires_grad_(True)

    def f(x_, w_):
        return torch.func.functional_call(net, {"blocks.0.fc.weight": w_}, (x_,))

    assert torch.autograd.gradcheck(f, (x, w), eps=1e-6, atol=1e-7)


def test_first_layer_grad_matches_autograd_of_fresh_nets():
    net = BNMLP(6, 6, 5, d_out=4, generator=_gen(13), dtype=f64)
    x = torch.randn(6, 6, dtype=f64, generator=_gen(14))
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    got = first_layer_grad_log_norms(net, x, y, [5, 2])
    for ell, value in zip([2, 5], got):
        fresh = BNMLP(6, 6, ell, d_out=4, dtype=f64)
        fresh.load_state_dict(
            {k: v for k, v in net.state_dict().items() if k.startswith("readout") or int(k.split(".")[1]) < ell}
        )
        loss = nn.functional.cross_entropy(fresh(x), y)
        loss.backward()
        assert value == pytest.approx(fresh.blocks[0].fc.weight.grad.norm().log().item(), rel=1e-12)


def _degenerate_batch(d: int, seed: int, duplicate: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    x = torch.randn(d, d, dtype=f64, generator=g)
    if duplicate:
        x[1::2] = x[0::2]
    return x, torch.randint(0, 10, (d,), generator=g)


@pytest.mark.parametrize("seed", [0, 1])
def test_duplicated_samples_make_the_gradient_explode_orthogonal_weights(seed):
    """Meterez et al. Fig. 2 / Theorem 5: degenerate input explodes, non-degenerate stays bounded."""
    d = 8
    rises = {}
    for duplicate in (True, False):
        x, y = _degenerate_batch(d, seed, duplicate)
        net = BNMLP(d, d, 200, generator=_gen(100 + seed), dtype=f64)
        shallow, deep = first_layer_grad_log_norms(net, x, y, [10, 200])
        rises[duplicate] = deep - shallow
    assert rises[True] > 5.0  # the gradient norm grows by more than e^5 from depth 10 to 200
    assert abs(rises[False]) < 1.5


def test_gaussian_weights_explode_orthogonal_do_not():
    """Meterez et al. Fig. 3 in small: log-norm slope per layer, Gaussian vs Haar weights."""
    d, depths = 16, [100, 400]
    x = torch.randn(d, d, dtype=f64, generator=_gen(15))
    y = torch.randint(0, 10, (d,), generator=_gen(16))
    slope = {}
    for weights in ("gaussian", "orthogonal"):
        net = BNMLP(d, d, 400, weights=weights, generator=_gen(17), dtype=f64)
        lo, hi = first_layer_grad_log_norms(net, x, y, depths)
        slope[weights] = (hi - lo) / 300
    assert slope["gaussian"] > 0.01
    assert abs(slope["orthogonal"]) < 0.1 * slope["gaussian"]


def test_grad_log_norms_validate_labels():
    net = BNMLP(4, 4, 2, d_out=3)
    x = torch.randn(5, 4)
    with pytest.raises(ValueError, match="0..2"):
        first_layer_grad_log_norms(net, x, torch.tensor([0, 1, 2, 3, 0]), [1])
    with pytest.raises(ValueError, match="one entry per sample"):
        first_layer_grad_log_norms(net, x, torch.tensor([0, 1]), [1])
    with pytest.raises(ValueError, match="1..2"):
        first_layer_grad_log_norms(net, x, torch.tensor([0, 1, 2, 0, 1]), [3])


# ----------------------------------------------------------------------------- structure


def test_logits_by_depth_are_the_nested_nets():
    net = BNMLP(5, 6, 4, d_out=3, activation="sin", gain_exponent=0.3, generator=_gen(18), dtype=f64)
    x = torch.randn(7, 5, dtype=f64, generator=_gen(19))
    short = BNMLP(5, 6, 2, d_out=3, activation="sin", gain_exponent=0.3, dtype=f64)
    short.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith(("blocks.2", "blocks.3"))})
    got = net.logits_by_depth(x, [2, 4])
    torch.testing.assert_close(got[2], short(x), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(got[4], net(x), rtol=1e-14, atol=1e-14)


def test_activation_shaping_gain_per_layer():
    net = BNMLP(3, 3, 5, activation="tanh", gain=2.0, gain_exponent=0.5)
    for ell, block in enumerate(net.blocks, start=1):
        assert block.act.gain == pytest.approx(2.0 / math.sqrt(ell), rel=1e-15)
    z = torch.linspace(-3, 3, 11, dtype=f64)
    torch.testing.assert_close(ShapedActivation("tanh", 0.3)(z), torch.tanh(0.3 * z))


def test_named_modules_are_stable_norm_sites():
    names = dict(BNMLP(3, 4, 2).named_modules())
    assert isinstance(names["blocks.1.norm"], RMSBatchNorm)
    assert isinstance(names["blocks.0.fc"], nn.Linear)
    assert isinstance(names["readout"], nn.Linear)


def test_bad_construction_and_input():
    with pytest.raises(ValueError, match="weights"):
        BNMLP(3, 3, 2, weights="xavier")
    with pytest.raises(ValueError, match="norm"):
        BNMLP(3, 3, 2, norm="layer")
    with pytest.raises(ValueError, match="depth"):
        BNMLP(3, 3, 0)
    with pytest.raises(ValueError, match="gain exponent"):
        BNMLP(3, 3, 2, gain_exponent=-1)
    net = BNMLP(3, 3, 2)
    with pytest.raises(ValueError, match="expects 3"):
        net(torch.ones(4, 5))
    with pytest.raises(ValueError, match="n >= 2"):
        net(torch.ones(1, 3))


# ----------------------------------------------------------------------------- Corollary 3


def _norm_sites(net: BNMLP, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    seen = []
    hooks = [
        m.register_forward_hook(lambda m, i, o: seen.append((i[0].detach(), o.detach())))
        for m in net.modules()
        if isinstance(m, (RMSBatchNorm, nn.BatchNorm1d))
    ]
    try:
        net(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize("weights", ["orthogonal", "gaussian"])
@pytest.mark.parametrize("activation", ["identity", "relu"])
def test_corollary3_holds_at_every_rms_bn_site(weights, activation):
    """I(C̃) ≥ I(C) · (1 + var(a)/ā²), C = XᵀX the d × d feature covariance, a the feature norms."""
    d, n = 12, 40
    net = BNMLP(20, d, 6, weights=weights, activation=activation, generator=_gen(20), dtype=f64)
    x = torch.randn(n, 20, dtype=f64, generator=_gen(21)) * torch.linspace(0.2, 3, 20, dtype=f64)
    sites = _norm_sites(net, x)
    assert len(sites) == 6
    for pre, post in sites:
        feats_pre, feats_post = pre.T, post.T  # features as items
        lhs = isometry(gram(feats_post))
        rhs = isometry(gram(feats_pre)) * norm_variation_factor(feats_pre)
        assert torch.isfinite(lhs) and torch.isfinite(rhs)
        assert lhs.item() >= rhs.item() * (1 - 1e-12)
        if rhs.item() > 0:  # ReLU without mean reduction can zero a feature: both sides 0 then
            assert lhs.item() > isometry(gram(feats_pre)).item()  # strict: the norms differ


def test_rms_batchnorm_zero_feature_stays_zero_with_zero_gradient():
    x = torch.randn(5, 3, dtype=f64, generator=_gen(25))
    x[:, 1] = 0
    x.requires_grad_(True)
    y = RMSBatchNorm()(x)
    assert torch.equal(y[:, 1], torch.zeros(5, dtype=f64))
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.equal(x.grad[:, 1], torch.zeros(5, dtype=f64))


def test_corollary3_holds_at_standard_batchnorm_sites_after_centering():
    d, n = 10, 30
    net = BNMLP(15, d, 4, norm="batchnorm", activation="tanh", generator=_gen(22), dtype=f64)
    x = torch.randn(n, 15, dtype=f64, generator=_gen(23))
    for pre, post in _norm_sites(net, x):
        centred = (pre - pre.mean(0)).T
        lhs = isometry(gram(post.T))
        rhs = isometry(gram(centred)) * norm_variation_factor(centred)
        assert lhs.item() >= rhs.item() * (1 - 1e-6)  # eps = 1e-5 of BatchNorm1d perturbs the projection


# ----------------------------------------------------------------------------- theory


def test_isometry_gap_contraction_against_monte_carlo():
    """E[φ'/φ] = d/(d+2) near isometry, simulated with plain QR steps (not the net's code)."""
    d, trials = 8, 400
    g = np.random.default_rng(24)
    ratios = []
    for _ in range(trials):
        H = np.eye(d) + 1e-4 * g.normal(size=(d, d))
        Z = g.normal(size=(d, d))
        Q, R = np.linalg.qr(Z)
        Q = Q * np.sign(np.diag(R))
        H2 = Q @ H
        H2 = H2 / np.sqrt((H2**2).mean(axis=1, keepdims=True))
        phi = isometry_gap(torch.from_numpy(H @ H.T)).item()
        phi2 = isometry_gap(torch.from_numpy(H2 @ H2.T)).item()
        ratios.append(phi2 / phi)
    ratios = np.asarray(ratios)
    se = ratios.std() / math.sqrt(trials)
    assert abs(ratios.mean() - isometry_gap_contraction(d)) < 5 * se + 1e-3
    assert isometry_gap_rate(d) == pytest.approx(-math.log(isometry_gap_contraction(d)), rel=1e-15)


def test_meterez_bound_closed_form():
    d, gap0 = 10, 0.2
    k = 0.015 * d**2 * (1 + d * gap0)
    np.testing.assert_allclose(
        meterez_bound(np.array([0.0, k, 2 * k]), d, gap0), [gap0, gap0 / math.e, gap0 / math.e**2], rtol=1e-14
    )
    with pytest.raises(ValueError):
        meterez_bound(1, d, float("nan"))


def test_shaped_gains_and_validation():
    np.testing.assert_allclose(shaped_gains(4, 1.0, 0.4), [1, 2**-0.4, 3**-0.4, 4**-0.4], rtol=1e-15)
    np.testing.assert_array_equal(shaped_gains(3), [1.0, 1.0, 1.0])
    for bad in (dict(depth=0), dict(depth=3, gain=0.0), dict(depth=3, exponent=float("inf"))):
        with pytest.raises(ValueError):
            shaped_gains(**bad)
    with pytest.raises(ValueError):
        haar_fourth_moments(1)
