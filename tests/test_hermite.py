"""Hermite coefficients, β, dual activation and mean-field map against independent references.

References: closed forms (paper Table 2 / C.1, the arc-cosine and erf kernels, Gaussian moment
generating functions), and scipy.integrate.quad with explicit breakpoints at the kinks (for the
dual: the inner Gaussian integral in closed form, the outer one split at the kinks and graded
towards their images κ/ρ, where the inner integral varies on the scale √(1−ρ²)).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import integrate, special

from isoprobe import (
    activation_stats,
    dual_activation,
    get_activation,
    hermite_coefficients,
    isometry_strength,
    list_activations,
    mean_field_map,
)
from isoprobe.hermite import beta_table

L = 14.0  # φ(14) ≈ 1e-43: the references integrate over [−L, L]


def _phi(t):
    return np.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)


def _quad(f, points) -> float:
    """∫ f on [−L, L], one scipy quad per piece between the sorted breakpoints."""
    pts = sorted({-L, L, *(p for p in points if -L < p < L)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", integrate.IntegrationWarning)
        return sum(integrate.quad(f, a, b, epsabs=1e-16, epsrel=1e-14, limit=200)[0] for a, b in zip(pts[:-1], pts[1:]))


def _ref_stats(f, kinks, gain=1.0):
    """(c0, c1, var, β) of z ↦ f(gain z) by scipy quad split at the kinks."""
    pts = [k / gain for k in kinks]
    g = lambda z: f(gain * z)  # noqa: E731
    c0 = _quad(lambda z: g(z) * _phi(z), pts)
    c1 = _quad(lambda z: z * g(z) * _phi(z), pts)
    var = _quad(lambda z: (g(z) - c0) ** 2 * _phi(z), pts)
    return c0, c1, var, 2 - c1 * c1 / var


def _ref_dual(f, inner, kinks, rho):
    """E[f(x) f(y)], corr ρ: ∫ f(x) E_z[f(ρx + sz)] φ(x) dx with the inner integral ``inner(m, s)``
    in closed form; the outer split at the kinks and graded towards κ/ρ."""
    if abs(rho) == 1:
        return _quad(lambda x: f(x) * f(rho * x) * _phi(x), kinks + [-k for k in kinks])
    s = math.sqrt(1 - rho * rho)
    pts = set(kinks)
    for k in kinks if rho != 0 else []:
        pts |= {k / rho + sg * s / abs(rho) * 2.0**j for j in range(-3, 12) for sg in (-1, 1)} | {k / rho}
    return _quad(lambda x: f(x) * inner(rho * x, s) * _phi(x), sorted(pts))


def _smoothed_relu(t):  # E[(t + Z)⁺] = t Φ(t) + φ(t)
    return t * special.ndtr(t) + _phi(t)


# --------------------------------------------------------------------------------------------
# β


PAPER_BETA = {  # Table 2 and Table C.1 (with gain α)
    "he1": lambda a: 1.0,
    "he2": lambda a: 2.0,
    "relu": lambda a: (3 * math.pi - 4) / (2 * math.pi - 2),
    "step": lambda a: 2 - 2 / math.pi,
    "sin": lambda a: 2 * (math.exp(2 * a * a) - math.exp(a * a) * a * a - 1) / (math.exp(2 * a * a) - 1),
    "exp": lambda a: (2 - 2 * math.exp(a * a) + a * a) / (1 - math.exp(a * a)),
}


@pytest.mark.parametrize("name", sorted(PAPER_BETA))
@pytest.mark.parametrize("gain", [0.5, 1.0, 2.0, 3.0, -1.3])
def test_beta_matches_the_papers_closed_forms(name, gain):
    assert isometry_strength(name, gain) == pytest.approx(PAPER_BETA[name](gain), abs=1e-12)


def test_beta_table_2_values():
    assert isometry_strength("sin") == pytest.approx(2 - 2 * math.e / (math.e**2 - 1), abs=1e-13)
    assert isometry_strength("exp") == pytest.approx(2 - 1 / (math.e - 1), abs=1e-13)
    assert isometry_strength("relu") == pytest.approx(1.2665288965378703, abs=1e-13)


SCIPY_FUNCS = {  # (scalar function, kinks) written independently of the registry
    "leaky_relu": (lambda x: x if x > 0 else 0.01 * x, [0.0]),
    "elu": (lambda x: x if x > 0 else math.expm1(x), [0.0]),
    "selu": (lambda x: 1.0507009873554805 * (x if x > 0 else 1.6732632423543772 * math.expm1(x)), [0.0]),
    "gelu": (lambda x: x * special.ndtr(x), []),
    "gelu_tanh": (lambda x: 0.5 * x * (1 + math.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))), []),
    "silu": (lambda x: x * special.expit(x), []),
    "mish": (lambda x: x * math.tanh(np.logaddexp(x, 0)), []),
    "softplus": (lambda x: np.logaddexp(x, 0), []),
    "tanh": (math.tanh, []),
    "sigmoid": (special.expit, []),
    "hardtanh": (lambda x: min(max(x, -1.0), 1.0), [-1.0, 1.0]),
    "abs": (abs, [0.0]),
    "cos": (math.cos, []),
    "identity": (lambda x: x, []),
}


@pytest.mark.parametrize("name", sorted(SCIPY_FUNCS))
@pytest.mark.parametrize("gain", [1.0, 2.5])
def test_stats_of_registry_activations_match_scipy(name, gain):
    f, kinks = SCIPY_FUNCS[name]
    c0, c1, var, beta = _ref_stats(f, kinks, gain)
    s = activation_stats(name, gain)
    assert s.c0 == pytest.approx(c0, abs=1e-12) and s.c1 == pytest.approx(c1, abs=1e-12)
    assert s.var == pytest.approx(var, rel=1e-12)
    assert s.beta == pytest.approx(beta, abs=1e-10)
    closed = get_activation(name).closed_form_beta
    if closed is not None:  # the derived closed forms (leaky ReLU, hardtanh, abs, cos, identity)
        assert closed(gain) == pytest.approx(beta, abs=1e-10)


CALLABLES = {  # torch callables with kinks away from 0 that isoprobe is not told about
    "relu(x-0.3)": (lambda x: torch.relu(x - 0.3), lambda x: max(x - 0.3, 0.0), [0.3]),
    "hardtanh": (lambda x: x.clamp(-1, 1), lambda x: min(max(x, -1.0), 1.0), [-1.0, 1.0]),
    "leaky(x-0.7)": (
        lambda x: torch.where(x > 0.7, x - 0.7, 0.2 * (x - 0.7)),
        lambda x: x - 0.7 if x > 0.7 else 0.2 * (x - 0.7),
        [0.7],
    ),
    "step(x-0.25)": (lambda x: (x > 0.25).double(), lambda x: float(x > 0.25), [0.25]),
    "elu(x-0.4)": (
        lambda x: torch.where(x > 0.4, x - 0.4, torch.expm1(x - 0.4)),
        lambda x: x - 0.4 if x > 0.4 else math.expm1(x - 0.4),
        [0.4],
    ),
    "|x+1.3|": (lambda x: (x + 1.3).abs(), lambda x: abs(x + 1.3), [-1.3]),
}


@pytest.mark.parametrize("name", sorted(CALLABLES))
@pytest.mark.parametrize("gain", [1.0, 3.0])
def test_beta_of_callables_with_unknown_kinks(name, gain):
    fn, f, kinks = CALLABLES[name]
    assert isometry_strength(fn, gain) == pytest.approx(_ref_stats(f, kinks, gain)[3], abs=1e-9)


@pytest.mark.parametrize("gain", [0.5, 1.0, 3.0])
def test_tanh_is_a_shifted_rescaled_sigmoid(gain):
    # tanh(αx) = 2 sigmoid(2αx) − 1: same β, and the duals are related by 4σ̂ − 1
    assert isometry_strength("tanh", gain) == pytest.approx(isometry_strength("sigmoid", 2 * gain), abs=1e-13)
    rho = torch.linspace(-1, 1, 201, dtype=torch.float64)
    expected = 4 * dual_activation("sigmoid", rho, 2 * gain) - 1
    torch.testing.assert_close(dual_activation("tanh", rho, gain), expected, rtol=0, atol=1e-13)


@pytest.mark.parametrize("gain", [0.5, 1.0, 2.0])
def test_beta_between_one_and_two(gain):
    for name in list_activations():
        assert 1 - 1e-12 <= isometry_strength(name, gain) <= 2 + 1e-12, name


def test_constant_activation_has_no_beta():
    for call in (lambda: isometry_strength("tanh", 0.0), lambda: mean_field_map("relu", 0.2, 0.0)):
        with pytest.raises(ValueError, match="constant"):
            call()
    assert dual_activation("sigmoid", 0.3, gain=0.0) == pytest.approx(0.25, abs=1e-15)


def test_stateful_modules_are_not_cached():
    module = torch.nn.LeakyReLU(0.5)
    first = isometry_strength(module)
    module.negative_slope = -1.0  # now |x|
    assert first == pytest.approx(2 - 0.75**2 / (0.75**2 + 0.25**2 * (1 - 2 / math.pi)), abs=1e-10)
    assert isometry_strength(module) == pytest.approx(2.0, abs=1e-10)


@pytest.mark.parametrize(
    "bad, error",
    [
        (lambda x: x.float(), "float64"),
        (lambda x: x.sum(), "elementwise"),
        (lambda x: 1 / x, "not finite"),
    ],
)
def test_bad_callables_fail_clearly(bad, error):
    with pytest.raises(ValueError, match=error):
        isometry_strength(bad)


def test_overflowing_gain_fails_clearly():
    assert isometry_strength("exp", 3.0) == pytest.approx(PAPER_BETA["exp"](3.0), abs=1e-12)
    with pytest.raises(ValueError, match="smaller gain"):
        isometry_strength("exp", 20.0)


# --------------------------------------------------------------------------------------------
# Hermite coefficients


def _ref_coefficient(f, kinks, k):
    norm = math.sqrt(math.factorial(k))
    return _quad(lambda z: f(z) * special.eval_hermitenorm(k, z) / norm * _phi(z), kinks)


@pytest.mark.parametrize("name", ["relu", "hardtanh", "step", "tanh", "elu"])
def test_hermite_coefficients_match_scipy(name):
    f, kinks = {"relu": (lambda x: max(x, 0.0), [0.0]), "step": (lambda x: float(x > 0), [0.0])}.get(
        name, SCIPY_FUNCS.get(name)
    )
    c = hermite_coefficients(name, 20)
    assert c.dtype == torch.float64 and c.shape == (21,)
    for k in (0, 1, 2, 3, 4, 7, 12, 20):
        assert c[k].item() == pytest.approx(_ref_coefficient(f, kinks, k), abs=1e-13)


def test_hermite_coefficients_closed_forms():
    he2 = hermite_coefficients("he2", 6)
    torch.testing.assert_close(
        he2, torch.tensor([0, 0, math.sqrt(2), 0, 0, 0, 0], dtype=torch.float64), atol=1e-14, rtol=0
    )
    # E[e^{αz} He_k(z)]/√k! = e^{α²/2} α^k/√k!, times e^{-2}
    a = 1.5
    exp = hermite_coefficients("exp", 40, gain=a)
    k = np.arange(41)
    ref = np.exp(a * a / 2 - 2) * a**k / np.sqrt(special.factorial(k))
    np.testing.assert_allclose(exp.numpy(), ref, rtol=1e-12, atol=1e-15)
    # relu: c0 = 1/√(2π), c1 = 1/2, odd k ≥ 3 vanish
    relu = hermite_coefficients("relu", 600)
    assert relu[0].item() == pytest.approx(1 / math.sqrt(2 * math.pi), abs=1e-15)
    assert relu[1].item() == pytest.approx(0.5, abs=1e-15)
    assert relu[3::2].abs().max().item() < 1e-14


@pytest.mark.parametrize("name", ["tanh", "gelu", "sin", "sigmoid"])
def test_parseval_for_smooth_activations(name):
    # Σ_k c_k² = E σ² (Lemma B.5 at ρ = 1)
    s = activation_stats(name)
    c = hermite_coefficients(name, 400)
    assert (c**2).sum().item() == pytest.approx(s.var + s.c0**2, abs=1e-13)


# --------------------------------------------------------------------------------------------
# dual activation and mean-field map

RHO = torch.tensor(
    np.concatenate(
        [
            np.linspace(-1, 1, 1001),
            1 - np.logspace(-15, -1, 40),
            -1 + np.logspace(-15, -1, 40),
            [0.9646, 0.9647, -0.9646, -0.9647],
        ]
    ),
    dtype=torch.float64,
)


def _arccos_kernel(r):  # E[relu(x) relu(y)], Cho & Saul's degree-1 arc-cosine kernel
    return (np.sqrt(1 - r * r) + (np.pi - np.arccos(r)) * r) / (2 * np.pi)


@pytest.mark.parametrize("gain", [1.0, 2.5, -0.7])
def test_relu_dual_is_the_arccos_kernel(gain):
    got = dual_activation("relu", RHO, gain)
    assert got.dtype == torch.float64 and got.shape == RHO.shape
    ref = gain * gain * _arccos_kernel(RHO.numpy())
    np.testing.assert_allclose(got.numpy(), ref, rtol=0, atol=1e-12 * gain * gain)


def test_relu_callable_dual_is_the_arccos_kernel():
    got = dual_activation(lambda x: torch.relu(x), RHO)  # kinks found, not declared
    np.testing.assert_allclose(got.numpy(), _arccos_kernel(RHO.numpy()), rtol=0, atol=1e-12)


def test_dual_of_positively_homogeneous_relatives():
    r = RHO.numpy()
    step = (np.pi - np.arccos(r)) / (2 * np.pi)
    np.testing.assert_allclose(dual_activation("step", RHO).numpy(), step, rtol=0, atol=1e-12)
    # |x| = relu(x) + relu(−x); leaky(x) = relu(x) − s relu(−x)
    k_pos, k_neg = _arccos_kernel(r), _arccos_kernel(-r)
    np.testing.assert_allclose(dual_activation("abs", RHO).numpy(), 2 * k_pos + 2 * k_neg, rtol=0, atol=1e-12)
    s = 0.01
    leaky = (1 + s * s) * k_pos - 2 * s * k_neg
    np.testing.assert_allclose(dual_activation("leaky_relu", RHO).numpy(), leaky, rtol=0, atol=1e-12)


@pytest.mark.parametrize("a", [0.5, 1.0, 3.0])
def test_erf_dual_closed_form(a):
    ref = 2 / np.pi * np.arcsin(2 * a * a * RHO.numpy() / (1 + 2 * a * a))
    as_callable = dual_activation(lambda x: torch.erf(a * x), RHO)
    with_gain = dual_activation(torch.erf, RHO, gain=a)
    np.testing.assert_allclose(as_callable.numpy(), ref, rtol=0, atol=1e-12)
    np.testing.assert_allclose(with_gain.numpy(), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("gain", [0.5, 1.0, 2.0, 3.0])
def test_entire_activations_dual_closed_forms(gain):
    r, a2 = RHO.numpy(), gain * gain
    np.testing.assert_allclose(
        dual_activation("sin", RHO, gain).numpy(), np.exp(-a2) * np.sinh(a2 * r), atol=1e-13, rtol=0
    )
    np.testing.assert_allclose(
        dual_activation("cos", RHO, gain).numpy(), np.exp(-a2) * np.cosh(a2 * r), atol=1e-13, rtol=0
    )
    # E[e^{αx−2} e^{αy−2}] = e^{−4} e^{α²(1+ρ)}, up to e^{14}: accurate relative to σ̂(1)
    ref = np.exp(-4 + a2 * (1 + r))
    np.testing.assert_allclose(dual_activation("exp", RHO, gain).numpy(), ref, atol=1e-13 * ref.max(), rtol=0)


REF_RHO = [-1.0, -1 + 1e-12, -0.9999999, -0.99, -0.97, -0.5, 0.0, 0.3, 0.9, 0.96, 0.97, 0.99, 0.999999, 1 - 1e-10, 1.0]


def _hardtanh_inner(m, s):  # E_z clip(m + s z, −1, 1), clip(y) = −1 + relu(y+1) − relu(y−1)
    return -1 + s * (_smoothed_relu((m + 1) / s) - _smoothed_relu((m - 1) / s))


def _elu_inner(c):
    def inner(m, s):  # E_z elu(m + s z − c)
        m = m - c
        pos = m * special.ndtr(m / s) + s * _phi(m / s)
        return pos + math.exp(m + s * s / 2) * special.ndtr((-m - s * s) / s) - special.ndtr(-m / s)

    return inner


DUAL_CASES = {
    "hardtanh (registry)": ("hardtanh", SCIPY_FUNCS["hardtanh"][0], _hardtanh_inner, [-1.0, 1.0]),
    "hardtanh (callable)": (CALLABLES["hardtanh"][0], SCIPY_FUNCS["hardtanh"][0], _hardtanh_inner, [-1.0, 1.0]),
    "relu(x-0.3) (callable)": (
        CALLABLES["relu(x-0.3)"][0],
        CALLABLES["relu(x-0.3)"][1],
        lambda m, s: s * _smoothed_relu((m - 0.3) / s),
        [0.3],
    ),
    "elu(x-0.4) (callable)": (CALLABLES["elu(x-0.4)"][0], CALLABLES["elu(x-0.4)"][1], _elu_inner(0.4), [0.4]),
    "elu (registry)": ("elu", SCIPY_FUNCS["elu"][0], _elu_inner(0.0), [0.0]),
}


@pytest.mark.parametrize("case", sorted(DUAL_CASES))
def test_dual_with_kinks_matches_scipy(case):
    act, f, inner, kinks = DUAL_CASES[case]
    got = dual_activation(act, torch.tensor(REF_RHO, dtype=torch.float64)).numpy()
    ref = np.array([_ref_dual(f, inner, kinks, r) for r in REF_RHO])
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["relu", "tanh", "hardtanh", "gelu", "selu"])
def test_dual_endpoints_and_centering(name):
    s = activation_stats(name)
    c = hermite_coefficients(name, 2)
    assert dual_activation(name, 0.0) == pytest.approx(s.c0**2, abs=1e-14)  # σ̂(0) = c0²
    assert dual_activation(name, 1.0) == pytest.approx(s.var + s.c0**2, abs=1e-14)  # σ̂(1) = E σ²
    f = lambda z: float(get_activation(name).fn(torch.tensor(z, dtype=torch.float64)))  # noqa: E731
    minus_one = _quad(lambda z: f(z) * f(-z) * _phi(z), [0.0, 1.0, -1.0])
    assert dual_activation(name, -1.0) == pytest.approx(minus_one, abs=1e-12)  # σ̂(−1) = E σ(z)σ(−z)
    rho = torch.linspace(-1, 1, 41, dtype=torch.float64)
    torch.testing.assert_close(
        dual_activation(name, rho, centered=True), dual_activation(name, rho) - s.c0**2, atol=1e-14, rtol=0
    )
    # derivative at 0 is c1² (Lemma B.5)
    h = 1e-5
    slope = (dual_activation(name, h) - dual_activation(name, -h)) / (2 * h)
    assert slope == pytest.approx(c[1].item() ** 2, abs=1e-8)


def test_mean_field_map_on_a_correlation_matrix():
    torch.manual_seed(0)
    X = torch.randn(50, 8, dtype=torch.float64)
    G = X @ X.T
    d = G.diagonal().sqrt()
    C = G / d[:, None] / d[None, :]
    C = (C + C.T) / 2  # exactly symmetric
    for name in ("relu", "tanh"):
        out = mean_field_map(name, C)
        assert out.shape == C.shape and out.dtype == torch.float64
        torch.testing.assert_close(out.diagonal(), torch.ones(50, dtype=torch.float64), atol=1e-15, rtol=0)
        torch.testing.assert_close(out, out.T, atol=0, rtol=0)
        s = activation_stats(name)
        torch.testing.assert_close(out, dual_activation(name, C, centered=True) / s.var, atol=1e-15, rtol=0)
    r = C.numpy()
    relu_ref = (_arccos_kernel(np.clip(r, -1, 1)) - 1 / (2 * np.pi)) / (0.5 - 1 / (2 * np.pi))
    np.testing.assert_allclose(mean_field_map("relu", C).numpy(), relu_ref, atol=1e-12, rtol=0)
    assert isinstance(mean_field_map("relu", 0.5), float)


def test_mean_field_map_agrees_with_a_wide_random_layer():
    # Monte Carlo: the centred, normalised correlation of σ(W x) over 200k features
    g = torch.Generator().manual_seed(0)
    rho = 0.6
    x = torch.randn(200_000, generator=g, dtype=torch.float64)
    y = rho * x + math.sqrt(1 - rho * rho) * torch.randn(200_000, generator=g, dtype=torch.float64)
    a, b = torch.tanh(x), torch.tanh(y)
    empirical = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
    assert mean_field_map("tanh", rho) == pytest.approx(empirical, abs=5e-3)  # ~5 standard errors


def test_rho_validation():
    for bad in (1.5, -1.01, float("nan")):
        with pytest.raises(ValueError, match=r"\[-1, 1\]"):
            dual_activation("relu", bad)
    with pytest.raises(ValueError):
        mean_field_map("relu", torch.tensor([[1.0, 2.0], [2.0, 1.0]]))
    # rounding just past ±1 counts as ±1
    assert dual_activation("relu", 1 + 1e-15) == dual_activation("relu", 1.0)


# --------------------------------------------------------------------------------------------
# the β table


def test_beta_table_rows():
    rows = beta_table(["relu", "tanh", "exp"], [1.0, 2.0])
    assert [(r["activation"], r["gain"]) for r in rows] == [
        ("relu", 1.0),
        ("relu", 2.0),
        ("tanh", 1.0),
        ("tanh", 2.0),
        ("exp", 1.0),
        ("exp", 2.0),
    ]
    for r in rows:
        assert r["beta"] == pytest.approx(2 - r["c1"] ** 2 / r["var"], abs=1e-15)
        if r["activation"] == "tanh":
            assert r["beta_closed_form"] is None
        else:
            assert r["beta"] == pytest.approx(r["beta_closed_form"], abs=1e-12)
    with pytest.raises(ValueError, match="unknown activation"):
        beta_table(["relu", "nope"])
