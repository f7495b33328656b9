"""Training-time curves (issue 21): the step of a record, eval forwards in a training loop, the
gap-against-step plot, and the spread bands of the depth plot."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers import TrainerControl, TrainerState

from isoprobe import Probe
from isoprobe.integrations import ProbeCallback
from isoprobe.records import plot_records, plot_steps, step_curves


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU())


def batch() -> torch.Tensor:
    return torch.randn(6, 8)  # 6 samples of rank-9 features: full-rank sample Grams


def steps(probe, mode=None):
    return sorted({r.step for r in probe.records if mode is None or r.mode == mode})


def test_every_counts_training_steps_and_eval_forwards_between_neither_shift_nor_get_probed():
    model = mlp()
    with Probe(model, every=3) as probe:
        for _ in range(10):
            model.train()
            model(batch())
            model.eval()  # an evaluation after every step: two forwards
            model(batch())
            model(batch())
    assert steps(probe) == [0, 3, 6, 9] and {r.mode for r in probe.records} == {"train"}
    assert probe.step == 10


def test_eval_forwards_are_recorded_at_the_current_step_when_asked():
    model = mlp()
    with Probe(model, every=3, probe_eval=True) as probe:
        for _ in range(4):
            model.train()
            model(batch())
            model.eval()
            model(batch())
    assert steps(probe, "train") == [0, 3]
    assert steps(probe, "eval") == [1, 2, 3, 4]  # after 1, 2, 3, 4 training steps


def test_a_model_only_run_in_eval_mode_counts_each_forward():
    model = mlp().eval()
    with Probe(model, every=2) as probe:
        for _ in range(5):
            model(batch())
    assert steps(probe) == [0, 2, 4] and {r.mode for r in probe.records} == {"eval"}


def test_training_after_an_evaluation_at_initialisation_starts_at_step_zero():
    model = mlp().eval()
    with Probe(model, every=2) as probe:
        model(batch())
        model(batch())
        model.train()
        for _ in range(3):
            model(batch())
    assert steps(probe, "eval") == [0] and steps(probe, "train") == [0, 2]


def test_step_can_be_set_or_given_as_a_function():
    model = mlp().train()
    with Probe(model, every=5) as probe:
        probe.step = 10  # resume a count
        for _ in range(6):
            model(batch())
    assert steps(probe) == [10, 15]
    with pytest.raises(ValueError, match="non-negative integer"):
        probe.step = -1
    clock = {"step": 7}
    with Probe(model, every=7, step=lambda: clock["step"]) as probe:
        for _ in range(3):  # three forwards of one optimizer step (gradient accumulation), then the next
            model(batch())
        clock["step"] = 8
        model(batch())
    assert steps(probe) == [7] and len({(r.item, r.step) for r in probe.records}) == 1
    assert len(probe["1:pre"]) == 3
    with pytest.raises(AttributeError, match="step function"):
        probe.step = 3
    with pytest.raises(TypeError, match="function giving the current training step"):
        Probe(model, step=5)


def test_callback_leaves_evaluation_forwards_out_unless_asked():
    for probe_eval, expected in ((False, {"train"}), (True, {"train", "eval"})):
        model = mlp()
        callback = ProbeCallback(sites="norm", every=1, probe_eval=probe_eval)
        state, control = TrainerState(), TrainerControl()
        callback.on_train_begin(None, state, control, model=model)
        for step in range(3):
            model.train()
            model(batch())
            state.global_step = step + 1
            callback.on_step_end(None, state, control)
            model.eval()
            model(batch())
            callback.on_evaluate(None, state, control)
        callback.on_train_end(None, state, control)
        assert {row["mode"] for row in callback.history} == expected
        assert sorted({row["global_step"] for row in callback.history if row["mode"] == "train"}) == [0, 1, 2]
        if probe_eval:
            assert sorted({row["global_step"] for row in callback.history if row["mode"] == "eval"}) == [1, 2, 3]


def test_step_curves_are_the_mean_finite_gap_per_step_against_a_direct_average():
    model = mlp().train()
    with Probe(model, every=2) as probe:
        for _ in range(6):
            model(torch.randn(4, 5, 8))  # token view: 4 Grams per step
    curves = step_curves(probe.records)
    for step in (0, 2, 4):
        gaps = [r.isometry_gap for r in probe.records if r.key == "1:post" and r.step == step]
        assert len(gaps) == 4 and curves[("1", 0, "post")][step] == pytest.approx(sum(gaps) / 4, rel=1e-12)
    assert list(curves) == [("1", 0, p) for p in ("pre", "centered", "normalized", "post")] + [
        ("2", 0, "pre"),
        ("2", 0, "post"),
    ]


def test_plots_of_steps_and_depth_are_written(tmp_path):
    model = mlp().train()
    with Probe(model, every=2) as probe:
        for _ in range(6):
            model(batch())
    png = probe.plot_steps(tmp_path / "steps.png", "training")
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert plot_records(probe.records, tmp_path / "depth.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="no finite gap to plot in eval-mode forwards"):
        plot_steps(probe.records, tmp_path / "none.png", mode="eval")


def test_depth_plot_draws_a_spread_band_per_site_and_names_module_indices():
    from matplotlib.figure import Figure

    from isoprobe.records import _draw_sites, _index_label, summarize

    model = mlp().train()
    with Probe(model) as probe:
        for _ in range(3):
            model(batch())
    rows = {(r["site"], r["call"], r["point"]): r for r in summarize(probe.records)}
    ax = Figure().add_subplot()
    _draw_sites(ax, rows, [("1", 0), ("2", 0)])
    bands = [c for c in ax.collections if c.get_paths()]
    assert len(bands) == 2  # one ± std band per site (the norm's shading is a patch, not a collection)
    low, high = bands[0].get_paths()[0].vertices[:, 1].min(), bands[0].get_paths()[0].vertices[:, 1].max()
    pre = rows[("1", 0, "pre")]
    post = rows[("1", 0, "post")]
    assert low == pytest.approx(min(pre["gap_mean"] - pre["gap_std"], post["gap_mean"] - post["gap_std"]))
    assert high == pytest.approx(max(pre["gap_mean"] + pre["gap_std"], post["gap_mean"] + post["gap_std"]))
    assert _index_label(["1", "2"]) == "module index in the model"
    assert _index_label(["features.3", "features.5"]) == "module index in features"
    assert _index_label(["transformer.h.0.ln_1", "transformer.h.0.mlp.act", "transformer.ln_f"]) == "layer index"
    assert math.isfinite(low)
