"""σ(h) − c₀ without cancellation: the logistic without projection shrinks 4× per layer, and the
plain difference σ(h) − 1/2 is pure rounding once |h| ≈ 1e-16 (Joudaki et al. Fig. 5's sigmoid
panel used to jump there). References: 50-digit decimal arithmetic and Taylor series."""

import math
from decimal import Decimal, getcontext

import numpy as np
import pytest
import torch

from isoprobe.activations import ACTIVATIONS, get_activation
from isoprobe.metrics import isometry_gap
from isoprobe.theory import LNMLPSpec, simulate_spec

getcontext().prec = 50
POINTS = [-3.0, -0.5, -1e-3, -1e-9, 1e-17, 1e-12, 1e-6, 0.25, 2.0, 5.0]


def _cos_minus_one(x: Decimal) -> Decimal:
    term, total, k = Decimal(1), Decimal(0), 0
    while True:  # cos x − 1 = Σ_{k≥1} (−1)^k x^{2k}/(2k)!
        k += 1
        term = -term * x * x / ((2 * k - 1) * (2 * k))
        total += term
        if abs(term) < Decimal(10) ** -60 * max(abs(total), Decimal(10) ** -300):
            return total


REFERENCE = {  # σ(x) − σ(0) in 50-digit decimals, written independently of isoprobe's formulas
    "sigmoid": lambda x: 1 / (1 + (-x).exp()) - Decimal(1) / 2,
    "exp": lambda x: (x - 2).exp() - Decimal(-2).exp(),
    "softplus": lambda x: (1 + x.exp()).ln() - Decimal(2).ln(),
    "cos": _cos_minus_one,
    "he2": lambda x: x * x,
}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_from_origin_matches_a_50_digit_reference(name):
    act = get_activation(name)
    x = torch.tensor(POINTS, dtype=torch.float64)
    got = act.from_origin(x).numpy()
    want = np.array([float(REFERENCE[name](Decimal(p))) for p in POINTS])
    np.testing.assert_allclose(got, want, rtol=1e-14, atol=0)


def test_the_plain_difference_is_rounding_at_tiny_h_and_from_origin_is_not():
    h = torch.tensor([1e-17, 3e-16, 1e-300], dtype=torch.float64)
    taylor = h / 4 - h**3 / 48  # σ(h) − 1/2 = h/4 − h³/48 + O(h⁵)
    stable = get_activation("sigmoid").from_origin(h)
    np.testing.assert_allclose(stable.numpy(), taylor.numpy(), rtol=1e-15)
    naive = torch.sigmoid(h) - 0.5
    assert (torch.abs(naive - taylor) / taylor > 0.1).all()  # what the old sampler computed


def test_every_activation_offset_at_the_origin_has_a_cancellation_free_form():
    zero = torch.zeros((), dtype=torch.float64)
    for name, act in ACTIVATIONS.items():
        smooth_at_0 = 0.0 not in act.kinks
        if float(act.fn(zero)) != 0.0 and smooth_at_0:
            assert act.shifted is not None, f"{name}: σ(0) ≠ 0, add a closed form σ(x) − σ(0)"


@pytest.mark.parametrize("gain", [0.5, 1.0, 1.7])
def test_the_shift_c0_minus_sigma0_in_closed_form(gain):
    exp = LNMLPSpec("exp", centering="mean-field")
    assert exp.shift(gain) == pytest.approx(math.exp(-2) * math.expm1(gain * gain / 2), rel=1e-13)
    relu = LNMLPSpec("relu", centering="mean-field")
    assert relu.shift(gain) == pytest.approx(gain / math.sqrt(2 * math.pi), rel=1e-13)
    for odd in ("sigmoid", "tanh"):  # σ − σ(0) is odd: its mean is exactly zero
        assert LNMLPSpec(odd, centering="mean-field").shift(gain) == 0.0


def test_sampler_centres_without_cancellation_and_agrees_with_the_plain_maps():
    spec = LNMLPSpec("sigmoid", depth=1, width=64, centering="mean-field", projection="none")
    (layer,) = spec.plan(8)
    h = torch.randn(3, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(spec.block_map(h, layer), spec.norm_map(spec.act_map(h), layer), rtol=1e-12, atol=1e-16)
    tiny = 1e-17 * h
    np.testing.assert_allclose(spec.block_map(tiny, layer), tiny / 4, rtol=1e-15)


def test_sigmoid_without_projection_no_longer_jumps_at_depth():
    """The old sampler's gap jumped by ~0.7 a layer from layer 26 on, to ~4 at layer 30 (rounding);
    now it keeps the slow drift of a near-linear random net (steps of a few hundredths)."""
    gen = torch.Generator().manual_seed(1)
    X0 = 0.7 * torch.randn(1, 200, generator=gen, dtype=torch.float64) + 0.7 * torch.randn(
        6, 200, generator=gen, dtype=torch.float64
    )
    spec = LNMLPSpec("sigmoid", depth=32, width=200, centering="mean-field", projection="none")
    G = simulate_spec(spec, X0, runs=2)
    gaps = isometry_gap(G).numpy().mean(0)
    rms = torch.diagonal(G, dim1=-2, dim2=-1).mean(-1).sqrt()[0]
    assert rms[-1] < 1e-17  # deep below the float64 resolution of σ(h) − 1/2
    assert np.all(np.isfinite(gaps)) and np.abs(np.diff(gaps)).max() < 0.1
