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
"""

from __future__ import annotations

import functools
import itertools
import sys
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["eager_module", "outer_hook", "outside_graphs", "release", "site_hook"]

Observer = Callable[[torch.Tensor | None, torch.Tensor | None], None]

Token = tuple[int, str, int]  # (module number, hook kind, slot)
_REGISTRY: dict[Token, Callable[..., Any]] = {}  # what the attached Probes' hooks run
_MODULES: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()
_NUMBERS = itertools.count()


def _dispatch(token: Token, *args: Any) -> None:
    target = _REGISTRY.get(token)
    if target is not None:  # none: no Probe attached at this slot now
        target(*args)


def _observe_kernel(x: torch.Tensor, y: torch.Tensor, module: int, slot: int) -> None:
    _dispatch((module, "site", slot), x, y)


def _register_operator() -> Any:
    """``torch.ops.isoprobe.observe``, or ``None`` where this torch cannot declare its effect."""
    try:
        from torch._library.effects import EffectType

        op = torch.library.custom_op("isoprobe::observe", _observe_kernel, mutates_args=())
        op.register_fake(lambda x, y, module, slot: None)
        op.register_effect(EffectType.ORDERED)
    except (AttributeError, ImportError, TypeError):
        return None
    return torch.ops.isoprobe.observe.default


_OBSERVE = _register_operator()


def _register(module: nn.Module, kind: str, target: Callable[..., Any]) -> Token:
    """``target`` at the first free slot of ``module`` for hooks of ``kind``."""
    number = _MODULES.setdefault(module, next(_NUMBERS))
    token = next((number, kind, s) for s in itertools.count() if (number, kind, s) not in _REGISTRY)
    _REGISTRY[token] = target
    return token


def release(token: Token) -> None:
    """Free the slot of a removed hook (:func:`outer_hook`, :func:`site_hook`)."""
    _REGISTRY.pop(token, None)


def outside_graphs(fn: Callable[..., None]) -> Callable[..., None]:
    """``fn`` kept out of the graphs ``torch.compile`` traces (``torch.compiler.disable``): it
    runs eagerly between them, so its Python state is never guarded on."""
    return torch.compiler.disable(fn, recursive=True)


def outer_hook(module: nn.Module, kind: str, fn: Callable[..., None]) -> tuple[Callable[..., None], Token]:
    """A hook for ``module`` kept out of the graphs that runs ``fn`` with the hook's arguments,
    and its token: the hook runs whatever is attached at its slot when it is called, as the
    compiled code calls the hook of the Probe it was traced with."""
    token = _register(module, kind, fn)
    return outside_graphs(functools.partial(_dispatch, token)), token


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
    first output)``, and its token: in eager mode directly; under ``torch.compile`` through the
    graph's ``isoprobe::observe`` operator (without one, out of the graph). Call
    :func:`release` with the token when the hook is removed."""
    token = _register(module, "site", observe)
    eager_only = outside_graphs(functools.partial(_dispatch, token))
    if _OBSERVE is None:
        return lambda module, args, kwargs, output: eager_only(first_tensor(args, kwargs), first_output(output)), token
    number, _, slot = token

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        x, y = first_tensor(args, kwargs), first_output(output)
        if not torch.compiler.is_compiling():
            observe(x, y)
        elif x is None or y is None:  # nothing for the operator's schema: a graph break
            eager_only(x, y)
        else:
            _OBSERVE(x.detach(), y.detach(), number, slot)

    return hook, token


def eager_module(model: nn.Module) -> nn.Module:
    """The model that ``torch.compile`` wraps (its ``OptimizedModule`` keeps it as ``_orig_mod``),
    so that sites keep the eager model's names; any other model as it is."""
    dynamo = sys.modules.get("torch._dynamo")  # not imported: nothing can have been compiled
    while dynamo is not None and isinstance(model, dynamo.eval_frame.OptimizedModule):
        model = model._orig_mod
    return model
