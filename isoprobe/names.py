"""Globs on dotted module names (``transformer.h.3.attn``), as the Probe's ``sites`` and record
lookups use them. No torch in this module.

A pattern is split at its dots like the name. Within one component ``*``, ``?`` and ``[...]``
work as in :mod:`fnmatch` (``*`` never crosses a dot); a whole component ``**`` stands for any
number of components, none included. A pattern matches a name when it matches the whole name or
a dotted suffix of it, so ``"*.attn"`` is every ``attn``, ``"ln_f"`` is ``transformer.ln_f``, and
``"transformer.h.*"`` is the blocks ``transformer.h.0``, ``transformer.h.1``, ... but not the
modules inside them (``"transformer.h.**"`` is ``transformer.h`` and every module below it).

A *functional site* (a call of ``F.relu``, ``torch.tanh``, ``x.relu_()``, ``F.layer_norm``, ...
made by a module's forward: :mod:`isoprobe.calls`) is named ``"owner:function@index"``:
``owner`` the qualified name of the module whose forward made the call (empty for the model's
own forward), ``index`` the call's rank among that forward's calls of the same function, e.g.
``"Mixed_5b.branch1x1:relu@0"``. A pattern with a ``:`` is a pattern on such names
(:func:`match_site`): ``owner`` as above, ``function@index`` an :mod:`fnmatch` glob, every index
when ``@index`` is left out (``"*:relu"``, ``"layer1.**:gelu@0"``, ``":relu"`` for the
model's own calls). A pattern without one matches any site name as a dotted name: ``"*"`` and
``"**"`` match functional sites too, ``"blk"`` only the module ``blk``.
"""

from __future__ import annotations

import fnmatch
from functools import lru_cache

__all__ = ["match_name", "match_site"]


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


def match_site(name: str, pattern: str) -> bool:
    """Does ``pattern`` match the site ``name``, a module name or a functional site's
    ``"owner:function@index"`` (module docstring)?"""
    if ":" not in pattern:
        return match_name(name, pattern)
    owner, colon, function = name.partition(":")
    want_owner, _, want_function = pattern.partition(":")
    if not colon:
        return False
    if "@" not in want_function:
        want_function += "@*"
    return match_name(owner, want_owner) and fnmatch.fnmatchcase(function, want_function)
