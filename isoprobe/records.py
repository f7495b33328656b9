"""One record type for everything a :class:`~isoprobe.hooks.Probe` measures, and its writers.

A :class:`Record` is one isometry measurement: one Gram matrix (SPEC §1) at one *point* of one
*site* (a module of the model) for one *item group* (a sequence in the token view, the whole batch
in the sample and feature views) at one forward call (*step*). Everything here reads plain lists of
records: summaries, a text table, CSV, JSON and a plot in the style of Joudaki et al., Fig. C.5
(isometry gap along depth, before and after every LayerNorm). No torch in this module.

JSON encodes ``+inf`` (the gap of a singular Gram) as the string ``"inf"`` so that the file stays
valid JSON; :func:`read_json` turns it back into a float.
"""

from __future__ import annotations

import csv
import dataclasses
import fnmatch
import io
import json
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from isoprobe.names import match_name

__all__ = [
    "POINTS",
    "Record",
    "csv_text",
    "format_table",
    "json_text",
    "plot_records",
    "read_json",
    "record_key",
    "site_label",
    "summarize",
    "theorem1_counts",
    "to_csv",
    "to_json",
]

#: The points of a site, in forward order. Activation sites have only ``pre`` and ``post``.
POINTS = ("pre", "centered", "normalized", "post")

UNDEFINED = "undefined: fewer than 2 items"
NONFINITE = "non-finite"


@dataclass(frozen=True)
class Record:
    """One isometry measurement.

    ``site``: the module's qualified name (``model.named_modules()``); ``kind``: ``"norm"`` or
    ``"activation"``; ``point``: ``"pre"`` (module input), ``"centered"`` (an RMSNorm does not
    centre: there it equals ``pre``), ``"normalized"`` (centred and divided by
    ``sqrt(var + eps)`` with the module's own eps, before the affine part; norms only) or
    ``"post"`` (module output); ``view``: ``"token"``, ``"sample"`` or
    ``"feature"``; ``item``: sequence index in the batch for the token view, else ``None``;
    ``step``: forward-call counter of the probed model; ``call``: 0, 1, ... for the k-th call of
    the site's module within that forward (a module applied twice, e.g. one activation module
    shared by two layers); ``n``: items in the Gram; ``dim``: entries per item.

    ``isometry = exp(-isometry_gap)``; the gap is ``+inf`` for a singular Gram. On the
    ``normalized`` record of a norm site, ``norm_factor`` is the norm-variation factor of the
    centred items and ``theorem1_bound = I(centered) · norm_factor``, which Theorem 1
    (Corollary 2 for layer norm, Corollary 3 for batch norm) says ``isometry`` cannot fall below;
    ``theorem1_holds`` is that check up to rounding. ``flag`` says why values are missing
    (``"undefined: fewer than 2 items"``) or untrustworthy (``"non-finite"``: NaN or inf in the
    activations); values a record does not have are ``None``.
    """

    site: str
    kind: str
    point: str
    view: str
    item: int | None
    step: int
    n: int
    dim: int
    isometry: float | None
    isometry_gap: float | None
    orthogonality_gap: float | None
    theorem1_bound: float | None = None
    theorem1_holds: bool | None = None
    norm_factor: float | None = None
    flag: str | None = None
    call: int = 0

    @property
    def key(self) -> str:
        """``"site:point"``, e.g. ``"transformer.h.3.ln_1:pre"``; ``"site@k:point"`` for the
        k-th call (k ≥ 1) of a module called more than once in a forward (:func:`record_key`)."""
        return record_key(self.site, self.point, self.call)

    def matches(self, pattern: str) -> bool:
        """Does ``pattern`` (``"site[@call][:point]"``) select this record? ``site`` is a glob on
        dotted names (:func:`isoprobe.names.match_name`: ``"*.ln_1"``, ``"transformer.h.*.attn"``),
        ``point`` an :mod:`fnmatch` glob (every point when left out); without ``@`` every call of
        the module matches, ``@1`` only its second call in each forward, ``@0`` its first."""
        site, _, point = pattern.rpartition(":") if ":" in pattern else (pattern, "", "*")
        site, at, call = site.partition("@")
        return (
            match_name(self.site, site)
            and fnmatch.fnmatchcase(self.point, point)
            and (not at or fnmatch.fnmatchcase(str(self.call), call))
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> Record:
        """The record of :meth:`to_dict`; fields missing from ``row`` (older files) get their
        defaults (``call`` 0), or ``None``."""
        return cls(**{f.name: row.get(f.name, None if f.default is dataclasses.MISSING else f.default)
                      for f in dataclasses.fields(cls)})


FIELDS = tuple(f.name for f in dataclasses.fields(Record))


def site_label(site: str, call: int = 0) -> str:
    """``site`` for a module's first call in a forward, ``"site@k"`` for its k-th (k ≥ 1)."""
    return site if call == 0 else f"{site}@{call}"


def record_key(site: str, point: str, call: int = 0) -> str:
    """The key of a record or summary row: ``"site:point"``, or ``"site@k:point"`` for call k ≥ 1."""
    return f"{site_label(site, call)}:{point}"


def _groups(records: Iterable[Record]) -> dict[tuple[str, int, str], list[Record]]:
    """Records grouped by (site, call, point), groups in first-appearance (forward) order."""
    groups: dict[tuple[str, int, str], list[Record]] = {}
    for r in records:
        groups.setdefault((r.site, r.call, r.point), []).append(r)
    return groups


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and population std; ``(inf, None)`` when a value is infinite; ``(None, None)`` if empty."""
    if not values:
        return None, None
    if any(math.isinf(v) for v in values):
        return math.inf, None
    return statistics.fmean(values), statistics.pstdev(values)


def summarize(records: Iterable[Record]) -> list[dict[str, Any]]:
    """One row per (site, call, point) in forward order: mean and std over items and steps.

    The calls of a module used more than once in a forward are kept apart (``call`` 0, 1, ...).
    Columns: ``site, call, point, key`` (:func:`record_key`), ``kind, view, count`` (records), ``n_mean`` (items per Gram),
    ``isometry_mean/std``, ``gap_mean/std`` (``gap_mean`` is ``inf`` and ``gap_std`` ``None``
    when one Gram is singular), ``singular`` (records with an infinite gap), ``undefined`` and
    ``nonfinite`` (flagged records, left out of the means), ``bound_mean`` (Theorem 1 bound,
    normalized points), ``theorem1_checked``, ``theorem1_violations``.
    """
    rows = []
    for (site, call, point), group in _groups(records).items():
        ok = [r for r in group if r.flag is None]
        iso_mean, iso_std = _mean_std([r.isometry for r in ok if r.isometry is not None])
        gap_mean, gap_std = _mean_std([r.isometry_gap for r in ok if r.isometry_gap is not None])
        bounds = [r.theorem1_bound for r in ok if r.theorem1_bound is not None]
        checks = [r.theorem1_holds for r in ok if r.theorem1_holds is not None]
        rows.append(
            {
                "site": site,
                "call": call,
                "key": record_key(site, point, call),
                "kind": group[0].kind,
                "point": point,
                "view": group[0].view,
                "count": len(group),
                "n_mean": statistics.fmean(r.n for r in group),
                "isometry_mean": iso_mean,
                "isometry_std": iso_std,
                "gap_mean": gap_mean,
                "gap_std": gap_std,
                "singular": sum(1 for r in ok if r.isometry_gap == math.inf),
                "undefined": sum(1 for r in group if r.flag == UNDEFINED),
                "nonfinite": sum(1 for r in group if r.flag == NONFINITE),
                "bound_mean": statistics.fmean(bounds) if bounds else None,
                "theorem1_checked": len(checks),
                "theorem1_violations": sum(1 for c in checks if not c),
            }
        )
    return rows


def theorem1_counts(records: Iterable[Record]) -> dict[str, int]:
    """``{"checked": k, "violations": v}`` over the records that carry a Theorem 1 check."""
    checks = [r.theorem1_holds for r in records if r.theorem1_holds is not None]
    return {"checked": len(checks), "violations": sum(1 for c in checks if not c)}


def csv_text(records: Iterable[Record]) -> str:
    """One CSV row per record (columns = :class:`Record` fields; ``None`` as empty)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=FIELDS, lineterminator="\n")
    writer.writeheader()
    for r in records:
        writer.writerow({k: ("" if v is None else v) for k, v in r.to_dict().items()})
    return buf.getvalue()


def to_csv(records: Iterable[Record], path: str | Path) -> Path:
    """Write :func:`csv_text` to ``path``."""
    path = Path(path)
    path.write_text(csv_text(records))
    return path


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def json_text(records: Iterable[Record], **extra: Any) -> str:
    """``{**extra, "records": [record as dict, ...]}`` as strict JSON (inf as ``"inf"``)."""
    obj = dict(extra)
    obj["records"] = [{k: _json_safe(v) for k, v in r.to_dict().items()} for r in records]
    return json.dumps(obj, indent=1, allow_nan=False)


def to_json(records: Iterable[Record], path: str | Path, **extra: Any) -> Path:
    """Write :func:`json_text` to ``path``."""
    path = Path(path)
    path.write_text(json_text(records, **extra))
    return path


def read_json(path: str | Path) -> tuple[list[Record], dict[str, Any]]:
    """Read a file written by :func:`to_json`: ``(records, the other top-level entries)``."""
    obj = json.loads(Path(path).read_text())
    rows = obj.pop("records")
    records = [
        Record.from_dict({k: (float(v) if v in ("inf", "-inf") else v) for k, v in row.items()})
        for row in rows
    ]
    return records, obj


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf"
    return f"{value:.{digits}g}"


def format_table(records: Sequence[Record]) -> str:
    """Text table, one row per site in forward order, means over items and steps; a module
    called more than once in a forward has one row per call (``site@k``, :func:`site_label`).

    Columns: the gap at every point in forward order — before the site (``pre``), for norms
    ``centered`` and ``normalized``, after the site (``post``); for norms the mean isometry after
    normalisation, the mean Theorem 1 bound, and whether the bound held for every Gram
    (``yes k/k`` or ``NO v/k``).
    The last column counts flagged Grams: undefined (one-item Grams: one-token texts) and
    non-finite (NaN/inf activations), which the means leave out.
    """
    by_key = {(site_label(row["site"], row["call"]), row["point"]): row for row in summarize(records)}
    sites: list[str] = []
    for site, _ in by_key:
        if site not in sites:
            sites.append(site)
    header = ["site", "kind", "view", "n", "gap pre", "gap centered", "gap normalized",
              "gap post", "I(normalized)", "Thm1 bound", "Thm1 holds", "flagged"]
    lines = [header]
    for site in sites:
        pre = by_key[(site, "pre")]
        cells = [site, pre["kind"], pre["view"], _fmt(pre["n_mean"], 3)]
        for point in POINTS:
            row = by_key.get((site, point))
            cells.append(_gap_cell(row))
        norm = by_key.get((site, "normalized"))
        if norm is None:
            cells += ["-", "-", "-"]
        else:
            k, v = norm["theorem1_checked"], norm["theorem1_violations"]
            holds = "-" if k == 0 else (f"yes {k}/{k}" if v == 0 else f"NO {v}/{k}")
            cells += [_fmt(norm["isometry_mean"]), _fmt(norm["bound_mean"]), holds]
        notes = [f"{pre[k]} {k}" for k in ("undefined", "nonfinite") if pre[k]]
        cells.append(", ".join(notes) or "-")
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def _gap_cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return "-"
    if row["gap_mean"] is None:
        return "non-finite" if row["nonfinite"] else "undefined"
    return _fmt(row["gap_mean"])


def plot_records(records: Sequence[Record], path: str | Path, title: str | None = None) -> Path:
    """Isometry gap along depth, before and after every site (Joudaki et al., Fig. C.5 style).

    The x axis walks the sites in forward order, two positions per site (``pre``, ``post``)
    joined by a solid segment: red for norm sites (shaded), blue for activations, green for
    named modules; a dotted grey
    line joins one site's ``post`` to the next site's ``pre`` (the layers in between). Crosses
    mark the norms' ``normalized`` point (before the affine part). y is the mean gap over items
    and steps, log scale; a singular Gram (gap ``+inf``) is drawn as a triangle at the top.
    Saved with matplotlib's Agg backend (no display needed).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {(site_label(r["site"], r["call"]), r["point"]): r for r in summarize(records)}
    sites = list(dict.fromkeys(site for site, _ in rows))
    if not sites:
        raise ValueError("no records to plot")

    def gap(site: str, point: str) -> float | None:
        row = rows.get((site, point))
        return None if row is None else row["gap_mean"]

    shown = [g for site in sites for p in POINTS if (g := gap(site, p)) is not None]
    finite = [g for g in shown if math.isfinite(g) and g > 0]
    top = max(finite) * 3 if finite else 1.0
    bottom = min(finite) / 3 if finite else 1e-3

    def y(g: float | None) -> float:
        return math.nan if g is None else top if math.isinf(g) else max(g, bottom)

    fig, ax = plt.subplots(figsize=(min(max(6.0, 0.3 * len(sites)), 18.0), 4.5))
    labelled: set[str] = set()

    def draw(xs: list[float], ys: list[float], label: str, **style: Any) -> None:
        ax.plot(xs, ys, label=None if label in labelled else label, **style)
        labelled.add(label)

    for i, site in enumerate(sites):
        is_norm = rows[(site, "pre")]["kind"] == "norm"
        if is_norm:
            ax.axvspan(2 * i - 0.3, 2 * i + 1.3, color="red", alpha=0.12, lw=0)
        pre, post = gap(site, "pre"), gap(site, "post")
        kind = rows[(site, "pre")]["kind"]
        draw([2 * i, 2 * i + 1], [y(pre), y(post)], f"{kind}: pre → post",
             color={"norm": "C3", "activation": "C0"}.get(kind, "C2"), marker="o", ms=3, lw=2)
        if is_norm and gap(site, "normalized") is not None:
            draw([2 * i + 0.5], [y(gap(site, "normalized"))], "normalized (before affine)",
                 color="C3", marker="x", ms=5, ls="none")
        if i + 1 < len(sites):
            draw([2 * i + 1, 2 * i + 2], [y(post), y(gap(sites[i + 1], "pre"))], "between sites",
                 color="0.6", ls=":", lw=1)
        singular = [2 * i + j for j, g in enumerate((pre, post)) if g is not None and math.isinf(g)]
        if singular:
            draw(singular, [top] * len(singular), "singular (gap = inf)", color="k", marker="^", ls="none")
    ax.set_yscale("log")
    ax.set_ylim(bottom, top * 1.5)
    ax.set_xticks([2 * i + 0.5 for i in range(len(sites))])
    ax.set_xticklabels(sites, rotation=90, fontsize=6 if len(sites) > 20 else 8)
    ax.set_ylabel("isometry gap  −log I(G)")
    ax.set_title(title or "isometry gap along depth (norm sites shaded)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
