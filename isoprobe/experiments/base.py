"""The reproduction framework: registry, run context, resumable tidy CSV, JSON verdict, plots.

A *reproduction* re-runs one figure or table of a paper and decides, by a rule stated in
advance, whether the paper's claim held. ``isoprobe repro NAME`` runs it and writes, in the
output directory::

    NAME.csv    tidy data, one row per run × layer × series (written as it goes)
    NAME.png    the figure
    NAME.json   {name, paper, figure, claim, measured, theory, held, rule, config, elapsed_s, notes}

How to add a reproduction
-------------------------
Write a module ``isoprobe/experiments/<paper>.py`` and import it in
``isoprobe/experiments/__init__.py`` (registration happens at import). In it::

    from isoprobe.experiments.base import Outcome, RunContext, reproduction

    def _config(ctx: RunContext) -> dict:
        # every size the run uses, resolved for --quick; the JSON records it and a rerun with
        # --out on the same directory skips the reproduction if it matches
        return {"depth": 10 if ctx.quick else 30, "runs": ctx.n_runs(default=10, quick=3)}

    @reproduction("fig1", paper="Meterez et al. 2024", figure="Fig. 1",
                  claim="the isometry gap decays exponentially in depth", config=_config)
    def fig1(ctx: RunContext, cfg: dict) -> Outcome:
        table = ctx.table(["width", "run", "layer", "gap"])
        for width in ctx.progress([50, 100], desc="widths"):
            # a *unit* is computed once: on a resumed run its rows come back from the CSV
            rows = table.unit(f"width={width}", lambda: [dict(width=width, run=r, layer=l, gap=g) ...])
        fig, ax = new_figure(1)
        plot_depth_curves(ax[0], values, label="d = 50", bound=..., bound_label="Theorem 1")
        ctx.save_figure(fig)
        return Outcome(measured={...}, theory={...}, held=bool(...), rule="what was compared, how")

``ctx`` gives ``quick``, ``runs`` (the user's ``--runs`` or ``None``; use ``ctx.n_runs``),
``seed``, ``device``, ``out_dir``, ``data`` (``--data``: ``"auto"`` or a
:mod:`isoprobe.data` name; use :meth:`RunContext.images`), ``progress`` (a tqdm bar to stderr)
and ``note`` (a line for the console and the JSON's ``notes``).

Rules for an honest verdict: decide ``held`` from the measured numbers by the rule you state
in ``rule``; never drop a collapsed representation (``gap = +inf``): count it
(:func:`gap_curves`, :func:`plot_depth_curves` draw them at the top of the plot). Keep
``--quick`` small enough that every reproduction takes seconds and still decides its claim.

Resume: units finished before an interruption are read back from ``NAME.csv`` (their list is
kept in ``NAME.units.json`` until the reproduction completes); a reproduction whose JSON,
CSV and PNG exist with the same config is skipped. Other files needed only to resume (a
training checkpoint) are named by :meth:`RunContext.scratch_path` and removed once the JSON is
written.
"""

from __future__ import annotations

import csv
import json
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from isoprobe.data import DataUnavailable, ImageBatch, load_images
from isoprobe.metrics import isometry_gap

__all__ = [
    "Outcome",
    "REGISTRY",
    "Reproduction",
    "ReproductionOptionError",
    "RunContext",
    "TidyTable",
    "UnknownReproduction",
    "gap_curves",
    "make_context",
    "mean_curve",
    "new_figure",
    "plot_depth_curves",
    "register",
    "reproduction",
    "resolve_names",
    "run_curves",
    "run_reproductions",
]

# --- records ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What a run function returns: the verdict and the numbers behind it (JSON-able values)."""

    measured: dict
    theory: dict
    held: bool
    rule: str


@dataclass(frozen=True)
class Reproduction:
    """One registered reproduction: ``run(ctx, config(ctx)) -> Outcome``."""

    name: str
    paper: str
    figure: str
    claim: str
    config: Callable[["RunContext"], dict]
    run: Callable[["RunContext", dict], Outcome]


REGISTRY: dict[str, Reproduction] = {}


class ReproductionOptionError(ValueError):
    """Bad options for :func:`run_reproductions` (raised before anything runs)."""


class UnknownReproduction(ReproductionOptionError):
    """An unknown reproduction name; the message lists the valid ones."""


def register(rep: Reproduction) -> Reproduction:
    """Add ``rep`` to the registry (a name may be registered once)."""
    if rep.name in REGISTRY or rep.name == "all":
        raise ValueError(f"reproduction name {rep.name!r} is taken")
    REGISTRY[rep.name] = rep
    return rep


def reproduction(
    name: str, *, paper: str, figure: str, claim: str, config: Callable[["RunContext"], dict]
) -> Callable[[Callable[["RunContext", dict], Outcome]], Callable[["RunContext", dict], Outcome]]:
    """Decorator form of :func:`register` for a run function."""

    def deco(run: Callable[["RunContext", dict], Outcome]) -> Callable[["RunContext", dict], Outcome]:
        register(Reproduction(name, paper, figure, claim, config, run))
        return run

    return deco


# --- resumable tidy CSV -----------------------------------------------------------------------


def _parse(value: str) -> Any:
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


class TidyTable:
    """``NAME.csv`` written unit by unit; finished units survive an interruption.

    A unit is a group of rows computed together (e.g. one series, all runs). Its rows are
    appended and flushed, then its key is recorded in ``NAME.units.json`` with the config;
    on reopening with the same config the finished units' rows are kept and the rest dropped.
    """

    def __init__(self, csv_path: Path, columns: Sequence[str], config: dict) -> None:
        self.csv_path = Path(csv_path)
        self.units_path = self.csv_path.with_suffix(".units.json")
        self.columns = list(columns)
        self.config = config
        self._rows: dict[str, list[dict]] = {}
        self.resumed: list[str] = []
        self._load()

    def _load(self) -> None:
        done: list[list] = []
        if self.units_path.exists() and self.csv_path.exists():
            try:
                state = json.loads(self.units_path.read_text())
            except json.JSONDecodeError:
                state = {}
            if state.get("config") == _jsonable(self.config) and state.get("columns") == self.columns:
                done = state.get("done", [])
        rows: list[dict] = []
        if done:
            with self.csv_path.open(newline="") as f:
                reader = csv.DictReader(f)
                rows = [{k: _parse(v) for k, v in r.items()} for r in reader if None not in r.values()]
        start = 0
        for key, count in done:
            if start + count > len(rows):
                break
            self._rows[key] = rows[start : start + count]
            self.resumed.append(key)
            start += count
        self._write_all()

    def _write_all(self) -> None:
        self.csv_path.parent.mkdir(parents=True, exist_ok=True)
        with self.csv_path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.columns)
            w.writeheader()
            for rows in self._rows.values():
                w.writerows(rows)
        self._write_state()

    def _write_state(self) -> None:
        state = {
            "config": _jsonable(self.config),
            "columns": self.columns,
            "done": [[k, len(v)] for k, v in self._rows.items()],
        }
        self.units_path.write_text(json.dumps(state))

    def done(self, key: str) -> bool:
        return key in self._rows

    def unit(self, key: str, compute: Callable[[], list[dict]]) -> list[dict]:
        """The rows of unit ``key``: read back if finished before, else ``compute()``d and appended."""
        if key in self._rows:
            return self._rows[key]
        rows = compute()
        for r in rows:
            if set(r) != set(self.columns):
                raise ValueError(f"row keys {sorted(r)} differ from the table's columns {self.columns}")
        with self.csv_path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.columns).writerows(rows)
            f.flush()
        self._rows[key] = rows
        self._write_state()
        return rows

    def rows(self) -> list[dict]:
        return [r for rows in self._rows.values() for r in rows]

    def finish(self) -> None:
        self.units_path.unlink(missing_ok=True)


# --- the run context --------------------------------------------------------------------------


@dataclass
class RunContext:
    """What a run function gets: options, output paths, progress, data, notes."""

    name: str
    quick: bool = False
    runs: int | None = None
    seed: int = 0
    device: str = "cpu"
    out_dir: Path = Path("results")
    data: str = "auto"
    show_progress: bool = True
    echo: Callable[[str], None] = field(default=lambda msg: print(msg, file=sys.stderr))
    notes: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    _table: TidyTable | None = None
    _scratch: list[Path] = field(default_factory=list)

    def n_runs(self, default: int, quick: int) -> int:
        """``--runs`` if given, else ``quick`` under ``--quick``, else the paper's ``default``."""
        return self.runs if self.runs is not None else (quick if self.quick else default)

    def path(self, suffix: str) -> Path:
        return Path(self.out_dir) / f"{self.name}{suffix}"

    def scratch_path(self, suffix: str) -> Path:
        """``NAME<suffix>``, a file needed only to resume an interrupted run (e.g. a training
        checkpoint): it is kept while the reproduction runs and removed once its JSON is written."""
        path = self.path(suffix)
        if path not in self._scratch:
            self._scratch.append(path)
        return path

    def finish(self) -> None:
        """After the JSON is written: drop the resume state (units list, scratch files)."""
        if self._table is not None:
            self._table.finish()
        for path in self._scratch:
            path.unlink(missing_ok=True)

    def table(self, columns: Sequence[str]) -> TidyTable:
        """The reproduction's tidy CSV (``NAME.csv``), resumed where a previous run stopped."""
        if self._table is None:
            self._table = TidyTable(self.path(".csv"), columns, self.config)
            if self._table.resumed:
                self.note(f"resumed {len(self._table.resumed)} finished unit(s) from {self.path('.csv')}")
        return self._table

    def progress(self, iterable: Iterable, desc: str = "", total: int | None = None) -> Iterable:
        """A tqdm progress bar on stderr (silent when progress is off)."""
        from tqdm.auto import tqdm

        return tqdm(
            iterable, desc=f"{self.name} {desc}".strip(), total=total, file=sys.stderr,
            disable=not self.show_progress, leave=False, dynamic_ncols=True,
        )

    def note(self, msg: str) -> None:
        """A line for the console and the JSON's ``notes``."""
        self.notes.append(msg)
        self.echo(f"{self.name}: {msg}")

    def images(self, preferred: str, limit: int) -> ImageBatch:
        """Images for an experiment whose paper used ``preferred`` (e.g. ``"cifar10"``).

        ``--data auto`` tries ``preferred`` and falls back to the built-in synthetic set,
        saying so; ``--data NAME`` uses exactly that set (``DataUnavailable`` if it cannot).
        """
        name = preferred if self.data == "auto" else self.data
        try:
            batch = load_images(name, limit=limit, seed=self.seed)
        except DataUnavailable as exc:
            if self.data != "auto":
                raise
            self.note(f"{preferred} unavailable ({exc}); falling back to the synthetic image set")
            batch = load_images("synthetic", limit=limit, seed=self.seed)
        self.note(f"data: {batch.description}")
        return batch

    def save_figure(self, fig) -> Path:
        """Write ``NAME.png``."""
        path = self.path(".png")
        fig.savefig(path, dpi=120, bbox_inches="tight")
        return path


# --- numbers ----------------------------------------------------------------------------------


def gap_curves(grams: torch.Tensor) -> tuple[np.ndarray, int]:
    """Isometry gaps of a stack of Grams, with non-finite Grams counted as collapsed.

    A Gram with non-finite entries (the representation overflowed, e.g. ``exp`` without
    normalisation) has no finite isometry; it is reported as ``+inf`` (collapsed), never NaN,
    and the number of such Grams is returned alongside.
    """
    gaps = isometry_gap(grams).cpu().numpy()
    overflow = int(np.isnan(gaps).sum())
    return np.where(np.isnan(gaps), np.inf, gaps), overflow


def mean_curve(values: np.ndarray) -> np.ndarray:
    """Mean over runs (axis 0) per layer; ``+inf`` where any run collapsed (never NaN)."""
    values = np.asarray(values, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        m = values.mean(axis=0)
    return np.where(np.isinf(values).any(axis=0), np.inf, m)


def run_curves(rows: Sequence[dict], value: str = "gap", index: str = "layer", length: int | None = None,
               **match: Any) -> np.ndarray:
    """``(runs, length)`` array of column ``value`` of the tidy ``rows`` that match ``match``.

    Row ``r`` goes to line ``r["run"]`` (runs sorted; a deterministic curve, ``run = ""``,
    comes last) and column ``int(r[index])``; ``length`` defaults to the largest index + 1.
    Missing entries are NaN. ``KeyError`` if no row matches.
    """
    sel = [r for r in rows if all(r[k] == v for k, v in match.items())]
    if not sel:
        raise KeyError(f"no rows match {match}")
    runs = sorted({r["run"] for r in sel}, key=lambda v: (isinstance(v, str), v))
    line = {run: i for i, run in enumerate(runs)}
    if length is None:
        length = max(int(r[index]) for r in sel) + 1
    out = np.full((len(runs), length), np.nan)
    for r in sel:
        out[line[r["run"]], int(r[index])] = float(r[value])
    return out


def _jsonable(obj: Any) -> Any:
    """Plain JSON values: numpy scalars/arrays to Python, ``±inf``/NaN to strings."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        x = float(obj)
        return x if math.isfinite(x) else ("nan" if math.isnan(x) else ("inf" if x > 0 else "-inf"))
    return obj


# --- plots ------------------------------------------------------------------------------------


def new_figure(panels: int, ncols: int | None = None, size: tuple[float, float] = (4.2, 3.4)):
    """``(fig, axes)`` with ``panels`` axes in a grid (``axes`` a flat list).

    A bare ``matplotlib.figure.Figure``: no pyplot state, no backend switch, nothing to close.
    """
    from matplotlib.figure import Figure

    ncols = ncols or min(panels, 4)
    nrows = math.ceil(panels / ncols)
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    flat = list(axes.ravel())
    for ax in flat[panels:]:
        ax.set_visible(False)
    return fig, flat[:panels]


def plot_depth_curves(
    ax,
    values: np.ndarray,
    label: str,
    color: str | None = None,
    bound: np.ndarray | None = None,
    bound_label: str | None = None,
    layers: np.ndarray | None = None,
    ylabel: str = r"isometry gap  $-\log I(G_\ell)$",
    log: bool = True,
) -> int:
    """Mean over runs (solid) with the min–max spread (shaded) of ``values`` (runs × layers).

    ``bound`` is drawn dashed in the same colour. Collapsed values (``+inf``) are never
    dropped: each layer that has some is marked at the top edge of the axes with a triangle,
    the legend entry says how many there are, and the mean line stops there. Returns the
    number of collapsed values. ``log``: a log y axis, once the axes hold a positive finite
    value (while every value so far has collapsed there is nothing to log-scale, and the
    axis stays linear).
    """
    values = np.atleast_2d(np.asarray(values, dtype=np.float64))
    x = np.arange(values.shape[1]) if layers is None else np.asarray(layers)
    inf = np.isinf(values)
    n_inf = int(inf.sum())
    finite = np.where(inf, np.nan, values)
    mean = mean_curve(values)
    with warnings.catch_warnings():  # all-inf layers give all-NaN slices: no line there
        warnings.simplefilter("ignore", RuntimeWarning)
        lo, hi = np.nanmin(finite, axis=0), np.nanmax(finite, axis=0)
    text = label + (f"  [{n_inf} collapsed (+inf), at top]" if n_inf else "")
    (line,) = ax.plot(x, np.where(np.isinf(mean), np.nan, mean), "-", color=color, label=text, lw=1.6)
    color = line.get_color()
    ax.fill_between(x, lo, hi, color=color, alpha=0.18, lw=0)
    if n_inf:
        cols = inf.any(axis=0)
        ax.plot(x[cols], np.full(cols.sum(), 0.97), "^", color=color, ms=6, clip_on=False,
                transform=ax.get_xaxis_transform())
    if bound is not None:
        ax.plot(x[: len(bound)], bound, "--", color=color, lw=1.2, label=bound_label)
    if log and ax.dataLim.y1 > 0 and np.isfinite(ax.dataLim.y1):
        ax.set_yscale("log")
    ax.set_xlabel(r"layer $\ell$")
    ax.set_ylabel(ylabel)
    return n_inf


# --- running ----------------------------------------------------------------------------------


def resolve_names(names: Sequence[str]) -> list[str]:
    """Registry names for ``names`` (``"all"`` expands); unknown names raise, listing the valid ones."""
    if not names:
        raise UnknownReproduction(f"name a reproduction (or all); valid names: {', '.join(REGISTRY)}")
    out: list[str] = []
    for n in names:
        expanded = list(REGISTRY) if n == "all" else [n]
        for m in expanded:
            if m not in REGISTRY:
                raise UnknownReproduction(f"unknown reproduction {m!r}; valid names: all, {', '.join(REGISTRY)}")
            if m not in out:
                out.append(m)
    return out


def _up_to_date(ctx: RunContext) -> bool:
    paths = [ctx.path(s) for s in (".json", ".csv", ".png")]
    if not all(p.exists() for p in paths):
        return False
    try:
        return json.loads(paths[0].read_text()).get("config") == _jsonable(ctx.config)
    except json.JSONDecodeError:
        return False


def make_context(name: str, **options: Any) -> RunContext:
    """The :class:`RunContext` of reproduction ``name`` for ``options`` (RunContext fields), config resolved.

    ``ctx.config`` is ``{quick, seed, device, data}`` plus the reproduction's own sizes: what the
    JSON records and what resuming compares.
    """
    rep = REGISTRY[resolve_names([name])[0]]
    ctx = RunContext(name=rep.name, **options)
    ctx.config = {"quick": ctx.quick, "seed": ctx.seed, "device": ctx.device, "data": ctx.data, **rep.config(ctx)}
    return ctx


def run_reproductions(
    names: Sequence[str],
    *,
    quick: bool = False,
    runs: int | None = None,
    seed: int = 0,
    device: str = "cpu",
    out_dir: str | Path = "results",
    data: str = "auto",
    show_progress: bool = True,
    echo: Callable[[str], None] = print,
) -> list[dict]:
    """Run the named reproductions in order; returns their JSON summaries.

    Skips a reproduction whose outputs exist with the same config; resumes a partial one.
    """
    selected = resolve_names(names)
    if runs is not None and (isinstance(runs, bool) or not isinstance(runs, int) or runs < 1):
        raise ReproductionOptionError(f"--runs must be a positive integer, got {runs!r}")
    if device not in ("cpu", "cuda"):
        raise ReproductionOptionError(f"device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ReproductionOptionError("--device cuda: no CUDA device is available here (use --device cpu)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summaries = []
    for name in selected:
        rep = REGISTRY[name]
        ctx = make_context(name, quick=quick, runs=runs, seed=seed, device=device, out_dir=out_dir, data=data,
                           show_progress=show_progress, echo=echo)
        if _up_to_date(ctx):
            summary = json.loads(ctx.path(".json").read_text())
            echo(f"{name}: up to date in {out_dir} (held: {summary.get('held')}); skipped")
            summaries.append(summary)
            continue
        t0 = time.perf_counter()
        outcome = rep.run(ctx, ctx.config)
        summary = _jsonable(
            {
                "name": name,
                "paper": rep.paper,
                "figure": rep.figure,
                "claim": rep.claim,
                "measured": outcome.measured,
                "theory": outcome.theory,
                "held": bool(outcome.held),
                "rule": outcome.rule,
                "config": ctx.config,
                "elapsed_s": round(time.perf_counter() - t0, 3),
                "notes": ctx.notes,
            }
        )
        ctx.path(".json").write_text(json.dumps(summary, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
        ctx.finish()
        verdict = "held" if outcome.held else "did NOT hold"
        echo(f"{name}: claim {verdict} ({summary['elapsed_s']:.1f} s) -> {ctx.path('.json')}")
        summaries.append(summary)
    return summaries
