"""The reproduction framework: a reproduction is a declaration; the runner does the rest.

A *reproduction* re-runs one figure or table of a paper and decides, by a rule stated in
advance, whether the paper's claim held. ``isoprobe repro NAME`` runs it and writes, in the
output directory, under ``STEM = NAME`` (``NAME.paper`` with ``--protocol paper``)::

    STEM.csv    tidy data: the rows of every unit (written unit by unit, so a run resumes)
    STEM.png    the figure, drawn from the rows alone
    STEM.json   {name, paper, figure, claim, verdict, held, rule, measured, theory, reason,
                 notes, config, data (when the reproduction reads images), elapsed_s}

How to add a reproduction
-------------------------
Write a module ``isoprobe/experiments/<paper>.py`` (it imports this module and
:mod:`isoprobe.experiments.common`, never another paper module) and import it in
``isoprobe/experiments/__init__.py``. In it, declare::

    def config(opt: Options) -> dict:          # every size resolved, JSON-able
        return {"widths": [8, 16] if opt.quick else [25, 50], "runs": opt.n_runs(10, 3)}

    def units(cfg: dict, env: Env) -> list[Unit]:   # pure, resumable pieces: (key, () -> rows)
        return [(f"width={w}", partial(_rows, cfg, w)) for w in cfg["widths"]]

    def verdict(rows: list[dict], cfg: dict) -> Verdict:   # a pure function of the rows
        ...
        return Verdict("held" if ok else "not held", rule="what was compared, thresholds",
                       measured={...}, theory={...}, reason="the numbers that decided it")

    def draw(rows: list[dict], cfg: dict) -> Figure:       # drawn from the rows alone
        ...

    register(Reproduction("meterez-fig1", paper=..., figure="Fig. 1", claim="as the paper states it",
                          columns=("width", "run", "layer", "gap"), config=config, units=units,
                          verdict=verdict, draw=draw))

The runner (:func:`run_reproductions`) validates the options before any work, resolves the
data (``uses_data``), computes the units not yet in ``STEM.csv`` (rows are read back from the
CSV on a resumed run, so verdict and figure always see the same row values), decides, draws,
writes the JSON and removes the resume state. Under ``torchrun`` (world size > 1) it deals the
units round-robin to the ranks, gathers their rows on rank 0, and rank 0 alone writes files.

Rules for an honest verdict: ``held`` / ``not held`` only by the stated rule on the quantity
the paper plots; ``undecided`` (with ``reason``) when the run cannot decide, e.g. a claim about
a named data set run on substitute data (``cfg["data"]["substitute"]``). A collapsed
representation (``gap = +inf``) is counted, never dropped.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from isoprobe import distributed
from isoprobe.data import IMAGE_SOURCES, DataUnavailable, ImageBatch, is_image_source, load_images

__all__ = [
    "Env",
    "Options",
    "PROTOCOLS",
    "REGISTRY",
    "Reproduction",
    "ReproductionOptionError",
    "TidyTable",
    "Unit",
    "UnknownReproduction",
    "VERDICTS",
    "Verdict",
    "canonical_name",
    "check_options",
    "register",
    "resolve_names",
    "run_reproductions",
    "select",
    "stem",
    "summarize",
]

VERDICTS = ("held", "not held", "undecided")
PROTOCOLS = ("isoprobe", "paper")

# --- declarations -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """The decision of a reproduction: ``verdict`` by ``rule`` on the ``measured`` numbers.

    ``reason`` is required for every verdict: for ``"held"`` the numbers that decided it, for
    ``"not held"`` what failed (and the mechanism where it is known), for ``"undecided"`` why the
    run cannot decide. ``held`` mirrors ``verdict``.
    """

    verdict: str
    rule: str
    measured: dict
    theory: dict = field(default_factory=dict)
    reason: str = ""
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {', '.join(map(repr, VERDICTS))}, got {self.verdict!r}")
        if not self.rule:
            raise ValueError("a verdict states its rule")
        if not self.reason:
            raise ValueError(f"a {self.verdict!r} verdict needs its reason (held: the numbers that decided it)")
        object.__setattr__(self, "notes", tuple(self.notes))

    @property
    def held(self) -> bool | None:
        """``True`` / ``False`` / ``None`` for held / not held / undecided."""
        return {"held": True, "not held": False, "undecided": None}[self.verdict]


@dataclass(frozen=True)
class Options:
    """What the user asked on the command line (checked by :func:`check_options`)."""

    quick: bool = False
    runs: int | None = None
    seed: int = 0
    device: str = "cpu"
    data: str = "auto"
    protocol: str = "isoprobe"
    model: str | None = None
    text_file: str | None = None

    def n_runs(self, default: int, quick: int) -> int:
        """``--runs`` if given, else ``quick`` under ``--quick``, else the paper's ``default``."""
        return self.runs if self.runs is not None else (quick if self.quick else default)


#: a resumable piece of a reproduction: a stable key and a pure computation of its rows
Unit = tuple[str, Callable[[], list[dict]]]


@dataclass(frozen=True)
class Reproduction:
    """One reproduction, declared: sizes, units of computation, verdict and figure of the rows.

    ``uses_data``: the config declares the images it reads as ``"data": {"paper": NAME or
    [NAMES], "fallback": NAME or [NAMES], "limit": N or None}`` (:func:`data_request`); the
    runner loads them and replaces the entry by what was used (:func:`resolve_data`).
    ``reads``: the options beyond the common ones that it reads (``"model"``, ``"text_file"``);
    giving one that no selected reproduction reads is an error.
    ``columns`` may also be a function of the resolved config (a protocol that adds columns).
    ``check(options)``: raises :class:`ReproductionOptionError` when the reproduction cannot run
    with these options (e.g. no pretrained weights offline); :func:`select` calls it before any
    work: a reproduction named explicitly then fails fast, one selected by ``all`` is left out.
    """

    name: str
    paper: str
    figure: str
    claim: str
    columns: tuple[str, ...]
    config: Callable[[Options], dict]
    units: Callable[[dict, Env], Iterable[Unit]]
    verdict: Callable[[list[dict], dict], Verdict]
    draw: Callable[[list[dict], dict], Any]
    uses_data: bool = False
    protocols: tuple[str, ...] = ("isoprobe",)
    reads: tuple[str, ...] = ()
    check: Callable[[Options], None] | None = None


REGISTRY: dict[str, Reproduction] = {}


class ReproductionOptionError(ValueError):
    """Bad options for :func:`run_reproductions` (raised before anything runs)."""


class UnknownReproduction(ReproductionOptionError):
    """An unknown reproduction name; the message lists the valid ones."""


def register(rep: Reproduction) -> Reproduction:
    """Add ``rep`` to the registry (a name may be registered once)."""
    if rep.name in REGISTRY or rep.name == "all":
        raise ValueError(f"reproduction name {rep.name!r} is taken")
    if not set(rep.protocols) <= set(PROTOCOLS):
        raise ValueError(f"{rep.name}: protocols must be among {PROTOCOLS}, got {rep.protocols}")
    REGISTRY[rep.name] = rep
    return rep


def stem(name: str, protocol: str = "isoprobe") -> str:
    """The file stem of reproduction ``name`` under ``protocol``: ``name`` or ``name.paper``."""
    return name if protocol == "isoprobe" else f"{name}.{protocol}"


# --- what units get from the runner --------------------------------------------------------------


class Env:
    """What units get from the runner: device, rank, the loaded images, progress, scratch, notes.

    Not pure data: never put it (or anything from it but numbers) into the config.
    ``images`` is the one loaded image set (``None`` when none or several were loaded);
    ``image_sets`` maps every loaded set's name to its images.
    """

    def __init__(
        self,
        stem: str,
        out_dir: Path,
        device: torch.device,
        rank: int = 0,
        world: int = 1,
        show_progress: bool = True,
        echo: Callable[[str], None] = print,
    ) -> None:
        self.stem, self.out_dir, self.device, self.rank, self.world = stem, Path(out_dir), device, rank, world
        self.images: ImageBatch | None = None
        self.image_sets: dict[str, ImageBatch] = {}
        self.notes: list[str] = []
        self._show, self.echo = show_progress and rank == 0, echo if rank == 0 else (lambda _m: None)
        self._scratch: list[Path] = []

    def progress(self, iterable: Iterable, desc: str = "", total: int | None = None) -> Iterable:
        """A tqdm progress bar on stderr (silent when progress is off, and on ranks > 0)."""
        from tqdm.auto import tqdm

        return tqdm(
            iterable,
            desc=f"{self.stem} {desc}".strip(),
            total=total,
            file=sys.stderr,
            disable=not self._show,
            leave=False,
            dynamic_ncols=True,
        )

    def scratch_path(self, name: str) -> Path:
        """``OUT/STEM.name`` (``OUT/.rankR/STEM.name`` on rank ``R > 0``): a file needed only to
        resume an interrupted run (a checkpoint); removed once the JSON is written."""
        folder = self.out_dir if self.rank == 0 else self.out_dir / f".rank{self.rank}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{self.stem}.{name.lstrip('.')}"
        if path not in self._scratch:
            self._scratch.append(path)
        return path

    def note(self, line: str) -> None:
        """A line for the console and the JSON's ``notes``."""
        self.notes.append(line)
        self.echo(f"{self.stem}: {line}")

    def clean(self) -> None:
        for path in self._scratch:
            path.unlink(missing_ok=True)


# --- resumable tidy CSV -----------------------------------------------------------------------


def _parse(value: str) -> Any:
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def _read_rows(f: Iterable[str]) -> list[dict]:
    return [{k: _parse(v) for k, v in r.items()} for r in csv.DictReader(f) if None not in r.values()]


class TidyTable:
    """``STEM.csv`` written unit by unit; finished units survive an interruption.

    A unit is a group of rows computed together (e.g. one series, all runs). Its rows are
    appended and flushed, then its key is recorded in ``STEM.units.json`` with the config;
    on reopening with the same config the finished units' rows are kept and the rest dropped.
    The rows it hands back are always the CSV's values (parsed back), fresh or resumed; a unit
    already in the table cannot be added again. ``STEM.units.json`` also keeps the seconds spent
    by earlier sessions (``elapsed_before``): :meth:`elapsed` counts every session of the run,
    the current one from ``started`` (a ``time.perf_counter()`` value, default: now).
    """

    def __init__(self, csv_path: Path, columns: Sequence[str], config: dict, started: float | None = None) -> None:
        self.csv_path = Path(csv_path)
        self.units_path = self.csv_path.with_suffix(".units.json")
        self.columns = list(columns)
        self.config = config
        self._rows: dict[str, list[dict]] = {}
        self.resumed: list[str] = []
        self.elapsed_before = 0.0
        self._started = time.perf_counter() if started is None else started
        self._load()

    def elapsed(self) -> float:
        """Seconds spent on this table's run, over every session (earlier ones and this one)."""
        return self.elapsed_before + time.perf_counter() - self._started

    def _load(self) -> None:
        done: list[list] = []
        if self.units_path.exists() and self.csv_path.exists():
            try:
                state = json.loads(self.units_path.read_text())
            except json.JSONDecodeError:
                state = {}
            if state.get("config") == jsonable(self.config) and state.get("columns") == self.columns:
                done = state.get("done", [])
                self.elapsed_before = float(state.get("elapsed_s", 0.0))
        rows: list[dict] = []
        if done:
            with self.csv_path.open(newline="") as f:
                rows = _read_rows(f)
        start = 0
        for key, count in done:
            if start + count > len(rows) or key in self._rows:
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
            "config": jsonable(self.config),
            "columns": self.columns,
            "done": [[k, len(v)] for k, v in self._rows.items()],
            "elapsed_s": round(self.elapsed(), 3),
        }
        self.units_path.write_text(json.dumps(state))

    def save_elapsed(self) -> None:
        """Record the time spent so far (called when a run is interrupted, so a resumed run's
        ``elapsed_s`` counts this session too)."""
        self._write_state()

    def done(self, key: str) -> bool:
        return key in self._rows

    def add(self, key: str, rows: list[dict]) -> list[dict]:
        """Append the rows of unit ``key`` (keys must be the columns) and record it as finished;
        ``ValueError`` if ``key`` is finished already (its rows are never written twice)."""
        if key in self._rows:
            raise ValueError(f"unit {key!r} is already in {self.csv_path}: its rows are not written twice")
        for r in rows:
            if set(r) != set(self.columns):
                raise ValueError(f"unit {key!r}: row keys {sorted(r)} differ from the table's columns {self.columns}")
        buf = io.StringIO()
        csv.DictWriter(buf, fieldnames=self.columns).writerows(rows)
        with self.csv_path.open("a", newline="") as f:
            f.write(buf.getvalue())
            f.flush()
        buf.seek(0)
        self._rows[key] = _read_rows(io.StringIO(",".join(self.columns) + "\r\n" + buf.getvalue()))
        self._write_state()
        return self._rows[key]

    def unit(self, key: str, compute: Callable[[], list[dict]]) -> list[dict]:
        """The rows of unit ``key``: read back if finished before, else ``compute()``d and added."""
        return self._rows[key] if key in self._rows else self.add(key, compute())

    def rows(self, keys: Sequence[str] | None = None) -> list[dict]:
        """The rows of ``keys`` (default: every finished unit, in the order they were added)."""
        return [r for k in (self._rows if keys is None else keys) for r in self._rows[k]]

    def finish(self) -> None:
        self.units_path.unlink(missing_ok=True)


def jsonable(obj: Any) -> Any:
    """Plain JSON values: numpy scalars/arrays to Python, ``±inf``/NaN to strings."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        x = float(obj)
        return x if math.isfinite(x) else ("nan" if math.isnan(x) else ("inf" if x > 0 else "-inf"))
    return obj


# --- options and names ------------------------------------------------------------------------


def check_options(options: Options) -> None:
    """Raise :class:`ReproductionOptionError` for an option no reproduction can run with."""
    runs = options.runs
    if runs is not None and (isinstance(runs, bool) or not isinstance(runs, int) or runs < 1):
        raise ReproductionOptionError(f"--runs must be a positive integer, got {runs!r}")
    if options.device not in ("cpu", "cuda"):
        raise ReproductionOptionError(f"device must be cpu or cuda, got {options.device!r}")
    if options.device == "cuda" and not torch.cuda.is_available():
        raise ReproductionOptionError("--device cuda: no CUDA device is available here (use --device cpu)")
    if options.protocol not in PROTOCOLS:
        raise ReproductionOptionError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {options.protocol!r}")
    if options.data.endswith(".npz") and not Path(options.data).expanduser().is_file():
        raise ReproductionOptionError(f"--data {options.data}: no such file")
    if options.data != "auto" and not is_image_source(options.data):
        raise ReproductionOptionError(
            f"--data must be auto, one of {', '.join(IMAGE_SOURCES)}, or a path to a "
            f".npz file or an image folder; got {options.data!r}"
        )
    if options.text_file is not None and not Path(options.text_file).is_file():
        raise ReproductionOptionError(f"--text-file {options.text_file}: no such file")
    model = options.model
    if model is not None and model.startswith((".", "/", "~")) and not Path(model).expanduser().exists():
        raise ReproductionOptionError(f"--model {model}: no such directory")


def canonical_name(name: str) -> str:
    """The registry's spelling of ``name``, matched without regard to case (``FIG3`` → ``fig3``,
    ``figc5`` → ``figC5``, ``ALL`` → ``all``); ``name`` itself when nothing matches."""
    folded = {n.lower(): n for n in [*REGISTRY, "all"]}
    return folded.get(name.lower(), name)


def resolve_names(names: Sequence[str]) -> list[str]:
    """Registry names for ``names`` (any case; ``"all"`` expands); unknown names raise, listing the valid ones."""
    if not names:
        raise UnknownReproduction(f"name a reproduction (or all); valid names: {', '.join(REGISTRY)}")
    out: list[str] = []
    for n in map(canonical_name, names):
        expanded = list(REGISTRY) if n == "all" else [n]
        for m in expanded:
            if m not in REGISTRY:
                raise UnknownReproduction(f"unknown reproduction {m!r}; valid names: all, {', '.join(REGISTRY)}")
            if m not in out:
                out.append(m)
    return out


def select(names: Sequence[str], options: Options, echo: Callable[[str], None] = print) -> list[str]:
    """The reproductions to run for ``names`` under ``options``, checked before any work.

    A name given explicitly must support ``options.protocol``; ``all`` keeps those that do
    (and says which it left out). ``--model`` / ``--text-file`` must be read by one of them.
    """
    check_options(options)
    selected = resolve_names(names)
    explicit = {canonical_name(n) for n in names} - {"all"}
    p = options.protocol
    unsupported = [n for n in selected if p not in REGISTRY[n].protocols]
    supporting = ", ".join(n for n in REGISTRY if p in REGISTRY[n].protocols) or "none"
    if bad := [n for n in unsupported if n in explicit]:
        raise ReproductionOptionError(f"{', '.join(bad)}: no --protocol {p} (reproductions with it: {supporting})")
    if unsupported and len(unsupported) == len(selected):
        raise ReproductionOptionError(f"no reproduction here has --protocol {p} (reproductions with it: {supporting})")
    if unsupported:
        echo(
            f"--protocol {p}: running the {len(selected) - len(unsupported)} reproduction(s) that support it "
            f"({supporting}); leaving out {len(unsupported)}"
        )
        selected = [n for n in selected if n not in unsupported]
    for opt, flag in (("model", "--model"), ("text_file", "--text-file")):
        readers = [n for n in REGISTRY if opt in REGISTRY[n].reads]
        if getattr(options, opt) is not None and not any(n in readers for n in selected):
            raise ReproductionOptionError(
                f"{flag}: none of the named reproductions reads it"
                + (f" (only {', '.join(readers)} does)" if readers else "")
            )
    return _checked(selected, explicit, options, echo)


def _checked(selected: list[str], explicit: set[str], options: Options, echo: Callable[[str], None]) -> list[str]:
    """``selected`` less those whose ``check`` refuses the options; raises instead for a name given
    explicitly, or one that reads an option the user gave (``--model`` for figC5)."""
    kept = []
    for n in selected:
        rep = REGISTRY[n]
        check = getattr(rep, "check", None)
        try:
            if check is not None:
                check(options)
        except ReproductionOptionError as exc:
            if n in explicit or any(getattr(options, o) is not None for o in getattr(rep, "reads", ())):
                raise
            echo(f"leaving out {n}: {exc}")
            continue
        kept.append(n)
    return kept


# --- data provenance --------------------------------------------------------------------------

_DISPLAY = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "mnist": "MNIST", "fashion_mnist": "FashionMNIST"}


def data_request(
    paper: str | Sequence[str], fallback: str | Sequence[str] = "synthetic", limit: int | None = None
) -> dict:
    """The ``"data"`` entry of a ``uses_data`` config: the paper's image set(s), the offline
    substitute(s) for ``--data auto``, and how many images to load (``None``: all)."""
    return {"paper": paper, "fallback": fallback, "limit": limit}


def _names(x: str | Sequence[str]) -> list[str]:
    return [x] if isinstance(x, str) else list(x)


def _one_or_list(names: list[str]) -> str | list[str]:
    return names[0] if len(names) == 1 else names


def resolve_data(request: dict, asked: str, seed: int, note: Callable[[str], None]) -> tuple[dict, dict]:
    """``(provenance, images)`` for a config's data ``request`` and the user's ``--data`` (``asked``).

    ``--data NAME`` loads exactly ``NAME`` (:class:`~isoprobe.data.DataUnavailable` if it cannot);
    ``auto`` loads the paper's sets, replacing those that cannot be had by the fallback(s).
    ``provenance = {"paper", "asked", "used", "substitute", "limit"}``: ``substitute`` is true
    when any set used is not one of the paper's.
    """
    paper, limit = _names(request["paper"]), request.get("limit")
    images: dict[str, ImageBatch] = {}
    if asked != "auto":
        images[asked] = load_images(asked, limit=limit, seed=seed)
    else:
        missing = []
        for name in paper:
            try:
                images[name] = load_images(name, limit=limit, seed=seed)
            except DataUnavailable as exc:
                missing.append(name)
                note(f"{name} unavailable ({exc})")
        if missing:
            fallback = [n for n in _names(request.get("fallback", "synthetic")) if n not in images]
            note(f"offline: using {', '.join(fallback)} in place of {', '.join(missing)}")
            images.update(_load_fallbacks(fallback, limit, seed, note))
    for batch in images.values():
        note(f"data: {batch.description}")
    used = list(images)
    provenance = {
        "paper": request["paper"],
        "asked": asked,
        "used": _one_or_list(used),
        "substitute": any(u not in paper for u in used),
        "limit": limit,
    }
    return provenance, images


def _load_fallbacks(names: list[str], limit: int | None, seed: int, note: Callable[[str], None]) -> dict:
    """The fallback image sets; one that cannot load here (``digits`` without scikit-learn) gives way
    to the built-in ``synthetic`` set, which always loads (and says so)."""
    out: dict[str, ImageBatch] = {}
    for name in names:
        try:
            out[name] = load_images(name, limit=limit, seed=seed)
        except DataUnavailable as exc:
            if name == "synthetic":
                raise
            note(f"{name} unavailable ({exc}): using the built-in synthetic set instead")
            if "synthetic" not in names:
                out["synthetic"] = load_images("synthetic", limit=limit, seed=seed)
    return out


def data_label(data: dict | None) -> str:
    """``"on substitute data: digits, not CIFAR10"`` (the sets used in place of the paper's ones) for
    substitute provenance, else ``""``."""
    if not data or not data.get("substitute"):
        return ""
    used, paper = _names(data["used"]), _names(data["paper"])
    subs = ", ".join(_DISPLAY.get(n, n) for n in used if n not in paper)
    missing = ", ".join(_DISPLAY.get(n, n) for n in paper if n not in used)
    return f"on substitute data: {subs}, not {missing}"


# --- running one declared reproduction ------------------------------------------------------------


def _paths(out_dir: Path, st: str) -> dict[str, Path]:
    return {s: out_dir / f"{st}.{s}" for s in ("json", "csv", "png")}


def _up_to_date(paths: dict[str, Path], config: dict) -> dict | None:
    """The JSON of a finished run with the same config (``None`` if there is none)."""
    if not all(p.exists() for p in paths.values()):
        return None
    try:
        summary = json.loads(paths["json"].read_text())
    except json.JSONDecodeError:
        return None
    return summary if summary.get("config") == jsonable(config) else None


def _config(rep: Reproduction, options: Options, env: Env) -> dict:
    """``{quick, seed, device, protocol}`` and the reproduction's own sizes, data resolved."""
    cfg = {
        "quick": options.quick,
        "seed": options.seed,
        "device": options.device,
        "protocol": options.protocol,
        **rep.config(options),
    }
    if rep.uses_data:
        if not isinstance(cfg.get("data"), dict):
            raise TypeError(f"{rep.name} uses data: its config must declare data_request(...) as 'data'")
        cfg["data"], env.image_sets = resolve_data(cfg["data"], options.data, options.seed, env.note)
        env.images = next(iter(env.image_sets.values())) if len(env.image_sets) == 1 else None
    return jsonable(cfg)


def _compute(units: list[Unit], table: TidyTable | None, env: Env) -> list[dict]:
    """Rows of every unit in order (rank 0; ``[]`` elsewhere): finished ones from the CSV, the
    rest computed, dealt round-robin over the ranks and gathered on rank 0 in rounds of ``world``."""
    keys = [k for k, _ in units]
    if len(set(keys)) != len(keys):
        raise ValueError(f"{env.stem}: unit keys must be unique, got {keys}")
    done = distributed.broadcast_object(set() if table is None else {k for k in keys if table.done(k)})
    todo = [(k, f) for k, f in units if k not in done]
    if table is not None and len(done):
        env.note(f"resumed {len(done)} finished unit(s) from {table.csv_path}")
    world, rank = env.world, env.rank
    rounds = [todo[i : i + world] for i in range(0, len(todo), world)]
    for batch in env.progress(rounds, desc="units", total=len(rounds)):
        mine = batch[rank] if rank < len(batch) else None
        with distributed.local_only():  # a unit is one rank's work: no collective inside it
            result = (mine[0], mine[1]()) if mine else None
        for part in distributed.gather_rows([result]) if world > 1 else [result]:
            if part is not None and table is not None:
                table.add(*part)
    return table.rows(keys) if table is not None else []


_VERDICT_COLORS = {"held": "tab:green", "not held": "tab:red", "undecided": "tab:gray"}


def _footer(rep: Reproduction, verdict: Verdict, width_in: float, limit: int = 420) -> str:
    """The PNG's footer: the claim in short and the verdict with (the start of) its reason, wrapped
    to the figure's width."""
    import textwrap

    chars = max(60, int(width_in * 15))
    reason = verdict.reason if len(verdict.reason) <= limit else verdict.reason[: limit - 1].rstrip() + "…"
    claim = rep.claim.split(" (as tested")[0]
    lines = textwrap.wrap(f"Claim ({rep.figure}): {claim}", chars)
    lines += textwrap.wrap(f"Verdict: {verdict.verdict.upper()} — {reason}", chars)
    return "\n".join(lines)


def _save_figure(fig, path: Path, label: str, footer: str = "", verdict: str = "") -> None:
    """Save ``fig`` with the substitute-data ``label`` in red above and the claim/verdict ``footer`` below."""
    if label:
        title = fig.get_suptitle()
        fig.suptitle(
            f"{title}\n[{label}]" if title else f"[{label}]", color="tab:red", fontsize="medium" if title else "large"
        )
    if footer:
        fig.text(0.0, 0.0, footer, ha="left", va="top", fontsize=8, color=_VERDICT_COLORS.get(verdict, "black"))
    fig.savefig(path, dpi=120, bbox_inches="tight")


def _summary(
    rep: Reproduction, verdict: Verdict, cfg: dict, notes: Sequence[str], elapsed: float, data: dict | None
) -> dict:
    out = {
        "name": rep.name,
        "paper": rep.paper,
        "figure": rep.figure,
        "claim": rep.claim,
        "verdict": verdict.verdict,
        "held": verdict.held,
        "rule": verdict.rule,
        "measured": verdict.measured,
        "theory": verdict.theory,
        "reason": verdict.reason,
        "notes": [*notes, *verdict.notes],
        "config": cfg,
    }
    if data is not None:
        out["data"] = data
    out["elapsed_s"] = round(elapsed, 3)
    return jsonable(out)


def _write_json(path: Path, summary: dict) -> None:
    path.write_text(json.dumps(summary, indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def _run_declared(rep: Reproduction, options: Options, out_dir: Path, env: Env) -> dict:
    """Run one declared reproduction (every rank calls it; rank 0 writes and returns its JSON)."""
    t0 = time.perf_counter()
    cfg = _config(rep, options, env)
    paths = _paths(out_dir, env.stem)
    skip = distributed.broadcast_object(_up_to_date(paths, cfg) if env.rank == 0 else None)
    if skip is not None:
        env.echo(f"{env.stem}: up to date in {out_dir} (verdict: {skip.get('verdict')}); skipped")
        return skip
    columns = rep.columns(cfg) if callable(rep.columns) else rep.columns
    table = TidyTable(paths["csv"], columns, cfg, started=t0) if env.rank == 0 else None
    try:
        rows = _compute(list(rep.units(cfg, env)), table, env)
    except BaseException:  # Ctrl-C or an error: the finished units stay, and the time spent on them
        if table is not None:
            table.save_elapsed()
        raise
    if env.rank != 0:
        env.clean()
        return distributed.broadcast_object(None)
    verdict = rep.verdict(rows, cfg)
    if not isinstance(verdict, Verdict):
        raise TypeError(f"{rep.name}: the verdict function must return a Verdict, got {type(verdict).__name__}")
    data = cfg.get("data")  # resolved images (uses_data) or a provenance the config states itself
    fig = rep.draw(rows, cfg)
    footer = _footer(rep, verdict, fig.get_figwidth())
    _save_figure(fig, paths["png"], data_label(data), footer, verdict.verdict)
    summary = _summary(rep, verdict, cfg, env.notes, table.elapsed(), data)
    _write_json(paths["json"], summary)
    table.finish()
    env.clean()
    _announce(summary, paths["json"], env.echo, env.stem)
    return distributed.broadcast_object(summary)


def _announce(summary: dict, path: Path, echo: Callable[[str], None], st: str) -> None:
    label = data_label(summary.get("data"))
    why = f": {summary['reason']}" if summary.get("verdict") != "held" and summary.get("reason") else ""
    claim = summary.get("claim", "").split(" (as tested")[0]
    echo(
        f"{st} ({summary.get('figure', '')}: {claim}): {summary['verdict']}{why}"
        + (f" [{label}]" if label else "")
        + f" ({summary['elapsed_s']:.1f} s) -> {path}"
    )


def run_reproductions(
    names: Sequence[str],
    options: Options | None = None,
    out_dir: str | Path = "results",
    *,
    show_progress: bool = True,
    echo: Callable[[str], None] = print,
    command: str | None = None,
    **option_fields: Any,
) -> list[dict]:
    """Run the named reproductions in order; returns their JSON summaries.

    ``options`` (or its fields as keywords: ``quick=True, runs=2``) are checked before
    anything runs. Skips a reproduction whose outputs exist with the same config; resumes a
    partial one. Under torchrun every rank calls this; rank 0 writes and echoes. The run holds
    ``out_dir`` (:func:`isoprobe.outlock.hold_folder`, the lock naming ``command``, default
    this process's command line): :class:`~isoprobe.outlock.FolderBusy` while another run holds it.
    """
    if options is None:
        options = Options(**option_fields)
    elif option_fields:
        raise TypeError("give options or its fields, not both")
    rank, world = distributed.rank_world()
    echo = echo if rank == 0 else (lambda _m: None)
    selected = select(names, options, echo)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(
        options.device if options.device == "cpu" or world == 1 else f"cuda:{torch.cuda.current_device()}"
    )
    summaries = []
    with distributed.hold_folder_on_root(out_dir, rank, command or shlex.join(sys.argv), echo):
        for name in selected:
            st = stem(name, options.protocol)
            env = Env(st, out_dir, device, rank, world, show_progress, echo)
            summaries.append(_run_declared(REGISTRY[name], options, out_dir, env))
    return summaries


def summarize(summaries: Sequence[dict], out_dir: str | Path = "") -> str:
    """The closing lines of a run: verdict counts, paper-data verdicts apart from substitute-data ones."""

    def line(group: list[dict], title: str, tail: str = "") -> str:
        parts = []
        for v in VERDICTS:
            these = [s["name"] for s in group if s.get("verdict") == v]
            if these:
                parts.append(f"{len(these)} {v}" + ("" if v == "held" else f" ({', '.join(these)})"))
        return f"  {title} ({len(group)}): " + ", ".join(parts) + tail

    sub = [s for s in summaries if (s.get("data") or {}).get("substitute")]
    paper = [s for s in summaries if s not in sub]
    lines = [f"{len(summaries)} reproduction(s)" + (f" in {out_dir}" if out_dir else "") + ":"]
    if paper:
        lines.append(line(paper, "on the paper's data or no data"))
    if sub:
        tail = "  [verdicts about the substitute, not about the paper's data sets]"
        lines.append(line(sub, "on substitute data", tail))
    return "\n".join(lines)
