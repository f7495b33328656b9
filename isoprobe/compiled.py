"""Forward hooks that ``torch.compile`` keeps in one graph: the Probe's measurement at a site as
an opaque, ordered operator of the compiled graph, with no Python state for dynamo to guard on.

A hook that dynamo traces reads the Probe's Python state (step counter, recording flag) and is
recompiled whenever it changes; a hook kept out of the graph (``torch.compiler.disable``) is a
graph break at every site, and a graph break inside the loop over a transformer's blocks makes
dynamo give up the whole forward and compile each block on its own, with guards on its layer
index, so a model of more than eight blocks hits dynamo's recompile limit in its first forward.

:func:`site_hook` avoids both: under ``torch.compile`` the hook only finds the site's input and
output tensors and calls the operator ``isoprobe::observe(x, y, module, slot)``, whose kernel
looks up the measurement attached at that ``slot`` of that module (a number per module) and runs
it, eagerly, when the compiled code reaches that point with the real activations. The operator
is registered as having an ordered side effect, so that the compilers neither drop it (it
returns nothing) nor reorder the sites. Where torch lacks ``CustomOpDef.register_effect``, the
hook is kept out of the graphs instead (:func:`outside_graphs`).

Compiled code keeps calling the hooks it was traced with: a graph traced with a Probe attached
still calls the operator, and the Probe's hooks on the model (kept out of the graphs,
:func:`outer_hook`), after that Probe is detached. So every hook dispatches by slot: a Probe
attached later takes the first free slot of each module, which such a graph then calls (and
nothing runs while none is attached). A graph traced with no Probe attached has no operator,
and dynamo runs it whatever hooks are added later (it guards only on hooks it traced).

The registry of slots refers to what the hooks run only weakly, through the hooks: a model with a
Probe attached is freed with the Probe when neither is referred to any more, and frees its slots;
:func:`release` frees a slot at once and drops what it ran, which compiled code that still calls
the hook then no longer keeps alive. The registry is thread-safe and survives
``importlib.reload`` of this module (IPython's autoreload), so attached Probes keep recording.
"""

from __future__ import annotations

import functools
import itertools
import sys
import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["eager_hook", "eager_module", "outer_hook", "outside_graphs", "release", "site_hook", "site_pre_hook"]

Observer = Callable[[torch.Tensor | None, torch.Tensor | None], None]
InputObserver = Callable[[torch.Tensor | None], None]

Token = tuple[int, str, int]  # (module number, hook kind, slot)


class _Entry:
    """What the hooks at one slot run: ``target``, or ``None`` once :func:`release` ran. The hook
    made with the entry keeps it alive and the registry refers to it weakly, so a model whose
    hooks run a Probe that refers to the model is freed with that Probe, and frees the slot."""

    __slots__ = ("target", "__weakref__")

    def __init__(self, target: Callable[..., Any]) -> None:
        self.target: Callable[..., Any] | None = target


# Kept by ``importlib.reload`` (IPython's autoreload): the attached Probes' hooks dispatch through
# these objects, so new empty ones would silently stop them; new numbers would reuse old ones.
_REGISTRY: dict[Token, weakref.ref[_Entry]] = globals().get("_REGISTRY", {})  # token -> its entry, weakly
_MODULES: weakref.WeakKeyDictionary[nn.Module, int] = globals().get("_MODULES", weakref.WeakKeyDictionary())
_NUMBERS: itertools.count[int] = globals().get("_NUMBERS", itertools.count())
# Reentrant: the weakref callback that frees a dead hook's slot may run (garbage collection)
# while this thread holds the lock in _register.
_LOCK: threading.RLock = globals().get("_LOCK", threading.RLock())


def _dispatch(token: Token, *args: Any) -> None:
    """Run what is attached at ``token`` now, if anything (no Probe, or a dead one: nothing)."""
    ref = _REGISTRY.get(token)
    entry = None if ref is None else ref()
    target = None if entry is None else entry.target
    if target is not None:
        target(*args)


def _observe_kernel(x: torch.Tensor, y: torch.Tensor, module: int, slot: int) -> None:
    _dispatch((module, "site", slot), x, y)


def _observe_input_kernel(x: torch.Tensor, module: int, slot: int) -> None:
    _dispatch((module, "site-input", slot), x)


def _register_operator(name: str, kernel: Callable[..., None]) -> Any:
    """``torch.ops.isoprobe.<name>``, or ``None`` where this torch cannot declare its effect."""
    try:
        from torch._library.effects import EffectType

        op = torch.library.custom_op(f"isoprobe::{name}", kernel, mutates_args=())
        op.register_fake(lambda *args: None)
        op.register_effect(EffectType.ORDERED)
    except (AttributeError, ImportError, TypeError):
        return None
    return getattr(torch.ops.isoprobe, name).default


# Registered once: a reload keeps the operators (their kernels call this module's _dispatch).
_OBSERVE = globals()["_OBSERVE"] if "_OBSERVE" in globals() else _register_operator("observe", _observe_kernel)
_OBSERVE_INPUT = (
    globals()["_OBSERVE_INPUT"]
    if "_OBSERVE_INPUT" in globals()
    else _register_operator("observe_input", _observe_input_kernel)
)


def _register(module: nn.Module, kind: str, target: Callable[..., Any]) -> tuple[Token, _Entry]:
    """``target`` at the first free slot of ``module`` for hooks of ``kind``: the token, and the
    entry that the hook must keep alive (the registry only refers to it; its death frees the slot)."""
    entry = _Entry(target)
    with _LOCK:
        number = _MODULES.setdefault(module, next(_NUMBERS))
        token = next((number, kind, s) for s in itertools.count() if (number, kind, s) not in _REGISTRY)
        _REGISTRY[token] = weakref.ref(entry, functools.partial(_free_dead, token))
    return token, entry


def _free_dead(token: Token, ref: weakref.ref[_Entry]) -> None:
    """Free ``token`` when its entry died, unless the slot holds a later entry already."""
    with _LOCK:
        if _REGISTRY.get(token) is ref:
            del _REGISTRY[token]


def release(token: Token) -> None:
    """Free the slot of a removed hook (:func:`outer_hook`, :func:`site_hook`) and drop what it
    ran, so compiled code that still calls the hook keeps no Probe alive."""
    with _LOCK:
        ref = _REGISTRY.pop(token, None)
    entry = None if ref is None else ref()
    if entry is not None:
        entry.target = None


def outside_graphs(fn: Callable[..., None]) -> Callable[..., None]:
    """``fn`` kept out of the graphs ``torch.compile`` traces (``torch.compiler.disable``): it
    runs eagerly between them, so its Python state is never guarded on."""
    return torch.compiler.disable(fn, recursive=True)


def outer_hook(module: nn.Module, kind: str, fn: Callable[..., None]) -> tuple[Callable[..., None], Token]:
    """A hook for ``module`` kept out of the graphs that runs ``fn`` with the hook's arguments,
    and its token: the hook runs whatever is attached at its slot when it is called, as the
    compiled code calls the hook of the Probe it was traced with."""
    token, entry = _register(module, kind, fn)
    return outside_graphs(_caller(token, entry)), token


def _caller(token: Token, entry: _Entry) -> Callable[..., None]:
    """``_dispatch`` at ``token``, keeping ``entry`` alive while the hook that calls it lives."""
    call = functools.partial(_dispatch, token)
    call.entry = entry  # type: ignore[attr-defined]
    return call


def eager_hook(module: nn.Module, kind: str, fn: Callable[..., None]) -> tuple[Callable[..., None], Token]:
    """A hook for ``module`` that runs ``fn`` with the hook's arguments in eager forwards only,
    and its token. Traced by ``torch.compile`` it does nothing and reads nothing but
    ``torch.compiler.is_compiling()``: no graph break, and no guard on the Probe, so a Probe
    attached later (at the same slot) runs in the same graph."""
    token, entry = _register(module, kind, fn)
    call = _caller(token, entry)

    def hook(*args: Any) -> None:
        if not torch.compiler.is_compiling():
            call(*args)

    return hook, token


def first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The first tensor among a call's arguments."""
    for v in (*args, *kwargs.values()):
        if isinstance(v, torch.Tensor):
            return v
    return None


def first_output(output: Any) -> torch.Tensor | None:
    """The output tensor, or the first tensor of a tuple/list/dict output (a ``ModelOutput``)."""
    if isinstance(output, dict):
        output = tuple(output.values())
    return first_tensor(output if isinstance(output, (tuple, list)) else (output,), {})


def site_hook(module: nn.Module, observe: Observer) -> tuple[Callable[..., None], Token]:
    """A forward hook (``with_kwargs=True``) for ``module`` that calls ``observe(first input,
    first output)``, and its token: in eager mode at once (by slot); under ``torch.compile`` through the
    graph's ``isoprobe::observe`` operator (without one, out of the graph). Call
    :func:`release` with the token when the hook is removed."""
    token, entry = _register(module, "site", observe)
    eager_only = outside_graphs(_caller(token, entry))  # the hook keeps the entry through it
    if _OBSERVE is None:
        return lambda module, args, kwargs, output: eager_only(first_tensor(args, kwargs), first_output(output)), token
    number, _, slot = token

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        x, y = first_tensor(args, kwargs), first_output(output)
        if not torch.compiler.is_compiling():
            _dispatch(token, x, y)
        elif x is None or y is None:  # nothing for the operator's schema: a graph break
            eager_only(x, y)
        else:
            _OBSERVE(x.detach(), y.detach(), number, slot)

    return hook, token


def site_pre_hook(module: nn.Module, observe: InputObserver) -> tuple[Callable[..., None], Token]:
    """A forward pre-hook (``with_kwargs=True``) for ``module`` that calls ``observe(first
    input)`` before the module runs (so before an in-place module overwrites its input), and its
    token; under ``torch.compile`` through the graph's ``isoprobe::observe_input`` operator,
    ordered before the module's own operations (without one, out of the graph)."""
    token, entry = _register(module, "site-input", observe)
    eager_only = outside_graphs(_caller(token, entry))
    if _OBSERVE_INPUT is None:
        return lambda module, args, kwargs: eager_only(first_tensor(args, kwargs)), token
    number, _, slot = token

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = first_tensor(args, kwargs)
        if not torch.compiler.is_compiling():
            _dispatch(token, x)
        elif x is None:
            eager_only(x)
        else:
            _OBSERVE_INPUT(x.detach(), number, slot)

    return hook, token


def eager_module(model: nn.Module) -> nn.Module:
    """The model that ``torch.compile`` wraps (its ``OptimizedModule`` keeps it as ``_orig_mod``),
    so that sites keep the eager model's names; any other model as it is."""
    dynamo = sys.modules.get("torch._dynamo")  # not imported: nothing can have been compiled
    while dynamo is not None and isinstance(model, dynamo.eval_frame.OptimizedModule):
        model = model._orig_mod
    return model
