"""Models, tokenizers and texts for the text probes, offline-aware (loading only; the
``gpt2``/``inspect`` jobs that probe them and write the output are :mod:`isoprobe.jobs`).

Loading never waits on an unreachable Hub: a name is looked up in the local cache first; the
Hub is asked only when it answers (a 3-second connection test, skipped when ``HF_HUB_OFFLINE``
or ``TRANSFORMERS_OFFLINE`` is set). Whatever cannot be loaded raises :class:`ModelLoadError`
with what to do instead (``--init random``, ``--model PATH``).

``--init random`` builds GPT-2 small (``GPT2Config()``, or the config of ``--model`` when it is
a path or cached id) seeded by ``--seed``. Its tokenizer is GPT-2's own when cached, otherwise a
byte-level fallback (UTF-8 bytes → ids 0–255, all inside GPT-2's vocabulary), announced on
stderr; a random model has no trained vocabulary to honour anyway.

A loaded model carries a display name for titles and headers: its Hub id, or for a local path
the checkpoint folder's own name (a generic folder name such as ``model`` is replaced by its
parent's) with the architecture and layer count, never the whole path.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from isoprobe.placement import input_device

__all__ = [
    "ByteTokenizer",
    "LoadedModel",
    "ModelLoadError",
    "display_name",
    "hub_reachable",
    "load_gpt2",
    "load_model",
    "random_like",
    "read_texts",
    "resolve_device",
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


def _import_torchvision() -> None:
    import torchvision  # noqa: F401


def check_torchvision() -> None:
    """A clear :class:`ModelLoadError` where torchvision is installed but cannot be imported.

    transformers imports torchvision, when it is installed, to build its model classes; a
    torchvision built for another torch (PyPI's CUDA build of torchvision 0.28 beside a CPU torch
    2.13: its operators fail to register) then breaks every model with a long traceback."""
    if importlib.util.find_spec("torchvision") is None:
        return
    try:
        _import_torchvision()
    except Exception as error:
        raise ModelLoadError(
            f"torchvision is installed but cannot be imported ({first_line(error)}), and transformers "
            f"imports it to build models: uninstall it (pip uninstall torchvision) or install the "
            f"torchvision built for torch {torch.__version__}"
        ) from None


def _load(loader: Callable[..., Any], name: str, what: str, hint: str) -> Any:
    """``loader(name)`` from a local directory or the cache, else from the Hub if reachable."""
    try:
        return loader(name, local_files_only=True)
    except Exception as local_error:  # not cached (OSError), or not a checkpoint directory
        if Path(name).is_dir() and not (Path(name) / "config.json").is_file():
            raise ModelLoadError(
                f"cannot load {what} from {name!r}: the folder has no config.json, so it is not a "
                "transformers checkpoint (save one with model.save_pretrained(PATH), which writes "
                "config.json and the weights)"
            ) from None
        if Path(name).exists():
            raise ModelLoadError(f"cannot load {what} from {name!r}: {first_line(local_error)}") from None
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
        raise ModelLoadError(f"cannot load {what} {name!r}: {first_line(error)}. {hint}") from None


def first_line(error: BaseException) -> str:
    """The first line of ``error``'s message (its type's name when the message is empty)."""
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


class HFTokenizer:
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
    """Does ``tokenizer`` know any word? transformers 5 builds an empty tokenizer from a directory
    without tokenizer files: it encodes nothing, or only its unknown token (a BERT folder saved
    without its vocabulary makes every word ``[UNK]``, so the Grams would see positions only)."""
    try:
        ids = tokenizer.encode("isometry test", add_special_tokens=False, verbose=False)
    except Exception:
        return False
    unknown = getattr(tokenizer, "unk_token_id", None)
    return any(i != unknown for i in ids)


def _local_tokenizer(names: Sequence[str]) -> HFTokenizer | None:
    from transformers import AutoTokenizer

    for name in names:
        try:
            tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
        except Exception:
            continue
        if _usable(tok):
            return HFTokenizer(tok)
    return None


# ----------------------------------------------------------------------------- models


@dataclass
class LoadedModel:
    """A model ready to probe, its tokenizer, a description, and its context length (or None)."""

    model: nn.Module
    tokenizer: ByteTokenizer | HFTokenizer
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


def _context(config: Any, tokenizer: ByteTokenizer | HFTokenizer) -> int | None:
    limits = [
        getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None),
        tokenizer.max_length,
    ]
    limits = [v for v in limits if isinstance(v, int) and v > 0]
    return min(limits) if limits else None


def _prepare(model: nn.Module, device: torch.device, dtype: str) -> nn.Module:
    return model.to(device=device, dtype=_dtype(dtype)).eval()


_GENERIC_DIRS = {
    "model",
    "models",
    "checkpoint",
    "checkpoints",
    "final",
    "weights",
    "pretrained",
    "hf",
    "snapshots",
    "main",
    "output",
    "outputs",
}


def display_name(model: str, net: nn.Module) -> str:
    """A short name for ``model`` (what the user passed): a Hub id as given; a local path as
    ``"folder (Architecture, L layers)"``, where a generic folder name (``model``, a checkpoint
    hash, ...) is replaced by its parent's."""
    path = Path(model)
    if not path.exists():
        return model
    parts = [p for p in path.resolve().parts if p not in ("/", "")]
    name = next((p for p in reversed(parts) if not _generic(p)), parts[-1] if parts else model)
    config = getattr(net, "config", None)
    arch = (getattr(config, "architectures", None) or [type(net).__name__])[0]
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    return f"{name} ({arch}" + (f", {layers} layers)" if layers else ")")


def _generic(folder: str) -> bool:
    return (
        folder.lower() in _GENERIC_DIRS
        or re.fullmatch(r"[0-9a-f]{16,}", folder) is not None
        or re.fullmatch(r"checkpoint-\d+", folder) is not None
    )


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
    check_torchvision()
    from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config

    if init not in ("pretrained", "random"):
        raise ValueError(f"init must be 'pretrained' or 'random', got {init!r}")
    dev = resolve_device(device)
    _dtype(dtype)
    hint = (
        "Use --init random for a random-init GPT-2 small (no download), or --model PATH for a "
        "checkpoint directory saved with save_pretrained."
    )
    if init == "pretrained":
        _check_gpt2_family(_load(AutoConfig.from_pretrained, model, "pretrained model", hint), model)
        net = _load(AutoModelForCausalLM.from_pretrained, model, "pretrained model", hint)
        name = f"{display_name(model, net)} (pretrained)"
    else:
        config = GPT2Config() if model == "gpt2" else _load(AutoConfig.from_pretrained, model, "config", hint)
        _check_gpt2_family(config, model)
        torch.manual_seed(seed)
        net = AutoModelForCausalLM.from_config(config)
        name = f"{display_name(model, net)} (random init, seed {seed})"
    tokenizer = _local_tokenizer([model] + (["gpt2"] if model != "gpt2" else []))
    if tokenizer is None and init == "pretrained" and not Path(model).exists() and hub_reachable():
        tokenizer = HFTokenizer(_load(_auto_tokenizer, model, "tokenizer", hint))
    if tokenizer is None:
        if net.config.vocab_size < 256:
            raise ModelLoadError(
                f"no tokenizer for {model!r} and its vocabulary ({net.config.vocab_size}) "
                "is too small for the byte-level fallback"
            )
        tokenizer = ByteTokenizer()
        notify(f"note: no cached tokenizer for {model!r}: using the {tokenizer.name}")
    net = _prepare(net, dev, dtype)
    return LoadedModel(net, tokenizer, name, _context(net.config, tokenizer), dev)


#: ``model_type`` of the GPT-2 family: GPT-2 and DistilGPT2 (whose config is a GPT-2 config)
GPT2_MODEL_TYPES = ("gpt2",)


def _check_gpt2_family(config: Any, model: str) -> None:
    """``ModelLoadError`` unless ``config`` is a GPT-2-family config (``model_type`` ``"gpt2"``:
    GPT-2 in all sizes, DistilGPT2, GPT-2 fine-tunes), checked before any weights load."""
    model_type = getattr(config, "model_type", None)
    if model_type in GPT2_MODEL_TYPES:
        return
    arch = ", ".join(getattr(config, "architectures", None) or []) or type(config).__name__
    raise ModelLoadError(
        f"--model {model!r} is not a GPT-2-family checkpoint (model_type {model_type!r}, {arch}): "
        "`isoprobe gpt2` probes GPT-2 and DistilGPT2 only, with their LM head; for any other "
        f"transformers model use `isoprobe inspect --model {model}`"
    )


def _auto_tokenizer(name: str, **kwargs: Any) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name, **kwargs)


def load_model(
    model: str, device: str = "cpu", dtype: str = "float32", split: dict[str, Any] | None = None
) -> LoadedModel:
    """Any transformers ``AutoModel`` (BERT, GPT-2, Llama-style, ...) and its own tokenizer.
    ``split``: ``from_pretrained`` keywords that place it over several devices with accelerate
    (:func:`isoprobe.placement.dispatch_options`); ``device`` is then unused."""
    check_torchvision()
    from transformers import AutoModel

    dev = resolve_device(device)
    _dtype(dtype)
    hint = "Use --model PATH for a checkpoint directory saved with save_pretrained."
    loader = AutoModel.from_pretrained if split is None else functools.partial(AutoModel.from_pretrained, **split)
    net = _load(loader, model, "model", hint)
    tokenizer = _local_tokenizer([model])
    if tokenizer is None:
        missing = ModelLoadError(
            f"{model!r} has no usable tokenizer files (none, or a vocabulary that makes every word "
            "unknown): save its tokenizer next to it (tokenizer.save_pretrained(PATH))"
        )
        if Path(model).is_dir():
            raise missing
        tok = _load(_auto_tokenizer, model, "tokenizer", hint)
        if not _usable(tok):
            raise missing
        tokenizer = HFTokenizer(tok)
    if split is None:
        net = _prepare(net, dev, dtype)
    else:
        net, dev = net.eval(), input_device(net)
    return LoadedModel(net, tokenizer, display_name(model, net), _context(net.config, tokenizer), dev)


def random_like(loaded: LoadedModel, seed: int = 0) -> LoadedModel:
    """The architecture of ``loaded`` (its class and config) with fresh random weights (the
    model's own initialisation, seeded by ``seed``), on the same device and dtype, with the same
    tokenizer and context: the baseline of a trained model (``isoprobe inspect --baseline random``)."""
    import copy

    net = loaded.model
    config = getattr(net, "config", None)
    if config is None:
        raise ValueError(f"{loaded.name}: no config to build a random-init baseline from")
    dtype = next(net.parameters()).dtype
    torch.manual_seed(seed)
    fresh = type(net)(copy.deepcopy(config)).to(device=loaded.device, dtype=dtype).eval()
    name = f"{loaded.name} (random init, seed {seed})"
    return LoadedModel(fresh, loaded.tokenizer, name, loaded.context, loaded.device)


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
        raise ValueError("no text given: use --text or --text-file (isoprobe inspect also reads --dataset)")
    for i, text in enumerate(out):
        if not text.strip():
            raise ValueError(f"text {i + 1} is empty")
    return out


def _is_text(feature: Any) -> bool:
    return getattr(feature, "dtype", None) in ("string", "large_string")


def _check_text_column(data: Any, name: str, column: str) -> None:
    """``ValueError`` naming the column and its type unless ``column`` holds strings."""
    features = data.features
    if _is_text(features[column]):
        return
    kind = getattr(features[column], "dtype", None) or type(features[column]).__name__
    texts = [c for c in data.column_names if _is_text(features[c])]
    raise ValueError(
        f"dataset {name!r}: column {column!r} holds {kind} values, not text"
        + (f"; text columns: {', '.join(texts)} (choose one with --column)" if texts else "; it has no text column")
    )


_DATA_FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}


def _dataset_texts(name: str, split: str, column: str, limit: int) -> list[str]:
    import datasets

    if limit < 1:
        raise ValueError(f"--limit must be at least 1, got {limit}")
    path = Path(name)
    if not path.exists() and (path.suffix.lower() in _DATA_FORMATS or name.startswith((".", "~", os.sep))):
        raise ValueError(f"--dataset {name!r}: no such file or folder")
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
        message = f"cannot load dataset {name!r} (split {split!r}): {first_line(error)}"
        raise ModelLoadError(message) from None
    if column not in data.column_names:
        columns = ", ".join(data.column_names)
        raise ValueError(f"dataset {name!r} has no column {column!r}; columns: {columns}")
    _check_text_column(data, name, column)
    rows = data.select(range(min(limit, len(data))))[column]
    return [str(t) for t in rows if str(t).strip()]
