"""TransformerLens (4.x, ``TransformerBridge`` around a HuggingFace model): the Probe finds its
norms (with their four points) and activations, and selects its hook points by their
TransformerLens names; every value equals the Probe's on the same random-init model run as a
plain HuggingFace model, to the float32 rounding by which the bridge's own LayerNorm arithmetic
differs from torch's."""

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
def tokenizer(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({f"w{i}": i for i in range(127)} | {"<unk>": 127}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path_factory.mktemp("wordlevel")  # the bridge reloads its tokenizer from a path; no hub
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<unk>").save_pretrained(path)
    return PreTrainedTokenizerFast.from_pretrained(path)


def bridged(hf, architecture: str, tokenizer):
    """The bridge around a copy of ``hf`` (the bridge rewires the model it is given)."""
    return lens.TransformerBridge.boot_transformers(
        architecture, hf_model=copy.deepcopy(hf), tokenizer=tokenizer
    ).eval()


@pytest.fixture(scope="module")
def models(tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(
        GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=16, attn_implementation="eager")
    ).eval()  # as the bridge runs it
    return hf, bridged(hf, "gpt2", tokenizer)


def hf_name(name: str) -> str:
    """The HuggingFace module a bridge component wraps: drop ``_original_component``, map names."""
    name = name.replace("._original_component", "").replace("_original_component.", "")
    return ("transformer." + name.replace("blocks.", "h.").replace("ln_final", "ln_f")).removesuffix(".")


def probe_both(models, bridge_sites, hf_sites=("norm", "activation", "transformer.h.*")):
    hf, bridge = models
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        # the bridge computes its LayerNorms itself: equal to float32 rounding, not bit for bit
        torch.testing.assert_close(bridge(ids), hf(ids).logits, rtol=1e-5, atol=1e-6)
    with torch.no_grad(), Probe(bridge, sites=bridge_sites) as probe:
        bridge(ids)
    with torch.no_grad(), Probe(hf, sites=list(hf_sites)) as reference:
        hf(ids)
    return probe, {(r.site, r.point, r.item): r for r in reference.records}


def assert_equal_records(r, twin):
    assert (r.kind, r.point, r.n, r.dim) == (twin.kind, twin.point, twin.n, twin.dim), (r, twin)
    for field in ("isometry_gap", "orthogonality_gap", "theorem1_bound", "norm_factor"):
        a, b = getattr(r, field), getattr(twin, field)
        assert (a is None) == (b is None) and (a is None or a == pytest.approx(b, rel=1e-4, abs=1e-9)), (r, twin)
    assert r.theorem1_holds == twin.theorem1_holds, (r, twin)


def test_bridge_norms_are_norm_sites_equal_to_the_huggingface_layernorms(models):
    """The bridge's NormalizationBridge computes LayerNorm itself from the weight and bias of the
    nn.LayerNorm it wraps (which never runs): discovery finds it as the norm, with its four
    points and Theorem 1 equal to HF GPT-2's LayerNorm sites; TransformerLens's own
    hook_normalized (x_c / sqrt(var + eps), selected by its alias) equals the normalized point."""
    probe, ref = probe_both(models, ["norm", "activation", "blocks.*.ln?.hook_normalized"])
    kinds = {s.name: (s.kind, s.norm) for s in probe.sites}
    norms = {n for n, (kind, _) in kinds.items() if kind == "norm"}
    assert norms == {
        "blocks.0._original_component.ln_1",
        "blocks.0._original_component.ln_2",
        "blocks.1._original_component.ln_1",
        "blocks.1._original_component.ln_2",
        "ln_final",
    }
    assert all(spec.rule == "layer" and spec.eps == 1e-5 for n, (_, spec) in kinds.items() if n in norms)
    assert sum(kind == "activation" for kind, _ in kinds.values()) == 2
    assert {r.site for r in probe.records} == set(kinds)
    assert {r.point for r in probe.records if r.site in norms} == {"pre", "centered", "normalized", "post"}
    assert all(r.theorem1_holds for r in probe.records if r.point == "normalized")
    by_key = {(r.site, r.point, r.item): r for r in probe.records}
    for r in probe.records:
        if r.site.endswith("hook_normalized"):  # TL's own normalized tensor = the norm's point
            norm = r.site.removesuffix(".hook_normalized").replace("ln1", "_original_component.ln_1")
            twin = by_key[(norm.replace("ln2", "_original_component.ln_2"), "normalized", r.item)]
            assert r.isometry_gap == pytest.approx(twin.isometry_gap, rel=1e-4, abs=1e-9), (r, twin)
        else:
            assert_equal_records(r, ref[(hf_name(r.site), r.point, r.item)])


def test_bridge_hook_points_by_their_transformer_lens_names(models):
    """TransformerLens names (its hook_dict aliases) select the hook points they stand for:
    hook_resid_pre/post are the HF block's input and output, mlp.hook_pre the activation's
    input, ln1 the norm site itself (four points); a hook point picked under two names is one
    site."""
    names = ["blocks.*.hook_resid_pre", "blocks.*.hook_in", "blocks.*.hook_resid_post", "blocks.*.mlp.hook_pre"]
    probe, ref = probe_both(models, [*names, "blocks.*.ln1"])
    sites = [(s.name, s.kind) for s in probe.sites]
    for layer in (0, 1):
        assert (f"blocks.{layer}.hook_resid_pre", "module") in sites and (f"blocks.{layer}.ln1", "norm") in sites
    assert len(sites) == 8 and not any(name.endswith(".hook_in") for name, _ in sites)
    assert {r.site for r in probe.records} == {name for name, _ in sites}
    for r in probe.records:
        block, _, hook = r.site.rpartition(".")
        if hook == "ln1":
            assert_equal_records(r, ref[(hf_name(block) + ".ln_1", r.point, r.item)])
            continue
        if hook == "hook_pre":  # the MLP's pre-activation: the GELU's input
            twin = ref[(hf_name(block.removesuffix(".mlp")) + ".mlp.act", "pre", r.item)]
        else:  # the residual stream around a block
            twin = ref[(hf_name(block), "pre" if hook == "hook_resid_pre" else "post", r.item)]
        assert r.isometry_gap == pytest.approx(twin.isometry_gap, rel=1e-4, abs=1e-9), (r, twin)


@pytest.fixture(scope="module")
def llama(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    hf = LlamaForCausalLM(config).eval()
    return hf, bridged(hf, "meta-llama/Llama-2-7b-hf", tokenizer)


def hf_llama(name: str) -> str:
    """The HuggingFace Llama module a bridge component wraps."""
    name = name.replace("._original_component", "").replace("blocks.", "layers.")
    return "model." + name.replace("ln_final", "norm").replace(".ln1", ".input_layernorm")


def probe_llama(llama, bridge_sites=None, hf_sites=None):
    hf, bridge = llama
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(bridge(ids), hf(ids).logits)
    with torch.no_grad(), Probe(bridge, sites=bridge_sites) as probe:
        bridge(ids)
    with torch.no_grad(), Probe(hf, sites=hf_sites) as reference:
        hf(ids)
    return probe, {(r.site, r.point, r.item): r for r in reference.records}


def test_llama_bridge_rms_norms_run_the_huggingface_module_which_stays_the_site(llama):
    """The bridge's RMSNorm components call HF's own LlamaRMSNorm (bit-equal logits): a norm
    below that runs, so the wrapped module stays the norm site and the bridge is a container;
    every record equals HF Llama's."""
    probe, ref = probe_llama(llama)
    norms = {s.name for s in probe.sites if s.kind == "norm"}
    assert len(norms) == 5 and all(n.endswith("._original_component") for n in norms)
    assert len(probe.records) == len(ref) > 0
    for r in probe.records:
        assert_equal_records(r, ref[(hf_llama(r.site), r.point, r.item)])


def test_llama_bridge_ln1_by_its_transformer_lens_name_is_the_rms_norm_site(llama):
    """``blocks.*.ln1`` names the bridge component around HF's LlamaRMSNorm, which passes its
    input to it and returns its output unchanged: selected by that name it is the norm site,
    with the four points (centered = pre: RMSNorm does not centre) and Theorem 1, every record
    equal to HF Llama's input_layernorm."""
    probe, ref = probe_llama(llama, ["blocks.*.ln1"], ["*.input_layernorm"])
    hf, bridge = llama
    assert [(s.name, s.kind, s.norm.rule, s.module) for s in probe.sites] == [
        (f"blocks.{i}.ln1", "norm", "rms", bridge.blocks[i].ln1._original_component) for i in (0, 1)
    ]
    assert {r.point for r in probe.records} == {"pre", "centered", "normalized", "post"}
    assert len(probe.records) == len(ref) == 2 * 4 * 2  # layers x points x items
    for r in probe.records:
        assert_equal_records(r, ref[(hf_llama(r.site), r.point, r.item)])
        if r.point == "centered":
            assert r.isometry_gap == ref[(hf_llama(r.site), "pre", r.item)].isometry_gap
        if r.point == "normalized":
            assert r.theorem1_holds
