"""Training reproductions: Joudaki et al. Fig. 7 and Fig. 2 after training; Meterez et al. Figs. 4 and 6.

Each reproduction trains all its variants × runs as one batched computation, an
:class:`~isoprobe.training.Ensemble` (stacked parameters under ``vmap``; one loss, one backward,
one SGD step for all models), with a tqdm bar on stderr, a checkpoint after every epoch
(``NAME.ckpt.pt`` in the output directory: an interrupted run resumes after its last finished
epoch and gives the same numbers; it is removed once the reproduction's JSON is written) and
the CSV written epoch by epoch. Under ``torchrun`` each rank trains a share of the runs
(:mod:`isoprobe.distributed`).

Data: the paper's data set (CIFAR10) by default; ``--quick`` defaults to the built-in synthetic
set (2000 class-structured 1×28×28 images); ``--data NAME`` takes any source of
:mod:`isoprobe.data`. Images are flattened, values in [0, 1]: the LN-MLP normalises each input
(its ``input_norm``), and a batch-norm net's first block normalises each feature, so no further
input normalisation changes these networks. Meterez et al.'s *test* accuracy is measured on a
seeded held-out part of the loaded set (:mod:`isoprobe.data` loads the train split).

The networks are :class:`~isoprobe.nets.LNMLP` (Joudaki et al. eq. 1, Gaussian ``N(0, 1/d)``
weights) with a linear read-out drawn the same way, and :class:`~isoprobe.nets.BNMLP`
(Meterez et al.: Haar-orthogonal weights, batch norm without mean reduction). Meterez et al.'s
extracted text lost the numbers of Figs. 4 and 6 (width, batch size, learning rate, depths); the
values in the configs below are ours, recorded in the JSON. Every verdict is a small pure
function (``rule_*``) of the measured numbers, stated in the JSON and tested on fabricated
inputs.

On the CPU ``--quick`` runs torch single-threaded (:func:`~isoprobe.experiments.common.single_thread`):
on the 2-core test machine a second thread at most halves the time of these small products
when the machine is idle, and made a step about 6× slower while other processes held the
cores (bench/RESULTS.md); one thread keeps ``--quick`` predictable.
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from isoprobe.distributed import agree_min, gather_rows, shard_runs
from isoprobe.experiments.base import Outcome, RunContext, reproduction
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
from isoprobe.hermite import isometry_strength
from isoprobe.metrics import isometry_gap
from isoprobe.nets import BNMLP, LNMLP
from isoprobe.theory import LNMLPSpec
from isoprobe.training import Ensemble, EpochLog, TrainConfig, train

__all__ = [
    "spearman",
    "rule_depth_independent",
    "rule_fig7",
    "rule_near_orthogonal",
]


# --- decision rules: pure functions of measured numbers ----------------------------------------


def _diverged_as_inf(values: Sequence[float]) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    return np.where(np.isnan(v), np.inf, v)


def rule_fig7(betas: Sequence[float], final_losses: Sequence[float]) -> tuple[bool, float]:
    """``(held, ρ)``: Spearman's rank correlation ``ρ`` of β and the final training loss.

    Holds iff ``ρ < 0`` (a larger β ends at a lower loss). A diverged activation (NaN loss)
    ranks as the highest loss. Needs at least 3 activations and two distinct β; a constant
    loss (no ranking) does not hold (``ρ`` NaN).
    """
    b, loss = np.asarray(betas, dtype=np.float64), _diverged_as_inf(final_losses)
    if len(b) != len(loss) or len(b) < 3:
        return False, math.nan
    rho = spearman(b, loss)
    return bool(math.isfinite(rho) and rho < 0), rho


def rule_depth_independent(
    accuracy: dict[int, float], chance: float, max_spread: float = 0.05
) -> tuple[bool, float]:
    """``(held, spread)``: final test accuracy by depth (mean over runs).

    Holds iff the spread ``max − min`` over depths is at most ``max_spread`` (absolute) and
    every depth learned, reaching at least twice the chance accuracy (a net that learns
    nothing at any depth is not evidence). Needs two depths; a diverged depth (NaN) fails.
    """
    acc = np.asarray([accuracy[d] for d in sorted(accuracy)], dtype=np.float64)
    if acc.size < 2 or np.isnan(acc).any():
        return False, math.nan
    spread = float(acc.max() - acc.min())
    return bool(spread <= max_spread and acc.min() >= 2 * chance), spread


def rule_near_orthogonal(
    mid_defect: float,
    mid_move: float,
    all_move: float,
    loss_ratio: float,
    max_defect: float = 0.1,
    min_move_ratio: float = 0.5,
    max_loss_ratio: float = 0.5,
) -> bool:
    """Middle layers stay near-orthogonal while they train (Meterez et al. Fig. 6, App. F).

    ``mid_defect``: the largest relative defect ``‖WᵀW − I‖_F / ‖I‖_F`` of the middle layers
    over all recorded steps and runs; ``mid_move`` and ``all_move``: the mean relative distance
    ``‖W_T − W_0‖_F / ‖W_0‖_F`` travelled by the middle layers and by all hidden layers;
    ``loss_ratio``: final over initial training loss. Holds iff ``mid_defect ≤ max_defect``,
    the middle layers moved at least ``min_move_ratio`` as far as the average layer (their
    gradients are not negligible), and training worked (``loss_ratio ≤ max_loss_ratio``).
    """
    vals = (mid_defect, mid_move, all_move, loss_ratio)
    if not all(math.isfinite(v) for v in vals) or all_move <= 0:
        return False
    return mid_defect <= max_defect and mid_move >= min_move_ratio * all_move and loss_ratio <= max_loss_ratio


# --- shared pieces ----------------------------------------------------------------------------


def _threads(ctx: RunContext) -> contextlib.AbstractContextManager:
    return single_thread() if ctx.quick and ctx.device == "cpu" else contextlib.nullcontext()


def _data(ctx: RunContext, cfg: dict, n_test: int = 0):
    """Flattened ``(X, y)`` for training and ``(X_test, y_test)`` held out (seeded), and the classes."""
    limit = None if cfg["train_size"] is None else cfg["train_size"] + n_test
    batch = ctx.images(cfg["dataset"], limit=limit)
    X, y = batch.X.flatten(1), batch.labels
    classes = int(y.max()) + 1
    if not n_test:
        return (X, y), None, classes
    if X.shape[0] <= n_test:
        raise ValueError(f"{batch.description}: {X.shape[0]} images cannot hold out {n_test} for testing")
    perm = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(ctx.seed + 424242))
    test, tr = perm[:n_test], perm[n_test:]
    return (X[tr], y[tr]), (X[test], y[test]), classes


def _generator(seed: int, run: int, salt: int) -> torch.Generator:
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, run, salt]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state >> np.uint64(1)))


def _ln_classifier(act: str, cfg: dict, d_in: int, classes: int, seed: int, run: int) -> nn.Module:
    """The LN-MLP of run ``run`` (weights from its ``(seed, run, layer)`` streams) and a read-out
    ``N(0, 1/width)`` without bias: every activation of one run shares its weights."""
    spec = LNMLPSpec(act, depth=cfg["depth"], width=cfg["width"])
    head = nn.Linear(cfg["width"], classes, bias=False)
    with torch.no_grad():
        head.weight.normal_(0.0, cfg["width"] ** -0.5, generator=_generator(seed, run, 1))
    return nn.Sequential(OrderedDict(body=LNMLP(spec, d_in, seed=seed, run=run), head=head))


def _fit(
    ctx: RunContext,
    cfg: dict,
    build: Callable[[int], dict[str, nn.Module]],
    data: tuple[torch.Tensor, torch.Tensor],
    columns: Sequence[str],
    loss_row: Callable[[str, int, EpochLog, float], dict],
    sort_key: Callable[[dict], tuple],
    prepare: Callable[[Ensemble], None] | None = None,
    **hooks,
) -> list[dict]:
    """Train the ensemble of ``build(run)`` over this rank's runs; the CSV's rows of every rank.

    One CSV unit per epoch (its loss rows and hook rows, every rank's, sorted by ``sort_key``).
    Skips training when every epoch's unit is already in the CSV. Builds and trains under
    :func:`_threads`. The checkpoint ``NAME.ckpt.pt`` resumes an interrupted run; it is removed
    when the reproduction completes.
    """
    table = ctx.table(columns)
    # the checkpoint (and train's fallback PATH.prev) only serves to resume: removed once the JSON is written
    checkpoint = ctx.scratch_path(".ckpt.pt")
    previous = ctx.scratch_path(".ckpt.pt.prev")
    keys = [f"epoch {e}" for e in range(cfg["epochs"] + 1)]
    if agree_min(int(all(table.done(k) for k in keys))):
        return table.rows()
    with _threads(ctx):  # building the models too
        runs = shard_runs(cfg["runs"])
        if not runs:
            raise ValueError(f"{cfg['runs']} run(s) cannot be shared among more ranks; "
                             "use --runs ≥ the world size")
        groups: dict[str, list[nn.Module]] = {}
        for r in runs:
            for name, model in build(r).items():
                groups.setdefault(name, []).append(model)
        ens = Ensemble(groups, run_ids=runs, device=ctx.device)
        del groups  # the ensemble holds stacked copies
        if prepare is not None:
            prepare(ens)
        out: list[dict] = []
        handled = 0

        def flush(logs: list[EpochLog]) -> None:  # a collective under torchrun: all ranks, same logs
            nonlocal handled
            for log in logs[handled:]:
                mine = [loss_row(g, r, log, log.loss[i][j]) for i, g in enumerate(ens.names)
                        for j, r in enumerate(ens.run_ids)] + log.rows
                rows = sorted(gather_rows(mine), key=sort_key)
                out.extend(table.unit(f"epoch {log.epoch}", lambda rows=rows: rows))
            handled = len(logs)

        tcfg = TrainConfig(epochs=cfg["epochs"], batch_size=cfg["batch"], lr=cfg["lr"], seed=ctx.seed)
        result = train(ens, *data, tcfg, on_epoch=flush, checkpoint=checkpoint, tag=cfg,
                       progress=ctx.show_progress, desc=ctx.name, **hooks)
        flush(result.logs)
        if result.resumed_from:
            ctx.note(f"resumed training after epoch {result.resumed_from} from {checkpoint}")
        previous.unlink(missing_ok=True)
        return out


def _fit_ln(
    ctx: RunContext,
    cfg: dict,
    data: tuple[torch.Tensor, torch.Tensor],
    classes: int,
    columns: Sequence[str],
    loss_row: Callable[[str, int, EpochLog, float], dict],
    **hooks,
) -> list[dict]:
    """:func:`_fit` for one LN-MLP classifier (:func:`_ln_classifier`) per activation of
    ``cfg["acts"]``, rows sorted by activation then run; ``columns`` must include ``act``."""
    acts = cfg["acts"]
    order = {a: i for i, a in enumerate(acts)}
    d_in = data[0].shape[1]
    return _fit(ctx, cfg, lambda r: {a: _ln_classifier(a, cfg, d_in, classes, ctx.seed, r) for a in acts},
                data, columns, loss_row, sort_key=lambda r: (order[r["act"]], r["run"]), **hooks)


def _select(rows: list[dict], **match) -> list[dict]:
    return [r for r in rows if all(r[k] == v for k, v in match.items())]


def _beta_colors(betas: dict[str, float]) -> dict[str, tuple]:
    from matplotlib import colormaps

    lo, hi = min(betas.values()), max(betas.values())
    cmap = colormaps["viridis"]
    return {a: cmap(0.9 * (b - lo) / (hi - lo or 1.0)) for a, b in betas.items()}


def _training_config(ctx: RunContext, quick: dict, full: dict) -> dict:
    cfg = dict(quick if ctx.quick else full)
    cfg["dataset"] = "synthetic" if ctx.quick else cfg["dataset"]
    return cfg


# --- Joudaki et al. Fig. 7: SGD training speed against β ------------------------------------------


def _fig7_config(ctx: RunContext) -> dict:
    full = {"acts": FIG7_ACTS, "depth": 10, "width": 1000, "batch": 512, "lr": 0.01, "epochs": 20,
            "runs": ctx.n_runs(default=5, quick=2), "dataset": "cifar10", "train_size": None}
    quick = {**full, "width": 128, "batch": 64, "epochs": 5, "train_size": 2000}
    return _training_config(ctx, quick, full)


def _ln_loss_row(group: str, run: int, log: EpochLog, loss: float) -> dict:
    return {"act": group, "beta": isometry_strength(group), "run": run, "epoch": log.epoch, "loss": loss}


@reproduction(
    "fig7",
    paper=JOUDAKI,
    figure="Fig. 7",
    claim="SGD trains the LayerNorm MLP faster for activations with a larger isometry strength β",
    config=_fig7_config,
)
def _fig7(ctx: RunContext, cfg: dict) -> Outcome:
    data, _, classes = _data(ctx, cfg)
    acts = cfg["acts"]
    rows = _fit_ln(ctx, cfg, data, classes, ["act", "beta", "run", "epoch", "loss"], _ln_loss_row)
    betas = {a: isometry_strength(a) for a in acts}
    curves = {a: run_curves(rows, "loss", "epoch", cfg["epochs"] + 1, act=a) for a in acts}  # NaN: diverged
    final = {a: float(np.mean(_diverged_as_inf(c[:, -1]))) for a, c in curves.items()}
    mean_loss = {a: float(np.mean(_diverged_as_inf(c[:, 1:]))) for a, c in curves.items()}
    held, rho = rule_fig7([betas[a] for a in acts], [final[a] for a in acts])
    _, rho_mean = rule_fig7([betas[a] for a in acts], [mean_loss[a] for a in acts])
    diverged = int(sum(np.isnan(c).any(axis=1).sum() for c in curves.values()))

    fig, (ax,) = new_figure(1, size=(6.0, 4.2))
    colors = _beta_colors(betas)
    for a in sorted(acts, key=betas.get):
        plot_depth_curves(ax, _diverged_as_inf(curves[a]), label=f"{a}, β = {betas[a]:.2f}", color=colors[a],
                          layers=np.arange(cfg["epochs"] + 1), ylabel="training loss", log=False)
    ax.set_xlabel("epoch (0: initialisation)")
    ax.set_title(f"LN-MLP depth {cfg['depth']}, width {cfg['width']}, SGD lr {cfg['lr']:g}, batch {cfg['batch']}; "
                 f"Spearman ρ(β, final loss) = {rho:.2f}", fontsize=8)
    ax.legend(fontsize=7, title="mean and min–max over runs", title_fontsize=7)
    ctx.save_figure(fig)
    return Outcome(
        measured={"beta": betas, "final_loss": final, "mean_loss_over_epochs": mean_loss,
                  "spearman_beta_final_loss": rho, "spearman_beta_mean_loss": rho_mean, "diverged_runs": diverged},
        theory={"statement": "a larger isometry strength β gives faster SGD convergence in shallow LN-MLPs "
                             "(the paper's Fig. 7 observation; no bound is claimed)"},
        held=held,
        rule="Spearman rank correlation between β and the final training loss (mean over runs, a diverged "
             "run counting as +inf) over the activations; held iff ρ < 0",
    )


# --- Joudaki et al. Fig. 2 (right): isometry gaps of every layer after training ----------------------


def _fig2t_config(ctx: RunContext) -> dict:
    full = {"acts": FIG7_ACTS, "depth": 10, "width": 1000, "batch": 512, "lr": 0.01, "epochs": 20,
            "runs": ctx.n_runs(default=5, quick=1), "dataset": "cifar10", "train_size": None,
            "probe_every": 100, "probe_batch": 512, "tolerance": NORM_RISE_TOL}
    # probe batch < width: a centred representation of d features has rank ≤ d − 1
    quick = {**full, "width": 128, "batch": 64, "epochs": 3, "train_size": 2000, "probe_every": 15,
             "probe_batch": 64}
    return _training_config(ctx, quick, full)


@reproduction(
    "fig2-trained",
    paper=JOUDAKI,
    figure="Fig. 2 (right, after training)",
    claim="after SGD training too, layer-norm layers never raise the isometry gap (Corollary 2 holds for "
          "any weights)",
    config=_fig2t_config,
)
def _fig2_trained(ctx: RunContext, cfg: dict) -> Outcome:
    (X, y), _, classes = _data(ctx, cfg)
    acts = cfg["acts"]
    gen = torch.Generator().manual_seed(ctx.seed + 77)
    probe_x = X[torch.randperm(X.shape[0], generator=gen)[: cfg["probe_batch"]]].to(ctx.device)

    def measure(ens: Ensemble, step: int, epoch: int) -> list[dict]:
        rows = []
        for a in ens.names:
            for i, run in enumerate(ens.run_ids):
                body = ens.member(a, i).body
                for r in site_gaps(body, probe_x):
                    rows.append({"act": a, "beta": isometry_strength(a), "run": run, "epoch": epoch, "step": step,
                                 "quantity": "gap", "layer": r["layer"], "site": r["site"], "value": r["gap"],
                                 "theorem1_holds": r["theorem1_holds"]})
        return rows

    def loss_row(group: str, run: int, log: EpochLog, loss: float) -> dict:
        return {"act": group, "beta": isometry_strength(group), "run": run, "epoch": log.epoch, "step": log.step,
                "quantity": "loss", "layer": "", "site": "", "value": loss, "theorem1_holds": ""}

    columns = ["act", "beta", "run", "epoch", "step", "quantity", "layer", "site", "value", "theorem1_holds"]
    rows = _fit_ln(ctx, cfg, (X, y), classes, columns, loss_row, measure=measure, every=cfg["probe_every"])

    gaps = [r for r in rows if r["quantity"] == "gap"]
    steps = sorted({r["step"] for r in gaps})
    sites = site_order(cfg["depth"])
    index = {s: i for i, s in enumerate(sites)}
    runs = sorted({r["run"] for r in gaps})
    # values[act][step] : (runs, sites) gaps of the sites in plotting order
    values = {a: {s: np.full((len(runs), len(sites)), np.nan) for s in steps} for a in acts}
    t1_fail = {"init": 0, "trained": 0}
    for r in gaps:
        key = (int(r["layer"]), r["site"])
        if key in index:
            values[r["act"]][r["step"]][runs.index(r["run"]), index[key]] = float(r["value"])
        if r["site"] == "norm:normalized" and r["theorem1_holds"] == 0:
            t1_fail["init" if r["step"] == 0 else "trained"] += 1
    verdicts = {}
    for phase, chosen in (("init", [0]), ("trained", [s for s in steps if s > 0])):
        before, after = norm_site_gaps(np.stack([values[a][s] for a in acts for s in chosen]), sites)
        ok, rises, worst = rule_norms_never_raise(before, after, cfg["tolerance"])
        verdicts[phase] = {"held": ok and t1_fail[phase] == 0, "norm_sites": int(before.size),
                           "norm_sites_raising_gap": rises, "max_relative_rise": worst,
                           "theorem1_failures": t1_fail[phase]}

    betas = {a: isometry_strength(a) for a in acts}
    colors = _beta_colors(betas)
    fig, axes = new_figure(3, ncols=3, size=(6.0, 4.0))
    last = steps[-1]
    for ax, step, title in ((axes[0], 0, "at initialisation"), (axes[1], last, f"after training (step {last})")):
        for a in sorted(acts, key=betas.get):
            plot_depth_curves(ax, values[a][step], label=f"{a}, β = {betas[a]:.2f}", color=colors[a],
                              layers=np.arange(len(sites)))
        draw_site_axis(ax, sites, fontsize=6)
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=6)
    out_col = index[(cfg["depth"], "norm")]
    for a in sorted(acts, key=betas.get):
        curve = np.stack([values[a][s][:, out_col] for s in steps], axis=1)
        plot_depth_curves(axes[2], curve, label=a, color=colors[a], layers=np.asarray(steps))
    axes[2].set_xlabel("SGD step")
    axes[2].set_title(f"gap of the output x_{cfg['depth']} during training", fontsize=9)
    ctx.save_figure(fig)
    return Outcome(
        measured={"at_initialisation": verdicts["init"], "during_and_after_training": verdicts["trained"],
                  "probe_steps": steps},
        theory={"corollary_2": "projection onto the sphere never lowers isometry, for any weights (trained or not)"},
        held=verdicts["init"]["held"] and verdicts["trained"]["held"],
        rule=(f"at every probed step (Probe every {cfg['probe_every']} SGD steps on a fixed batch of "
              f"{cfg['probe_batch']} training images, step 0 = initialisation): no layer norm raises the gap of its "
              f"input by more than {cfg['tolerance']:g} (relative), and Theorem 1 holds at every norm site "
              "(the Probe's check)"),
    )


# --- Meterez et al. Fig. 4: depth-independent training with orthogonal weights --------------------


def _m4_config(ctx: RunContext) -> dict:
    full = {"depths": [10, 50, 100, 200], "weights": ["orthogonal", "gaussian"], "activation": "identity",
            "norm": "rms", "width": 100, "batch": 100, "lr": 0.01, "epochs": 10,
            "runs": ctx.n_runs(default=3, quick=2), "dataset": "cifar10", "train_size": None, "test_size": 10000,
            "max_spread": 0.05}
    quick = {**full, "depths": [4, 16, 64], "width": 32, "batch": 64, "epochs": 3, "train_size": 2000,
             "test_size": 500}
    return _training_config(ctx, quick, full)


def _bn_group(weights: str, depth: int) -> str:
    return f"{weights}, L = {depth}"


@reproduction(
    "meterez-fig4",
    paper=METEREZ,
    figure="Fig. 4",
    claim="with orthogonal weights and batch norm, SGD reaches a test accuracy that does not depend on depth",
    config=_m4_config,
)
def _meterez_fig4(ctx: RunContext, cfg: dict) -> Outcome:
    train_xy, (Xt, yt), classes = _data(ctx, cfg, n_test=cfg["test_size"])
    Xt, yt = Xt.to(ctx.device), yt.to(ctx.device)
    combos = [(w, L) for w in cfg["weights"] for L in cfg["depths"]]
    group = {_bn_group(w, L): (w, L) for w, L in combos}
    order = {g: i for i, g in enumerate(group)}
    d_in = train_xy[0].shape[1]

    def build(run: int) -> dict[str, nn.Module]:
        return {_bn_group(w, L): BNMLP(d_in, cfg["width"], L, classes, weights=w, norm=cfg["norm"],
                                       activation=cfg["activation"], generator=_generator(ctx.seed, run, 1000 + L))
                for w, L in combos}

    def evaluate(ens: Ensemble, step: int, epoch: int) -> list[dict]:
        """Test accuracy in minibatches of the training batch size (batch norm uses batch statistics)."""
        B = cfg["batch"]
        hits = {g: torch.zeros(ens.runs, device=Xt.device) for g in ens.names}
        finite = {g: torch.ones(ens.runs, dtype=torch.bool, device=Xt.device) for g in ens.names}
        nb = Xt.shape[0] // B
        with torch.no_grad():
            for b in range(nb):
                xb, yb = Xt[b * B : (b + 1) * B], yt[b * B : (b + 1) * B]
                for g, logits in ens(xb, shared=True).items():
                    hits[g] += (logits.argmax(-1) == yb).float().mean(-1)
                    finite[g] &= torch.isfinite(logits).flatten(1).all(-1)
        rows = []
        for g in ens.names:
            w, L = group[g]
            acc = torch.where(finite[g], hits[g] / nb, torch.nan).tolist()
            rows += [{"weights": w, "depth": L, "run": run, "epoch": epoch, "quantity": "test_accuracy",
                      "value": a} for run, a in zip(ens.run_ids, acc)]
        return rows

    def loss_row(name: str, run: int, log: EpochLog, loss: float) -> dict:
        w, L = group[name]
        return {"weights": w, "depth": L, "run": run, "epoch": log.epoch, "quantity": "train_loss", "value": loss}

    rows = _fit(ctx, cfg, build, train_xy, ["weights", "depth", "run", "epoch", "quantity", "value"], loss_row,
                sort_key=lambda r: (order[_bn_group(r["weights"], r["depth"])], r["run"]), evaluate=evaluate)

    E = cfg["epochs"]
    acc = {(w, L): run_curves(rows, "value", "epoch", E + 1, weights=w, depth=L, quantity="test_accuracy")
           for w, L in combos}
    final = {w: {L: float(np.mean(acc[w, L][:, -1])) for L in cfg["depths"]} for w in cfg["weights"]}
    diverged = {w: int(sum(np.isnan(acc[w, L][:, -1]).sum() for L in cfg["depths"])) for w in cfg["weights"]}
    chance = 1.0 / classes
    held, spread = rule_depth_independent(final["orthogonal"], chance, cfg["max_spread"])
    spreads = {w: float(np.nanmax(list(final[w].values())) - np.nanmin(list(final[w].values())))
               if not all(math.isnan(v) for v in final[w].values()) else math.nan for w in cfg["weights"]}

    fig, axes = new_figure(len(cfg["weights"]) + 1)
    for ax, w in zip(axes, cfg["weights"]):
        for L in cfg["depths"]:
            plot_depth_curves(ax, acc[w, L], label=f"L = {L}", layers=np.arange(E + 1), ylabel="test accuracy",
                              log=False)
        ax.set_xlabel("epoch")
        ax.set_title(f"{w} weights, BN without mean reduction, width {cfg['width']}", fontsize=8)
        ax.legend(fontsize=7)
    ax = axes[-1]
    for w in cfg["weights"]:
        ax.plot(cfg["depths"], [final[w][L] for L in cfg["depths"]], "o-", label=w)
    ax.axhline(chance, color="grey", ls=":", label="chance")
    log_axes_with_ticks(ax, cfg["depths"])
    ax.set_yscale("linear")
    ax.set_xlabel("depth L")
    ax.set_ylabel(f"test accuracy after {E} epochs")
    ax.legend(fontsize=7)
    ctx.save_figure(fig)
    return Outcome(
        measured={"final_test_accuracy": final, "spread_over_depths": spreads, "diverged_runs": diverged,
                  "chance": chance},
        theory={"statement": "orthogonal weights with batch norm avoid rank collapse (Theorem 1) and gradient "
                             "explosion (Theorem 5) at any depth, so SGD converges at a depth-independent rate; "
                             "Gaussian weights explode (shown for comparison, not judged)"},
        held=held,
        rule=(f"orthogonal weights: the final test accuracy (mean over runs) varies by at most "
              f"{cfg['max_spread']:g} (absolute) across depths {cfg['depths']}, and every depth reaches at least "
              "twice chance"),
    )


# --- Meterez et al. Fig. 6: middle layers stay near-orthogonal during training ---------------------


def _m6_config(ctx: RunContext) -> dict:
    full = {"depth": 100, "series": [["linear", "identity", 0.0], ["tanh, k = 0.4", "tanh", 0.4]], "norm": "rms",
            "width": 100, "batch": 100, "lr": 0.01, "epochs": 10, "runs": ctx.n_runs(default=3, quick=2),
            "dataset": "cifar10", "train_size": None, "record_every": 50,
            "middle": "layers L/3 ≤ ℓ ≤ 2L/3", "max_defect": 0.1, "min_move_ratio": 0.5, "max_loss_ratio": 0.5}
    quick = {**full, "depth": 30, "width": 32, "batch": 64, "epochs": 3, "train_size": 2000, "record_every": 5}
    return _training_config(ctx, quick, full)


def _weight_gram(W: torch.Tensor) -> torch.Tensor:
    """``WᵀW`` or ``WWᵀ``, whichever is the smaller (the one that is ``I`` for a (semi-)orthogonal ``W``)."""
    return W.mT @ W if W.shape[-2] >= W.shape[-1] else W @ W.mT


@reproduction(
    "meterez-fig6",
    paper=METEREZ,
    figure="Fig. 6 (App. F)",
    claim="during SGD the middle layers' weights of a deep orthogonal batch-norm MLP stay near-orthogonal, "
          "although their gradients are not negligible",
    config=_m6_config,
)
def _meterez_fig6(ctx: RunContext, cfg: dict) -> Outcome:
    (X, y), _, classes = _data(ctx, cfg)
    from matplotlib import colormaps

    L, series = cfg["depth"], [tuple(s) for s in cfg["series"]]
    order = {name: i for i, (name, _, _) in enumerate(series)}
    names = [f"blocks.{ell}.fc.weight" for ell in range(L)]
    start: dict[str, dict[str, torch.Tensor]] = {}

    def build(run: int) -> dict[str, nn.Module]:
        return {name: BNMLP(X.shape[1], cfg["width"], L, classes, norm=cfg["norm"], activation=act,
                            gain_exponent=k, generator=_generator(ctx.seed, run, 6000))
                for name, act, k in series}

    def prepare(ens: Ensemble) -> None:  # W_0, taken before a checkpoint is loaded
        for g in ens.names:
            start[g] = {n: ens.params[g][n].detach().clone() for n in names}

    def measure(ens: Ensemble, step: int, epoch: int) -> list[dict]:
        rows = []
        with torch.no_grad():
            for g in ens.names:
                for ell, n in enumerate(names, 1):
                    W = ens.params[g][n].detach()
                    G = _weight_gram(W.double())
                    eye = torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
                    q = {"wtw_minus_i": torch.linalg.matrix_norm(G - eye),
                         "weight_move": torch.linalg.matrix_norm(W - start[g][n]),
                         "weight_norm": torch.linalg.matrix_norm(start[g][n]),
                         "isometry_gap_wtw": isometry_gap(G)}
                    if ens.params[g][n].grad is not None:
                        q["grad_norm"] = torch.linalg.matrix_norm(ens.params[g][n].grad)
                    for quantity, v in q.items():
                        rows += [{"series": g, "run": run, "epoch": epoch, "step": step, "layer": ell,
                                  "quantity": quantity, "value": float(x)} for run, x in zip(ens.run_ids, v.tolist())]
        return rows

    def loss_row(group: str, run: int, log: EpochLog, loss: float) -> dict:
        return {"series": group, "run": run, "epoch": log.epoch, "step": log.step, "layer": "",
                "quantity": "train_loss", "value": loss}

    rows = _fit(ctx, cfg, build, (X, y), ["series", "run", "epoch", "step", "layer", "quantity", "value"],
                loss_row, sort_key=lambda r: (order[r["series"]], r["run"]), prepare=prepare,
                measure=measure, every=cfg["record_every"])

    steps = sorted({r["step"] for r in rows if r["quantity"] == "wtw_minus_i"})
    mid = [ell for ell in range(1, L + 1) if L / 3 <= ell <= 2 * L / 3]
    hidden = list(range(2, L + 1))  # square hidden-to-hidden weights (layer 1 maps the input)
    fig, axes = new_figure(2 * len(series), ncols=2)
    measured, verdicts = {}, {}
    for k, (name, _, _) in enumerate(series):
        def arr(quantity: str, layers: Sequence[int], name: str = name) -> np.ndarray:
            """(runs, layers, steps) values of one quantity."""
            sel = _select(rows, series=name, quantity=quantity)
            runs = sorted({r["run"] for r in sel})
            a = np.full((len(runs), len(layers), len(steps)), np.nan)
            li, si = {ell: i for i, ell in enumerate(layers)}, {s: i for i, s in enumerate(steps)}
            for r in sel:
                if int(r["layer"]) in li and r["step"] in si:
                    a[runs.index(r["run"]), li[int(r["layer"])], si[r["step"]]] = float(r["value"])
            return a

        layers = list(range(1, L + 1))
        ref = arr("weight_norm", layers)  # ‖W_0‖_F = sqrt(min(d_out, d_in)) = ‖I‖_F for orthogonal W_0
        defect = arr("wtw_minus_i", layers) / ref
        move = arr("weight_move", layers) / ref
        grads = arr("grad_norm", layers)
        mid_i = [layers.index(ell) for ell in mid]
        hid_i = [layers.index(ell) for ell in hidden]
        mid_defect = float(np.max(defect[:, mid_i]))
        mid_move = float(np.mean(move[:, mid_i, -1]))
        all_move = float(np.mean(move[:, hid_i, -1]))
        loss = run_curves(rows, "value", "epoch", cfg["epochs"] + 1, series=name, quantity="train_loss")
        loss_ratio = float(np.mean(loss[:, -1]) / np.mean(loss[:, 0]))
        ok = rule_near_orthogonal(mid_defect, mid_move, all_move, loss_ratio, cfg["max_defect"],
                                  cfg["min_move_ratio"], cfg["max_loss_ratio"])
        with np.errstate(divide="ignore", invalid="ignore"):
            tangent = float(np.nanmean(defect[:, mid_i, -1] / move[:, mid_i, -1]))
        measured[name] = {"middle_max_relative_defect": mid_defect, "middle_relative_move": mid_move,
                          "hidden_relative_move": all_move, "loss_final_over_initial": loss_ratio,
                          "middle_defect_over_move": tangent,
                          "middle_mean_grad_norm": float(np.nanmean(grads[:, mid_i])),
                          "hidden_mean_grad_norm": float(np.nanmean(grads[:, hid_i]))}
        verdicts[name] = ok
        cmap = colormaps["viridis"]
        panels = ((axes[2 * k], defect, steps, "‖WᵀW − I‖_F / ‖I‖_F", False),
                  (axes[2 * k + 1], grads[..., 1:], steps[1:], "‖∇_W L‖_F", True))  # no gradient at step 0
        for ax, values, xs, label, log in panels:
            for ell in layers:
                is_mid = ell in mid
                ax.plot(xs, values[:, ell - 1].mean(axis=0), color=cmap(0.9 * (ell - 1) / max(L - 1, 1)),
                        lw=1.4 if is_mid else 0.6, alpha=1.0 if is_mid else 0.5)
            ax.set_yscale("log" if log else "linear")
            ax.set_xlabel("SGD step")
            ax.set_ylabel(label)
            ax.set_title(f"{name}: layers 1 (purple) … {L} (yellow); middle thick", fontsize=8)
        axes[2 * k].axhline(cfg["max_defect"], color="grey", ls=":", lw=1)
    ctx.save_figure(fig)
    return Outcome(
        measured={**measured, "middle_layers": mid},
        theory={"statement": "no theorem: an empirical implicit bias of SGD towards orthogonal weights "
                             "(Meterez et al. §4, App. F)",
                "isotropic_reference": "an update of relative size ε in a random direction raises the relative "
                                       "defect by about √2·ε; updates tangent to the orthogonal group by O(ε²) "
                                       "(compare middle_defect_over_move)"},
        held=all(verdicts.values()),
        rule=(f"per series, middle layers ({cfg['middle']}): max over recorded steps and runs of "
              f"‖WᵀW − I‖_F/‖I‖_F ≤ {cfg['max_defect']:g}; their mean relative move ‖W_T − W_0‖_F/‖W_0‖_F ≥ "
              f"{cfg['min_move_ratio']:g} × that of all hidden layers; final/initial training loss ≤ "
              f"{cfg['max_loss_ratio']:g}"),
    )
