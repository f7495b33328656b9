"""Sites: the modules of a model that a :class:`~isoprobe.hooks.Probe` measures, found by what
they do.

**Discovered sites.** Norms and activations are found without changing the model:

- torch's own norm classes (``LayerNorm``, ``RMSNorm``, ``GroupNorm``, every ``BatchNorm``) and
  activation modules (``torch.nn.modules.activation`` except the softmax/attention family);
- modules that declare themselves with an ``isoprobe_site`` attribute: ``"activation"``,
  ``"module"``, or ``"norm"`` with ``norm_rule`` and ``eps`` (isoprobe's own networks do);
- any other module by its *behaviour* (class names and parameter names are not consulted): a
  module whose parameters, its own and its descendants', are 1-D vectors of one size (or none)
  is run (``.forward`` of a deep copy, so that hooks do not fire and buffers, counters and
  caches of the model stay as they were; no gradient; random state restored) on a small probe
  input of shape ``(2, 3, d)`` (rows along the last
  dimension), and then ``(2, d, 3, 3)`` (rows along the channels). It is an *activation*
  if it acts entry by entry (permuting the input's entries permutes the output's) and is not
  affine (``f(x + x') + f(0) ≠ f(x) + f(x')``); a *norm over the rows* if, not entrywise, its
  output is unchanged when each row is scaled by its own positive factor — LayerNorm-like (rule
  ``"layer"``) if a per-row shift leaves it unchanged too, RMSNorm-like (``"rms"``) otherwise;
  rows along the channels give ``NormSpec.channels``. On the ``(2, d, 3, 3)`` input, before
  the entrywise test, two more norms: *batch-norm-like* (rule ``"batch"``, or ``"batch-rms"``
  without centring) if, run in training mode (the copy's; a batch norm in eval mode acts
  entrywise), its output is unchanged by a positive factor per channel, the same for every
  sample and position, yet changed by one per sample and channel (an instance norm); and a
  *group norm* (rule ``"group"``, ``num_groups`` of the module or one group: PoolFormer's
  ``GroupNorm1``, a norm over all non-batch dimensions) if a positive factor and a shift per
  sample and group leave it unchanged but one per position, or per sample and channel, does
  not. Whatever a norm applies entrywise after normalising keeps these invariances, so a fused
  norm and activation (timm's ``BatchNormAct2d``, ``GroupNormAct``, ``LayerNormAct``: a torch
  norm subclass whose own ``forward`` normalises, then calls an ``act`` child) is a norm site;
  its ``normalized`` point (computed by the Probe from the input) precedes the activation, its
  ``post`` is what the module returns, and the activation module inside stays a site of its
  own (selectable alone; the same records as a norm followed by a separate activation module).
  ``d`` is the size of the module's 1-D
  parameters, else 8, else the last entry of a ``normalized_shape`` attribute. This finds e.g. OLMo's LayerNorm (no parameter at all,
  ``F.layer_norm`` in a plain module) and BLOOM's ``BloomGelu``. The copy is bounded: a
  candidate of more than ``_TRIAL_MAX_MODULES`` modules (itself and its descendants)
  or ``_TRIAL_MAX_ENTRIES`` parameter and buffer entries, or one that cannot be
  deep-copied, is not tried (select it by name to probe it); the model's other modules and
  tensors that it refers to are shared with the copy, not copied. A module with sites below it
  is a container, and no site, if one of them runs when it runs (for a norm: one of the norm
  sites below it; activations may run after its normalisation); if none does, it computes by
  itself and replaces them: TransformerLens's ``NormalizationBridge`` normalises with the
  weight and bias of the ``nn.LayerNorm`` it wraps, which never runs.

A norm's ``eps`` is read from its own ``eps``/``variance_epsilon``/``epsilon`` attribute (not
one a ``__getattr__`` forwards from a wrapped module, which may not be the eps it uses), else
measured: for rows ``s·u`` (``u`` centred, unit variance) the odd part ``o(x) = (f(x) - f(-x))/2
= w ⊙ x_c / sqrt(var + eps)`` has ``R(s) = ‖o(s u)‖² / ‖o(u)‖² = s² (1 + eps) / (s² + eps)``, so
``eps = s² (1 - R) / (R - s²)`` at the scale whose ``R`` is nearest 1/2 (any affine weight and
bias cancel); the estimate is rounded to two significant digits when within 0.1% of them.

**Named sites.** Any module can be a site by its qualified name (kind ``"module"``, points
``pre`` and ``post`` only): ``select_sites(sites, ["transformer.h.*", "*.attn"], model)``. Names
are matched by :func:`isoprobe.names.match_name` (``*`` within one dotted component, ``**``
across components, matched against the whole name or a dotted suffix). A named module that is a
discovered site keeps its kind and points, and so does a wrapper of one: a named module with a
single discovered site below it that, on a trial input, it calls once with its own input
unchanged and whose output it returns unchanged, is that site under the wrapper's name
(TransformerLens's ``blocks.0.ln1`` around a HuggingFace ``LlamaRMSNorm``).

Discovery's trials are no calls of the model: hooks registered on its modules (the copies have
none) and torch's global module hooks (``register_module_forward_hook`` and kin, set aside
meanwhile) do not fire.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import nn
from torch.nn.modules import module as _torch_module

from isoprobe.names import match_name

__all__ = ["KINDS", "NormSpec", "Site", "discover_sites", "hook_aliases", "select_sites"]

#: Site kinds, also accepted as selections (``sites="norm"``).
KINDS = ("norm", "activation", "module")


@dataclass(frozen=True)
class NormSpec:
    """What a norm module normalises.

    ``rule``: ``"layer"`` (centre and scale over the last ``dims`` dimensions), ``"rms"`` (scale
    only, over the last ``dims``), ``"group"`` (GroupNorm: per sample and group of channels),
    ``"batch"`` (per channel over batch and spatial positions), ``"batch-rms"`` (per channel
    over the batch, scale only: Meterez et al.'s batch norm). ``eps`` is the module's own
    (``None`` for a torch RMSNorm without eps: the input dtype's machine epsilon).
    ``channels``: a ``"layer"``/``"rms"`` norm over dimension 1 of a ``(batch, channels, ...)``
    input, at every position (ConvNeXt's channels-first LayerNorm), instead of the last ``dims``.
    """

    rule: Literal["layer", "rms", "group", "batch", "batch-rms"]
    eps: float | None
    dims: int = 1
    groups: int = 1
    channels: bool = False

    @property
    def centers(self) -> bool:
        return self.rule not in ("rms", "batch-rms")


@dataclass(frozen=True, eq=False)
class Site:
    """A module the Probe measures: qualified ``name``, ``kind`` and, for norms, its ``norm``.

    ``kind``: ``"norm"`` (points ``pre, centered, normalized, post``), ``"activation"`` or
    ``"module"`` (points ``pre``: the first tensor input, ``post``: the output, or the first
    tensor of a tuple/dict output).
    """

    name: str
    kind: Literal["norm", "activation", "module"]
    module: nn.Module
    norm: NormSpec | None = None


_TORCH_RMSNORM = getattr(nn, "RMSNorm", None)  # torch >= 2.4
_SOFTMAX_FAMILY = ("MultiheadAttention", "Softmax", "Softmin", "LogSoftmax", "Softmax2d")
_EPS_ATTRS = ("eps", "variance_epsilon", "epsilon")
_PROBE_WIDTH = 8
_TRIAL_MAX_MODULES = 16  # a candidate's own module and its parameter-free descendants
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
_TRIAL_MAX_ENTRIES = 1 << 22  # parameter and buffer entries of a candidate (16 MiB in float32)
_GLOBAL_HOOKS = (
    "_global_forward_pre_hooks",
    "_global_forward_hooks",
    "_global_backward_pre_hooks",
    "_global_backward_hooks",
)


def _declared(module: nn.Module) -> tuple[str, NormSpec | None] | None:
    """``isoprobe_site`` = ``"activation"``, ``"module"``, or ``"norm"`` with ``norm_rule`` and
    ``eps`` attributes (how isoprobe's own networks are seen)."""
    kind = getattr(module, "isoprobe_site", None)
    if kind == "norm":
        return "norm", NormSpec(module.norm_rule, float(module.eps))
    if kind in ("activation", "module"):
        return kind, None
    return None


def _torch_kind(module: nn.Module) -> tuple[str, NormSpec | None] | None:
    """torch's norm and activation classes; a subclass with its own ``forward`` may compute
    something else (ConvNeXt's LayerNorm permutes channels first) and is judged by behaviour."""
    base = next((c for c in type(module).__mro__ if c.__module__.startswith("torch.nn.")), None)
    if base is None or type(module).forward is not base.forward:
        return None
    if isinstance(module, nn.LayerNorm):
        return "norm", NormSpec("layer", module.eps, dims=len(module.normalized_shape))
    if _TORCH_RMSNORM is not None and isinstance(module, _TORCH_RMSNORM):
        return "norm", NormSpec("rms", module.eps, dims=len(module.normalized_shape))
    if isinstance(module, nn.GroupNorm):
        return "norm", NormSpec("group", module.eps, groups=module.num_groups)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "norm", NormSpec("batch", module.eps)
    cls = type(module)
    if cls.__module__ == nn.modules.activation.__name__ and cls.__name__ not in _SOFTMAX_FAMILY:
        return "activation", None
    return None


def _probe_widths(module: nn.Module) -> list[int] | None:
    """Last-dimension sizes to try the module on; ``None`` if it is no candidate (a parameter,
    its own or below it, that is not a vector, vectors of two sizes, or on the meta device)."""
    params = list(module.parameters())
    sizes = {p.numel() for p in params}
    if any(p.ndim != 1 or p.device.type == "meta" for p in params) or len(sizes) > 1:
        return None
    if sizes:
        return list(sizes)
    shape = getattr(module, "normalized_shape", None)
    hinted = [int(shape[-1])] if isinstance(shape, (tuple, list)) and shape and isinstance(shape[-1], int) else []
    return [_PROBE_WIDTH, *hinted]


@contextmanager
def _without_global_hooks() -> Iterator[None]:
    """torch's global module hooks (``torch.nn.modules.module.register_module_forward_hook``,
    its pre-hook and backward variants) switched off while the block runs: a trial is no call
    of the model. Their tables are set aside, not emptied (a handle removed meanwhile still
    finds its own); for that moment, forwards in other threads skip them too."""
    saved = {name: getattr(_torch_module, name) for name in _GLOBAL_HOOKS}
    for name, table in saved.items():
        setattr(_torch_module, name, type(table)())
    try:
        yield
    finally:
        for name, table in saved.items():
            setattr(_torch_module, name, table)


class _Trial:
    """Runs ``module.forward`` (of a copy: :func:`_trial_copy`) on probe inputs (fresh copies, no gradient, random state restored)
    in one layout: ``(2, 3, width)`` with rows along the last dimension, or ``(2, width, 3, 3)``
    with rows along the channels (``channels``)."""

    def __init__(self, module: nn.Module, width: int, channels: bool) -> None:
        tensor = next(module.parameters(), None)
        if tensor is None:
            tensor = next(module.buffers(), None)
        self.module = module
        self.dtype = tensor.dtype if tensor is not None and tensor.is_floating_point() else torch.float32
        self.device = tensor.device if tensor is not None else torch.device("cpu")
        self.gen = torch.Generator(device="cpu").manual_seed(0)
        self.width, self.channels = width, channels
        self.shape = (2, width, 3, 3) if channels else (2, 3, width)
        self.row_dim = 1 if channels else 2
        self.per_row = (2, 1, 3, 3) if channels else (2, 3, 1)  # one factor per row

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen, dtype=torch.float64)

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices), _without_global_hooks():
            y = self.module.forward(x.to(self.device, self.dtype))
        if not isinstance(y, torch.Tensor) or y.shape != x.shape or not y.is_floating_point():
            return None
        return y.to("cpu", torch.float64)


def _same(a: torch.Tensor | None, b: torch.Tensor) -> bool:
    """Equal up to the module's rounding (2% of the largest entry: bfloat16 models pass)."""
    return a is not None and bool(((a - b).abs().amax() <= 2e-2 * b.abs().amax().clamp_min(1e-6)).item())


def _behaviour(trial: _Trial) -> tuple[str, NormSpec | None] | None:
    """Activation, norm over the trial's rows, over each sample (and group of channels), over
    the batch per channel, or neither (module docstring)."""
    x = 10 * trial.randn(*trial.shape)
    y = trial(x)
    if y is None or not bool(torch.isfinite(y).all()):
        return None
    if trial.channels:  # before the entrywise check: a batch norm in eval mode may act entrywise
        found = _batch_behaviour(trial, x) or _sample_behaviour(trial, x, y)
        if found is not None:
            return "norm", found
    perm = torch.randperm(x.numel(), generator=trial.gen)
    if _same(trial(x.flatten()[perm].view_as(x)), y.flatten()[perm].view_as(y)):  # entrywise
        if trial.channels:  # entrywise maps are judged in the first layout
            return None
        other = 10 * trial.randn(*x.shape)
        f_other = trial(other)
        f_zero = trial(torch.zeros_like(x))
        if f_other is None or f_zero is None or _same(trial(x + other) + f_zero, y + f_other):
            return None  # affine (f(x + x') + f(0) = f(x) + f(x')): a shift or scale, no activation
        return "activation", None
    scale = 1 + 3 * torch.rand(*trial.per_row, generator=trial.gen, dtype=torch.float64)
    if not _same(trial(x * scale), y):
        return None
    layer = _same(trial(x + 10 * trial.randn(*trial.per_row)), y)
    eps = _own_eps(trial.module)
    if eps is None:
        eps = _measured_eps(trial, center=layer)
    return "norm", NormSpec("layer" if layer else "rms", float(eps), channels=trial.channels)


def _own_eps(module: nn.Module) -> float | None:
    """The module's own eps attribute (not one a ``__getattr__`` forwards from a wrapped module)."""
    own = (a for a in _EPS_ATTRS if a in vars(module) or hasattr(type(module), a))
    eps = next((getattr(module, a) for a in own), None)
    return float(eps) if isinstance(eps, (int, float)) and not isinstance(eps, bool) else None


def _invariant(trial: _Trial, x: torch.Tensor, y: torch.Tensor, shape: tuple[int, ...]) -> tuple[bool, bool]:
    """``(scale, shift)``: is the output unchanged when the input is multiplied by a positive
    factor of shape ``shape`` (broadcast over ``x``), and when such a shift is added?"""
    scale = 1 + 3 * torch.rand(*shape, generator=trial.gen, dtype=torch.float64)
    if not _same(trial(x * scale), y):
        return False, False
    return True, _same(trial(x + 10 * trial.randn(*shape)), y)


def _batch_behaviour(trial: _Trial, x: torch.Tensor) -> NormSpec | None:
    """Batch-norm-like (in training mode, on a ``(2, d, 3, 3)`` input): unchanged by a positive
    factor per channel, the same for every sample and position, yet changed by one per sample
    and channel (which an instance norm ignores); ``"batch"`` if a per-channel shift leaves it
    unchanged too, ``"batch-rms"`` otherwise. Whatever the module applies after normalising
    entrywise and monotonically (a fused activation, timm's ``BatchNormAct2d``) keeps this."""
    was = trial.module.training
    trial.module.train()
    try:
        y = trial(x)
        if y is None:
            return None
        scaled, centred = _invariant(trial, x, y, (1, trial.width, 1, 1))
        if not scaled or _invariant(trial, x, y, (2, trial.width, 1, 1))[0]:
            return None
        eps = _own_eps(trial.module)
        eps = _measured_eps(trial, centred, batch=True) if eps is None else eps
        return NormSpec("batch" if centred else "batch-rms", eps)
    finally:
        trial.module.train(was)


def _sample_behaviour(trial: _Trial, x: torch.Tensor, y: torch.Tensor) -> NormSpec | None:
    """A group norm (on a ``(2, d, 3, 3)`` input): unchanged by a positive factor and a shift per
    sample and group of channels (``num_groups`` of the module, else one group: a norm over all
    non-batch dimensions, PoolFormer's ``GroupNorm1``), yet changed by one per position and by
    one per sample and channel."""
    groups = getattr(trial.module, "num_groups", 1)
    if not isinstance(groups, int) or groups < 1 or trial.width % groups:
        return None
    per_group = (2, groups, 1, 1, 1)

    def grouped(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(2, groups, -1, 3, 3)

    scale = 1 + 3 * torch.rand(*per_group, generator=trial.gen, dtype=torch.float64)
    shift = 10 * trial.randn(*per_group)
    if not _same(trial((grouped(x) * scale + shift).reshape(x.shape)), y):
        return None
    if _same(trial(x * (1 + 3 * torch.rand(*trial.per_row, generator=trial.gen, dtype=torch.float64))), y):
        return None  # per position: a norm over the channels, judged as such
    if groups < trial.width and _invariant(trial, x, y, (2, trial.width, 1, 1))[0]:
        return None  # per sample and channel: finer groups than it declares (an instance norm)
    eps = _own_eps(trial.module)
    return NormSpec("group", _measured_eps(trial, True, groups) if eps is None else eps, groups=groups)


def _measured_eps(trial: _Trial, center: bool, groups: int = 0, batch: bool = False) -> float:
    """``eps`` from ``R(s) = s² (1 + eps) / (s² + eps)`` of the odd part (module docstring), on
    items ``s·u`` normalised as the norm does: rows (default), samples of ``groups`` groups of
    channels, or (``batch``) a whole batch per scale, ``u`` centred and of unit variance per channel."""
    s2 = 10.0 ** -torch.arange(0, 29, dtype=torch.float64)
    if batch:
        u = trial.randn(2, trial.width, 3, 3)
        u = u - u.mean((0, 2, 3), keepdim=True) if center else u
        u = u / u.square().mean((0, 2, 3), keepdim=True).sqrt()
        ys = [(trial(s * u), trial(-s * u)) for s in s2.sqrt()]
        if any(y is None or y_neg is None for y, y_neg in ys):
            return 0.0
        odd = torch.stack([((y - y_neg) / 2).square().sum() for y, y_neg in ys])
        return _eps_from_ratios(s2, odd)
    if groups:
        u = trial.randn(groups, trial.width // groups * 9)
        u = u - u.mean(1, keepdim=True) if center else u
        u = (u / u.square().mean(1, keepdim=True).sqrt()).reshape(trial.width, 3, 3)
        x, sum_dims = s2.sqrt()[:, None, None, None] * u, (1, 2, 3)  # one sample per scale
    else:
        u = trial.randn(trial.width)
        u = u - u.mean() if center else u
        u = u / u.square().mean().sqrt()
        x = s2.sqrt()[:, None] * u  # (scales, width) rows
        x = x.T[None, :, :, None] if trial.channels else x[None]  # (1, width, scales, 1) or (1, scales, width)
        sum_dims = (trial.row_dim,)
    y, y_neg = trial(x), trial(-x)
    if y is None or y_neg is None:
        return 0.0
    return _eps_from_ratios(s2, ((y - y_neg) / 2).square().sum(sum_dims).flatten())


def _eps_from_ratios(s2: torch.Tensor, odd: torch.Tensor) -> float:
    """``eps`` from the squared odd parts ``odd`` at the squared scales ``s2`` (the first 1)."""
    R = odd[1:] / odd[0]
    s2 = s2[1:]
    k = int((R - 0.5).abs().argmin())
    if R[k] > 0.99:  # eps below 1e-28 (or none): invisible at every scale tried
        return 0.0
    eps = float(s2[k] * (1 - R[k]) / (R[k] - s2[k]))
    rounded = float(f"{eps:.2g}")
    return rounded if abs(eps - rounded) <= 1e-3 * rounded else eps


def _torch_own(module: nn.Module) -> bool:
    """A torch.nn class with torch's own forward (Dropout, Linear, ...): known, nothing to try."""
    cls = type(module)
    return cls.__module__.startswith("torch.nn.") and cls is not nn.Module


def _shared_objects(model: nn.Module) -> dict[int, object]:
    """``id → object`` of every module, parameter and buffer of ``model``: a deep-copy memo."""
    return {id(x): x for x in (*model.modules(), *model.parameters(), *model.buffers())}


def _trial_copy(module: nn.Module, shared: dict[int, object]) -> nn.Module | None:
    """A deep copy of ``module`` for the trials (its forward may update buffers, counters or
    caches), sharing the objects of ``shared`` outside ``module``; ``None`` (not tried) beyond
    ``_TRIAL_MAX_MODULES`` modules or ``_TRIAL_MAX_ENTRIES`` tensor entries, or if not copyable."""
    inside = list(module.modules())
    tensors = [*module.parameters(), *module.buffers()]
    if len(inside) > _TRIAL_MAX_MODULES or sum(t.numel() for t in tensors) > _TRIAL_MAX_ENTRIES:
        return None
    memo = dict(shared)
    for x in (*inside, *tensors):
        memo.pop(id(x), None)
    for hooks in (getattr(m, attr, None) for m in inside for attr in _HOOK_DICTS):
        if hooks:  # the copy runs without the model's own hooks (a user's, a hook library's)
            memo[id(hooks)] = type(hooks)()
    try:
        return copy.deepcopy(module, memo)
    except Exception:  # a lock, a generator, a non-leaf tensor attribute: not tried
        return None


@contextmanager
def _calls(modules: Sequence[nn.Module]) -> Iterator[list[int]]:
    """Counts the forward calls of ``modules`` while the block runs (pre-hooks, removed after)."""
    count = [0]
    handles = [m.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1)) for m in modules]
    try:
        yield count
    finally:
        for handle in handles:
            handle.remove()


def _kind_of(
    module: nn.Module, below: Mapping[str, str], shared: dict[int, object]
) -> tuple[str, NormSpec | None] | None:
    """The module's kind; ``below``: the sites found under it, by name relative to it, with
    their kinds. A module is a site only if none of them runs when it runs (it computes the norm
    itself from a wrapped module's parameters), except that a norm may run activation sites
    after normalising (a fused norm and activation, timm's ``BatchNormAct2d``: the activation
    stays its own site); ``shared``: :func:`_trial_copy`."""
    found = _declared(module) or _torch_kind(module)
    if found is not None or _torch_own(module):
        return found
    widths = _probe_widths(module) or []
    trial_module = _trial_copy(module, shared) if widths else None
    if trial_module is None:
        return None
    for width in widths:
        for channels in (False, True):
            norms = [trial_module.get_submodule(name) for name, kind in below.items() if kind != "activation"]
            others = [trial_module.get_submodule(name) for name, kind in below.items() if kind == "activation"]
            with _calls(norms) as ran, _calls(others) as ran_activations:
                try:
                    found = _behaviour(_Trial(trial_module, width, channels))
                except Exception:  # not callable on a tensor of this layout: try the next one
                    continue
            if ran[0] or (ran_activations[0] and (found is None or found[0] != "norm")):
                return None  # a container: the sites below it compute what it does
            if found is not None:
                return found
    return None


def discover_sites(model: nn.Module) -> list[Site]:
    """Every norm and activation module of ``model`` (and modules declaring ``isoprobe_site``), in
    ``named_modules`` order (module docstring). A module that computes by itself what the
    sites below it would (their modules never run) replaces them."""
    modules = list(model.named_modules())
    shared = _shared_objects(model)
    kinds: dict[str, tuple[str, NormSpec | None]] = {}
    for name, module in reversed(modules):  # children before parents
        prefix = f"{name}." if name else ""
        below = [other for other in kinds if other.startswith(prefix)]
        found = _kind_of(module, {other[len(prefix) :]: kinds[other][0] for other in below}, shared)
        if found is not None:
            for other in below:  # wrapped, never run: the module computes it itself
                if found[0] != "norm" or kinds[other][0] != "activation":  # a fused norm's activation stays
                    del kinds[other]
            kinds[name] = found
    return [Site(name, kinds[name][0], module, kinds[name][1]) for name, module in modules if name in kinds]


def hook_aliases(model: nn.Module) -> dict[str, str]:
    """Other names of ``model``'s modules: alias -> qualified name (``named_modules``).

    A model with a ``hook_dict`` mapping (TransformerLens: every hook point under its
    TransformerLens name, e.g. ``blocks.0.hook_resid_pre`` for ``blocks.0.hook_in``,
    ``blocks.0.mlp.hook_pre``) names its modules twice; a hook point and its alias with the same
    last component name their parents too (``blocks.0.ln1`` for the module holding
    ``blocks.0.ln1.hook_in``). Without ``hook_dict``: none.
    """
    hook_dict = getattr(model, "hook_dict", None)
    if not isinstance(hook_dict, Mapping):
        return {}
    qualified = {id(module): name for name, module in model.named_modules()}
    names = set(qualified.values())
    aliases: dict[str, str] = {}
    for alias, module in hook_dict.items():
        name = qualified.get(id(module))
        if not isinstance(alias, str) or name is None or alias in names:
            continue
        aliases.setdefault(alias, name)
        parent, _, last = alias.rpartition(".")
        owner, _, own_last = name.rpartition(".")
        if parent and owner and last == own_last and parent not in names:
            aliases.setdefault(parent, owner)
    return aliases


def _passes_through(module: nn.Module, relative: str, site: Site, shared: dict[int, object]) -> bool:
    """Does ``module`` (run as a trial copy, :func:`_trial_copy`) call the module of ``site``
    (``relative``: its name below ``module``) once, with ``module``'s input unchanged, and return
    that call's output unchanged? Then it computes what the site computes, point for point."""
    widths = _probe_widths(module) or []
    trial_module = _trial_copy(module, shared) if widths else None
    if trial_module is None:
        return False
    calls: list[tuple[torch.Tensor | None, object]] = []

    def seen(_: nn.Module, args: tuple, kwargs: dict, out: object) -> None:
        calls.append((next((v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)), None), out))

    handle = trial_module.get_submodule(relative).register_forward_hook(seen, with_kwargs=True)
    try:
        for width in widths:
            calls.clear()
            spec = site.norm
            trial = _Trial(
                trial_module, width, spec is not None and (spec.channels or spec.rule not in ("layer", "rms"))
            )
            x = 10 * trial.randn(*trial.shape)
            try:
                y = trial(x)
            except Exception:  # not callable on a tensor of this layout: try the next width
                continue
            if y is None:
                continue
            if len(calls) != 1:
                return False
            first, out = calls[0]
            same_in = isinstance(first, torch.Tensor) and torch.equal(first.double().cpu(), x.to(trial.dtype).double())
            return same_in and isinstance(out, torch.Tensor) and torch.equal(out.double().cpu(), y)
        return False
    finally:
        handle.remove()


class _Wrappers:
    """Selected modules that stand for the one discovered site below them: a module (not itself
    a site) with exactly one site among its descendants that passes its input unchanged to that
    site's module and returns its output unchanged (:func:`_passes_through`) is that site; e.g.
    TransformerLens's RMS norm component around a HuggingFace ``LlamaRMSNorm`` (``hook_in``, the
    norm, ``hook_out``), so that ``blocks.*.ln1`` has a norm's four points."""

    def __init__(self, sites: Sequence[Site], model: nn.Module | None) -> None:
        self.model = model
        self.sites = {s.name: s for s in sites}
        self.below: dict[str, list[Site]] = {}
        for site in sites:
            parts = site.name.split(".")
            for k in range(1, len(parts)):
                self.below.setdefault(".".join(parts[:k]), []).append(site)
        self.shared: dict[int, object] | None = None
        self.known: dict[str, str | None] = {}

    def site_for(self, name: str) -> str | None:
        """The qualified name of the site that the module ``name`` stands for, if any."""
        if self.model is None or name in self.sites or len(self.below.get(name, ())) != 1:
            return None
        if name not in self.known:
            (site,) = self.below[name]
            self.shared = _shared_objects(self.model) if self.shared is None else self.shared
            module = self.model.get_submodule(name)
            through = _passes_through(module, site.name[len(name) + 1 :], site, self.shared)
            self.known[name] = site.name if through else None
        return self.known[name]

    def __call__(self, hits: dict[str, str]) -> dict[str, str]:
        """``hits`` (qualified name -> the name the site takes) with wrappers replaced by their
        site; a wrapper whose site is among the hits itself is dropped (one site)."""
        out: dict[str, str] = {}
        for name, shown in hits.items():
            target = self.site_for(name)
            if target is None:
                out[name] = shown
            elif target not in hits:
                out[target] = shown
        return out


def select_sites(
    sites: Sequence[Site],
    selection: str | Sequence[str] | None,
    model: nn.Module | None = None,
    functional: bool = False,
) -> list[Site]:
    """The discovered ``sites`` (and, given ``model``, named modules) that ``selection`` picks.

    ``selection``: ``None`` (all discovered sites), or one or several of the kinds
    ``"norm"``, ``"activation"``, ``"module"`` and name globs (:func:`isoprobe.names.match_name`,
    e.g. ``"transformer.h.*.ln_*"``, ``"*.attn"``). A glob picks the discovered sites it matches
    and, with ``model``, every other module it matches as a ``"module"`` site; it matches
    qualified names and the aliases of :func:`hook_aliases` (a site picked only by an alias is
    named by it; a module picked twice is one site; a wrapper of one discovered site is that
    site, :class:`_Wrappers`). A glob that matches nothing is an error,
    and so is a selection that leaves no site. Sites come in ``named_modules`` order.
    With ``functional`` (the Probe records functional sites, :mod:`isoprobe.calls`), a glob
    with a ``:`` names functional sites and is left to them, and no site here is no error.
    """
    if selection is None:
        return list(sites)
    patterns = [selection] if isinstance(selection, str) else list(selection)
    if not patterns:
        raise ValueError("sites is empty: give None (all sites), 'norm', 'activation', 'module' or globs")
    by_name = {s.name: s for s in sites}
    named = dict(model.named_modules()) if model is not None else {s.name: s.module for s in sites}
    aliases = hook_aliases(model) if model is not None else {}
    wrappers = _Wrappers(sites, model)
    chosen: dict[str, str] = {}  # qualified name -> the name the site takes
    for pattern in patterns:
        if pattern in KINDS:
            chosen = {s.name: s.name for s in sites if s.kind == pattern} | chosen
            continue
        if functional and ":" in pattern:
            continue
        hits = {name: name for name in named if name and match_name(name, pattern)}
        hits |= {name: alias for alias, name in aliases.items() if match_name(alias, pattern) and name not in hits}
        if not hits:
            some = ", ".join([*(name for name in list(named)[:9] if name), *list(aliases)[:3]])
            raise ValueError(
                f"site pattern {pattern!r} matches none of the module names ({some}, ...); '*' "
                "stands for one dotted component, '**' for any number: '*.attn', 'transformer.h.*.ln_*'"
            )
        chosen = wrappers(hits) | chosen  # a name taken first stays
    if not chosen and not functional:
        kinds = sorted({s.kind for s in sites})
        raise ValueError(f"sites={selection!r} selects no site; the model has only: {', '.join(kinds)}")
    picked = [(name, module) for name, module in named.items() if name in chosen]
    found = [by_name.get(name) or Site(name, "module", module) for name, module in picked]
    return [site if site.name == chosen[site.name] else replace(site, name=chosen[site.name]) for site in found]


def no_site_message(model: nn.Module) -> str:
    return (
        f"no site found in {type(model).__name__}: searched its modules for torch norms "
        "(LayerNorm, RMSNorm, GroupNorm, BatchNorm*) and activation modules (torch.nn.ReLU, GELU, "
        "...), and tried every parameter-free or vector-parameter module on a probe input for "
        "entrywise nonlinear maps (activations) and per-row scale-invariant maps (norms), and its "
        "forward called no activation or norm function (F.relu, torch.tanh, x.relu_(), F.layer_norm, "
        "...; not recorded under torch.compile, nor with Probe(calls=False)); select any module by "
        "name instead: Probe(model, sites=['*.mlp', 'layers.*'])."
    )
