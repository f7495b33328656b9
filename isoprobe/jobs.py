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
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm

from isoprobe.hooks import Probe, SingularGramWarning, rank_bounds
from isoprobe.models import ByteTokenizer, HFTokenizer, LoadedModel, first_line, load_gpt2, load_model, read_texts
from isoprobe.records import (
    NONFINITE,
    Record,
    csv_text,
    format_table,
    json_text,
    plot_records,
    theorem1_counts,
    theorem1_unchecked,
    to_csv,
)
from isoprobe.windows import window_sizes

__all__ = [
    "TextJob",
    "TextProbeReport",
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
    out: str | None = None
    fmt: str = "table"
    plot: str | None = None
    quiet: bool = False


@dataclass
class TextProbeReport:
    """Records of probing a model on texts; ``tokens``: token count of each sequence run
    (a record of step s, item i belongs to sequence ``s · batch_size + i``)."""

    model: str
    tokens: list[int]
    records: list[Record] = field(repr=False)

    @property
    def theorem1(self) -> dict[str, int]:
        return theorem1_counts(self.records)

    def json(self) -> str:
        return json_text(self.records, model=self.model, tokens=self.tokens, theorem1=self.theorem1)


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
    sites, gram_dtype = _sites_option(job.sites), _gram_dtype(job.gram_dtype)
    check_outputs(job.out, job.plot)
    progress = False if job.quiet else sys.stderr.isatty()
    with _hub_progress_bars(progress):  # transformers' own "Loading weights" bars follow ours
        if job.family == "gpt2":
            texts = read_texts(job.texts, job.text_files)
            loaded = load_gpt2(job.model, job.init, job.seed, job.device, job.dtype, notify)
        else:
            texts = read_texts(job.texts, job.text_files, job.dataset, job.split, job.column, job.limit)
            loaded = load_model(job.model, job.device, job.dtype)
    return probe_texts(
        loaded,
        texts,
        sites=sites,
        stride=job.stride,
        window=job.window,
        batch_size=job.batch_size,
        train_mode=job.train_mode,
        seed=job.seed,
        gram_dtype=gram_dtype,
        notify=notify,
        progress=progress,
    )


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


def _text_table(report: TextProbeReport) -> str:
    t1, unchecked = report.theorem1, theorem1_unchecked(report.records)
    footer = "Theorem 1 (I(normalized) >= I(centered) * norm-variation factor): " + (
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
    count = len(report.tokens)
    header = f"model: {report.model}; {count} sequence{'s' * (count != 1)}, {sum(report.tokens)} tokens"
    return f"{header}\n{format_table(report.records)}\n{footer}"


def render(report: TextProbeReport, fmt: str = "table") -> str:
    """What the command prints: the table (model line, one row per site and point, Theorem 1
    footer), or the records as JSON or CSV."""
    if fmt == "json":
        return report.json()
    if fmt == "csv":
        return csv_text(report.records).rstrip("\n")
    return _text_table(report)


def write_outputs(report: TextProbeReport, job: TextJob, notify: Notify = _stderr) -> None:
    """``--out``: table.txt, records.csv, records.json, plot.png; ``--plot``: the plot."""
    title = f"isometry gap along depth: {report.model}"
    if job.out is not None:
        folder = Path(job.out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "table.txt").write_text(_text_table(report) + "\n")
        to_csv(report.records, folder / "records.csv")
        (folder / "records.json").write_text(report.json())
        plot_records(report.records, folder / "plot.png", title)
        notify(f"wrote table.txt, records.csv, records.json and plot.png to {folder}")
    if job.plot is not None:
        plot_records(report.records, job.plot, title)
        notify(f"wrote {job.plot}")


def encode_texts(
    tokenizer: ByteTokenizer | HFTokenizer,
    texts: Sequence[str],
    context: int | None,
    stride: int | None = None,
    notify: Notify = _stderr,
) -> list[list[int]]:
    """Token ids of each text; a text longer than ``context`` is truncated (with a warning) or,
    with ``stride``, cut into windows of ``context`` tokens starting every ``stride`` tokens
    (the last window ends at the text's end)."""
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
        if context is None or len(ids) <= context:
            sequences.append(ids)
        elif stride is None:
            notify(
                f"warning: text {i + 1} has {len(ids)} tokens, more than the context of {context}: "
                f"truncated to {context} (use --stride to probe it in windows)"
            )
            sequences.append(ids[:context])
        else:
            starts = list(range(0, len(ids) - context + 1, stride))
            if starts[-1] + context < len(ids):
                starts.append(len(ids) - context)
            sequences += [ids[s : s + context] for s in starts]
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
    notify: Notify = _stderr,
    progress: bool | None = None,
) -> TextProbeReport:
    """Run ``loaded.model`` on ``texts`` under a token-view :class:`Probe`.

    ``train_mode`` runs with dropout on (as the paper's GPT-2 notebook did; seeded by
    ``seed``); eval mode is the default. ``progress``: a bar on stderr over the sequences
    (texts, or windows with ``stride``) and batches; ``None``: only when stderr is a terminal.
    ``window``: Grams over windows of at most that many tokens (:mod:`isoprobe.windows`); sites
    the texts make singular by construction are named before they run (:func:`singular_sites`)."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    sequences = encode_texts(loaded.tokenizer, texts, loaded.context, stride, notify)
    model = loaded.model
    model.train(train_mode)
    _warn_singular(loaded, sites, sequences, window, notify)
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
    probe = Probe(model, sites=sites, gram_dtype=gram_dtype, window=window)
    with bar, torch.no_grad(), warnings.catch_warnings(), probe:
        warnings.simplefilter("ignore", SingularGramWarning)  # said before the run
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
    bad = sorted({r.site for r in records if r.flag == NONFINITE})
    if bad:
        notify(
            f"warning: non-finite activations (NaN/inf) at {len(bad)} sites, first {bad[0]!r}: "
            "their records are flagged 'non-finite'"
        )
    return TextProbeReport(loaded.name, [len(s) for s in sequences], records)


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


def _warn_singular(
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
