"""The Probe's cheaper numerics: every shortcut against a direct float64 computation.

The determinant-lemma route for a norm's ``pre`` Gram, the reused conversion buffers, the
one-pass finiteness check, the float32 error estimates and their float64 recomputation, and the
device (deferred) path's promise of no host synchronisation inside a hook.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from isoprobe import Probe
from isoprobe import hooks as H
from isoprobe.metrics import _finite_matrices, isometry_gap


def np_gap(X: np.ndarray) -> float:
    G = X @ X.T
    if np.linalg.matrix_rank(G) < len(G):
        return math.inf
    lam = np.linalg.eigvalsh(G)
    return float(np.log(lam.mean()) - np.log(lam).mean())


def centred_gram_and_vector(g: int, N: int, m: int, offset: float, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(g, N, m, generator=gen, dtype=torch.float64) + offset * torch.rand(g, N, 1, generator=gen)
    mu = X.mean(-1)
    Xc = X - mu[..., None]
    return X, Xc @ Xc.mT, mu * math.sqrt(m)


@pytest.mark.parametrize("offset", [0.0, 3.0, 1e3])
def test_rank_one_route_equals_the_pre_grams_own_gap(offset):
    X, Gc, v = centred_gram_and_vector(4, 12, 40, offset)
    n = torch.full((4,), 12)
    gap_c, trusted, L = H._gap_factored(Gc, n, None)
    gap, used = H._gap_rank_one(Gc, v, n, None, gap_c, trusted, L, 40)
    assert used.all()  # the lemma decided every group: the test checks the shortcut itself
    expected = [np_gap(x.numpy()) for x in X]
    assert gap.tolist() == pytest.approx(expected, rel=1e-9)


def test_rank_one_route_with_padding():
    X, _, _ = centred_gram_and_vector(3, 10, 30, 2.0, seed=1)
    n = torch.tensor([10, 7, 4])
    pad = torch.arange(10)[None, :] >= n[:, None]
    X = X * (~pad)[..., None]
    mu = X.mean(-1)
    Xc = X - mu[..., None]
    Gc = Xc @ Xc.mT
    v = mu * math.sqrt(30)
    gap_c, trusted, L = H._gap_factored(Gc, n, pad)
    gap, used = H._gap_rank_one(Gc, v, n, pad, gap_c, trusted, L, 30)
    assert used.all()
    expected = [np_gap(X[i, : n[i]].numpy()) for i in range(3)]
    assert gap.tolist() == pytest.approx(expected, rel=1e-9)


def test_rank_one_route_falls_back_where_the_centred_gram_is_singular():
    """n = m items: centring leaves rank m - 1 (G_c singular), the uncentred Gram is regular."""
    X, Gc, v = centred_gram_and_vector(2, 8, 8, 1.0, seed=2)
    n = torch.full((2,), 8)
    gap_c, trusted, L = H._gap_factored(Gc, n, None)
    assert torch.isinf(gap_c).all()
    gap, used = H._gap_rank_one(Gc, v, n, None, gap_c, trusted, L, 8)  # n = m: not singular by construction
    assert not used.any()
    assert gap.tolist() == pytest.approx([np_gap(x.numpy()) for x in X], rel=1e-9)
    assert all(math.isfinite(t) for t in gap.tolist())


def test_layernorm_with_large_offsets_matches_float64_reference():
    torch.manual_seed(0)
    ln = nn.LayerNorm(24)
    x = torch.randn(3, 9, 24) + 50 * torch.rand(3, 9, 1)  # means ≫ spread: cancellation-prone
    with Probe(ln) as probe:
        ln(x)
    X = x.double().numpy()
    for r in probe["*:pre"]:
        assert r.isometry_gap == pytest.approx(np_gap(X[r.item]), rel=1e-8)
    for r in probe["*:centered"]:
        Xi = X[r.item] - X[r.item].mean(1, keepdims=True)
        assert r.isometry_gap == pytest.approx(np_gap(Xi), rel=1e-8)


def test_workspace_reuses_one_buffer_per_shape_and_is_released():
    work = H._Workspace()
    a = work.copy(torch.randn(2, 3, 4), torch.float64)
    b = work.copy(torch.ones(2, 3, 4), torch.float64)
    c = work.copy(torch.ones(2, 3, 5), torch.float64)
    assert a.data_ptr() == b.data_ptr() != c.data_ptr() and torch.equal(a, torch.ones(2, 3, 4, dtype=torch.float64))
    model = nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.GELU())
    probe = Probe(model)
    with probe:
        model(torch.randn(2, 5, 6))
        assert probe._work._buffers
    assert not probe._work._buffers


def test_finiteness_check_in_one_pass_keeps_its_meaning():
    G = torch.eye(3, dtype=torch.float64).repeat(4, 1, 1)
    G[1, 0, 1] = math.nan
    G[2, 2, 2] = math.inf
    G[3] = 1e308  # finite entries whose sum overflows
    assert _finite_matrices(G).tolist() == [True, False, False, True]


# ------------------------------------------------------------------- float32 Grams


def _ill_conditioned_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(48, 96), nn.LayerNorm(96), nn.GELU())


def _items(n: int, collapse: float) -> torch.Tensor:
    """(2, n, 48) tokens: a shared direction plus ``collapse``-scaled individual parts."""
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(1, 1, 48, generator=gen)
    return base + collapse * torch.randn(2, n, 48, generator=gen)


@pytest.mark.parametrize("collapse", [1.0, 0.1, 0.02])
def test_float32_error_estimate_covers_the_actual_error(collapse):
    model = _ill_conditioned_mlp()
    x = _items(20, collapse)
    loose = Probe(model, gram_dtype=torch.float32)
    loose.float32_tolerance = math.inf  # keep every float32 answer, to compare it
    with torch.no_grad(), Probe(model) as p64, loose as p32:
        model(x)
    assert len(p64.records) == len(p32.records) == 2 * 6
    for a, b in zip(p64.records, p32.records):
        assert a.key == b.key and a.gap_error is None
        assert b.gap_error is not None and b.gap_error > 0
        if math.isfinite(a.isometry_gap) and math.isfinite(b.gap_error):
            assert abs(a.isometry_gap - b.isometry_gap) <= b.gap_error, (a, b)


def test_float32_estimate_is_small_where_float32_suffices_and_grows_near_collapse():
    model = _ill_conditioned_mlp()
    est = {}
    for collapse in (1.0, 1e-3):
        probe = Probe(model, gram_dtype=torch.float32)
        probe.float32_tolerance = math.inf
        with torch.no_grad(), probe:
            model(_items(20, collapse))
        est[collapse] = max(r.gap_error for r in probe["*:pre"])
    assert est[1.0] < 1e-4 < est[1e-3]


def test_float32_groups_beyond_the_tolerance_are_recomputed_in_float64():
    model = _ill_conditioned_mlp()
    x = _items(20, 1e-3)  # near collapse: the float32 estimate exceeds the default 1e-3
    with torch.no_grad(), Probe(model) as p64, Probe(model, gram_dtype=torch.float32) as p32:
        model(x)
    assert p32.float32_tolerance == 1e-3
    redone = [b for b in p32.records if b.gap_error == 0.0]
    assert redone
    for a, b in zip(p64.records, p32.records):
        if b.gap_error == 0.0:  # the float64 answer, exactly
            assert (a.isometry_gap, a.orthogonality_gap, a.theorem1_holds) == (
                b.isometry_gap,
                b.orthogonality_gap,
                b.theorem1_holds,
            )
        else:
            assert b.gap_error <= 1e-3


def test_float32_tolerance_zero_gives_the_float64_records():
    model = _ill_conditioned_mlp()
    x = _items(12, 1.0)
    strict = Probe(model, gram_dtype=torch.float32)
    strict.float32_tolerance = 0.0
    with torch.no_grad(), Probe(model) as p64, strict:
        model(x)
    for a, b in zip(p64.records, strict.records):
        assert b.gap_error == 0.0
        assert a.isometry_gap == b.isometry_gap and a.theorem1_bound == b.theorem1_bound


def test_float32_estimate_against_isometry_gap_of_float32_grams():
    """The estimate is about the Gram's rounding: compare with metrics on the same items."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1, 30, 200, generator=gen) * torch.linspace(0.2, 3, 200)
    act = nn.Tanh()
    loose = Probe(act, gram_dtype=torch.float32)
    loose.float32_tolerance = math.inf
    with loose:
        act(x)
    for r in loose.records:
        z = x[0] if r.point == "pre" else torch.tanh(x[0])
        exact = isometry_gap(z.double() @ z.double().T).item()
        assert abs(r.isometry_gap - exact) <= r.gap_error < 1e-4


# ---------------------------------------------------------- the device (deferred) path


class _NoSync:
    """Makes every host synchronisation of a tensor an error (what a CUDA hook must not do)."""

    def __init__(self, monkeypatch):
        self.mp = monkeypatch

    def __enter__(self):
        def refuse(*args, **kwargs):
            raise AssertionError("host synchronisation inside a hook")

        for name in ("item", "tolist", "__bool__", "cpu", "numpy"):
            self.mp.setattr(torch.Tensor, name, refuse)
        return self

    def __exit__(self, *exc):
        self.mp.undo()


def test_deferred_measure_needs_no_host_synchronisation(monkeypatch):
    """The CPU stand-in for the CUDA promise: ``_measure`` (all a device hook runs) never asks
    a tensor for a host value, for norms (padded token view, with the determinant-lemma vector)
    and activations."""
    torch.manual_seed(0)
    ln, act = nn.LayerNorm(16), nn.GELU()
    x = torch.randn(3, 7, 16)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 4:] = False
    sites = [H.Site("ln", "norm", ln, H.NormSpec("layer", 1e-5)), H.Site("act", "activation", act)]
    with torch.no_grad():
        h = ln(x)
        inputs = [(x, h), (h, act(h))]
    with torch.no_grad(), _NoSync(monkeypatch):
        pending = [
            H._measure(s, a, b, "token", mask, torch.float64, 0, 0, H._Workspace()) for s, (a, b) in zip(sites, inputs)
        ]
    assert pending[0].pre_vector is not None and pending[0].grams.shape == (2, 3, 7, 7)
    finished = [H._finish(p, 1e-8) for p in pending]
    with torch.no_grad(), Probe(nn.Sequential(ln, act), attention_mask=mask) as direct:
        direct.model(x)
    ours = [r for f, t in zip(finished, H._to_host([f.table for f in finished])) for r in H._records(f, t)]
    assert [r.isometry_gap for r in ours] == [r.isometry_gap for r in direct.records]


def test_deferred_path_with_float32_grams_matches(monkeypatch):
    model = _ill_conditioned_mlp()
    x = _items(10, 1e-3)
    with torch.no_grad(), Probe(model, gram_dtype=torch.float32) as direct:
        model(x)
    monkeypatch.setattr(H, "_defer", lambda device: True)
    with torch.no_grad(), Probe(model, gram_dtype=torch.float32) as deferred:
        model(x)
    assert direct.records == deferred.records and any(r.gap_error == 0.0 for r in direct.records)


def test_cholesky_solve_from_the_factor_equals_a_dense_solve():
    """The float32 error estimates' ``G⁻¹ z`` (two triangular solves on the factor, sliced from a
    batch as the Probe slices it) against numpy's dense solve of the float64 Gram."""
    X = torch.randn(2, 3, 16, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    G = X @ X.mT
    L = torch.linalg.cholesky_ex(G.flatten(0, 1))[0].view(2, 3, 16, 16)
    z = torch.randn(3, 16, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for i in range(2):
        got = H._cholesky_solve(L[i], z).numpy()
        want = np.linalg.solve(G[i].numpy(), z.numpy())
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=0)


class _NormAct(nn.Module):
    """LayerNorm(8) then GELU: token Grams of more than 8 tokens are singular by construction."""

    def __init__(self):
        super().__init__()
        self.norm, self.act = nn.LayerNorm(8), nn.GELU()

    def forward(self, x, attention_mask=None):
        return self.act(self.norm(x))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_grams_with_fewer_entries_than_items_are_infinite_without_eigenvalues(monkeypatch, dtype):
    """Sequence 0 has 12 real tokens of 8 entries (rank ≤ 8 < 12: gap +inf, no factorisation can
    say otherwise), sequence 1 only 6 (a regular Gram). The shortcut gives the records of the
    full computation (``_short`` turned off), and never calls the eigenvalue fallback."""
    import isoprobe.metrics as M

    torch.manual_seed(0)
    model = _NormAct().eval()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.bias.normal_()
    x = torch.randn(2, 12, 8) + 3 * torch.rand(2, 12, 1)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 6:] = False

    def records(shortcut: bool):
        calls = []
        eigen = M._eigen_stats
        monkeypatch.setattr(M, "_eigen_stats", lambda G, *tol: calls.append(len(G)) or eigen(G, *tol))
        if not shortcut:
            monkeypatch.setattr(H, "_short", lambda dim, n: torch.zeros_like(n, dtype=torch.bool))
        with torch.no_grad(), Probe(model, gram_dtype=dtype) as probe:
            model(x, attention_mask=mask)
        monkeypatch.undo()
        return probe.records, sum(calls)

    fast, eigen_fast = records(True)
    full, eigen_full = records(False)
    assert eigen_fast == 0 and eigen_full > 0
    assert len(fast) == len(full) == 12
    for a, b in zip(fast, full):
        assert a.key == b.key and a.n == b.n and a.theorem1_holds == b.theorem1_holds
        if a.item == 0:
            X = x[0].double().numpy() if a.point == "pre" else None
            assert a.isometry_gap == b.isometry_gap == math.inf and a.isometry == 0.0
            assert X is None or np_gap(X) == math.inf  # numpy's own rank says singular too
            assert dtype == torch.float64 or a.gap_error == 0.0  # +inf in any precision
        else:
            assert a.isometry_gap == b.isometry_gap and math.isfinite(a.isometry_gap)
