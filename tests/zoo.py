"""The zoo: architectures that transformers ships, built tiny from their configs with random
weights, and the test's own oracle for which of their modules are norms and activations.

**Oracle** (independent of isoprobe). Every leaf module that ran is re-run on *its own captured
input* (other arguments as captured) and is

- an activation if permuting the input's entries permutes the output's (for the input, for it
  with rows rescaled to rms 100, where no eps can make a norm look linear, and for a Gaussian
  input of its shape) and a least-squares affine fit ``y ≈ a x + b`` over all entries of the
  three inputs (numpy, float64) leaves a residual above 1e-3 of the outputs' spread (the
  Gaussian input decides where the captured one is constant: BLIP's uniform attention
  probabilities at random init give an identity Dropout a constant input; the rms-100 one
  where the captured one is too small to leave the linear range: Inkling2's softcap
  ``c tanh(x / c)``);
- a norm if, not entrywise, scaling each row (along the last dimension, along the channel
  dimension 1 of an image-shaped input, or the whole item: GroupNorm), first brought to an rms
  of 100 so that an eps cannot matter, by its own factor in [0.5, 2] leaves the output
  unchanged (relative 1e-3; and relative 1e-2 at rms 1, where a softmax does not saturate as
  it does at rms 100), while noise of rms 10 added to those rows changes it (a map that
  ignores its input, PEGASUS-X's positional table, is no norm); rows of zeros (a zero input) are replaced by the Gaussian input's; a batch norm
  (an affine map in eval mode) counts as a norm.

Every call runs on a copy of the input (an in-place ReLU would overwrite it).

**Automatic builder.** :func:`build_auto` takes a model type of
``transformers.models.auto.modeling_auto.MODEL_MAPPING_NAMES``, shrinks its default config (the
common size attributes that exist on it, under the config's own names or its ``attribute_map``,
in it and in its sub-configs), builds the base model from config (random init, eval) and makes
an input from ``model.main_input_name``. Run as a script it sweeps model types and appends one
JSON line per type (built and checked, or skipped with its reason) to a file,
``python tests/zoo.py OUT.jsonl [TYPE ...]``, and ``python tests/zoo.py --commit OUT.jsonl
tests/data/zoo_sweep.json`` writes the file that ``test_zoo_sweep.py`` reads.
"""

from __future__ import annotations

import inspect
import json
import math
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from test_hooks import ref_stats
from torch import nn

from isoprobe import Probe
from isoprobe.records import EPS_DOMINATED


class RunCapture:
    """The first call of every leaf module: its arguments and output."""

    def __init__(self, model: nn.Module):
        self.calls: dict[str, tuple] = {}
        self.handles = [
            m.register_forward_hook(self._hook(n), with_kwargs=True)
            for n, m in model.named_modules()
            if not list(m.children())
        ]

    def _hook(self, name):
        def hook(module, args, kwargs, output):
            self.calls.setdefault(name, (module, args, kwargs, output))

        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def _close(a, b, rtol: float = 1e-3) -> bool:
    return a.shape == b.shape and bool((a - b).abs().max() <= rtol * b.abs().max().clamp_min(1e-12))


def truth_kind(module: nn.Module, args: tuple, kwargs: dict, output) -> str | None:
    """The oracle's classification of a leaf module from its captured call (module docstring)."""
    if not args or not isinstance(args[0], torch.Tensor) or not args[0].is_floating_point():
        return None
    x = args[0].detach()
    if isinstance(module, nn.modules.batchnorm._BatchNorm):  # eval mode: affine; a norm in training
        return "norm"
    if not isinstance(output, torch.Tensor) or output.shape != x.shape or x.numel() < 8:
        return None

    def f(z):
        with torch.no_grad():
            return module.forward(z.clone(), *args[1:], **kwargs).detach().double()  # in-place ReLU

    def rescaled(dims, z=x):  # rows along `dims` brought to rms 100: an eps cannot matter
        return 100 * z / z.square().mean(dims, keepdim=True).sqrt().clamp_min(1e-30)

    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(x.numel(), generator=gen)

    def entrywise(z, fz):
        return _close(f(z.flatten()[perm].view_as(z)).flatten(), fz.flatten()[perm])

    big = rescaled(x.ndim - 1)
    spread = x.std().clamp_min(1) * torch.randn(x.shape, generator=gen, dtype=x.dtype)  # x may be constant
    if all(entrywise(z, f(z)) for z in (x, big, spread)):
        xs = torch.cat([z.double().flatten() for z in (x, big, spread)]).numpy()
        ys = torch.cat([f(z).flatten() for z in (x, big, spread)]).numpy()
        design = np.stack([xs, np.ones_like(xs)], 1)
        resid = ys - design @ np.linalg.lstsq(design, ys, rcond=None)[0]
        return "activation" if np.sqrt(np.mean(resid**2)) > 1e-3 * ys.std() else None
    rows = [(x.ndim - 1,), (1,), tuple(range(1, x.ndim))] if x.ndim >= 3 else [(x.ndim - 1,)]
    for dims in rows:  # last dimension, channels, whole items (GroupNorm)
        big = rescaled(dims, x if bool((x.square().mean(dims) > 0).all()) else spread)  # no zero rows
        shape = [1 if d in dims else n for d, n in enumerate(x.shape)]
        factors = 0.5 + 1.5 * torch.rand(*shape, generator=gen, dtype=x.dtype)
        fixed = _close(f(big * factors), f(big)) and _close(f(big * factors / 100), f(big / 100), 1e-2)
        moved = not _close(f(big + 10 * torch.randn(x.shape, generator=gen, dtype=x.dtype)), f(big))
        if fixed and moved:
            return "norm"
    return None


_TOL = math.sqrt(np.finfo(np.float64).eps)


def theorem1_expected(record, call) -> bool | None:
    """The test's own Theorem 1 verdict for one Gram (numpy float64 eigenvalues): ``True`` if the
    normalised items ``x_c / sqrt(var + eps)`` meet the bound ``gap_c - log factor`` (rounding
    tolerance sqrt(float64 eps) · max(1, gap_c)), ``None`` if only the exact projection
    ``x_c / ‖x_c‖`` does (eps-dominated), ``False`` if neither. OLMo's LayerNorm keeps its eps,
    1e-5, inside its forward; whether a norm centres is read off its behaviour."""
    module, args, kwargs = call[0], call[1], call[2]
    eps = next((getattr(module, a) for a in ("eps", "variance_epsilon") if hasattr(module, a)), 1e-5)
    x = args[0].detach().double()
    if record.view == "token":
        rows = x[record.item]
    elif record.view == "sample":
        rows = x.reshape(x.shape[0], -1)
    else:  # feature view: a batch norm's channels
        rows = x.transpose(0, 1).reshape(x.shape[1], -1)
    if centres(module, args, kwargs):
        rows = rows - rows.mean(-1, keepdim=True)
    X = rows.numpy()
    a = np.linalg.norm(X, axis=1)
    gap_c = ref_stats(X)[0]
    limit = gap_c - (np.log(np.mean(a**2)) - 2 * np.log(np.mean(a))) + _TOL * max(1.0, abs(gap_c))
    if ref_stats(X / np.sqrt((X**2).mean(1, keepdims=True) + eps))[0] <= limit:
        return True
    return None if ref_stats(X / a[:, None])[0] <= limit else False


def centres(module, args, kwargs) -> bool:
    """Does the norm subtract the mean: is its output unchanged when a constant is added to every
    entry (input at rms 100 so that eps cannot matter)? A batch norm does (batch statistics)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return True
    x = args[0].detach()
    big = 100 * x / x.square().mean().sqrt().clamp_min(1e-30)
    with torch.no_grad():
        return _close(module.forward(big + 100, *args[1:], **kwargs), module.forward(big, *args[1:], **kwargs))


def check(model: nn.Module, batch: dict) -> dict:
    """One forward under the Probe and a :class:`RunCapture`: the oracle's norms/activations,
    what the Probe recorded (``missed``/``extra`` against the oracle, ``above``: module sites
    that are no leaf module that ran; ``functional``: the functional sites), and its Theorem 1 verdicts at the first call of each norm against
    :func:`theorem1_expected` (``theorem1_differs``; ``failed``: Grams where the theorem itself
    fails; ``eps_dominated``: Grams where only the exact projection meets the bound)."""
    capture = RunCapture(model)
    try:
        with torch.no_grad(), Probe(model) as probe:
            model(**batch)
    finally:
        capture.close()
    truth = {n: k for n, call in capture.calls.items() if (k := truth_kind(*call))}
    recorded = {r.site: r.kind for r in probe.records}
    leaf = {n: k for n, k in recorded.items() if n in capture.calls}
    checks = [
        r
        for r in probe.records
        if r.point == "normalized" and r.theorem1_bound is not None and r.call == 0 and r.site in capture.calls
    ]
    got = {(r.site, str(r.item)): (r.theorem1_holds, r.flag) for r in checks}
    expected = {}
    for r in checks:
        verdict = theorem1_expected(r, capture.calls[r.site])
        expected[r.site, str(r.item)] = (verdict, EPS_DOMINATED if verdict is None else None)
    kinds = list(truth.values())

    def described(names):
        return sorted(f"{n} ({type(capture.calls[n][0]).__name__}: {truth.get(n) or leaf.get(n)})" for n in names)

    return {
        "norms": kinds.count("norm"),
        "activations": kinds.count("activation"),
        "missed": described(set(truth) - set(leaf)),
        "extra": described(set(leaf) - set(truth)),
        "wrong_kind": sorted(n for n in set(truth) & set(leaf) if truth[n] != leaf[n]),
        "above": sorted(n for n in set(recorded) - set(leaf) if ":" not in n),
        "functional": sorted(n for n in recorded if ":" in n),  # functional sites (isoprobe.calls)
        "theorem1_holds": sum(1 for v, _ in expected.values() if v),
        "eps_dominated": sum(1 for v, _ in expected.values() if v is None),
        "failed": sorted({site for (site, _), (v, _) in expected.items() if v is False}),
        "theorem1_differs": sorted(f"{k}: Probe {got[k]}, test {v}" for k, v in expected.items() if got[k] != v),
    }


# ---------------------------------------------------------------------------------------------
# The automatic builder

WIDTH, FFN, LAYERS, HEADS, KV_HEADS, VOCAB, POSITIONS = 32, 64, 2, 4, 2, 128, 64
_SIZES = {  # attribute (own or through attribute_map) -> tiny value
    **dict.fromkeys(("hidden_size", "d_model", "n_embd", "embed_dim", "word_embed_proj_dim"), WIDTH),
    **dict.fromkeys(("intermediate_size", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim", "d_ff"), FFN),
    **dict.fromkeys(("n_inner", "moe_intermediate_size", "shared_expert_intermediate_size"), FFN),
    **dict.fromkeys(("num_hidden_layers", "num_layers", "encoder_layers", "decoder_layers"), LAYERS),
    **dict.fromkeys(("num_encoder_layers", "num_decoder_layers", "n_layer", "n_layers"), LAYERS),
    **dict.fromkeys(("num_attention_heads", "encoder_attention_heads", "decoder_attention_heads"), HEADS),
    **dict.fromkeys(("num_heads", "n_head", "n_heads"), HEADS),
    **dict.fromkeys(("num_key_value_heads", "num_kv_heads", "multi_query_group_num"), KV_HEADS),
    "head_dim": WIDTH // HEADS,
    **dict.fromkeys(("q_lora_rank", "kv_lora_rank"), 16),  # multi-head latent attention (DeepSeek)
    **dict.fromkeys(("qk_rope_head_dim", "qk_nope_head_dim", "index_head_dim"), WIDTH // HEADS),
    **dict.fromkeys(("v_head_dim",), WIDTH // HEADS),
    **dict.fromkeys(("index_n_heads",), HEADS),
    **dict.fromkeys(("out_hidden_size",), WIDTH),  # a vision tower's merger into the text width
    "kv_channels": WIDTH // HEADS,
    "vocab_size": VOCAB,
    **dict.fromkeys(
        ("max_position_embeddings", "n_positions", "max_target_positions", "max_source_positions"), POSITIONS
    ),
    **dict.fromkeys(("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"), 4),
    **dict.fromkeys(("num_experts_per_tok", "moe_k", "top_k"), 2),
    "image_size": 32,
    "patch_size": 4,
    "rotary_dim": WIDTH // HEADS // 2,
    "projection_dim": WIDTH,
    "window_size": 2,
    "num_conv_pos_embeddings": 16,
}
_LISTS = {  # per-stage lists (ResNet, ConvNeXt, Swin, ...): same length, tiny entries
    "depths": lambda n: [1] * n,
    "hidden_sizes": lambda n: [16 * 2**i for i in range(n)],
    "embed_dims": lambda n: [16 * 2**i for i in range(n)],
    "num_heads": lambda n: [1] * n,
    "conv_dim": lambda n: [WIDTH] * n,
}
_STAGED_KEEP = {"hidden_size", "num_hidden_layers", "num_layers", "num_stages"}
_TOKEN_ATTRS = ("_token_id", "_token_index")
_MAX_PARAMETERS = 2_000_000


def _attributes(config) -> set[str]:
    return set(vars(config)) | set(getattr(config, "attribute_map", {}))


def shrink(config, vocab: int = VOCAB):
    """``config`` with its size attributes (and those of its sub-configs) made tiny, and every
    token id/index that would not fit the tiny vocabulary moved into it."""
    from transformers import PretrainedConfig

    names = _attributes(config)
    depths = getattr(config, "depths", None) if "depths" in names else None
    staged = isinstance(depths, (list, tuple)) and len(depths) > 1  # ResNet, ConvNeXt, Swin, ...
    for name, value in _SIZES.items():
        if staged and name in _STAGED_KEEP:  # counts and widths that follow from the stages
            continue
        current = getattr(config, name, None) if name in names else None
        if isinstance(current, int) and not isinstance(current, bool):
            setattr(config, name, 64 if staged and name == "image_size" else value)
    for name, make in _LISTS.items():
        current = getattr(config, name, None) if name in names else None
        if isinstance(current, (list, tuple)) and current and all(isinstance(v, int) for v in current):
            setattr(config, name, make(len(current)))
    if staged and isinstance(getattr(config, "hidden_size", None), int):
        widths = getattr(config, "hidden_sizes", None)
        width = getattr(config, "embed_dim", WIDTH) * 2 ** (len(depths) - 1)
        config.hidden_size = widths[-1] if isinstance(widths, (list, tuple)) else width
    spare = iter(range(vocab - 1, vocab // 2, -1))
    for name in sorted(names):
        value = getattr(config, name, None)
        if name.endswith(_TOKEN_ATTRS) and isinstance(value, int) and value >= vocab:
            setattr(config, name, next(spare))
    for name in sorted(vars(config)):
        if isinstance(getattr(config, name), PretrainedConfig):
            shrink(getattr(config, name), vocab)
    return config


def _image_size(config) -> int:
    size = getattr(config, "image_size", 32)
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def _inputs(config, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """One batch of two of every input kind the builder knows, sized from ``config``."""
    vocab = getattr(config, "vocab_size", VOCAB) or VOCAB
    ids = torch.randint(1, min(vocab, VOCAB), (2, 12), generator=gen)
    vision = getattr(config, "vision_config", None) or config
    size, channels = _image_size(vision), getattr(vision, "num_channels", 3)
    bins = getattr(config, "num_mel_bins", 80)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "decoder_input_ids": ids[:, :7],
        "pixel_values": torch.randn(2, channels, size, size, generator=gen),
        "input_values": torch.randn(2, 1600, generator=gen),
        "input_features": torch.randn(2, bins, 2 * getattr(config, "max_source_positions", 30), generator=gen),
    }


def make_input(model: nn.Module, config, extra: bool = False) -> dict:
    """A batch of two for ``model.main_input_name`` (with the attention mask, and the decoder's ids
    for an encoder-decoder); ``extra``: every other known input the forward accepts as well."""
    accepted = inspect.signature(model.forward).parameters
    main = model.main_input_name
    inputs = _inputs(config, torch.Generator().manual_seed(1))
    if main not in inputs:
        raise NotImplementedError(f"no input for main_input_name {main!r}")
    wanted = {main} | ({"attention_mask"} if main == "input_ids" else set())
    if getattr(config, "is_encoder_decoder", False):
        wanted.add("decoder_input_ids")
    if extra:
        wanted |= set(inputs) - {"decoder_input_ids"}
    return {k: v for k, v in inputs.items() if k in wanted and k in accepted}


def base_models() -> dict[str, str]:
    """Model type -> base model class name, for every type transformers ships."""
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    return {t: (c[0] if isinstance(c, (tuple, list)) else c) for t, c in MODEL_MAPPING_NAMES.items()}


def build_auto(model_type: str) -> tuple[nn.Module, object]:
    """The tiny base model of ``model_type`` (random init, eval) and its config (module docstring)."""
    import transformers
    from transformers import AutoConfig

    config = shrink(AutoConfig.for_model(model_type))
    model_cls = getattr(transformers, base_models()[model_type])
    with torch.device("meta"):
        count = sum(p.numel() for p in model_cls(config).parameters())
    if count > _MAX_PARAMETERS:
        raise MemoryError(f"{count:,} parameters after shrinking (limit {_MAX_PARAMETERS:,})")
    torch.manual_seed(0)
    return model_cls(config).eval(), config


def run_once(model: nn.Module, config) -> dict:
    """One plain forward on :func:`make_input`'s batch, else on the batch with every known input
    the forward accepts (CLIP needs pixels and ids); the batch that ran (the first error if none)."""
    batch = make_input(model, config)
    try:
        with torch.no_grad():
            model(**batch)
        return batch
    except Exception as error:
        fuller = make_input(model, config, extra=True)
        if set(fuller) == set(batch):
            raise
        try:
            with torch.no_grad():
                model(**fuller)
        except Exception:
            raise error from None
        return fuller


class _Timeout(Exception):
    pass


def _alarm(_signum, _frame):
    raise _Timeout


def sweep_one(model_type: str, limit_s: float) -> dict:
    """Build, run and check one model type within ``limit_s`` seconds: a result row."""
    row: dict = {"type": model_type, "model": base_models()[model_type]}
    start = time.perf_counter()
    signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, limit_s)
    stage = "build"
    try:
        model, config = build_auto(model_type)
        row["build_s"] = round(time.perf_counter() - start, 3)
        stage = "forward"
        batch = run_once(model, config)
        row["forward_s"] = round(time.perf_counter() - start - row["build_s"], 3)
        stage = "probe"
        row |= check(model, batch)
        row["status"] = "checked"
    except _Timeout:
        row |= {"status": "skipped", "stage": stage, "reason": f"over {limit_s:g} s"}
    except Exception as error:  # a skip reason: the exception type and its first line
        first = (str(error).strip().splitlines() or [""])[0][:200]
        row |= {"status": "skipped" if stage != "probe" else "probe-error", "stage": stage}
        row["reason"] = f"{type(error).__name__}: {first}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    row["seconds"] = round(time.perf_counter() - start, 3)
    return row


def _worker(out: str, types: list[str]) -> None:
    import transformers

    torch.set_num_threads(1)
    sweep_one("gpt2", limit_s=60.0)  # imports shared by every model, not timed with the first
    with open(out, "a") as sink:
        for model_type in types:
            row = sweep_one(model_type, limit_s=30.0) | {"transformers": transformers.__version__}
            sink.write(json.dumps(row) + "\n")
            sink.flush()


def commit(scratch: str, out: str) -> None:
    """The sweep's rows of ``scratch`` (JSON lines; the last row of a type wins), by type, as the
    JSON file ``out`` with the versions they were made with."""
    import platform

    import transformers

    with open(scratch) as lines:
        rows = {row["type"]: row for row in map(json.loads, lines)}
    versions = {row.pop("transformers", None) for row in rows.values()} - {None}
    assert versions <= {transformers.__version__}, f"rows of several transformers versions: {versions}"
    document = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "made_with": "python tests/zoo.py SCRATCH.jsonl && python tests/zoo.py --commit SCRATCH.jsonl OUT",
        "rows": [rows[t] for t in sorted(rows)],
    }
    rows_text = ",\n".join(f"  {json.dumps(row)}" for row in document.pop("rows"))  # a row a line
    Path(out).write_text(json.dumps(document, indent=1)[:-2] + f',\n "rows": [\n{rows_text}\n ]\n}}\n')


def _types_in(path: str) -> set[str]:
    """The model types that the JSON-lines file ``path`` has rows for (none if it is missing)."""
    try:
        with open(path) as lines:
            return {json.loads(line)["type"] for line in lines}
    except FileNotFoundError:
        return set()


def main(argv: list[str], chunk: int = 40) -> None:
    """``OUT.jsonl --worker TYPE ...``: sweep those types in this process. ``OUT.jsonl [TYPE ...]``:
    sweep them (default: every type) in worker processes of ``chunk`` types each, resuming after
    the types already in OUT; a type whose worker dies (a crash, 15 minutes) is a skipped row."""
    import subprocess

    out, rest = argv[0], argv[1:]
    if rest[:1] == ["--worker"]:
        return _worker(out, rest[1:])
    if out == "--commit":
        return commit(*rest)
    types = rest or list(base_models())
    while True:
        done = _types_in(out)
        left = [t for t in types if t not in done]
        if not left:
            return
        try:
            code = subprocess.run([sys.executable, __file__, out, "--worker", *left[:chunk]], timeout=900).returncode
        except subprocess.TimeoutExpired:
            code = "a timeout"
        after = _types_in(out)
        if code != 0:
            dead = next(t for t in left if t not in after)
            row = {"type": dead, "model": base_models()[dead], "status": "skipped", "stage": "process"}
            with open(out, "a") as sink:
                sink.write(json.dumps(row | {"reason": f"worker exited with {code}"}) + "\n")


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")
    main(sys.argv[1:])
