"""The authors' notebook protocol (isoprobe.experiments.joudaki_protocol) against independent computations."""

import math

import numpy as np
import pytest
import torch

from isoprobe.experiments.joudaki_protocol import (
    SETUPS,
    MCStats,
    NotebookRun,
    PaperVariant,
    degenerate_gaussian,
    monte_carlo_stats,
    notebook_gap,
    notebook_rows,
    notebook_run,
    notebook_variant,
    pooled_curve,
)
from isoprobe.experiments.joudaki_protocol import _preactivation as preactivation
from isoprobe.hermite import activation_stats


def _np_gap(X: np.ndarray) -> float:
    lam = np.linalg.eigvalsh(X @ X.T)
    return float(np.log(lam.mean()) - np.log(lam).mean())


@pytest.mark.parametrize("kappa", [1.0, 5.0, 100.0])
def test_degenerate_gaussian_scales_the_top_singular_value_and_rescales(kappa):
    n, d = 8, 300
    X = degenerate_gaussian(n, d, kappa, torch.Generator().manual_seed(3)).double().numpy()
    Z = torch.randn(n, d, generator=torch.Generator().manual_seed(3), dtype=torch.float32).double().numpy()
    s_z = np.linalg.svd(Z, compute_uv=False)
    s_x = np.linalg.svd(X, compute_uv=False)
    target = s_z.copy()
    target[0] *= kappa
    target *= math.sqrt(n * d / np.sum(target**2))  # mean(X²) = ‖X‖_F² / (n d) = 1
    np.testing.assert_allclose(s_x, target, rtol=1e-4)
    assert abs(np.mean(X**2) - 1) < 1e-5
    assert s_x[0] / s_x[1] == pytest.approx(kappa * s_z[0] / s_z[1], rel=1e-4)


def test_degenerate_gaussian_rejects_bad_sizes():
    with pytest.raises(ValueError, match="degeneracy"):
        degenerate_gaussian(4, 10, 0.0, torch.Generator())


@pytest.mark.parametrize("act", ["relu", "tanh", "sigmoid", "exp"])
def test_monte_carlo_stats_agree_with_quadrature_within_sampling_error(act):
    samples = 200_000
    st = monte_carlo_stats(act, torch.Generator().manual_seed(0), samples=samples)
    if act == "exp":  # the notebook's exp is eˣ: E e^z = e^½, E z e^z = e^½, E e^{2z} = e²
        c0, c1, c2, sd = (
            math.exp(0.5),
            math.exp(0.5),
            math.exp(2),
            math.sqrt(math.exp(2) - math.e),
        )
    else:
        ex = activation_stats(act)
        c0, c1, c2, sd = ex.c0, ex.c1, ex.var + ex.c0**2, math.sqrt(ex.var)
    tol = 6 * sd / math.sqrt(samples) * (8 if act == "exp" else 2)  # heavier tails for the moments of eˣ
    assert st.c0 == pytest.approx(c0, abs=tol)
    assert st.c1 == pytest.approx(c1, abs=tol)
    assert st.c2 == pytest.approx(c2, abs=4 * tol)


def test_notebook_gap_matches_float64_and_flags_singular_grams():
    X = torch.randn(6, 200, generator=torch.Generator().manual_seed(1))
    assert notebook_gap(X) == pytest.approx(_np_gap(X.double().numpy()), rel=1e-4)
    X[2] = X[1]  # float32 eigenvalue of a singular Gram: ≤ 0 or tiny, never a small gap
    g = notebook_gap(X)
    assert math.isnan(g) or g > 1
    with pytest.raises(torch.linalg.LinAlgError):
        notebook_gap(torch.full((3, 4), math.inf))


def test_preactivation_has_the_covariance_of_x_times_a_gaussian_matrix():
    # E (xW)(xW)ᵀ = x E[W Wᵀ] xᵀ = gain² x xᵀ for W (d × d) iid N(0, gain²/d); average many draws
    gain, draws = 1.7, 400
    x = degenerate_gaussian(5, 40, 3.0, torch.Generator().manual_seed(0)).double()
    hs = [preactivation(x, gain, torch.Generator().manual_seed(s)).double() for s in range(draws)]
    emp = sum(h @ h.T for h in hs) / draws
    want = gain**2 * (x @ x.T)
    assert hs[0].shape == x.shape
    assert torch.linalg.matrix_norm(emp - want) / torch.linalg.matrix_norm(want) < 0.05


def _stats() -> MCStats:
    return MCStats(c0=0.0, c1=1.0, c2=1.0)


def test_layer_projection_never_raises_the_gap_theorem1():
    v = PaperVariant("proj", centering="None", normalization="layer")
    X0 = degenerate_gaussian(10, 300, 10.0, torch.Generator().manual_seed(2))
    res = notebook_run(
        X0,
        "tanh",
        v,
        _stats(),
        depth=8,
        gain=1.0,
        generator=torch.Generator().manual_seed(5),
    )
    rec = res.records
    pre = {ell: g for ell, p, g in rec if p == "pre_norm"}
    post = {ell: g for ell, p, g in rec if p == "post_norm"}
    assert len(rec) == 2 * 8 + 1
    assert all(post[ell] <= pre[ell] + 1e-4 for ell in pre)
    assert any(post[ell] < pre[ell] - 1e-3 for ell in pre)


def test_constant_scaling_leaves_the_gap_unchanged():
    v = PaperVariant("mf", centering="None", normalization="MF")
    X0 = degenerate_gaussian(10, 300, 10.0, torch.Generator().manual_seed(2))
    st = MCStats(c0=0.3, c1=0.5, c2=0.7)
    rec = notebook_run(X0, "relu", v, st, depth=5, gain=1.0, generator=torch.Generator().manual_seed(5)).records
    pairs = [(g, h) for (l1, p1, g), (l2, p2, h) in zip(rec[1::2], rec[2::2])]
    assert all(g == pytest.approx(h, rel=1e-4) for g, h in pairs)


def test_a_run_that_overflows_stops_recording():
    v = PaperVariant("none", centering="None", normalization="None")
    X0 = degenerate_gaussian(4, 50, 1.0, torch.Generator().manual_seed(0))
    res = notebook_run(
        X0,
        "exp",
        v,
        _stats(),
        depth=30,
        gain=30.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert len(res.records) < 2 * 30 + 1 and len(res.grams) == len(res.centred_rms) == (len(res.records) + 1) // 2
    rows = notebook_rows(res, 30, run=0)
    assert len(rows) == 31 and rows[-1]["gap"] == math.inf and rows[-1]["gap_pre"] == ""


def _result(records, depth):
    """A NotebookRun of ``records`` with identity post-norm Grams (centred RMS 1), input gap 3.5."""
    grams = [torch.eye(2, dtype=torch.float64)] * (depth + 1)
    return NotebookRun(records, grams, [math.nan] + [1.0] * depth, start_gap=3.5)


def test_notebook_rows_average_pre_and_post_and_count_missing_as_collapsed():
    rec = [
        (0, "input", 4.0),
        (1, "pre_norm", 3.0),
        (1, "post_norm", 1.0),
        (2, "pre_norm", math.nan),
        (2, "post_norm", 0.5),
    ]
    rows = notebook_rows(_result(rec, 3), 3, act="relu", run=7)
    assert [r["gap"] for r in rows] == [
        3.5,
        2.0,
        math.inf,
        math.inf,
    ]  # ℓ = 0: the network's input
    assert rows[0]["gap_pre"] == "" and rows[0]["gap_post"] == 4.0
    assert rows[3]["gap_pre"] == "" and rows[3]["gap_post"] == ""
    assert rows[1]["act"] == "relu" and rows[1]["run"] == 7


def test_pooled_curve_pools_both_records_of_all_runs_like_seaborn():
    rec_a = [(0, "input", 4.0), (1, "pre_norm", 3.0), (1, "post_norm", 1.0)]
    rec_b = [(0, "input", 2.0), (1, "pre_norm", 5.0), (1, "post_norm", math.nan)]
    rows = notebook_rows(_result(rec_a, 2), 2, run=0) + notebook_rows(_result(rec_b, 2), 2, run=1)
    mean, lo, hi = pooled_curve(rows, 2)
    assert mean[0] == pytest.approx(3.0)
    assert mean[1] == pytest.approx((3 + 1 + 5) / 3)  # the NaN record is dropped, the others pooled
    assert math.isnan(mean[2]) and math.isnan(lo[2])  # no record: the published curve ends
    assert lo[1] <= mean[1] <= hi[1] and lo[1] >= 1 and hi[1] <= 5


def test_notebook_rows_flag_centred_activations_below_float32_resolution():
    res = NotebookRun(
        [(0, "input", 1.0), (1, "pre_norm", 1.0), (1, "post_norm", 1.0)],
        [torch.eye(2, dtype=torch.float64) * 4] * 2,
        [math.nan, 1e-7],
    )
    rows = notebook_rows(res, 1, c0=0.5)
    assert rows[1]["below_floor"] == 1 and rows[0]["below_floor"] == 0  # 1e-7 < 16 · 1.19e-7 · 0.5
    assert rows[1]["rms"] == pytest.approx(2.0) and rows[1]["norm_cv"] == 0.0
    assert notebook_rows(res, 1, c0=0.01)[1]["below_floor"] == 0


def test_notebook_variant_maps_isoprobe_switches():
    assert notebook_variant({"centering": "mean-field", "projection": "none"}) == PaperVariant("", "MF", "None")
    assert notebook_variant({"order": "norm-act"}) == PaperVariant("", "layer", "layer", False)
    with pytest.raises(ValueError, match="weights"):
        notebook_variant({"weights": "xavier"})


def test_setups_follow_the_notebook_cells():
    assert {k: s.degeneracy for k, s in SETUPS.items()} == {
        "fig4": 100,
        "fig5": 10,
        "fig6": 10,
        "fig8a": 5,
        "fig8b": 100,
        "fig9": 10,
    }
    assert SETUPS["fig9"].widths == (100, 500, 1000) and SETUPS["fig8a"].runs == 30
    assert SETUPS["fig8b"].acts == ("relu",)
    (published,) = SETUPS["fig8a"].published
    assert (published.centering, published.normalization) == (
        "layer",
        "None",
    )  # what the published Fig. 8a draws
    for s in SETUPS.values():
        assert (s.n, s.depth, s.gain) == (10, 30, 1.0) and s.pdf.startswith("plots/")


def test_differing_checks_lists_the_yes_no_entries_that_differ():
    from isoprobe.experiments.joudaki_protocol import differing_checks

    a = {"ok": {"relu": True, "tanh": False}, "ratio": {"relu": 3.0}, "flag": True}
    b = {"ok": {"relu": True, "tanh": True}, "ratio": {"relu": 1.0}, "flag": True}
    assert differing_checks(a, b) == ["ok.tanh: notebook protocol False, isoprobe's True"]


def test_a_notebook_run_starts_from_the_rows_it_feeds_the_first_layer():
    X0 = degenerate_gaussian(10, 300, 10.0, torch.Generator().manual_seed(2))
    res = notebook_run(
        X0,
        "relu",
        PaperVariant("", "layer", "layer"),
        _stats(),
        2,
        1.0,
        torch.Generator(),
    )
    rows_unit = (X0 / X0.square().mean(-1, keepdim=True).sqrt()).double().numpy()
    assert res.start_gap == pytest.approx(_np_gap(rows_unit), rel=1e-4)
    assert res.records[0][2] == pytest.approx(_np_gap(X0.double().numpy()), rel=1e-4)
    assert res.records[0][2] > res.start_gap  # rescaling the rows is itself a projection
