"""Globs on dotted module names (``transformer.h.3.attn``), as the Probe's ``sites`` and record
lookups use them. No torch in this module.

A pattern is split at its dots like the name. Within one component ``*``, ``?`` and ``[...]``
work as in :mod:`fnmatch` (``*`` never crosses a dot); a whole component ``**`` stands for any
number of components, none included. A pattern matches a name when it matches the whole name or
a dotted suffix of it, so ``"*.attn"`` is every ``attn``, ``"ln_f"`` is ``transformer.ln_f``, and
``"transformer.h.*"`` is the blocks ``transformer.h.0``, ``transformer.h.1``, ... but not the
modules inside them (``"transformer.h.**"`` is ``transformer.h`` and every module below it).
"""

from __future__ import annotations

import fnmatch
from functools import lru_cache

__all__ = ["match_name"]


def match_name(name: str, pattern: str) -> bool:
    """Does ``pattern`` match the dotted ``name`` or one of its dotted suffixes (module docstring)?"""
    parts = name.split(".")
    return any(_match(tuple(parts[start:]), tuple(pattern.split("."))) for start in range(len(parts)))


@lru_cache(maxsize=4096)
def _match(parts: tuple[str, ...], pats: tuple[str, ...]) -> bool:
    """Whole-sequence match of name components against pattern components (``**`` = any run)."""
    if not pats:
        return not parts
    head, rest = pats[0], pats[1:]
    if head == "**":
        return any(_match(parts[i:], rest) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], head) and _match(parts[1:], rest)
