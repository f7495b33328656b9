"""Models and tokenizers for the text probes, offline-aware, and the ``gpt2``/``inspect`` jobs.

Loading never waits on an unreachable Hub: a name is looked up in the local cache first; the
Hub is asked only when it answers (a 3-second connection test, skipped when ``HF_HUB_OFFLINE``
or ``TRANSFORMERS_OFFLINE`` is set). Whatever cannot be loaded raises :class:`ModelLoadError`
with what to do instead (``--init random``, ``--model PATH``).

``--init random`` builds GPT-2 small (``GPT2Config()``, or the config of ``--model`` when it is
a path or cached id) seeded by ``--seed``. Its tokenizer is GPT-2's own when cached, otherwise a
byte-level fallback (UTF-8 bytes → ids 0–255, all inside GPT-2's vocabulary), announced on
stderr; a random model has no trained vocabulary to honour anyway.

Texts run through the model in batches, right-padded, with the attention mask passed to the
forward (so the Probe leaves padding out of the token Grams). A text longer than the model's
context is truncated with a warning, or cut into overlapping windows with ``stride``.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from isoprobe.hooks import Probe
from isoprobe.records import (
    NONFINITE,
    Record,
    csv_text,
    format_table,
    json_text,
    plot_records,
    theorem1_counts,
    to_csv,
)

__all__ = [
    "ByteTokenizer",
    "LoadedModel",
    "ModelLoadError",
    "TextProbeReport",
    "encode_texts",
    "hub_reachable",
    "load_gpt2",
    "load_model",
    "probe_texts",
    "read_texts",
    "run_gpt2",
    "run_inspect",
]

Notify = Callable[[str], None]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


class ModelLoadError(RuntimeError):
    """A model, tokenizer or dataset that cannot be loaded; the message says what to do."""


# ----------------------------------------------------------------------------- the Hub


def _offline_env() -> bool:
    flags = (os.environ.get(k, "") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(v.strip().lower() in ("1", "true", "yes", "on") for v in flags)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Can the Hub (``HF_ENDPOINT``, default huggingface.co) be reached? False when offline."""
    if _offline_env():
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


def _load(loader: Callable[..., Any], name: str, what: str, hint: str) -> Any:
    """``loader(name)`` from a local directory or the cache, else from the Hub if reachable."""
    try:
        return loader(name, local_files_only=True)
    except Exception as local_error:  # not cached (OSError), or not a checkpoint directory
        if Path(name).exists():
            raise ModelLoadError(f"cannot load {what} from {name!r}: {_first_line(local_error)}") from None
        if name.startswith((".", "~")) or os.sep in name:  # meant as a path, and there is none
            raise ModelLoadError(f"cannot load {what} from {name!r}: no such directory. {hint}") from None
    if not hub_reachable():
        raise ModelLoadError(
            f"cannot load {what} {name!r}: it is not in the local cache and the Hugging Face Hub "
            f"cannot be reached (offline). {hint}"
        )
    try:
        return loader(name)
    except Exception as error:
        raise ModelLoadError(f"cannot load {what} {name!r}: {_first_line(error)}. {hint}") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ----------------------------------------------------------------------------- tokenizers


class ByteTokenizer:
    """Byte-level fallback: the UTF-8 bytes of a text as ids 0–255 (GPT-2's first 256 ids)."""

    name = "byte-level fallback (UTF-8 bytes -> ids 0-255)"
    pad_id = 0
    max_length: int | None = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


class _HFTokenizer:
    """A transformers tokenizer seen through the same small interface as :class:`ByteTokenizer`."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.name = str(getattr(tokenizer, "name_or_path", type(tokenizer).__name__))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        limit = getattr(tokenizer, "model_max_length", None)
        self.max_length = limit if isinstance(limit, int) and limit < 10**7 else None

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, verbose=False))


def _usable(tokenizer: Any) -> bool:
    """transformers 5 builds an empty tokenizer from a directory without tokenizer files."""
    try:
        return len(tokenizer.encode("isometry test", verbose=False)) > 0
    except Exception:
        return False


def _local_tokenizer(names: Sequence[str]) -> _HFTokenizer | None:
    from transformers import AutoTokenizer

    for name in names:
        try:
            tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
        except Exception:
            continue
        if _usable(tok):
            return _HFTokenizer(tok)
    return None


# ----------------------------------------------------------------------------- models


@dataclass
class LoadedModel:
    """A model ready to probe, its tokenizer, a description, and its context length (or None)."""

    model: nn.Module
    tokenizer: ByteTokenizer | _HFTokenizer
    name: str
    context: int | None
    device: torch.device


def resolve_device(device: str) -> torch.device:
    """``"auto"`` (cuda if available, else cpu), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ..."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"unknown device {device!r}: {error}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available; use --device cpu")
    return dev


def _dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]


def _context(config: Any, tokenizer: ByteTokenizer | _HFTokenizer) -> int | None:
    limits = [getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None),
              tokenizer.max_length]
    limits = [v for v in limits if isinstance(v, int) and v > 0]
    return min(limits) if limits else None


def _prepare(model: nn.Module, device: torch.device, dtype: str) -> nn.Module:
    return model.to(device=device, dtype=_dtype(dtype)).eval()


def load_gpt2(
    model: str = "gpt2",
    init: str = "pretrained",
    seed: int = 0,
    device: str = "cpu",
    dtype: str = "float32",
    notify: Notify = _stderr,
) -> LoadedModel:
    """A GPT-2 language model (``transformer.h.N.ln_1``, ``ln_2``, ``mlp.act``, ``ln_f``).

    ``init="pretrained"``: weights of ``model`` (``"gpt2"``, a Hub id or a local path);
    ``init="random"``: GPT-2 small's config (or ``model``'s, for another name) with random
    weights seeded by ``seed``; needs no network.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config

    if init not in ("pretrained", "random"):
        raise ValueError(f"init must be 'pretrained' or 'random', got {init!r}")
    dev = resolve_device(device)
    _dtype(dtype)
    hint = ("Use --init random for a random-init GPT-2 small (no download), or --model PATH for a "
            "checkpoint directory saved with save_pretrained.")
    if init == "pretrained":
        net = _load(AutoModelForCausalLM.from_pretrained, model, "pretrained model", hint)
        name = f"{model} (pretrained)"
    else:
        config = GPT2Config() if model == "gpt2" else _load(AutoConfig.from_pretrained, model, "config", hint)
        torch.manual_seed(seed)
        net = AutoModelForCausalLM.from_config(config)
        name = f"{model} (random init, seed {seed})"
    tokenizer = _local_tokenizer([model] + (["gpt2"] if model != "gpt2" else []))
    if tokenizer is None and init == "pretrained" and not Path(model).exists() and hub_reachable():
        tokenizer = _HFTokenizer(_load(_auto_tokenizer, model, "tokenizer", hint))
    if tokenizer is None:
        if net.config.vocab_size < 256:
            raise ModelLoadError(f"no tokenizer for {model!r} and its vocabulary ({net.config.vocab_size}) "
                                 "is too small for the byte-level fallback")
        tokenizer = ByteTokenizer()
        notify(f"note: no cached tokenizer for {model!r}: using the {tokenizer.name}")
    net = _prepare(net, dev, dtype)
    return LoadedModel(net, tokenizer, name, _context(net.config, tokenizer), dev)


def _auto_tokenizer(name: str, **kwargs: Any) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name, **kwargs)


def load_model(model: str, device: str = "cpu", dtype: str = "float32") -> LoadedModel:
    """Any transformers ``AutoModel`` (BERT, GPT-2, Llama-style, ...) and its own tokenizer."""
    from transformers import AutoModel

    dev = resolve_device(device)
    _dtype(dtype)
    hint = "Use --model PATH for a checkpoint directory saved with save_pretrained."
    net = _load(AutoModel.from_pretrained, model, "model", hint)
    tokenizer = _local_tokenizer([model])
    if tokenizer is None:
        tok = _load(_auto_tokenizer, model, "tokenizer", hint)
        if not _usable(tok):
            raise ModelLoadError(f"{model!r} has no tokenizer files: save its tokenizer next to it")
        tokenizer = _HFTokenizer(tok)
    net = _prepare(net, dev, dtype)
    return LoadedModel(net, tokenizer, model, _context(net.config, tokenizer), dev)


# ----------------------------------------------------------------------------- texts


def read_texts(
    texts: Sequence[str] = (),
    text_files: Sequence[str | Path] = (),
    dataset: str | None = None,
    split: str = "train",
    column: str = "text",
    limit: int = 16,
) -> list[str]:
    """Texts from ``--text`` values, ``--text-file`` files (paragraphs separated by blank lines
    are separate texts) and a ``datasets`` dataset (``column`` of the first ``limit`` rows of
    ``split``; ``dataset`` is a Hub name, a local dataset directory or a csv/json/parquet/txt
    file). An empty text is an error."""
    out = list(texts)
    for path in text_files:
        try:
            content = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"cannot read text file {str(path)!r}: {error}") from None
        paragraphs = [p.strip() for p in content.replace("\r\n", "\n").split("\n\n")]
        if not any(paragraphs):
            raise ValueError(f"text file {str(path)!r} is empty")
        out += [p for p in paragraphs if p]
    if dataset is not None:
        out += _dataset_texts(dataset, split, column, limit)
    if not out:
        raise ValueError("no text given: use --text, --text-file or --dataset")
    for i, text in enumerate(out):
        if not text.strip():
            raise ValueError(f"text {i + 1} is empty")
    return out


_DATA_FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}


def _dataset_texts(name: str, split: str, column: str, limit: int) -> list[str]:
    import datasets

    if limit < 1:
        raise ValueError(f"--limit must be at least 1, got {limit}")
    path = Path(name)
    try:
        if path.is_file():
            if path.suffix not in _DATA_FORMATS:
                known = ", ".join(_DATA_FORMATS)
                raise ValueError(f"unknown data file type {path.suffix!r}; use one of {known}")
            data = datasets.load_dataset(_DATA_FORMATS[path.suffix], data_files=str(path), split=split)
        elif path.is_dir():
            data = datasets.load_from_disk(str(path))
            data = data[split] if isinstance(data, datasets.DatasetDict) else data
        else:
            if not hub_reachable():
                raise ModelLoadError(
                    f"cannot load dataset {name!r}: the Hugging Face Hub cannot be reached (offline). "
                    "Give a local data file (csv/json/parquet/txt) or a directory saved with save_to_disk."
                )
            data = datasets.load_dataset(name, split=split)
    except (ValueError, ModelLoadError):
        raise
    except Exception as error:
        message = f"cannot load dataset {name!r} (split {split!r}): {_first_line(error)}"
        raise ModelLoadError(message) from None
    if column not in data.column_names:
        columns = ", ".join(data.column_names)
        raise ValueError(f"dataset {name!r} has no column {column!r}; columns: {columns}")
    rows = data.select(range(min(limit, len(data))))[column]
    return [str(t) for t in rows if str(t).strip()]


def encode_texts(
    tokenizer: ByteTokenizer | _HFTokenizer,
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
            notify(f"note: text {i + 1} is a single token: a token Gram needs at least 2, "
                   "so its records are reported as undefined")
        if context is None or len(ids) <= context:
            sequences.append(ids)
        elif stride is None:
            notify(f"warning: text {i + 1} has {len(ids)} tokens, more than the context of {context}: "
                   f"truncated to {context} (use --stride to probe it in windows)")
            sequences.append(ids[:context])
        else:
            starts = list(range(0, len(ids) - context + 1, stride))
            if starts[-1] + context < len(ids):
                starts.append(len(ids) - context)
            sequences += [ids[s : s + context] for s in starts]
    return sequences


# ----------------------------------------------------------------------------- probing


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


def probe_texts(
    loaded: LoadedModel,
    texts: Sequence[str],
    *,
    sites: str | Sequence[str] | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    train_mode: bool = False,
    seed: int = 0,
    gram_dtype: torch.dtype = torch.float64,
    notify: Notify = _stderr,
) -> TextProbeReport:
    """Run ``loaded.model`` on ``texts`` under a token-view :class:`Probe`.

    ``train_mode`` runs with dropout on (as the paper's GPT-2 notebook did; seeded by
    ``seed``); eval mode is the default.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    sequences = encode_texts(loaded.tokenizer, texts, loaded.context, stride, notify)
    model = loaded.model
    model.train(train_mode)
    torch.manual_seed(seed)
    with torch.no_grad(), Probe(model, sites=sites, gram_dtype=gram_dtype) as probe:
        for start in range(0, len(sequences), batch_size):
            ids, mask = _pad(sequences[start : start + batch_size], loaded.tokenizer.pad_id, loaded.device)
            try:
                model(input_ids=ids, attention_mask=mask)
            except Exception as error:
                raise ValueError(f"the model's forward failed on the texts: {_first_line(error)}") from None
    records = probe.records
    bad = sorted({r.site for r in records if r.flag == NONFINITE})
    if bad:
        notify(f"warning: non-finite activations (NaN/inf) at {len(bad)} sites, first {bad[0]!r}: "
               "their records are flagged 'non-finite'")
    return TextProbeReport(loaded.name, [len(s) for s in sequences], records)


def _pad(batch: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, s in enumerate(batch):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def _emit(report: TextProbeReport, fmt: str, out: str | Path | None, plot: str | Path | None,
          notify: Notify) -> str:
    """Write ``--out``/``--plot`` files; return what goes to stdout in ``fmt``."""
    title = f"isometry gap along depth: {report.model}"
    table = format_table(report.records)
    t1 = report.theorem1
    footer = (f"Theorem 1 (I(normalized) >= I(centered) * norm-variation factor): "
              + (f"{t1['checked'] - t1['violations']}/{t1['checked']} checks held" if t1["checked"]
                 else "nothing to check (no sequence of at least 2 tokens)"))
    count = len(report.tokens)
    header = (f"model: {report.model}; {count} sequence{'s' * (count != 1)}, "
              f"{sum(report.tokens)} tokens")
    text_table = f"{header}\n{table}\n{footer}"
    if out is not None:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "table.txt").write_text(text_table + "\n")
        to_csv(report.records, folder / "records.csv")
        (folder / "records.json").write_text(report.json())
        plot_records(report.records, folder / "plot.png", title)
        notify(f"wrote table.txt, records.csv, records.json and plot.png to {folder}")
    if plot is not None:
        plot_records(report.records, plot, title)
        notify(f"wrote {plot}")
    if fmt == "json":
        return report.json()
    if fmt == "csv":
        return csv_text(report.records).rstrip("\n")
    if fmt != "table":
        raise ValueError(f"format must be table, json or csv; got {fmt!r}")
    return text_table


def _sites_option(sites: str | None) -> list[str] | None:
    if sites is None:
        return None
    parts = [s.strip() for s in sites.split(",") if s.strip()]
    if not parts:
        raise ValueError("--sites is empty: give norm, activation or globs, comma-separated")
    return parts


def run_gpt2(
    *,
    texts: Sequence[str] = (),
    text_files: Sequence[str] = (),
    model: str = "gpt2",
    init: str = "pretrained",
    seed: int = 0,
    device: str = "cpu",
    dtype: str = "float32",
    sites: str | None = None,
    out: str | None = None,
    fmt: str = "table",
    plot: str | None = None,
    train_mode: bool = False,
    stride: int | None = None,
    batch_size: int = 8,
    gram_dtype: str = "float64",
    notify: Notify = _stderr,
) -> str:
    """The ``isoprobe gpt2`` job: probe GPT-2 on texts; returns what the command prints."""
    text_list = read_texts(texts, text_files)
    loaded = load_gpt2(model, init, seed, device, dtype, notify)
    report = probe_texts(loaded, text_list, sites=_sites_option(sites), stride=stride,
                         batch_size=batch_size, train_mode=train_mode, seed=seed,
                         gram_dtype=_gram_dtype(gram_dtype), notify=notify)
    return _emit(report, fmt, out, plot, notify)


def run_inspect(
    *,
    model: str,
    texts: Sequence[str] = (),
    text_files: Sequence[str] = (),
    dataset: str | None = None,
    split: str = "train",
    column: str = "text",
    limit: int = 16,
    device: str = "cpu",
    dtype: str = "float32",
    sites: str | None = None,
    out: str | None = None,
    fmt: str = "table",
    plot: str | None = None,
    train_mode: bool = False,
    stride: int | None = None,
    batch_size: int = 8,
    gram_dtype: str = "float64",
    notify: Notify = _stderr,
) -> str:
    """The ``isoprobe inspect`` job: probe any AutoModel on texts; returns what it prints."""
    text_list = read_texts(texts, text_files, dataset, split, column, limit)
    loaded = load_model(model, device, dtype)
    report = probe_texts(loaded, text_list, sites=_sites_option(sites), stride=stride,
                         batch_size=batch_size, train_mode=train_mode,
                         gram_dtype=_gram_dtype(gram_dtype), notify=notify)
    return _emit(report, fmt, out, plot, notify)


def _gram_dtype(name: str) -> torch.dtype:
    choices = {"float64": torch.float64, "float32": torch.float32}
    if name not in choices:
        raise ValueError(f"gram dtype must be float64 or float32, got {name!r}")
    return choices[name]
