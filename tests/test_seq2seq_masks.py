"""Encoder-decoder models: each site's padding mask is that of the stack whose tokens it sees.

T5 and BART built tiny from their configs (random weights), decoder as long as the encoder so
that no shape tells the two masks apart, padding in the encoder mask only. Every record is
compared with an independent float64 recomputation (numpy eigenvalues) from activations the
test captures with its own forward hooks: encoder records over the real tokens, decoder records
over all of theirs (the HF decoders' own default without a ``decoder_attention_mask``), or over
those of the ``decoder_attention_mask`` when one is given.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from test_hooks import Capture, check_records
from test_zoo import ZOO
from torch import nn

from isoprobe import Probe

SEQ = 10


def tiny(name: str, model_class: str | None = None) -> nn.Module:
    """The sweep's tiny T5 or BART (tests/test_zoo.py), random init, eval mode."""
    import transformers

    config_class, kwargs, default_class, _ = ZOO[name]
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**kwargs)
    return getattr(transformers, model_class or default_class)(config).eval()


def t5() -> nn.Module:
    return tiny("t5")


def bart() -> nn.Module:
    return tiny("bart")


def norms_and_acts(model: nn.Module) -> tuple[dict, list[str]]:
    """The test's own list: T5's RMS norms (variance_epsilon, no centring), BART's LayerNorms,
    and the feed-forward activations (T5's ``DenseReluDense.act``, BART's ``activation_fn``)."""
    norms = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.LayerNorm):
            norms[name] = (m.eps, True)
        elif type(m).__name__ == "T5LayerNorm":
            norms[name] = (m.variance_epsilon, False)
    acts = [n for n, _ in model.named_modules() if n.endswith(("DenseReluDense.act", "activation_fn"))]
    return norms, acts


def batch(decoder_mask: bool = False) -> dict:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 128, (2, SEQ), generator=gen)
    mask = torch.ones(2, SEQ, dtype=torch.long)
    mask[1, 6:] = 0  # the second source sequence has 6 real tokens
    out = {
        "input_ids": ids,
        "attention_mask": mask,
        "decoder_input_ids": torch.randint(1, 128, (2, SEQ), generator=gen),
    }
    if decoder_mask:
        dmask = torch.ones(2, SEQ, dtype=torch.long)
        dmask[0, 7:] = 0  # the first target sequence has 7 real tokens
        out["decoder_attention_mask"] = dmask
    return out


def probed(model: nn.Module, inputs: dict):
    norms, acts = norms_and_acts(model)
    capture = Capture(model, [*norms, *acts])
    with torch.no_grad(), Probe(model) as probe:
        model(**inputs)
    capture.close()
    assert {s.name for s in probe.sites} == {*norms, *acts}
    return probe.records, capture, norms


def split(records) -> tuple[list, list]:
    enc = [r for r in records if r.site.startswith(("encoder.", "model.encoder."))]
    dec = [r for r in records if r.site.startswith(("decoder.", "model.decoder."))]
    assert len(enc) + len(dec) == len(records) and enc and dec
    return enc, dec


@pytest.mark.parametrize("build", [t5, bart])
def test_encoder_sites_take_the_attention_mask_decoder_sites_the_decoder_mask(build):
    """Without a decoder_attention_mask the decoder's records count every token (the encoder's
    padding is not theirs); with one, they drop the decoder's padding."""
    model = build()
    for decoder_mask, decoder_lengths in ((False, {(0, SEQ), (1, SEQ)}), (True, {(0, 7), (1, SEQ)})):
        inputs = batch(decoder_mask)
        records, capture, norms = probed(model, inputs)
        enc, dec = split(records)
        assert {(r.item, r.n) for r in enc} == {(0, SEQ), (1, 6)}
        assert {(r.item, r.n) for r in dec} == decoder_lengths
        assert check_records(enc, capture, norms, mask=inputs["attention_mask"].numpy()) > 0
        dmask = inputs.get("decoder_attention_mask")
        assert check_records(dec, capture, norms, mask=None if dmask is None else dmask.numpy()) > 0


def test_cross_attention_keys_follow_the_encoder_queries_the_decoder():
    """Inside the decoder, cross-attention's key projection reads the encoder's output (its
    tokens are the source's: the encoder mask), its query projection the decoder's stream."""
    model, inputs = bart(), batch()
    names = ["decoder.layers.0.encoder_attn.k_proj", "decoder.layers.0.encoder_attn.q_proj"]
    capture = Capture(model, names)
    with torch.no_grad(), Probe(model, sites=names) as probe, warnings.catch_warnings():
        warnings.simplefilter("error")  # the key reads the encoder's output itself: nothing ambiguous
        model(**inputs)
    capture.close()
    keys = [r for r in probe.records if r.site == names[0]]
    queries = [r for r in probe.records if r.site == names[1]]
    assert {(r.item, r.n) for r in keys} == {(0, SEQ), (1, 6)}
    assert {(r.item, r.n) for r in queries} == {(0, SEQ), (1, SEQ)}
    assert check_records(keys, capture, {}, mask=inputs["attention_mask"].numpy()) == 0
    assert check_records(queries, capture, {}, mask=None) == 0
    # as during generation: the encoder run on its own, its output then given to the model
    with torch.no_grad(), Probe(model, sites=names) as probe, warnings.catch_warnings():
        warnings.simplefilter("error")
        encoded = model.get_encoder()(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        model(**{k: v for k, v in inputs.items() if k != "input_ids"}, encoder_outputs=encoded)
    assert {(r.site, r.item, r.n) for r in probe.records} == {
        (names[0], 0, SEQ),
        (names[0], 1, 6),
        (names[1], 0, SEQ),
        (names[1], 1, SEQ),
    }


def test_head_on_the_decoder_output_follows_the_decoder():
    """BART's lm_head reads the decoder's output tensor: the decoder's mask (here: none)."""
    model = tiny("bart", "BartForConditionalGeneration")
    inputs = batch(decoder_mask=True)
    capture = Capture(model, ["lm_head"])
    with torch.no_grad(), Probe(model, sites=["lm_head"]) as probe:
        model(**inputs)
    capture.close()
    assert {(r.item, r.n) for r in probe.records} == {(0, 7), (1, SEQ)}
    check_records(probe.records, capture, {}, mask=inputs["decoder_attention_mask"].numpy())


def test_site_outside_both_stacks_counts_all_tokens_and_says_so():
    """A module neither stack runs, reading a tensor that is neither stack's output, cannot be
    assigned a mask: every token is counted and a warning says why."""

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.seq2seq, self.head = t5(), nn.Tanh()
            self.config = self.seq2seq.config

        def get_encoder(self):
            return self.seq2seq.encoder

        def get_decoder(self):
            return self.seq2seq.decoder

        def forward(self, **kw):
            return self.head(2 * self.seq2seq(**kw).last_hidden_state)

    model, inputs = Wrapped(), batch()
    with torch.no_grad(), Probe(model, sites=["head"]) as probe, pytest.warns(UserWarning, match="outside"):
        model(**inputs)
    assert {(r.item, r.n) for r in probe.records} == {(0, SEQ), (1, SEQ)}


def test_single_stack_models_keep_the_attention_mask():
    """A T5 encoder alone (no decoder) masks its sites with the attention mask as before."""
    model = tiny("t5", "T5EncoderModel")
    inputs = batch()
    with torch.no_grad(), Probe(model) as probe:
        model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    assert {(r.item, r.n) for r in probe.records} == {(0, SEQ), (1, 6)}
    assert np.all([r.flag is None for r in probe.records])


def bert_to_bert() -> nn.Module:
    """A tiny EncoderDecoderModel of two BERTs of different widths (32 -> 48), random init: the
    decoder's cross-attention reads the encoder's output through ``enc_to_dec_proj``."""
    import transformers

    def config(hidden: int, **kw) -> transformers.BertConfig:
        return transformers.BertConfig(
            vocab_size=128, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=2 * hidden, max_position_embeddings=32, **kw,
        )  # fmt: skip

    torch.manual_seed(0)
    configs = transformers.EncoderDecoderConfig.from_encoder_decoder_configs(
        config(32), config(48, is_decoder=True, add_cross_attention=True)
    )
    return transformers.EncoderDecoderModel(config=configs).eval()


def test_cross_attention_reads_the_projected_encoder_output_as_source_tokens():
    """With encoder and decoder widths differing, the decoder's cross-attention key and value
    read ``enc_to_dec_proj`` of the encoder's output, a new tensor: still the source's tokens
    (the encoder mask: 6 real tokens in the second sequence), while the decoder's own
    self-attention counts all of its tokens. Records equal a float64 numpy recomputation."""
    model, inputs = bert_to_bert(), batch()
    assert model.enc_to_dec_proj.in_features == 32 and model.enc_to_dec_proj.out_features == 48
    cross = [f"decoder.bert.encoder.layer.0.crossattention.self.{p}" for p in ("key", "value")]
    own = [f"decoder.bert.encoder.layer.0.attention.self.{p}" for p in ("query", "key", "value")]
    capture = Capture(model, [*cross, *own])
    with torch.no_grad(), Probe(model, sites=[*cross, *own]) as probe, warnings.catch_warnings():
        warnings.simplefilter("error")
        model(**inputs)
    capture.close()
    keys = [r for r in probe.records if r.site in cross]
    mine = [r for r in probe.records if r.site in own]
    assert {(r.site, r.item, r.n) for r in keys} == {(s, i, n) for s in cross for i, n in ((0, SEQ), (1, 6))}
    assert {(r.site, r.item, r.n) for r in mine} == {(s, i, SEQ) for s in own for i in (0, 1)}
    assert check_records(keys, capture, {}, mask=inputs["attention_mask"].numpy()) == 0
    assert check_records(mine, capture, {}, mask=None) == 0


def test_decoder_site_reading_an_unknown_tensor_as_long_as_the_source_warns():
    """The projection done by a plain function (no module to follow): the cross-attention key
    reads a tensor given to the decoder that no stream produced, as long as the source, so
    whose mask applies is unknown: a warning says so, once, and the decoder's (none) applies."""
    model, inputs = bert_to_bert(), batch()
    proj = model.enc_to_dec_proj
    del model.enc_to_dec_proj
    model.enc_to_dec_proj = lambda h: 1.0 * proj(h)  # noqa: PLW0108 (not a module: no hook runs)
    site = "decoder.bert.encoder.layer.0.crossattention.self.key"
    unknown = pytest.warns(UserWarning, match="source's or the target's is unknown")
    with torch.no_grad(), Probe(model, sites=[site]) as probe, unknown as caught:
        model(**inputs)
        model(**inputs)
    assert sum("is unknown" in str(w.message) for w in caught) == 1
    assert {(r.item, r.n) for r in probe.records} == {(0, SEQ), (1, SEQ)}
    assert len(probe.records) == 2 * 2 * 2  # forwards x items x points (pre, post)
