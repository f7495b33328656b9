"""Two or more probe runs side by side: per site and point each run's isometry gap and the
difference, as a table and as one depth figure (``isoprobe compare``, ``inspect --baseline``).

A *run* is the output of ``isoprobe gpt2``/``inspect --out`` (a folder holding
``records.json``, else ``records.csv``) or a records file (``.json`` from
:func:`~isoprobe.records.to_json`, ``.csv`` / ``.jsonl`` from a
:class:`~isoprobe.records.RecordSink`). Each run is summarised per (site, call, point) by
:func:`~isoprobe.records.summarize`; the gap compared is the summary's ``gap_mean`` (the mean of
``−log I`` over items and steps, Joudaki et al. 2023, arXiv:2310.02012, Definition 1). The
difference is each run's gap minus the first run's. Runs are compared on the (site, call,
point) they all have; what some lack is reported, and no shared point at all is an error. Only
like is differenced: a point measured in different views (token vs sample Grams) is listed, not
differenced, and runs over different token windows (``--window``) are refused.
"""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from isoprobe.records import (
    Record,
    _layer_ticks,
    _row_gap,
    _y_range,
    read_json,
    read_records,
    record_key,
    site_label,
    summarize,
)

__all__ = [
    "Comparison",
    "ProbeRun",
    "compare_runs",
    "comparison_json",
    "format_comparison",
    "load_run",
    "plot_comparison",
]

_Key = tuple[str, int, str]  # (site, call, point)


@dataclass
class ProbeRun:
    """The records of one run, a label for tables and legends, and where they were read."""

    label: str
    records: list[Record] = field(repr=False)
    source: str = ""


def load_run(path: str | Path) -> ProbeRun:
    """The run in ``path``: an ``--out`` folder (``records.json``, else ``records.csv``) or a
    records file (``.json``, ``.csv``, ``.jsonl``). ``ValueError`` saying what is missing."""
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in ("records.json", "records.csv") if (path / name).is_file()]
        if not found:
            raise ValueError(f"{path}: no records.json or records.csv (give an --out folder of isoprobe gpt2/inspect)")
        path = found[0]
    elif not path.exists():
        raise ValueError(f"{path}: no such file or folder")
    label = str(path.parent if path.name in ("records.json", "records.csv") else path)
    try:
        if path.suffix.lower() == ".json":
            records, meta = read_json(path)
            label = str(meta.get("model") or label)
        else:
            records = read_records(path)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: not a records file ({type(error).__name__}: {error})") from None
    if not records:
        raise ValueError(f"{path}: holds no records")
    return ProbeRun(label, records, str(path))


@dataclass
class Comparison:
    """The gaps of several runs on the (site, call, point) they share, in the first run's order.

    ``gaps[k][key]``: run ``k``'s mean gap over its finite Grams at ``key`` (``inf`` where every
    Gram was singular, ``None`` where undefined); ``singular[k][key]``: how many of run ``k``'s
    Grams at ``key`` were singular (left out of a finite mean); ``missing[k]``: the keys of the
    union run ``k`` lacks; ``kinds`` and ``views``: each shared key's site kind (``"norm"``,
    ``"activation"``, ...) and view (``"token"``, ``"sample"``, ...), the same in every run;
    ``mixed_views``: the keys all runs have but measure in different views, with each run's view
    (not in ``keys``: not differenced).
    """

    runs: list[ProbeRun]
    keys: list[_Key]
    gaps: list[dict[_Key, float | None]]
    missing: list[list[_Key]]
    kinds: dict[_Key, str]
    views: dict[_Key, str]
    singular: list[dict[_Key, int]] = field(default_factory=list)
    mixed_views: dict[_Key, list[str]] = field(default_factory=dict)

    def difference(self, k: int, key: _Key) -> float | None:
        """Run ``k``'s gap minus the first run's at ``key`` (``None`` when either is undefined
        or both are ``inf``)."""
        a, b = self.gaps[0][key], self.gaps[k][key]
        if a is None or b is None or (math.isinf(a) and math.isinf(b)):
            return None
        return b - a

    def missing_text(self) -> str:
        """One line per run that lacks some of the others' points (``""`` when none does)."""
        lines = []
        for letter, run, lacks in zip(_letters(len(self.runs)), self.runs, self.missing):
            if lacks:
                shown = ", ".join(record_key(s, p, c) for s, c, p in lacks[:4])
                more = f" and {len(lacks) - 4} more" if len(lacks) > 4 else ""
                lines.append(f"{letter} ({run.label}) lacks {len(lacks)}: {shown}{more}")
        return "\n".join(lines)

    def mixed_views_text(self, prefix: str = "measured in different views, not differenced") -> str:
        """``prefix (k): site:point (A token, B sample), ...``: the points measured in different
        views, not differenced (``""`` when none is)."""
        if not self.mixed_views:
            return ""
        letters = _letters(len(self.runs))
        shown = [
            f"{record_key(s, p, c)} ({', '.join(f'{x} {v}' for x, v in zip(letters, views))})"
            for (s, c, p), views in list(self.mixed_views.items())[:4]
        ]
        more = f" and {len(self.mixed_views) - 4} more" if len(self.mixed_views) > 4 else ""
        return f"{prefix} ({len(self.mixed_views)}): {', '.join(shown)}{more}"


def _letters(count: int) -> list[str]:
    return [chr(ord("A") + i) if i < 26 else f"R{i + 1}" for i in range(count)]


def _window_size(records: Sequence[Record]) -> int | None:
    """The token window of a run: ``None`` when no record has a ``window`` (Grams over whole
    sequences), else the most tokens in one windowed Gram (``--window N`` gives at most ``N``)."""
    sizes = [r.n for r in records if r.window is not None]
    return max(sizes) if sizes else None


def _check_windows(runs: Sequence[ProbeRun]) -> None:
    """``ValueError`` unless all ``runs`` are whole-sequence or all have one window size: a gap
    over windows of ``w`` tokens and one over other spans measure different Grams."""
    sizes = [_window_size(run.records) for run in runs]
    if len(set(sizes)) > 1:
        each = "; ".join(
            f"{letter} ({run.label}): " + ("whole sequences" if w is None else f"windows of up to {w} tokens")
            for letter, run, w in zip(_letters(len(runs)), runs, sizes)
        )
        raise ValueError(f"the runs' Grams span different tokens, their gaps are not comparable: {each}")


def compare_runs(runs: Sequence[ProbeRun]) -> Comparison:
    """Align ``runs`` (two or more) on the (site, call, point) all of them have and measure in
    one view; points in different views are kept in ``mixed_views``.

    ``ValueError`` with fewer than two runs, runs over different token windows, or when they
    share no point in one view (naming what each has).
    """
    if len(runs) < 2:
        raise ValueError("compare needs two or more runs")
    _check_windows(runs)
    rows = [{(r["site"], r["call"], r["point"]): r for r in summarize(run.records)} for run in runs]
    union = list(dict.fromkeys(k for table in rows for k in table))
    shared = [k for k in rows[0] if all(k in table for table in rows)]
    missing = [[k for k in union if k not in table] for table in rows]
    if not shared:
        have = "; ".join(
            f"{letter} ({run.label}) has {', '.join(sorted({site_label(s, c) for s, c, _ in table})[:3])}…"
            for letter, run, table in zip(_letters(len(runs)), runs, rows)
        )
        raise ValueError(f"the runs share no site and point: {have}")
    views_of = {k: [table[k]["view"] for table in rows] for k in shared}
    mixed = {k: v for k, v in views_of.items() if len(set(v)) > 1}
    keys = [k for k in shared if k not in mixed]
    comparison = Comparison(
        list(runs),
        keys,
        [{k: _row_gap(table[k]) for k in keys} for table in rows],
        missing,
        {k: rows[0][k]["kind"] for k in keys},
        {k: rows[0][k]["view"] for k in keys},
        [{k: table[k]["singular"] for k in keys} for table in rows],
        mixed,
    )
    if not keys:
        raise ValueError(
            comparison.mixed_views_text("the runs measure every shared point in different views, nothing to compare")
        )
    return comparison


def _cell(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "+inf" if value > 0 and signed else "inf" if value > 0 else "-inf"
    return f"{value:+.4g}" if signed else f"{value:.4g}"


def _gap_cell(value: float | None, singular: int) -> str:
    """A run's mean gap, with how many of its Grams were singular: ``inf (k singular)`` when all
    were, ``g (+k singular)`` when ``k`` were left out of the mean ``g``."""
    if not singular:
        return _cell(value)
    return (
        f"inf ({singular} singular)"
        if value is not None and math.isinf(value)
        else f"{_cell(value)} (+{singular} singular)"
    )


def format_comparison(comparison: Comparison) -> str:
    """The table: a legend line per run (``A: label``), then per shared (site, call, point) each
    run's mean gap and, for every run after the first, its difference from the first; then what
    some runs lack."""
    letters = _letters(len(comparison.runs))
    legend = [
        f"{letter}: {run.label}" + (f"  [{run.source}]" if run.source else "")
        for letter, run in zip(letters, comparison.runs)
    ]
    header = ["site", "point", *(f"gap {x}" for x in letters), *(f"{x} − A" for x in letters[1:])]
    lines = [header]
    for key in comparison.keys:
        site, call, point = key
        gaps = [_gap_cell(g[key], n.get(key, 0)) for g, n in zip(comparison.gaps, comparison.singular)]
        diffs = [_cell(comparison.difference(k, key), signed=True) for k in range(1, len(letters))]
        lines.append([site_label(site, call), point, *gaps, *diffs])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    table = [
        "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))).rstrip()
        for line in lines
    ]
    table.insert(1, "  ".join("-" * w for w in widths))
    lacks, mixed = comparison.missing_text(), comparison.mixed_views_text()
    footer = (
        [f"compared on the {len(comparison.keys)} site points all runs have; the others:\n{lacks}"] if lacks else []
    )
    footer += [mixed] if mixed else []
    return "\n".join([*legend, "", *table, *footer])


def plot_comparison(comparison: Comparison, path: str | Path, title: str | None = None) -> Path:
    """One depth figure: every run's mean gap along the shared sites (input and output of each
    site, in forward order; norms on a red band; triangles at the top mark a singular Gram), and
    under it each run's difference from the first. Sized for one column (3.5 in wide, 300 dpi)."""
    from matplotlib.figure import Figure

    units = list(dict.fromkeys((site, call) for site, call, _ in comparison.keys))
    fig = Figure(figsize=(3.5, 4.2), layout="constrained")
    top_ax, diff_ax = fig.subplots(2, 1, sharex=True, height_ratios=(2.2, 1))
    _draw_runs(top_ax, diff_ax, comparison, units)
    _label_comparison(fig, top_ax, diff_ax, comparison, units, title)
    path = Path(path)
    fig.savefig(path, dpi=300)
    return path


def _series(
    comparison: Comparison, units: list[tuple[str, int]], values: dict[_Key, float | None]
) -> tuple[list[float], list[float | None]]:
    """x and y of the input and output of every site in order, with a break (NaN) where the view
    changes (a pooler's sample Gram after token Grams is over other items: not joined)."""
    xs: list[float] = []
    ys: list[float | None] = []
    view = None
    for i, unit in enumerate(units):
        for j, point in enumerate(("pre", "post")):
            if (*unit, point) in values:
                if view is not None and comparison.views[(*unit, point)] != view:
                    xs.append(2 * i - 0.5)
                    ys.append(math.nan)
                view = comparison.views[(*unit, point)]
                xs.append(2 * i + j)
                ys.append(values[(*unit, point)])
    return xs, ys


def _draw_runs(top_ax: Any, diff_ax: Any, comparison: Comparison, units: list[tuple[str, int]]) -> None:
    """Each run's gaps on ``top_ax`` (y range as the depth plot's), differences on ``diff_ax``."""
    scale, bottom, top = _y_range([g for gaps in comparison.gaps for g in gaps.values() if g is not None])
    for k, (letter, run, gaps) in enumerate(zip(_letters(len(comparison.runs)), comparison.runs, comparison.gaps)):
        xs, ys = _series(comparison, units, gaps)
        shown = [math.nan if g is None else top if math.isinf(g) else max(g, bottom) for g in ys]
        label = textwrap.fill(textwrap.shorten(f"{letter}: {run.label}", 110, placeholder="…"), 60)
        top_ax.plot(xs, shown, color=f"C{k}", marker="o", ms=2, lw=1.1, label=label)
        inf_x = [x for x, g in zip(xs, ys) if g is not None and math.isinf(g)]
        top_ax.plot(inf_x, [top] * len(inf_x), color=f"C{k}", marker="^", ms=3, ls="none")
        if k:
            dx, dy = _series(comparison, units, {key: comparison.difference(k, key) for key in comparison.keys})
            finite = [math.nan if d is None or math.isinf(d) else d for d in dy]  # NaN: not drawn
            diff_ax.plot(dx, finite, color=f"C{k}", marker="o", ms=2, lw=1.1, label=f"{letter} − A")
    top_ax.set_yscale(scale)
    top_ax.set_ylim(bottom, top)
    diff_ax.axhline(0.0, color="0.6", lw=0.7)
    for i, unit in enumerate(units):
        if comparison.kinds.get((*unit, "pre")) == "norm":
            for ax in (top_ax, diff_ax):
                ax.axvspan(2 * i - 0.2, 2 * i + 1.2, color="C3", alpha=0.1, lw=0)


def _label_comparison(
    fig: Any, top_ax: Any, diff_ax: Any, comparison: Comparison, units: list[tuple[str, int]], title: str | None
) -> None:
    """Layer-index ticks, axis labels, a title of at most two lines, the legend under the axes."""
    from matplotlib.patches import Patch

    ticks, labels = _layer_ticks(units)
    diff_ax.set_xticks(ticks, labels, fontsize=6)
    for tick in diff_ax.get_xticklabels():  # long site names (embeddings) upright, beside the numbers
        if len(tick.get_text()) > 4:
            tick.set_rotation(90)
    diff_ax.set_xlim(-0.6, 2 * len(units) - 0.4)
    for ax, label in ((top_ax, "isometry gap  −log I"), (diff_ax, "difference")):
        ax.tick_params(axis="y", labelsize=6)
        ax.set_ylabel(label, fontsize=7)
    diff_ax.set_xlabel("layer index (sites in forward order: input, output)", fontsize=7)
    title = title or "isometry gap along depth: " + " vs ".join(_letters(len(comparison.runs)))
    top_ax.set_title(textwrap.fill(textwrap.shorten(title, 104, placeholder="…"), 52), fontsize=7.5)
    handles, names = top_ax.get_legend_handles_labels()
    if any(kind == "norm" for kind in comparison.kinds.values()):
        handles.append(Patch(color="C3", alpha=0.1, lw=0))
        names.append("norm layer (shaded band)")
    fig.legend(handles, names, loc="outside lower center", ncol=1, fontsize=6, frameon=False)


def comparison_json(comparison: Comparison) -> str:
    """The comparison as JSON: ``runs``; ``rows``, per differenced key each run's ``gaps``, its
    ``singular`` Gram count and the ``differences`` (inf as ``"inf"``); ``mixed_views``, the keys
    measured in different views with each run's view."""

    def safe(v: float | None) -> float | str | None:
        return v if v is None or math.isfinite(v) else ("inf" if v > 0 else "-inf")

    rows = [
        {
            "site": s,
            "call": c,
            "point": p,
            "gaps": [safe(g[(s, c, p)]) for g in comparison.gaps],
            "singular": [n.get((s, c, p), 0) for n in comparison.singular],
            "differences": [safe(comparison.difference(k, (s, c, p))) for k in range(1, len(comparison.runs))],
        }
        for s, c, p in comparison.keys
    ]
    runs = [{"label": r.label, "source": r.source} for r in comparison.runs]
    mixed = [{"site": s, "call": c, "point": p, "views": v} for (s, c, p), v in comparison.mixed_views.items()]
    return json.dumps({"runs": runs, "rows": rows, "mixed_views": mixed}, indent=1, allow_nan=False)
