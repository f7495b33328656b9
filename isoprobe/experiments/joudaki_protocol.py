"""Joudaki, Daneshmand & Bach (2023): the authors' notebook protocol (``isoprobe repro NAME --protocol paper``).

The paper's text gives the networks (n = 10 items, width d = 1000, depth 30) but not the inputs or
how the plotted curves were aggregated. The authors' public notebook (``validations.ipynb``) does,
restated here in isoprobe's terms:

* **inputs** ``X ∈ R^{n×d}`` with iid ``N(0, 1)`` entries whose top singular value is multiplied by a
  *degeneracy* factor κ (5, 10 or 100 per figure), then rescaled to ``mean(X²) = 1``
  (:func:`degenerate_gaussian`); the curve starts (ℓ = 0) at this matrix's gap. The rows are then
  rescaled to unit RMS (not centred) before the first layer;
* **layers**: ``a = σ(x W)`` with ``W`` iid ``N(0, α²/d)`` (activation first), or ``a = σ(x) W``
  (the notebook's "norm then activation"); then centering (layer: ``a − mean(a)``; mean-field:
  ``a − ĉ₀``) and normalisation (layer: ``a / rms(a)``; mean-field: ``a / sqrt(ĉ₂ − ĉ₀²)``), where
  ``ĉ₀ = E σ(z)`` and ``ĉ₂ = E σ(z)²`` are Monte Carlo means over 2·10⁶ float32 samples
  (:func:`monte_carlo_stats`);
* **records**: two per layer, the Gram before the centering ("pre_norm") and after the
  normalisation ("post_norm"), gap ``−log I(XXᵀ) = log mean λ − mean log λ`` (Joudaki et al. 2023,
  Definition 1) from float32 eigenvalues; everything is float32 (torch's default), and a run whose
  Gram leaves the float range stops recording (the notebook's ``try/except``);
* **plot**: seaborn's mean over every row of a depth — pre- and post-norm rows of all runs
  pooled — with a 95 % bootstrap band, on a log axis (:func:`pooled_curve`).

Two shortcuts, exact in distribution: ``x W`` is sampled as ``F Z`` with ``F Fᵀ = α² x xᵀ / d`` and
``Z`` an ``n × d`` Gaussian (the pre-activations' rows are jointly Gaussian with that covariance), so a
layer costs ``n·d`` random numbers instead of ``d²``; and all variants of one run share its input
(the notebook draws a fresh input per configuration), which pairs the comparisons.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from isoprobe.activations import get_activation

__all__ = [
    "MC_SAMPLES",
    "SETUPS",
    "MCStats",
    "PaperSetup",
    "PaperVariant",
    "degenerate_gaussian",
    "monte_carlo_stats",
    "notebook_activation",
    "notebook_gap",
    "notebook_rows",
    "notebook_run",
    "pooled_curve",
]

#: the notebook's Monte Carlo sample count for ĉ₀, ĉ₁ and ĉ₂
MC_SAMPLES = 2_000_000
_DTYPE = torch.float32  # the notebook never leaves torch's default dtype
_BOOT = 1000  # seaborn's default bootstrap resamples for its 95 % band


@dataclass(frozen=True)
class PaperVariant:
    """One network of the notebook: ``centering``/``normalization`` in ``"layer"``, ``"MF"``,
    ``"None"`` (the notebook's names), the order, and the legend label of the published figure."""

    key: str
    label: str
    centering: str
    normalization: str
    activation_first: bool = True


@dataclass(frozen=True)
class PaperSetup:
    """One figure's notebook configuration; ``variants`` are keyed like isoprobe's own variants,
    ``published`` names the ones the published PDF draws, in its colour order (blue, orange, …)."""

    acts: tuple[str, ...]
    widths: tuple[int, ...]
    degeneracy: float
    variants: tuple[PaperVariant, ...]
    published: tuple[str, ...]
    runs: int = 10
    n: int = 10
    depth: int = 30
    gain: float = 1.0
    pdf: str = ""


_LN = ("layer", "layer")
_FIG4 = (PaperVariant("layer", "layer", *_LN), PaperVariant("mean-field", "MF", "MF", "layer"))
_PROJ = (PaperVariant("none", "None", "MF", "None"), PaperVariant("layer", "layer", "MF", "layer"),
         PaperVariant("mean-field", "MF", "MF", "MF"))
_FIG8A = (PaperVariant("LN", "layer norm", *_LN), PaperVariant("offset-scale", "offset and scale", "MF", "MF"),
          PaperVariant("centering-only", "layer centering, no normalisation", "layer", "None"))
_FIG8B = (PaperVariant("act-norm", "LN(σ(Wx))", *_LN, activation_first=True),
          PaperVariant("norm-act", "σ(LN(Wx))", *_LN, activation_first=False))

#: the notebook's configuration of each figure (cells "Centering and Hermit expansion",
#: "Normalization and Hermit expansion", "Isometry vs. order", the self-normalising cell and
#: "Normalization's role in stabilizing mean-field accuracy")
SETUPS: dict[str, PaperSetup] = {
    "fig4": PaperSetup(("relu", "tanh", "sigmoid", "exp"), (1000,), 100, _FIG4, ("layer", "mean-field"),
                       pdf="plots/layer_vs_meanfield_centering.pdf"),
    "fig5": PaperSetup(("relu", "tanh", "sigmoid", "exp"), (1000,), 10, _PROJ[:2], ("none", "layer"),
                       pdf="plots/with_without_projection.pdf"),
    "fig6": PaperSetup(("relu", "tanh", "sigmoid", "exp"), (1000,), 10, _PROJ[1:], ("layer", "mean-field"),
                       pdf="plots/layer_vs_meanfield_projection.pdf"),
    "fig8a": PaperSetup(("relu", "tanh", "selu"), (1000,), 5, _FIG8A, ("centering-only",), runs=30,
                        pdf="plots/self_normalize.pdf"),
    "fig8b": PaperSetup(("relu",), (1000,), 100, _FIG8B, ("act-norm", "norm-act"),
                        pdf="plots/activation_first_order.pdf"),
    "fig9": PaperSetup(("relu",), (100, 500, 1000), 10, (_PROJ[2], _PROJ[1]), ("mean-field", "layer"),
                       pdf="plots/mf_vs_finite.pdf"),
}


def degenerate_gaussian(n: int, d: int, degeneracy: float, generator: torch.Generator) -> torch.Tensor:
    """``n × d`` float32 inputs: ``Z = U S Vᵀ`` iid ``N(0, 1)``, ``s₁ ← κ s₁``, rescaled so ``mean(X²) = 1``.

    With κ > 1 one direction dominates every item, so the input Gram is far from isometric.
    """
    if n < 1 or d < 1 or not degeneracy > 0:
        raise ValueError(f"need n, d >= 1 and degeneracy > 0, got n={n}, d={d}, degeneracy={degeneracy}")
    Z = torch.randn(n, d, generator=generator, dtype=_DTYPE)
    U, S, Vh = torch.linalg.svd(Z, full_matrices=False)
    S = torch.cat([S[:1] * degeneracy, S[1:]])
    X = (U * S) @ Vh
    return X / X.square().mean().sqrt()


def notebook_activation(act: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The notebook's ``σ``: torch's own functions; its ``exp`` is ``eˣ`` (isoprobe's registry has
    ``exp(x − 2)``, the same β but a different scale, which matters where nothing normalises)."""
    return torch.exp if act == "exp" else get_activation(act).fn


@dataclass(frozen=True)
class MCStats:
    """Monte Carlo ``ĉ₀ = mean σ(z)``, ``ĉ₁ = mean z σ(z)``, ``ĉ₂ = mean σ(z)²`` and
    ``β̂ = 2 − ĉ₁² / (ĉ₂ − ĉ₀²)`` (Definition 3 with sample means)."""

    c0: float
    c1: float
    c2: float

    @property
    def var(self) -> float:
        return self.c2 - self.c0**2

    @property
    def beta(self) -> float:
        return 2 - self.c1**2 / self.var


def monte_carlo_stats(act: str, generator: torch.Generator, samples: int = MC_SAMPLES) -> MCStats:
    """The notebook's activation constants: float32 sample means over ``samples`` draws of ``N(0, 1)``."""
    z = torch.randn(samples, generator=generator, dtype=_DTYPE)
    f = notebook_activation(act)(z)
    return MCStats(f.mean().item(), (f * z).mean().item(), f.square().mean().item())


def notebook_gap(X: torch.Tensor) -> float:
    """``log mean λ − mean log λ`` of ``X Xᵀ`` from eigenvalues in ``X``'s dtype, as the notebook does.

    NaN where an eigenvalue is ≤ 0 (the notebook's log of it); raises ``torch.linalg.LinAlgError``
    where the Gram is not finite (the notebook's run then stops).
    """
    lam = torch.linalg.eigvalsh(X @ X.mT).to(torch.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        gap = float(lam.mean().log() - lam.log().mean())
    return gap if math.isfinite(gap) else math.nan


def _preactivation(x: torch.Tensor, gain: float, generator: torch.Generator) -> torch.Tensor:
    """A draw of ``x W`` for ``W`` iid ``N(0, gain²/d)``: ``F Z`` with ``F Fᵀ = gain² x xᵀ / d``."""
    n, d = x.shape
    G = x.to(torch.float64) @ x.to(torch.float64).mT * (gain * gain / d)
    if not bool(torch.isfinite(G).all()):
        raise torch.linalg.LinAlgError("non-finite representation")
    lam, U = torch.linalg.eigh(G)
    Z = torch.randn(n, d, generator=generator, dtype=x.dtype)
    return (U * lam.clamp_min(0).sqrt()).to(x.dtype) @ Z


def _norm(a: torch.Tensor, v: PaperVariant, st: MCStats) -> torch.Tensor:
    if v.centering == "layer":
        a = a - a.mean(-1, keepdim=True)
    elif v.centering == "MF":
        a = a - st.c0
    if v.normalization == "layer":
        a = a / a.square().mean(-1, keepdim=True).sqrt()
    elif v.normalization == "MF":
        a = a / math.sqrt(st.var)
    return a


def notebook_run(
    X0: torch.Tensor, act: str, variant: PaperVariant, stats: MCStats, depth: int, gain: float,
    generator: torch.Generator,
) -> list[tuple[int, str, float]]:
    """``(layer, point, gap)`` records of one network, ``point`` in ``input``/``pre_norm``/``post_norm``.

    Stops at the first non-finite Gram (fewer than ``2·depth + 1`` records then).
    """
    sigma = notebook_activation(act)
    out = [(0, "input", notebook_gap(X0))]
    x = X0 / X0.square().mean(-1, keepdim=True).sqrt()
    try:
        for ell in range(1, depth + 1):
            if variant.activation_first:
                a = sigma(_preactivation(x, gain, generator))
            else:
                a = _preactivation(sigma(x), gain, generator)
            out.append((ell, "pre_norm", notebook_gap(a)))
            x = _norm(a, variant, stats)
            out.append((ell, "post_norm", notebook_gap(x)))
    except torch.linalg.LinAlgError:
        pass
    return out


def notebook_rows(records: Sequence[tuple[int, str, float]], depth: int, **series) -> list[dict]:
    """One row per layer ``0..depth`` of one run's :func:`notebook_run` records.

    ``gap_pre``/``gap_post`` are the two records (layer 0: the input's gap in ``gap_post``; ``""``
    where the run recorded nothing). ``gap`` is the run's plotted value, the mean of the layer's
    records — what the notebook's pooled mean gives a single run — and ``+inf`` where a record is
    missing or not finite (the representation collapsed or left the float range), as isoprobe's own
    protocol counts a collapse.
    """
    got = {(ell, point): g for ell, point, g in records}
    rows = []
    for ell in range(depth + 1):
        pre = "" if ell == 0 else got.get((ell, "pre_norm"), "")
        post = got.get((ell, "input" if ell == 0 else "post_norm"), "")
        vals = [post] if ell == 0 else [pre, post]
        ok = all(v != "" and math.isfinite(v) for v in vals)
        rows.append({**series, "layer": ell, "gap": float(np.mean(vals)) if ok else math.inf,
                     "gap_pre": pre, "gap_post": post})
    return rows


def pooled_curve(rows: Sequence[dict], depth: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(mean, lo, hi)`` per layer as the published plots draw them: the mean of every finite record
    of the layer (pre- and post-norm of all runs pooled) and a 95 % percentile bootstrap band over
    those records; NaN where no record is finite (the published curve ends there)."""
    rng = np.random.default_rng(seed)
    mean, lo, hi = (np.full(depth + 1, np.nan) for _ in range(3))
    for ell in range(depth + 1):
        v = np.array([float(r[k]) for r in rows if int(r["layer"]) == ell for k in ("gap_pre", "gap_post")
                      if r[k] != ""], dtype=np.float64).reshape(-1)
        v = v[np.isfinite(v)]
        if v.size:
            boot = rng.choice(v, size=(_BOOT, v.size)).mean(axis=1)
            mean[ell], (lo[ell], hi[ell]) = v.mean(), np.percentile(boot, [2.5, 97.5])
    return mean, lo, hi
