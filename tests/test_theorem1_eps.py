"""Theorem 1 where a norm's eps is not negligible: undecided, flagged, never a plausible verdict.

Theorem 1 (Joudaki et al. 2023) is about ``x_c / ‖x_c‖``; a norm divides by ``sqrt(var + eps)``,
which lifts the gap of its normalised items by ``δ = log mean r² - mean log r²`` (``r_i² =
var_i/(var_i + eps)``). The references here are numpy float64 eigenvalues of the Grams.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_hooks import ref_stats
from torch import nn

from isoprobe import Probe
from isoprobe.hooks import _eps_effect, _finish, _measure, _records
from isoprobe.records import (
    EPS_DOMINATED,
    RecordSink,
    format_summary,
    read_json,
    read_records,
    summarize,
    theorem1_counts,
)
from isoprobe.sites import discover_sites


def spread_items(seed: int = 0, scale: float = 1e-2) -> torch.Tensor:
    """(2, 30, 64) tokens with rms ≈ ``scale`` and a 5 % spread of norms across tokens."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, 30, 64, generator=gen) * scale * (1 + 0.05 * torch.rand(2, 30, 1, generator=gen))


@pytest.mark.parametrize("eps", [0.0, 1e-6, 1e-4, 1.0, 1e3])
def test_eps_effect_is_the_exact_lift_of_the_normalized_gap(eps):
    x = spread_items().double()[0]
    x[:5] *= 3  # a wider spread of variances
    xc = x - x.mean(-1, keepdim=True)
    var = xc.square().mean(-1)
    Xc = xc.numpy()
    normalized = Xc / np.sqrt((Xc**2).mean(1, keepdims=True) + eps)
    projected = Xc / np.linalg.norm(Xc, axis=1, keepdims=True)
    expected = ref_stats(normalized)[0] - ref_stats(projected)[0]
    real = torch.ones(1, 30, dtype=torch.bool)
    got = _eps_effect(var[None], eps, real, torch.tensor([30]))
    assert got.item() == pytest.approx(expected, rel=1e-6, abs=1e-12)
    # padded items (zero rows) are left out: the same value with 4 padding rows appended
    padded = torch.cat([var, torch.zeros(4, dtype=var.dtype)])[None]
    real = torch.cat([real, torch.zeros(1, 4, dtype=torch.bool)], 1)
    assert _eps_effect(padded, eps, real, torch.tensor([30])).item() == pytest.approx(got.item(), rel=1e-12, abs=0)


def test_equal_variances_make_any_eps_a_mere_rescaling():
    """Items of one norm: eps = 1000 ≫ var only rescales them, δ = 0, and the check is decided."""
    x = spread_items(scale=1e-2)
    xc = x - x.mean(-1, keepdim=True)
    x = xc / xc.square().mean(-1, keepdim=True).sqrt() * 1e-2  # every token rms 1e-2 exactly
    ln = nn.LayerNorm(64, eps=1e3, elementwise_affine=False).double()
    with Probe(ln) as probe:
        ln(x.double())
    normalized = [r for r in probe.records if r.point == "normalized"]
    assert len(normalized) == 2 and all(r.theorem1_holds is True and r.flag is None for r in normalized)


def measured(eps: float, gram_dtype=torch.float64):
    ln = nn.LayerNorm(64, eps=eps, elementwise_affine=False)
    x = spread_items()
    pending = _measure(discover_sites(ln)[0], x, ln(x), "token", None, gram_dtype, step=0)
    return pending


def verdicts(pending) -> list[tuple]:
    finished = _finish(pending, math.sqrt(torch.finfo(torch.float64).eps))
    return [(r.theorem1_holds, r.flag) for r in _records(finished, finished.table.tolist()) if r.point == "normalized"]


def test_a_miss_that_eps_does_not_explain_is_a_failure():
    """The decision rule on one measurement (eps = 1e-12, δ ≈ 0): the bound met → holds; the
    normalized gap pushed 1e-6 past the bound → fails; the same miss with an eps effect larger
    than it → undecided and flagged; with an eps effect smaller than it → still a failure."""
    base = measured(1e-12)
    assert float(base.eps_effect.max()) < 1e-12
    assert verdicts(base) == [(True, None), (True, None)]
    finished = _finish(measured(1e-12), 1.5e-8)  # the slack of the inequality, per sequence
    rows = {r.point: [] for r in _records(finished, finished.table.tolist())}
    for r in _records(finished, finished.table.tolist()):
        rows[r.point].append(r)
    slack = torch.tensor(
        [
            c.isometry_gap - math.log(nz.norm_factor) - nz.isometry_gap
            for c, nz in zip(rows["centered"], rows["normalized"])
        ],
        dtype=torch.float64,
    )
    assert bool((slack > 1e-4).all())
    miss = slack + 1e-6

    def pushed(eps_effect):
        p = measured(1e-12)
        p.log_ratio = p.log_ratio + miss.to(p.log_ratio.dtype)
        p.eps_effect = torch.full_like(p.eps_effect, eps_effect)
        return verdicts(p)

    assert pushed(0.0) == [(False, None), (False, None)]
    assert pushed(1e-7) == [(False, None), (False, None)]  # eps explains only a tenth of the miss
    assert pushed(1e-5) == [(None, EPS_DOMINATED), (None, EPS_DOMINATED)]


@pytest.mark.parametrize("gram_dtype", [torch.float64, torch.float32])
def test_summary_csv_json_and_sink_keep_eps_dominated_records(tmp_path, gram_dtype):
    """eps = 1 on var ≈ 1e-4: both Grams undecided; their gaps stay in the summary's means,
    the table says so, and every writer round-trips the flag."""
    ln = nn.LayerNorm(64, eps=1.0, elementwise_affine=False)
    sink = RecordSink(tmp_path / "r.jsonl")
    with Probe(ln, gram_dtype=gram_dtype) as probe, Probe(ln, gram_dtype=gram_dtype, sink=sink) as streamed:
        ln(spread_items())
    records = probe.records
    normalized = [r for r in records if r.point == "normalized"]
    assert [(r.theorem1_holds, r.flag) for r in normalized] == [(None, EPS_DOMINATED)] * 2
    assert theorem1_counts(records) == {"checked": 0, "violations": 0, "eps_dominated": 2}
    row = next(r for r in summarize(records) if r["point"] == "normalized")
    assert (row["theorem1_checked"], row["eps_dominated"], row["count"]) == (0, 2, 2)
    assert row["gap_mean"] == pytest.approx(np.mean([r.isometry_gap for r in normalized]), rel=1e-12)
    line = next(li for li in format_summary(summarize(records)).splitlines() if "normalized" in li)
    assert line.split()[-3:] == ["undecided", "2", "eps-dominated"]
    for run, full in zip(streamed.summary(), summarize(records), strict=True):  # running summaries: the same
        assert {k: run[k] for k in ("key", "count", "eps_dominated", "theorem1_checked")} == {
            k: full[k] for k in ("key", "count", "eps_dominated", "theorem1_checked")
        }
        assert run["gap_mean"] == pytest.approx(full["gap_mean"], rel=1e-12)
    assert read_records(sink.path) == records
    assert read_records(probe.to_csv(tmp_path / "r.csv")) == records
    assert read_json(probe.to_json(tmp_path / "r.json"))[0] == records
