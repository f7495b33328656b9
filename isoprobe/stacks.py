"""Which token stream a module call sees in an encoder-decoder model (T5, BART, ...).

An encoder-decoder model runs two token sequences, the source through its encoder and the target
through its decoder, each with its own padding mask: ``attention_mask`` for the source,
``decoder_attention_mask`` for the target. A token-view Gram must drop the padding of the
sequence its items are tokens of, whatever the two lengths are. Where the call runs tells which:

- inside the encoder: the source;
- inside the decoder: the target, except a module whose first input *is* a source tensor
  (cross-attention's key and value projections): the source;
- outside both (a head): the stream whose output tensor it reads, else unknown.

A stream's output tensors are its stack's output and, passed on, the output of any module run
outside both stacks whose first input is one of them (``enc_to_dec_proj``, which maps the
encoder's width to the decoder's, makes a new tensor of the source's tokens). A tensor given to
the decoder from outside that is no stream's output (transformed by code that is not a module)
is of unknown tokens: :meth:`Streams.foreign` tells it.

A model is encoder-decoder when its ``config.is_encoder_decoder`` is true and its
``get_encoder()``/``get_decoder()`` (the HuggingFace interface) return two distinct submodules.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from isoprobe.compiled import first_output, first_tensor

__all__ = ["DECODER", "ENCODER", "Streams", "encoder_decoder"]

ENCODER, DECODER = "encoder", "decoder"


def encoder_decoder(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """``(encoder, decoder)`` of an encoder-decoder model (module docstring), else ``None``."""
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return None
    get_encoder, get_decoder = getattr(model, "get_encoder", None), getattr(model, "get_decoder", None)
    if not (callable(get_encoder) and callable(get_decoder)):
        return None
    encoder, decoder = get_encoder(), get_decoder()
    inside = {id(m) for m in model.modules() if m is not model}
    if any(not isinstance(s, nn.Module) or id(s) not in inside for s in (encoder, decoder)) or encoder is decoder:
        return None
    return encoder, decoder


def _same(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Is ``x`` the tensor ``y`` (or a view with the same memory, shape and strides)? ``y`` is
    held until the forward ends, so its memory cannot be reused by another tensor meanwhile."""
    return x.device == y.device and x.data_ptr() == y.data_ptr() and x.shape == y.shape and x.stride() == y.stride()


class Streams:
    """The stream (``ENCODER``, ``DECODER`` or ``None``) of each module call during a forward.

    :meth:`hooks` registers a pre- and a post-forward hook on each stack and a forward hook on
    each module outside both (neither in a stack nor holding one); :meth:`start` begins
    a forward of the model (``encoder_outputs``: the precomputed encoder output it was given, as
    during generation, if any) and :meth:`stop` ends it; :meth:`stream` answers for a call's
    first input ``x``. Outside the model's forwards (a stack called on its own) nothing is kept.
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module) -> None:
        self.stacks = {ENCODER: encoder, DECODER: decoder}
        self._running: list[str] = []
        self._outputs: list[tuple[str, torch.Tensor]] = []  # (stream, one of its output tensors)
        self._given: list[torch.Tensor] = []  # the float tensors the running decoder call was given
        self._active = False

    def hooks(
        self, model: nn.Module, outer: Callable[[nn.Module, str, Callable[..., None]], tuple[Callable[..., None], Any]]
    ):
        """Register the hooks on ``model``'s stacks and the modules outside both, each made by
        ``outer(module, kind, fn) -> (hook, token)`` (:func:`isoprobe.compiled.outer_hook`);
        returns their handles and tokens."""
        handles, tokens = [], []

        def add(module: nn.Module, kind: str, fn: Callable[..., None], register: Callable[..., Any], **kw) -> None:
            hook, token = outer(module, kind, fn)
            tokens.append(token)
            handles.append(register(hook, **kw))

        for name, stack in self.stacks.items():
            add(stack, "enter", self._enter(name), stack.register_forward_pre_hook, with_kwargs=True)
            add(stack, "leave", self._leave(name), stack.register_forward_hook, always_call=True)
        for module in _outside(model, list(self.stacks.values())):
            add(module, "pass", self._pass, module.register_forward_hook, with_kwargs=True)
        return handles, tokens

    def _enter(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if not self._active:
                return
            self._running.append(name)
            if name == DECODER:
                given = (*args, *kwargs.values())
                self._given = [t for t in given if isinstance(t, torch.Tensor) and t.is_floating_point()]

        return hook

    def _pass(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        """A module outside both stacks: its output is a stream's if its first input is."""
        x, out = first_tensor(args, kwargs), first_output(output)
        if not self._active or x is None or out is None:
            return
        name = self._output_of(x)
        if name is not None:
            self._outputs.append((name, out))

    def _leave(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if not self._active:
                return
            if self._running and self._running[-1] == name:
                self._running.pop()
            if name == DECODER:
                self._given = []
            out = first_output(output)
            if out is not None:
                self._outputs.append((name, out))

        return hook

    def start(self, encoder_outputs: Any = None) -> None:
        self.stop()
        self._active = True
        out = first_output(encoder_outputs)
        if out is not None:
            self._outputs.append((ENCODER, out))

    def stop(self) -> None:
        """Forget the forward's tensors (the streams' outputs are not kept alive)."""
        self._active = False
        self._running.clear()
        self._outputs.clear()
        self._given = []

    def _output_of(self, x: torch.Tensor) -> str | None:
        """The stream one of whose output tensors ``x`` is, else ``None``."""
        return next((name for name, out in self._outputs if _same(x, out)), None)

    def stream(self, x: torch.Tensor) -> str | None:
        """The stream whose tokens ``x``'s rows are: one of a stream's output tensors it is,
        else the stack running now, else ``None``."""
        name = self._output_of(x)
        if name is not None:
            return name
        return self._running[-1] if self._running else None

    def foreign(self, x: torch.Tensor) -> bool:
        """Is ``x`` a tensor the running decoder call was given from outside, no stream's output,
        as long as an encoder output (so its tokens may be the source's or the target's)?"""
        if self._running[-1:] != [DECODER] or x.ndim < 2 or self._output_of(x) is not None:
            return False
        source = any(name == ENCODER and out.ndim >= 2 and out.shape[1] == x.shape[1] for name, out in self._outputs)
        return source and any(_same(x, t) for t in self._given)


def _outside(model: nn.Module, stacks: list[nn.Module]) -> list[nn.Module]:
    """``model``'s submodules that are neither in a stack nor hold one."""
    inside = {id(m) for stack in stacks for m in stack.modules()}
    holds: dict[int, bool] = {}

    def holding(m: nn.Module) -> bool:
        if id(m) not in holds:
            holds[id(m)] = any(m is s for s in stacks) or any(holding(c) for c in m.children())
        return holds[id(m)]

    return [m for m in model.modules() if id(m) not in inside and not holding(m)]
