"""The zoo: architectures that transformers ships, built tiny from their configs with random
weights. In one forward the Probe must record every norm and activation module that runs, and
its Theorem 1 verdict at every norm whose normalisation acts on whole items must be the test's
own: held where the normalised items meet the bound, undecided and flagged eps-dominated where
only the exact projection x_c/‖x_c‖ does (the norm's eps explains the miss: OLMo2's and Gemma2's
post-norms at random init), and never a failure.

Which modules are norms and activations is decided here, independently of isoprobe: every leaf
module that ran is re-run on *its own captured input* (other arguments as captured) and is

- an activation if permuting the input's entries permutes the output's (for the input and for
  it with rows rescaled to rms 100, where no eps can make a norm look linear) and a least-squares
  affine fit ``y ≈ a x + b`` over all entries (numpy, float64) leaves a residual above 1e-3 of
  the output's spread;
- a norm if, not entrywise, scaling each row (along the last dimension, or along the channel
  dimension 1 of an image-shaped input), first brought to an rms of 100 so that an eps cannot
  matter, by its own factor in [0.5, 2] leaves the output unchanged (relative 1e-3); a batch norm
  (an affine map in eval mode) counts as a norm.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from test_hooks import ref_stats
from torch import nn

from isoprobe import Probe
from isoprobe.records import EPS_DOMINATED

# name: (config class, config kwargs, model class, input kind)
_LM = {
    "vocab_size": 128,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
}
ZOO = {
    "gpt2": (
        "GPT2Config",
        {"vocab_size": 128, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64},
        "GPT2Model",
        "ids",
    ),
    "bert": ("BertConfig", _LM, "BertModel", "ids"),
    "distilbert": (
        "DistilBertConfig",
        {"vocab_size": 128, "dim": 32, "n_layers": 2, "n_heads": 4, "hidden_dim": 64},
        "DistilBertModel",
        "ids",
    ),
    "llama": ("LlamaConfig", {**_LM, "num_key_value_heads": 2}, "LlamaModel", "ids"),
    "qwen2": ("Qwen2Config", {**_LM, "num_key_value_heads": 2}, "Qwen2Model", "ids"),
    "qwen3": ("Qwen3Config", {**_LM, "num_key_value_heads": 2, "head_dim": 8}, "Qwen3Model", "ids"),
    "gemma": ("GemmaConfig", {**_LM, "num_key_value_heads": 2, "head_dim": 8}, "GemmaModel", "ids"),
    "gemma2": ("Gemma2Config", {**_LM, "num_key_value_heads": 2, "head_dim": 8}, "Gemma2Model", "ids"),
    "phi": ("PhiConfig", _LM, "PhiModel", "ids"),
    "phi3": ("Phi3Config", {**_LM, "num_key_value_heads": 2, "pad_token_id": 0}, "Phi3Model", "ids"),
    "gpt_neox": ("GPTNeoXConfig", _LM, "GPTNeoXModel", "ids"),
    "gptj": (
        "GPTJConfig",
        {"vocab_size": 128, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64, "rotary_dim": 4},
        "GPTJModel",
        "ids",
    ),
    "opt": ("OPTConfig", {**_LM, "ffn_dim": 64, "word_embed_proj_dim": 32}, "OPTModel", "ids"),
    "bloom": ("BloomConfig", {"vocab_size": 128, "hidden_size": 32, "n_layer": 2, "n_head": 4}, "BloomModel", "ids"),
    "falcon": (
        "FalconConfig",
        {"vocab_size": 128, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4},
        "FalconModel",
        "ids",
    ),
    "olmo": ("OlmoConfig", {**_LM, "num_key_value_heads": 2}, "OlmoModel", "ids"),
    "olmo2": ("Olmo2Config", {**_LM, "num_key_value_heads": 2}, "Olmo2Model", "ids"),
    "stablelm": ("StableLmConfig", {**_LM, "num_key_value_heads": 2}, "StableLmModel", "ids"),
    "starcoder2": ("Starcoder2Config", {**_LM, "num_key_value_heads": 2}, "Starcoder2Model", "ids"),
    "cohere": ("CohereConfig", {**_LM, "num_key_value_heads": 2}, "CohereModel", "ids"),
    "persimmon": ("PersimmonConfig", _LM, "PersimmonModel", "ids"),
    "mixtral": (
        "MixtralConfig",
        {**_LM, "num_key_value_heads": 2, "num_local_experts": 2, "num_experts_per_tok": 1},
        "MixtralModel",
        "ids",
    ),
    "mpt": ("MptConfig", {"vocab_size": 128, "d_model": 32, "n_layers": 2, "n_heads": 4}, "MptModel", "ids"),
    "codegen": (
        "CodeGenConfig",
        {"vocab_size": 128, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64, "rotary_dim": 4},
        "CodeGenModel",
        "ids",
    ),
    "t5": (
        "T5Config",
        {
            "vocab_size": 128,
            "d_model": 32,
            "d_kv": 8,
            "d_ff": 64,
            "num_layers": 2,
            "num_heads": 4,
            "decoder_start_token_id": 0,
        },
        "T5Model",
        "seq2seq",
    ),
    "bart": (
        "BartConfig",
        {
            "vocab_size": 128,
            "d_model": 32,
            "encoder_layers": 1,
            "decoder_layers": 1,
            "encoder_attention_heads": 4,
            "decoder_attention_heads": 4,
            "encoder_ffn_dim": 64,
            "decoder_ffn_dim": 64,
            "max_position_embeddings": 64,
        },
        "BartModel",
        "seq2seq",
    ),
    "mamba": (
        "MambaConfig",
        {"vocab_size": 128, "hidden_size": 32, "num_hidden_layers": 2, "state_size": 4},
        "MambaModel",
        "ids",
    ),
    "vit": (
        "ViTConfig",
        {
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 64,
            "image_size": 16,
            "patch_size": 4,
        },
        "ViTModel",
        "pixels",
    ),
    "convnext": (
        "ConvNextConfig",
        {"hidden_sizes": [8, 16], "depths": [1, 1], "num_stages": 2},
        "ConvNextModel",
        "pixels",
    ),
    "resnet": (
        "ResNetConfig",
        {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1]},
        "ResNetModel",
        "pixels",
    ),
}


def build(name: str) -> tuple[nn.Module, dict]:
    import transformers

    config_cls, kwargs, model_cls, inputs = ZOO[name]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs)).eval()
    gen = torch.Generator().manual_seed(1)
    if inputs == "pixels":
        return model, {"pixel_values": torch.randn(2, 3, 16, 16, generator=gen)}
    ids = torch.randint(1, 128, (2, 12), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if inputs == "seq2seq":
        batch["decoder_input_ids"] = ids[:, :7]
    return model, batch


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
    """The test's own classification of a leaf module from its captured call (module docstring)."""
    if not args or not isinstance(args[0], torch.Tensor) or not args[0].is_floating_point():
        return None
    x = args[0]
    if isinstance(module, nn.modules.batchnorm._BatchNorm):  # eval mode: affine; a norm in training
        return "norm"
    if not isinstance(output, torch.Tensor) or output.shape != x.shape or x.numel() < 8:
        return None

    def f(z):
        with torch.no_grad():
            return module.forward(z, *args[1:], **kwargs).double()

    def rescaled(dim):  # rows along `dim` brought to rms 100: an eps cannot matter
        return 100 * x / x.square().mean(dim, keepdim=True).sqrt().clamp_min(1e-30)

    y = f(x)
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(x.numel(), generator=gen)

    def entrywise(z, fz):
        return _close(f(z.flatten()[perm].view_as(z)).flatten(), fz.flatten()[perm])

    big = rescaled(x.ndim - 1)
    if entrywise(x, y) and entrywise(big, f(big)):
        xs, ys = x.double().flatten().numpy(), y.flatten().numpy()
        design = np.stack([xs, np.ones_like(xs)], 1)
        resid = ys - design @ np.linalg.lstsq(design, ys, rcond=None)[0]
        return "activation" if np.sqrt(np.mean(resid**2)) > 1e-3 * ys.std() else None
    for dim in {x.ndim - 1, 1} if x.ndim >= 3 else {x.ndim - 1}:
        big = rescaled(dim)
        shape = [1 if d == dim else n for d, n in enumerate(x.shape)]
        if _close(f(big * (0.5 + 1.5 * torch.rand(*shape, generator=gen, dtype=x.dtype))), f(big)):
            return "norm"
    return None


@pytest.mark.parametrize("name", list(ZOO))
def test_probe_records_every_norm_and_activation_that_runs(name, zoo_table):
    start = time.perf_counter()
    try:
        model, batch = build(name)
    except (ImportError, AttributeError) as error:  # an architecture this transformers lacks
        pytest.skip(f"{name}: {error}")
    capture = RunCapture(model)
    with torch.no_grad(), Probe(model) as probe:
        model(**batch)
    capture.close()
    truth = {n: k for n, call in capture.calls.items() if (k := truth_kind(*call))}
    recorded = {r.site: r.kind for r in probe.records}
    leaf_records = {n: k for n, k in recorded.items() if n in capture.calls}
    assert leaf_records == truth, (
        f"{name}: missed {set(truth) - set(leaf_records)}, extra {set(leaf_records) - set(truth)}"
    )
    assert recorded == leaf_records, f"{name}: sites above leaf modules {set(recorded) - set(leaf_records)}"
    checks = [r for r in probe.records if r.point == "normalized" and r.theorem1_bound is not None]
    assert all(r.call == 0 for r in checks)  # the capture keeps each module's first call
    got = {(r.site, r.item): (r.theorem1_holds, r.flag) for r in checks}
    expected = {}
    for r in checks:
        verdict = theorem1_expected(r, capture.calls[r.site])
        expected[r.site, r.item] = (verdict, EPS_DOMINATED if verdict is None else None)
    assert got == expected, f"{name}: {[(k, got[k], v) for k, v in expected.items() if got[k] != v]}"
    assert all(v[0] is not False for v in expected.values()), f"{name}: Theorem 1 itself fails"
    kinds = list(truth.values())
    holds = sum(1 for v, _ in got.values() if v)
    zoo_table.append(
        (name, kinds.count("norm"), kinds.count("activation"), holds, len(got) - holds, time.perf_counter() - start)
    )


_TOL = math.sqrt(np.finfo(np.float64).eps)


def theorem1_expected(record, call) -> bool | None:
    """The test's own Theorem 1 verdict for one Gram (numpy float64 eigenvalues): ``True`` if the
    normalised items ``x_c / sqrt(var + eps)`` meet the bound ``gap_c - log factor`` (rounding
    tolerance sqrt(float64 eps) · max(1, gap_c)), ``None`` if only the exact projection
    ``x_c / ‖x_c‖`` does (eps-dominated), ``False`` if neither. OLMo's LayerNorm keeps its eps,
    1e-5, inside its forward; whether a norm centres is read off its behaviour."""
    module, args, kwargs = call[0], call[1], call[2]
    eps = next((getattr(module, a) for a in ("eps", "variance_epsilon") if hasattr(module, a)), 1e-5)
    x = args[0].double()
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
    x = args[0]
    big = 100 * x / x.square().mean().sqrt().clamp_min(1e-30)
    with torch.no_grad():
        return _close(module.forward(big + 100, *args[1:], **kwargs), module.forward(big, *args[1:], **kwargs))


@pytest.fixture(scope="module")
def zoo_table():
    """Rows (architecture, norms, activations, Grams where Theorem 1 holds, Grams where it is
    undecided because eps dominates, seconds), printed at the end."""
    rows: list[tuple] = []
    yield rows
    print("\narchitecture  norms  activations  Theorem 1 holds (Grams)  eps-dominated  seconds")
    for row in rows:
        print(f"{row[0]:<13} {row[1]:>5}  {row[2]:>11}  {row[3]:>22}  {row[4]:>13}  {row[5]:7.2f}")
