"""Tokens per Gram: a token-view activation cut into consecutive windows of at most N tokens.

A token Gram of ``n`` tokens with ``d`` entries each has rank at most ``d``, so ``n > d`` makes
it singular by construction (isometry 0, gap ``+inf``; Joudaki et al. 2023, Definition 1,
arXiv:2310.02012): 512 tokens of a 384-wide MiniLM, 1024 tokens of GPT-2's 768. Windows bound
``n``.

**How a sequence is split.** Its ``n`` real tokens (padding left out by the attention mask,
wherever it sits) are cut into ``k = ceil(n / N)`` consecutive, non-overlapping windows of sizes
as equal as possible: window ``j`` holds the tokens of rank ``ceil(j n / k)`` to
``ceil((j + 1) n / k) - 1``. Sizes differ by at most one and, for ``n > N``, lie in ``[N/2, N]``:
no short last window of a few tokens (whose gap would not be comparable), no token dropped,
none counted twice. A sequence of at most ``N`` tokens is one window, itself.

Each window is an item group of its own, one Gram: its records keep the sequence's ``item`` and
add the window's index ``window`` (0, 1, ...), so a researcher averages per sequence by ``item``
or over all windows. The windows of a batch are stacked ``(G, W, hidden)`` (``W`` the longest
window) with a mask of their real tokens, which the Probe's padding arithmetic then treats like
any padded batch. Pure tensor functions; the layout is computed once per forward on the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["WindowLayout", "window_layout", "window_sizes", "windowed"]


@dataclass(frozen=True)
class WindowLayout:
    """Where the windows' tokens are: ``index`` ``(G, W)`` rows of the ``(batch · seq, ...)``
    activation (0 on a window's padding), ``mask`` ``(G, W)`` its real tokens (``None``: all
    real), ``groups`` the ``(item, window)`` of each of the ``G`` windows, in order."""

    index: torch.Tensor
    mask: torch.Tensor | None
    groups: list[tuple[int, int]]


def _bounds(n: int, size: int) -> list[int]:
    """Start of each of the ``k = max(1, ceil(n / size))`` windows of ``n`` tokens, then ``n``."""
    k = max(1, -(-n // size))
    return [-(-j * n // k) for j in range(k)] + [n]


def window_sizes(n: int, size: int) -> list[int]:
    """The sizes of the windows of at most ``size`` tokens of a sequence of ``n`` tokens."""
    bounds = _bounds(n, size)
    return [b - a for a, b in zip(bounds, bounds[1:])]


def window_layout(mask: torch.Tensor | None, batch: int, seq: int, size: int, device: torch.device) -> WindowLayout:
    """The windows of at most ``size`` real tokens of each of ``batch`` sequences of ``seq``
    positions (``mask`` ``(batch, seq)``, nonzero = real; ``None``: all real): module docstring."""
    if size < 1:
        raise ValueError(f"window must be a positive number of tokens, got {size}")
    real = torch.ones(batch, seq, dtype=torch.bool) if mask is None else mask.detach().cpu() != 0
    rows: list[torch.Tensor] = []
    groups: list[tuple[int, int]] = []
    for i in range(batch):
        positions = torch.nonzero(real[i]).flatten() + i * seq
        bounds = _bounds(len(positions), size)
        for j in range(len(bounds) - 1):
            rows.append(positions[bounds[j] : bounds[j + 1]])
            groups.append((i, j))
    width = max(len(r) for r in rows)
    index = torch.zeros(len(rows), width, dtype=torch.long)
    keep = torch.zeros(len(rows), width, dtype=torch.bool)
    for g, r in enumerate(rows):
        index[g, : len(r)] = r
        keep[g, : len(r)] = True
    return WindowLayout(index.to(device), None if bool(keep.all()) else keep.to(device), groups)


def windowed(t: torch.Tensor, layout: WindowLayout) -> torch.Tensor:
    """The windows ``(G, W, ...)`` of a ``(batch, seq, ...)`` activation ``t``, zero on their
    padding (a copy; ``t`` is not changed)."""
    out = t.flatten(0, 1)[layout.index]
    if layout.mask is not None:
        out = out.masked_fill(~layout.mask.reshape(*layout.mask.shape, *([1] * (out.ndim - 2))), 0)
    return out
