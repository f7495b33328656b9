"""Functional sites: activations and norms that a module's forward applies as functions.

``F.relu(x, inplace=True)`` in torchvision's Inception ``BasicConv2d``, ``F.gelu`` and
``F.layer_norm`` in research code, ``torch.relu``, ``x.sigmoid()``, ``x.relu_()``: these are no
modules, so no module hook sees them. While a probed model's forward runs, a
:class:`torch.overrides.TorchFunctionMode` (thread-local in torch: other threads and code outside
the forward are not affected) sees every call of a torch function; a call of one of
:data:`FUNCTIONS` is a *functional site*, named ``"owner:function@index"``:

- ``owner``: the qualified name of the module whose forward made the call (known from forward
  pre/post hooks on the model's modules), ``""`` for the model's own forward (``":relu@0"``);
- ``function``: the function's name whatever the spelling: ``F.relu``, ``torch.relu``,
  ``x.relu()``, ``x.relu_()`` and ``F.relu(x, inplace=True)`` are all ``relu``;
- ``index``: the call's rank among the calls of that function in one run of the owner's
  forward (``relu@0``, ``relu@1`` for a forward that applies ``F.relu`` twice), the same in
  every run. A module run several times in one model forward (reused in a loop) makes its
  functional sites run several times: those runs are the records' ``call`` field (0, 1, ...),
  as for a module called several times; the k-th is keyed ``"owner:relu@0@k:point"`` (k ≥ 1).

Points are those of a module site of the same kind: ``pre`` and ``post`` for an activation;
``pre, centered, normalized, post`` for a norm (with the Theorem 1 check where the norm
normalises whole items), its :class:`~isoprobe.sites.NormSpec` read from the call's arguments
(``normalized_shape``, ``num_groups``, ``eps``; ``F.instance_norm`` is a group norm with one
group per channel). ``pre`` is the call's input as it was before the call: an in-place call
(``inplace=True``, a trailing ``_``) is given a copy of its input taken just before it runs.
The call itself runs exactly as without the Probe (same function, same arguments), so outputs
and gradients are bit-for-bit unchanged.

Calls made inside a discovered norm or activation module (``nn.ReLU`` calls ``F.relu``,
``nn.LayerNorm`` calls ``F.layer_norm``), or in any module below one, are that module's site and
are not recorded again. Under ``torch.compile`` the hooks that put the mode on torch's stack
are traced as no-ops (:func:`isoprobe.compiled.eager_hook`), so a compiled forward runs without
it: its functional calls run in the graph and are not recorded (module sites are, as usual, in
one graph compiled once); a compiled function called from an eager forward gets its calls
passed through untouched. The mode is taken off the stack while the Probe measures a site
(:func:`suspended`): its own arithmetic is no model code.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from isoprobe.compiled import Token, eager_hook, release
from isoprobe.names import match_site
from isoprobe.sites import KINDS, NormSpec, Site

__all__ = ["FUNCTIONS", "FunctionalSites", "call_selector", "may_call", "suspended"]

#: Function name -> site kind of the functions recorded as functional sites.
FUNCTIONS: dict[str, str] = {
    **dict.fromkeys(
        (
            "relu",
            "relu6",
            "leaky_relu",
            "elu",
            "selu",
            "celu",
            "prelu",
            "gelu",
            "silu",
            "mish",
            "hardswish",
            "hardsigmoid",
            "hardtanh",
            "tanh",
            "sigmoid",
            "softplus",
            "softsign",
            "logsigmoid",
        ),
        "activation",
    ),
    **dict.fromkeys(("layer_norm", "rms_norm", "group_norm", "batch_norm", "instance_norm"), "norm"),
}

# The ATen entry points ``torch.layer_norm`` and kin take other arguments than ``F.*`` (and have
# no signature to inspect): their parameters in order, and their defaults.
_ATEN_NORMS: dict[str, tuple[str, ...]] = {
    "layer_norm": ("input", "normalized_shape", "weight", "bias", "eps", "cudnn_enable"),
    "rms_norm": ("input", "normalized_shape", "weight", "eps"),
    "group_norm": ("input", "num_groups", "weight", "bias", "eps", "cudnn_enabled"),
    "batch_norm": (
        "input",
        "weight",
        "bias",
        "running_mean",
        "running_var",
        "training",
        "momentum",
        "eps",
        "cudnn_enabled",
    ),
    "instance_norm": (
        "input",
        "weight",
        "bias",
        "running_mean",
        "running_var",
        "use_input_stats",
        "momentum",
        "eps",
        "cudnn_enabled",
    ),
}
_DEFAULT_EPS = {"layer_norm": 1e-5, "group_norm": 1e-5, "batch_norm": 1e-5, "instance_norm": 1e-5, "rms_norm": None}


@dataclass(frozen=True)
class _Target:
    """A torch callable that is a functional site: its function ``name``, whether it works in
    place by its own name (``relu_``), and the signature its arguments are bound with."""

    name: str
    inplace: bool
    signature: inspect.Signature | None


def _aten_signature(name: str) -> inspect.Signature:
    params = [inspect.Parameter(p, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None) for p in _ATEN_NORMS[name]]
    return inspect.Signature(params)


def _targets() -> dict[Any, _Target]:
    """Every spelling of every function of :data:`FUNCTIONS` in this torch: ``F.name``,
    ``torch.name``, ``Tensor.name``, ``torch._C._nn.name`` and their in-place ``name_``."""
    out: dict[Any, _Target] = {}
    for name, kind in FUNCTIONS.items():
        for namespace in (F, torch, torch.Tensor, torch._C._nn):
            for attr in (name, f"{name}_"):
                fn = getattr(namespace, attr, None)
                if fn is None or fn in out:
                    continue
                try:
                    signature = inspect.signature(fn)
                except (TypeError, ValueError):  # a builtin: only the ATen norms need one
                    signature = _aten_signature(name) if kind == "norm" else None
                out[fn] = _Target(name, attr.endswith("_"), signature)
    return out


_TARGETS = _targets()


def _bound(target: _Target, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    if target.signature is None:
        return {}
    try:
        return dict(target.signature.bind(*args, **kwargs).arguments)
    except TypeError:
        return {}


def _norm_spec(name: str, x: torch.Tensor, bound: dict[str, Any]) -> NormSpec | None:
    """What the norm call normalises, from its arguments (``None``: not understood)."""
    eps = bound.get("eps")
    eps = _DEFAULT_EPS[name] if eps is None else float(eps)
    if name in ("layer_norm", "rms_norm"):
        shape = bound.get("normalized_shape")
        dims = 1 if isinstance(shape, int) else len(shape) if isinstance(shape, (tuple, list, torch.Size)) else 0
        return NormSpec("layer" if name == "layer_norm" else "rms", eps, dims=dims) if dims else None
    if name == "group_norm":
        groups = bound.get("num_groups")
        return NormSpec("group", eps, groups=int(groups)) if isinstance(groups, int) else None
    if name == "instance_norm":  # per sample and channel, over the positions
        return NormSpec("group", eps, groups=x.shape[1]) if x.ndim > 2 else None
    return NormSpec("batch", eps)


# torch.nn classes whose own forward applies a function of FUNCTIONS outside a site module: the
# Transformer layers (``activation=F.relu`` by default) and InstanceNorm (``F.instance_norm``;
# no module site: it is found by its call).
_CALLING_TORCH_MODULES = ("torch.nn.modules.transformer", "torch.nn.modules.instancenorm")


def may_call(model: nn.Module) -> bool:
    """Can ``model``'s forward make a functional site's call? Not when every module is a
    torch.nn class with torch's own forward (``Linear``, ``Sequential``, ``LayerNorm``, ...)
    other than ``_CALLING_TORCH_MODULES``: a model whose sites are known before it runs."""
    for module in model.modules():
        owner = type(module).__module__
        if not owner.startswith("torch.nn.") or type(module) is nn.Module or owner in _CALLING_TORCH_MODULES:
            return True
    return False


def call_selector(selection: str | Sequence[str] | None) -> Callable[[str, str], bool]:
    """``picks(name, kind)``: does the Probe's ``sites`` selection pick the functional site
    ``name`` of ``kind``? ``None``: all; a kind (``"norm"``, ``"activation"``; ``"module"``
    picks none); a glob: :func:`isoprobe.names.match_site`."""
    if selection is None:
        return lambda name, kind: True
    patterns = [selection] if isinstance(selection, str) else list(selection)

    def picks(name: str, kind: str) -> bool:
        return any(p == kind if p in KINDS else match_site(name, p) for p in patterns)

    return picks


@dataclass
class _Frame:
    """One running forward of a module: its name, its calls of each function so far, and
    whether it runs inside a discovered site (whose functional calls are that site)."""

    module: nn.Module
    name: str
    inside_site: bool
    counts: dict[str, int] = field(default_factory=dict)


class _Thread(threading.local):
    """The functional-site recorders active in this thread (the Probes whose model's forward
    runs) with their module stacks, and whether the mode is on torch's stack."""

    def __init__(self) -> None:
        self.runs: dict[FunctionalSites, list[_Frame]] = {}
        self.entered = False


_THREAD = _Thread()


class _CallMode(TorchFunctionMode):
    """Hands the calls of :data:`FUNCTIONS` to the active recorders, every other call through
    at once (one object for every Probe and thread)."""

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if torch.compiler.is_compiling():
            return func(*args, **kwargs)
        try:
            target = _TARGETS.get(func)
        except TypeError:  # an unhashable callable: not one of ours
            target = None
        if target is None or not _THREAD.runs:
            return func(*args, **kwargs)
        return _observed_call(target, func, args, kwargs)


_MODE = _CallMode()


@contextmanager
def suspended() -> Iterator[None]:
    """The mode off torch's stack while the block runs, if it is on top: the Probe's own
    arithmetic in a site hook (hundreds of torch calls) is no model code to look at."""
    ours = _THREAD.entered and torch.overrides._get_current_function_mode() is _MODE
    if not ours:
        yield
        return
    torch._C._pop_torch_function_stack()
    try:
        yield
    finally:
        torch._C._push_on_torch_function_stack(_MODE)


def _observed_call(target: _Target, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Run ``func`` once as called, telling every active recorder its input (a copy taken
    before the call if it works in place) and output."""
    x = args[0] if args else kwargs.get("input")
    if not isinstance(x, torch.Tensor):
        return func(*args, **kwargs)
    sites = [(recorder, recorder._site_of(stack, target)) for recorder, stack in list(_THREAD.runs.items())]
    if not any(site is not None for _, site in sites):  # inside module sites, or not selected
        return func(*args, **kwargs)
    bound = _bound(target, args, kwargs)
    observers = [r._observer(site, target, x, bound) for r, site in sites if site is not None]
    observers = [observe for observe in observers if observe is not None]
    if not observers:
        return func(*args, **kwargs)
    inplace = target.inplace or bool(bound.get("inplace", False))
    if inplace:
        with torch.no_grad():
            pre = x.detach().clone()
    else:
        pre = x
    y = func(*args, **kwargs)
    for observe in observers:
        observe(pre, y if isinstance(y, torch.Tensor) else None)
    return y


Observer = Callable[[torch.Tensor | None, torch.Tensor | None], None]


class FunctionalSites:
    """The functional sites of one Probe's ``model`` (module docstring).

    ``site_modules``: the discovered norm and activation modules (their calls are theirs);
    ``selection``: the Probe's ``sites`` (:func:`call_selector`); ``observer(site)``: what
    measures a site's ``(pre, post)``; ``recording()``: is this forward of the model recorded?
    :meth:`attach` registers forward pre/post hooks on the model's modules (returned for
    removal): the model's own put the mode on torch's stack in the calling thread for the
    forwards that are recorded, and take it off when the forward returns or raises
    (:meth:`stop`); those of the modules below keep the stack of running modules. Traced by
    ``torch.compile``, they do nothing: a compiled forward runs without the mode.
    """

    def __init__(
        self,
        model: nn.Module,
        site_modules: Sequence[nn.Module],
        selection: str | Sequence[str] | None,
        observer: Callable[[Site], Observer],
        recording: Callable[[], bool],
    ) -> None:
        self.model = model
        self._names = {}
        for name, module in model.named_modules():
            self._names.setdefault(module, name)
        self._site_modules = set(map(id, site_modules))
        self._picks = call_selector(selection)
        patterns = [selection] if isinstance(selection, str) else list(selection or ())
        self._patterns = [p for p in patterns if ":" in p]
        self._make_observer = observer
        self._sites: dict[str, Site | None] = {}  # name -> its site (None: not selected)
        self._observers: dict[str, Observer] = {}
        self._recording = recording

    @property
    def sites(self) -> list[Site]:
        """The selected functional sites seen so far, in order of first call."""
        return [s for s in self._sites.values() if s is not None]

    def seen(self) -> list[str]:
        """Names of every functional site called so far, selected or not."""
        return list(self._sites)

    def unmatched(self) -> list[str]:
        """The selection's functional-site globs (with a ``:``) that no call so far matched."""
        return [p for p in self._patterns if not any(match_site(name, p) for name in self._sites)]

    def attach(self) -> tuple[list[torch.utils.hooks.RemovableHandle], list[Token]]:
        """Register the hooks (:func:`isoprobe.compiled.eager_hook`): their handles and tokens,
        for the caller to remove and release."""
        handles, tokens = [], []
        try:
            for module in self._names:
                root = module is self.model
                pre, token = eager_hook(module, "call-enter", self._start if root else self._enter)
                tokens.append(token)
                handles.append(module.register_forward_pre_hook(pre))
                post, token = eager_hook(module, "call-exit", self._stop if root else self._exit)
                tokens.append(token)
                # always_call only on the model: dynamo guards on the ids of always-called hooks
                # of the modules it traces; a frame left by a forward that raised is dropped at
                # its parent's exit (_exit) or with the model's forward (_stop)
                handles.append(module.register_forward_hook(post, always_call=root))
        except BaseException:
            for handle in handles:
                handle.remove()
            for token in tokens:
                release(token)
            raise
        return handles, tokens

    def _start(self, model: nn.Module, args: Any) -> None:
        """A recorded forward of the model begins in this thread."""
        if not self._recording() or self in _THREAD.runs:
            return
        root = _Frame(self.model, "", id(self.model) in self._site_modules)
        _THREAD.runs[self] = [root]
        if not _THREAD.entered:
            _MODE.__enter__()
            _THREAD.entered = True

    def _stop(self, model: nn.Module, args: Any, output: Any) -> None:
        self.stop()

    def stop(self) -> None:
        """The model's forward ended (or raised) in this thread, or the Probe detached."""
        _THREAD.runs.pop(self, None)
        if _THREAD.entered and not _THREAD.runs:
            _THREAD.entered = False
            _MODE.__exit__(None, None, None)

    def _enter(self, module: nn.Module, args: Any) -> None:
        stack = _THREAD.runs.get(self)
        if stack is not None:
            inside = stack[-1].inside_site or id(module) in self._site_modules
            stack.append(_Frame(module, self._names.get(module, ""), inside))

    def _exit(self, module: nn.Module, args: Any, output: Any) -> None:
        stack = _THREAD.runs.get(self, ())
        for i in range(len(stack) - 1, 0, -1):  # its frame, and any left by a forward that raised
            if stack[i].module is module:
                del stack[i:]
                return

    def _site_of(self, stack: list[_Frame], target: _Target) -> Site | None:
        """The site of this call (the call counted), or ``None``: inside a site, or not selected."""
        frame = stack[-1]
        if frame.inside_site:
            return None
        index = frame.counts.get(target.name, 0)
        frame.counts[target.name] = index + 1
        name = f"{frame.name}:{target.name}@{index}"
        if name not in self._sites:
            kind = FUNCTIONS[target.name]
            self._sites[name] = Site(name, kind, frame.module) if self._picks(name, kind) else None
        return self._sites[name]

    def _observer(self, site: Site, target: _Target, x: torch.Tensor, bound: dict[str, Any]) -> Observer | None:
        """What measures this call of ``site``; ``None`` for a norm call whose arguments are not
        understood. A norm's spec is read from each call's arguments (``bound``)."""
        name = site.name
        if site.kind == "norm":
            spec = _norm_spec(target.name, x, bound)
            if spec is None:
                return None
            if spec != site.norm:
                site = self._sites[name] = Site(name, site.kind, site.module, spec)
                self._observers.pop(name, None)
        if name not in self._observers:
            self._observers[name] = self._make_observer(site)
        return self._observers[name]
