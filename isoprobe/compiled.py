"""Forward hooks that ``torch.compile`` keeps in one graph: the Probe's measurement at a site as
an opaque, ordered operator of the compiled graph, with no Python state for dynamo to guard on.

A hook that dynamo traces reads the Probe's Python state (step counter, recording flag) and is
recompiled whenever it changes; a hook kept out of the graph (``torch.compiler.disable``) is a
graph break at every site, and a graph break inside the loop over a transformer's blocks makes
dynamo give up the whole forward and compile each block on its own, with guards on its layer
index, so a model of more than eight blocks hits dynamo's recompile limit in its first forward.

:func:`site_hook` avoids both: under ``torch.compile`` the hook only finds the site's input and
output tensors and calls the operator ``isoprobe::observe(x, y, token)``, whose kernel looks up
the measurement registered under ``token`` and runs it, eagerly, when the compiled code reaches
that point with the real activations. The operator is registered as having an ordered side
effect, so that the compilers neither drop it (it returns nothing) nor reorder the sites. Where
torch lacks custom operators with effects (before 2.6 or so), the hook is kept out of the
graphs instead (:func:`outside_graphs`).
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["eager_module", "outside_graphs", "release", "site_hook"]

Observer = Callable[[torch.Tensor | None, torch.Tensor | None], None]

_OBSERVERS: dict[int, Observer] = {}  # token -> measurement, while its Probe is attached
_TOKENS = itertools.count()


def _observe_kernel(x: torch.Tensor, y: torch.Tensor, token: int) -> None:
    observer = _OBSERVERS.get(token)
    if observer is not None:  # a graph compiled for a Probe since detached: nothing to do
        observer(x, y)


def _register_operator() -> Any:
    """``torch.ops.isoprobe.observe``, or ``None`` where this torch cannot declare its effect."""
    try:
        from torch._library.effects import EffectType

        op = torch.library.custom_op("isoprobe::observe", _observe_kernel, mutates_args=())
        op.register_fake(lambda x, y, token: None)
        op.register_effect(EffectType.ORDERED)
    except (AttributeError, ImportError, TypeError):
        return None
    return torch.ops.isoprobe.observe.default


_OBSERVE = _register_operator()


def outside_graphs(hook: Callable[..., None]) -> Callable[..., None]:
    """``hook`` kept out of the graphs ``torch.compile`` traces (``torch.compiler.disable``): it
    runs eagerly between them, so its Python state is never guarded on."""
    return torch.compiler.disable(hook, recursive=True)


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


def site_hook(observe: Observer) -> tuple[Callable[..., None], int | None]:
    """A forward hook (``with_kwargs=True``) that calls ``observe(first input, first output)``,
    and its registry token (``None`` where torch has no effectful operators): in eager mode
    directly; under ``torch.compile`` through the graph's ``isoprobe::observe`` operator (or,
    without it, out of the graph). Call :func:`release` with the token when the hook is removed.
    """
    eager_only = outside_graphs(observe)
    if _OBSERVE is None:
        return lambda module, args, kwargs, output: eager_only(first_tensor(args, kwargs), first_output(output)), None
    token = next(_TOKENS)
    _OBSERVERS[token] = observe

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        x, y = first_tensor(args, kwargs), first_output(output)
        if not torch.compiler.is_compiling():
            observe(x, y)
        elif x is None or y is None:  # nothing for the operator's schema: a graph break
            eager_only(x, y)
        else:
            _OBSERVE(x.detach(), y.detach(), token)

    return hook, token


def release(token: int | None) -> None:
    """Forget the measurement registered under ``token`` (a removed hook's)."""
    if token is not None:
        _OBSERVERS.pop(token, None)


def eager_module(model: nn.Module) -> nn.Module:
    """The model that ``torch.compile`` wraps (its ``OptimizedModule`` keeps it as ``_orig_mod``),
    so that sites keep the eager model's names; any other model as it is."""
    dynamo = sys.modules.get("torch._dynamo")  # not imported: nothing can have been compiled
    while dynamo is not None and isinstance(model, dynamo.eval_frame.OptimizedModule):
        model = model._orig_mod
    return model
