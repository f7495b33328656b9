"""One record type for everything a :class:`~isoprobe.hooks.Probe` measures, and its writers.

A :class:`Record` is one isometry measurement: one Gram matrix ``G = X Xᵀ`` of items as rows
(Joudaki et al. 2023, Definition 1: ``I(G) = det(G)^(1/n) / (tr(G)/n)``) at one *point* of one
*site* (a module of the model) for one *item group* (a sequence in the token view, the whole batch
in the sample and feature views) at one forward call (*step*). Everything here reads plain lists of
records: a :class:`Summary` (a table object, also kept as a :class:`RunningSummary` in bounded
memory), a text table, CSV, JSON, a streaming :class:`RecordSink`, a plot in the style of
Joudaki et al. 2023, Fig. C.5 (isometry gap along depth, before and after every LayerNorm) and
one of the gap against training step (:func:`plot_steps`). No
torch in this module.

JSON encodes ``+inf`` (the gap of a singular Gram) as the string ``"inf"`` so that the file stays
valid JSON; :func:`read_json` and :func:`read_records` turn it back into a float.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import fnmatch
import io
import json
import math
import re
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from isoprobe.names import match_site

__all__ = [
    "POINTS",
    "Record",
    "RecordSink",
    "RunningSummary",
    "SINGULAR",
    "SINK_MODES",
    "Summary",
    "csv_text",
    "format_summary",
    "format_table",
    "json_text",
    "plot_records",
    "plot_steps",
    "read_json",
    "read_records",
    "record_key",
    "site_label",
    "split_key",
    "step_curves",
    "summarize",
    "theorem1_counts",
    "theorem1_unchecked",
    "to_csv",
    "to_json",
]

#: The points of a site, in forward order. Activation sites have only ``pre`` and ``post``.
POINTS = ("pre", "centered", "normalized", "post")

UNDEFINED = "undefined: fewer than 2 items"
NONFINITE = "non-finite"
SINGULAR = "singular by construction: more items than entries per item (rank ≤ entries), gap +inf, no Theorem 1 check"
EPS_DOMINATED = (
    "eps-dominated: the norm's eps, not small against these items' variances, explains the gap above Theorem 1's bound"
)


@dataclass(frozen=True)
class Record:
    """One isometry measurement.

    ``site``: the module's qualified name (``model.named_modules()``); ``kind``: ``"norm"`` or
    ``"activation"``; ``point``: ``"pre"`` (module input), ``"centered"`` (an RMSNorm does not
    centre: there it equals ``pre``), ``"normalized"`` (centred and divided by
    ``sqrt(var + eps)`` with the module's own eps, before the affine part; norms only) or
    ``"post"`` (module output); ``view``: ``"token"``, ``"sample"``, ``"feature"`` or
    ``"spatial"`` (a norm's ``centered`` and ``normalized`` points may be in another view than
    its ``pre`` and ``post``: the one where Theorem 1 is checked); ``item``: sequence index in
    the batch for the token view, image index for the spatial view, else ``None``;
    ``step``: the training step of the forward (:class:`~isoprobe.hooks.Probe`: by default the
    number of training-mode forwards before it; each forward of a model only run in eval mode;
    a ``Trainer``'s global step under ``ProbeCallback``); ``mode``: ``"train"`` or ``"eval"``, the
    model's mode in that forward (``None`` in files written before it was recorded); ``call``: 0, 1, ... for the k-th call of
    the site's module within that forward (a module applied twice, e.g. one activation module
    shared by two layers); ``n``: items in the Gram; ``dim``: entries per item.

    ``isometry = exp(-isometry_gap)``; the gap is ``+inf`` for a singular Gram. On the
    ``normalized`` record of a norm site, ``norm_factor`` is the norm-variation factor of the
    centred items and ``theorem1_bound = I(centered) · norm_factor``, which Theorem 1
    (Corollary 2 for layer norm, Corollary 3 for batch norm) says ``isometry`` cannot fall below;
    ``theorem1_holds`` is that check up to rounding, ``None`` where it is undecided (the theorem
    holds for every input, so ``False`` means rounding or an error in the measurement: see
    ``isoprobe.hooks``). ``flag`` says
    why values are missing (``"undefined: fewer than 2 items"``), untrustworthy (``"non-finite"``:
    NaN or inf in the activations) or why the check is undecided (``"eps-dominated: ..."``:
    Theorem 1 is about ``x / ‖x‖``, and the normalized point misses the bound by no more than the
    norm's eps lifts its gap; the values stay, only ``theorem1_holds`` is ``None``); values a
    record does not have are ``None``; ``"singular by construction"`` (:data:`SINGULAR`) marks a Gram
    of more items than its items' rank bound (``n > dim``; ``n > dim - 1`` at a centring norm's
    ``centered`` and ``normalized`` points): its gap is ``+inf`` whatever the model does, and a
    ``normalized`` record then has no Theorem 1 check (its bound would be 0). ``window``: with
    ``Probe(window=N)``, the index of the window of at most ``N`` tokens of sequence ``item`` that
    the Gram is over (:mod:`isoprobe.windows`); ``None`` for a Gram over the whole sequence.
    ``gap_error``, for float32 Grams
    (``Probe(gram_dtype=torch.float32)``): an estimate (probabilistic rounding model) of the
    isometry gap's error against the exact Gram of the same items (``0.0``: the value is exact:
    the estimate exceeded the Probe's ``float32_tolerance`` and the record was recomputed with
    float64 Grams, or the Gram is singular by construction, fewer entries per item than items,
    and its gap ``+inf`` in any precision); ``None`` for float64 Grams.
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
    gap_error: float | None = None
    call: int = 0
    window: int | None = None
    mode: str | None = None

    @property
    def key(self) -> str:
        """``"site:point"``, e.g. ``"transformer.h.3.ln_1:pre"``; ``"site@k:point"`` for the
        k-th call (k ≥ 1) of a module called more than once in a forward (:func:`record_key`)."""
        return record_key(self.site, self.point, self.call)

    def matches(self, pattern: str) -> bool:
        """Does ``pattern`` (``"site[@call][:point]"``, :func:`split_key`) select this record?
        ``site`` is a glob on site names (:func:`isoprobe.names.match_site`: ``"*.ln_1"``,
        ``"transformer.h.*.attn"``, ``"*.branch1x1:relu@0"``), ``point`` an :mod:`fnmatch` glob
        (every point when left out); without ``@call`` every call of the site matches, ``@1``
        only its second call in each forward, ``@0`` its first."""
        site, call, point = split_key(pattern)
        return (
            match_site(self.site, site)
            and fnmatch.fnmatchcase(self.point, point)
            and (call is None or fnmatch.fnmatchcase(str(self.call), call))
        )

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict (a flat record: no deep copy needed, unlike ``dataclasses.asdict``)."""
        return {name: getattr(self, name) for name in FIELDS}

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> Record:
        """The record of :meth:`to_dict`; fields missing from ``row`` (older files) get their
        defaults (``call`` 0), or ``None``."""
        return cls(
            **{
                f.name: row.get(f.name, None if f.default is dataclasses.MISSING else f.default)
                for f in dataclasses.fields(cls)
            }
        )


FIELDS = tuple(f.name for f in dataclasses.fields(Record))


def site_label(site: str, call: int = 0) -> str:
    """``site`` for a module's first call in a forward, ``"site@k"`` for its k-th (k ≥ 1)."""
    return site if call == 0 else f"{site}@{call}"


def split_key(pattern: str) -> tuple[str, str | None, str]:
    """``(site, call, point)`` of a key or pattern ``"site[@call][:point]"``: ``point`` ``"*"``
    and ``call`` ``None`` when left out. A functional site's name ``"owner:function@index"``
    has a ``:`` and an ``@`` of its own, so its k-th call is ``"owner:function@index@k"``; a
    part after the last ``:`` that fits no point (``"blk:relu@0"``) is part of the site."""
    head, colon, tail = pattern.rpartition(":")
    if colon and any(fnmatch.fnmatchcase(p, tail) for p in POINTS):
        site, point = head, tail
    else:
        site, point = pattern, "*"
    owner, colon, function = site.partition(":")
    if colon:  # owner:function[@index[@call]]
        name, _, index = function.partition("@")
        index, at, call = index.partition("@")
        return f"{owner}:{name}{'@' + index if index else ''}", call if at else None, point
    site, at, call = site.partition("@")
    return site, call if at else None, point


def record_key(site: str, point: str, call: int = 0) -> str:
    """The key of a record or summary row: ``"site:point"``, or ``"site@k:point"`` for call k ≥ 1."""
    return f"{site_label(site, call)}:{point}"


class _Moments:
    """Running count, mean and population std of a stream of floats (Welford's algorithm)."""

    __slots__ = ("count", "mean", "m2")

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def add(self, x: float) -> None:
        self.count += 1
        delta = x - self.mean
        self.mean += delta / self.count
        self.m2 += delta * (x - self.mean)

    @property
    def std(self) -> float:
        return math.sqrt(max(self.m2, 0.0) / self.count)

    def merge(self, other: _Moments) -> None:
        """Fold in the moments of another stream (Chan, Golub & LeVeque 1979, the pairwise update):
        with ``δ = mean_b − mean_a`` and ``n = n_a + n_b``, ``mean = mean_a + δ·n_b/n`` and
        ``M2 = M2_a + M2_b + δ²·n_a·n_b/n``: the moments of the concatenated streams, to rounding."""
        if other.count == 0:
            return
        count = self.count + other.count
        delta = other.mean - self.mean
        self.mean += delta * other.count / count
        self.m2 += other.m2 + delta * delta * self.count * other.count / count
        self.count = count


class _Group:
    """The running statistics of one (site, call, point): what a summary row needs, O(1) memory."""

    def __init__(self, r: Record) -> None:
        self.first = r
        self.count = self.singular = self.by_construction = self.undefined = self.nonfinite = self.eps_dominated = 0
        self.checked = self.violations = 0
        self.n_min, self.n_max, self.n_sum = r.n, r.n, 0
        self.isometry, self.gap, self.bound = _Moments(), _Moments(), _Moments()

    def add(self, r: Record) -> None:
        self.count += 1
        self.n_sum += r.n
        self.n_min, self.n_max = min(self.n_min, r.n), max(self.n_max, r.n)
        if r.flag in (UNDEFINED, NONFINITE):
            self.undefined += r.flag == UNDEFINED
            self.nonfinite += r.flag == NONFINITE
            return
        self.eps_dominated += r.flag == EPS_DOMINATED
        if r.isometry is not None:
            self.isometry.add(r.isometry)
        if r.isometry_gap is not None:
            if math.isinf(r.isometry_gap):
                self.singular += 1
                self.by_construction += r.flag == SINGULAR or r.n > r.dim
            else:
                self.gap.add(r.isometry_gap)
        if r.theorem1_bound is not None:
            self.bound.add(r.theorem1_bound)
        if r.theorem1_holds is not None:
            self.checked += 1
            self.violations += not r.theorem1_holds

    def merge(self, other: _Group) -> None:
        """Fold in the statistics of the same (site, call, point) over other records: counts add,
        ``n_min``/``n_max`` take the min/max, moments combine exactly (:meth:`_Moments.merge`)."""
        for name, value in vars(other).items():
            if name == "n_min":
                self.n_min = min(self.n_min, value)
            elif name == "n_max":
                self.n_max = max(self.n_max, value)
            elif isinstance(value, _Moments):
                getattr(self, name).merge(value)
            elif isinstance(value, int):
                setattr(self, name, getattr(self, name) + value)

    def row(self) -> dict[str, Any]:
        r = self.first
        iso, gap = self.isometry, self.gap
        gap_mean, gap_std = (gap.mean, gap.std) if gap.count else (None, None)
        return {
            "site": r.site,
            "call": r.call,
            "key": record_key(r.site, r.point, r.call),
            "kind": r.kind,
            "point": r.point,
            "view": r.view,
            "count": self.count,
            "n_min": self.n_min,
            "n_max": self.n_max,
            "n_mean": self.n_sum / self.count,
            "isometry_mean": iso.mean if iso.count else None,
            "isometry_std": iso.std if iso.count else None,
            "gap_mean": gap_mean,
            "gap_std": gap_std,
            "singular": self.singular,
            "singular_by_construction": self.by_construction,
            "undefined": self.undefined,
            "nonfinite": self.nonfinite,
            "bound_mean": self.bound.mean if self.bound.count else None,
            "theorem1_checked": self.checked,
            "theorem1_violations": self.violations,
            "eps_dominated": self.eps_dominated,
        }


class RunningSummary:
    """Per-(site, call, point) summaries updated record by record, in memory independent of how
    many records were added (what :class:`~isoprobe.hooks.Probe` keeps with a ``sink``).

    Means and standard deviations are Welford's running ones (the same numbers as
    :func:`summarize` on all the records, to rounding).
    """

    def __init__(self) -> None:
        self._groups: dict[tuple[str, int, str], _Group] = {}

    def add(self, records: Iterable[Record]) -> None:
        for r in records:
            key = (r.site, r.call, r.point)
            group = self._groups.get(key)
            if group is None:
                group = self._groups[key] = _Group(r)
            group.add(r)

    def merge(self, other: RunningSummary) -> None:
        """Fold in ``other``'s summaries (e.g. another process's share of a corpus): afterwards
        this is the running summary of both record streams, this one's first (forward order of
        this one, then the groups only ``other`` saw); ``other`` is left unchanged. Means and
        variances combine by Chan et al.'s pairwise formulas (:meth:`_Moments.merge`), equal to
        one pass over all records to rounding."""
        for key, group in other._groups.items():
            mine = self._groups.get(key)
            if mine is None:
                self._groups[key] = copy.deepcopy(group)
            else:
                mine.merge(group)

    def summary(self) -> Summary:
        return Summary(g.row() for g in self._groups.values())


class Summary(Sequence[dict[str, Any]]):
    """Summary rows, one per (site, call, point) in forward order, as a small table object.

    ``print(summary)`` shows the table the ``isoprobe gpt2``/``inspect`` commands print
    (:func:`format_summary`); iterating or indexing gives the rows as dicts (keys listed in
    :func:`summarize`); :meth:`to_pandas` gives a ``pandas.DataFrame`` when pandas is installed.
    """

    def __init__(self, rows: Iterable[dict[str, Any]] = ()) -> None:
        self._rows = list(rows)

    def __getitem__(self, index):  # type: ignore[override]
        return self._rows[index]

    def __len__(self) -> int:
        return len(self._rows)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    def __str__(self) -> str:
        return format_summary(self)

    def __repr__(self) -> str:
        return f"Summary of {len(self)} rows (site, call, point):\n{self}"

    def to_pandas(self) -> Any:
        """The rows as a ``pandas.DataFrame`` (one column per row key); needs pandas."""
        try:
            import pandas
        except ImportError as error:
            raise ImportError(
                "Summary.to_pandas needs pandas: pip install pandas (or iterate over the summary: its rows are dicts)"
            ) from error
        return pandas.DataFrame(self._rows)


def summarize(records: Iterable[Record]) -> Summary:
    """One row per (site, call, point) in forward order: mean and std over items and steps.

    The calls of a module used more than once in a forward are kept apart (``call`` 0, 1, ...).
    Row keys: ``site, call, point, key`` (:func:`record_key`), ``kind, view, count`` (records),
    ``n_min, n_max, n_mean`` (items per Gram), ``isometry_mean/std`` (over every Gram, a singular
    one's isometry 0 included), ``gap_mean/std`` (population std over the *finite* gaps; ``None``
    when no gap is finite), ``singular`` (records with an infinite gap, left out of ``gap_mean``),
    ``singular_by_construction`` (those of them with more items than entries, :data:`SINGULAR`),
    ``undefined`` and ``nonfinite`` (flagged
    records, left out of the means), ``bound_mean`` (Theorem 1 bound, normalized points),
    ``theorem1_checked``, ``theorem1_violations`` (decided checks), ``eps_dominated`` (undecided
    checks, :data:`EPS_DOMINATED`; their values are in the means). Returns a :class:`Summary`.
    """
    running = RunningSummary()
    running.add(records)
    return running.summary()


def theorem1_counts(records: Iterable[Record]) -> dict[str, int]:
    """``{"checked": k, "violations": v, "eps_dominated": u}``: ``k`` decided Theorem 1 checks,
    ``v`` of them failed, and ``u`` undecided because the norm's eps decides them (:data:`EPS_DOMINATED`)."""
    records = list(records)
    checks = [r.theorem1_holds for r in records if r.theorem1_holds is not None]
    dominated = sum(1 for r in records if r.flag == EPS_DOMINATED)
    return {"checked": len(checks), "violations": sum(1 for c in checks if not c), "eps_dominated": dominated}


def theorem1_unchecked(records: Iterable[Record]) -> int:
    """The ``normalized`` records of norms with no Theorem 1 check because their centred Gram is
    singular (the bound ``I(centered) · factor`` is 0, true of anything; by construction where
    there are more items than entries, :data:`SINGULAR`)."""
    return sum(
        1
        for r in records
        if r.point == "normalized" and r.norm_factor is not None and r.theorem1_bound is None and r.flag != NONFINITE
    )


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
    return [_from_json_row(row) for row in rows], obj


_INT_FIELDS = ("item", "step", "n", "dim", "call", "window")
_FLOAT_FIELDS = ("isometry", "isometry_gap", "orthogonality_gap", "theorem1_bound", "norm_factor", "gap_error")


def _from_csv_row(row: dict[str, str]) -> Record:
    def value(name: str, text: str) -> Any:
        if text == "":
            return "" if name == "site" else None  # the root module's name is ""
        if name in _INT_FIELDS:
            return int(text)
        if name in _FLOAT_FIELDS:
            return float(text)
        if name == "theorem1_holds":
            return text == "True"
        return text

    return Record.from_dict({k: value(k, v) for k, v in row.items()})


def _from_json_row(row: dict[str, Any]) -> Record:
    return Record.from_dict({k: (float(v) if v in ("inf", "-inf") else v) for k, v in row.items()})


SINK_MODES = ("new", "append", "overwrite")


class RecordSink:
    """Records streamed to a file as they are made: CSV (``.csv``, the columns of :func:`csv_text`)
    or JSON lines (``.jsonl``, ``.json``, ``.ndjson``: one record per line, ``+inf`` as ``"inf"``).

    ``mode``: ``"new"`` (default) refuses an existing non-empty file with ``FileExistsError``
    naming it (a rerun never loses an earlier run's records); ``"append"`` continues such a file
    (a CSV's header must then be this version's columns); ``"overwrite"`` empties it. The file is
    opened when the sink is made, so a path that cannot be written fails before any work; each
    :meth:`write` appends and flushes; :meth:`close` closes the file, and a later write reopens
    it for appending. :func:`read_records` reads it back.
    """

    def __init__(self, path: str | Path, mode: str = "new") -> None:
        self.path = Path(path)
        suffix = self.path.suffix.lower()
        if suffix not in (".csv", ".jsonl", ".json", ".ndjson"):
            raise ValueError(
                f"sink {str(path)!r}: give a .csv or .jsonl file (JSON lines), not {suffix or 'no suffix'}"
            )
        if mode not in SINK_MODES:
            raise ValueError(f"sink_mode must be one of {', '.join(SINK_MODES)}; got {mode!r}")
        if not self.path.parent.is_dir():
            raise FileNotFoundError(2, "the sink's folder does not exist", str(self.path.parent))
        self.csv = suffix == ".csv"
        full = self.path.is_file() and self.path.stat().st_size > 0
        if full and mode == "new":
            raise FileExistsError(
                17,
                "the sink file exists and is not empty; pass sink_mode='append' to continue it or "
                "sink_mode='overwrite' to replace it",
                str(self.path),
            )
        if full and mode == "append" and self.csv:
            _check_csv_header(self.path)
        keep = full and mode == "append"
        self._file: io.TextIOBase | None = self.path.open("a" if keep else "w", newline="", encoding="utf-8")
        if self.csv and not keep:
            csv.writer(self._file, lineterminator="\n").writerow(FIELDS)

    def write(self, records: Iterable[Record]) -> None:
        if self._file is None:
            self._file = self.path.open("a", newline="", encoding="utf-8")
        if self.csv:
            writer = csv.writer(self._file, lineterminator="\n")
            writer.writerows(["" if (v := getattr(r, name)) is None else v for name in FIELDS] for r in records)
        else:
            self._file.writelines(
                json.dumps({k: _json_safe(v) for k, v in r.to_dict().items()}) + "\n" for r in records
            )
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _check_csv_header(path: Path) -> None:
    """``ValueError`` unless ``path``'s first line is this version's CSV header (:data:`FIELDS`)."""
    with path.open(newline="", encoding="utf-8") as file:
        header = next(csv.reader(file), [])
    if tuple(header) != FIELDS:
        raise ValueError(
            f"cannot append to {str(path)!r}: its header ({', '.join(header[:4])}, ...) is not the columns of "
            "these records; use another file or sink_mode='overwrite'"
        )


def read_records(path: str | Path) -> list[Record]:
    """The records of a :class:`RecordSink` file (``.csv`` or JSON lines), or of :func:`to_csv`.

    A damaged file (a line that is no JSON object of a record, a CSV row whose values do not
    parse) is a ``ValueError`` naming the file and the line, and what was expected there."""
    path = Path(path)
    with path.open(newline="", encoding="utf-8") as file:
        if path.suffix.lower() == ".csv":
            reader = csv.DictReader(file)
            if reader.fieldnames is not None and not {"site", "point", "step"} <= set(reader.fieldnames):
                raise ValueError(
                    f"{path}, line 1: expected a CSV header of record fields ({', '.join(FIELDS[:5])}, ...), "
                    f"got {', '.join(reader.fieldnames[:5])}"
                )
            return [_parsed(path, reader.line_num, "a CSV row of record fields", _from_csv_row, row) for row in reader]
        return [
            _parsed(path, k, "one JSON object per line, a record's fields", _from_json_line, line)
            for k, line in enumerate(file, start=1)
            if line.strip()
        ]


def _from_json_line(line: str) -> Record:
    row = json.loads(line)
    if not isinstance(row, dict):
        raise ValueError(f"a JSON {type(row).__name__}, not an object")
    missing = [k for k in ("site", "point", "step") if k not in row]
    if missing:
        raise ValueError(f"no {', '.join(missing)}")
    return _from_json_row(row)


def _parsed(path: Path, line: int, expected: str, parse: Any, text: Any) -> Record:
    """``parse(text)``, or a ``ValueError`` naming ``path`` and ``line`` and what was expected."""
    try:
        return parse(text)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{path}, line {line}: expected {expected} ({error})") from None


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf"
    return f"{value:.{digits}g}"


def _n_cell(row: dict[str, Any]) -> str:
    lo, hi = row["n_min"], row["n_max"]
    return str(lo) if lo == hi else f"{lo}–{hi}"


def _gap_cell(row: dict[str, Any]) -> str:
    singular, by_construction = row["singular"], row.get("singular_by_construction", 0)
    if row["gap_mean"] is None:
        if by_construction and by_construction == singular:
            return f"singular by construction ×{singular} (n > dim)"
        if singular:
            return f"inf ({singular} singular)"
        return "non-finite" if row["nonfinite"] else "undefined"
    finite = row["count"] - row["undefined"] - row["nonfinite"] - singular
    cell = _fmt(row["gap_mean"]) if finite == 1 else _mean_std(row["gap_mean"], row["gap_std"])
    return cell + (f" (+{singular} singular)" if singular else "")


def _mean_std(mean: float, std: float | None) -> str:
    """``mean ± std`` to one precision: the std to 2 significant digits, the mean to the same
    decimal place (``0.200 ± 0.078``, not ``0.2 ± 0.078``)."""
    if std is None or not math.isfinite(std) or std <= 0:
        return f"{_fmt(mean)} ± {_fmt(std, 2)}"
    decimals = max(0, 1 - math.floor(math.log10(std)))
    if decimals > 8:  # a spread far below the mean's digits: both in their own significant digits
        return f"{_fmt(mean)} ± {std:.1e}"
    return f"{mean:.{decimals}f} ± {std:.{decimals}f}"


def _theorem1_cell(row: dict[str, Any]) -> str:
    k, v = row["theorem1_checked"], row["theorem1_violations"]
    if k == 0:
        if row.get("eps_dominated"):
            return "undecided"
        return "n/a: singular" if row["point"] == "normalized" and row["singular"] else "-"
    return f"yes {k}/{k}" if v == 0 else f"NO {v}/{k}"


_FLAG_LABELS = {"undefined": "undefined", "nonfinite": "nonfinite", "eps_dominated": "eps-dominated"}


def _flag_cell(row: dict[str, Any]) -> str:
    return ", ".join(f"{row[k]} {label}" for k, label in _FLAG_LABELS.items() if row.get(k)) or "-"


def format_summary(rows: Iterable[dict[str, Any]]) -> str:
    """Summary rows (:func:`summarize`) as a text table, one line per (site, call, point).

    Columns: ``site`` (``site@k`` for the k-th call of a module called more than once per
    forward), ``point``, ``view``, ``n`` (items per Gram: one number, or the range ``min–max``
    where the Grams differ, e.g. sequences of different lengths), ``gap mean ± std`` (isometry
    gap ``−log I`` over the finite gaps, population std over items and steps, the mean alone
    for a single Gram; ``(+k singular)`` counts the singular Grams left out; ``singular by
    construction ×k (n > dim)`` when every Gram has more items than entries, ``inf (k
    singular)`` when every Gram is singular),
    ``Theorem 1`` (on the ``normalized`` point of a norm: ``yes k/k`` when
    ``I(normalized) ≥ I(centered) · norm-variation factor`` held for all k decided Grams, ``NO
    v/k`` when it failed v times, ``undecided`` when every check was eps-dominated, ``n/a:
    singular`` when every Gram was singular by construction: the bound is 0, nothing to check) and
    ``flagged`` (undefined one-item Grams and non-finite activations, left out of the means;
    eps-dominated Theorem 1 checks, whose gaps are in the means).
    """
    header = ["site", "point", "view", "n", "gap mean ± std", "Theorem 1", "flagged"]
    lines = [header]
    for row in rows:
        lines.append(
            [
                site_label(row["site"], row["call"]),
                row["point"],
                row["view"],
                _n_cell(row),
                _gap_cell(row),
                _theorem1_cell(row),
                _flag_cell(row),
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def format_table(records: Iterable[Record]) -> str:
    """:func:`format_summary` of :func:`summarize` of ``records``: what the CLI prints."""
    return format_summary(summarize(records))


# ----------------------------------------------------------------------------- the plot

_LAYER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def _index_label(names: Sequence[str]) -> str:
    """What the integers of the x ticks are: a layer (block) index where sites sit inside the
    numbered modules (``transformer.h.3.ln_1``); a module index where the numbered modules are
    the sites themselves (an ``nn.Sequential`` of layers and activations: ``"2"``, ``"features.5"``)."""
    numbered = [(m, name) for name in names if (m := _LAYER.search(name))]
    ends = [(m, name) for m, name in numbered if m.end() == len(name)]
    if not ends or len(ends) < len(numbered) / 2:
        return "layer index"
    container = ends[0][1][: ends[0][0].start()]
    return f"module index in {container if container else 'the model'}"


def _layer_ticks(units: Sequence[tuple[str, int]]) -> tuple[list[float], list[str]]:
    """x ticks: the first site of every layer index (the first integer in the site's name),
    labelled by it; a site without one by the first part of its name after the prefix all sites
    share (``transformer.ln_f`` → ``ln_f``, ``embeddings.LayerNorm`` → ``embeddings``).
    At most about 14 labelled layers: every k-th beyond (:func:`_index_label` names them)."""
    names = [site for site, _ in units]
    prefix = names[0].split(".")[0] + "." if names else ""
    strip = len(prefix) if len(names) > 1 and all(n.startswith(prefix) for n in names) else 0
    ticks: list[tuple[float, str, bool]] = []
    last: object = object()
    for i, (site, _) in enumerate(units):
        m = _LAYER.search(site)
        layer = int(m.group(1)) if m else site[strip:].split(".")[0]
        if layer != last:
            ticks.append((2 * i + 0.5, str(layer), m is not None))
            last = layer
    numbered = [t for t in ticks if t[2]]
    k = max(1, math.ceil(len(numbered) / 14))
    keep = {id(t) for t in numbered[::k]} | {id(t) for t in ticks if not t[2]}
    ticks = [t for t in ticks if id(t) in keep]
    return [t[0] for t in ticks], [t[1] for t in ticks]


def _y_range(values: Sequence[float]) -> tuple[str, float, float]:
    """Log scale when the finite positive gaps span more than a factor 20, else linear; limits
    hug the data (5 % margins, a factor 1.3 on a log axis)."""
    finite = [v for v in values if math.isfinite(v)]
    positive = [v for v in finite if v > 0]
    if not finite:
        return "linear", 0.0, 1.0
    if positive and max(positive) > 20 * min(positive):
        return "log", min(positive) / 1.3, max(positive) * 1.3
    lo, hi = min(finite), max(finite)
    pad = 0.05 * (hi - lo) or 0.05 * max(abs(hi), 1e-3)
    return "linear", max(lo - pad, 0.0), hi + pad


def plot_records(records: Iterable[Record], path: str | Path, title: str | None = None) -> Path:
    """Isometry gap along depth, before and after every site (Joudaki et al. 2023, Fig. C.5).

    Sites in forward order (a module's k-th call in a forward is its own site, ``site@k``), two
    x positions each, input (``pre``) and output (``post``); x ticks name the layer index (the
    first integer of the site name). Inside a norm site the line is red on a red band (shaded:
    the norm, input → output), inside an activation blue, inside a named module (kind ``"module"``) green; a dotted grey line joins one site's
    output to the next site's input of the same view (the layers between sites: attention, linear maps). Crosses
    mark a norm's ``normalized`` point (before its affine part) where it is in the curve's view (a
    BatchNorm's is in the feature view, off the sample-view curve: not drawn); triangles at the top a singular
    Gram (gap ``+inf``). y: mean gap ``−log I`` over items and steps (log scale when it spans
    more than a factor 20). Sized for one column (3.5 in wide, 300 dpi), legend under the axes.
    Drawn on a bare matplotlib ``Figure``: pyplot and the user's backend are left alone.
    """
    from matplotlib.figure import Figure

    rows = {(r["site"], r["call"], r["point"]): r for r in summarize(records)}
    units = list(dict.fromkeys((site, call) for site, call, _ in rows))
    if not units:
        raise ValueError("no records to plot")
    fig = Figure(figsize=(3.5, 3.1), layout="constrained")
    ax = fig.add_subplot()
    _draw_sites(ax, rows, units)
    _label_axes(fig, ax, rows, units, title)
    path = Path(path)
    fig.savefig(path, dpi=300)
    return path


_Rows = dict[tuple[str, int, str], dict[str, Any]]


def _row_gap(row: dict[str, Any] | None) -> float | None:
    """The mean gap a summary row plots: ``+inf`` where every Gram was singular."""
    if row is None:
        return None
    return math.inf if row["gap_mean"] is None and row["singular"] else row["gap_mean"]


def _row_spread(row: dict[str, Any] | None) -> float:
    return math.nan if row is None or row["gap_std"] is None else row["gap_std"]


def _depth_y_range(rows: _Rows, units: list[tuple[str, int]]) -> tuple[str, float, float]:
    """:func:`_y_range` of the plotted means and of their ± 1 std bands."""
    values = [g for u in units for p in POINTS if (g := _row_gap(rows.get((*u, p)))) is not None]
    for u in units:
        for p in ("pre", "post"):
            g, s = _row_gap(rows.get((*u, p))), _row_spread(rows.get((*u, p)))
            if g is not None and math.isfinite(s):
                values += [v for v in (g - s, g + s) if v > 0]
    return _y_range(values)


def _draw_sites(ax: Any, rows: _Rows, units: list[tuple[str, int]]) -> None:
    """The curve of :func:`plot_records`: segments, bands, markers, and the y axis."""

    def gap(unit: tuple[str, int], point: str) -> float | None:
        return _row_gap(rows.get((*unit, point)))

    scale, bottom, top = _depth_y_range(rows, units)

    def y(g: float | None) -> float:
        return math.nan if g is None else top if math.isinf(g) else max(g, bottom)

    labelled: set[str] = set()

    def draw(xs: list[float], ys: list[float], label: str, **style: Any) -> None:
        ax.plot(xs, ys, label=None if label in labelled else label, **style)
        labelled.add(label)

    for i, unit in enumerate(units):
        is_norm = rows[(*unit, "pre")]["kind"] == "norm"
        pre, post = gap(unit, "pre"), gap(unit, "post")
        if is_norm:
            ax.axvspan(2 * i - 0.2, 2 * i + 1.2, color="C3", alpha=0.15, lw=0)
        kind = rows[(*unit, "pre")]["kind"]
        color = {"norm": "C3", "activation": "C0"}.get(kind, "C2")
        std = [_row_spread(rows.get((*unit, p))) for p in ("pre", "post")]
        _band(ax, 2 * i, [y(pre), y(post)], std, (bottom, top), color)
        draw(
            [2 * i, 2 * i + 1],
            [y(pre), y(post)],
            f"{kind}: input → output",
            color=color,
            marker="o",
            ms=2,
            lw=1.2,
        )
        inner = rows.get((*unit, "normalized"))
        if is_norm and gap(unit, "normalized") is not None and inner["view"] == rows[(*unit, "pre")]["view"]:
            draw(
                [2 * i + 0.5],
                [y(gap(unit, "normalized"))],
                "norm, before its affine part",
                color="C3",
                marker="x",
                ms=3,
                ls="none",
            )
        # a site whose Gram is over other items (a pooler's sample view after token sites) is not joined
        if i + 1 < len(units) and rows[(*units[i + 1], "pre")]["view"] == rows[(*unit, "pre")]["view"]:
            draw(
                [2 * i + 1, 2 * i + 2],
                [y(post), y(gap(units[i + 1], "pre"))],
                "between sites",
                color="0.55",
                ls=":",
                lw=0.8,
            )
        singular = [2 * i + j for j, g in enumerate((pre, post)) if g is not None and math.isinf(g)]
        if singular:
            draw(singular, [top] * len(singular), "singular Gram (gap = ∞)", color="k", marker="^", ms=3, ls="none")
    ax.set_yscale(scale)
    ax.set_ylim(bottom, top)


def _band(ax: Any, x: int, mean: list[float], std: list[float], limits: tuple[float, float], color: str) -> None:
    """The ± 1 std band of a site from its input (at ``x``) to its output (``x + 1``), inside the axis limits."""
    if all(math.isfinite(v) for v in mean + std):
        low = [max(m - s, limits[0]) for m, s in zip(mean, std)]
        high = [min(m + s, limits[1]) for m, s in zip(mean, std)]
        ax.fill_between([x, x + 1], low, high, color=color, alpha=0.2, lw=0)


def _label_axes(fig: Any, ax: Any, rows: _Rows, units: list[tuple[str, int]], title: str | None) -> None:
    """Ticks by layer index, axis labels, a title of at most two lines, the legend under the axes."""
    from matplotlib.patches import Patch

    ax.set_xlim(-0.6, 2 * len(units) - 0.4)
    ticks, labels = _layer_ticks(units)
    ax.set_xticks(ticks, labels, fontsize=6)
    for label in ax.get_xticklabels():  # long site names (embeddings) upright, beside the numbers
        if len(label.get_text()) > 4:
            label.set_rotation(90)
    ax.tick_params(axis="y", labelsize=6)
    ax.set_xlabel(f"{_index_label([site for site, _ in units])} (sites in forward order)", fontsize=7)
    ax.set_ylabel("isometry gap  −log I", fontsize=7)
    title = textwrap.shorten(title or "isometry gap along depth", 104, placeholder="…")
    ax.set_title(textwrap.fill(title, 52), fontsize=7.5)  # at most two lines over the axes
    handles, names = ax.get_legend_handles_labels()
    if any(row["gap_std"] for row in rows.values()):
        handles.append(Patch(color="0.5", alpha=0.2, lw=0))
        names.append("± 1 std over items and steps")
    if any(rows[(*u, "pre")]["kind"] == "norm" for u in units):
        handles.append(Patch(color="C3", alpha=0.15, lw=0))
        names.append("norm layer (shaded band)")
    fig.legend(handles, names, loc="outside lower center", ncol=2, fontsize=6, frameon=False)


# ---------------------------------------------------------------- the gap against training step


def step_curves(records: Iterable[Record], mode: str | None = "train") -> dict[tuple[str, int, str], dict[int, float]]:
    """``{(site, call, point): {step: mean gap}}`` over the finite gaps of each step's records
    (items, windows), in forward order; only records of ``mode`` (``"train"``, ``"eval"``; ``None``:
    all; records without a mode, from older files, always count). A step whose Grams are all
    singular has no value."""
    sums: dict[tuple[str, int, str], dict[int, list[float]]] = {}
    for r in records:
        if mode is not None and r.mode not in (None, mode):
            continue
        steps = sums.setdefault((r.site, r.call, r.point), {})
        if r.isometry_gap is not None and math.isfinite(r.isometry_gap):
            acc = steps.setdefault(r.step, [0.0, 0])
            acc[0] += r.isometry_gap
            acc[1] += 1
    return {key: {s: total / k for s, (total, k) in sorted(steps.items())} for key, steps in sums.items()}


def plot_steps(
    records: Iterable[Record], path: str | Path, title: str | None = None, mode: str | None = "train"
) -> Path:
    """Isometry gap against training step (``Record.step``), one axis per point (``pre``, a
    norm's ``normalized``, ``post``), one line per site coloured by its depth (dark: first site,
    yellow: last; the colour bar names them). y: mean gap ``−log I`` over the step's items,
    shared by the axes (log scale when it spans more than a factor 20). ``mode``: the forwards
    drawn (:func:`step_curves`). Drawn on a bare matplotlib ``Figure``, 300 dpi."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    curves = step_curves(records, mode)
    units = list(dict.fromkeys((site, call) for site, call, _ in curves))
    points = [p for p in ("pre", "normalized", "post") if any(key[2] == p for key in curves)]
    values = [g for c in curves.values() for g in c.values()]
    if not values:
        raise ValueError(f"no finite gap to plot{f' in {mode}-mode forwards' if mode else ''}")
    fig = Figure(figsize=(2.3 * len(points) + 0.9, 2.6), layout="constrained")
    axes = fig.subplots(1, len(points), sharey=True, squeeze=False)[0]
    scale, bottom, top = _y_range(values)
    cmap, norm = colormaps["viridis"], Normalize(0, max(len(units) - 1, 1))
    for ax, point in zip(axes, points):
        for i, unit in enumerate(units):
            curve = curves.get((*unit, point))
            if curve:
                ax.plot(list(curve), list(curve.values()), color=cmap(norm(i)), lw=1, marker="o", ms=1.5)
        ax.set_title(point if point != "normalized" else "normalized (norms)", fontsize=7)
        ax.set_xlabel("training step", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.set_yscale(scale)
        ax.set_ylim(bottom, top)
    axes[0].set_ylabel("isometry gap  −log I", fontsize=7)
    bar = fig.colorbar(ScalarMappable(norm, cmap), ax=list(axes), pad=0.01, aspect=30)
    names = [site_label(site, call) for site, call in units]
    ticks = sorted({round(k * (len(units) - 1) / 5) for k in range(6)}) if len(units) > 6 else range(len(units))
    bar.set_ticks(list(ticks), labels=[textwrap.shorten(names[t], 28, placeholder="…") for t in ticks], fontsize=5)
    bar.set_label("site, in forward order", fontsize=6)
    fig.suptitle(textwrap.shorten(title or "isometry gap against training step", 90, placeholder="…"), fontsize=7.5)
    path = Path(path)
    fig.savefig(path, dpi=300)
    return path
