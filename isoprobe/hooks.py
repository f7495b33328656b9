"""The Probe: isometry of a live model's representations, measured by forward hooks.

    with Probe(model, sites=None, view="auto", every=1) as probe:
        model(**batch)
    probe.records      # list[Record] in forward order
    probe.summary()    # a Summary: print() it for the table, iterate for one dict per (site, call, point)
    probe["transformer.h.3.ln_1:pre"]   # the records of one site and point (a glob)

**Long runs.** ``Probe(model, sink="records.jsonl")`` streams every record to a JSON-lines (or
``.csv``) file as it is made and keeps in memory only a running summary per (site, call, point)
(:class:`isoprobe.records.RunningSummary`: count, Welford mean and std), so memory stays flat
however many steps are probed; ``probe.summary()`` then gives those running summaries and
:func:`isoprobe.records.read_records` reads the file back. Without a sink, ``pop_records()`` in
the loop hands the new records over and keeps the Probe's own list empty.

**Training steps.** Every record carries the ``step`` of its forward and the model's ``mode``
(``"train"``/``"eval"``). By default ``step`` is the number of training-mode forwards before
this one, and ``every`` counts those: training forwards ``0, every, 2·every, ...`` are recorded.
An eval-mode forward *after* the first training-mode one neither counts nor is recorded, unless
``probe_eval=True``: then every such forward is recorded at the current step (the training steps
done so far) with ``mode="eval"``, so evaluation between training steps neither shifts the
steps nor is probed by accident. A model only ever run in eval mode (inference) counts each
forward as a step, so ``every`` samples its forwards; its first training-mode forward then
starts the count again at step 0 (eval forwards before it, e.g. an evaluation at
initialisation, keep their own steps and ``mode="eval"``). ``step=`` a function (e.g.
``lambda: trainer.state.global_step``: :class:`isoprobe.integrations.ProbeCallback` does this)
replaces the count: ``every`` then applies to its value and every training forward of a
recorded step is recorded (with gradient accumulation, several per step); ``probe.step = k``
resumes the default count at ``k``. :func:`isoprobe.records.plot_steps` draws the gap against
the step.

**Tokens per Gram.** ``Probe(model, window=N)``: token Grams over consecutive windows of at
most ``N`` real tokens of each sequence (:mod:`isoprobe.windows`: equal windows, none shorter
than ``N/2`` for a sequence longer than ``N``; records keep the sequence's ``item`` and add the
``window`` index). A Gram of more tokens than its items' rank (the width; one less at a
centring norm's ``centered`` and ``normalized`` points) is singular by construction: its
records are flagged (:data:`isoprobe.records.SINGULAR`), get no Theorem 1 check, and the Probe
warns once (:class:`SingularGramWarning`) naming the sites and the ``window`` that fits.

**Sites** (:mod:`isoprobe.sites`) are found without changing the model: norms and activations
by what the modules do (torch's norm and activation classes, modules declaring an
``isoprobe_site`` attribute as isoprobe's own networks do, and any other module that behaves as
an entrywise nonlinearity or a per-row scale-invariant map on a probe input), and any module by
its qualified name: ``Probe(model, sites=["transformer.h.*", "*.attn"])`` (kind ``"module"``).
A site's name is its qualified module name; a record's key is ``"site:point"``, e.g.
``"transformer.h.3.ln_1:pre"``. A module called more than once in one forward gives one record
per call, told apart by ``Record.call`` (0, 1, ...); the k-th call's key is ``"site@k:point"``
(k ≥ 1), and ``probe["site@k:point"]`` selects it (``probe["site:point"]`` selects every call).
Activations and norms a forward applies as functions (``F.relu``, ``torch.tanh``,
``x.relu_()``, ``F.layer_norm``) are *functional sites* (:mod:`isoprobe.calls`; ``calls=False``
turns them off), named ``"owner:function@index"``, e.g. ``"Mixed_5b.branch1x1:relu@0"``.

**Points.** Every site has ``pre`` (the module's first tensor input, read by a forward pre-hook
before the module runs: an in-place module such as ``nn.ReLU(inplace=True)`` cannot have
overwritten it, and no copy of it is kept) and ``post`` (its output;
the first tensor of a tuple or dict output). A norm site
also has ``centered`` (``x - mean``, over what the module normalises) and ``normalized``
(centred and divided by ``sqrt(var + eps)`` with the module's own eps, before the affine
part). An RMSNorm does not centre: its ``centered`` point *is* ``pre``. A BatchNorm's
``centered``/``normalized`` points use the batch's own statistics (Corollary 3), whatever the
module's mode; its ``post`` is what the module returned (running statistics in eval mode).

**Views** (Joudaki et al. 2023, App. C.4): *token* — one Gram per sequence of a ``(batch, seq, hidden)`` activation,
items = tokens, padding excluded by the attention mask the model's forward received (or one
given to the Probe); in an encoder-decoder model (T5, BART) each site takes the mask of the
tokens it sees (:mod:`isoprobe.stacks`): ``attention_mask`` in the encoder (and for
cross-attention's keys and values, which read the encoder's output), ``decoder_attention_mask``
in the decoder, or no mask there when the forward got none (the decoder's own default: it then
attends to every target token); *sample* — one Gram per batch, items = the flattened samples;
*feature* — the feature covariance ``C = X Xᵀ`` of a batch (items = channels, entries = batch ×
spatial positions); *spatial* — one Gram per image of a 4-D map, items = its H·W positions,
entries = the channels (the convolutional analogue of the token view; ``Record.item`` is the
image), channels-first ``(B, C, H, W)`` or channels-last ``(B, H, W, C)``: a norm over the
channels says the first, a norm over the last dimension the second, and another site takes the
layout of the last such norm of the forward whose ``(B, H, W)`` matches its input's, else
channels-first; tensors that are not 4-D get the sample view there.
``"auto"``, one view along depth (the same tensor gets the same number at the end of one site
and the start of the next): ``pre`` and ``post`` in the token view for 3-D activations and the
sample view otherwise (what the batch-norm papers plot, Daneshmand, Joudaki & Bach, NeurIPS 2021;
Meterez et al. 2024, arXiv:2310.02012); a norm's ``centered`` and ``normalized`` points in the
view whose items it normalises (below), which each record states. An explicit view puts every
point there.

**Theorem 1** (Joudaki et al. 2023; Corollary 2 for layer norm, Corollary 3 for batch norm):
with item norms ``a_i`` of the centred items, ``I(normalized) ≥ I(centered) · (1 + Var(a)/ā²)``.
Checked on every norm site whose normalisation acts on whole items (token view for a
last-dimension LayerNorm/RMSNorm of ``(B, S, H)``, spatial view for one over the channels of
``(B, C, H, W)`` or the last dimension of ``(B, H, W, C)``, sample view for a norm over all
non-batch dimensions or a one-group GroupNorm, feature view for BatchNorm). The check is ``gap(normalized) ≤ gap(centered)
- log factor + tol``, ``tol = sqrt(eps)`` of the Gram dtype (relative to ``gap(centered)`` above 1).
Theorem 1 is about the projection ``x_c / ‖x_c‖``; a norm divides by ``sqrt(var + eps)``
instead, which lifts the gap by exactly ``δ = log(mean r²) - mean log r²``, ``r_i² = var_i /
(var_i + eps)`` (zero when all variances are equal). Where the normalized point misses the bound
by no more than ``δ`` (eps not small against the items' variances, e.g. OLMo2's post-norms at
random init), the theorem says nothing about it: ``theorem1_holds`` is ``None`` and the record's
flag says ``"eps-dominated: ..."``; a miss by more than ``δ`` would be a failure.

What the check can catch: the normalized Gram is derived, ``G_norm = D G_c D`` (below), so for the
projection the bound reduces to ``mean a ≥ (Π a_i)^(1/n)`` (arithmetic against geometric mean of
the item norms): it holds for every input, as the theorem says. ``theorem1_holds = False`` can
then come only from rounding beyond ``tol`` or an error in the Probe's own arithmetic; it is a
check of the measurement, not of the network (a random-init model passes as a trained one does).
The norm's own output is measured independently at ``post``.

**Numerics.** Grams in ``gram_dtype`` (float64 by default), the spectrum always in float64
(``metrics``). A norm site needs two Grams and two Cholesky factorisations for four points:
``G_c = X_c X_cᵀ`` (items centred in place in a reused conversion buffer); ``G_pre = G_c + v vᵀ``
with ``v = sqrt(m) μ`` (``μ`` the per-item means, ``m`` the entries per item), whose log
determinant is ``log det G_c + log(1 + ‖L⁻¹ v‖²)`` from ``G_c``'s factor ``L`` (the matrix
determinant lemma; wherever ``metrics`` would not have trusted a Cholesky factor of ``G_pre``
itself, ``G_pre`` is formed and factorised); ``G_norm = D G_c D`` with ``D = diag(1/sqrt(var +
eps))``, so ``gap(normalized) = gap(centered) + log(tr G_norm / tr G_c) - (2/n) Σ log D_ii``
needs no new factorisation (unless ``G_c`` is numerically singular: rescaling its rows can
restore a full numerical rank, so ``G_norm`` is then factorised on its own); only ``post`` needs
its own Gram. ``var`` and the norm-variation factor come from the diagonal of ``G_c``. A Gram
with more items than entries per item (and no padding) is singular by construction: its gap is
``+inf`` and it is neither formed nor factorised; its orthogonality gap comes from the small
dual Gram, ``‖G/tr G - I/n‖² = ‖Xᵀ X‖² / tr(G)² - 1/n``.

**float32 Grams** (``gram_dtype=torch.float32``) halve the Gram products' cost on a CPU. Each
record then carries ``gap_error``, an estimate of its gap's error against the exact Gram of the
same items: rounding errors modelled as independent (Higham & Mary 2019), an entry of a Gram of
``m`` products is off by about ``sqrt(m) u ‖x_i‖ ‖x_j‖`` (``u = 2⁻²⁴``), which moves the gap by
about ``sqrt(m) u max_i w_i (1 + 1/λ_min(Ĝ)) / sqrt(n)`` (``Ĝ`` the unit-diagonal Gram,
``λ_min`` from three steps of inverse iteration with its Cholesky factor, ``w_i = ‖x_i‖²/G_ii``
with ``x`` the uncentred items); ``gap_error`` is 8 times that (×4 for items centred in float32).
On GPT-2's token Grams it exceeds the actual error about 100-fold. An item group whose estimate
exceeds ``Probe.float32_tolerance`` (1e-3) at some point, or whose float32 Gram is singular or
near it, is measured again with float64 Grams (its records then have ``gap_error = 0.0``),
unless the module changed its input in place (then gone): those records keep their float32
values and their estimate.

**Padding** without a loop over sequences: padded rows of the items are zero, so a zero-padded
Gram is block-diagonal; putting ``c = tr(G)/n`` (the mean eigenvalue of the real block) on the
padded diagonal keeps the mean eigenvalue and multiplies the determinant by ``c^(N-n)``, which
gives exactly ``gap(real block) = gap(padded) · N / n``; and ``‖G/tr G - I_n/n‖² =
‖G/tr G - I_N/N‖² + 1/N - 1/n`` for the orthogonality gap. The rank tolerance of ``metrics`` is
then that of the padded size N (slightly stricter for the shorter sequences).

**Streaming.** Statistics are computed inside the hook and only they are kept. On CPU a hook
finishes its statistics at once. On other devices a hook only queues device work (Grams,
traces, orthogonality gaps: no host synchronisation) and keeps the Grams; the isometry gaps
(whose Cholesky/eigenvalue fallback in ``metrics.spectral_stats`` needs one data-dependent
branch, a sync) and the move to the host happen once per forward, in a forward hook on the
top-level model. The price on GPU is holding the Grams of one forward (``n²`` per item group and
point) until its end; beyond ``Probe.max_pending_bytes`` they are finished early (one sync).
With float32 Grams a hook finishes at once on every device (one sync per site call): whether
the float64 recomputation is needed is decided there, while the activations exist.

**Compiled models** (``torch.compile``, before or after the Probe is made): sites keep the
eager model's names, and each site's measurement is an operator of the compiled graph
(:mod:`isoprobe.compiled`), so the graph is not compiled again and, but for an encoder-decoder
model's stack hooks (kept out of the graph: a break at each stack's entry and exit), has no breaks. Attach the
Probe before the model's first compiled forward (or call ``torch.compiler.reset()``): a graph
traced without its hooks never calls them (the Probe warns when no site ran in a forward).

The model is left as found: hooks are removed on exit (also after an exception), the hooks
detach and return nothing (autograd, outputs and train/eval mode untouched), autocast is off
inside them, and each statistic is computed on its activation's own device. A forward that
raises keeps the records of the sites that ran. Records are made only during calls of the model
given to the Probe (not for direct calls of its submodules, nor for activation recomputation by
gradient checkpointing during backward).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from isoprobe import records as _rec
from isoprobe.calls import FUNCTIONS, FunctionalSites, may_call, suspended
from isoprobe.compiled import eager_module, outer_hook, release, site_hook, site_pre_hook
from isoprobe.distributed import all_gather_features
from isoprobe.metrics import (
    _CHOLESKY_MARGIN,
    _gap_of,
    _orthogonality_gap,
    _spectral_stats,
)
from isoprobe.records import Record, RecordSink, RunningSummary, Summary
from isoprobe.sharded import is_dtensor, whole
from isoprobe.sites import NormSpec, Site, discover_sites, no_site_message, select_sites
from isoprobe.stacks import DECODER, ENCODER, Streams, encoder_decoder
from isoprobe.windows import WindowLayout, window_layout, windowed

__all__ = ["NormSpec", "Probe", "SingularGramWarning", "Site", "discover_sites", "rank_bounds", "select_sites"]

View = Literal["auto", "token", "sample", "feature", "spatial"]


class SingularGramWarning(UserWarning):
    """Token Grams with more tokens than their items' rank allows: singular by construction
    (warned once per :class:`Probe`, naming the sites and the ``window`` that fits)."""


_VIEWS = ("auto", "token", "sample", "feature", "spatial")


# --------------------------------------------------------------- statistics of item batches
# Pure tensor math: items are rows, X shaped (g, n, m) = (groups, items, entries per item).


def _items(x: torch.Tensor, view: str, last: bool = False) -> torch.Tensor:
    """The activation ``x`` as items ``(g, n, m)`` for ``view`` (see the module docstring); in the
    spatial view ``last`` reads ``x`` as channels-last ``(B, H, W, C)``, else ``(B, C, H, W)``."""
    if view == "spatial":
        if x.ndim != 4:
            raise ValueError(f"the spatial view needs (batch, C, H, W) activations, got shape {tuple(x.shape)}")
        return x.flatten(1, 2) if last else x.flatten(2).transpose(1, 2)  # views, no copy
    if view == "token":
        if x.ndim != 3:
            raise ValueError(
                f"the token view needs (batch, seq, hidden) activations, got shape {tuple(x.shape)}; "
                "use view='sample' or 'auto'"
            )
        return x
    if view == "sample":
        return x.reshape(1, x.shape[0], -1)
    if x.ndim < 2:
        raise ValueError(f"the feature view needs (batch, features, ...) activations, got {tuple(x.shape)}")
    return x.transpose(0, 1).reshape(1, x.shape[1], -1)


def _normalize_parts(x: torch.Tensor, spec: NormSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``(centered, normalized)`` of ``x`` as the norm computes them, before the affine part."""
    shape = x.shape
    if spec.rule == "group":
        x = x.reshape(shape[0], spec.groups, -1)
        dims: tuple[int, ...] = (-1,)
    elif spec.rule in ("batch", "batch-rms"):
        dims = (0, *range(2, x.ndim))
    else:
        dims = (1,) if spec.channels else tuple(range(-spec.dims, 0))
    xc = x - x.mean(dims, keepdim=True) if spec.centers else x
    eps = torch.finfo(x.dtype).eps if spec.eps is None else spec.eps
    xn = xc / (xc.square().mean(dims, keepdim=True) + eps).sqrt()
    return xc.reshape(shape), xn.reshape(shape)


def _check_view(spec: NormSpec, ndim: int) -> tuple[str, bool] | None:
    """``(view, channels-last)`` whose items the norm normalises each as a whole, on ``ndim``-D
    inputs (Theorem 1 applies there; Corollary 3's feature view for batch norms), or ``None``:
    batch norms → feature; a one-group GroupNorm or a norm over all non-batch dimensions →
    sample; a norm over the last dimension of ``(B, S, H)`` → token, of ``(B, H, W, C)`` →
    spatial (channels-last); a norm over the channels of ``(B, C, H, W)`` → spatial."""
    if spec.rule in ("batch", "batch-rms"):
        return "feature", False
    if spec.rule == "group":
        return ("sample", False) if spec.groups == 1 else None
    if spec.channels:
        return ("spatial", False) if ndim == 4 else ("sample", False) if ndim == 2 else None
    if spec.dims == ndim - 1:
        return "sample", False
    if spec.dims == 1 and ndim in (3, 4):
        return ("token", False) if ndim == 3 else ("spatial", True)
    return None


def _aligned(spec: NormSpec, view: str, ndim: int, last: bool = False) -> bool:
    """Does the norm normalise each item of ``view`` as a whole (Theorem 1 applies)?"""
    return _check_view(spec, ndim) == (view, last if view == "spatial" else False)


def _orth_gap(G: torch.Tensor, n: torch.Tensor, padded: bool) -> torch.Tensor:
    """Orthogonality gap of the real block of zero-padded Grams ``(g, N, N)``, ``n`` real items."""
    og = _orthogonality_gap(G)
    if not padded:
        return og
    N = G.shape[-1]
    return (og.square() + 1 / N - 1 / n.to(og.dtype)).clamp_min(0).sqrt()


def _pad_diagonal(G: torch.Tensor, n: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """``G`` with ``c = tr(G)/n`` (1 for a zero block) on the padded diagonal (module docstring)."""
    nf = n.to(torch.float64)
    tr = G.diagonal(dim1=-2, dim2=-1).sum(-1).to(torch.float64)
    c = torch.where((tr > 0) & (nf > 0), tr / nf.clamp_min(1), torch.ones_like(tr))
    return G + torch.diag_embed(pad.to(G.dtype) * c[:, None].to(G.dtype))


def _gap_factored(
    G: torch.Tensor, n: torch.Tensor, pad: torch.Tensor | None, short: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Isometry gap of the real block of zero-padded Grams ``(g, N, N)``: ``gap(padded)·N/n``,
    with ``(trusted, L)``: where the Cholesky factor ``L`` of the (diagonal-padded) Gram decided.

    ``pad`` marks the padded items ``(g, N)``; their diagonal entries get the real block's mean
    eigenvalue ``c = tr(G)/n``, which keeps the trace mean and adds ``(N - n) log c`` to
    ``log det`` (module docstring). ``short`` ``(g,)`` marks Grams singular by construction
    (:func:`_short`): where finite, their gap is ``+inf`` with no factorisation and no
    eigenvalues (and ``trusted`` is false). May synchronise with the device.
    """
    N = G.shape[-1]
    if pad is not None:
        G = _pad_diagonal(G, n, pad)
    if short is not None:  # finite ones only (NaN must stay NaN); a float64 sum overflowing leaves G as is
        short = short & torch.isfinite(G.sum((-2, -1), dtype=torch.float64))
    scale = torch.ones(G.shape[:-2], dtype=torch.float64, device=G.device) if pad is None else N / n.to(torch.float64)
    if short is None or not bool(short.any()):
        stats, trusted, L = _spectral_stats(G)
        return _gap_of(stats, N) * scale, trusted, L
    gap = torch.full(short.shape, math.inf, dtype=torch.float64, device=G.device)
    trusted = torch.zeros_like(short)
    L = torch.eye(N, dtype=torch.float64, device=G.device).expand(*G.shape[:-2], N, N).clone()
    keep = ~short  # only these are factorised: no placeholder for the others
    if bool(keep.any()):
        stats, trusted[keep], L[keep] = _spectral_stats(G[keep])
        gap[keep] = _gap_of(stats, N) * scale[keep]
    return gap, trusted, L


def _gap(G: torch.Tensor, n: torch.Tensor, pad: torch.Tensor | None, short: torch.Tensor | None = None) -> torch.Tensor:
    """Isometry gap of the real block of zero-padded Grams (:func:`_gap_factored`)."""
    return _gap_factored(G, n, pad, short)[0]


def _short(dim: int, n: torch.Tensor) -> torch.Tensor:
    """``(g,)``: are Grams of ``n`` real items with ``dim`` entries each singular by construction?
    ``rank(X Xᵀ) ≤ dim``, so ``dim < n`` gives ``det = 0`` and ``gap = +inf`` exactly (a token
    Gram of 1024 tokens of GPT-2's width 768; a sample Gram of a batch wider than the layer)."""
    return n > dim


def _gap_rank_one(
    Gc: torch.Tensor,
    v: torch.Tensor,
    n: torch.Tensor,
    pad: torch.Tensor | None,
    gap_c: torch.Tensor,
    trusted: torch.Tensor,
    L: torch.Tensor,
    dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Isometry gap of ``G = G_c + v vᵀ`` (a norm's ``pre`` Gram, ``v = sqrt(m) μ``) from the
    Cholesky factor ``L`` of ``G_c`` (with its padded diagonal), by the matrix determinant lemma
    ``log det G = log det G_c + log(1 + ‖L⁻¹ v‖²)``:

        gap(G) = gap(G_c) + log(tr G / tr G_c) - log(1 + ‖L⁻¹ v‖²) / n.

    Used where ``G_c``'s factor was trusted with a smallest pivot above the margin of ``G``'s own
    scale: the pivots (Schur complements) of ``G ⪰ G_c`` are no smaller, so ``metrics`` would
    have trusted ``G``'s own Cholesky factor too. Where the items' ``dim`` entries are fewer than
    the items, ``G`` is singular by construction (:func:`_short`) and its gap ``+inf``; elsewhere
    (``False`` in the second tensor returned) ``G`` is formed and factorised.
    """
    N = Gc.shape[-1]
    nf = n.to(torch.float64)
    v64, d_c = v.to(torch.float64), Gc.diagonal(dim1=-2, dim2=-1).to(torch.float64)
    tr_c, vv = d_c.sum(-1), v64.square().sum(-1)
    z = torch.linalg.solve_triangular(L, v64[..., None], upper=False)
    pivots = L.diagonal(dim1=-2, dim2=-1).square().amin(-1)
    scale = (d_c + v64.square()).amax(-1).clamp_min(torch.finfo(torch.float64).tiny)
    rtol = N * torch.finfo(Gc.dtype).eps
    ok = trusted & (pivots > _CHOLESKY_MARGIN * rtol * scale)
    gap = (gap_c + torch.log((tr_c + vv) / tr_c) - torch.log1p(z.square().sum((-2, -1))) / nf).clamp_min(0)
    skip = _short(dim, n) & torch.isinf(gap_c)  # G_c finite and singular by construction: so is G
    gap = torch.where(ok, gap, torch.where(skip, torch.full_like(gap, math.inf), torch.zeros_like(gap)))
    bad = ~ok & ~skip
    if bool(bad.any()):
        G = Gc[bad] + v[bad][..., :, None] * v[bad][..., None, :]
        gap[bad] = _gap(G, n[bad], None if pad is None else pad[bad])
    return gap, ok


class _Workspace:
    """Scratch tensors reused from one hook call to the next, one per (shape, dtype, device).

    Converting a large activation to float64 into a fresh tensor costs page faults on the CPU
    (3× the copy itself for a 50 MB GPT-2 MLP activation); a Probe keeps one buffer per shape
    while it is attached. Only one measurement uses a buffer at a time (hooks run in turn).
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[tuple[int, ...], torch.dtype, torch.device], torch.Tensor] = {}

    def copy(self, z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A writable copy of ``z`` in ``dtype``, in this workspace's buffer for its shape."""
        key = (tuple(z.shape), dtype, z.device)
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = torch.empty(z.shape, dtype=dtype, device=z.device)
        return buf.copy_(z)

    def clear(self) -> None:
        self._buffers.clear()


@dataclass
class _Pending:
    """One site call's measurements; ``grams`` wait for their isometry gaps (see ``_finish``).

    Made in two phases (:func:`_measure_input` before the module runs, :func:`_measure_output`
    after): until the second, ``post_dim`` is -1 and the last Gram slot is unfilled."""

    site: Site
    view: str
    step: int
    call: int  # k-th call of the site's module in this forward
    dim: int  # entries per item of the input (pre, centered, normalized)
    n: torch.Tensor  # (g,) items per Gram
    token_items: bool
    points: tuple[str, ...]  # every point of this measurement, in order
    gram_points: tuple[str, ...]  # the points whose Gram is in grams
    grams: torch.Tensor  # (len(gram_points), g, N, N)
    pad: torch.Tensor | None  # (g, N) padded items
    og: dict[str, torch.Tensor]  # point -> (g,) orthogonality gaps
    items: _Items  # the conversion of the tensors into items (for the output, in the second phase)
    post_dim: int = -1  # entries per item of the output (a named module may change the width)
    infinite: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # point -> (g,) finite items:
    # points singular by construction, gap +inf (NaN where the items are not finite), no Gram formed
    same_as_pre: tuple[str, ...] = ()  # points equal to pre (RMSNorm's centered)
    pre_vector: torch.Tensor | None = None  # (g, N) v with G_pre = G_c + v vᵀ (v = sqrt(m) μ)
    log_ratio: torch.Tensor | None = None  # (g,) gap(normalized) - gap(centered)
    factor: torch.Tensor | None = None  # (g,) norm-variation factor of the centred items
    eps_effect: torch.Tensor | None = None  # (g,) δ = gap(normalized) - gap(x_c / ‖x_c‖), float64
    gram_normalized: torch.Tensor | None = None  # (g, N, N) D G_c D, for a singular G_c
    groups: list[tuple[int, int]] | None = None  # (item, window) of each group (isoprobe.windows)


@dataclass
class _Finished:
    """Per-point float64 rows ``(n, gap, og, bound, holds, factor, eps-dominated, error)`` of one
    site call, (R, g)."""

    site: Site
    view: str
    step: int
    call: int
    dim: int
    post_dim: int
    token_items: bool
    points: tuple[str, ...]
    table: torch.Tensor
    groups: list[tuple[int, int]] | None = None  # (item, window) of each group (isoprobe.windows)


@dataclass
class _Call:
    """A site call begun (:meth:`Probe._site_hooks`): its input as given (its ``_version`` tells
    whether the module changed it in place) and the measurements begun on it, each with
    ``(view, mask, points, channels-last, windows)``."""

    call: int
    x: torch.Tensor | None
    version: int | None
    parts: list[tuple[_Pending, tuple[str, torch.Tensor | None, tuple[str, ...], bool, WindowLayout | None]]] = (
        dataclasses.field(default_factory=list)
    )


_ROWS_PER_POINT = 7  # gap, og, Theorem 1 bound, holds, factor, eps-dominated, float32 error estimate


class _Items:
    """The items ``(g, N, m)`` of one site call's tensors in the Gram dtype, zero on padding
    (``last``: a spatial view's channels-last layout)."""

    def __init__(self, view: str, mask: torch.Tensor | None, dtype: torch.dtype, work: _Workspace, last: bool = False):
        self.view, self.dtype, self.work, self.last = view, dtype, work, last
        self.keep = None if mask is None else mask.to(dtype)[..., None]

    def shape(self, t: torch.Tensor) -> tuple[int, int, int]:
        return tuple(_items(t, self.view, self.last).shape)  # type: ignore[return-value]

    def __call__(self, t: torch.Tensor, writable: bool = False) -> torch.Tensor:
        z = _items(t, self.view, self.last)
        if z.dtype == self.dtype and self.keep is None and not writable:
            return z  # read only: no copy
        z = self.work.copy(z, self.dtype)
        return z if self.keep is None else z.mul_(self.keep)


def _dual(X: torch.Tensor, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthogonality gap of ``G = X Xᵀ`` from the ``m × m`` Gram ``Xᵀ X`` of items ``(g, n, m)``,
    ``m < n``: ``‖G/tr G - I/n‖_F² = ‖Xᵀ X‖_F² / tr(G)² - 1/n`` (no ``n × n`` Gram formed), and
    whether the items are finite ``(g,)``."""
    D = (X.mT @ X).to(torch.float64)
    trace = D.diagonal(dim1=-2, dim2=-1).sum(-1)
    og = (D.square().sum((-2, -1)) / trace.square() - 1 / n.to(torch.float64)).clamp_min(0).sqrt()
    return og, torch.isfinite(D.sum((-2, -1)))


def _measure(
    site: Site,
    x: torch.Tensor,
    y: torch.Tensor,
    view: str,
    mask: torch.Tensor | None,
    gram_dtype: torch.dtype,
    step: int,
    call: int = 0,
    work: _Workspace | None = None,
    points: tuple[str, ...] | None = None,
    last: bool = False,
) -> _Pending:
    """Both phases of one site call at once (:func:`_measure_input`, :func:`_measure_output`)."""
    pending = _measure_input(site, x, view, mask, gram_dtype, step, call, work, points, last)
    return _measure_output(pending, y)


def _measure_input(
    site: Site,
    x: torch.Tensor,
    view: str,
    mask: torch.Tensor | None,
    gram_dtype: torch.dtype,
    step: int,
    call: int = 0,
    work: _Workspace | None = None,
    points: tuple[str, ...] | None = None,
    last: bool = False,
) -> _Pending:
    """What the input ``x`` of one site call (the ``call``-th of its module in forward ``step``)
    gives, before the module runs: ``pre`` and a norm's ``centered`` and ``normalized``
    (``points``: the measurement's points, by default all of the site's). No host synchronisation.

    Items are converted to ``gram_dtype`` one tensor at a time, into the buffers of ``work``, so
    the extra memory stays near one float64 copy of one activation. Nothing is done in place on
    the model's activations. Points whose Grams are singular by construction (fewer entries per
    item than items, no padding) form no Gram: their orthogonality gap comes from the dual Gram.
    """
    items = _Items(view, mask, gram_dtype, work or _Workspace(), last)
    g, N, m = items.shape(x)
    if mask is not None:
        n, pad = mask.sum(-1), ~mask
    else:
        n, pad = torch.full((g,), N, dtype=torch.int64, device=x.device), None
    spec = site.norm
    points = points or (("pre", "post") if spec is None else _rec.POINTS)
    common = dict(
        site=site, view=view, step=step, call=call, dim=m, n=n, token_items=view in ("token", "spatial"), pad=pad
    )
    common.update(points=points, items=items)
    ins = points[:-1] if points[-1] == "post" else points
    if N < 2:  # one item per Gram: nothing is defined (records are flagged)
        nan = torch.full((g,), math.nan, dtype=torch.float64, device=x.device)
        empty = x.new_zeros(0, g, N, N, dtype=gram_dtype)
        return _Pending(gram_points=(), grams=empty, og=dict.fromkeys(points, nan), **common)
    if "centered" in points and _aligned(spec, view, x.ndim, last):
        return _measure_aligned(spec, items(x, writable=True), x.dtype, common)
    parts = (x,) if spec is None or "centered" not in points else (x, *_normalize_parts(x.to(gram_dtype), spec))
    short = pad is None and m < N
    gram_points = (*(() if short else ins), *(("post",) if "post" in points else ()))
    grams = torch.empty(len(gram_points), g, N, N, dtype=gram_dtype, device=x.device)
    og, infinite = {}, {}
    for i, (q, t) in enumerate(zip(ins, parts[len(parts) - len(ins) :])):
        if short:
            og[q], infinite[q] = _dual(items(t), n)
        else:
            og[q] = _orth_gap(_gram(items(t), grams[i]), n, pad is not None)
    return _Pending(gram_points=gram_points, grams=grams, og=og, infinite=infinite, **common)


def _measure_output(p: _Pending, y: torch.Tensor) -> _Pending:
    """The second phase of :func:`_measure_input`: the output ``y``'s point ``post`` (if the
    measurement has it), its Gram into the last slot of ``p.grams``; returns ``p``."""
    if "post" not in p.points:
        p.post_dim = p.dim
        return p
    Y = p.items(y)
    g, N, p.post_dim = Y.shape
    if N < 2:
        p.og["post"] = torch.full((g,), math.nan, dtype=torch.float64, device=y.device)
    elif p.pad is None and p.post_dim < N:  # singular by construction: no Gram
        p.og["post"], p.infinite["post"] = _dual(Y, p.n)
        p.grams, p.gram_points = p.grams[:-1], p.gram_points[:-1]
    else:
        p.og["post"] = _orth_gap(_gram(Y, p.grams[-1]), p.n, p.pad is not None)
    return p


def _gram(X: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``X Xᵀ`` of items ``(g, N, m)`` in their own dtype (float32 or float64), into ``out``."""
    return torch.matmul(X, X.mT, out=out)


def _measure_aligned(spec: NormSpec, X: torch.Tensor, x_dtype: torch.dtype, common: dict[str, Any]) -> _Pending:
    """A norm that acts on whole items: two Grams serve four points (module docstring).

    ``X`` is a writable copy of the input items; it is centred in place, a new Gram tensor
    receives ``G_c`` (and, in the second phase, ``G_post``), and ``G_pre = G_c + v vᵀ``
    (``v = sqrt(m) μ``) is left for :func:`_gap_rank_one` (no Cholesky of its own). The
    norm-variation factor of the centred items ``a_i = sqrt(G_c,ii)`` over the ``n`` real ones is
    ``n Σ a_i² / (Σ a_i)²`` (= ``1 + Var(a)/ā²``). Where ``G_c`` is singular by construction
    (more items than entries, no padding), no Gram is formed (:func:`_dual_orth_gap`).
    """
    n, pad, points = common["n"], common["pad"], common["points"]
    g, N, m = X.shape
    short = pad is None and m < N
    og: dict[str, torch.Tensor] = {}
    mu = X.mean(-1) if spec.centers else None
    infinite: dict[str, torch.Tensor] = {}
    if short and "pre" in points:
        og["pre"], infinite["pre"] = _dual(X, n)
    if mu is not None:
        X.sub_(mu[..., None])
    grams = torch.empty(int(not short) + ("post" in points), g, N, N, dtype=X.dtype, device=X.device)
    Gc = None if short else _gram(X, grams[0])
    var = X.square().mean(-1) if short else Gc.diagonal(dim1=-2, dim2=-1) / m
    eps = torch.finfo(x_dtype).eps if spec.eps is None else spec.eps
    d2 = 1 / (var + eps)  # D_ii²
    Gn = None if short else Gc * d2.sqrt()[..., :, None] * d2.sqrt()[..., None, :]
    real = torch.ones_like(var) if pad is None else (~pad).to(var.dtype)
    nf = n.to(var.dtype)
    log_ratio = (d2 * var * real).sum(-1).log() - (var * real).sum(-1).log() - (d2.log() * real).sum(-1) / nf
    a = (var.to(torch.float64) * m).sqrt()
    factor = n.to(torch.float64) * a.square().sum(-1) / a.sum(-1).square()
    eps_effect = _eps_effect(var.to(torch.float64), eps, real > 0, n)
    padded = pad is not None
    if short:
        og["centered"], infinite["centered"] = _dual(X, n)
        og["normalized"], infinite["normalized"] = _dual(X * d2.sqrt()[..., None], n)
        if mu is None and "pre" in points:
            og["pre"], infinite["pre"] = og["centered"], infinite["centered"]
        shape: dict[str, Any] = {"gram_points": ("post",) if len(grams) else (), "infinite": infinite}
    else:
        og["normalized"], og["centered"] = _orth_gap(Gn, n, padded), _orth_gap(Gc, n, padded)
        if mu is None:  # nothing subtracted: G_pre is G_c
            og["pre"] = og["centered"]
            shape = {"gram_points": ("pre", "post"), "same_as_pre": ("centered",)}
        elif "pre" in points:
            v = mu * math.sqrt(m)
            og["pre"] = _orth_gap(Gc + v[..., :, None] * v[..., None, :], n, padded)
            shape = {"gram_points": ("centered", "post"), "pre_vector": v}
        else:
            shape = {"gram_points": ("centered", "post")}
        shape["gram_points"] = shape["gram_points"][: len(grams)]
    return _Pending(
        grams=grams,
        og={q: og[q] for q in points if q in og},
        log_ratio=log_ratio,
        factor=factor,
        eps_effect=eps_effect,
        gram_normalized=Gn,
        **shape,
        **common,
    )


def _point_dim(p: _Pending, point: str) -> int:
    """The rank bound of ``point``'s items: the output's entries per item at ``post``, the
    input's elsewhere, one less at ``centered``/``normalized`` of a centring norm measured in the
    view whose items it normalises (each item minus its own mean is orthogonal to the ones vector)."""
    if point == "post":
        return p.post_dim
    centred = point in ("centered", "normalized") and p.log_ratio is not None and p.site.norm is not None
    return p.dim - 1 if centred and p.site.norm.centers else p.dim


def _finish(p: _Pending, tol: float) -> _Finished:
    """Isometry gaps and the Theorem 1 check of one site call (may synchronise the device)."""
    k, g = p.grams.shape[:2]
    nan = torch.full((g,), math.nan, dtype=torch.float64, device=p.n.device)
    gaps = dict.fromkeys(p.points, nan)  # stays NaN only for N < 2 (flagged as undefined)
    if k:
        pad = None if p.pad is None else p.pad.repeat(k, 1)
        short = torch.cat([_short(_point_dim(p, q), p.n) for q in p.gram_points])
        gap, trusted, L = _gap_factored(p.grams.flatten(0, 1), p.n.repeat(k), pad, short)
        gaps.update(zip(p.gram_points, gap.view(k, g)))
        if p.pre_vector is not None:  # G_pre = G_c + v vᵀ: from G_c's factor (the first Grams)
            gaps["pre"], lemma = _gap_rank_one(
                p.grams[0], p.pre_vector, p.n, p.pad, gaps["centered"], trusted[:g], L[:g], p.dim
            )
    for q, finite in p.infinite.items():
        gaps[q] = torch.where(finite, math.inf, nan)
    for q in p.same_as_pre:
        gaps[q] = gaps["pre"]
    extra: dict[str, list[torch.Tensor]] = {}
    if p.log_ratio is not None:
        extra["normalized"] = _theorem1(p, gaps, tol)
    errors = {q: torch.where(torch.isnan(gaps[q]), nan, 0.0) for q in p.infinite}  # +inf in any precision
    if k and p.grams.dtype == torch.float32:
        errors |= _float32_errors(
            p, gaps, trusted.view(k, g), L.view(k, g, *L.shape[-2:]), lemma if p.pre_vector is not None else None
        )
    elif p.items.dtype != torch.float32:
        errors = {}
    rows = [p.n.to(torch.float64)]
    for q in p.points:
        rows += [gaps[q].to(torch.float64), p.og[q].to(torch.float64)]
        rows += extra.get(q, [nan, nan, nan, nan])
        rows.append(errors.get(q, nan))
    return _Finished(
        p.site, p.view, p.step, p.call, p.dim, p.post_dim, p.token_items, p.points, torch.stack(rows), p.groups
    )


# float32 Grams. Worst-case rounding bounds (an entry of a Gram formed from m float32 products
# is off by at most m u ‖x_i‖ ‖x_j‖, u = 2⁻²⁴) exceed the actual errors of GPT-2's token Grams
# by five orders of magnitude, so the Probe states a probabilistic estimate instead: rounding
# errors as independent zero-mean variables (Higham & Mary 2019) give an entry error of standard
# deviation ≲ sqrt(m) u ‖x_i‖ ‖x_j‖ and, to first order, a gap error of standard deviation ≲
# sqrt(m) u max_i w_i (1 + 1/λ_min(Ĝ)) / sqrt(n); ``gap_error`` is _SIGMAS of those, with a factor
# _CENTRING_SAFETY for a norm's items centred in float32 (w_i = ‖x_i‖² / G_ii, x uncentred).
_UNIT_ROUNDOFF_32 = 2.0**-24
_SIGMAS = 8.0
_CENTRING_SAFETY = 4.0
_INVERSE_ITERATIONS = 3


def _lambda_min(apply_inverse: Any, diag: torch.Tensor) -> torch.Tensor:
    """Estimate of the smallest eigenvalue of the unit-diagonal ``Ĝ = D^-½ G D^-½``
    (``D = diag G``) by inverse iteration, ``Ĝ⁻¹ z = D^½ G⁻¹ D^½ z``; ``apply_inverse(z)`` solves
    ``G u = z`` for ``z`` shaped ``(g, N, 1)``. From above after few steps (an estimate)."""
    s = diag.to(torch.float64).clamp_min(torch.finfo(torch.float64).tiny).sqrt()[..., None]
    gen = torch.Generator(device="cpu").manual_seed(0)
    z = torch.randn(diag.shape[-1], 1, generator=gen, dtype=torch.float64).to(diag.device).expand_as(s)
    norm = torch.ones_like(s[..., 0, 0])
    for _ in range(_INVERSE_ITERATIONS):
        z = z / torch.linalg.vector_norm(z, dim=(-2, -1), keepdim=True)
        z = s * apply_inverse(s * z)
        norm = torch.linalg.vector_norm(z, dim=(-2, -1))
    return 1 / norm


def _cholesky_solve(L: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``G⁻¹ z`` from the lower Cholesky factor ``L`` of ``G = L Lᵀ``: two triangular solves.

    The same arithmetic as ``torch.cholesky_solve``, which copies ``L`` into a new column-major
    tensor on every call (several times the time of the solves on the CPU)."""
    y = torch.linalg.solve_triangular(L, z, upper=False)
    return torch.linalg.solve_triangular(L.mT, y, upper=True)


def _rounding_estimate(gamma: float, w: torch.Tensor, lam_min: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """``_SIGMAS · γ max w (1 + 1/λ_min) / sqrt(n)`` (``γ = sqrt(m) u``; comment above);
    ``+inf`` where ``λ_min`` is not positive."""
    est = _SIGMAS * gamma * w.amax(-1) * (1 + 1 / lam_min) / n.to(torch.float64).sqrt()
    return torch.where(lam_min > 0, est, torch.full_like(est, math.inf))


def _float32_errors(
    p: _Pending,
    gaps: dict[str, torch.Tensor],
    trusted: torch.Tensor,
    L: torch.Tensor,
    lemma: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    """Per point ``(g,)``: an estimate of ``|gap(float32 Gram) - gap(exact Gram)|``
    (:func:`_rounding_estimate`); ``+inf`` where the float32 factor was not trusted (singular to float32
    rounding, or near it), NaN where the gap is NaN. ``trusted``, ``L``: the Cholesky factors of
    ``p.grams`` ``(k, g, ...)``; ``lemma``: where ``G_pre`` came from ``G_c``'s factor."""
    gamma = math.sqrt(p.dim) * _UNIT_ROUNDOFF_32
    real = torch.ones_like(p.grams[0, :, :, 0], dtype=torch.float64) if p.pad is None else (~p.pad).double()
    diags = p.grams.diagonal(dim1=-2, dim2=-1).to(torch.float64)

    def bound(i: int, w: torch.Tensor, g: float, ok: torch.Tensor, apply=None, diag=None) -> torch.Tensor:
        apply = apply or (lambda z: _cholesky_solve(L[i], z))
        lam = _lambda_min(apply, diags[i] if diag is None else diag)
        return torch.where(ok, _rounding_estimate(g, w, lam, p.n), torch.full_like(lam, math.inf))

    out = {}
    if p.pre_vector is None:  # every Gram formed from the items as they are
        for i, q in enumerate(p.gram_points):
            out[q] = bound(i, real, gamma, trusted[i])
    else:  # G_c from float32-centred items (uncentred norms: ‖x_i‖² = G_pre,ii), G_pre = G_c + v vᵀ
        v = p.pre_vector.to(torch.float64)[..., None]
        d_pre = diags[0] + v[..., 0].square()
        w_c = real * d_pre / diags[0].clamp_min(torch.finfo(torch.float64).tiny)
        out["centered"] = bound(0, w_c, _CENTRING_SAFETY * gamma, trusted[0])
        if "post" in p.gram_points:
            out["post"] = bound(1, real, gamma, trusted[1])
        u = _cholesky_solve(L[0], v)

        def pre_inverse(z: torch.Tensor) -> torch.Tensor:  # Sherman–Morrison with G_c's factor
            y = _cholesky_solve(L[0], z)
            return y - u * (v.mT @ y) / (1 + v.mT @ u)

        out["pre"] = bound(0, real, _CENTRING_SAFETY * gamma, lemma, pre_inverse, d_pre)
    for q in p.same_as_pre:
        out[q] = out["pre"]
    if "normalized" in p.points and "normalized" not in out and "centered" in out:  # gap(G_c) + exact log-ratio
        w = w_c if p.pre_vector is not None else real
        out["normalized"] = out["centered"] + 4 * _CENTRING_SAFETY * gamma * w.amax(-1)
    exact = {q: _short(_point_dim(p, q), p.n) & torch.isinf(gaps[q]) for q in out}  # +inf in any precision
    return {q: torch.where(torch.isnan(gaps[q]), gaps[q], torch.where(exact[q], 0.0, e)) for q, e in out.items()}


def _eps_effect(var: torch.Tensor, eps: float, real: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """``δ = gap(normalized) - gap(x_c / ‖x_c‖) ≥ 0`` per item group ``(g,)``, float64: how far a
    norm's eps lifts the gap of its normalised items above that of the exact projection onto the
    sphere, the map of Theorem 1 (Joudaki et al. 2023, eq. 4).

    ``G_norm = R G* R`` with ``G* = D* G_c D*`` (``D*_ii = 1/sqrt(var_i)``: constant diagonal
    ``m``) and ``R = diag(r_i)``, ``r_i² = var_i / (var_i + eps)``; ``log det`` gains
    ``Σ log r_i²`` and the trace is ``m Σ r_i²``, so over the ``n`` real items

        δ = log(mean r_i²) - mean log r_i²,

    zero when all variances are equal (eps then only rescales), ``+inf`` for a zero item.
    """
    e = eps / var  # inf where var = 0
    r2 = torch.where(real, 1 / (1 + e), torch.zeros_like(e)).sum(-1) / n
    mean_log = torch.where(real, torch.log1p(e), torch.zeros_like(e)).sum(-1) / n
    delta = (r2.log() + mean_log).clamp_min(0)
    return torch.where(torch.isinf(mean_log), torch.full_like(delta, math.inf), delta)


def _theorem1(p: _Pending, gaps: dict[str, torch.Tensor], tol: float) -> list[torch.Tensor]:
    """Sets ``gaps["normalized"]``; returns the rows ``(bound, holds, factor, eps-dominated)``.

    The check: ``gap(normalized) ≤ gap(centered) - log factor + t``, ``t = tol · max(1,
    |gap(centered)|)`` for rounding. A singular ``G_c`` makes the bound 0, true of every
    ``G_norm``: no check there (bound and holds NaN), so a singular Gram never counts as a pass.
    Theorem 1 is about ``x_c / ‖x_c‖``, whose gap is ``gap(normalized) - δ`` exactly
    (:func:`_eps_effect`). The verdict is decided where eps cannot have made it: *holds* when the
    normalized point meets the bound (the projection, ``δ`` lower, then does too); *fails* when
    even ``gap(normalized) - δ`` misses it (eps does not explain the miss). Between the two, the
    normalized point misses the bound by no more than eps's effect on it: undecided (holds NaN,
    eps-dominated 1), a statement the theorem does not make.
    """
    gc = gaps["centered"]
    gn = (gc + p.log_ratio.to(gc.dtype)).clamp_min(0)
    singular = torch.isinf(gc)
    ask = singular & ~_short(_point_dim(p, "centered"), p.n)  # D G_c D has G_c's rank: singular stays so
    if bool(ask.any()):  # G_c numerically singular: D G_c D may not be, ask it directly
        pad = None if p.pad is None else p.pad[ask]
        gn[ask] = _gap(p.gram_normalized[ask], p.n[ask], pad).to(gn.dtype)
    gaps["normalized"] = gn
    log_factor = p.factor.to(gc.dtype).log()
    bound = torch.where(singular, torch.full_like(gc, math.nan), torch.exp(log_factor - gc))  # 0: no check
    limit = gc - log_factor + tol * gc.abs().clamp_min(1)
    meets = singular | (gn <= limit)
    dominated = ~meets & (gn - p.eps_effect.to(gc.dtype) <= limit)
    nan = torch.full_like(gc, math.nan)
    undefined = torch.isnan(gn) | torch.isnan(bound)
    holds = torch.where(undefined | dominated, nan, meets.to(gc.dtype))
    return [bound, holds, p.factor.to(gc.dtype), torch.where(undefined, nan, dominated.to(gc.dtype))]


_TOL64 = math.sqrt(torch.finfo(torch.float64).eps)


def _checked(f: _Finished, tolerance: float, redo: Any) -> _Finished:
    """``f`` (float32 Grams) with every item group whose error estimate exceeds ``tolerance`` at
    some point replaced by ``redo()`` (the same site call with float64 Grams); their error
    rows become 0. NaN bounds (non-finite or undefined records) do not count."""
    err = f.table[_ROWS_PER_POINT::_ROWS_PER_POINT]
    bad = (err > tolerance).any(0)
    if redo is None or not bool(bad.any()):
        return f
    table = f.table.clone()
    table[:, bad] = redo().table[:, bad]
    table[_ROWS_PER_POINT::_ROWS_PER_POINT][:, bad] = 0.0
    return dataclasses.replace(f, table=table)


def _to_host(tables: list[torch.Tensor]) -> list[list[list[float]]]:
    """Move every table to the host with one transfer per device; nested Python lists."""
    out: list[list[list[float]] | None] = [None] * len(tables)
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tables):
        by_device.setdefault(t.device, []).append(i)
    for idx in by_device.values():
        flat = torch.cat([tables[i].flatten() for i in idx]).cpu()
        start = 0
        for i in idx:
            size = tables[i].numel()
            out[i] = flat[start : start + size].view(tables[i].shape).tolist()
            start += size
    return out  # type: ignore[return-value]


def _none_if_nan(v: float) -> float | None:
    return None if math.isnan(v) else v


def _centered_dim(site: Site, dim: int) -> int:
    """The rank bound of a norm's centred items: ``dim - 1`` where it subtracts each item's mean
    over its ``dim`` entries (they are orthogonal to the ones vector), else ``dim``."""
    return dim - 1 if site.norm is not None and site.norm.centers else dim


def _by_construction(f: _Finished, point: str, n: int) -> bool:
    """More items than the rank bound of ``point``'s items: the Gram is singular by construction."""
    if point == "post":
        return n > f.post_dim
    return n > (_centered_dim(f.site, f.dim) if point in ("centered", "normalized") else f.dim)


def _records(f: _Finished, table: list[list[float]], mode: str | None = None) -> list[Record]:
    out = []
    ns = table[0]
    groups = f.groups or [(i, None) for i in range(len(ns))]
    for j, point in enumerate(f.points):
        first = 1 + _ROWS_PER_POINT * j
        gap_row, og_row, bound_row, holds_row, factor_row, eps_row, err_row = table[first : first + _ROWS_PER_POINT]
        for i, n in enumerate(ns):
            n = int(n)
            base = dict(
                site=f.site.name,
                kind=f.site.kind,
                point=point,
                view=f.view,
                item=groups[i][0] if f.token_items else None,
                window=groups[i][1],
                mode=mode,
                step=f.step,
                call=f.call,
                n=n,
                dim=f.post_dim if point == "post" else f.dim,
            )
            gap = gap_row[i]
            if n < 2:
                out.append(
                    Record(**base, isometry=None, isometry_gap=None, orthogonality_gap=None, flag=_rec.UNDEFINED)
                )
                continue
            if math.isnan(gap):
                out.append(
                    Record(
                        **base,
                        isometry=None,
                        isometry_gap=None,
                        orthogonality_gap=_none_if_nan(og_row[i]),
                        flag=_rec.NONFINITE,
                    )
                )
                continue
            holds = holds_row[i]
            out.append(
                Record(
                    **base,
                    isometry=math.exp(-gap),
                    isometry_gap=gap,
                    orthogonality_gap=_none_if_nan(og_row[i]),
                    theorem1_bound=_none_if_nan(bound_row[i]),
                    theorem1_holds=None if math.isnan(holds) else bool(holds),
                    norm_factor=_none_if_nan(factor_row[i]),
                    flag=_rec.EPS_DOMINATED
                    if eps_row[i] == 1
                    else _rec.SINGULAR
                    if math.isinf(gap) and _by_construction(f, point, n)
                    else None,
                    gap_error=_none_if_nan(err_row[i]),
                )
            )
    return out


def _running_statistics(site: Site) -> bool:
    """Is ``site`` a batch norm module in eval mode that normalises with its running statistics?
    Then it applies a fixed per-channel affine map, not a normalisation of the batch: its
    ``centered``/``normalized`` points (and Corollary 3) would describe an operation that does not
    run, so only ``pre`` and ``post`` are measured."""
    module, spec = site.module, site.norm
    batch = spec is not None and spec.rule in ("batch", "batch-rms")
    return batch and not module.training and getattr(module, "running_mean", None) is not None


def _same_tensor(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Do ``a`` and ``b`` hold the same values in the same memory? (Under ``torch.compile`` a hook
    pair may see two tensor objects for one input, so identity alone would say "changed".)"""
    if a is b:
        return True
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return False
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype


def _version(x: torch.Tensor | None) -> int | None:
    """``x``'s version counter (bumped by every in-place change), ``None`` for no tensor or an
    inference tensor (``torch.inference_mode``), which has none."""
    return None if x is None or x.is_inference() else x._version


def _in_point_order(made: list[list[Record]]) -> list[Record]:
    """The records of several measurements, in order; the two measurements of one site call in
    two views (:meth:`Probe._plan`, queued one after the other) merged in the order of
    :data:`isoprobe.records.POINTS`."""
    out: list[Record] = []
    previous: list[Record] = []
    for records in made:
        if (
            records
            and previous
            and (records[0].site, records[0].step, records[0].call)
            == (
                previous[0].site,
                previous[0].step,
                previous[0].call,
            )
        ):
            del out[len(out) - len(previous) :]
            records = sorted(previous + records, key=_point_rank)
        out.extend(records)
        previous = records
    return out


def _point_rank(r: Record) -> int:
    return _rec.POINTS.index(r.point)


def _describe(t: torch.Tensor | None) -> str:
    return "no tensor" if t is None else f"a {t.dtype} tensor"


_FORWARD_ARGS = ("attention_mask", "decoder_attention_mask", "encoder_outputs")


def _mask_signature(model: nn.Module) -> inspect.Signature | None:
    """The forward's signature if it takes one of ``_FORWARD_ARGS`` (to find it passed by position)."""
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None
    return signature if any(a in signature.parameters for a in _FORWARD_ARGS) else None


def _as_mask(mask: Any) -> torch.Tensor | None:
    return mask if isinstance(mask, torch.Tensor) and mask.ndim == 2 else None


def _defer(device: torch.device) -> bool:
    """Finish statistics at the end of the forward (no sync in hooks) on all but the CPU."""
    return device.type != "cpu"


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if device.type in ("cpu", "cuda", "xpu", "mps"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------- Probe


_SITES_ACCEPTS = (
    "None (every site), 'norm', 'activation', a glob on module names such as "
    "'transformer.h.*.ln_*', or a list of these strings"
)


def _check_sites_argument(sites: object) -> None:
    """``sites`` is None, a string or a list/tuple of strings; anything else is a TypeError
    saying what it accepts."""
    if sites is None or isinstance(sites, str):
        return
    if not isinstance(sites, (list, tuple)):
        raise TypeError(f"sites must be {_SITES_ACCEPTS}; got {type(sites).__name__} {sites!r}")
    bad = [s for s in sites if not isinstance(s, str)]
    if bad:
        raise TypeError(f"sites must be {_SITES_ACCEPTS}; the list holds {type(bad[0]).__name__} {bad[0]!r}")


def _check_options(model: object, view: object, every: object, gram_dtype: object, attention_mask: Any) -> None:
    """The Probe's arguments, each a ``TypeError``/``ValueError`` saying what it accepts."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if view not in _VIEWS:
        raise ValueError(f"view must be one of {', '.join(_VIEWS)}; got {view!r}")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be a positive integer, got {every!r}")
    if gram_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"gram_dtype must be torch.float64 or torch.float32, got {gram_dtype}")
    if attention_mask is not None and attention_mask.ndim != 2:
        raise ValueError(f"attention_mask must be shaped (batch, seq), got {tuple(attention_mask.shape)}")


def _check_training_options(window: object, step: object, view: object) -> None:
    """``window``: None or an integer of at least 2 tokens, for the token view; ``step``: None or
    a function."""
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 2):
        raise ValueError(f"window must be an integer number of tokens, at least 2, or None; got {window!r}")
    if window is not None and view not in ("auto", "token"):
        raise ValueError(f"window cuts token Grams: it needs view='token' or 'auto', not view={view!r}")
    if step is not None and not callable(step):
        raise TypeError(f"step must be a function giving the current training step (or None), got {step!r}")


class Probe:
    """Measure the isometry of a model's representations at its norm and activation sites.

    Parameters
    ----------
    model: the model; nothing in it is changed (hooks are added on enter, removed on exit).
    sites: ``None`` (all), ``"norm"``, ``"activation"``, a glob on site names, or a list of these
        (kinds and ``None`` pick functional sites too: ``calls``).
    view: ``"auto"``, ``"token"``, ``"sample"``, ``"feature"`` or ``"spatial"`` (module docstring).
    every: record every ``every``-th training step (steps 0, every, 2·every, ...; "Training
        steps" above: the forwards of a model only run in eval mode, else its training forwards).
    attention_mask: ``(batch, seq)`` mask (1 = real token) used for the token view instead of
        the one the model's forward receives (in an encoder-decoder model: the encoder's; its
        decoder sites take the ``decoder_attention_mask`` the forward receives, if any).
    gram_dtype: ``torch.float64`` (default) or ``torch.float32`` (Grams formed in float32, half
        the cost on a CPU; each record states an estimate of its gap's error, ``Record.gap_error``,
        and an item group whose estimate exceeds ``float32_tolerance`` at some point, e.g. near
        collapse, is recomputed with float64 Grams: see "float32 Grams" above).
    gather: under ``torch.distributed`` (e.g. DistributedDataParallel), form the sample and
        feature views over the global batch: every rank all-gathers each site's input and output
        (:func:`isoprobe.distributed.all_gather_features`, no gradient) and records the same
        global statistics; token Grams stay per rank. Every rank must run the probed forwards.
        Without a process group it changes nothing.
    equal_batches: with ``gather``, promise that every rank's batch has the same size (DDP with
        ``drop_last``), which skips the size exchange and its host synchronisation on a GPU.
    sink: bounded memory for long runs: a path (``.csv``, or ``.jsonl`` for JSON lines) or a
        :class:`~isoprobe.records.RecordSink`; every record is written there as it is made and
        only per-(site, call, point) running summaries stay in memory (``summary()``), while
        ``records``/``pop_records()``/``probe[key]`` refuse (the records are in the file).
    calls: also record *functional sites*, the activations and norms a module's forward applies
        as functions (``F.relu``, ``torch.tanh``, ``x.relu_()``, ``F.layer_norm``, ...), named
        ``"owner:function@index"`` (:mod:`isoprobe.calls`); ``False`` records module sites only.
        A ``sites`` glob with a ``:`` selects functional sites (``"*:relu"``, ``"layer1.**:*"``);
        it is matched as the forward runs (a warning names one that matched no call).
    window: token view: Grams over consecutive windows of at most ``window`` tokens (at least
        2) instead of whole sequences ("Tokens per Gram" above); ``None``: whole sequences.
    step: a function giving the current training step (``lambda: trainer.state.global_step``),
        which replaces the Probe's own count of training forwards ("Training steps" above).
    probe_eval: record eval-mode forwards made after the first training-mode one too (at the
        current step, ``mode="eval"``); by default they are not recorded.
    sink_mode: what a ``sink`` path that exists and is not empty gets: ``"new"`` (default) a
        ``FileExistsError`` naming it, ``"append"`` the new records after the old ones,
        ``"overwrite"`` a fresh file.

    Records are made during calls of ``model``; ``probe.records`` lists them in forward order.
    Use as a context manager, or ``attach()``/``detach()`` (e.g. from a training callback).
    Off the CPU, Grams wait on the device until the forward ends; if they exceed
    ``max_pending_bytes`` the waiting statistics are finished early (one synchronisation).
    """

    max_pending_bytes: int = 2**30
    float32_tolerance: float = 1e-3

    def __init__(
        self,
        model: nn.Module,
        sites: str | Sequence[str] | None = None,
        view: View = "auto",
        every: int = 1,
        *,
        attention_mask: torch.Tensor | None = None,
        gram_dtype: torch.dtype = torch.float64,
        gather: bool = False,
        equal_batches: bool = False,
        sink: str | Path | RecordSink | None = None,
        calls: bool = True,
        sink_mode: str = "new",
        window: int | None = None,
        step: Callable[[], int] | None = None,
        probe_eval: bool = False,
    ) -> None:
        _check_options(model, view, every, gram_dtype, attention_mask)
        _check_training_options(window, step, view)
        _check_sites_argument(sites)
        model = eager_module(model)
        found = discover_sites(model)
        functional = calls and may_call(model)
        if not found and sites is None and not functional:
            raise ValueError(no_site_message(model))
        self.model = model
        self.sites = select_sites(found, sites, model, functional=functional)
        modules = [s.module for s in found]
        self._functional = (
            FunctionalSites(model, modules, sites, self._site_observer, self._is_recording) if functional else None
        )
        self.view = view
        self.every = every
        self.attention_mask = attention_mask
        self.gram_dtype = gram_dtype
        self.gather = gather
        self.equal_batches = equal_batches
        self.window = window
        self.probe_eval = probe_eval
        self._step_fn = step
        self._tol = math.sqrt(torch.finfo(gram_dtype).eps)
        self._forward_sig = _mask_signature(model)
        stacks = encoder_decoder(model)
        self._streams = None if stacks is None else Streams(*stacks)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._tokens: list[tuple[int, str, int]] = []  # its hooks' slots (isoprobe.compiled)
        self._records: list[Record] = []
        self._sink = sink if isinstance(sink, RecordSink) or sink is None else RecordSink(sink, sink_mode)
        self._running = RunningSummary()
        self._pending: list[_Pending | _Finished] = []
        self._pending_bytes = 0
        self._calls = 0  # training steps counted (forwards, before the first training-mode one)
        self._step = 0  # the step of the current (or last) forward
        self._mode = "eval"  # and its mode
        self._trained = False  # has a training-mode forward run?
        self._step_set = False  # has the user set probe.step?
        self._recording = False
        self._masks: dict[str | None, torch.Tensor | None] = {}  # stream -> its mask (None: a single stack)
        self._masks_by_device: dict[tuple[str | None, torch.device], torch.Tensor] = {}
        self._warned: set[str] = set()
        self._work = _Workspace()
        self._site_calls: dict[str, int] = {}  # site -> calls of its module in this forward
        self._open: dict[str, list[_Call | None]] = {}  # site -> its calls begun and not yet ended
        self._layouts: dict[tuple[int, ...], bool] = {}  # (B, H, W) of a spatial map -> channels-last
        self._windows: dict[tuple[Any, ...], WindowLayout] = {}  # this forward's windows (isoprobe.windows)
        self._singular: dict[str, tuple[int, int]] = {}  # site -> (tokens, rank bound): singular token Grams
        self._raised_before: BaseException | None = None  # the exception being handled when the forward began

    @property
    def functional_sites(self) -> list[Site]:
        """The selected functional sites called so far (:mod:`isoprobe.calls`), in order of
        first call; a site's ``module`` is the module whose forward made the call."""
        return [] if self._functional is None else self._functional.sites

    # -- lifecycle
    def attach(self) -> Probe:
        """Register the hooks (what ``with`` does on enter)."""
        if self._handles:
            raise RuntimeError("this Probe is already attached")
        try:
            hook, token = outer_hook(self.model, "call", self._on_call)
            self._tokens.append(token)
            self._handles.append(self.model.register_forward_pre_hook(hook, with_kwargs=True))
            for site in self.sites:
                before, after = self._site_hooks(site)
                hook, token = site_pre_hook(site.module, before)
                self._tokens.append(token)
                self._handles.append(site.module.register_forward_pre_hook(hook, with_kwargs=True))
                hook, token = site_hook(site.module, after)
                self._tokens.append(token)
                self._handles.append(site.module.register_forward_hook(hook, with_kwargs=True))
            if self._functional is not None:
                handles, tokens = self._functional.attach()
                self._handles.extend(handles)
                self._tokens.extend(tokens)
            if self._streams is not None:
                handles, tokens = self._streams.hooks(self.model, outer_hook)
                self._handles.extend(handles)
                self._tokens.extend(tokens)
            hook, token = outer_hook(self.model, "return", self._on_return)
            self._tokens.append(token)
            self._handles.append(self.model.register_forward_hook(hook, always_call=True))
        except BaseException:
            self.detach()
            raise
        return self

    def detach(self) -> None:
        """Remove every hook (what ``with`` does on exit); keeps the records."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for token in self._tokens:
            release(token)
        self._tokens.clear()
        if self._functional is not None:
            self._functional.stop()
        self._recording = False
        self._flush()
        self._work.clear()
        if self._sink is not None:
            self._sink.close()

    def __enter__(self) -> Probe:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    # -- hooks
    def _on_call(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._count_step(bool(self.model.training))
        self._site_calls = {}
        self._open = {}
        self._layouts = {}
        self._raised_before = sys.exc_info()[1]
        self._masks_by_device = {}
        self._windows = {}
        passed = self._passed(args, kwargs)
        mask = _as_mask(self.attention_mask if self.attention_mask is not None else passed.get("attention_mask"))
        if self._streams is None:
            self._masks = {None: mask}
            return
        self._masks = {ENCODER: mask, DECODER: _as_mask(passed.get("decoder_attention_mask"))}
        self._streams.start(passed.get("encoder_outputs"))

    def _count_step(self, training: bool) -> None:
        """This forward's step and mode, and whether it is recorded ("Training steps" above)."""
        if training and not self._trained and not self._step_set:
            self._calls = 0  # eval forwards before training were inference: training starts at step 0
        self._trained = self._trained or training
        counted = training or not self._trained
        self._step = int(self._step_fn()) if self._step_fn is not None else self._calls
        self._mode = "train" if training else "eval"
        self._recording = self._step % self.every == 0 if counted else self.probe_eval
        if counted and self._step_fn is None:
            self._calls += 1

    @property
    def step(self) -> int:
        """The training step the next training-mode forward is recorded at (module docstring,
        "Training steps"); set it to resume a count, e.g. ``probe.step = 1000``. With a ``step``
        function given to the Probe, that function's value (and setting it is an error)."""
        return int(self._step_fn()) if self._step_fn is not None else self._calls

    @step.setter
    def step(self, value: int) -> None:
        if self._step_fn is not None:
            raise AttributeError("this Probe takes its step from the step function it was given; set that instead")
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"step must be a non-negative integer, got {value!r}")
        self._calls = value
        self._step_set = True

    def _passed(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """The forward's arguments by name: its keywords, and its positional arguments where its
        signature names one of ``_FORWARD_ARGS``."""
        if not args or self._forward_sig is None:
            return kwargs
        with contextlib.suppress(TypeError):
            return {**kwargs, **self._forward_sig.bind_partial(*args, **kwargs).arguments}
        return kwargs

    def _on_return(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        raised = sys.exc_info()[1] not in (
            None,
            self._raised_before,
        )  # torch runs this hook while the forward's error is handled
        if self._recording and not raised:
            self._check_ran()
        self._recording = False
        if self._streams is not None:
            self._streams.stop()
        self._warn_singular()
        self._flush()

    def _is_recording(self) -> bool:
        return self._recording

    def _check_ran(self) -> None:
        """Warn (once) when no site ran in a recorded forward, and for a functional-site
        pattern that no call of the forward matched."""
        if self._functional is not None:
            seen = self._functional.seen()
            for pattern in self._functional.unmatched():
                self._warn_once(
                    f"pattern:{pattern}",
                    f"site pattern {pattern!r} matched no functional call in forward {self._step} "
                    f"(calls seen: {', '.join(seen[:6]) or 'none'}{', ...' if len(seen) > 6 else ''})",
                )
        if self._site_calls:
            return
        if not self.sites:  # functional sites only, and none was called
            self._warn_once("no-site", f"no site ran in forward {self._step}: {no_site_message(self.model)}")
        else:
            self._warn_once(
                "no-site",
                f"no site of this Probe ran in the forward at step {self._step}, so it has no records. Either the "
                "selected modules do not run inside the model's forward (generate() runs an encoder-decoder's "
                "encoder outside it: probe the encoder itself), or the model is compiled and runs code that "
                "torch.compile traced without this Probe's hooks (dynamo does not trace again when hooks are "
                "added): attach the Probe before the first compiled forward, keep it attached, or call "
                "torch.compiler.reset() after attaching it",
            )

    def _site_hooks(self, site: Site) -> tuple[Callable[[torch.Tensor | None], None], Callable[..., None]]:
        """``(before, after)``: one call of ``site`` measured in two halves, the entry point for
        anything that can run code just before and just after a call. ``before(x)``, given the
        call's first input ``x`` before it runs, measures what ``x`` gives (``pre``, a norm's
        ``centered`` and ``normalized``), so an in-place module cannot have overwritten it; no
        copy of ``x`` is kept. ``after(x, y)``, given the input and output after the call, adds
        ``post``. Calls of one site may nest (a stack). A named module (kind ``"module"``, whose
        view may depend on its output) is measured whole in ``after``, unless its input was
        changed in place meanwhile (then it is skipped with a warning)."""

        def before(x: torch.Tensor | None) -> None:
            if not self._recording:
                return
            x = whole(x)  # a DTensor (tensor/sequence parallel): its full value, on every rank
            call = self._site_calls.get(site.name, 0)
            self._site_calls[site.name] = call + 1
            self._open.setdefault(site.name, []).append(self._begin(site, x, call))

        def after(x: torch.Tensor | None, y: torch.Tensor | None) -> None:
            opened = self._open.get(site.name)
            if self._recording and opened:
                begun = opened.pop()
                if begun is not None:  # a DTensor input: the full value ``before`` read
                    self._end(site, begun, begun.x if is_dtensor(x) else x, whole(y))

        return before, after

    def _site_observer(self, site: Site) -> Callable[[torch.Tensor | None, torch.Tensor | None], None]:
        """A functional site's observer (:mod:`isoprobe.calls`): given the call's input as it was
        before the call (a copy for an in-place call) and its output, both halves of
        :meth:`_site_hooks` at once."""
        before, after = self._site_hooks(site)

        def observe(x: torch.Tensor | None, y: torch.Tensor | None) -> None:
            before(x)
            after(x, y)

        return observe

    def _begin(self, site: Site, x: torch.Tensor | None, call: int) -> _Call | None:
        """The first half of :meth:`_site_hooks`: the input's measurements, in the views of
        :meth:`_plan`; ``None`` when there is nothing to measure."""
        begun = _Call(call, x, _version(x))
        if site.kind == "module" or x is None or not x.is_floating_point() or x.numel() == 0:
            return begun  # decided with the output, in _end
        with torch.no_grad(), _no_autocast(x.device), suspended():
            gathered = None
            for view, last, points in self._plan(site, x):
                if self.gather and view != "token" and gathered is None:
                    gathered = all_gather_features(x, same_size=self.equal_batches)
                z = gathered if self.gather and view != "token" else x
                mask = self._mask_for(site, z) if view == "token" else None
                layout = None
                if view == "token" and self.window is not None:
                    z, mask, layout = self._windowed(z, mask)
                pending = _measure_input(
                    site, z.detach(), view, mask, self.gram_dtype, self._step, call, self._work, points, last
                )
                pending.groups = None if layout is None else layout.groups
                begun.parts.append((pending, (view, mask, points, last, layout)))
        return begun

    def _end(self, site: Site, begun: _Call, x: torch.Tensor | None, y: torch.Tensor | None) -> None:
        """The second half of :meth:`_site_hooks`: ``post`` from the output ``y``, then the
        measurements are finished (or, off the CPU, queued until the forward ends)."""
        x_now = begun.x
        if begun.version is None:  # an inference tensor has no version counter: the module's word
            changed = getattr(site.module, "inplace", False) is True
        else:
            changed = not _same_tensor(x, x_now) or _version(x_now) != begun.version
        if not begun.parts:
            if changed:
                why = "it changed its input in place, so that input is gone"
                return self._warn_once(f"skip:{site.name}", f"site {site.name!r} is not measured: {why}")
            return self._measure_whole(site, x, y, begun.call)
        if y is None or not y.is_floating_point() or y.shape != x_now.shape:  # GLU halves its input
            if changed:
                why = "its output's shape differs from its input's, which it changed in place"
                return self._warn_once(f"skip:{site.name}", f"site {site.name!r} is not measured: {why}")
            return self._measure_whole(site, x, y, begun.call)
        with torch.no_grad(), _no_autocast(y.device), suspended():
            gathered = None
            for pending, (view, mask, points, last, layout) in begun.parts:
                if self.gather and view != "token" and gathered is None:
                    gathered = all_gather_features(y, same_size=self.equal_batches)
                z = gathered if self.gather and view != "token" else y
                if layout is not None:
                    z = windowed(z, layout)
                if view == "token" and "singular" not in self._warned:
                    self._note_singular(site, begun.call, z.shape[1], x_now.shape[-1], z.shape[-1], mask)
                args = None  # a float64 measurement is never redone; an input changed in place is gone
                if not changed and self.gram_dtype == torch.float32:
                    x_in = x_now if layout is None else windowed(x_now, layout)
                    if self.gather and view != "token":  # the redo pairs the global input with z
                        x_in = all_gather_features(x_now, same_size=self.equal_batches)
                    args = (site, x_in.detach(), z.detach(), view, mask, points, last)
                self._queue(_measure_output(pending, z.detach()), args, begun.call)

    def _measure_whole(self, site: Site, x: torch.Tensor | None, y: torch.Tensor | None, call: int) -> None:
        """A named module's call, from its input and output together (both views known)."""
        view = self._view_for(site, x, y)
        if view is None:
            return
        with torch.no_grad(), _no_autocast(x.device), suspended():
            if self.gather and view != "token":  # the global batch under DistributedDataParallel
                x = all_gather_features(x, same_size=self.equal_batches)
                y = all_gather_features(y, same_size=self.equal_batches)
            mask = self._mask_for(site, x) if view == "token" else None
            groups = None
            if view == "token" and self.window is not None and x.shape[:2] == y.shape[:2]:
                x, mask, layout = self._windowed(x, mask)
                y, groups = windowed(y, layout), layout.groups
            if view == "token" and "singular" not in self._warned:
                self._note_singular(site, call, x.shape[1], x.shape[-1], y.shape[-1], mask)
            last = view == "spatial" and self._layouts.get(tuple(x.shape[:3]), False)
            args = (site, x.detach(), y.detach(), view, mask, None, last)
            pending = _measure(*args[:5], self.gram_dtype, self._step, call, self._work, None, last)
            pending.groups = groups
            self._queue(pending, args, call)

    def _queue(self, pending: _Pending, args: tuple | None, call: int) -> None:
        """Finish ``pending`` now (CPU, float32 Grams) or at the end of the forward; ``args``
        re-measure it with float64 Grams if its float32 error estimate is too large (``None``:
        the input is gone, overwritten in place, and the float32 values stay with their estimate)."""
        if self.gram_dtype == torch.float32:  # its error estimates decide now (a sync off the CPU)
            redo = None if args is None else functools.partial(self._measured_in_float64, args, call)
            self._pending.append(_checked(_finish(pending, self._tol), self.float32_tolerance, redo))
            return
        if not _defer(pending.n.device):
            self._pending.append(_finish(pending, self._tol))
            return
        self._pending.append(pending)
        for t in (pending.grams, pending.gram_normalized):
            self._pending_bytes += 0 if t is None else t.numel() * t.element_size()
        if self._pending_bytes > self.max_pending_bytes:  # rare sync that bounds device memory
            self._finish_pending()

    def _measured_in_float64(self, args: tuple, call: int) -> _Finished:
        """A float32-Gram measurement redone with float64 Grams (its error estimate was too large)."""
        site, x, y, view, mask, points, last = args
        return _finish(
            _measure(site, x, y, view, mask, torch.float64, self._step, call, self._work, points, last), _TOL64
        )

    def _plan(self, site: Site, x: torch.Tensor) -> list[tuple[str, bool, tuple[str, ...]]]:
        """``(view, channels-last, points)`` of each measurement of a call of ``site`` on ``x``.

        The depth view (``view="auto"``: token for ``(B, S, H)`` activations, sample otherwise; an
        explicit view as given, the spatial view only for 4-D maps, sample for the others) holds
        ``pre`` and ``post``, so that a tensor gets the same number at the end of one site and the
        start of the next. With ``"auto"``, a norm's ``centered`` and ``normalized`` points are
        measured in the view whose items it normalises (:func:`_check_view`: where Theorem 1,
        or Corollary 3 for batch norms, is checked), which may differ from the depth view."""
        view, last = self.view, False
        if view == "auto":
            view = "token" if x.ndim == 3 else "sample"
        elif view == "spatial" and x.ndim != 4:
            view = "sample"
        elif view == "spatial":
            last = self._spatial_layout(site, x)
        spec = site.norm
        if spec is None or _running_statistics(site):
            return [(view, last, ("pre", "post"))]
        check = _check_view(spec, x.ndim) if self.view == "auto" else None
        if check is None or check == (view, last):
            return [(view, last, _rec.POINTS)]
        return [(view, last, ("pre", "post")), (*check, ("centered", "normalized"))]

    def _spatial_layout(self, site: Site, x: torch.Tensor) -> bool:
        """Is the 4-D ``x`` channels-last ``(B, H, W, C)``? A norm over the channels says so for
        its own input (channels-first) and a norm over the last dimension (channels-last); the
        other sites take the layout of the last such norm of this forward whose ``(B, H, W)``
        matches, and are read channels-first (torch's convolution layout) without one."""
        check = None if site.norm is None else _check_view(site.norm, 4)
        if check is not None and check[0] == "spatial":
            self._layouts[tuple(x.shape[:3]) if check[1] else (x.shape[0], *x.shape[2:])] = check[1]
            return check[1]
        return self._layouts.get(tuple(x.shape[:3]), False)

    def _view_for(self, site: Site, x: torch.Tensor | None, y: torch.Tensor | None) -> str | None:
        """The view of a named module's call: ``auto``: token for 3-D input and output of the
        same ``(batch, seq)``, sample otherwise (a pooler: 3-D in, 2-D out, sample at both
        points); ``spatial``: for 4-D input and output, else sample. ``None``: nothing to measure
        (an empty tensor; warned once)."""
        if x is None or y is None or not x.is_floating_point() or not y.is_floating_point():
            return self._skip(
                site,
                "its first input and its output are not both floating-point tensors "
                f"(got {_describe(x)} and {_describe(y)})",
            )
        if x.numel() == 0 or y.numel() == 0:  # an empty call (no audio tokens in this batch)
            return self._skip(site, f"it ran on an empty tensor ({_describe(x)} to {_describe(y)})")
        if x.shape[0] != y.shape[0] and self.view != "feature":
            return self._skip(
                site,
                f"its input {tuple(x.shape)} and output {tuple(y.shape)} have "
                "different batch sizes, so their items cannot be paired",
            )
        if self.view == "spatial":
            return "spatial" if x.ndim == 4 and y.ndim == 4 else "sample"
        if self.view != "auto":
            return self.view
        if x.ndim == 3 and y.ndim == 3 and x.shape[:2] == y.shape[:2]:
            return "token"
        return "sample"

    def _skip(self, site: Site, why: str) -> None:
        if site.kind == "module":
            self._warn_once(f"skip:{site.name}", f"site {site.name!r} is not measured: {why}")
        return None

    def _mask_for(self, site: Site, x: torch.Tensor) -> torch.Tensor | None:
        """The padding mask of the tokens that ``x``'s rows are (``None``: all real)."""
        stream = None if self._streams is None else self._streams.stream(x)
        if self._streams is not None and stream is None:
            if any(m is not None for m in self._masks.values()):
                self._warn_once(
                    f"mask:{site.name}",
                    f"site {site.name!r} runs outside the encoder and the decoder and reads neither's output, "
                    "so whose padding mask applies is unknown: its tokens are all counted",
                )
            return None
        if self._streams is not None and self._streams.foreign(x) and any(m is not None for m in self._masks.values()):
            self._warn_once(
                f"mask:{site.name}",
                f"site {site.name!r} in the decoder reads a tensor given to the decoder that is no output of "
                "the encoder or of a module run on it and is as long as the source: whether its tokens are "
                "the source's or the target's is unknown, so the decoder's padding mask (if any) is applied",
            )
        mask = self._masks.get(stream)
        if mask is None:
            return None
        if tuple(mask.shape) != tuple(x.shape[:2]):
            which = "decoder attention mask" if stream == DECODER else "attention mask"
            self._warn_once(
                f"mask:{site.name}",
                f"{which} of shape {tuple(mask.shape)} does not match the (batch, seq) = "
                f"{tuple(x.shape[:2])} of site {site.name!r}: its tokens are all counted",
            )
            return None
        key = (stream, x.device)
        if key not in self._masks_by_device:
            self._masks_by_device[key] = mask.to(x.device, non_blocking=True) != 0
        return self._masks_by_device[key]

    def _windowed(
        self, x: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, WindowLayout]:
        """``x`` and its mask cut into windows of at most ``window`` tokens, and the layout that
        cuts the output alike (:mod:`isoprobe.windows`; one layout per mask and shape in a forward)."""
        key = (None if mask is None else id(mask), *x.shape[:2], x.device)
        layout = self._windows.get(key)
        if layout is None:
            layout = self._windows[key] = window_layout(mask, x.shape[0], x.shape[1], self.window, x.device)
        return windowed(x, layout), layout.mask, layout

    def _note_singular(
        self, site: Site, call: int, length: int, width_in: int, width_out: int, mask: torch.Tensor | None
    ) -> None:
        """Note a site whose token Grams (of ``length`` tokens, padding included; items
        ``width_in`` wide before the call and ``width_out`` after) have more tokens than their rank
        bound (warned at the forward's end, once per Probe); a host sync only where the padded
        length exceeds it."""
        bound = min(_centered_dim(site, width_in), width_out)
        if length <= bound:
            return
        tokens = length if mask is None else int(mask.sum(-1).max())
        if tokens > bound:
            self._singular[_rec.site_label(site.name, call)] = (tokens, bound)

    def _warn_singular(self) -> None:
        if not self._singular or "singular" in self._warned:
            return
        sites = list(self._singular.items())
        fit = min(bound for _, (_, bound) in sites)
        listed = ", ".join(f"{name} ({tokens} tokens > {bound})" for name, (tokens, bound) in sites[:4])
        more = f" and {len(sites) - 4} more" if len(sites) > 4 else ""
        self._warn_once(
            "singular",
            f"token Grams singular by construction at {len(sites)} site{'s' * (len(sites) != 1)}: more tokens "
            f"than the rank of their items allows (their width; one less after a norm's centring): {listed}{more}. "
            f"Their gap is +inf whatever the model does and they get no Theorem 1 check; "
            f"{'a smaller ' if self.window else ''}Probe(..., window={fit}) (isoprobe gpt2/inspect --window {fit}) "
            "measures Grams over consecutive windows of at most that many tokens, which can be full rank",
            SingularGramWarning,
        )
        self._singular = {}

    def _warn_once(self, key: str, message: str, category: type[Warning] = UserWarning) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, category, stacklevel=3)

    def _finish_pending(self) -> None:
        self._pending = [p if isinstance(p, _Finished) else _finish(p, self._tol) for p in self._pending]
        self._pending_bytes = 0

    def _flush(self) -> None:
        self._finish_pending()
        finished, self._pending = self._pending, []
        if not finished:
            return
        made = [_records(f, table, self._mode) for f, table in zip(finished, _to_host([f.table for f in finished]))]
        self._store(_in_point_order(made))

    def _store(self, records: list[Record]) -> None:
        """Keep ``records``, or (with a sink) write them out and fold them into running summaries."""
        if self._sink is None:
            self._records.extend(records)
        else:
            self._sink.write(records)
            self._running.add(records)

    # -- results
    def _kept(self) -> list[Record]:
        if self._sink is not None:
            raise RuntimeError(
                f"this Probe streams its records to {str(self._sink.path)!r} (sink=...) and keeps only "
                "running summaries: use probe.summary(), or isoprobe.records.read_records(path) for the records"
            )
        if not self._recording:
            self._flush()
        return self._records

    @property
    def records(self) -> list[Record]:
        """All records so far, in forward order (a copy)."""
        return list(self._kept())

    def pop_records(self) -> list[Record]:
        """The records so far, which the Probe then forgets (bounded memory in training loops)."""
        kept = self._kept()
        out = list(kept)
        kept.clear()
        return out

    def __getitem__(self, key: str) -> list[Record]:
        """Records whose key matches the glob ``key`` (:meth:`Record.matches`): ``"site:point"``
        for every call of the module, e.g. ``probe["*.ln_1:pre"]``; ``"site@k:point"`` for its
        k-th call in each forward only (``probe["blocks.act@1:pre"]``; ``@0`` the first); a
        functional site by its name (``probe["layer1.0:relu@0:pre"]``, ``probe["*:gelu"]``).

        A part after the last ``:`` that is neither one of ``pre, centered, normalized, post``
        nor a function of a functional site (nor a glob), or a key that matches none of the
        records made, is a ``KeyError`` that says what there is; a key that is no string
        (``probe[0]``) a ``TypeError``."""
        if not isinstance(key, str):
            raise TypeError(
                f"Probe keys are site names or glob patterns, such as 'transformer.h.3.ln_1:pre' or '*.ln_1:post', "
                f"not {type(key).__name__} {key!r}; probe.records is the list of all records"
            )
        tail = key.rpartition(":")[2] if ":" in key else "*"
        known = tail in _rec.POINTS or tail.partition("@")[0] in FUNCTIONS or any(c in tail for c in "*?[")
        if not known:
            raise KeyError(
                f"{key!r}: the part after ':' must be a point ({', '.join(_rec.POINTS)}), a function "
                f"of a functional site ('relu@0', 'layer_norm') or a glob, got {tail!r}"
            )
        kept = self._kept()
        found = [r for r in kept if r.matches(key)]
        if kept and not found:
            sites = list(dict.fromkeys(r.site for r in kept))
            raise KeyError(
                f"no record matches {key!r}; recorded sites: {', '.join(sites[:6])}{', ...' if len(sites) > 6 else ''}"
                " ('*' stands for one dotted component, '**' for any number)"
            )
        return found

    def summary(self) -> Summary:
        """One row per (site, call, point): mean/std over items and steps (:func:`records.summarize`).

        ``print(probe.summary())`` shows the table; iterating gives the rows as dicts;
        ``.to_pandas()`` a DataFrame. With a ``sink``: the running summaries of every record made.
        The calls of a module used twice in a forward are not mixed.
        """
        if self._sink is not None:
            if not self._recording:
                self._flush()
            return self._running.summary()
        return _rec.summarize(self.records)

    def to_csv(self, path: str | Path) -> Path:
        """Write every record as one CSV row (columns: the :class:`Record` fields) to ``path``."""
        return _rec.to_csv(self.records, path)

    def to_json(self, path: str | Path) -> Path:
        """Write ``{"records": [...]}`` to ``path`` as strict JSON (``+inf`` as ``"inf"``;
        :func:`isoprobe.records.read_json` reads it back)."""
        return _rec.to_json(self.records, path)

    def plot(self, path: str | Path, title: str | None = None) -> Path:
        """Save the gap-along-depth plot (Joudaki et al. 2023, Fig. C.5 style) of the records as
        an image at ``path`` (format from its suffix; :func:`isoprobe.records.plot_records`); with
        a ``sink``, of the records in its file."""
        return _rec.plot_records(self._to_plot(), path, title)

    def plot_steps(self, path: str | Path, title: str | None = None, mode: str | None = "train") -> Path:
        """Save the gap against training step, one axis per point, one line per site coloured by
        depth (:func:`isoprobe.records.plot_steps`; ``mode``: which forwards, ``None`` all); with a
        ``sink``, of the records in its file."""
        return _rec.plot_steps(self._to_plot(), path, title, mode)

    def _to_plot(self) -> list[Record]:
        """The records to draw: those kept, or with a sink every record in its file."""
        if self._sink is None:
            return self.records
        if not self._recording:
            self._flush()
        return _rec.read_records(self._sink.path)


def rank_bounds(model: nn.Module, inputs: dict[str, Any], sites: str | Sequence[str] | None = None) -> dict[str, int]:
    """The most tokens a token Gram of each token-view site can have and still be full rank:
    the narrowest width of its points, one less at a centring norm's ``centered`` and
    ``normalized`` points (centred items are orthogonal to the ones vector). Keys are site
    labels (``site@k`` for a module's k-th call). One forward ``model(**inputs)`` under a
    :class:`Probe` (a two-token input suffices; nothing is kept)."""
    with torch.no_grad(), warnings.catch_warnings(), Probe(model, sites=sites) as probe:
        warnings.simplefilter("ignore")
        model(**inputs)
    by_name = {site.name: site for site in (*probe.sites, *probe.functional_sites)}
    bounds: dict[str, int] = {}
    for r in probe.records:
        if r.view == "token":
            bound = _centered_dim(by_name[r.site], r.dim) if r.point in ("centered", "normalized") else r.dim
            label = _rec.site_label(r.site, r.call)
            bounds[label] = min(bounds.get(label, bound), bound)
    return bounds
