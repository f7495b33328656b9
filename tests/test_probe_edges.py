"""Edges found in review of the merged Probe: the float32 redo under a gathered batch, functional
sites in the rank bounds, windows outside the token view, named modules under torch.compile, and
corpus runs (a held --out, options a corpus run cannot take or must remember)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import isoprobe.hooks as hooks
from isoprobe import Probe, corpus, distributed, outlock
from isoprobe.hooks import rank_bounds
from isoprobe.jobs import TextJob


def gap_of(Z: np.ndarray) -> float:
    """−log I of the rows' Gram, float64 eigenvalues (an independent reference)."""
    lam = np.linalg.eigvalsh(Z @ Z.T)
    return float(np.log(lam.mean()) - np.log(lam).mean())


def test_float32_redo_under_gather_uses_the_gathered_input(monkeypatch):
    """With gather=True the sample Grams are over the global batch; a float32 record redone in
    float64 must pair the gathered input with the gathered output (it paired the rank's own
    input with the gathered output: a wrong Gram, here a crash)."""

    def doubled(x, same_size=False):  # a stand-in for a second rank: the batch and a transform of it
        return torch.cat([x, torch.tanh(1.7 * x + 0.3)])

    monkeypatch.setattr(hooks, "all_gather_features", doubled)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16), nn.Tanh()).double()
    x = torch.randn(5, 16, dtype=torch.float64)
    probe = Probe(model, sites="norm", view="sample", gather=True, gram_dtype=torch.float32)
    probe.float32_tolerance = 0.0  # every record redone in float64
    with torch.no_grad(), probe:
        model(x)
    h = model[0](x)
    pre = doubled(h).detach().numpy()
    by_point = {r.point: r for r in probe.records}
    assert by_point["pre"].n == 10
    assert by_point["pre"].isometry_gap == pytest.approx(gap_of(pre), rel=1e-6)
    centered = pre - pre.mean(axis=1, keepdims=True)
    assert by_point["centered"].isometry_gap == pytest.approx(gap_of(centered), rel=1e-6)


class FunctionalNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.lin = nn.Linear(8, 8)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.tanh(F.layer_norm(self.lin(self.emb(input_ids)), (8,)))


def test_rank_bounds_include_functional_sites():
    """The pre-run check of singular token Grams sees functional norms too (it raised KeyError,
    and the CLI then said nothing)."""
    bounds = rank_bounds(FunctionalNorm(), {"input_ids": torch.zeros(1, 2, dtype=torch.long)})
    assert bounds[":layer_norm@0"] == 7  # centred: one less than the width
    assert bounds[":tanh@0"] == 8


def test_window_needs_the_token_view():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(ValueError, match="window cuts token Grams"):
        Probe(model, window=4, view="sample")
    Probe(model, window=4, view="token")


def test_named_module_site_is_recorded_under_torch_compile():
    """Under torch.compile the two hooks of a call may see two tensor objects for one input:
    that is not an in-place change (the named module was skipped with a false warning)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 8))
    x = torch.randn(6, 8)
    with torch.no_grad(), Probe(model, sites=["3"]) as eager:
        model(x)
    torch.compiler.reset()
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad(), warnings.catch_warnings(), Probe(model, sites=["3"]) as probe:
        warnings.simplefilter("error")  # no "is not measured" warning
        compiled(x)
    torch.compiler.reset()
    got = {r.point: r.isometry_gap for r in probe.records}
    want = {r.point: r.isometry_gap for r in eager.records}
    assert got.keys() == {"pre", "post"} and all(math.isclose(got[k], want[k], rel_tol=1e-6) for k in want)


def test_corpus_refuses_baseline_and_remembers_window_and_calls(tmp_path):
    with pytest.raises(ValueError, match="--baseline"):
        corpus.run_corpus(TextJob(family="auto", model="unused", texts=("a text",), baseline="random"))
    plain = corpus.run_options(TextJob(family="auto", model="m", texts=("t",)))
    windowed = corpus.run_options(TextJob(family="auto", model="m", texts=("t",), window=64))
    no_calls = corpus.run_options(TextJob(family="auto", model="m", texts=("t",), calls=False))
    assert plain != windowed and plain != no_calls  # a resumed run with other options is refused


def test_a_held_folder_is_refused_on_every_rank(tmp_path):
    with (
        outlock.hold_folder(tmp_path, "first run", lambda m: None),
        pytest.raises(outlock.FolderBusy, match="first run"),
        distributed.hold_folder_on_root(tmp_path, 0, "second run", lambda m: None),
    ):
        pass
    with distributed.hold_folder_on_root(tmp_path, 0, "third run", lambda m: None):
        assert (tmp_path / outlock.LOCK_NAME).exists()
    assert not (tmp_path / outlock.LOCK_NAME).exists()


def test_centred_gram_as_wide_as_its_items_is_singular_by_construction():
    """Centring leaves each item orthogonal to the ones vector: n items of n entries give a
    singular centred Gram, whose gap is +inf exactly (it was factorised and came out finite)."""
    torch.manual_seed(0)
    norm = nn.LayerNorm(6, elementwise_affine=False).double()
    x = torch.randn(2, 6, 6, dtype=torch.float64)  # 6 tokens of 6 entries
    with torch.no_grad(), Probe(norm) as probe:
        norm(x)
    by_point = {}
    for r in probe.records:
        by_point.setdefault(r.point, []).append(r)
    assert all(math.isinf(r.isometry_gap) for r in by_point["centered"] + by_point["normalized"])
    assert all(r.theorem1_holds is None for r in by_point["normalized"])
    for r in by_point["pre"]:  # rank 6 with the mean: full rank, finite
        assert r.isometry_gap == pytest.approx(gap_of(x[r.item].numpy()), rel=1e-9)


def test_a_broken_torchvision_is_named_before_a_model_loads(monkeypatch):
    """PyPI's CUDA build of torchvision beside a CPU torch fails at import, and transformers then
    fails to import every model class with a long traceback: say what is wrong instead."""
    from isoprobe import models

    def broken() -> None:
        raise RuntimeError("operator torchvision::nms does not exist")

    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(models, "_import_torchvision", broken)
    with pytest.raises(models.ModelLoadError, match="torchvision is installed but cannot be imported"):
        models.load_gpt2("gpt2", init="random")


def test_eval_mode_batch_norm_has_no_normalisation_points():
    """In eval mode a BatchNorm with running statistics is a per-channel affine map: a
    ``normalized`` point from the batch's own statistics would report an operation that did not
    run (with a Corollary 3 'yes'); only pre and post are measured, and they are the real ones."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(8).double().eval()
    x = torch.randn(16, 8, 6, 6, dtype=torch.float64) * torch.linspace(0.5, 3, 8).view(1, 8, 1, 1).double()
    with torch.no_grad(), Probe(bn) as probe:
        y = bn(x)
    by_point = {r.point: r for r in probe.records}
    assert set(by_point) == {"pre", "post"}
    assert by_point["post"].isometry_gap == pytest.approx(gap_of(y.flatten(1).numpy()), rel=1e-9)
    bn.train()
    with torch.no_grad(), Probe(bn) as probe:
        bn(x)
    assert {r.point for r in probe.records} == {"pre", "centered", "normalized", "post"}


def test_depth_plot_draws_only_points_of_the_curves_view(tmp_path, monkeypatch):
    """A BatchNorm's normalized point is in the feature view: drawn on the sample-view curve it
    read as if the affine part changed the gap a hundredfold. A LayerNorm's is in the curve's view."""
    from matplotlib.figure import Figure

    drawn: list[Figure] = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (drawn.append(self), save(self, *a, **k)))
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    tokens = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.GELU())
    with torch.no_grad(), Probe(cnn) as conv, Probe(tokens) as seq:
        cnn(torch.randn(4, 3, 6, 6))
        tokens(torch.randn(2, 5, 8))
    conv.plot(tmp_path / "cnn.png")
    seq.plot(tmp_path / "seq.png")
    labels = [set(fig.axes[0].get_legend_handles_labels()[1]) for fig in drawn]
    assert "norm, before its affine part" not in labels[0]
    assert "norm, before its affine part" in labels[1]


def test_a_probe_with_a_sink_plots_from_its_file(tmp_path):
    """The setup the README recommends for training runs (a sink) could not plot at all."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Tanh())
    with Probe(model, sink=tmp_path / "run.jsonl") as probe:
        for _ in range(3):
            model.train()(torch.randn(6, 8)).sum().backward()
    assert probe.plot(tmp_path / "depth.png").stat().st_size > 0
    assert probe.plot_steps(tmp_path / "steps.png").stat().st_size > 0
