"""Training reproductions: Joudaki et al. (2023) Fig. 7 and Fig. 2 (right); Meterez et al. (2024) Figs. 4 and 6.

Each reproduction is a declaration (config, units, verdict, figure). A unit trains a batch of runs
of every variant as one :class:`~isoprobe.training.Ensemble` (stacked parameters under ``vmap``:
one loss, one backward, one SGD step for all models) and returns every epoch's rows; it saves a
checkpoint after every epoch (a scratch file of the runner), so an interrupted unit resumes after
its last finished epoch with the same numbers. Under ``torchrun`` the runs are split into one
unit per rank.

Data: the papers' CIFAR10 where it loads; offline, scikit-learn's digits (real images, 1797 of
8×8, a substitute the JSON names as such) for fig7 and meterez-fig4/6, the built-in synthetic set
for fig2-trained (its probe batch of 512 needs more than the digits' 64 input dimensions: a
centred batch of n ≥ d samples is singular). On the CPU ``--quick`` runs torch single-threaded
(:func:`~isoprobe.experiments.common.single_thread`).

Images are flattened, values in [0, 1]: the LN-MLP normalises each input (its ``input_norm``) and
a batch-norm net's first block normalises each feature, so no further input normalisation
changes these networks. Meterez et al.'s test accuracy is measured on a seeded held-out part of
the loaded images.

Networks: :class:`~isoprobe.nets.LNMLP` (Joudaki et al. eq. 1, Gaussian ``N(0, 1/d)`` weights)
with a linear read-out drawn the same way, and :class:`~isoprobe.nets.BNMLP` (Meterez et al.:
Haar-orthogonal weights, batch norm without mean reduction). Where the papers' numbers are lost
(Meterez et al.'s extracted text has no widths, batch sizes or learning rates) or do not fit the
substitute data, the configs below say which values are ours; the JSON records all of them.

Speed measures. Joudaki et al. Fig. 7 and Meterez et al. Fig. 4 are claims about how fast SGD
trains, so they are judged on the area under the plotted curve, not on its end point: the
*loss area* ``A = (1/E) Σ_{e=1..E} L_e``, with ``L_e`` the mean minibatch loss of epoch ``e``, is
the mean training loss over all SGD steps (a slower net lies higher for longer); the *accuracy
area* is the same mean of the training accuracy. Unlike a threshold ("epochs until loss < τ") it
needs no choice of τ and never saturates at "not reached".

Weights' orthogonality (Meterez et al. Fig. 6, App. F plot the isometry gap ``-log I(W Wᵀ)`` of
each weight matrix). An update ``ΔW`` of relative size ``ε = ‖ΔW‖_F/‖W₀‖_F`` in a direction
unrelated to an orthogonal ``W₀`` raises the gap by ``≈ ε²`` (the symmetric part
``W₀ΔWᵀ + ΔWW₀ᵀ`` has eigenvalue variance ``2ε²``, and ``-log I ≈ ½ var``); an update tangent
to the orthogonal group (``ΔW = W₀A``, ``A`` skew) only by ``O(ε⁴)``. The control is therefore
``W₀ + O₁ ΔW O₂`` with Haar-random ``O₁, O₂``: the same displacement (same singular values),
computed from the same weights, with its orientation relative to ``W₀`` made random. An
implicit orthogonality bias shows as a gap well below the control's.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from isoprobe.experiments.base import (
    Env,
    Options,
    Reproduction,
    Verdict,
    data_request,
    register,
)
from isoprobe.experiments.common import (
    FIG7_ACTS,
    JOUDAKI,
    METEREZ,
    NORM_RISE_TOL,
    draw_site_axis,
    log_axes_with_ticks,
    new_figure,
    norm_site_gaps,
    plot_depth_curves,
    rule_norms_never_raise,
    run_curves,
    single_thread,
    site_gaps,
    site_order,
    spearman,
)
from isoprobe.experiments.stats import ALPHA, permutation_p, sign_test_p
from isoprobe.hermite import isometry_strength
from isoprobe.metrics import isometry_gap
from isoprobe.nets import BNMLP, LNMLP
from isoprobe.theory import LNMLPSpec
from isoprobe.training import Ensemble, EpochLog, TrainConfig, train

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "accuracy_area",
    "control_update",
    "fig7_statistic",
    "loss_area",
    "verdict_fig2_trained",
    "verdict_fig7",
    "verdict_meterez_fig4",
    "verdict_meterez_fig6",
    "weight_gram",
    "weight_measures",
]


# --- speed measures and the weights' control (pure) ------------------------------------------------


def loss_area(curves: np.ndarray) -> np.ndarray:
    """Loss area per run: ``(runs, E + 1)`` loss curves (column 0 the initialisation) →
    ``(runs,)`` means over epochs ``1..E``; a diverged run (NaN) is ``+inf`` (slowest)."""
    c = np.asarray(curves, dtype=np.float64)[:, 1:]
    area = c.mean(axis=1) if c.shape[1] else np.full(c.shape[0], np.nan)
    return np.where(np.isnan(area), np.inf, area)


def accuracy_area(curves: np.ndarray) -> np.ndarray:
    """Accuracy area per run: the mean over epochs ``1..E`` of ``(runs, E + 1)`` accuracy curves
    (NaN, a diverged run, stays NaN)."""
    return np.asarray(curves, dtype=np.float64)[:, 1:].mean(axis=1)


def weight_gram(W: torch.Tensor) -> torch.Tensor:
    """``W Wᵀ`` or ``Wᵀ W``, whichever is smaller (the one that is ``I`` for a (semi-)orthogonal ``W``)."""
    return W @ W.mT if W.shape[-2] <= W.shape[-1] else W.mT @ W


def _haar(n: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """A Haar-random orthogonal ``n × n`` matrix: QR of a Gaussian matrix, signs fixed by ``diag(R)``."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=dtype))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(-2)


def control_update(W0: torch.Tensor, W: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The control weights ``W₀ + O₁ (W − W₀) O₂`` of one ``m × n`` matrix (``O₁, O₂`` Haar, float64):
    the same displacement as training's, in a random orientation relative to ``W₀`` (module docstring)."""
    W0, D = W0.to(torch.float64), (W - W0).to(torch.float64)
    m, n = D.shape
    return W0 + _haar(m, gen, D.dtype) @ D @ _haar(n, gen, D.dtype)


# --- training units (shared by the four) -------------------------------------------------------------


def _threads(cfg: dict) -> contextlib.AbstractContextManager:
    return single_thread() if cfg["single_thread"] else contextlib.nullcontext()


def _generator(seed: int, *keys: int) -> torch.Generator:
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, *keys]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state >> np.uint64(1)))


def _images(env: Env) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The loaded images flattened, their labels and the number of classes."""
    X, y = env.images.X.flatten(1), env.images.labels
    return X, y, int(y.max()) + 1


def _split(X: torch.Tensor, y: torch.Tensor, n_test: int, seed: int):
    """A seeded held-out split: ``((X_train, y_train), (X_test, y_test))``."""
    if X.shape[0] <= 2 * n_test:
        raise ValueError(f"{X.shape[0]} images cannot hold out {n_test} for testing and keep more for training")
    perm = torch.randperm(X.shape[0], generator=_generator(seed, 424242))
    test, tr = perm[:n_test], perm[n_test:]
    return (X[tr], y[tr]), (X[test], y[test])


def _run_batches(cfg: dict, env: Env) -> list[tuple[str, list[int]]]:
    """The runs in ``max(1, world)`` contiguous batches, one unit each: ``(key, runs)``."""
    R = cfg["runs"]
    k = max(1, min(R, env.world))
    bounds = [round(i * R / k) for i in range(k + 1)]
    return [(f"runs {a}-{b - 1}", list(range(a, b))) for a, b in itertools.pairwise(bounds)]


def _fit(
    cfg: dict,
    env: Env,
    key: str,
    runs: list[int],
    build: Callable[[int], dict[str, nn.Module]],
    data: tuple[torch.Tensor, torch.Tensor],
    loss_row: Callable[[str, int, EpochLog, float], dict],
    prepare: Callable[[Ensemble], None] | None = None,
    **hooks,
) -> list[dict]:
    """Train ``build(r)`` for every run ``r`` of ``runs`` as one ensemble; every epoch's rows.

    The loss rows (``loss_row(group, run, log, loss)``) of every epoch, then the hooks' rows.
    ``prepare(ens)`` sees the initial ensemble (before a checkpoint is loaded). Checkpointed after
    every epoch to the scratch file ``KEY.ckpt.pt`` (resumes exactly).
    """
    with _threads(cfg):  # building the models too
        groups: dict[str, list[nn.Module]] = {}
        for r in runs:
            for name, model in build(r).items():
                groups.setdefault(name, []).append(model)
        ens = Ensemble(groups, run_ids=runs, device=env.device)
        del groups  # the ensemble holds stacked copies
        if prepare is not None:
            prepare(ens)
        tcfg = TrainConfig(epochs=cfg["epochs"], batch_size=cfg["batch"], lr=cfg["lr"], seed=cfg["seed"])
        checkpoint = env.scratch_path(f"ckpt-{key.replace(' ', '')}.pt")
        env.scratch_path(f"ckpt-{key.replace(' ', '')}.pt.prev")  # train's fallback copy, removed with it
        result = train(ens, *data, tcfg, checkpoint=checkpoint, tag=cfg, progress=env.progress, desc=key, **hooks)
    if result.resumed_from:
        env.note(f"{key}: resumed training after epoch {result.resumed_from}")
    losses = [
        loss_row(g, r, log, log.loss[i][j])
        for log in result.logs
        for i, g in enumerate(ens.names)
        for j, r in enumerate(ens.run_ids)
    ]
    return losses + result.rows()


def _ln_classifier(act: str, cfg: dict, d_in: int, classes: int, run: int) -> nn.Module:
    """The LN-MLP of run ``run`` (weights from its ``(seed, run, layer)`` streams) and a read-out
    ``N(0, 1/width)`` without bias: every activation of one run shares its weights."""
    spec = LNMLPSpec(act, depth=cfg["depth"], width=cfg["width"])
    head = nn.Linear(cfg["width"], classes, bias=False)
    with torch.no_grad():
        head.weight.normal_(0.0, cfg["width"] ** -0.5, generator=_generator(cfg["seed"], run, 1))
    return nn.Sequential(OrderedDict(body=LNMLP(spec, d_in, seed=cfg["seed"], run=run), head=head))


def _ln_units(cfg: dict, env: Env, loss_row: Callable, **hooks) -> Iterable[tuple[str, Callable[[], list[dict]]]]:
    X, y, classes = _images(env)

    def build(r: int) -> dict[str, nn.Module]:
        return {a: _ln_classifier(a, cfg, X.shape[1], classes, r) for a in cfg["acts"]}

    for key, runs in _run_batches(cfg, env):
        yield key, partial(_fit, cfg, env, key, runs, build, (X, y), loss_row, **hooks)


def _select(rows: Sequence[dict], **match) -> list[dict]:
    return [r for r in rows if all(r[k] == v for k, v in match.items())]


def _beta_colors(betas: dict[str, float]) -> dict[str, tuple]:
    from matplotlib import colormaps

    lo, hi = min(betas.values()), max(betas.values())
    cmap = colormaps["viridis"]
    return {a: cmap(0.9 * (b - lo) / (hi - lo or 1.0)) for a, b in betas.items()}


def _common(o: Options, runs: int, quick_runs: int, fallback: str) -> dict:
    """Runs, threads and the data: CIFAR10 (the papers'), else ``fallback`` (the runner says which ran)."""
    return {
        "runs": o.n_runs(runs, quick_runs),
        "single_thread": o.quick and o.device == "cpu",
        "data": data_request(paper="cifar10", fallback=fallback),
    }


# --- Joudaki et al. Fig. 7: SGD training speed against β ------------------------------------------


def _fig7_config(o: Options) -> dict:
    """The paper's depth 10, lr 0.01, 20 epochs and 5 runs (quick: 3); its width 1000 and batch 512
    (97 SGD steps per epoch on CIFAR10's 50 000 images) are ours: width 256, batch 64 (28 steps per
    epoch on the 1797 digits; quick: width 128, batch 128, 14 steps)."""
    return {
        "acts": list(FIG7_ACTS),
        "depth": 10,
        "width": 128 if o.quick else 256,
        "batch": 128 if o.quick else 64,
        "lr": 0.01,
        "epochs": 20,
        **_common(o, 5, 3, "digits"),
        "paper_sizes": "depth 10, width 1000, batch 512, lr 0.01, 20 epochs, 5 runs, CIFAR10",
    }


def _ln_loss_row(group: str, run: int, log: EpochLog, loss: float) -> dict:
    return {"act": group, "beta": isometry_strength(group), "run": run, "epoch": log.epoch, "loss": loss}


def _fig7_units(cfg: dict, env: Env):
    return _ln_units(cfg, env, _ln_loss_row)


def _fig7_areas(rows: Sequence[dict], cfg: dict) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """``(betas, areas, final)``: ``areas`` and ``final`` losses ``(acts, runs)``."""
    acts, E = cfg["acts"], cfg["epochs"]
    curves = [run_curves(rows, "loss", "epoch", E + 1, act=a) for a in acts]
    final = np.stack([np.where(np.isnan(c[:, -1]), np.inf, c[:, -1]) for c in curves])
    return {a: isometry_strength(a) for a in acts}, np.stack([loss_area(c) for c in curves]), final


def _rank_rows(values: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank) along the last axis, centred and scaled to unit norm."""
    v = np.asarray(values, dtype=np.float64)
    order = np.argsort(v, axis=-1, kind="stable")
    ranks = np.empty_like(v)
    np.put_along_axis(ranks, order, np.broadcast_to(np.arange(1.0, v.shape[-1] + 1), v.shape), axis=-1)
    tied = (np.diff(np.take_along_axis(v, order, axis=-1), axis=-1) == 0).any(axis=-1)
    for idx in zip(*np.nonzero(tied)):
        row, r = v[idx], ranks[idx]
        for value in np.unique(row):
            tie = row == value
            if tie.sum() > 1:
                r[tie] = r[tie].mean()
    ranks -= ranks.mean(axis=-1, keepdims=True)
    norm = np.linalg.norm(ranks, axis=-1, keepdims=True)
    return np.divide(ranks, norm, out=np.full_like(ranks, np.nan), where=norm > 0)


def fig7_statistic(betas: Sequence[float], area: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """``T(b) = mean_r ρ_r(b, A_r)``: the run mean of Spearman's ρ between the labels ``b`` and the loss
    areas ``A_r`` (``area``: activations × runs), for a ``(k, acts)`` array of relabellings ``b``."""
    data = _rank_rows(area.T)  # runs × acts

    def statistic(labels: np.ndarray) -> np.ndarray:
        return (_rank_rows(labels) @ data.T).mean(axis=1)

    return statistic


def _fig7_measured(betas: dict[str, float], area: np.ndarray, final: np.ndarray) -> dict:
    b = list(betas.values())
    stat = fig7_statistic(b, area)
    rho = [spearman(b, area[:, r]) for r in range(area.shape[1])]
    with np.errstate(invalid="ignore"):
        mean_area = area.mean(axis=1)
    return {
        "beta": betas,
        "loss_area": dict(zip(betas, mean_area)),
        "loss_area_per_run": {a: list(area[i]) for i, a in enumerate(betas)},
        "spearman_beta_area_per_run": rho,
        "mean_spearman_beta_area": float(np.mean(rho)),
        "spearman_beta_area_of_means": spearman(b, mean_area),
        "permutation_p_faster": permutation_p(stat, b),
        "permutation_p_slower": permutation_p(lambda labels: -stat(labels), b),
        "runs_with_negative_rho": int(sum(r < 0 for r in rho)),
        "sign_test_p": sign_test_p(int(sum(r < 0 for r in rho)), len(rho)),
        "final_loss": dict(zip(betas, final.mean(axis=1))),
        "spearman_beta_final_loss_per_run": [spearman(b, final[:, r]) for r in range(final.shape[1])],
        "slowest": max(betas, key=lambda a: mean_area[list(betas).index(a)]),
        "diverged_runs": int(np.isinf(area).sum()),
    }


def verdict_fig7(rows: Sequence[dict], cfg: dict) -> Verdict:
    """Larger β trains faster: a permutation test of β against the loss areas of independent runs.

    ``T = mean_r ρ_r(β, A_r)`` (Spearman's ρ of β and the loss area in run ``r``; each run has its
    own weights and data order). Under the null the β labels are exchangeable over the activations,
    so ``p = #{π : T(β∘π) ≤ T(β)} / n!`` over every relabelling has ``P(p ≤ α) ≤ α``: held iff
    ``p ≤ α`` (:data:`~isoprobe.experiments.stats.ALPHA`), not held iff the mirror test (larger β
    slower) has ``p ≤ α``, else undecided. More runs make ``T`` less noisy, never the test stricter.
    """
    betas, area, final = _fig7_areas(rows, cfg)
    m = _fig7_measured(betas, area, final)
    n = len(betas)
    rule = (
        f"permutation test over the β labels: T = run mean of Spearman ρ(β, loss area) (loss area: mean training "
        f"loss over all SGD steps of epochs 1..E, a diverged run +inf; runs independent: own weights and data "
        f"order); p = share of the {n}! relabellings of β over the activations with T at most the observed one; "
        f"held iff p ≤ {ALPHA:g}, not held iff the mirror test (larger β slower) gives p ≤ {ALPHA:g}, else "
        f"undecided (false-held rate ≤ {ALPHA:g} when β carries no information)"
    )
    numbers = (
        f"T = {m['mean_spearman_beta_area']:.2f} over {area.shape[1]} run(s) (ρ per run: "
        + ", ".join(f"{r:.2f}" for r in m["spearman_beta_area_per_run"])
        + f"); p(faster) = {m['permutation_p_faster']:.3g}, p(slower) = {m['permutation_p_slower']:.3g}"
    )
    if 1 / math.factorial(n) > ALPHA:
        why = f"{n} activations allow no p below 1/{n}! = {1 / math.factorial(n):.3g} > {ALPHA:g}"
        return Verdict("undecided", rule, m, reason=why)
    if m["permutation_p_faster"] <= ALPHA:
        return Verdict("held", rule, m, reason=f"a larger β trained faster: {numbers}")
    if m["permutation_p_slower"] <= ALPHA:
        return Verdict("not held", rule, m, reason=f"a larger β trained slower ({numbers}); slowest: {m['slowest']}")
    return Verdict("undecided", rule, m, reason=f"no ranking by β beyond chance at these sizes: {numbers}")


def _whole_epochs(ax) -> None:
    """Ticks at whole epochs only (a 3-epoch run would otherwise get 0.5, 1.5, ...)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def figure_fig7(rows: Sequence[dict], cfg: dict) -> Figure:
    betas, area, _ = _fig7_areas(rows, cfg)
    colors = _beta_colors(betas)
    E = cfg["epochs"]
    fig, (ax, bx) = new_figure(2, size=(5.2, 4.0))
    for a in sorted(betas, key=betas.get):
        curve = run_curves(rows, "loss", "epoch", E + 1, act=a)
        plot_depth_curves(
            ax,
            np.where(np.isnan(curve), np.inf, curve),
            label=f"{a}, β = {betas[a]:.2f}",
            color=colors[a],
            layers=np.arange(E + 1),
            ylabel="training loss (log scale)",
            log=True,
        )
    ax.set_xlabel("epoch")
    _whole_epochs(ax)
    ax.set_title(
        f"LN-MLP depth {cfg['depth']}, width {cfg['width']}, SGD lr {cfg['lr']:g}, batch {cfg['batch']}", fontsize=8
    )
    ax.legend(fontsize=7, title="mean and min–max over runs", title_fontsize=7)
    b = np.asarray(list(betas.values()))
    for r in range(area.shape[1]):
        bx.plot(b, area[:, r], "o-", color="grey", alpha=0.4, lw=0.8, ms=3, label="one run" if r == 0 else None)
    bx.scatter(b, area.mean(axis=1), c=[colors[a] for a in betas], s=40, zorder=3, label="mean over runs")
    rho = ", ".join(f"{spearman(b, area[:, r]):.2f}" for r in range(area.shape[1]))
    bx.set_xlabel("isometry strength β")
    bx.set_ylabel("loss area (mean loss over all SGD steps)")
    bx.set_title(f"Spearman ρ(β, area) per run: {rho}", fontsize=8)
    bx.legend(fontsize=7)
    return fig


register(
    Reproduction(
        name="fig7",
        paper=JOUDAKI,
        figure="Fig. 7",
        claim="the convergence of SGD is faster for activations with a significantly larger isometry strength β "
        "(LayerNorm MLP of depth 10)",
        columns=("act", "beta", "run", "epoch", "loss"),
        config=_fig7_config,
        units=_fig7_units,
        verdict=verdict_fig7,
        draw=figure_fig7,
        uses_data=True,
    )
)


# --- Joudaki et al. Fig. 2 (right): isometry gaps of every layer after training ----------------------


def _fig2t_config(o: Options) -> dict:
    """The paper's depth 10, batch 512 (quick: width 128, batch 64), lr 0.01; 20 epochs (quick: 3)."""
    big = not o.quick
    return {
        "acts": list(FIG7_ACTS),
        "depth": 10,
        "width": 1000 if big else 128,
        "batch": 512 if big else 64,
        "lr": 0.01,
        "epochs": 20 if big else 3,
        **_common(o, 5, 1, "synthetic"),
        # probe batch < width: a centred representation of d features has rank ≤ d − 1
        "probe_every": 100 if big else 15,
        "probe_batch": 512 if big else 64,
        "tolerance": NORM_RISE_TOL,
    }


_FIG2T_COLUMNS = ("act", "beta", "run", "epoch", "step", "quantity", "layer", "site", "value", "theorem1_holds")


def _fig2t_units(cfg: dict, env: Env):
    X = env.images.X.flatten(1)
    gen = _generator(cfg["seed"], 77)
    probe_x = X[torch.randperm(X.shape[0], generator=gen)[: cfg["probe_batch"]]].to(env.device)

    def measure(ens: Ensemble, step: int, epoch: int) -> list[dict]:
        rows = []
        for a in ens.names:
            for i, run in enumerate(ens.run_ids):
                for r in site_gaps(ens.member(a, i).body, probe_x):
                    rows.append(
                        {
                            "act": a,
                            "beta": isometry_strength(a),
                            "run": run,
                            "epoch": epoch,
                            "step": step,
                            "quantity": "gap",
                            "layer": r["layer"],
                            "site": r["site"],
                            "value": r["gap"],
                            "theorem1_holds": r["theorem1_holds"],
                        }
                    )
        return rows

    def loss_row(group: str, run: int, log: EpochLog, loss: float) -> dict:
        return {
            "act": group,
            "beta": isometry_strength(group),
            "run": run,
            "epoch": log.epoch,
            "step": log.step,
            "quantity": "loss",
            "layer": "",
            "site": "",
            "value": loss,
            "theorem1_holds": "",
        }

    return _ln_units(cfg, env, loss_row, measure=measure, every=cfg["probe_every"])


def _fig2t_values(rows: Sequence[dict], cfg: dict):
    """``(values, steps, sites)``; ``values[act][step]``: ``(runs, sites)`` gaps in :func:`site_order`."""
    gaps = _select(rows, quantity="gap")
    steps = sorted({int(r["step"]) for r in gaps})
    sites = site_order(cfg["depth"])
    index = {s: i for i, s in enumerate(sites)}
    runs = sorted({r["run"] for r in gaps})
    values = {a: {s: np.full((len(runs), len(sites)), np.nan) for s in steps} for a in cfg["acts"]}
    for r in gaps:
        key = (int(r["layer"]), r["site"])
        if key in index:
            values[r["act"]][int(r["step"])][runs.index(r["run"]), index[key]] = float(r["value"])
    return values, steps, sites


def _projection_pairs(rows: Sequence[dict], trained: bool) -> tuple[np.ndarray, np.ndarray, int]:
    """Gaps into and out of every norm layer's projection onto the sphere (``norm:centered`` →
    ``norm:normalized``) at step 0 (``trained=False``) or at the later probed steps, and the
    number of Theorem 1 failures there."""
    pick = [r for r in _select(rows, quantity="gap") if (int(r["step"]) > 0) == trained]

    def key(r: dict) -> tuple:
        return (r["act"], r["run"], int(r["step"]), int(r["layer"]))

    before = {key(r): float(r["value"]) for r in pick if r["site"] == "norm:centered"}
    after = {key(r): float(r["value"]) for r in pick if r["site"] == "norm:normalized"}
    fails = sum(1 for r in pick if r["site"] == "norm:normalized" and r["theorem1_holds"] in (0, "0"))
    keys = sorted(set(before) & set(after))
    return np.asarray([before[k] for k in keys]), np.asarray([after[k] for k in keys]), fails


def _fig2t_phase(rows: Sequence[dict], cfg: dict, values: dict, steps: list[int], sites: list, trained: bool) -> dict:
    """The numbers of one phase (initialisation, or the probed steps after it): the whole norm layer
    (input → output), judged, and its projection step (centred input → output), reported."""
    before, after, fails = _projection_pairs(rows, trained)
    _, rises, worst = rule_norms_never_raise(before, after, cfg["tolerance"])
    chosen = [s for s in steps if (s > 0) == trained]
    pairs = norm_site_gaps(np.stack([values[a][s] for a in cfg["acts"] for s in chosen]), sites) if chosen else None
    whole = rule_norms_never_raise(*pairs, cfg["tolerance"]) if chosen else (False, 0, math.nan)
    return {
        "held": whole[0] and fails == 0,
        "norm_layers": int(pairs[0].size) if chosen else 0,
        "norm_layers_raising_gap": whole[1],
        "max_relative_rise": whole[2],
        "theorem1_failures": fails,
        "projection_step": {"projections": int(before.size), "raising_gap": rises, "max_relative_rise": worst},
    }


def verdict_fig2_trained(rows: Sequence[dict], cfg: dict) -> Verdict:
    """Fig. 2 (right): "both before and after training, the normalization layers maintain or decrease
    the isometry gap" — judged on the whole norm layer, as Fig. 2 (left) is, at initialisation and at
    every probed step of training.

    Held iff no norm layer's output gap exceeds its input's by more than ``tolerance`` (relative) and
    Theorem 1's bound holds at every projection (the Probe's check), in both phases; undecided with no
    probed step after initialisation. The projection step alone (Corollary 2, which holds for any
    weights) is reported beside.
    """
    values, steps, sites = _fig2t_values(rows, cfg)
    measured: dict = {"probe_steps": steps}
    for phase, trained in (("at_initialisation", False), ("during_and_after_training", True)):
        measured[phase] = _fig2t_phase(rows, cfg, values, steps, sites, trained)
    rule = (
        f"at every probed step (every {cfg['probe_every']} SGD steps on a fixed batch of {cfg['probe_batch']} "
        "training images, step 0 = initialisation): no norm layer (centring and projection) raises the gap of "
        f"its input by more than {cfg['tolerance']:g} (relative), and Theorem 1 holds at every projection"
    )
    theory = {
        "corollary_2": "projection onto the sphere never lowers isometry, for any weights (trained or not); "
        "the centring before it is not covered by it: the whole layer is what the figure shows",
    }
    if not any(s > 0 for s in steps):
        return Verdict("undecided", rule, measured, theory, reason="no probed step after initialisation")
    init, trained = measured["at_initialisation"], measured["during_and_after_training"]
    numbers = (
        f"{trained['norm_layers_raising_gap']} of {trained['norm_layers']} trained norm layers raise the gap, by "
        f"at most {trained['max_relative_rise']:.2g} relative ({init['norm_layers_raising_gap']} of "
        f"{init['norm_layers']}, at most {init['max_relative_rise']:.2g}, at initialisation; tolerance "
        f"{cfg['tolerance']:g}); Theorem 1 failures: {init['theorem1_failures'] + trained['theorem1_failures']}"
    )
    if init["held"] and trained["held"]:
        return Verdict("held", rule, measured, theory, reason=numbers)
    return Verdict("not held", rule, measured, theory, reason=f"a norm layer raised the isometry gap: {numbers}")


def figure_fig2_trained(rows: Sequence[dict], cfg: dict) -> Figure:
    values, steps, sites = _fig2t_values(rows, cfg)
    betas = {a: isometry_strength(a) for a in cfg["acts"]}
    colors = _beta_colors(betas)
    fig, axes = new_figure(3, ncols=3, size=(6.0, 4.0))
    last = steps[-1]
    for ax, step, title in ((axes[0], 0, "at initialisation"), (axes[1], last, f"after training (step {last})")):
        for a in sorted(betas, key=betas.get):
            plot_depth_curves(
                ax, values[a][step], label=f"{a}, β = {betas[a]:.2f}", color=colors[a], layers=np.arange(len(sites))
            )
        draw_site_axis(ax, sites, fontsize=6)
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=6)
    out_col = sites.index((cfg["depth"], "norm"))
    for a in sorted(betas, key=betas.get):
        curve = np.stack([values[a][s][:, out_col] for s in steps], axis=1)
        plot_depth_curves(axes[2], curve, label=a, color=colors[a], layers=np.asarray(steps))
    axes[2].set_xlabel("SGD step")
    axes[2].set_title(f"gap of the output x_{cfg['depth']} during training", fontsize=9)
    return fig


register(
    Reproduction(
        name="fig2-trained",
        paper=JOUDAKI,
        figure="Fig. 2 (right, after training)",
        claim="both before and after training, the normalization layers maintain or decrease the isometry gap "
        "(Corollary 2 holds for any weights)",
        columns=_FIG2T_COLUMNS,
        config=_fig2t_config,
        units=_fig2t_units,
        verdict=verdict_fig2_trained,
        draw=figure_fig2_trained,
        uses_data=True,
    )
)


# --- Meterez et al. Fig. 4: depth-independent training with orthogonal weights --------------------


def _m4_config(o: Options) -> dict:
    """Ours (the paper's numbers are lost): width 100, batch 100, 10 epochs, depths 10–200, and a range of
    learning rates (0.003–0.1; quick: 0.01–0.16), each trained separately: the claim is judged at each."""
    big = not o.quick
    return {
        "depths": [10, 50, 100, 200] if big else [4, 16, 64],
        "weights": ["orthogonal", "gaussian"],
        "activation": "identity",
        "norm": "rms",
        "width": 100 if big else 32,
        "batch": 100 if big else 64,
        "lrs": [0.003, 0.01, 0.03, 0.1] if big else [0.01, 0.04, 0.16],
        "epochs": 10 if big else 3,
        **_common(o, 3, 2, "digits"),
        "test_size": 500 if big else 300,
        "max_spread": 0.05,
    }


_M4_COLUMNS = ("lr", "weights", "depth", "run", "epoch", "quantity", "value")


def _accuracy_rows(
    ens: Ensemble,
    X: torch.Tensor,
    y: torch.Tensor,
    batch: int,
    quantity: str,
    group: dict[str, tuple[str, int]],
    epoch: int,
) -> list[dict]:
    """Accuracy of every model on ``(X, y)`` in minibatches of ``batch`` (batch norm uses batch
    statistics); a model with a non-finite logit is NaN (diverged)."""
    hits = {g: torch.zeros(ens.runs, device=X.device) for g in ens.names}
    finite = {g: torch.ones(ens.runs, dtype=torch.bool, device=X.device) for g in ens.names}
    nb = X.shape[0] // batch
    with torch.no_grad():
        for b in range(nb):
            xb, yb = X[b * batch : (b + 1) * batch], y[b * batch : (b + 1) * batch]
            for g, logits in ens(xb, shared=True).items():
                hits[g] += (logits.argmax(-1) == yb).float().mean(-1)
                finite[g] &= torch.isfinite(logits).flatten(1).all(-1)
    rows = []
    for g in ens.names:
        w, L = group[g]
        acc = torch.where(finite[g], hits[g] / nb, torch.nan).tolist()
        rows += [
            {"weights": w, "depth": L, "run": run, "epoch": epoch, "quantity": quantity, "value": a}
            for run, a in zip(ens.run_ids, acc)
        ]
    return rows


def _keep_hidden_weights(ens: Ensemble, start: dict) -> None:
    """``start[group][name] = W_ℓ(0)``, a copy of every hidden layer's weight (BNMLP's ``*.fc.weight``);
    ``_fit`` calls it before a checkpoint is loaded, so it is the initialisation on a resumed run too."""
    start.update(
        {g: {n: p.detach().clone() for n, p in ens.params[g].items() if n.endswith(".fc.weight")} for g in ens.names}
    )


def _m4_move_rows(ens: Ensemble, start: dict, group: dict[str, tuple[str, int]], epoch: int) -> list[dict]:
    """``weight_move`` rows: ``Σ_ℓ ‖W_ℓ − W_ℓ(0)‖_F / ‖W_ℓ(0)‖_F`` over the hidden layers, per model."""
    rows = []
    with torch.no_grad():
        for g in ens.names:
            w, L = group[g]
            move = sum(
                torch.linalg.matrix_norm(ens.params[g][n] - W0) / torch.linalg.matrix_norm(W0)
                for n, W0 in start[g].items()
            )
            rows += [
                {"weights": w, "depth": L, "run": run, "epoch": epoch, "quantity": "weight_move", "value": float(v)}
                for run, v in zip(ens.run_ids, move.tolist())
            ]
    return rows


def _m4_units(cfg: dict, env: Env):
    X, y, classes = _images(env)
    (Xtr, ytr), (Xt, yt) = _split(X, y, cfg["test_size"], cfg["seed"])
    evals = {
        "test_accuracy": (Xt.to(env.device), yt.to(env.device)),
        "train_accuracy": (Xtr[: cfg["test_size"]].to(env.device), ytr[: cfg["test_size"]].to(env.device)),
    }
    group = {f"{w}, L = {L}": (w, L) for w in cfg["weights"] for L in cfg["depths"]}

    def build(run: int) -> dict[str, nn.Module]:
        return {
            g: BNMLP(
                X.shape[1],
                cfg["width"],
                L,
                classes,
                weights=w,
                norm=cfg["norm"],
                activation=cfg["activation"],
                generator=_generator(cfg["seed"], run, 1000 + L),
            )
            for g, (w, L) in group.items()
        }

    def evaluate(ens: Ensemble, step: int, epoch: int, start: dict) -> list[dict]:
        acc = [r for q, (xe, ye) in evals.items() for r in _accuracy_rows(ens, xe, ye, cfg["batch"], q, group, epoch)]
        return acc + (_m4_move_rows(ens, start, group, epoch) if epoch else [])

    def loss_row(name: str, run: int, log: EpochLog, loss: float) -> dict:
        w, L = group[name]
        return {"weights": w, "depth": L, "run": run, "epoch": log.epoch, "quantity": "train_loss", "value": loss}

    chance = {"weights": "", "depth": "", "run": "", "epoch": "", "quantity": "chance", "value": 1.0 / classes}
    for lr, (key, runs) in itertools.product(cfg["lrs"], _run_batches(cfg, env)):
        start: dict = {}
        fit = partial(
            _fit,
            {**cfg, "lr": lr},
            env,
            f"lr={lr:g} {key}",
            runs,
            build,
            (Xtr, ytr),
            loss_row,
            prepare=partial(_keep_hidden_weights, start=start),
            evaluate=partial(evaluate, start=start),
        )
        yield f"lr={lr:g} {key}", lambda fit=fit, lr=lr: [{**r, "lr": lr} for r in [chance, *fit()]]


def _m4_curves(rows: Sequence[dict], cfg: dict, quantity: str) -> dict[tuple[str, int], np.ndarray]:
    E = cfg["epochs"]
    return {
        (w, L): run_curves(rows, "value", "epoch", E + 1, weights=w, depth=L, quantity=quantity)
        for w in cfg["weights"]
        for L in cfg["depths"]
    }


def _depth_spread(curves: dict[int, np.ndarray]) -> dict:
    """Accuracy area by depth (mean and per-run range) and whether the extreme depths separate."""
    area = {L: accuracy_area(c) for L, c in curves.items()}
    mean = {L: float(np.mean(a)) for L, a in area.items()}
    if any(math.isnan(m) for m in mean.values()):
        return {"accuracy_area": mean, "spread": math.nan, "separated": True}
    best, worst = max(mean, key=mean.get), min(mean, key=mean.get)
    return {
        "accuracy_area": mean,
        "spread": mean[best] - mean[worst],
        "best_depth": best,
        "worst_depth": worst,
        "separated": bool(np.min(area[best]) > np.max(area[worst])),
    }


def _m4_moves(rows: Sequence[dict], cfg: dict) -> dict[int, float]:
    """Orthogonal weights: the run mean of epoch 1's ``weight_move`` per depth (where recorded)."""
    moves = {
        L: [float(r["value"]) for r in _select(rows, quantity="weight_move", weights="orthogonal", depth=L, epoch=1)]
        for L in cfg["depths"]
    }
    return {L: float(np.mean(v)) for L, v in moves.items() if v}


# A side run at the --quick sizes (2 runs, digits, 3 epochs) with the learning rate scaled by 64/L
# (depth 4 at 0.16, depth 16 at 0.04, depth 64 at 0.01) gave accuracy areas 0.94, 0.92 and 0.89:
# matching the summed step closes the gap that a shared learning rate of 0.01 opens (0.64 against 0.89).
def _m4_mechanism(moves: dict[int, float], slow: int, fast: int) -> str:
    """Why depth ``slow`` trains slower than depth ``fast``, as far as epoch 1's weight moves tell."""
    if slow not in moves or fast not in moves:
        return "mechanism not established (the weight moves were not recorded)"
    if moves[fast] <= moves[slow]:
        return (
            f"mechanism not established: depth {fast}'s weights did not move more in epoch 1 "
            f"(Σ_ℓ ‖ΔW_ℓ‖/‖W_ℓ‖ = {moves[fast]:.3f} against {moves[slow]:.3f})"
        )
    return (
        f"at the one learning rate of all depths, depth {fast}'s weights moved more in epoch 1 "
        f"(Σ_ℓ ‖ΔW_ℓ‖/‖W_ℓ‖ = {moves[fast]:.3f} against {moves[slow]:.3f}; per layer "
        f"{moves[fast] / fast:.4f} against {moves[slow] / slow:.4f}): the faster depth takes larger summed "
        "steps, so the gap is consistent with an effective step size that depends on depth rather than with "
        "a depth-dependent convergence rate (not established by this run)"
    )


def _m4_measured(rows: Sequence[dict], cfg: dict, acc: dict, stats: dict) -> dict:
    """The areas and their spread, the final accuracies and epoch 1's weight moves, by weights and depth."""
    test = _m4_curves(rows, cfg, "test_accuracy")

    def finals(curves: dict) -> dict:
        return {w: {L: float(np.mean(curves[w, L][:, -1])) for L in cfg["depths"]} for w in cfg["weights"]}

    return {
        "accuracy_area": {w: s["accuracy_area"] for w, s in stats.items()},
        "spread_over_depths": {w: s["spread"] for w, s in stats.items()},
        "final_train_accuracy": finals(acc),
        "final_test_accuracy": finals(test),
        "weight_move_epoch1": _m4_moves(rows, cfg),
    }


def _m4_at(rows: Sequence[dict], cfg: dict) -> Verdict:
    """At one learning rate (``rows`` of that rate only). Orthogonal weights: SGD's training-accuracy area (mean training accuracy over epochs 1..E,
    the speed of the accuracy curve) does not depend on depth.

    Held iff every depth learned (final training accuracy ≥ 2 × chance) and the areas' spread over
    depths (run means) is at most ``max_spread``. Not held iff a depth diverged, or the spread
    exceeds ``max_spread`` and the best and worst depths' per-run areas do not overlap. Undecided
    when no depth learned, when every depth is saturated (≥ 0.99 after one epoch), or when the
    spread lies within the seed-to-seed variation. Gaussian weights are measured the same way, as
    a control (not judged). A not-held reason gives epoch 1's summed relative weight move
    ``Σ_ℓ ‖W_ℓ(1) − W_ℓ(0)‖_F / ‖W_ℓ(0)‖_F`` of the slow and the fast depth (the step each took).
    """
    chance = float(_select(rows, quantity="chance")[0]["value"])
    acc = _m4_curves(rows, cfg, "train_accuracy")
    stats = {w: _depth_spread({L: acc[w, L] for L in cfg["depths"]}) for w in cfg["weights"]}
    orth = {L: acc["orthogonal", L] for L in cfg["depths"]}
    final = {L: float(np.mean(c[:, -1])) for L, c in orth.items()}
    measured = _m4_measured(rows, cfg, acc, stats) | {"chance": chance}
    rule = (
        f"orthogonal weights: the training-accuracy area (mean over epochs 1..E; run means) varies by at most "
        f"{cfg['max_spread']:g} across depths {cfg['depths']} and every depth reaches ≥ 2× chance; not held when "
        "the spread is larger and the best and worst depths' runs do not overlap"
    )
    s = stats["orthogonal"]
    gauss = stats.get("gaussian", {}).get("spread", math.nan)
    same = (
        f"Gaussian weights are as depth-independent at these depths (spread {gauss:.3f}): "
        "the run does not show that orthogonality is what matters"
    )
    notes = (same,) if gauss <= cfg["max_spread"] else ()
    if math.isnan(s["spread"]):
        return Verdict("not held", rule, measured, notes=notes, reason="a depth diverged (NaN accuracy)")
    if max(final.values()) < 2 * chance:
        return Verdict("undecided", rule, measured, notes=notes, reason="no depth learned (final accuracy < 2× chance)")
    if min(float(np.min(c[:, 1])) for c in orth.values()) >= 0.99:
        return Verdict("undecided", rule, measured, notes=notes, reason="every depth is saturated after one epoch")
    if s["spread"] <= cfg["max_spread"] and min(final.values()) >= 2 * chance:
        why = f"spread of the accuracy areas over depths {s['spread']:.3f} ≤ {cfg['max_spread']:g}"
        return Verdict("held", rule, measured, notes=notes, reason=why)
    if s["separated"] or min(final.values()) < 2 * chance:
        return Verdict(
            "not held",
            rule,
            measured,
            notes=notes,
            reason=(
                f"depth {s['worst_depth']} trains slower than depth {s['best_depth']} in every run; "
                + _m4_mechanism(measured["weight_move_epoch1"], s["worst_depth"], s["best_depth"])
            ),
        )
    return Verdict(
        "undecided", rule, measured, notes=notes, reason="the spread over depths lies within the seed-to-seed range"
    )


def _at_lr(rows: Sequence[dict], lr: float) -> list[dict]:
    return [r for r in rows if r["lr"] == lr]


def verdict_meterez_fig4(rows: Sequence[dict], cfg: dict) -> Verdict:
    """Depth-independent training, judged at every learning rate of ``cfg["lrs"]`` (:func:`_m4_at` at
    each): held iff held at every rate, not held iff not held at every rate, else undecided, naming
    the rates where it holds and where not (the paper's rate is lost: a verdict at one chosen rate
    would be about that rate, not about the claim)."""
    per = {lr: _m4_at(_at_lr(rows, lr), cfg) for lr in cfg["lrs"]}
    kinds = {v.verdict for v in per.values()}
    each = "; ".join(f"lr {lr:g}: {v.verdict} ({v.reason or 'no reason'})" for lr, v in per.items())
    rule = (
        f"at each learning rate of {cfg['lrs']} (trained separately): {next(iter(per.values())).rule}; held iff held "
        "at every rate, not held iff not held at every rate, else undecided"
    )
    measured = {f"lr={lr:g}": v.measured | {"verdict": v.verdict} for lr, v in per.items()}
    notes = tuple(dict.fromkeys(n for v in per.values() for n in v.notes))
    if len(kinds) == 1 and kinds != {"undecided"}:
        return Verdict(kinds.pop(), rule, measured, notes=notes, reason=each)
    why = f"the verdict depends on the learning rate or cannot be decided at some: {each}"
    return Verdict("undecided", rule, measured, notes=notes, reason=why)


def figure_meterez_fig4(rows: Sequence[dict], cfg: dict) -> Figure:
    mid = cfg["lrs"][len(cfg["lrs"]) // 2]
    areas = {lr: _m4_curves(_at_lr(rows, lr), cfg, "train_accuracy") for lr in cfg["lrs"]}
    rows = _at_lr(rows, mid)
    acc = areas[mid]
    E = cfg["epochs"]
    fig, axes = new_figure(len(cfg["weights"]) + 1)
    for ax, w in zip(axes, cfg["weights"]):
        for L in cfg["depths"]:
            plot_depth_curves(
                ax, acc[w, L], label=f"L = {L}", layers=np.arange(E + 1), ylabel="training accuracy", log=False
            )
        ax.set_xlabel("epoch")
        _whole_epochs(ax)
        ax.set_title(f"{w} weights, BN without mean reduction, width {cfg['width']}, lr {mid:g}", fontsize=8)
        ax.legend(fontsize=7)
    ax = axes[-1]
    chance = float(_select(rows, quantity="chance")[0]["value"])
    for (w, ls), lr in itertools.product(zip(cfg["weights"], ("-", "--")), cfg["lrs"]):
        area = [float(np.mean(accuracy_area(areas[lr][w, L]))) for L in cfg["depths"]]
        ax.plot(cfg["depths"], area, "o" + ls, label=f"{w}, lr {lr:g}")
    ax.axhline(chance, color="grey", ls=":", label="chance")
    log_axes_with_ticks(ax, cfg["depths"])
    ax.set_yscale("linear")
    ax.set_xlabel("depth L")
    ax.set_ylabel(f"training-accuracy area (mean over epochs 1..{E})")
    ax.legend(fontsize=7)
    return fig


register(
    Reproduction(
        name="meterez-fig4",
        paper=METEREZ,
        figure="Fig. 4",
        claim="with orthogonal weights and batch norm, SGD converges at an almost depth-independent rate: "
        "different depths exhibit largely similar (training) accuracy curves",
        columns=_M4_COLUMNS,
        config=_m4_config,
        units=_m4_units,
        verdict=verdict_meterez_fig4,
        draw=figure_meterez_fig4,
        uses_data=True,
    )
)


# --- Meterez et al. Fig. 6: middle layers stay near-orthogonal during training ---------------------


def _m6_config(o: Options) -> dict:
    """Ours (the paper's numbers are lost): width 100, batch 100, lr 0.1 so that the weights move."""
    big = not o.quick
    return {
        "depth": 100 if big else 20,
        "series": [["linear", "identity", 0.0], ["tanh, k = 0.4", "tanh", 0.4]],
        "norm": "rms",
        "width": 100 if big else 32,
        "batch": 100 if big else 64,
        "lr": 0.1,
        "epochs": 10 if big else 3,
        **_common(o, 3, 2, "digits"),
        "record_every": 50 if big else 9,
        "middle": "layers L/3 ≤ ℓ ≤ 2L/3",
        "max_ratio": 0.5,
        "min_move": 0.02,
        "max_loss_ratio": 0.5,
    }


_M6_COLUMNS = ("series", "run", "epoch", "step", "layer", "quantity", "value")


def weight_measures(
    W: torch.Tensor, W0: torch.Tensor, grad: torch.Tensor | None, gens: Sequence[torch.Generator]
) -> dict[str, torch.Tensor]:
    """Per run (leading axis of the stacked ``W``, ``W₀``): the isometry gap ``-log I(WWᵀ)`` (the
    paper's quantity) and that of the control ``W₀ + O₁(W − W₀)O₂`` (run ``r`` draws from
    ``gens[r]``), the relative move ``‖W − W₀‖_F/‖W₀‖_F``, the relative defect
    ``‖WWᵀ − I‖_F/‖I‖_F`` and the gradient norm ``‖∇_W L‖_F`` (when ``grad`` is given)."""
    W64, W0_64 = W.detach().double(), W0.double()
    G = weight_gram(W64)
    eye = torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
    C = torch.stack([control_update(a, b, g) for a, b, g in zip(W0_64.cpu(), W64.cpu(), gens)])
    q = {
        "weight_gap": isometry_gap(G),
        "control_gap": isometry_gap(weight_gram(C)),
        "relative_move": torch.linalg.matrix_norm(W64 - W0_64) / torch.linalg.matrix_norm(W0_64),
        "relative_defect": torch.linalg.matrix_norm(G - eye) / math.sqrt(G.shape[-1]),
    }
    if grad is not None:
        q["grad_norm"] = torch.linalg.matrix_norm(grad.double())
    return q


def _m6_measure(cfg: dict, names: list[str], ens: Ensemble, step: int, epoch: int, start: dict) -> list[dict]:
    """Rows of :func:`weight_measures` for every series, layer and run at ``step``."""
    rows = []
    with torch.no_grad():
        for gi, g in enumerate(ens.names):
            for ell, n in enumerate(names, 1):
                gens = [_generator(cfg["seed"], run, gi, ell, step) for run in ens.run_ids]
                q = weight_measures(ens.params[g][n], start[g][n], ens.params[g][n].grad, gens)
                rows += [
                    {
                        "series": g,
                        "run": run,
                        "epoch": epoch,
                        "step": step,
                        "layer": ell,
                        "quantity": quantity,
                        "value": float(x),
                    }
                    for quantity, v in q.items()
                    for run, x in zip(ens.run_ids, v.tolist())
                ]
    return rows


def _m6_loss_row(group: str, run: int, log: EpochLog, loss: float) -> dict:
    return {
        "series": group,
        "run": run,
        "epoch": log.epoch,
        "step": log.step,
        "layer": "",
        "quantity": "train_loss",
        "value": loss,
    }


def _m6_units(cfg: dict, env: Env):
    X, y, classes = _images(env)
    L, series = cfg["depth"], [tuple(s) for s in cfg["series"]]
    names = [f"blocks.{ell}.fc.weight" for ell in range(L)]

    def build(run: int) -> dict[str, nn.Module]:
        return {
            name: BNMLP(
                X.shape[1],
                cfg["width"],
                L,
                classes,
                norm=cfg["norm"],
                activation=act,
                gain_exponent=k,
                generator=_generator(cfg["seed"], run, 6000),
            )
            for name, act, k in series
        }

    for key, runs in _run_batches(cfg, env):
        start: dict = {}
        yield (
            key,
            partial(
                _fit,
                cfg,
                env,
                key,
                runs,
                build,
                (X, y),
                _m6_loss_row,
                prepare=partial(_keep_hidden_weights, start=start),
                measure=partial(_m6_measure, cfg, names, start=start),
                every=cfg["record_every"],
            ),
        )


def _middle(depth: int) -> list[int]:
    return [ell for ell in range(1, depth + 1) if depth / 3 <= ell <= 2 * depth / 3]


def _m6_array(rows: Sequence[dict], name: str, quantity: str, depth: int) -> tuple[np.ndarray, list[int]]:
    """``(runs, layers 1..L, steps)`` values of one quantity of one series, and the steps."""
    sel = _select(rows, series=name, quantity=quantity)
    steps = sorted({int(r["step"]) for r in sel})
    runs = sorted({r["run"] for r in sel})
    a = np.full((len(runs), depth, len(steps)), np.nan)
    si = {s: i for i, s in enumerate(steps)}
    for r in sel:
        a[runs.index(r["run"]), int(r["layer"]) - 1, si[int(r["step"])]] = float(r["value"])
    return a, steps


def _m6_series(rows: Sequence[dict], cfg: dict, name: str) -> dict:
    """The judged numbers of one series at the last recorded step (middle layers, per run)."""
    L, mid = cfg["depth"], [ell - 1 for ell in _middle(cfg["depth"])]
    gap, _ = _m6_array(rows, name, "weight_gap", L)
    control, _ = _m6_array(rows, name, "control_gap", L)
    move, _ = _m6_array(rows, name, "relative_move", L)
    grad, _ = _m6_array(rows, name, "grad_norm", L)
    loss = run_curves(rows, "value", "epoch", cfg["epochs"] + 1, series=name, quantity="train_loss")
    g, c = gap[:, mid, -1].mean(axis=1), control[:, mid, -1].mean(axis=1)
    hidden = list(range(1, L))  # square hidden-to-hidden weights (layer 1 maps the input)
    return {
        "middle_weight_gap": float(g.mean()),
        "middle_control_gap": float(c.mean()),
        "gap_over_control_per_run": list(g / c),
        "middle_relative_move": float(move[:, mid, -1].mean()),
        "hidden_relative_move": float(move[:, hidden, -1].mean()),
        "random_direction_prediction": float((move[:, mid, -1] ** 2).mean()),
        "middle_mean_grad_norm": float(np.nanmean(grad[:, mid])),
        "hidden_mean_grad_norm": float(np.nanmean(grad[:, hidden])),
        "loss_final_over_initial": float(np.mean(loss[:, -1]) / np.mean(loss[:, 0])),
    }


def _m6_decide(m: dict, cfg: dict) -> tuple[str, str]:
    """One series' verdict and its reason (see :func:`verdict_meterez_fig6`)."""
    ratios = np.asarray(m["gap_over_control_per_run"], dtype=np.float64)
    if not np.isfinite(ratios).all() or not math.isfinite(m["loss_final_over_initial"]):
        return "not held", "a run diverged (non-finite gap or loss)"
    if m["loss_final_over_initial"] > cfg["max_loss_ratio"]:
        return "undecided", f"training did not work (final/initial loss {m['loss_final_over_initial']:.2f})"
    if m["middle_relative_move"] < cfg["min_move"]:
        return "undecided", (
            f"the middle weights moved only {m['middle_relative_move']:.3f} (relative): too little "
            "for the control to tell a bias from a random update"
        )
    if (ratios <= cfg["max_ratio"]).all():
        return "held", (
            f"gap over control {ratios.min():.2f}–{ratios.max():.2f} in every run (≤ {cfg['max_ratio']:g}), relative "
            f"move {m['middle_relative_move']:.3f}"
        )
    if (ratios > cfg["max_ratio"]).all():
        return "not held", (
            f"the middle weights' gap is {ratios.mean():.2f}× that of the same displacement in a "
            "random direction: they stay near-orthogonal because they move little "
            f"(relative move {m['middle_relative_move']:.3f}, gap ≈ move²), not by an implicit bias"
        )
    return "undecided", "the gap-to-control ratio is below the threshold in some runs only"


def verdict_meterez_fig6(rows: Sequence[dict], cfg: dict) -> Verdict:
    """Implicit orthogonality bias of the middle layers (``L/3 ≤ ℓ ≤ 2L/3``), per series.

    At the last recorded step, per run: the mean isometry gap ``-log I(WWᵀ)`` of the middle
    weights over that of their control (the same displacement, randomly oriented, module
    docstring). Held iff the ratio is at most ``max_ratio`` in every run of every series (the
    weights stay closer to orthogonal than a random update of the same size would leave them);
    not held iff some series exceeds it in every run. Undecided when training failed (final over
    initial loss above ``max_loss_ratio``), when the middle weights moved less than ``min_move``
    (relative), or when the runs disagree.
    """
    per = {name: _m6_series(rows, cfg, name) for name, _, _ in cfg["series"]}
    decided = {name: _m6_decide(m, cfg) for name, m in per.items()}
    measured = {
        **{name: {**m, "verdict": decided[name][0]} for name, m in per.items()},
        "middle_layers": _middle(cfg["depth"]),
    }
    rule = (
        f"per series and run, middle layers ({cfg['middle']}) at the last recorded step: mean isometry gap "
        "-log I(WWᵀ) of the trained weights over that of the control W₀ + O₁(W − W₀)O₂ (Haar O₁, O₂: the same "
        f"displacement in a random orientation); held iff ≤ {cfg['max_ratio']:g} in every run of every series; "
        f"undecided if the middle weights moved < {cfg['min_move']:g} (relative) or final/initial loss > "
        f"{cfg['max_loss_ratio']:g}"
    )
    theory = {
        "random_direction": "a random update of relative size ε raises the gap by ≈ ε² "
        "(random_direction_prediction); one tangent to the orthogonal group by O(ε⁴)",
        "statement": "no theorem: an empirical implicit bias of SGD towards orthogonal weights "
        "(Meterez et al. §4, App. F)",
    }
    verdicts = [v for v, _ in decided.values()]
    reasons = "; ".join(f"{name}: {why}" for name, (v, why) in decided.items() if why)
    verdict = "not held" if "not held" in verdicts else "held" if set(verdicts) == {"held"} else "undecided"
    return Verdict(verdict, rule, measured, theory, reason=reasons)


def figure_meterez_fig6(rows: Sequence[dict], cfg: dict) -> Figure:
    from matplotlib import colormaps

    L, mid = cfg["depth"], _middle(cfg["depth"])
    series = [name for name, _, _ in cfg["series"]]
    fig, axes = new_figure(3 * len(series), ncols=3)
    cmap = colormaps["viridis"]
    for k, name in enumerate(series):
        gap, steps = _m6_array(rows, name, "weight_gap", L)
        control, _ = _m6_array(rows, name, "control_gap", L)
        grad, grad_steps = _m6_array(rows, name, "grad_norm", L)  # no gradient at step 0
        # step 0 left out of the gap panel: W₀ is orthogonal to rounding (gap ~1e-15)
        panels = (
            (axes[3 * k], gap[..., 1:], steps[1:], "isometry gap of W:  −log I(WWᵀ)"),
            (axes[3 * k + 1], grad, grad_steps, r"$\|\nabla_W L\|_F$"),
        )
        for ax, values, xs, label in panels:
            for ell in range(1, L + 1):
                thick = ell in mid
                ax.plot(
                    xs,
                    values[:, ell - 1].mean(axis=0),
                    color=cmap(0.9 * (ell - 1) / max(L - 1, 1)),
                    lw=1.4 if thick else 0.6,
                    alpha=1.0 if thick else 0.5,
                )
            ax.set_yscale("log")
            ax.set_xlabel("SGD step")
            ax.set_ylabel(label)
            ax.set_title(f"{name}: layers 1 (purple) … {L} (yellow); middle thick", fontsize=8)
        middle = [ell - 1 for ell in mid]
        axes[3 * k].plot(
            steps[1:],
            control[:, middle, 1:].mean(axis=(0, 1)),
            "k--",
            lw=1.2,
            label="control: same displacement, random direction (middle mean)",
        )
        axes[3 * k].legend(fontsize=6)
        ax = axes[3 * k + 2]
        layers = np.arange(1, L + 1)
        ax.plot(layers, gap[..., -1].mean(axis=0), "o-", ms=3, label="trained W")
        ax.plot(layers, control[..., -1].mean(axis=0), "k--", label="control")
        ax.axvspan(mid[0], mid[-1], color="tab:blue", alpha=0.1, lw=0, label="middle layers")
        ax.set_yscale("log")
        ax.set_xlabel("layer ℓ")
        ax.set_ylabel("isometry gap at the last step")
        ax.set_title(f"{name}: trained vs control, step {steps[-1]}", fontsize=8)
        ax.legend(fontsize=6)
    return fig


register(
    Reproduction(
        name="meterez-fig6",
        paper=METEREZ,
        figure="Fig. 6 (App. F)",
        claim="when the MLP grows very deep, the middle layers remain almost orthogonal even after many steps of SGD, "
        "although their gradients are not negligible: an implicit bias to optimize over orthogonal matrices",
        columns=_M6_COLUMNS,
        config=_m6_config,
        units=_m6_units,
        verdict=verdict_meterez_fig6,
        draw=figure_meterez_fig6,
        uses_data=True,
    )
)
