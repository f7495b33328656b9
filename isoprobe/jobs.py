"""The ``isoprobe gpt2`` and ``isoprobe inspect`` jobs: texts through a model under a token-view
:class:`~isoprobe.hooks.Probe`, then the table, the files and the plot.

Both commands are one body, :func:`run`, given a :class:`TextJob`; only the loading differs
(``family="gpt2"``: :func:`isoprobe.models.load_gpt2`, ``"auto"``: any ``AutoModel`` by
:func:`isoprobe.models.load_model`). The order is the user's: options and the ``--out`` /
``--plot`` paths are checked first (an unwritable path fails before the model loads), then the
texts are read, the model loaded and the texts probed in batches (a progress bar over windows
and batches on stderr when it is a terminal, unless ``quiet``); :func:`render` gives what the
command prints and :func:`write_outputs` writes the files last, so that a write that fails
anyway still leaves the table printed.

Texts run through the model in batches, right-padded, with the attention mask passed to the
forward (so the Probe leaves padding out of the token Grams). A text longer than the model's
context is truncated with a warning, or cut into overlapping windows with ``stride``.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import io
import json
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm

from isoprobe.compare import (
    Comparison,
    ProbeRun,
    compare_runs,
    comparison_json,
    format_comparison,
    plot_comparison,
)
from isoprobe.hooks import Probe, SingularGramWarning, rank_bounds
from isoprobe.models import (
    ByteTokenizer,
    HFTokenizer,
    LoadedModel,
    first_line,
    load_gpt2,
    load_model,
    random_like,
    read_texts,
)
from isoprobe.placement import describe, dispatch_options
from isoprobe.records import (
    NONFINITE,
    Record,
    csv_text,
    format_table,
    json_text,
    plot_records,
    theorem1_counts,
    theorem1_unchecked,
)
from isoprobe.sites import discover_sites
from isoprobe.windows import window_sizes

__all__ = [
    "TextJob",
    "TextProbeReport",
    "tokenizer_fields",
    "warn_singular",
    "check_outputs",
    "encode_texts",
    "probe_texts",
    "render",
    "run",
    "write_outputs",
]

Notify = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


@dataclass(frozen=True)
class TextJob:
    """What ``isoprobe gpt2`` / ``isoprobe inspect`` was asked (the commands' options)."""

    model: str = "gpt2"
    family: Literal["gpt2", "auto"] = "gpt2"
    init: str = "pretrained"  # gpt2 only
    seed: int = 0
    texts: Sequence[str] = ()
    text_files: Sequence[str] = ()
    dataset: str | None = None  # inspect only, like split, column, limit
    split: str = "train"
    column: str = "text"
    limit: int = 16
    device: str = "cpu"
    dtype: str = "float32"
    sites: str | None = None
    stride: int | None = None
    window: int | None = None
    batch_size: int = 8
    train_mode: bool = False
    gram_dtype: str = "float64"
    calls: bool = True
    out: str | None = None
    fmt: str = "table"
    plot: str | None = None
    quiet: bool = False
    baseline: str | None = None  # inspect only: "random", the same architecture at random init
    device_map: str | None = None  # inspect only, like max_memory, offload_folder (isoprobe.placement)
    max_memory: str | None = None
    offload_folder: str | None = None


@dataclass
class TextProbeReport:
    """Records of probing a model on texts, and what they were made from.

    ``tokens``: token count of each sequence run (a record of step s, item i belongs to sequence
    ``s · batch_size + i``); ``origins``: for each sequence, the index of its text in ``texts``
    and its first token there (a text longer than the context is cut into several sequences
    with ``--stride``); ``tokenizer``: the tokenizer's name, ``tokenizer_fallback``: whether it
    was the byte-level fallback (no tokenizer of the model's own was found).
    """

    model: str
    tokens: list[int]
    records: list[Record] = field(repr=False)
    texts: list[str] = field(default_factory=list, repr=False)
    origins: list[tuple[int, int]] = field(default_factory=list)
    batch_size: int = 8
    tokenizer: str = ""
    tokenizer_fallback: bool = False
    tokenizer_class: str = ""
    baseline: TextProbeReport | None = field(default=None, repr=False)

    @property
    def theorem1(self) -> dict[str, int]:
        return theorem1_counts(self.records)

    @property
    def source(self) -> str:
        """``"MODEL; tokenizer: T"``: T is ``byte-level fallback``, a Hub id, or for a tokenizer
        read from a folder its class (the JSON has its full path)."""
        tokenizer = "byte-level fallback" if self.tokenizer_fallback else self.tokenizer
        if Path(tokenizer).exists():
            tokenizer = self.tokenizer_class
        return f"{self.model}; tokenizer: {tokenizer}" if tokenizer else self.model

    def sequence_of(self, record: Record) -> int:
        """The index of the sequence ``record`` was measured on: ``step · batch_size + item``."""
        return record.step * self.batch_size + (record.item or 0)

    def text_of(self, record: Record) -> int | None:
        """The index in ``texts`` of the text ``record`` was measured on (``None`` if unknown)."""
        sequence = self.sequence_of(record)
        return self.origins[sequence][0] if 0 <= sequence < len(self.origins) else None

    def json(self) -> str:
        """The records (each with ``sequence`` and ``text``: indices into ``sequences`` and
        ``texts.jsonl``), the model, the tokenizer and the sequences they come from."""
        obj = json.loads(
            json_text(
                self.records,
                model=self.model,
                tokenizer={"name": self.tokenizer, "class": self.tokenizer_class, "fallback": self.tokenizer_fallback},
                tokens=self.tokens,
                sequences=[{"text": t, "start": s, "tokens": n} for (t, s), n in zip(self.origins, self.tokens)],
                theorem1=self.theorem1,
            )
        )
        for row, record in zip(obj["records"], self.records):
            row["sequence"] = self.sequence_of(record)
            row["text"] = self.text_of(record)
        return json.dumps(obj, indent=1, allow_nan=False)

    def texts_jsonl(self) -> str:
        """``texts.jsonl``: one ``{"index": i, "text": ...}`` per line, in the order probed."""
        return "".join(json.dumps({"index": i, "text": t}, ensure_ascii=False) + "\n" for i, t in enumerate(self.texts))


# ----------------------------------------------------------------------------- checks


def _writable_dir(folder: Path) -> None:
    """Raise ``OSError`` (with the path) unless a file can be created in ``folder``."""
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".isoprobe-write-test-"):
        pass


def check_outputs(out: str | Path | None, plot: str | Path | None) -> None:
    """Fail now, with ``OSError`` naming the path, if ``--out`` (a folder, created here if
    missing) or ``--plot`` (a file in an existing folder) cannot be written; ``ValueError`` if
    ``--plot``'s suffix is no format matplotlib writes."""
    if out is not None:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        _writable_dir(folder)
    if plot is not None:
        target = Path(plot)
        if target.is_dir():
            raise IsADirectoryError(21, "is a directory (give a file name, e.g. plot.png)", str(target))
        _check_plot_format(target)
        parent = target.parent
        if parent.exists() and not parent.is_dir():
            raise NotADirectoryError(20, "is a file, not a folder", str(parent))
        if not parent.is_dir():
            raise FileNotFoundError(2, "no such folder", str(parent))
        _writable_dir(parent)


def _check_plot_format(target: Path) -> None:
    """``ValueError`` unless matplotlib can write ``target``'s format (its suffix)."""
    from matplotlib.figure import Figure

    formats = Figure().canvas.get_supported_filetypes()
    suffix = target.suffix.lower().lstrip(".")
    if suffix not in formats:
        given = f"'.{suffix}'" if suffix else "no suffix"
        raise ValueError(
            f"--plot {str(target)!r}: {given} is not an image format; use .png (or "
            + ", ".join(f".{f}" for f in sorted(formats) if f != "png")
            + ")"
        )


def _sites_option(sites: str | None) -> list[str] | None:
    if sites is None:
        return None
    parts = [s.strip() for s in sites.split(",") if s.strip()]
    if not parts:
        raise ValueError("--sites is empty: give norm, activation or globs, comma-separated")
    return parts


def _gram_dtype(name: str) -> torch.dtype:
    choices = {"float64": torch.float64, "float32": torch.float32}
    if name not in choices:
        raise ValueError(f"gram dtype must be float64 or float32, got {name!r}")
    return choices[name]


# ----------------------------------------------------------------------------- the job


def run(job: TextJob, notify: Notify = _stderr) -> TextProbeReport:
    """Check the options and output paths, read the texts, load the model, probe the texts."""
    if job.fmt not in ("table", "json", "csv"):
        raise ValueError(f"format must be table, json or csv; got {job.fmt!r}")
    if job.baseline not in (None, "random"):
        raise ValueError(f"--baseline must be random, got {job.baseline!r}")
    sites, gram_dtype = _sites_option(job.sites), _gram_dtype(job.gram_dtype)
    check_outputs(job.out, job.plot)
    progress = False if job.quiet else sys.stderr.isatty()
    with _hub_progress_bars(progress):  # transformers' own "Loading weights" bars follow ours
        if job.family == "gpt2":
            texts = read_texts(job.texts, job.text_files)
            loaded = load_gpt2(job.model, job.init, job.seed, job.device, job.dtype, notify)
        else:
            texts = read_texts(job.texts, job.text_files, job.dataset, job.split, job.column, job.limit)
            split = dispatch_options(job.device_map, job.max_memory, job.offload_folder, job.dtype)
            loaded = load_model(job.model, job.device, job.dtype, split)
            if split is not None:
                notify(describe(loaded.model))
    probe = functools.partial(
        probe_texts,
        texts=texts,
        sites=sites,
        stride=job.stride,
        window=job.window,
        batch_size=job.batch_size,
        train_mode=job.train_mode,
        seed=job.seed,
        gram_dtype=gram_dtype,
        calls=job.calls,
        notify=notify,
        progress=progress,
    )
    report = probe(loaded)
    if job.baseline == "random":
        notify(f"baseline: the same architecture at random init (seed {job.seed}), on the same texts")
        report.baseline = probe(random_like(loaded, job.seed))
    return report


@contextlib.contextmanager
def _hub_progress_bars(enabled: bool) -> Iterator[None]:
    """transformers' progress bars on or off inside the block, as they were after it."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


_THEOREM1 = "Theorem 1 (I(normalized) >= I(centered) * norm-variation factor): "


def _theorem1_line(report: TextProbeReport) -> str:
    t1, unchecked = report.theorem1, theorem1_unchecked(report.records)
    footer = (
        f"{t1['checked'] - t1['violations']}/{t1['checked']} checks held"
        if t1["checked"]
        else "nothing decided"
        if t1["eps_dominated"] or unchecked
        else "nothing to check (no sequence of at least 2 tokens)"
    )
    if unchecked:
        footer += f"; {unchecked} not checked (singular centred Gram: the bound is 0, true of anything)"
    if t1["eps_dominated"]:
        footer += f"; {t1['eps_dominated']} undecided (eps-dominated: the norm's eps explains the gap above the bound)"
    return footer


def _header(report: TextProbeReport) -> str:
    count, tokens = len(report.tokens), sum(report.tokens)
    return f"{report.source}; {_plural(count, 'sequence')}, {_plural(tokens, 'token')}"


def _text_table(report: TextProbeReport) -> str:
    return f"model: {_header(report)}\n{format_table(report.records)}\n{_THEOREM1}{_theorem1_line(report)}"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'s' * (count != 1)}"


def render(report: TextProbeReport, fmt: str = "table") -> str:
    """What the command prints: the table (model line, one row per site and point, Theorem 1
    footer), or the records as JSON or CSV. With a baseline: the comparison table; the JSON
    adds ``baseline`` (its own JSON) and ``comparison``; the CSV is the trained model's."""
    if fmt == "json" and report.baseline is not None:
        obj = json.loads(report.json())
        obj["baseline"] = json.loads(report.baseline.json())
        obj["comparison"] = json.loads(comparison_json(_comparison(report)))
        return json.dumps(obj, indent=1, allow_nan=False)
    if fmt == "json":
        return report.json()
    if fmt == "csv":
        return _records_csv(report).rstrip("\n")
    if report.baseline is not None:
        return _baseline_table(report, report.baseline)
    return _text_table(report)


def _baseline_table(report: TextProbeReport, baseline: TextProbeReport) -> str:
    """Trained (A) against random init (B): the comparison table and both Theorem 1 counts."""
    t1 = f"{_THEOREM1}A: {_theorem1_line(report)}; B: {_theorem1_line(baseline)}"
    return f"{_header(report)}\n{format_comparison(_comparison(report))}\n{t1}"


def _comparison(report: TextProbeReport) -> Comparison:
    """The trained model (A) against its random-init baseline (B), per site and point."""
    if report.baseline is None:
        raise ValueError("no baseline was probed (--baseline random)")
    runs = [ProbeRun(r.model, r.records) for r in (report, report.baseline)]  # labels: the models
    return compare_runs(runs)


def _records_csv(report: TextProbeReport) -> str:
    """:func:`~isoprobe.records.csv_text` with a last column ``text``: the index of each record's text."""
    rows = list(csv.reader(io.StringIO(csv_text(report.records))))
    rows[0].append("text")
    for row, record in zip(rows[1:], report.records):
        index = report.text_of(record)
        row.append("" if index is None else str(index))
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def write_outputs(report: TextProbeReport, job: TextJob, notify: Notify = _stderr) -> None:
    """``--out``: table.txt, records.csv, records.json, texts.jsonl (the texts the records' ``text``
    indices point to), plot.png; ``--plot``: the plot. The plot's title names the tokenizer."""
    title = f"isometry gap along depth: {report.source}"
    if job.out is not None:
        folder = Path(job.out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "table.txt").write_text(_text_table(report) + "\n")
        (folder / "records.csv").write_text(_records_csv(report))
        (folder / "records.json").write_text(report.json())
        (folder / "texts.jsonl").write_text(report.texts_jsonl(), encoding="utf-8")
        plot_records(report.records, folder / "plot.png", title)
        notify(f"wrote table.txt, records.csv, records.json, texts.jsonl and plot.png to {folder}")
        if report.baseline is not None:
            write_outputs(report.baseline, dataclasses.replace(job, out=str(folder / BASELINE_DIR), plot=None), notify)
            (folder / "compare.txt").write_text(format_comparison(_comparison(report)) + "\n")
            plot_comparison(_comparison(report), folder / "compare.png", _compare_title(report))
            notify(f"wrote compare.txt and compare.png (trained against random init) to {folder}")
    if job.plot is not None and report.baseline is not None:
        plot_comparison(_comparison(report), job.plot, _compare_title(report))
        notify(f"wrote {job.plot}")
    elif job.plot is not None:
        plot_records(report.records, job.plot, title)
        notify(f"wrote {job.plot}")


#: the folder, inside ``--out``, of the ``--baseline random`` run's files
BASELINE_DIR = "baseline-random"


def _compare_title(report: TextProbeReport) -> str:
    return f"trained (A) against random init (B): {report.source}"


def encode_texts(
    tokenizer: ByteTokenizer | HFTokenizer,
    texts: Sequence[str],
    context: int | None,
    stride: int | None = None,
    notify: Notify = _stderr,
    origins: list[tuple[int, int]] | None = None,
) -> list[list[int]]:
    """Token ids of each text; a text longer than ``context`` is truncated (with a warning) or,
    with ``stride``, cut into windows of ``context`` tokens starting every ``stride`` tokens
    (the last window ends at the text's end). ``origins``, when given, receives for each
    sequence returned its text's index and its first token's position in that text."""
    if stride is not None and (stride < 1 or (context is not None and stride > context)):
        raise ValueError(f"--stride must be between 1 and the context ({context}), got {stride}")
    sequences = []
    for i, text in enumerate(texts):
        ids = tokenizer.encode(text)
        if not ids:
            raise ValueError(f"text {i + 1} has no tokens")
        if len(ids) == 1:
            notify(
                f"note: text {i + 1} is a single token: a token Gram needs at least 2, "
                "so its records are reported as undefined"
            )
        before = len(sequences)
        if context is None or len(ids) <= context:
            sequences.append(ids)
            starts = [0]
        elif stride is None:
            notify(
                f"warning: text {i + 1} has {len(ids)} tokens, more than the context of {context}: "
                f"truncated to {context} (use --stride to probe it in windows)"
            )
            sequences.append(ids[:context])
            starts = [0]
        else:
            starts = list(range(0, len(ids) - context + 1, stride))
            if starts[-1] + context < len(ids):
                starts.append(len(ids) - context)
            sequences += [ids[s : s + context] for s in starts]
        if origins is not None:
            origins += [(i, s) for s in starts[: len(sequences) - before]]
    return sequences


def probe_texts(
    loaded: LoadedModel,
    texts: Sequence[str],
    *,
    sites: str | Sequence[str] | None = None,
    stride: int | None = None,
    window: int | None = None,
    batch_size: int = 8,
    train_mode: bool = False,
    seed: int = 0,
    gram_dtype: torch.dtype = torch.float64,
    calls: bool = True,
    notify: Notify = _stderr,
    progress: bool | None = None,
) -> TextProbeReport:
    """Run ``loaded.model`` on ``texts`` under a token-view :class:`Probe`.

    ``train_mode`` runs with dropout on (as the paper's GPT-2 notebook did; seeded by
    ``seed``); eval mode is the default. ``progress``: a bar on stderr over the sequences
    (texts, or windows with ``stride``) and batches; ``None``: only when stderr is a terminal.
    ``calls``: also record functional sites (``Probe(calls=...)``).
    ``window``: Grams over windows of at most that many tokens (:mod:`isoprobe.windows`); sites
    the texts make singular by construction are named before they run (:func:`singular_sites`)."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    origins: list[tuple[int, int]] = []
    sequences = encode_texts(loaded.tokenizer, texts, loaded.context, stride, notify, origins)
    model = loaded.model
    model.train(train_mode)
    warn_singular(loaded, sites, sequences, window, notify)
    torch.manual_seed(seed)
    batches = range(0, len(sequences), batch_size)
    bar = tqdm(
        total=len(sequences),
        unit=" windows" if stride else " texts",
        file=sys.stderr,
        leave=False,
        mininterval=0,
        miniters=1,  # one refresh per batch: a batch is a whole forward, never too frequent
        disable=not (sys.stderr.isatty() if progress is None else progress),
        desc="probing",
    )
    probe = Probe(model, sites=sites, gram_dtype=gram_dtype, calls=calls, window=window)
    with bar, torch.no_grad(), warnings.catch_warnings(), probe:
        warnings.simplefilter("ignore", SingularGramWarning)  # said before the run
        warnings.filterwarnings("ignore", message="no site")  # an error below says it plainly
        for k, start in enumerate(batches):
            batch = sequences[start : start + batch_size]
            ids, mask = _pad(batch, loaded.tokenizer.pad_id, loaded.device)
            try:
                model(input_ids=ids, attention_mask=mask)
            except Exception as error:
                raise ValueError(f"the model's forward failed on the texts: {first_line(error)}") from None
            bar.set_postfix_str(f"batch {k + 1}/{len(batches)}", refresh=False)
            bar.update(len(batch))
    records = probe.records
    if not records:
        found = discover_sites(model)  # only on this error path: the behaviour trials again
        named = ", ".join(s.name for s in found[:3]) + (", ..." if len(found) > 3 else "")
        raise ValueError(
            f"--sites {sites!r} selected no site that ran, so nothing was measured (the model's sites "
            f"include {named or 'no module site'}; functional sites are activations and norms called as "
            "functions, e.g. '*:gelu'; softmax and other functions are not recorded)"
        )
    bad = sorted({r.site for r in records if r.flag == NONFINITE})
    if bad:
        notify(
            f"warning: non-finite activations (NaN/inf) at {len(bad)} sites, first {bad[0]!r}: "
            "their records are flagged 'non-finite'"
        )
    lengths = [len(s) for s in sequences]
    return TextProbeReport(loaded.name, lengths, records, list(texts), origins, batch_size, **tokenizer_fields(loaded))


def tokenizer_fields(loaded: LoadedModel) -> dict:
    """The report's record of the tokenizer: its name, its class, whether it was the fallback."""
    tokenizer = loaded.tokenizer
    return {
        "tokenizer": tokenizer.name,
        "tokenizer_fallback": isinstance(tokenizer, ByteTokenizer),
        "tokenizer_class": type(getattr(tokenizer, "tokenizer", tokenizer)).__name__,
    }


def singular_sites(loaded: LoadedModel, sites: str | Sequence[str] | None, tokens: int) -> list[tuple[str, int]]:
    """``(site, rank bound)`` of the sites whose token Grams of ``tokens`` tokens are singular by
    construction (more tokens than the bound: :func:`isoprobe.hooks.rank_bounds`), found on a
    two-token forward (cheap: before the texts run)."""
    ids = torch.full((1, 2), loaded.tokenizer.pad_id, dtype=torch.long, device=loaded.device)
    try:
        bounds = rank_bounds(loaded.model, {"input_ids": ids}, sites)
    except Exception:  # a forward that fails fails again on the texts, where it is reported
        return []
    return [(site, bound) for site, bound in bounds.items() if tokens > bound]


def warn_singular(
    loaded: LoadedModel,
    sites: str | Sequence[str] | None,
    sequences: list[list[int]],
    window: int | None,
    notify: Notify,
) -> None:
    """Name the sites whose token Grams the longest sequence (or window) makes singular by
    construction, and the ``--window`` that fits them, before any text runs."""
    tokens = max(max(window_sizes(len(s), window or len(s) or 1)) for s in sequences)
    short = singular_sites(loaded, sites, tokens)
    if not short:
        return
    fit = min(bound for _, bound in short)
    listed = ", ".join(f"{site} ({bound})" for site, bound in short[:3]) + (
        f" and {len(short) - 3} more" if len(short) > 3 else ""
    )
    notify(
        f"warning: Grams of {tokens} tokens{' (--window)' if window else ''} are singular by construction at "
        f"{len(short)} site{'s' * (len(short) != 1)}, whose token Grams have rank at most (in parentheses: the width, "
        f"one less after a norm's centring) {listed}: gap inf, no Theorem 1 check. --window {fit} measures "
        f"Grams over consecutive windows of at most {fit} tokens instead"
    )


def _pad(batch: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, s in enumerate(batch):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)
