"""Which token stream a module call sees in an encoder-decoder model (T5, BART, ...).

An encoder-decoder model runs two token sequences, the source through its encoder and the target
through its decoder, each with its own padding mask: ``attention_mask`` for the source,
``decoder_attention_mask`` for the target. A token-view Gram must drop the padding of the
sequence its items are tokens of, whatever the two lengths are. Where the call runs tells which:

- inside the encoder: the source;
- inside the decoder: the target, except a module whose first input *is* the encoder's output
  tensor (cross-attention's key and value projections): the source;
- outside both (a head): the stream whose output tensor it reads, else unknown.

A model is encoder-decoder when its ``config.is_encoder_decoder`` is true and its
``get_encoder()``/``get_decoder()`` (the HuggingFace interface) return two distinct submodules.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

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


def _first_tensor(value: Any) -> torch.Tensor | None:
    """``value`` if a tensor, else the first tensor of a tuple/list/dict (a ``ModelOutput``)."""
    if isinstance(value, dict):
        value = tuple(value.values())
    if isinstance(value, (tuple, list)):
        return next((v for v in value if isinstance(v, torch.Tensor)), None)
    return value if isinstance(value, torch.Tensor) else None


def _same(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Is ``x`` the tensor ``y`` (or a view with the same memory, shape and strides)? ``y`` is
    held until the forward ends, so its memory cannot be reused by another tensor meanwhile."""
    return x.device == y.device and x.data_ptr() == y.data_ptr() and x.shape == y.shape and x.stride() == y.stride()


class Streams:
    """The stream (``ENCODER``, ``DECODER`` or ``None``) of each module call during a forward.

    :meth:`hooks` registers a pre- and a post-forward hook on each stack; :meth:`start` begins
    a forward of the model (``encoder_outputs``: the precomputed encoder output it was given, as
    during generation, if any) and :meth:`stop` ends it; :meth:`stream` answers for a call's
    first input ``x``. Outside the model's forwards (a stack called on its own) nothing is kept.
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module) -> None:
        self.stacks = {ENCODER: encoder, DECODER: decoder}
        self._running: list[str] = []
        self._outputs: dict[str, torch.Tensor] = {}
        self._active = False

    def hooks(self, wrap: Callable[[Callable[..., None]], Callable[..., None]]) -> list[Any]:
        """Register the stacks' hooks, each passed through ``wrap``; returns their handles."""
        handles = []
        for name, stack in self.stacks.items():
            handles.append(stack.register_forward_pre_hook(wrap(self._enter(name))))
            handles.append(stack.register_forward_hook(wrap(self._leave(name)), always_call=True))
        return handles

    def _enter(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if self._active:
                self._running.append(name)

        return hook

    def _leave(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if not self._active:
                return
            if self._running and self._running[-1] == name:
                self._running.pop()
            out = _first_tensor(output)
            if out is not None:
                self._outputs[name] = out

        return hook

    def start(self, encoder_outputs: Any = None) -> None:
        self._active = True
        self._running.clear()
        self._outputs.clear()
        out = _first_tensor(encoder_outputs)
        if out is not None:
            self._outputs[ENCODER] = out

    def stop(self) -> None:
        """Forget the forward's tensors (the stacks' outputs are not kept alive)."""
        self._active = False
        self._running.clear()
        self._outputs.clear()

    def stream(self, x: torch.Tensor) -> str | None:
        """The stream whose tokens ``x``'s rows are: a stack's output it is, else the stack
        running now, else ``None``."""
        for name, out in self._outputs.items():
            if _same(x, out):
                return name
        return self._running[-1] if self._running else None
