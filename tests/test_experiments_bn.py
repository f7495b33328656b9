"""Batch-norm reproductions: decision rules on fabricated numbers, and short end-to-end runs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from isoprobe.data import DataUnavailable, load_images
from isoprobe.experiments import meterez
from isoprobe.experiments.base import REGISTRY, run_reproductions
from isoprobe.experiments.daneshmand import rule_daneshmand
from isoprobe.experiments.meterez import (
    explosion_contrast,
    fit_slope,
    rule_fig1,
    rule_tabled1,
    single_thread,
)
from isoprobe.theory.batchnorm import isometry_gap_rate

NAMES = ["meterez-fig1", "meterez-fig2", "meterez-fig3", "meterez-fig5", "meterez-tabled1", "daneshmand-orth"]


def test_all_six_are_registered():
    assert set(NAMES) <= set(REGISTRY)
    for name in NAMES:
        assert REGISTRY[name].claim and REGISTRY[name].paper


# ----------------------------------------------------------------------------- rules


def test_fit_slope_recovers_a_line_and_skips_non_finite():
    x = np.arange(10.0)
    y = 3.0 - 0.25 * x
    y[4] = np.inf
    assert fit_slope(x, y) == pytest.approx(-0.25, rel=1e-12)
    assert math.isnan(fit_slope([1.0], [2.0]))


def test_rule_fig1_passes_on_theory_and_fails_where_it_must():
    widths = [8, 16, 32]
    pred = [isometry_gap_rate(w) for w in widths]
    assert rule_fig1(widths, [p * 1.05 for p in pred], pred)
    assert not rule_fig1(widths, [pred[0], pred[1] * 1.3, pred[2]], pred)  # one width 30 % off
    # width-independent rate: not the claim even if one matches
    assert not rule_fig1(widths, [pred[1]] * 3, pred)
    assert not rule_fig1(widths, [pred[0], math.nan, pred[2]], pred)  # a width that never decayed
    # the rate must fall with width even when each is within tolerance of a (wrong) prediction
    assert not rule_fig1([8, 16], [0.1, 0.11], [0.1, 0.1])


def test_explosion_contrast_passes_and_fails():
    span = 900.0
    assert explosion_contrast(0.02, 1e-4, span)
    assert not explosion_contrast(0.001, 0.0, span)  # rises only 0.9 nats: no explosion
    assert not explosion_contrast(0.02, 0.005, span)  # the "bounded" curve grows at 1/4 the rate
    assert not explosion_contrast(0.02, -0.005, span)  # or shrinks as fast: not bounded either
    assert not explosion_contrast(math.nan, 0.0, span)
    assert not explosion_contrast(-0.02, 0.0, span)


def test_rule_tabled1_judges_only_batches_up_to_half_the_dimension():
    dims = {"digits": 64, "mnist": 784}
    ok = {("digits", 16): 1.0, ("digits", 32): 1.0, ("digits", 64): 0.0, ("mnist", 256): 0.99}
    assert rule_tabled1(ok, dims)
    assert not rule_tabled1({**ok, ("digits", 16): 0.8}, dims)
    assert not rule_tabled1({("digits", 64): 1.0}, dims)  # nothing judged: no evidence


def test_rule_daneshmand_passes_and_fails():
    widths = [32, 64, 128, 256]
    floor = [0.4 * (w / 32) ** -0.5 for w in widths]
    assert rule_daneshmand(widths, floor, [0.8] * 4, n=4)
    assert not rule_daneshmand(widths, [0.2] * 4, [0.8] * 4, n=4)  # floor does not shrink
    assert not rule_daneshmand(widths, floor, [0.8, 0.8, 0.8, 0.1], n=4)  # no-BN gap vanished at 256
    assert not rule_daneshmand(widths, floor, [0.3] * 4, n=4)  # below half of sqrt(3/4): not order one
    assert not rule_daneshmand(widths, [0.4, 0.3, 0.0, 0.1], [0.8] * 4, n=4)


def test_single_thread_restores_the_setting():
    before = torch.get_num_threads()
    with single_thread():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


# ----------------------------------------------------------------------------- end to end


def _run(name: str, tmp_path, **kw) -> dict:
    (summary,) = run_reproductions([name], quick=True, out_dir=tmp_path, show_progress=False,
                                   echo=lambda msg: None, **kw)
    for suffix in (".csv", ".png", ".json"):
        assert (tmp_path / f"{name}{suffix}").exists()
    on_disk = json.loads((tmp_path / f"{name}.json").read_text())
    for key in ("claim", "measured", "theory", "held", "rule", "config", "elapsed_s"):
        assert key in on_disk
    return on_disk


def test_fig1_quick_holds_with_measured_rates_near_theory(tmp_path):
    out = _run("meterez-fig1", tmp_path, runs=2)
    assert out["held"] is True
    for w, rate in out["measured"]["rate_per_layer"].items():
        assert rate == pytest.approx(math.log1p(2 / int(w)), rel=0.15)


def test_fig2_quick_single_run(tmp_path):
    out = _run("meterez-fig2", tmp_path, runs=1, data="synthetic")
    assert out["held"] is True
    slopes = out["measured"]["deep_slope_per_layer"]
    assert slopes["8 duplicated pairs"] > slopes["2 duplicated pairs"] > abs(slopes["distinct samples"])


def test_daneshmand_quick(tmp_path):
    out = _run("daneshmand-orth", tmp_path, runs=2)
    assert out["held"] is True
    assert -0.8 < out["measured"]["loglog_slope_floor_vs_width"] < -0.25


def test_tabled1_with_named_data_uses_exactly_it(tmp_path):
    out = _run("meterez-tabled1", tmp_path, runs=5, data="digits")
    assert out["measured"]["datasets_used"] == ["digits"]
    assert out["held"] is True
    # digits live in a 61-dimensional subspace: a 64-sample batch cannot be full rank
    assert out["measured"]["share_full_rank"]["digits n=64"] == 0.0


def test_tabled1_offline_falls_back_and_says_which_data(tmp_path, monkeypatch):
    def fake_load(name, limit=None, seed=0):
        if name in ("mnist", "fashion_mnist", "cifar10", "cifar100"):
            raise DataUnavailable(f"{name} is not here")
        return load_images(name, limit=min(limit or 500, 500), seed=seed)

    monkeypatch.setattr(meterez, "load_images", fake_load)
    out = _run("meterez-tabled1", tmp_path, runs=3)
    assert out["measured"]["datasets_used"] == ["synthetic", "digits"]
    assert out["measured"]["unavailable"] == ["mnist", "fashion_mnist", "cifar10", "cifar100"]
    assert any("in place of" in note for note in out["notes"])

