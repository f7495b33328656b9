"""Batched ensemble training (isoprobe.training), the training reproductions' rules, and the
torchrun helpers (isoprobe.distributed) under a 2-process gloo group."""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from functools import partial

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from isoprobe import Probe, distributed
from isoprobe.experiments.common import FIG7_ACTS, rule_norms_never_raise, spearman
from isoprobe.experiments.training import (
    _ln_classifier,
    _m4_move_rows,
    control_update,
    fig7_statistic,
    loss_area,
    verdict_fig2_trained,
    verdict_fig7,
    verdict_meterez_fig4,
    verdict_meterez_fig6,
    weight_gram,
    weight_measures,
)
from isoprobe.hermite import isometry_strength
from isoprobe.metrics import isometry_gap
from isoprobe.nets import BNMLP, LNMLP
from isoprobe.theory import LNMLPSpec
from isoprobe.training import Ensemble, TrainConfig, epoch_order, train

F64 = torch.float64
D_IN, CLASSES, N = 12, 3, 48


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny products: a second thread only adds contention (bench/bench_train.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(N, D_IN, generator=gen, dtype=F64), torch.randint(0, CLASSES, (N,), generator=gen)


def _ln_model(act: str, run: int) -> nn.Module:
    spec = LNMLPSpec(act, depth=3, width=16)
    head = nn.Linear(16, CLASSES, bias=False, dtype=F64)
    with torch.no_grad():
        head.weight.normal_(0, 0.25, generator=torch.Generator().manual_seed(100 + run))
    return nn.Sequential(OrderedDict(body=LNMLP(spec, D_IN, seed=3, run=run, dtype=F64), head=head))


def _bn_model(run: int) -> nn.Module:
    # standard BatchNorm1d: its running statistics are buffers, stacked and updated under vmap
    return BNMLP(
        D_IN,
        10,
        3,
        CLASSES,
        norm="batchnorm",
        activation="tanh",
        generator=torch.Generator().manual_seed(run),
        dtype=F64,
    )


def _groups(runs=(0, 1, 2)) -> dict[str, list[nn.Module]]:
    return {
        "tanh": [_ln_model("tanh", r) for r in runs],
        "relu": [_ln_model("relu", r) for r in runs],
        "bn": [_bn_model(r) for r in runs],
    }


# --- the batched computation equals separate models --------------------------------------------


def test_losses_and_gradients_match_separate_models():
    groups = _groups()
    refs = copy.deepcopy(groups)
    ens = Ensemble(groups)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 8, D_IN, generator=gen, dtype=F64)
    y = torch.randint(0, CLASSES, (3, 8), generator=gen)
    losses = ens.losses(x, y)
    losses.sum().backward()
    for gi, name in enumerate(ens.names):
        for r, model in enumerate(refs[name]):
            loss = F.cross_entropy(model(x[r]), y[r])
            grads = torch.autograd.grad(loss, list(model.parameters()))
            assert losses[gi, r].item() == pytest.approx(loss.item(), rel=1e-13, abs=1e-14)
            for (pname, _), g in zip(model.named_parameters(), grads):
                torch.testing.assert_close(ens.params[name][pname].grad[r], g, rtol=1e-12, atol=1e-14)


def _reference_sgd(model: nn.Module, X, y, run: int, cfg: TrainConfig) -> tuple[nn.Module, list[float]]:
    """One model trained alone by torch.optim.SGD on run ``run``'s minibatches."""
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    steps = X.shape[0] // cfg.batch_size
    losses = []
    for epoch in range(1, cfg.epochs + 1):
        order = epoch_order(X.shape[0], [run], cfg.seed, epoch)[0]
        total = 0.0
        for b in range(steps):
            idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            loss = F.cross_entropy(model(X[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
        losses.append(total / steps)
    return model, losses


def test_training_equals_training_each_model_alone():
    X, y = _data()
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.05, momentum=0.9, seed=5)
    runs = [4, 7]  # global run ids seed the data order
    groups = _groups(runs)
    refs = copy.deepcopy(groups)
    ens = Ensemble(groups, run_ids=runs)

    def evaluate(ens, step, epoch):  # a forward in training mode: must not move BN running statistics
        with torch.no_grad():
            return [{"logit_sum": float(ens(X[:16], shared=True)["bn"].sum())}]

    result = train(ens, X, y, cfg, evaluate=evaluate, progress=False)
    loss = result.loss()
    assert loss.shape == (cfg.epochs + 1, 3, 2)
    for gi, name in enumerate(ens.names):
        for r, run in enumerate(runs):
            model, ref_losses = _reference_sgd(refs[name][r], X, y, run, cfg)
            np.testing.assert_allclose(loss[1:, gi, r], ref_losses, rtol=1e-12)
            trained = ens.member(name, r)
            for (k, v), (_, w) in zip(model.state_dict().items(), trained.state_dict().items()):
                torch.testing.assert_close(w, v, rtol=1e-11, atol=1e-13, msg=f"{name} run {run}: {k}")


def test_member_is_an_ordinary_copy():
    ens = Ensemble({"a": [_ln_model("gelu", r) for r in range(2)]})
    x = torch.randn(2, 5, D_IN, dtype=F64)
    out = ens(x)["a"]
    m = ens.member("a", 1)
    torch.testing.assert_close(m(x[1]), out[1], rtol=1e-14, atol=1e-15)
    with torch.no_grad():
        m.head.weight.zero_()
    assert ens.params["a"]["head.weight"][1].abs().sum() > 0  # a copy: the ensemble is untouched
    shared = ens(x[0], shared=True)["a"]
    torch.testing.assert_close(shared[0], out[0])


def test_ensemble_rejects_mismatched_groups():
    with pytest.raises(ValueError, match="same number"):
        Ensemble({"a": [_ln_model("relu", 0)], "b": [_ln_model("relu", 0), _ln_model("relu", 1)]})
    with pytest.raises(ValueError, match="separate groups"):
        Ensemble({"a": [_ln_model("relu", 0), _ln_model("tanh", 1)]})
    with pytest.raises(ValueError, match="distinct"):
        Ensemble({"a": [_ln_model("relu", 0), _ln_model("relu", 1)]}, run_ids=[3, 3])
    ens = Ensemble({"a": [_ln_model("relu", 0)]})
    X, y = _data()
    with pytest.raises(ValueError, match="exceeds"):
        train(ens, X, y, TrainConfig(epochs=1, batch_size=N + 1, lr=0.1), progress=False)
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(epochs=1, batch_size=4, lr=float("nan"))


def test_a_diverged_model_leaves_the_others_alone():
    X, y = _data()
    ens = Ensemble({"a": [_ln_model("relu", r) for r in range(2)]})
    ref = copy.deepcopy(ens)
    with torch.no_grad():
        ens.params["a"]["head.weight"][0].fill_(float("nan"))
    a = train(ens, X, y, TrainConfig(epochs=1, batch_size=16, lr=0.1), progress=False).loss()
    b = train(ref, X, y, TrainConfig(epochs=1, batch_size=16, lr=0.1), progress=False).loss()
    assert np.isnan(a[:, 0, 0]).all()
    np.testing.assert_array_equal(a[:, 0, 1], b[:, 0, 1])


# --- checkpoints ----------------------------------------------------------------------------


class _Stop(Exception):
    pass


def _measure(ens: Ensemble, step: int, epoch: int) -> list[dict]:
    w = ens.params["tanh"]["head.weight"].detach()
    return [{"step": step, "epoch": epoch, "run": r, "w": float(w[i].norm())} for i, r in enumerate(ens.run_ids)]


def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path):
    X, y = _data()
    cfg = TrainConfig(epochs=3, batch_size=16, lr=0.05, momentum=0.9)
    full_ens = Ensemble(_groups())
    full = train(
        full_ens, X, y, cfg, measure=_measure, every=2, evaluate=_measure, checkpoint=tmp_path / "a.pt", progress=False
    )

    def stop_after_2(logs):
        if logs[-1].epoch == 2:
            raise _Stop

    path = tmp_path / "b.pt"
    with pytest.raises(_Stop):
        train(
            Ensemble(_groups()),
            X,
            y,
            cfg,
            measure=_measure,
            every=2,
            evaluate=_measure,
            checkpoint=path,
            on_epoch=stop_after_2,
            progress=False,
        )
    resumed_ens = Ensemble(_groups())  # a fresh process: the same initial models, rebuilt
    resumed = train(
        resumed_ens, X, y, cfg, measure=_measure, every=2, evaluate=_measure, checkpoint=path, progress=False
    )
    assert resumed.resumed_from == 2 and full.resumed_from == 0
    np.testing.assert_array_equal(resumed.loss(), full.loss())
    assert resumed.rows() == full.rows()
    for name in full_ens.names:
        for kind in ("params", "buffers"):
            for k, v in getattr(full_ens, kind)[name].items():
                assert torch.equal(getattr(resumed_ens, kind)[name][k], v), (name, k)
    # finished: a third call trains nothing and returns the same logs
    again = train(
        Ensemble(_groups()), X, y, cfg, measure=_measure, every=2, evaluate=_measure, checkpoint=path, progress=False
    )
    assert again.resumed_from == 3 and again.rows() == full.rows()


def test_a_checkpoint_of_another_setup_is_not_used(tmp_path):
    X, y = _data()
    path = tmp_path / "c.pt"
    train(Ensemble(_groups()), X, y, TrainConfig(epochs=1, batch_size=16, lr=0.05), checkpoint=path, progress=False)
    other = train(
        Ensemble(_groups()), X, y, TrainConfig(epochs=1, batch_size=16, lr=0.01), checkpoint=path, progress=False
    )
    assert other.resumed_from == 0
    tagged = train(
        Ensemble(_groups()),
        X,
        y,
        TrainConfig(epochs=1, batch_size=16, lr=0.01),
        checkpoint=path,
        tag={"probe_batch": 64},
        progress=False,
    )
    assert tagged.resumed_from == 0


# --- decision rules on fabricated numbers --------------------------------------------------------


def test_spearman_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    gen = np.random.default_rng(3)
    for _ in range(20):
        a = gen.integers(0, 5, size=9).astype(float)  # ties
        b = gen.normal(size=9)
        b[gen.integers(0, 9)] = np.inf
        assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_rule_norms_never_raise():
    assert rule_norms_never_raise([1.0, 2.0], [0.9, 2.0], tol=0.01) == (True, 0, 0.0)
    held, rises, worst = rule_norms_never_raise([1.0, 2.0], [1.02, 1.0], tol=0.01)
    assert not held and rises == 1 and worst == pytest.approx(0.02)
    assert rule_norms_never_raise([1.0], [1.005], tol=0.01)[0]
    assert not rule_norms_never_raise([1.0], [math.inf], tol=0.01)[0]  # a norm layer that collapses
    assert rule_norms_never_raise([math.inf], [math.inf], tol=0.01)[0]
    assert not rule_norms_never_raise([1.0], [math.nan], tol=0.01)[0]


# --- verdicts on hand-made rows ---------------------------------------------------------------------

_ACTS = ["sigmoid", "tanh", "relu"]  # β 1.02 < 1.07 < 1.27


def _fig7_rows(scales: dict[int, list[float]], acts: list[str] = _ACTS) -> list[dict]:
    """Loss curves ``c · exp(−e/3)``: ``scales[run][i]`` is activation ``i``'s ``c`` in that run."""
    return [
        {"act": a, "beta": 0.0, "run": run, "epoch": e, "loss": c * math.exp(-e / 3)}
        for run, cs in scales.items()
        for a, c in zip(acts, cs)
        for e in range(6)
    ]


def test_loss_area_is_the_mean_over_trained_epochs():
    curves = np.array([[9.0, 3.0, 1.0], [9.0, 2.0, math.nan]])
    np.testing.assert_array_equal(loss_area(curves), [2.0, math.inf])  # epoch 0 left out; diverged: slowest


_BY_BETA = sorted(FIG7_ACTS, key=isometry_strength)
_CFG7 = {"acts": _BY_BETA, "epochs": 5}


def _areas_rows(area: np.ndarray) -> list[dict]:
    """Rows whose loss areas are ``area`` (activations of ``_BY_BETA`` × runs)."""
    unit = np.mean(np.exp(-np.arange(1, 6) / 3))
    return _fig7_rows({r: list(area[:, r] / unit) for r in range(area.shape[1])}, _BY_BETA)


def test_verdict_fig7_held_and_not_held():
    rng = np.random.default_rng(0)
    trend = np.linspace(3.0, 1.0, 7)[:, None]  # larger β, smaller loss area
    faster = verdict_fig7(_areas_rows(trend + 0.2 * rng.normal(size=(7, 3))), _CFG7)
    assert faster.verdict == "held" and faster.measured["permutation_p_faster"] <= 0.05
    assert "p(faster)" in faster.reason and faster.measured["spearman_beta_area_per_run"][0] < 0
    slower = verdict_fig7(_areas_rows(trend[::-1] + 0.2 * rng.normal(size=(7, 3))), _CFG7)
    assert slower.verdict == "not held" and slower.measured["slowest"] == _BY_BETA[-1]
    # three activations cannot reach p ≤ 0.05 (1/3! = 0.17): undecided, saying so
    few = verdict_fig7(_fig7_rows({0: [3, 2, 1], 1: [2.5, 2.4, 2.0]}), {"acts": _ACTS, "epochs": 5})
    assert few.verdict == "undecided" and "3!" in few.reason
    # the final loss alone would say "faster" here, the area (the speed) says slower: judged on the area
    rows = [
        r | {"loss": r["loss"] * (0.1 if r["epoch"] == 5 and r["act"] == _BY_BETA[-1] else 1)}
        for r in _areas_rows(np.repeat(trend[::-1], 2, axis=1))
    ]
    assert verdict_fig7(rows, _CFG7).verdict == "not held"


def test_verdict_fig7_false_held_rate_under_the_null():
    """Activations differ (a ranking shared by every run) but not by β: the rule says held at most at
    its stated rate 5%, over 200 simulated row sets (binomial 3-sigma slack); the per-run sign rule it
    replaces ("ρ < 0 in every run") says held far more often on the same rows."""
    rng = np.random.default_rng(7)
    trials, held, old = 200, 0, 0
    for _ in range(trials):
        effect = rng.normal(size=(7, 1))  # each activation's speed, unrelated to its β
        v = verdict_fig7(_areas_rows(2.0 + effect + 0.3 * rng.normal(size=(7, 3))), _CFG7)
        held += v.verdict == "held"
        old += all(r < 0 for r in v.measured["spearman_beta_area_per_run"])
    assert held / trials <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / trials)
    assert old / trials > 0.15


def test_fig7_statistic_is_the_run_mean_of_spearman():
    rng = np.random.default_rng(1)
    area, b = rng.normal(size=(7, 4)), rng.normal(size=7)
    area[2, 1] = area[3, 1]  # a tie
    expected = np.mean([spearman(b, area[:, r]) for r in range(4)])
    assert fig7_statistic(b, area)(b[None, :])[0] == pytest.approx(expected)


def test_fig7_runs_are_independent_and_shard_invariant():
    """Each run draws its own weights and data order from its global index, so a run computed alone
    (another rank) equals the same run computed with others; within a run the activations share them."""
    cfg = {"depth": 2, "width": 8, "seed": 3}
    w = {(a, r): _ln_classifier(a, cfg, 5, 3, r).state_dict() for a in ("tanh", "relu") for r in (0, 1)}
    assert not torch.equal(w["tanh", 0]["head.weight"], w["tanh", 1]["head.weight"])
    assert torch.equal(w["tanh", 0]["head.weight"], w["relu", 0]["head.weight"])
    body = [k for k in w["tanh", 0] if k.startswith("body") and k.endswith("weight")]
    assert body and all(not torch.equal(w["tanh", 0][k], w["tanh", 1][k]) for k in body)
    both, alone = epoch_order(50, [0, 1], 3, 1), epoch_order(50, [1], 3, 1)
    assert not torch.equal(both[0], both[1]) and torch.equal(both[1], alone[0])


def _fig2_rows(rise: float = 0.0, centring: float = 0.0, t1: int = 1) -> list[dict]:
    """Gap rows of a depth-2 net at steps 0 and 5; the projection of layer 2 at step 5 multiplies
    its input's gap by ``1 + rise``, the centring of every layer by ``1 + centring``."""
    rows = []

    def row(step, run, layer, site, value, t1=""):
        rows.append(
            {
                "act": "tanh",
                "beta": 1.07,
                "run": run,
                "epoch": 0,
                "step": step,
                "quantity": "gap",
                "layer": layer,
                "site": site,
                "value": value,
                "theorem1_holds": t1,
            }
        )

    for step in (0, 5):
        for run in (0, 1):
            g = 1.0
            row(step, run, 0, "input", g)
            for ell in range(3):
                if ell:
                    row(step, run, ell, "fc", g)
                    row(step, run, ell, "act", g)
                centred = g * (1 + centring)
                g = centred * (1 + rise if (step, ell) == (5, 2) else 0.5)
                row(step, run, ell, "norm:centered", centred)
                row(step, run, ell, "norm:normalized", g, t1)
                row(step, run, ell, "norm", g)
    return rows


def test_verdict_fig2_trained():
    cfg = {"acts": ["tanh"], "depth": 2, "tolerance": 0.01, "probe_every": 5, "probe_batch": 8}
    ok = verdict_fig2_trained(_fig2_rows(), cfg)
    assert ok.verdict == "held" and "0 of 6 trained norm layers raise the gap" in ok.reason
    raised = verdict_fig2_trained(_fig2_rows(rise=0.05), cfg)  # a trained norm layer raises the gap by 5%
    assert raised.verdict == "not held"
    assert raised.measured["during_and_after_training"]["max_relative_rise"] == pytest.approx(0.05)
    assert raised.measured["at_initialisation"]["held"]
    assert verdict_fig2_trained(_fig2_rows(t1=0), cfg).verdict == "not held"  # Theorem 1's bound fails
    # the centring raising the gap is judged now (the whole layer): 1.2 · 0.5 < 1 lowers, 2.5 · 0.5 raises
    assert verdict_fig2_trained(_fig2_rows(centring=0.2, rise=-0.5), cfg).verdict == "held"
    centred = verdict_fig2_trained(_fig2_rows(centring=1.5), cfg)
    assert (
        centred.verdict == "not held" and centred.measured["at_initialisation"]["projection_step"]["raising_gap"] == 0
    )
    init_only = [r for r in _fig2_rows() if r["step"] == 0]
    assert verdict_fig2_trained(init_only, cfg).verdict == "undecided"


def _m4_rows(curves: dict[tuple[str, int, int], list[float]], lr: float = 0.01) -> list[dict]:
    rows = [{"lr": lr, "weights": "", "depth": "", "run": "", "epoch": "", "quantity": "chance", "value": 0.1}]
    for (w, L, run), acc in curves.items():
        for q in ("train_accuracy", "test_accuracy"):
            rows += [
                {"lr": lr, "weights": w, "depth": L, "run": run, "epoch": e, "quantity": q, "value": a}
                for e, a in enumerate(acc)
            ]
    return rows


def _m4(orth: dict[int, list[list[float]]], lr: float = 0.01) -> list[dict]:
    gauss = {("gaussian", L, r): c for L, runs in orth.items() for r, c in enumerate(runs)}
    return _m4_rows({**{("orthogonal", L, r): c for L, runs in orth.items() for r, c in enumerate(runs)}, **gauss}, lr)


def test_verdict_meterez_fig4():
    cfg = {"depths": [4, 64], "weights": ["orthogonal", "gaussian"], "epochs": 3, "max_spread": 0.05, "lrs": [0.01]}
    fast, slow = [0.1, 0.6, 0.8, 0.9], [0.1, 0.2, 0.3, 0.4]
    held = verdict_meterez_fig4(_m4({4: [fast, fast], 64: [fast, [0.1, 0.58, 0.8, 0.9]]}), cfg)
    assert held.verdict == "held" and held.measured["lr=0.01"]["spread_over_depths"]["orthogonal"] == pytest.approx(
        0.01 / 3
    )
    assert "Gaussian weights are as depth-independent" in held.notes[0]  # the control passes too: said
    deep_slow = verdict_meterez_fig4(_m4({4: [fast, fast], 64: [slow, slow]}), cfg)
    assert deep_slow.verdict == "not held" and "depth 64" in deep_slow.reason
    # the same final accuracy, reached later: the final number alone would call it depth-independent
    late = [0.1, 0.3, 0.6, 0.9]
    assert verdict_meterez_fig4(_m4({4: [fast, fast], 64: [late, late]}), cfg).verdict == "not held"
    noisy = verdict_meterez_fig4(_m4({4: [fast, fast], 64: [slow, fast]}), cfg)  # the runs overlap
    assert noisy.verdict == "undecided"
    flat = [0.1, 0.1, 0.1, 0.1]
    assert verdict_meterez_fig4(_m4({4: [flat, flat], 64: [flat, flat]}), cfg).verdict == "undecided"
    assert (
        verdict_meterez_fig4(_m4({4: [fast, fast], 64: [fast, [0.1, 0.5, math.nan, math.nan]]}), cfg).verdict
        == "not held"
    )


def test_verdict_meterez_fig4_is_judged_over_the_learning_rates():
    cfg = {"depths": [4, 64], "weights": ["orthogonal", "gaussian"], "epochs": 3, "max_spread": 0.05}
    fast, slow = [0.1, 0.6, 0.8, 0.9], [0.1, 0.2, 0.3, 0.4]
    same, apart = _m4({4: [fast, fast], 64: [fast, fast]}), _m4({4: [slow, slow], 64: [fast, fast]})
    relabel = [r | {"lr": 0.1} for r in same]
    mixed = verdict_meterez_fig4(apart + relabel, {**cfg, "lrs": [0.01, 0.1]})  # depth-free only at lr 0.1
    assert mixed.verdict == "undecided" and "lr 0.01: not held" in mixed.reason and "lr 0.1: held" in mixed.reason
    both = verdict_meterez_fig4(same + relabel, {**cfg, "lrs": [0.01, 0.1]})
    assert both.verdict == "held" and "spread" in both.reason
    never = verdict_meterez_fig4(apart + [r | {"lr": 0.1} for r in apart], {**cfg, "lrs": [0.01, 0.1]})
    assert never.verdict == "not held" and set(never.measured) == {"lr=0.01", "lr=0.1"}


def test_meterez_fig4_reason_gives_the_weight_moves():
    cfg = {"depths": [4, 64], "weights": ["orthogonal", "gaussian"], "epochs": 3, "max_spread": 0.05, "lrs": [0.01]}
    fast, slow = [0.1, 0.6, 0.8, 0.9], [0.1, 0.2, 0.3, 0.4]
    rows = _m4({4: [slow, slow], 64: [fast, fast]})

    def moved(shallow: float, deep: float) -> list[dict]:
        return [
            {
                "lr": 0.01,
                "weights": w,
                "depth": L,
                "run": r,
                "epoch": 1,
                "quantity": "weight_move",
                "value": v + 0.01 * r,
            }
            for w in cfg["weights"]
            for L, v in ((4, shallow), (64, deep))
            for r in range(2)
        ]

    bigger = verdict_meterez_fig4(rows + moved(0.16, 0.75), cfg)
    assert bigger.verdict == "not held" and "depth 4 trains slower than depth 64" in bigger.reason
    assert "moved more" in bigger.reason and "0.755 against 0.165" in bigger.reason
    assert bigger.measured["lr=0.01"]["weight_move_epoch1"] == {4: pytest.approx(0.165), 64: pytest.approx(0.755)}
    smaller = verdict_meterez_fig4(rows + moved(0.75, 0.16), cfg)
    assert smaller.verdict == "not held" and "mechanism not established" in smaller.reason
    assert "not recorded" in verdict_meterez_fig4(rows, cfg).reason


def test_m4_weight_move_is_the_summed_relative_frobenius_change():
    models = [BNMLP(5, 4, 3, 2, generator=torch.Generator().manual_seed(r)) for r in range(2)]
    ens = Ensemble({"g": models})
    start = {"g": {n: p.detach().clone() for n, p in ens.params["g"].items() if n.endswith(".fc.weight")}}
    scale = torch.tensor([[0.1, -0.3], [0.2, 0.0], [-0.05, 0.5]], dtype=torch.float32)  # (layer, run)
    with torch.no_grad():
        for ell, (n, W0) in enumerate(start["g"].items()):
            ens.params["g"][n].copy_(W0 * (1 + scale[ell])[:, None, None])  # ‖ΔW‖/‖W‖ = |c|
        ens.params["g"]["readout.weight"].mul_(3.0)  # the read-out is not a hidden layer
    rows = _m4_move_rows(ens, start, {"g": ("orthogonal", 3)}, 1)
    assert [r["value"] for r in rows] == pytest.approx(scale.abs().sum(0).tolist(), rel=1e-5)
    assert {(r["weights"], r["depth"], r["epoch"], r["quantity"]) for r in rows} == {
        ("orthogonal", 3, 1, "weight_move")
    }


_SERIES = [["linear", "identity", 0.0], ["tanh, k = 0.4", "tanh", 0.4]]


def _m6_rows(ratio: float | list[float], move: float = 0.05, loss_end: float = 0.5) -> list[dict]:
    """Depth 6 (middle layers 2–4): the trained gap is ``ratio`` × the control's ``move²``."""
    rows = []
    ratios = ratio if isinstance(ratio, list) else [ratio, ratio]
    for name, _, _ in _SERIES:
        for run, rr in enumerate(ratios):
            rows += [
                {
                    "series": name,
                    "run": run,
                    "epoch": e,
                    "step": 10 * e,
                    "layer": "",
                    "quantity": "train_loss",
                    "value": v,
                }
                for e, v in enumerate([2.3, loss_end])
            ]
            for step, m in ((0, 0.0), (10, move)):
                for ell in range(1, 7):
                    q = {"weight_gap": rr * m * m, "control_gap": m * m, "relative_move": m, "grad_norm": 0.3}
                    rows += [
                        {
                            "series": name,
                            "run": run,
                            "epoch": step // 10,
                            "step": step,
                            "layer": ell,
                            "quantity": k,
                            "value": v,
                        }
                        for k, v in q.items()
                    ]
    return rows


def test_verdict_meterez_fig6():
    cfg = {
        "depth": 6,
        "series": _SERIES,
        "epochs": 1,
        "middle": "L/3..2L/3",
        "max_ratio": 0.5,
        "min_move": 0.02,
        "max_loss_ratio": 0.5,
    }
    random_like = verdict_meterez_fig6(_m6_rows(1.0), cfg)  # the gap a random direction gives: no bias
    assert random_like.verdict == "not held" and "random direction" in random_like.reason
    assert random_like.measured["linear"]["gap_over_control_per_run"] == pytest.approx([1.0, 1.0])
    assert random_like.measured["middle_layers"] == [2, 3, 4]
    assert verdict_meterez_fig6(_m6_rows(0.1), cfg).verdict == "held"
    assert verdict_meterez_fig6(_m6_rows([0.1, 0.9]), cfg).verdict == "undecided"  # runs disagree
    still = verdict_meterez_fig6(_m6_rows(0.1, move=0.001), cfg)  # barely moved: orthogonal trivially
    assert still.verdict == "undecided" and "moved only" in still.reason
    assert verdict_meterez_fig6(_m6_rows(0.1, loss_end=2.0), cfg).verdict == "undecided"  # did not train


def _haar(d: int, seed: int) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=F64))
    return q * torch.sign(torch.diagonal(r))


def test_the_control_keeps_the_displacement_and_predicts_eps_squared():
    """A random update of relative size ε raises the gap by ≈ ε² (second order in ε); one tangent
    to the orthogonal group (W₀·exp(A), A skew) by O(ε⁴): the control tells them apart."""
    d, eps = 96, 0.03
    W0 = _haar(d, 0)
    gen = torch.Generator().manual_seed(1)
    R = torch.randn(d, d, generator=gen, dtype=F64)
    W = W0 + eps * math.sqrt(d) * R / torch.linalg.matrix_norm(R)
    C = control_update(W0, W, gen)
    torch.testing.assert_close(torch.linalg.svdvals(C - W0), torch.linalg.svdvals(W - W0))
    assert isometry_gap(weight_gram(W)).item() == pytest.approx(eps**2, rel=0.15)
    assert isometry_gap(weight_gram(C)).item() == pytest.approx(eps**2, rel=0.15)
    A = torch.randn(d, d, generator=gen, dtype=F64)
    A = A - A.T
    T = W0 @ torch.linalg.matrix_exp(A * eps * math.sqrt(d) / torch.linalg.matrix_norm(A))
    m = weight_measures(torch.stack([T]), torch.stack([W0]), None, [gen])
    assert m["relative_move"].item() == pytest.approx(eps, rel=0.01)
    assert m["weight_gap"].item() < 1e-10  # still orthogonal
    assert m["control_gap"].item() == pytest.approx(eps**2, rel=0.15)  # a random orientation is not


# --- distributed helpers ----------------------------------------------------------------------------


def test_shard_runs_partitions_in_order():
    for runs in range(9):
        for world in range(1, 5):
            shares = [distributed.shard_runs(runs, r, world) for r in range(world)]
            assert [i for s in shares for i in s] == list(range(runs))
            assert max(map(len, shares)) - min(map(len, shares)) <= 1
    with pytest.raises(ValueError):
        distributed.shard_runs(3, 2, 2)


def test_single_process_helpers_are_identities():
    x = torch.randn(4, 3)
    assert distributed.rank_world() == (0, 1)
    assert distributed.gather_rows([{"a": 1}]) == [{"a": 1}]
    assert distributed.agree_min(7) == 7
    torch.testing.assert_close(distributed.global_sample_gram(x), (x.double() @ x.double().T))


_TRAIN = TrainConfig(epochs=2, batch_size=16, lr=0.05, momentum=0.9)


def _worker(rank: int, world: int, init: str, tmp: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        out = {}
        out["rank_world"] = distributed.rank_world()
        out["rows"] = distributed.gather_rows([{"rank": rank, "i": i} for i in range(rank + 1)])
        out["min"] = distributed.agree_min(10 - rank)
        x = torch.arange((3 + 2 * rank) * 4, dtype=torch.float32).reshape(-1, 2, 2) + 100 * rank
        x.requires_grad_(True)
        gathered = distributed.all_gather_features(x)
        out["gathered"], out["grad"] = gathered, gathered.requires_grad
        out["gram"] = distributed.global_sample_gram(x)
        out["same"] = distributed.all_gather_features(torch.full((2, 3), float(rank)), same_size=True)
        net = _probe_net()
        with Probe(net, gather=True) as probe:  # ragged shares of one global batch
            net(_probe_batch()[sum(_PROBE_SHARES[:rank]) : sum(_PROBE_SHARES[: rank + 1])])
        out["probe"] = [(r.key, r.isometry_gap) for r in probe.records]
        # each rank trains its share of 3 runs; then rank 1 loses its last checkpoint (a crash
        # between the two ranks' saves) and both resume together from epoch 1
        X, y = _data()
        runs = distributed.shard_runs(3)
        path = f"{tmp}/rank{rank}.pt"
        train(
            Ensemble(_groups(runs), run_ids=runs), X, y, TrainConfig(1, 16, 0.05, 0.9), checkpoint=path, progress=False
        )
        ens = Ensemble(_groups(runs), run_ids=runs)
        first = train(ens, X, y, _TRAIN, checkpoint=path, progress=False)
        if rank == 1:
            import os

            os.replace(f"{path}.prev", path)  # back to epoch 1 on this rank only
        ens = Ensemble(_groups(runs), run_ids=runs)
        res = train(ens, X, y, TrainConfig(3, 16, 0.05, 0.9), checkpoint=path, progress=False)
        out["resumed_from"] = (first.resumed_from, res.resumed_from)
        rows = [
            {"group": g, "run": r, "loss": res.logs[-1].loss[gi][ri]}
            for gi, g in enumerate(ens.names)
            for ri, r in enumerate(runs)
        ]
        out["losses"] = distributed.gather_rows(rows)
        torch.save(out, f"{tmp}/out{rank}.pt")
    finally:
        dist.destroy_process_group()


_PROBE_SHARES = (5, 7)


def _probe_net() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 32),
        torch.nn.BatchNorm1d(32),
        torch.nn.Tanh(),
        torch.nn.Linear(32, 16),
        torch.nn.LayerNorm(16),
    ).eval()  # per-sample maps


def _probe_batch() -> torch.Tensor:
    return torch.randn(sum(_PROBE_SHARES), 6, generator=torch.Generator().manual_seed(2))


def test_gather_and_sharded_training_under_gloo(tmp_path):
    world = 2
    # fork: the workers inherit the imported modules (spawn re-imports torch in each, ~15 s under load)
    mp.start_processes(
        _worker,
        args=(world, f"file://{tmp_path}/rendezvous", str(tmp_path)),
        nprocs=world,
        join=True,
        start_method="fork",
    )
    outs = [torch.load(tmp_path / f"out{r}.pt", weights_only=False) for r in range(world)]
    xs = [torch.arange((3 + 2 * r) * 4, dtype=torch.float32).reshape(-1, 2, 2) + 100 * r for r in range(world)]
    cat = torch.cat(xs)
    ref_gram = torch.from_numpy(
        cat.reshape(len(cat), -1).numpy().astype(np.float64) @ cat.reshape(len(cat), -1).numpy().astype(np.float64).T
    )
    net = _probe_net()
    with Probe(net) as reference:
        net(_probe_batch())
    expected = [(rec.key, rec.isometry_gap) for rec in reference.records]
    for r, out in enumerate(outs):
        assert out["rank_world"] == (r, world)
        assert out["rows"] == [{"rank": 0, "i": 0}, {"rank": 1, "i": 0}, {"rank": 1, "i": 1}]
        assert out["min"] == 9
        assert torch.equal(out["gathered"], cat) and not out["grad"]
        torch.testing.assert_close(out["gram"], ref_gram, rtol=1e-15, atol=0)
        assert torch.equal(out["same"], torch.tensor([[0.0] * 3] * 2 + [[1.0] * 3] * 2))
        # the Probe under DDP: every rank records the statistics of the whole batch
        assert [k for k, _ in out["probe"]] == [k for k, _ in expected]
        assert [g for _, g in out["probe"]] == pytest.approx([g for _, g in expected], rel=1e-9)
        assert out["resumed_from"] == (1, 1)
    # the sharded, interrupted, resumed training equals one process training all 3 runs
    X, y = _data()
    ens = Ensemble(_groups())
    ref = train(ens, X, y, TrainConfig(3, 16, 0.05, 0.9), progress=False).logs[-1].loss
    got = {(row["group"], row["run"]): row["loss"] for row in outs[0]["losses"]}
    assert outs[1]["losses"] == outs[0]["losses"]
    for gi, g in enumerate(ens.names):
        for r in range(3):
            assert got[g, r] == pytest.approx(ref[gi][r], rel=1e-12)


# --- local image sources (isoprobe.data: .npz files and image folders) ------------------------------


def test_npz_images_channels_last_and_first(tmp_path):
    from isoprobe.data import DataUnavailable, is_image_source, load_images

    gen = np.random.default_rng(0)
    hwc = gen.integers(0, 256, size=(6, 5, 4, 3), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", x=hwc, y=np.arange(6) % 2)
    batch = load_images(str(tmp_path / "a.npz"))
    assert batch.X.shape == (6, 3, 5, 4) and batch.X.dtype == torch.float32
    np.testing.assert_allclose(batch.X[2, 1].numpy(), hwc[2, :, :, 1] / 255.0, rtol=1e-7)
    assert batch.labels.tolist() == [0, 1, 0, 1, 0, 1]
    chw = gen.random((5, 1, 3, 3)).astype(np.float64)
    np.savez(tmp_path / "b.npz", images=chw, labels=np.arange(5))
    sub = load_images(str(tmp_path / "b.npz"), limit=3, seed=1)
    idx = sub.labels.numpy()  # labels are the indices: the subset is the right images
    np.testing.assert_allclose(sub.X.numpy(), chw[idx].astype(np.float32))
    assert is_image_source(str(tmp_path / "b.npz")) and not is_image_source(str(tmp_path / "none.npz"))
    np.savez(tmp_path / "c.npz", pixels=chw)
    with pytest.raises(DataUnavailable, match="label array"):
        load_images(str(tmp_path / "c.npz"))
    np.savez(tmp_path / "d.npz", x=chw * 255, y=np.arange(5))
    with pytest.raises(DataUnavailable, match=r"\[0, 1\]"):
        load_images(str(tmp_path / "d.npz"))
    with pytest.raises(ValueError, match="unknown image data"):
        load_images(str(tmp_path / "missing.npz"))


def test_image_folder(tmp_path):
    from PIL import Image

    from isoprobe.data import DataUnavailable, load_images

    gen = np.random.default_rng(1)
    arrays = {}
    for cls in ("b_cat", "a_dog"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(2):
            a = gen.integers(0, 256, size=(4, 6), dtype=np.uint8)
            Image.fromarray(a, mode="L").save(tmp_path / "imgs" / cls / f"{i}.png")
            arrays[cls, i] = a
    batch = load_images(str(tmp_path / "imgs"))
    assert batch.X.shape == (4, 1, 4, 6)
    assert batch.labels.tolist() == [0, 0, 1, 1]  # classes in sorted order: a_dog = 0
    np.testing.assert_allclose(batch.X[2, 0].numpy(), arrays["b_cat", 0] / 255.0, rtol=1e-7)
    Image.fromarray(np.zeros((5, 5), dtype=np.uint8)).save(tmp_path / "imgs" / "a_dog" / "odd.png")
    with pytest.raises(DataUnavailable, match="one size"):
        load_images(str(tmp_path / "imgs"))


# --- the reproductions end to end, at toy sizes ------------------------------------------------------

_TOY = {
    "fig7": {"acts": ["sigmoid", "tanh", "relu"], "depth": 2, "width": 16, "batch": 32, "epochs": 2},
    "fig2-trained": {
        "acts": ["tanh", "relu"],
        "depth": 2,
        "width": 16,
        "batch": 32,
        "epochs": 2,
        "probe_every": 3,
        "probe_batch": 8,
    },
    "meterez-fig4": {"depths": [2, 4], "width": 8, "batch": 32, "epochs": 2, "test_size": 64},
    "meterez-fig6": {"depth": 6, "width": 8, "batch": 32, "epochs": 2, "record_every": 4},
}


@pytest.fixture
def toy_registry(monkeypatch):
    import dataclasses

    from isoprobe.experiments import REGISTRY

    def toy(o, rep, sizes):
        cfg = {**rep.config(o), **sizes}
        return {**cfg, "data": {**cfg["data"], "limit": 256}}

    for name, sizes in _TOY.items():
        rep = REGISTRY[name]
        monkeypatch.setitem(REGISTRY, name, dataclasses.replace(rep, config=partial(toy, rep=rep, sizes=sizes)))


@pytest.mark.parametrize("name", list(_TOY))
def test_reproduction_runs_and_decides(toy_registry, tmp_path, name):
    import json

    from isoprobe.experiments import run_reproductions

    data = "synthetic" if name == "fig2-trained" else "digits"  # the offline fallbacks, without the hub probe
    (summary,) = run_reproductions(
        [name], quick=True, runs=2, data=data, out_dir=tmp_path, show_progress=False, echo=lambda _m: None
    )
    assert summary["verdict"] in ("held", "not held", "undecided") and summary["rule"]
    assert summary["data"] == {"paper": "cifar10", "asked": data, "used": data, "substitute": True, "limit": 256}
    for suffix in (".csv", ".png", ".json"):
        assert (tmp_path / f"{name}{suffix}").exists()
    # the checkpoints only serve to resume: gone once the results are written
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{name}.{s}" for s in ("csv", "json", "png")]
    assert json.loads((tmp_path / f"{name}.json").read_text())["config"]["epochs"] == 2


def test_interrupted_reproduction_resumes_to_the_same_csv(toy_registry, tmp_path, monkeypatch):
    import isoprobe.experiments.training as exp
    from isoprobe.experiments import run_reproductions

    def run(out):
        return run_reproductions(
            ["fig2-trained"],
            quick=True,
            runs=2,
            data="synthetic",
            out_dir=out,
            show_progress=False,
            echo=lambda _m: None,
        )[0]

    whole = run(tmp_path / "whole")
    real = exp.train

    def interrupted(*args, **kwargs):
        def stop(logs):
            if logs[-1].epoch == 1:
                raise KeyboardInterrupt

        return real(*args, on_epoch=stop, **kwargs)

    monkeypatch.setattr(exp, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut")
    assert not (tmp_path / "cut" / "fig2-trained.json").exists()
    assert any(".ckpt-" in p.name for p in (tmp_path / "cut").iterdir())  # kept to resume from
    monkeypatch.setattr(exp, "train", real)
    resumed = run(tmp_path / "cut")
    assert any("resumed training after epoch 1" in n for n in resumed["notes"])
    assert not any(".ckpt-" in p.name for p in (tmp_path / "cut").iterdir())
    a = (tmp_path / "whole" / "fig2-trained.csv").read_text()
    assert a == (tmp_path / "cut" / "fig2-trained.csv").read_text()
    assert resumed["measured"] == whole["measured"] and resumed["verdict"] == whole["verdict"]


@pytest.mark.parametrize("stop_step", [3, 1])
def test_an_interrupted_first_epoch_keeps_its_steps_and_resumes_exactly(tmp_path, stop_step):
    X, y = _data()
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.05, momentum=0.9)
    full_ens = Ensemble(_groups())
    full = train(full_ens, X, y, cfg, measure=_measure, every=1, evaluate=_measure, progress=False)
    steps_done, stopped = [], []

    def stop_at(ens, step, epoch):
        if step == stop_step and not stopped:
            stopped.append(step)
            raise _Stop
        steps_done.append(step)
        return _measure(ens, step, epoch)

    path = tmp_path / "p.pt"
    with pytest.raises(_Stop):
        train(
            Ensemble(_groups()),
            X,
            y,
            cfg,
            measure=stop_at,
            every=1,
            evaluate=_measure,
            checkpoint=path,
            progress=False,
            save_every_s=0,
        )
    assert not path.exists() and (tmp_path / "p.pt.partial").exists()  # no epoch finished, its steps kept
    before = list(steps_done)
    resumed_ens = Ensemble(_groups())
    resumed = train(
        resumed_ens,
        X,
        y,
        cfg,
        measure=stop_at,
        every=1,
        evaluate=_measure,
        checkpoint=path,
        progress=False,
        save_every_s=0,
    )
    assert steps_done[len(before)] == stop_step  # resumed at the interrupted step, not at step 1
    assert before == list(range(0, stop_step))
    np.testing.assert_array_equal(resumed.loss(), full.loss())
    assert resumed.rows() == full.rows()
    for k, v in full_ens.params["tanh"].items():
        assert torch.equal(resumed_ens.params["tanh"][k], v), k
    assert not (tmp_path / "p.pt.partial").exists()
