"""TransformerLens (4.x, ``TransformerBridge`` around a HuggingFace model): the Probe finds its
activations and takes its hook points and norm components as named sites; every value equals
the Probe's on the same random-init GPT-2 run as a plain HuggingFace model, to the float32
rounding by which the bridge's own LayerNorm arithmetic differs from torch's."""

from __future__ import annotations

import copy

import pytest
import torch

from isoprobe import Probe

lens = pytest.importorskip(
    "transformer_lens.model_bridge",
    reason="transformer_lens is not installed (pip install 'isoprobe[lens]')",
)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({f"w{i}": i for i in range(127)} | {"<unk>": 127}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path_factory.mktemp("wordlevel")  # the bridge reloads its tokenizer from a path; no hub
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<unk>").save_pretrained(path)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(
        GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=16, attn_implementation="eager")
    ).eval()  # as the bridge runs it
    wrapped = copy.deepcopy(hf)  # the bridge rewires the model it is given
    bridge = lens.TransformerBridge.boot_transformers("gpt2", hf_model=wrapped, tokenizer=tokenizer).eval()
    return hf, bridge


def hf_name(name: str) -> str:
    """The HuggingFace module a bridge component wraps: drop ``_original_component``, map names."""
    name = name.replace("._original_component", "").replace("_original_component.", "")
    return ("transformer." + name.replace("blocks.", "h.").replace("ln_final", "ln_f")).removesuffix(".")


def test_bridge_norms_and_hook_points_equal_the_huggingface_model(models):
    hf, bridge = models
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        # the bridge computes its LayerNorms itself: equal to float32 rounding, not bit for bit
        torch.testing.assert_close(bridge(ids), hf(ids).logits, rtol=1e-5, atol=1e-6)
    hooks = ["blocks.*.hook_in", "blocks.*.hook_out"]
    # the bridge computes its LayerNorms itself (the wrapped nn.LayerNorm is found but never
    # runs): its norm components are measured as named modules, pre and post
    norms = ["blocks.*._original_component.ln_?", "ln_final"]
    with torch.no_grad(), Probe(bridge, sites=["activation", *hooks, *norms]) as probe:
        bridge(ids)
    with torch.no_grad(), Probe(hf, sites=["norm", "activation", "transformer.h.*"]) as reference:
        hf(ids)
    kinds = {s.name: s.kind for s in probe.sites}
    assert sorted(kinds.values()) == ["activation"] * 2 + ["module"] * 9
    assert {r.site for r in probe.records} == set(kinds)
    ref = {(r.site, r.point, r.item): r for r in reference.records}
    for r in probe.records:
        if r.site.endswith(("hook_in", "hook_out")):  # the residual stream around a block
            block = hf_name(r.site.rsplit(".", 1)[0])
            twin = ref[(block, "pre" if r.site.endswith("hook_in") else "post", r.item)]
        else:
            twin = ref[(hf_name(r.site), r.point, r.item)]
        assert r.isometry_gap == pytest.approx(twin.isometry_gap, rel=1e-4, abs=1e-9), r
