"""The Probe: isometry of a live model's representations, measured by forward hooks.

    with Probe(model, sites=None, view="auto", every=1) as probe:
        model(**batch)
    probe.records      # list[Record] in forward order
    probe.summary()    # one row per (site, call, point)

**Sites** (:mod:`isoprobe.sites`) are found without changing the model: norms and activations
by what the modules do (torch's norm and activation classes, modules declaring an
``isoprobe_site`` attribute as isoprobe's own networks do, and any other module that behaves as
an entrywise nonlinearity or a per-row scale-invariant map on a probe input), and any module by
its qualified name: ``Probe(model, sites=["transformer.h.*", "*.attn"])`` (kind ``"module"``).
A site's name is its qualified module name; a record's key is ``"site:point"``, e.g.
``"transformer.h.3.ln_1:pre"``. A module called more than once in one forward gives one record
per call, told apart by ``Record.call`` (0, 1, ...); the k-th call's key is ``"site@k:point"``
(k ≥ 1), and ``probe["site@k:point"]`` selects it (``probe["site:point"]`` selects every call).

**Points.** Every site has ``pre`` (the module's first tensor input) and ``post`` (its output;
the first tensor of a tuple or dict output). A norm site
also has ``centered`` (``x - mean``, over what the module normalises) and ``normalized``
(centred and divided by ``sqrt(var + eps)`` with the module's own eps, before the affine
part). An RMSNorm does not centre: its ``centered`` point *is* ``pre``. A BatchNorm's
``centered``/``normalized`` points use the batch's own statistics (Corollary 3), whatever the
module's mode; its ``post`` is what the module returned (running statistics in eval mode).

**Views** (SPEC §1): *token* — one Gram per sequence of a ``(batch, seq, hidden)`` activation,
items = tokens, padding excluded by the attention mask the model's forward received (or one
given to the Probe); *sample* — one Gram per batch, items = the flattened samples; *feature* —
the feature covariance ``C = X Xᵀ`` of a batch (items = channels, entries = batch × spatial
positions). ``"auto"``: feature for BatchNorm, token for 3-D activations, sample otherwise.

**Theorem 1** (Joudaki et al. 2023; Corollary 2 for layer norm, Corollary 3 for batch norm):
with item norms ``a_i`` of the centred items, ``I(normalized) ≥ I(centered) · (1 + Var(a)/ā²)``.
Checked on every norm site whose normalisation acts on whole items (token view for a
last-dimension LayerNorm/RMSNorm, sample view for a LayerNorm over all non-batch dimensions or a
one-group GroupNorm, feature view for BatchNorm). The check is ``gap(normalized) ≤ gap(centered)
- log factor + tol``, ``tol = sqrt(eps)`` of the Gram dtype. Caveat: Theorem 1 is about the
projection onto the sphere; a norm's ``eps`` makes it slightly different, and the inequality can
fail when ``eps`` is not small against the items' variance (roughly ``eps > 2.4 var``).

**Numerics** (DESIGN.md, "Numerics that matter"). Grams in ``gram_dtype`` (float64 by default;
float32 is allowed but, on CPU, not faster: ``metrics`` trusts a Cholesky factor of a float32
Gram only far above float32's rank tolerance, so most float32 Grams take the eigenvalue path),
the spectrum always in float64 (``metrics``). A norm site needs two Grams for four points:
``G_c = X_c X_cᵀ``; ``G_pre = G_c + m μ μᵀ`` (``μ`` the per-item means, ``m`` the entries per
item); ``G_norm = D G_c D`` with ``D = diag(1/sqrt(var + eps))``, so ``gap(normalized) =
gap(centered) + log(tr G_norm / tr G_c) - (2/n) Σ log D_ii`` needs no new factorisation (unless
``G_c`` is numerically singular: rescaling its rows can restore a full numerical rank, so
``G_norm`` is then factorised on its own); only ``post`` needs its own Gram.

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

The model is left as found: hooks are removed on exit (also after an exception), the hooks
detach and return nothing (autograd, outputs and train/eval mode untouched), autocast is off
inside them, and each statistic is computed on its activation's own device. A forward that
raises keeps the records of the sites that ran. Records are made only during calls of the model
given to the Probe (not for direct calls of its submodules, nor for activation recomputation by
gradient checkpointing during backward).
"""

from __future__ import annotations

import contextlib
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
from isoprobe.distributed import all_gather_features
from isoprobe.metrics import gram, isometry_gap, norm_variation_factor, orthogonality_gap
from isoprobe.records import Record
from isoprobe.sites import NormSpec, Site, discover_sites, no_site_message, select_sites

__all__ = ["NormSpec", "Probe", "Site", "discover_sites", "select_sites"]

View = Literal["auto", "token", "sample", "feature"]
_VIEWS = ("auto", "token", "sample", "feature")


# --------------------------------------------------------------- statistics of item batches
# Pure tensor math: items are rows, X shaped (g, n, m) = (groups, items, entries per item).


def _items(x: torch.Tensor, view: str) -> torch.Tensor:
    """The activation ``x`` as items ``(g, n, m)`` for ``view`` (see the module docstring)."""
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


def _aligned(spec: NormSpec, view: str, ndim: int) -> bool:
    """Does the norm normalise each item of ``view`` as a whole (Theorem 1 applies)?"""
    if spec.channels and ndim > 2:  # per position over the channels: no view's items
        return False
    if spec.rule in ("layer", "rms"):
        return (view == "token" and spec.dims == 1 and ndim == 3) or (
            view == "sample" and spec.dims == ndim - 1
        )
    if spec.rule == "group":
        return view == "sample" and spec.groups == 1
    return view == "feature"


def _orth_gap(G: torch.Tensor, n: torch.Tensor, padded: bool) -> torch.Tensor:
    """Orthogonality gap of the real block of zero-padded Grams ``(g, N, N)``, ``n`` real items."""
    og = orthogonality_gap(G)
    if not padded:
        return og
    N = G.shape[-1]
    return (og.square() + 1 / N - 1 / n.to(og.dtype)).clamp_min(0).sqrt()


def _gap(G: torch.Tensor, n: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
    """Isometry gap of the real block of zero-padded Grams ``(g, N, N)``: ``gap(padded)·N/n``.

    ``pad`` marks the padded items ``(g, N)``; their diagonal entries get the real block's mean
    eigenvalue ``c = tr(G)/n`` (1 for a zero block), which keeps the trace mean and adds
    ``(N - n) log c`` to ``log det`` (module docstring). May synchronise with the device.
    """
    if pad is None:
        return isometry_gap(G)
    N = G.shape[-1]
    nf = n.to(torch.float64)
    tr = G.diagonal(dim1=-2, dim2=-1).sum(-1).to(torch.float64)
    c = torch.where((tr > 0) & (nf > 0), tr / nf.clamp_min(1), torch.ones_like(tr))
    G = G + torch.diag_embed(pad.to(G.dtype) * c[:, None].to(G.dtype))
    return isometry_gap(G) * (N / nf)


@dataclass
class _Pending:
    """One site call's measurements; ``grams`` wait for their isometry gaps (see ``_finish``)."""

    site: Site
    view: str
    step: int
    call: int  # k-th call of the site's module in this forward
    dim: int  # entries per item of the input (pre, centered, normalized)
    post_dim: int  # entries per item of the output (a named module may change the width)
    n: torch.Tensor  # (g,) items per Gram
    token_items: bool
    points: tuple[str, ...]  # every point of the site, in order
    gram_points: tuple[str, ...]  # the points whose Gram is in grams
    grams: torch.Tensor  # (len(gram_points), g, N, N)
    pad: torch.Tensor | None  # (g, N) padded items
    og: dict[str, torch.Tensor]  # point -> (g,) orthogonality gaps
    same_as_pre: tuple[str, ...] = ()  # points equal to pre (RMSNorm's centered)
    log_ratio: torch.Tensor | None = None  # (g,) gap(normalized) - gap(centered)
    factor: torch.Tensor | None = None  # (g,) norm-variation factor of the centred items
    gram_normalized: torch.Tensor | None = None  # (g, N, N) D G_c D, for a singular G_c


@dataclass
class _Finished:
    """Per-point float64 rows ``(n, gap, og, bound, holds, factor)`` of one site call, (R, g)."""

    site: Site
    view: str
    step: int
    call: int
    dim: int
    post_dim: int
    token_items: bool
    points: tuple[str, ...]
    table: torch.Tensor


_ROWS_PER_POINT = 5


def _measure(
    site: Site,
    x: torch.Tensor,
    y: torch.Tensor,
    view: str,
    mask: torch.Tensor | None,
    gram_dtype: torch.dtype,
    step: int,
    call: int = 0,
) -> _Pending:
    """Everything of one site call (the ``call``-th of its module in forward ``step``) that
    needs no host synchronisation.

    Items are converted to ``gram_dtype`` one tensor at a time (the output only once the input's
    Grams are formed) to keep the extra memory near one float64 copy of one activation. Nothing
    is done in place: the activations belong to the model.
    """
    keep = None if mask is None else mask.to(gram_dtype)[..., None]

    def items(t: torch.Tensor) -> torch.Tensor:  # the items of t in gram_dtype, zero on padding
        z = _items(t, view).to(gram_dtype)
        return z if keep is None else z * keep

    X = items(x)
    g, N, m = X.shape
    if mask is not None:
        n = mask.sum(-1)
        pad = ~mask
    else:
        n = torch.full((g,), N, dtype=torch.int64, device=X.device)
        pad = None
    spec = site.norm
    post_dim = y.shape[-1] if view == "token" else y[:1].numel() if view == "sample" else y.numel() // y.shape[1]
    common = dict(site=site, view=view, step=step, call=call, dim=m, post_dim=post_dim, n=n,
                  token_items=view == "token", pad=pad)
    padded = pad is not None
    points = ("pre", "post") if spec is None else ("pre", "centered", "normalized", "post")
    if N < 2:  # one item per Gram: nothing is defined (records are flagged)
        nan = torch.full((g,), math.nan, dtype=torch.float64, device=X.device)
        return _Pending(points=points, gram_points=(), grams=X.new_zeros(0, g, N, N),
                        og={p: nan for p in points}, **common)

    if spec is None:
        Gpre = gram(X)
        del X
        grams = torch.stack([Gpre, gram(items(y))])
        og = {"pre": _orth_gap(grams[0], n, padded), "post": _orth_gap(grams[1], n, padded)}
        return _Pending(points=("pre", "post"), gram_points=("pre", "post"), grams=grams, og=og, **common)

    if not _aligned(spec, view, x.ndim):
        xc, xn = _normalize_parts(x.to(gram_dtype), spec)
        grams = torch.stack([gram(X), gram(items(xc)), gram(items(xn)), gram(items(y))])
        og = {p: _orth_gap(G, n, padded) for p, G in zip(points, grams)}
        return _Pending(points=points, gram_points=points, grams=grams, og=og, **common)

    # the norm acts on whole items: two Grams serve four points (module docstring)
    mu = X.mean(-1) if spec.centers else None
    Xc = X - mu[..., None] if mu is not None else X
    del X
    Gc = gram(Xc)
    var = Gc.diagonal(dim1=-2, dim2=-1) / m
    eps = torch.finfo(x.dtype).eps if spec.eps is None else spec.eps
    d2 = 1 / (var + eps)  # D_ii²
    Gn = Gc * d2.sqrt()[..., :, None] * d2.sqrt()[..., None, :]
    real = torch.ones_like(var) if mask is None else mask.to(var.dtype)
    nf = n.to(var.dtype)
    log_ratio = (
        (d2 * var * real).sum(-1).log()
        - (var * real).sum(-1).log()
        - (d2.log() * real).sum(-1) / nf
    )
    factor = norm_variation_factor(Xc) * (nf / N)  # zero rows: factor(N items) · n/N, exactly
    del Xc
    Gpost = gram(items(y))
    og = {"normalized": _orth_gap(Gn, n, padded), "post": _orth_gap(Gpost, n, padded)}
    if mu is None:
        grams = torch.stack([Gc, Gpost])
        og["pre"] = og["centered"] = _orth_gap(Gc, n, padded)
        gram_points, same_as_pre = ("pre", "post"), ("centered",)
    else:
        Gpre = Gc + m * mu[..., :, None] * mu[..., None, :]
        grams = torch.stack([Gpre, Gc, Gpost])
        og["pre"], og["centered"] = _orth_gap(Gpre, n, padded), _orth_gap(Gc, n, padded)
        gram_points, same_as_pre = ("pre", "centered", "post"), ()
    return _Pending(
        points=points, gram_points=gram_points, grams=grams, og=og, same_as_pre=same_as_pre,
        log_ratio=log_ratio, factor=factor, gram_normalized=Gn, **common,
    )


def _finish(p: _Pending, tol: float) -> _Finished:
    """Isometry gaps and the Theorem 1 check of one site call (may synchronise the device)."""
    k, g, N, _ = p.grams.shape
    nan = torch.full((g,), math.nan, dtype=torch.float64, device=p.n.device)
    gaps = {q: nan for q in p.points}  # stays NaN only for N < 2 (flagged as undefined)
    if k:
        pad = None if p.pad is None else p.pad.repeat(k, 1)
        gaps.update(zip(p.gram_points, _gap(p.grams.flatten(0, 1), p.n.repeat(k), pad).view(k, g)))
    for q in p.same_as_pre:
        gaps[q] = gaps["pre"]
    extra: dict[str, list[torch.Tensor]] = {}
    if p.log_ratio is not None:
        gc = gaps["centered"]
        gn = (gc + p.log_ratio.to(gc.dtype)).clamp_min(0)
        singular = torch.isinf(gc)
        if bool(singular.any()):  # G_c numerically singular: D G_c D may not be, ask it directly
            pad = None if p.pad is None else p.pad[singular]
            gn[singular] = _gap(p.gram_normalized[singular], p.n[singular], pad).to(gn.dtype)
        gaps["normalized"] = gn
        log_factor = p.factor.to(gc.dtype).log()
        bound = torch.where(torch.isinf(gc), torch.zeros_like(gc), torch.exp(log_factor - gc))
        holds = torch.isinf(gc) | (gn <= gc - log_factor + tol * gc.abs().clamp_min(1))
        holds = torch.where(torch.isnan(gn) | torch.isnan(bound), nan, holds.to(gc.dtype))
        extra["normalized"] = [bound, holds, p.factor.to(gc.dtype)]
    rows = [p.n.to(torch.float64)]
    for q in p.points:
        rows += [gaps[q].to(torch.float64), p.og[q].to(torch.float64)]
        rows += extra.get(q, [nan, nan, nan])
    return _Finished(p.site, p.view, p.step, p.call, p.dim, p.post_dim, p.token_items, p.points,
                     torch.stack(rows))


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


def _records(f: _Finished, table: list[list[float]]) -> list[Record]:
    out = []
    ns = table[0]
    for j, point in enumerate(f.points):
        first = 1 + _ROWS_PER_POINT * j
        gap_row, og_row, bound_row, holds_row, factor_row = table[first : first + _ROWS_PER_POINT]
        for i, n in enumerate(ns):
            n = int(n)
            base = dict(
                site=f.site.name, kind=f.site.kind, point=point, view=f.view,
                item=i if f.token_items else None, step=f.step, call=f.call, n=n,
                dim=f.post_dim if point == "post" else f.dim,
            )
            gap = gap_row[i]
            if n < 2:
                out.append(Record(**base, isometry=None, isometry_gap=None, orthogonality_gap=None,
                                  flag=_rec.UNDEFINED))
                continue
            if math.isnan(gap):
                out.append(Record(**base, isometry=None, isometry_gap=None,
                                  orthogonality_gap=_none_if_nan(og_row[i]), flag=_rec.NONFINITE))
                continue
            holds = holds_row[i]
            out.append(Record(
                **base, isometry=math.exp(-gap), isometry_gap=gap,
                orthogonality_gap=_none_if_nan(og_row[i]),
                theorem1_bound=_none_if_nan(bound_row[i]),
                theorem1_holds=None if math.isnan(holds) else bool(holds),
                norm_factor=_none_if_nan(factor_row[i]),
            ))
    return out


def _first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    for v in (*args, *kwargs.values()):
        if isinstance(v, torch.Tensor):
            return v
    return None


def _first_output(output: Any) -> torch.Tensor | None:
    """The output tensor, or the first tensor of a tuple/list/dict output (a ``ModelOutput``)."""
    if isinstance(output, dict):
        output = tuple(output.values())
    return _first_tensor(output if isinstance(output, (tuple, list)) else (output,), {})


def _describe(t: torch.Tensor | None) -> str:
    return "no tensor" if t is None else f"a {t.dtype} tensor"


def _eager_module(model: nn.Module) -> nn.Module:
    """The model that ``torch.compile`` wraps (its ``OptimizedModule`` keeps it as ``_orig_mod``),
    so that sites keep the eager model's names; any other model as it is."""
    dynamo = sys.modules.get("torch._dynamo")  # not imported: nothing can have been compiled
    while dynamo is not None and isinstance(model, dynamo.eval_frame.OptimizedModule):
        model = model._orig_mod
    return model


def _outside_graphs(hook: Callable[..., None]) -> Callable[..., None]:
    """``hook`` kept out of the graphs ``torch.compile`` traces (``torch.compiler.disable``): it
    runs eagerly between them, so its Python state (step counter, recording flag) is never
    guarded on and cannot cause recompilation, in either order of compiling and probing."""
    return torch.compiler.disable(hook, recursive=True)


def _mask_signature(model: nn.Module) -> inspect.Signature | None:
    """The forward's signature if it takes an ``attention_mask`` (to find it passed by position)."""
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None
    return signature if "attention_mask" in signature.parameters else None


def _defer(device: torch.device) -> bool:
    """Finish statistics at the end of the forward (no sync in hooks) on all but the CPU."""
    return device.type != "cpu"


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if device.type in ("cpu", "cuda", "xpu", "mps"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------- Probe


class Probe:
    """Measure the isometry of a model's representations at its norm and activation sites.

    Parameters
    ----------
    model: the model; nothing in it is changed (hooks are added on enter, removed on exit).
    sites: ``None`` (all), ``"norm"``, ``"activation"``, a glob on site names, or a list of these.
    view: ``"auto"``, ``"token"``, ``"sample"`` or ``"feature"`` (module docstring).
    every: record every ``every``-th forward call of ``model`` (calls 0, every, 2·every, ...).
    attention_mask: ``(batch, seq)`` mask (1 = real token) used for the token view instead of
        the one the model's forward receives.
    gram_dtype: ``torch.float64`` (default) or ``torch.float32`` (cheaper Grams, but not accurate
        near collapse: its rank tolerance flags more Grams as singular; see "Numerics" above).
    gather: under ``torch.distributed`` (e.g. DistributedDataParallel), form the sample and
        feature views over the global batch: every rank all-gathers each site's input and output
        (:func:`isoprobe.distributed.all_gather_features`, no gradient) and records the same
        global statistics; token Grams stay per rank. Every rank must run the probed forwards.
        Without a process group it changes nothing.
    equal_batches: with ``gather``, promise that every rank's batch has the same size (DDP with
        ``drop_last``), which skips the size exchange and its host synchronisation on a GPU.

    Records are made during calls of ``model``; ``probe.records`` lists them in forward order.
    Use as a context manager, or ``attach()``/``detach()`` (e.g. from a training callback).
    Off the CPU, Grams wait on the device until the forward ends; if they exceed
    ``max_pending_bytes`` the waiting statistics are finished early (one synchronisation).
    """

    max_pending_bytes: int = 2**30

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
    ) -> None:
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
        model = _eager_module(model)
        found = discover_sites(model)
        if not found and sites is None:
            raise ValueError(no_site_message(model))
        self.model = model
        self.sites = select_sites(found, sites, model)
        self.view = view
        self.every = every
        self.attention_mask = attention_mask
        self.gram_dtype = gram_dtype
        self.gather = gather
        self.equal_batches = equal_batches
        self._tol = math.sqrt(torch.finfo(gram_dtype).eps)
        self._forward_sig = _mask_signature(model)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._records: list[Record] = []
        self._pending: list[_Pending | _Finished] = []
        self._pending_bytes = 0
        self._calls = 0
        self._step = 0
        self._recording = False
        self._mask: torch.Tensor | None = None
        self._masks_by_device: dict[torch.device, torch.Tensor] = {}
        self._warned: set[str] = set()
        self._site_calls: dict[str, int] = {}  # site -> calls of its module in this forward

    # -- lifecycle
    def attach(self) -> Probe:
        """Register the hooks (what ``with`` does on enter)."""
        if self._handles:
            raise RuntimeError("this Probe is already attached")
        try:
            self._handles.append(
                self.model.register_forward_pre_hook(_outside_graphs(self._on_call), with_kwargs=True)
            )
            for site in self.sites:
                self._handles.append(site.module.register_forward_hook(
                    _outside_graphs(self._site_hook(site)), with_kwargs=True
                ))
            self._handles.append(
                self.model.register_forward_hook(_outside_graphs(self._on_return), always_call=True)
            )
        except BaseException:
            self.detach()
            raise
        return self

    def detach(self) -> None:
        """Remove every hook (what ``with`` does on exit); keeps the records."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._recording = False
        self._flush()

    def __enter__(self) -> Probe:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    # -- hooks
    def _on_call(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._step = self._calls
        self._calls += 1
        self._recording = self._step % self.every == 0
        self._site_calls = {}
        self._masks_by_device = {}
        mask = self.attention_mask
        if mask is None:
            mask = kwargs.get("attention_mask")
            if mask is None and self._forward_sig is not None:
                with contextlib.suppress(TypeError):
                    mask = self._forward_sig.bind_partial(*args, **kwargs).arguments.get("attention_mask")
        self._mask = mask if isinstance(mask, torch.Tensor) and mask.ndim == 2 else None

    def _on_return(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self._recording = False
        self._flush()

    def _site_hook(self, site: Site):
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            if not self._recording:
                return
            call = self._site_calls.get(site.name, 0)
            self._site_calls[site.name] = call + 1
            x = _first_tensor(args, kwargs)
            y = _first_output(output)
            view = self._view_for(site, x, y)
            if view is None:
                return
            with torch.no_grad(), _no_autocast(x.device):
                if self.gather and view != "token":  # the global batch under DistributedDataParallel
                    x = all_gather_features(x, same_size=self.equal_batches)
                    y = all_gather_features(y, same_size=self.equal_batches)
                mask = self._mask_for(site, x) if view == "token" else None
                pending = _measure(site, x.detach(), y.detach(), view, mask, self.gram_dtype, self._step, call)
                if not _defer(x.device):
                    self._pending.append(_finish(pending, self._tol))
                    return
                self._pending.append(pending)
                for t in (pending.grams, pending.gram_normalized):
                    self._pending_bytes += 0 if t is None else t.numel() * t.element_size()
                if self._pending_bytes > self.max_pending_bytes:  # rare sync that bounds device memory
                    self._finish_pending()

        return hook

    def _view_for(self, site: Site, x: torch.Tensor | None, y: torch.Tensor | None) -> str | None:
        """``auto``: feature for BatchNorm; sample for GroupNorm and for a norm over all
        non-batch dimensions; else token for 3-D activations, sample otherwise; for a module
        whose input and output imply different views (a pooler: 3-D in, 2-D out), sample at
        both points. ``None``: nothing to measure (warned once for a named module)."""
        if x is None or y is None or not x.is_floating_point() or not y.is_floating_point():
            return self._skip(site, "its first input and its output are not both floating-point tensors "
                              f"(got {_describe(x)} and {_describe(y)})")
        if x.shape[0] != y.shape[0] and self.view != "feature":
            return self._skip(site, f"its input {tuple(x.shape)} and output {tuple(y.shape)} have "
                              "different batch sizes, so their items cannot be paired")
        if self.view != "auto":
            return self.view
        spec = site.norm
        if spec is not None and spec.rule in ("batch", "batch-rms"):
            return "feature"
        if spec is not None and (spec.rule == "group" or spec.dims == x.ndim - 1):
            return "sample"
        if x.ndim == 3 and y.ndim == 3 and x.shape[:2] == y.shape[:2]:
            return "token"
        return "sample"

    def _skip(self, site: Site, why: str) -> None:
        if site.kind == "module":
            self._warn_once(f"skip:{site.name}", f"site {site.name!r} is not measured: {why}")
        return None

    def _mask_for(self, site: Site, x: torch.Tensor) -> torch.Tensor | None:
        mask = self._mask
        if mask is None:
            return None
        if tuple(mask.shape) != tuple(x.shape[:2]):
            self._warn_once(
                f"mask:{site.name}",
                f"attention mask of shape {tuple(mask.shape)} does not match the (batch, seq) = "
                f"{tuple(x.shape[:2])} of site {site.name!r}: its tokens are all counted",
            )
            return None
        if x.device not in self._masks_by_device:
            self._masks_by_device[x.device] = mask.to(x.device, non_blocking=True) != 0
        return self._masks_by_device[x.device]

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)

    def _finish_pending(self) -> None:
        self._pending = [p if isinstance(p, _Finished) else _finish(p, self._tol) for p in self._pending]
        self._pending_bytes = 0

    def _flush(self) -> None:
        self._finish_pending()
        finished, self._pending = self._pending, []
        if not finished:
            return
        for f, table in zip(finished, _to_host([f.table for f in finished])):
            self._records.extend(_records(f, table))

    # -- results
    @property
    def records(self) -> list[Record]:
        """All records so far, in forward order (a copy)."""
        if not self._recording:
            self._flush()
        return list(self._records)

    def pop_records(self) -> list[Record]:
        """The records so far, which the Probe then forgets (bounded memory in training loops)."""
        out = self.records
        self._records.clear()
        return out

    def __getitem__(self, key: str) -> list[Record]:
        """Records whose key matches the glob ``key`` (:meth:`Record.matches`): ``"site:point"``
        for every call of the module, e.g. ``probe["*.ln_1:pre"]``; ``"site@k:point"`` for its
        k-th call in each forward only (``probe["blocks.act@1:pre"]``; ``@0`` the first)."""
        return [r for r in self.records if r.matches(key)]

    def summary(self) -> list[dict[str, Any]]:
        """One row per (site, call, point): mean/std over items and steps
        (:func:`records.summarize`); the calls of a module used twice in a forward are not mixed."""
        return _rec.summarize(self.records)

    def to_csv(self, path: str | Path) -> Path:
        return _rec.to_csv(self.records, path)

    def to_json(self, path: str | Path) -> Path:
        return _rec.to_json(self.records, path)

    def plot(self, path: str | Path, title: str | None = None) -> Path:
        return _rec.plot_records(self.records, path, title)
