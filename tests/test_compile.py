"""Compiled models: a tiny GPT-2 probed in both orders (compile then probe, probe then compile)
gives the eager model's site names and the eager Probe's values, over 20 forwards without
recompilation (dynamo's compile counters stay put after the first forward, no recompile
warnings are logged)."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

from isoprobe import Probe

FORWARDS = 20


@pytest.fixture(scope="module")
def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=16)).eval()


@pytest.fixture(scope="module")
def eager_records(tiny_gpt2):
    return run(Probe(tiny_gpt2), tiny_gpt2, batches())


def batches():
    gen = torch.Generator().manual_seed(3)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 9:] = 0
    return [
        {"input_ids": torch.randint(0, 128, (2, 12), generator=gen), "attention_mask": mask} for _ in range(FORWARDS)
    ]


def run(probe: Probe, model, data) -> list:
    with torch.no_grad(), probe:
        for batch in data:
            model(**batch)
    return probe.records


def compiled_run(order: str, model, backend: str, data, caplog):
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    with caplog.at_level(logging.WARNING, logger="torch._dynamo"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if order == "compile-then-probe":
            compiled = torch.compile(model, backend=backend)
            probe = Probe(compiled).attach()
        else:
            probe = Probe(model).attach()
            compiled = torch.compile(model, backend=backend)
        with torch.no_grad():
            compiled(**data[0])
            frames = dict(counters["frames"])
            for batch in data[1:]:
                compiled(**batch)
        probe.detach()
    assert dict(counters["frames"]) == frames, f"{order}: dynamo compiled again after the first forward"
    noise = [r.getMessage() for r in caplog.records if "recompil" in r.getMessage().lower()]
    noise += [str(w.message) for w in caught if "recompil" in str(w.message).lower()]
    assert not noise, noise
    return probe


@pytest.mark.parametrize(
    ("order", "backend", "rel"),
    [
        ("compile-then-probe", "eager", 1e-9),
        ("probe-then-compile", "aot_eager", 1e-9),
    ],
)
def test_compiled_gpt2_probed_in_both_orders(tiny_gpt2, eager_records, order, backend, rel, caplog):
    data, eager = batches(), eager_records
    probe = compiled_run(order, tiny_gpt2, backend, data, caplog)
    assert [s.name for s in probe.sites] == [s.name for s in Probe(tiny_gpt2).sites]
    assert not any(s.name.startswith("_orig_mod") for s in probe.sites)
    records = probe.records
    assert len(records) == len(eager) and {r.step for r in records} == set(range(FORWARDS))
    for a, b in zip(eager, records):
        assert (a.key, a.step, a.item, a.n) == (b.key, b.step, b.item, b.n)
        assert b.isometry_gap == pytest.approx(a.isometry_gap, rel=rel, abs=1e-12)
    assert sum(1 for _ in tiny_gpt2.modules() for _ in (*_._forward_hooks, *_._forward_pre_hooks)) == 0
