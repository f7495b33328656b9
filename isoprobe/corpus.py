"""``isoprobe inspect`` over many processes: one corpus shared among ``torchrun`` ranks.

::

    torchrun --nproc_per_node=4 -m isoprobe inspect --model M --dataset corpus.jsonl --limit 100000 --out run/

Every rank reads the same texts (a ``datasets`` file or Hub data set is *streamed*: only its
first ``--limit`` rows are read, never the whole corpus), cuts them into the same sequences and
batches as one process would (``--batch-size``, ``--stride``), and runs the batches ``k`` with
``k mod world = rank`` through its copy of the model under a token-view
:class:`~isoprobe.hooks.Probe`. A record's ``step`` is its batch's index ``k`` in the whole
corpus, so the records are those of the single-process run (to the rounding of the kernels).

At the end rank 0 receives every rank's records and running summaries
(:func:`isoprobe.distributed.merge_summaries`: counts added, Welford means and variances per site,
call and point combined exactly by Chan et al.'s pairwise formulas) and alone prints and writes
the outputs: those of the single-process run, plus ``summary.json`` (the merged summary rows).
Rank 0 shows a progress bar over its own share of the batches.

**Resuming.** With ``--out``, each finished batch is kept at once in ``OUT/parts/batch-K.json``
(written whole or not at all); the same command run again, with any number of ranks, reads the
finished batches back instead of probing them again. ``OUT/parts/run.json`` holds the options
that shape the records (model, sites, batch size, stride, dtypes); another run's parts or a batch
whose texts changed are refused with a clear error. Resuming with other ranks needs ``--out`` on
a file system they all see.

``--train-mode`` is refused: dropout masks come from one random stream over the batches in one
process, which ranks cannot share.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from isoprobe.distributed import agree_min, gather_to_root, merge_summaries, rank_world
from isoprobe.hooks import Probe
from isoprobe.jobs import (
    TextJob,
    TextProbeReport,
    _gram_dtype,
    _pad,
    _sites_option,
    check_outputs,
    encode_texts,
    tokenizer_fields,
    warn_singular,
    write_outputs,
)
from isoprobe.models import ModelLoadError, first_line, hub_reachable, load_model, read_texts
from isoprobe.records import Record, RunningSummary, Summary, json_text, read_json

__all__ = ["CorpusResult", "run_corpus", "run_options", "stream_texts", "write_corpus_outputs"]

Notify = Callable[[str], None]

_FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}


@dataclasses.dataclass
class CorpusResult:
    """What rank 0 holds after a corpus run: the report of all ranks' records in corpus order,
    and the summary merged from the ranks' running summaries."""

    report: TextProbeReport
    summary: Summary


def _silent(message: str) -> None:
    pass


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


# ----------------------------------------------------------------------------- texts


def stream_texts(name: str, split: str = "train", column: str = "text", limit: int = 16) -> list[str]:
    """``column`` of the first ``limit`` rows of data set ``name``, empty texts left out, read
    with ``datasets``' streaming mode for a csv/json/jsonl/parquet/txt file or a Hub name (no
    more rows are read than ``limit``), ``load_from_disk`` (memory-mapped) for a saved folder."""
    import datasets

    if limit < 1:
        raise ValueError(f"--limit must be at least 1, got {limit}")
    path = Path(name)
    if path.is_dir():
        data = datasets.load_from_disk(str(path))
        data = data[split] if isinstance(data, datasets.DatasetDict) else data
        rows: Any = data.select(range(min(limit, len(data))))
    elif path.is_file():
        if path.suffix not in _FORMATS:
            raise ValueError(f"unknown data file type {path.suffix!r}; use one of {', '.join(_FORMATS)}")
        rows = _streamed(name, split, _FORMATS[path.suffix], data_files=str(path))
    elif not hub_reachable():
        raise ModelLoadError(
            f"cannot load dataset {name!r}: no such file or folder, and the Hugging Face Hub cannot be reached"
        )
    else:
        rows = _streamed(name, split, name)
    texts = []
    for row in itertools.islice(rows, limit):
        if column not in row:
            raise ValueError(f"dataset {name!r} has no column {column!r}; columns: {', '.join(row)}")
        if str(row[column]).strip():
            texts.append(str(row[column]))
    return texts


def _streamed(name: str, split: str, source: str, **kwargs: Any) -> Any:
    import datasets

    try:
        return iter(datasets.load_dataset(source, split=split, streaming=True, **kwargs))
    except Exception as error:
        raise ModelLoadError(f"cannot load dataset {name!r} (split {split!r}): {first_line(error)}") from None


def _texts(job: TextJob) -> list[str]:
    texts = read_texts(job.texts, job.text_files) if job.texts or job.text_files else []
    if job.dataset is not None:
        texts += stream_texts(job.dataset, job.split, job.column, job.limit)
    if not texts:
        raise ValueError("no text given: use --text, --text-file or --dataset")
    return texts


# ----------------------------------------------------------------------------- finished batches


class _Parts:
    """``OUT/parts``: one JSON file per finished batch, and ``run.json``, the options they were
    made with; a batch's file also holds the SHA-256 of its token ids."""

    def __init__(self, out: str | Path, options: dict[str, Any]) -> None:
        self.folder = Path(out) / "parts"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.options = options

    def check_run(self, rank: int) -> None:
        """``ValueError`` on every rank if the folder holds another run's parts; rank 0 records
        this run's options when the folder has none."""
        run = self.folder / "run.json"
        before = json.loads(run.read_text()) if run.is_file() else None
        ok = agree_min(int(before is None or before == self.options))
        if not ok:
            raise ValueError(
                f"{self.folder} holds the finished batches of another run (other model, sites, batch size, "
                "stride or dtype; see its run.json): give another --out, or delete that folder to start over"
            )
        if before is None and rank == 0:
            _write_whole(run, json.dumps(self.options, indent=1))

    def _path(self, k: int) -> Path:
        return self.folder / f"batch-{k:07d}.json"

    def load(self, k: int, digest: str) -> list[Record] | None:
        """Batch ``k``'s records, or ``None`` if it is not finished yet."""
        if not self._path(k).is_file():
            return None
        records, meta = read_json(self._path(k))
        if meta.get("ids_sha256") != digest:
            raise ValueError(
                f"{self._path(k)} was made from other texts than batch {k} now has (the data, --limit "
                "or the tokenizer changed): give another --out, or delete its parts folder to start over"
            )
        return records

    def save(self, k: int, digest: str, records: list[Record]) -> None:
        _write_whole(self._path(k), json_text(records, batch=k, ids_sha256=digest))


def _write_whole(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all (a temporary file renamed over it)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _digest(batch: Sequence[Sequence[int]]) -> str:
    return hashlib.sha256(json.dumps([list(s) for s in batch]).encode()).hexdigest()


# ----------------------------------------------------------------------------- the run


def _rank_device(device: str) -> str:
    """Each rank's own GPU (``cuda:LOCAL_RANK``) for ``cuda``/``auto`` where CUDA is available."""
    if device in ("cuda", "auto") and torch.cuda.is_available():
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return device


def run_options(job: TextJob) -> dict[str, Any]:
    """The options that shape a corpus run's records: a resumed ``--out`` must have been made
    with the same ones (its finished batches are refused otherwise)."""
    keys = ("model", "sites", "batch_size", "stride", "window", "calls", "dtype", "gram_dtype")
    return {k: getattr(job, k) for k in keys}


def _checked_options(job: TextJob) -> tuple[list[str] | None, torch.dtype]:
    """The Probe's ``sites`` and ``gram_dtype``; ``ValueError`` for what a corpus run cannot do."""
    if job.train_mode:
        raise ValueError(
            "--train-mode cannot be shared among processes (dropout draws from one random stream over "
            "the batches): run it in one process"
        )
    if job.device_map is not None:
        raise ValueError(
            "--device-map splits one model over this machine's devices, while each torchrun rank holds "
            "its own copy: use one or the other"
        )
    if job.baseline is not None:
        raise ValueError(
            "--baseline probes a second model on the same texts: run it in one process, not under torchrun"
        )
    if job.fmt not in ("table", "json", "csv"):
        raise ValueError(f"format must be table, json or csv; got {job.fmt!r}")
    return _sites_option(job.sites), _gram_dtype(job.gram_dtype)


def run_corpus(job: TextJob, notify: Notify = _stderr) -> CorpusResult | None:
    """Probe ``job``'s texts with the batches dealt to the ranks of the process group; on rank 0
    the :class:`CorpusResult` (also written to ``job.out``/``job.plot`` by the caller), ``None``
    on the others. Collective: every rank calls it with the same job."""
    rank, world = rank_world()
    say = notify if rank == 0 else _silent
    sites, gram_dtype = _checked_options(job)
    check_outputs(job.out, job.plot)
    parts = _Parts(job.out, run_options(job)) if job.out else None
    if parts is not None:
        parts.check_run(rank)
    texts = _texts(job)
    loaded = load_model(job.model, _rank_device(job.device), job.dtype)
    origins: list[tuple[int, int]] = []
    sequences = encode_texts(loaded.tokenizer, texts, loaded.context, job.stride, say, origins)
    lengths = [len(s) for s in sequences]
    if rank == 0:  # sites the texts make singular by construction, named before any work
        warn_singular(loaded, sites, sequences, job.window, say)
    empty = TextProbeReport(loaded.name, lengths, [], list(texts), origins, job.batch_size, **tokenizer_fields(loaded))
    batches = [sequences[s : s + job.batch_size] for s in range(0, len(sequences), job.batch_size)]
    mine = range(rank, len(batches), world)
    running, records, resumed = RunningSummary(), [], 0
    bar = tqdm(
        total=sum(len(batches[k]) for k in mine),
        unit=" windows" if job.stride else " texts",
        file=sys.stderr,
        leave=False,
        disable=rank != 0 or job.quiet or not sys.stderr.isatty(),
        desc=f"probing (rank 0 of {world})",
    )
    with (
        bar,
        torch.no_grad(),
        Probe(loaded.model.eval(), sites=sites, gram_dtype=gram_dtype, calls=job.calls, window=job.window) as probe,
    ):
        for k in mine:
            digest = _digest(batches[k])
            got = parts.load(k, digest) if parts is not None else None
            resumed += got is not None
            if got is None:
                got = _forward(loaded, probe, batches[k], k)
                if parts is not None:
                    parts.save(k, digest, got)
            running.add(got)
            records += got
            bar.update(len(batches[k]))
    counts = gather_to_root(resumed)
    if counts is not None and sum(counts) and parts is not None:
        say(f"resumed: {sum(counts)} of {len(batches)} batches were finished before, read back from {parts.folder}")
    return _on_root(empty, records, running)


def _forward(loaded: Any, probe: Probe, batch: list[list[int]], k: int) -> list[Record]:
    ids, mask = _pad(batch, loaded.tokenizer.pad_id, loaded.device)
    try:
        loaded.model(input_ids=ids, attention_mask=mask)
    except Exception as error:
        raise ValueError(f"the model's forward failed on the texts of batch {k}: {first_line(error)}") from None
    return [dataclasses.replace(r, step=k) for r in probe.pop_records()]


def _on_root(empty: TextProbeReport, records: list[Record], running: RunningSummary) -> CorpusResult | None:
    """Rank 0: ``empty`` (the report without records: texts, origins, tokenizer) with every
    rank's records in corpus order (by batch; a batch's records in forward order) and the merged
    summary; ``None`` on the other ranks."""
    merged = merge_summaries(running)
    parts = gather_to_root(records)
    if parts is None or merged is None:
        return None
    ordered = sorted((r for part in parts for r in part), key=lambda r: r.step)
    return CorpusResult(dataclasses.replace(empty, records=ordered), merged.summary())


def write_corpus_outputs(result: CorpusResult, job: TextJob, notify: Notify = _stderr) -> None:
    """Rank 0: the single-process outputs (:func:`isoprobe.jobs.write_outputs`) and, with
    ``--out``, ``summary.json``: ``{"model", "rows": [merged summary row, ...]}`` (``+inf`` as ``"inf"``)."""
    write_outputs(result.report, job, notify)
    if job.out is not None:
        rows = [{k: "inf" if v == math.inf else v for k, v in row.items()} for row in result.summary]
        text = json.dumps({"model": result.report.model, "rows": rows}, indent=1, allow_nan=False)
        _write_whole(Path(job.out) / "summary.json", text)
        notify(f"wrote summary.json (summaries merged over the ranks) to {job.out}")
