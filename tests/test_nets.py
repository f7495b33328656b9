"""isoprobe.nets.LNMLP: real modules at named sites, the spec's weights laws, and agreement with
the dense reference of isoprobe.theory (the same network, run by hand)."""

import math

import numpy as np
import pytest
import torch
from torch import nn

import isoprobe as ip
from isoprobe.nets import LNMLP, Act, Norm
from isoprobe.theory import LNMLPSpec, simulate_spec


def _x(n: int = 6, d: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_sites_are_real_modules_with_stable_names():
    net = LNMLP(LNMLPSpec("relu", depth=3, width=16), in_features=12)
    names = [n for n, m in net.named_modules() if n and not list(m.children())]
    assert names == ["input_norm"] + [f"layers.{i}.{s}" for i in range(3) for s in ("fc", "act", "norm")]
    block = net.layers[1]
    assert isinstance(block.fc, nn.Linear) and block.fc.bias is None
    assert isinstance(block.norm, nn.LayerNorm) and not block.norm.elementwise_affine
    assert isinstance(block.act, Act)
    ran = []  # the leaves in execution order: the same as named_modules' order
    hooks = [
        m.register_forward_hook(lambda *_, name=name: ran.append(name))
        for name in names
        for m in [net.get_submodule(name)]
    ]
    net(_x().float())
    for h in hooks:
        h.remove()
    assert ran == names


def test_norm_module_follows_the_switches_and_order():
    net = LNMLP(LNMLPSpec("tanh", depth=2, width=8, centering="mean-field", projection="none"), 12)
    assert isinstance(net.layers[0].norm, Norm)
    net = LNMLP(LNMLPSpec("tanh", depth=2, width=8, centering="none", projection="none"), 12)
    assert isinstance(net.layers[0].norm, nn.Identity)
    net = LNMLP(LNMLPSpec("tanh", depth=2, width=8, order="norm-act"), 12)
    assert [n for n, _ in net.layers[0].named_children()] == ["fc", "norm", "act"]


@pytest.mark.parametrize(
    "switches",
    [
        dict(),
        dict(weights="orthogonal", widths="growing"),
        dict(weights="xavier", centering="none", projection="none"),
        dict(order="norm-act", widths=(20, 7, 30)),
        dict(centering="mean-field", projection="mean-field", gain=1.7),
    ],
)
def test_module_is_the_dense_reference(switches):
    """LNMLP(spec, seed=s, run=r) is run r of simulate(method="dense", seed=s), to rounding."""
    spec = LNMLPSpec("tanh", depth=3, width=16, **switches)
    X = _x()
    G = simulate_spec(spec, X, runs=3, method="dense", seed=11)
    net = LNMLP(spec, X.shape[1], seed=11, run=2, dtype=torch.float64)
    with torch.no_grad():
        reps = net.representations(X)
    mine = torch.stack([r @ r.T / r.shape[1] for r in reps])
    np.testing.assert_allclose(mine.numpy(), G[2].numpy(), rtol=1e-12, atol=1e-12)
    assert not np.allclose(G[1].numpy(), G[2].numpy())  # runs differ


def test_gaussian_and_xavier_weight_variance():
    d_in, d_out = 300, 500
    for weights, var in [("gaussian", 1 / d_in), ("xavier", (5 / 3) ** 2 * 2 / (d_in + d_out))]:
        spec = LNMLPSpec("tanh", depth=1, width=d_out, weights=weights)
        W = LNMLP(spec, d_in, dtype=torch.float64).layers[0].fc.weight.detach()
        # sample variance of 150 000 entries: relative standard error sqrt(2/N) ≈ 0.4 %
        assert W.var().item() == pytest.approx(var, rel=0.02)
        assert abs(W.mean().item()) < 4 * math.sqrt(var / W.numel())


@pytest.mark.parametrize("d_in, d_out", [(40, 40), (30, 70), (70, 30)])
def test_orthogonal_weights_are_scaled_semi_orthogonal(d_in, d_out):
    spec = LNMLPSpec("relu", depth=1, width=d_out, weights="orthogonal")
    W = LNMLP(spec, d_in, dtype=torch.float64).layers[0].fc.weight.detach()
    D = max(d_in, d_out)
    small = W.T @ W if d_out >= d_in else W @ W.T
    np.testing.assert_allclose(small.numpy(), D / d_in * np.eye(min(d_in, d_out)), atol=1e-10)
    assert (W.square().mean().item()) == pytest.approx(1 / d_in, rel=1e-10)


def test_construction_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    LNMLP(LNMLPSpec("relu", depth=2, width=32), 10, seed=3)
    assert torch.equal(state, torch.random.get_rng_state())


def test_layer_norm_output_has_unit_rms_and_zero_mean():
    net = LNMLP(LNMLPSpec("relu", depth=2, width=64), 12, dtype=torch.float64)
    with torch.no_grad():
        out = net(_x())
    np.testing.assert_allclose(out.mean(1).numpy(), 0, atol=1e-12)
    np.testing.assert_allclose(out.pow(2).mean(1).numpy(), 1, atol=1e-9)


def test_probe_sees_the_norm_sites():
    net = LNMLP(LNMLPSpec("tanh", depth=2, width=64), 12)
    with torch.no_grad(), ip.Probe(net, sites="norm") as probe:
        net(_x(20).float())
    sites = {r.site for r in probe.records}
    assert sites == {"input_norm", "layers.0.norm", "layers.1.norm"}
    holds = {r.site: r.theorem1_holds for r in probe.records if r.point == "normalized"}
    # 20 inputs of 12 entries: the input norm's Gram is singular by construction, so no check
    assert holds == {"input_norm": None, "layers.0.norm": True, "layers.1.norm": True}
