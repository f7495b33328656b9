"""Compiled models: a tiny GPT-2 probed in both orders (compile then probe, probe then compile)
gives the eager model's site names and the eager Probe's values, over 20 forwards without
recompilation (dynamo's compile counters stay put after the first forward, no recompile
warnings are logged), in one graph without graph breaks: each site's measurement is an operator
of the compiled graph (``isoprobe.compiled``), not a break in it. A break inside the loop over
the blocks would make dynamo compile every block on its own, once per layer index: a model of
more than eight blocks would then hit dynamo's recompile limit in its first forward.

The default backend, inductor, takes about 45 s here for the first order from a cold cache (C++
code generation; 8 s more for the second, whose graph it finds in its cache), so its tests run
with ``ISOPROBE_TEST_INDUCTOR=1``."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings

import pytest
import torch

from isoprobe import Probe
from isoprobe.compiled import _REGISTRY

FORWARDS = 20
ORDERS = ("compile-then-probe", "probe-then-compile")
inductor = pytest.mark.skipif(
    os.environ.get("ISOPROBE_TEST_INDUCTOR") != "1", reason="inductor compiles slowly: ISOPROBE_TEST_INDUCTOR=1"
)


def gpt2(n_layer: int = 2):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=128, n_embd=32, n_layer=n_layer, n_head=4, n_positions=16)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def tiny_gpt2():
    return gpt2()


@pytest.fixture(scope="module")
def eager_run(tiny_gpt2):
    return run(Probe(tiny_gpt2), tiny_gpt2, batches())


def batches(forwards: int = FORWARDS):
    gen = torch.Generator().manual_seed(3)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 9:] = 0
    return [
        {"input_ids": torch.randint(0, 128, (2, 12), generator=gen), "attention_mask": mask} for _ in range(forwards)
    ]


def run(probe: Probe, model, data) -> tuple[list, list[torch.Tensor]]:
    with torch.no_grad(), probe:
        logits = [model(**batch).logits for batch in data]
    return probe.records, logits


def compiled_run(order: str, model, backend: str, data, caplog, grad: bool = False):
    """Compile and probe ``model`` in ``order``, run ``data`` (with ``grad``: a backward after
    each forward); check dynamo's counters and logs; the Probe and the logits."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    logits = []
    with caplog.at_level(logging.WARNING, logger="torch._dynamo"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if order == "compile-then-probe":
            compiled = torch.compile(model, backend=backend)
            probe = Probe(compiled).attach()
        else:
            probe = Probe(model).attach()
            compiled = torch.compile(model, backend=backend)
        with contextlib.nullcontext() if grad else torch.no_grad():
            for i, batch in enumerate(data):
                out = compiled(**batch).logits
                if grad:
                    out.square().mean().backward()
                logits.append(out.detach())
                if i == 0:
                    frames = dict(counters["frames"])
        probe.detach()
    noise = [r.getMessage() for r in caplog.records if "recompil" in r.getMessage().lower()]
    noise += [str(w.message) for w in caught if "recompil" in str(w.message).lower()]
    assert not noise, noise
    assert dict(counters["frames"]) == frames, f"{order}: dynamo compiled again after the first forward"
    assert not counters["graph_break"], f"{order}: graph breaks {dict(counters['graph_break'])}"
    assert counters["stats"]["unique_graphs"] == 1, f"{order}: {counters['stats']['unique_graphs']} graphs"
    assert not any(token in _REGISTRY for token in probe._tokens), "detach left hooks registered"
    return probe, logits


def check_records(model, probe: Probe, eager: list, rel: float, abs_: float) -> None:
    assert [s.name for s in probe.sites] == [s.name for s in Probe(model).sites]
    assert not any(s.name.startswith("_orig_mod") for s in probe.sites)
    records = probe.records
    assert len(records) == len(eager) and {r.step for r in records} == set(range(FORWARDS))
    for a, b in zip(eager, records):
        assert (a.key, a.step, a.item, a.n) == (b.key, b.step, b.item, b.n)
        assert b.isometry_gap == pytest.approx(a.isometry_gap, rel=rel, abs=abs_), a.key
    assert sum(1 for _ in model.modules() for _ in (*_._forward_hooks, *_._forward_pre_hooks)) == 0


@pytest.mark.parametrize(("order", "backend"), [("compile-then-probe", "eager"), ("probe-then-compile", "aot_eager")])
def test_compiled_gpt2_probed_in_both_orders(tiny_gpt2, eager_run, order, backend, caplog):
    probe, _ = compiled_run(order, tiny_gpt2, backend, batches(), caplog)
    check_records(tiny_gpt2, probe, eager_run[0], rel=1e-9, abs_=1e-12)


def test_nine_blocks_compile_as_one_graph(caplog):
    """More blocks than dynamo's recompile limit (8): with a graph break per site, each block
    was compiled once per layer index and the ninth hit the limit (a logged warning)."""
    model = gpt2(n_layer=9)
    data = batches(2)
    eager, _ = run(Probe(model), model, data)
    probe, _ = compiled_run("probe-then-compile", model, "eager", data, caplog)
    assert [(r.key, r.isometry_gap) for r in probe.records] == [(r.key, r.isometry_gap) for r in eager]


def test_probes_attached_again_run_in_the_graph_traced_before(tiny_gpt2, eager_run):
    """The graph traced with a Probe attached calls the Probe attached at the same slot now, a new
    Probe or the same one again. A forward without one traces a graph without the hooks, which
    dynamo then runs whatever hooks are added: the Probe warns that no site ran, and records
    again after ``torch.compiler.reset()``."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    data, eager = batches(1), [(r.key, r.isometry_gap) for r in eager_run[0] if r.step == 0]
    compiled = torch.compile(tiny_gpt2, backend="eager")
    first = Probe(compiled)

    def probed(probe: Probe) -> list:
        with probe, torch.no_grad():
            compiled(**data[0])
        return [(r.key, r.isometry_gap) for r in probe.records if r.step == probe._step]

    for probe in (first, Probe(compiled), first):
        assert probed(probe) == eager
    # two frames, compiled once: the model's forward (the one graph) and the hook on the model
    # that starts a recorded forward's functional sites (isoprobe.calls), compiled on its own as
    # a frame without operations (a no-op under torch.compile)
    assert counters["frames"]["total"] == 2 and counters["stats"]["unique_graphs"] == 1
    assert len(first.records) == 2 * len(eager)
    with torch.no_grad():
        compiled(**data[0])  # traced again, without hooks
    with pytest.warns(UserWarning, match="no site of this Probe ran in the forward at step 0.*torch.compiler.reset"):
        assert probed(Probe(compiled)) == []
    torch.compiler.reset()
    assert probed(Probe(compiled)) == eager


def test_without_the_operator_hooks_run_out_of_the_graphs(tiny_gpt2, eager_run, monkeypatch):
    """Where torch cannot register an effectful operator, the site hooks are kept out of the
    graphs (graph breaks) and dispatch by slot like the operator: the same records."""
    import isoprobe.compiled

    monkeypatch.setattr(isoprobe.compiled, "_OBSERVE", None)
    records, _ = run(Probe(tiny_gpt2), tiny_gpt2, batches())
    assert [(r.key, r.isometry_gap) for r in records] == [(r.key, r.isometry_gap) for r in eager_run[0]]


@inductor
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("order", ORDERS)
def test_inductor_gpt2_probed_in_both_orders(tiny_gpt2, eager_run, order, grad, caplog):
    """Inductor (``torch.compile``'s default) fuses and reorders float32 arithmetic, so the
    activations at a site differ from the eager ones by the compiled model's own rounding,
    measured as ``delta`` = max |Δ logits| / max |logits|. An isometry gap of items perturbed
    by a relative ``δ`` (``‖Δx_i‖ ≤ δ ‖x_i‖``) moves, to first order, by at most ``2δ (1 + λ_min^(-1/2))``
    (``λ_min`` of the unit-diagonal Gram): ``2δ`` from its trace, ``(2δ/n) Σ_i (Ĝ⁻¹)_ii^(1/2)``
    from its log-determinant. The tiny GPT-2's unit-diagonal token Grams (every site, before and
    after, also centred) have ``λ_min ≥ 0.076``: a bound of ``9.3 δ``; ``64 delta`` leaves room for
    sites that deviate more than the logits. A LayerNorm weight changed by 1e-3 moves gaps by 4.5e-5,
    above it (~1.5e-5); a wrong site, step, item or mask moves them far more."""
    records, eager_logits = eager_run
    probe, logits = compiled_run(order, tiny_gpt2, "inductor", batches(), caplog, grad=grad)
    delta = max(float((c - e).abs().max() / e.abs().max()) for c, e in zip(logits, eager_logits))
    assert 0 < delta < 1e-5, f"the compiled model's own deviation from eager: {delta:.2e}"
    check_records(tiny_gpt2, probe, records, rel=0, abs_=64 * delta)


def test_compiled_t5_keeps_each_stacks_padding_mask():
    """Encoder-decoder masks (``isoprobe.stacks``) under ``torch.compile``: the stacks' hooks run
    out of the graph, so encoder sites still drop the source padding and decoder sites count
    every target token; item counts and gaps equal the eager Probe's."""
    from transformers import T5Config, T5Model

    torch.manual_seed(0)
    config = T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, decoder_start_token_id=0)
    model = T5Model(config).eval()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 128, (2, 10), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "decoder_input_ids": torch.randint(1, 128, (2, 10), generator=gen),
    }
    with torch.no_grad():
        with Probe(model) as eager:
            model(**batch)
        torch.compiler.reset()
        compiled = torch.compile(model, backend="eager")
        with Probe(compiled) as probe:
            for _ in range(2):
                compiled(**batch)
    torch.compiler.reset()
    want = {(r.site, r.call, r.point, r.item): r for r in eager.records}
    got = {(r.site, r.call, r.point, r.item): r for r in probe.records if r.step == 1}
    assert got.keys() == want.keys()
    assert {r.n for k, r in want.items() if k[0].startswith("encoder.") and k[3] == 1} == {6}
    assert {r.n for k, r in want.items() if k[0].startswith("decoder.") and ".layer.0." in k[0]} == {10}
    for k, r in want.items():
        assert got[k].n == r.n and got[k].isometry_gap == pytest.approx(r.isometry_gap, rel=1e-6, abs=1e-9), k
