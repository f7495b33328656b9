"""Tokens per Gram (issue 21): Probe(window=N) against the Probe run on each window by hand."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from isoprobe import Probe
from isoprobe.hooks import SingularGramWarning
from isoprobe.records import SINGULAR, format_table, summarize
from isoprobe.windows import window_layout


def tokenwise_model() -> nn.Module:
    """Acts on each token alone, so running it on a window's tokens gives the window's activations."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, 24), nn.LayerNorm(24), nn.GELU()).double().eval()


@pytest.mark.parametrize(
    "n, size, sizes",
    [(40, 12, [10, 10, 10, 10]), (300, 256, [150, 150]), (513, 256, [171, 171, 171]), (5, 256, [5]), (0, 4, [0])],
)
def test_windows_are_consecutive_balanced_and_cover_every_token_once(n, size, sizes):
    layout = window_layout(None, 1, n, size, torch.device("cpu"))
    real = layout.index if layout.mask is None else [row[m] for row, m in zip(layout.index, layout.mask)]
    assert [len(r) for r in real] == sizes
    assert torch.cat([torch.as_tensor(r) for r in real]).tolist() == list(range(n))  # in order, once each
    assert all(size / 2 <= s <= size for s in sizes) or n <= size


def _by_hand(model, x, mask, size):
    """(item, window) -> {point: gap}: each window run as a batch of its own, whole-sequence Grams."""
    out = {}
    for i in range(x.shape[0]):
        tokens = x[i, mask[i].bool()]
        k = max(1, math.ceil(len(tokens) / size))
        bounds = [math.ceil(j * len(tokens) / k) for j in range(k + 1)]
        for j in range(k):
            with torch.no_grad(), Probe(model) as probe:
                model(tokens[None, bounds[j] : bounds[j + 1]])
            out[(i, j)] = {r.point: (r.n, r.isometry_gap, r.theorem1_holds) for r in probe.records}
    return out


def test_window_records_equal_the_probe_on_each_window_by_hand():
    model = tokenwise_model()
    x = torch.randn(3, 50, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 50, dtype=torch.long)
    mask[1, 37:] = 0  # right padding
    mask[2, :21] = 0  # left padding: windows are over the real tokens, wherever they sit
    with torch.no_grad(), Probe(model, attention_mask=mask, window=20) as probe:
        model(x)
    expected = _by_hand(model, x, mask, 20)
    got: dict = {}
    for r in probe.records:
        got.setdefault((r.item, r.window), {})[r.point] = (r.n, r.isometry_gap, r.theorem1_holds)
    assert sorted(got) == sorted(expected) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0), (2, 1)]
    for key, points in expected.items():
        for point, (n, gap, holds) in points.items():
            assert got[key][point][0] == n and got[key][point][2] == holds, (key, point)
            assert got[key][point][1] == pytest.approx(gap, rel=1e-9), (key, point)


def test_without_window_long_sequences_are_singular_and_warned_once_naming_the_window_that_fits():
    model = tokenwise_model()
    x = torch.randn(2, 30, 24, dtype=torch.float64)
    warned = pytest.warns(SingularGramWarning, match=r"at 2 sites.*1 \(30 tokens > 23\).*window=23")
    with warned as caught, torch.no_grad(), Probe(model) as probe:
        model(x)
        model(x)
    assert len([w for w in caught if w.category is SingularGramWarning]) == 1
    assert {r.flag for r in probe.records} == {SINGULAR}
    table = format_table(probe.records)
    assert "singular by construction ×4 (n > dim)" in table and "n/a: singular" in table and "yes" not in table
    with warnings.catch_warnings():
        warnings.simplefilter("error", SingularGramWarning)
        with torch.no_grad(), Probe(model, window=23) as probe:
            model(x)
    rows = summarize(probe.records)
    assert all(row["singular"] == 0 and math.isfinite(row["gap_mean"]) for row in rows)
    assert next(row for row in rows if row["point"] == "normalized")["theorem1_checked"] == 4


@pytest.mark.parametrize("bad", [0, 1, 2.5, True, "8"])
def test_window_must_be_a_number_of_tokens(bad):
    with pytest.raises(ValueError, match="window must be an integer number of tokens, at least 2"):
        Probe(tokenwise_model(), window=bad)


@pytest.mark.parametrize("path", ["deferred", "float32"])
def test_windows_survive_the_deferred_and_float32_paths(monkeypatch, path):
    """Off the CPU, statistics finish at the forward's end; float32 Grams may be redone in float64."""
    model = tokenwise_model().float()
    x = torch.randn(2, 30, 24, generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[0, 25:] = 0
    with torch.no_grad(), Probe(model, attention_mask=mask, window=12) as probe:
        model(x)
    reference = {(r.key, r.item, r.window): r.isometry_gap for r in probe.records}
    options = {}
    if path == "deferred":
        monkeypatch.setattr("isoprobe.hooks._defer", lambda device: True)
    else:
        options["gram_dtype"] = torch.float32
    with torch.no_grad(), Probe(model, attention_mask=mask, window=12, **options) as probe:
        model(x)
    got = {(r.key, r.item, r.window): r.isometry_gap for r in probe.records}
    assert got.keys() == reference.keys() and len(got) == 6 * 6  # windows of 9+8+8 and 10+10+10 tokens
    for key, gap in reference.items():
        assert got[key] == pytest.approx(gap, rel=1e-9 if path == "deferred" else 1e-3), key
