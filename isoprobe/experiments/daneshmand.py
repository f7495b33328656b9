"""Daneshmand, Joudaki & Bach (NeurIPS 2021), *Batch normalization orthogonalizes representations*.

The chain ``H_{ℓ+1} = BN(W_ℓ H_ℓ)`` with Gaussian ``W_ℓ`` (entries ``N(0, 1/d)``, the paper's
``1/sqrt(d)`` scaling) and batch norm dividing each feature by its RMS over the batch
(:class:`isoprobe.nets.BNMLP` with ``weights="gaussian"``, ``norm="rms"``), against the same
chain without normalisation (``norm="none"``). Their result: the expected orthogonality gap
(``‖G/tr G − I/n‖_F``) is ``O((1 − α)^ℓ + n / (α sqrt(d)))``, so with BN it falls to a floor that shrinks
with the width like ``d^(-1/2)``; without BN it stays ``Θ(1)`` (the representations align).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import numpy as np
import torch

from isoprobe.experiments.base import Env, Options, Reproduction, Unit, Verdict, register
from isoprobe.experiments.common import (
    DANESHMAND,
    fit_slope,
    log_axes_with_ticks,
    new_figure,
    plot_depth_curves,
    run_curves,
    run_generator,
    single_thread,
)
from isoprobe.metrics import gram, orthogonality_gap
from isoprobe.nets.bn_mlp import BNMLP

__all__ = ["rule_daneshmand"]

F64 = torch.float64


def rule_daneshmand(
    widths: Sequence[int],
    bn_floor: Sequence[float],
    no_bn_final: Sequence[float],
    n: int,
    max_slope: float = -0.25,
    min_fraction: float = 0.5,
) -> bool:
    """Holds iff the BN floor falls with width (log-log slope ≤ ``max_slope``; theory −1/2) and,
    at every width, the gap without BN stays of order one: at least ``min_fraction`` of the
    largest possible gap ``sqrt(1 − 1/n)`` (all samples parallel) and above the BN floor."""
    w, f, g = (np.asarray(a, dtype=np.float64) for a in (widths, bn_floor, no_bn_final))
    if not (len(w) == len(f) == len(g) >= 2) or not (np.isfinite(f).all() and np.isfinite(g).all()):
        return False
    if (f <= 0).any():
        return False
    slope = fit_slope(np.log(w), np.log(f))
    order_one = (g >= min_fraction * math.sqrt(1 - 1 / n)) & (g > f)
    return bool(slope <= max_slope and order_one.all())


def _config(opt: Options) -> dict:
    return {
        "widths": [16, 32, 64, 128, 256] if opt.quick else [32, 64, 128, 256, 512, 1024],
        "batch": 4,
        "depth": 60 if opt.quick else 100,
        "runs": opt.n_runs(default=10, quick=4),
        "input": "x_i = z_0 + 0.5 z_i, z Gaussian in R^d: samples with cosine ≈ 0.8",
        "floor": "mean gap over the last half of the layers, then over runs",
    }


def _rows(cfg: dict, device: torch.device, bn: bool, width: int) -> list[dict]:
    """Rows (bn, width, run, layer, orth_gap) of one chain, all runs."""
    L, n, rows = cfg["depth"], cfg["batch"], []
    for run in range(cfg["runs"]):
        gen = run_generator(cfg["seed"], run, salt=width)
        z = torch.randn(n + 1, width, dtype=F64, generator=gen)
        x = z[:1] + 0.5 * z[1:]
        with single_thread(), torch.no_grad():
            net = BNMLP(
                width, width, L, d_out=2, weights="gaussian", norm="rms" if bn else "none", generator=gen, dtype=F64
            ).to(device)
            grams = torch.stack([gram(h) for h in net.hidden(x.to(device))])
        gaps = orthogonality_gap(grams).cpu().tolist()
        rows += [dict(bn=int(bn), width=width, run=run, layer=ell, orth_gap=g) for ell, g in enumerate(gaps)]
    return rows


def _units(cfg: dict, env: Env) -> list[Unit]:
    return [
        (f"bn={int(bn)} width={w}", partial(_rows, cfg, env.device, bn, w))
        for bn in (True, False)
        for w in cfg["widths"]
    ]


def _numbers(rows: list[dict], cfg: dict) -> tuple[dict, list[float], list[float]]:
    """Curves per (bn, width), the BN floor and the no-BN last-layer gap per width."""
    L = cfg["depth"]
    curves = {
        (bn, w): run_curves(rows, "orth_gap", length=L + 1, bn=int(bn), width=w)
        for bn in (True, False)
        for w in cfg["widths"]
    }
    floor = [float(curves[(True, w)][:, L // 2 + 1 :].mean()) for w in cfg["widths"]]
    final = [float(curves[(False, w)][:, -1].mean()) for w in cfg["widths"]]
    return curves, floor, final


def _verdict(rows: list[dict], cfg: dict) -> Verdict:
    curves, floor, final = _numbers(rows, cfg)
    widths, n = cfg["widths"], cfg["batch"]
    held = rule_daneshmand(widths, floor, final, n)
    return Verdict(
        "held" if held else "not held",
        reason=""
        if held
        else "the BN floor does not fall with width as d^-1/2 does (slope > -0.25), or a no-BN gap is not of order one",
        rule="held iff the log-log slope of the BN floor (mean gap over the last half of the layers) against "
        "width is ≤ −0.25 and, at every width, the last-layer gap without BN is ≥ 0.5·sqrt(1 − 1/n) and "
        "above the BN floor",
        measured={
            "bn_floor": dict(zip(map(str, widths), floor)),
            "loglog_slope_floor_vs_width": fit_slope(np.log(widths), np.log(floor)),
            "no_bn_last_layer_gap": dict(zip(map(str, widths), final)),
            "input_gap": float(np.mean([curves[(True, w)][:, 0].mean() for w in widths])),
        },
        theory={
            "bn": "E gap(H_ℓ) = O((1 − α)^ℓ + n / (α sqrt(d))): floor ∝ d^(-1/2), log-log slope −0.5 "
            "(an upper bound; α is the smallest singular value along the chain)",
            "no_bn": f"Θ(1); all samples aligned gives the largest gap sqrt(1 − 1/n) = {math.sqrt(1 - 1 / n):.4f}",
        },
    )


def _draw(rows: list[dict], cfg: dict):
    curves, floor, final = _numbers(rows, cfg)
    widths, n = cfg["widths"], cfg["batch"]
    fig, (ax, ax2) = new_figure(2)
    for w in widths:
        plot_depth_curves(ax, curves[(True, w)], label=f"BN, d = {w}", ylabel="orthogonality gap")
    for w in (widths[0], widths[-1]):
        plot_depth_curves(ax, curves[(False, w)], label=f"no BN, d = {w}", ylabel="orthogonality gap")
    ax.legend(fontsize=6, ncol=2)
    ax.set_title(f"Gaussian linear chain, batch n = {n}", fontsize=10)
    ws = np.asarray(widths, dtype=np.float64)
    ax2.plot(ws, floor, "o-", label=f"BN floor (slope {fit_slope(np.log(ws), np.log(floor)):.2f})")
    ax2.plot(ws, floor[0] * (ws / ws[0]) ** -0.5, "k--", label="∝ d^-1/2 (theory)")
    ax2.plot(ws, final, "s-", label="no BN, last layer")
    ax2.axhline(math.sqrt(1 - 1 / n), color="gray", ls=":", label="max gap sqrt(1 − 1/n)")
    log_axes_with_ticks(ax2, widths)
    ax2.set_xlabel("width d"), ax2.set_ylabel("orthogonality gap")
    ax2.legend(fontsize=7)
    return fig


register(
    Reproduction(
        "daneshmand-orth",
        paper=DANESHMAND,
        figure="Figs. 1–2",
        claim="with batch norm the orthogonality gap of a Gaussian linear chain falls to a floor that shrinks "
        "with width; without batch norm it stays of order one",
        columns=("bn", "width", "run", "layer", "orth_gap"),
        config=_config,
        units=_units,
        verdict=_verdict,
        draw=_draw,
    )
)
