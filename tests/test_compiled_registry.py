"""The slot registry of ``isoprobe.compiled``: it keeps no model alive (a Probe attached and never
detached is freed with its model, and frees its slots; a detached Probe is freed although its
hooks live on, as in compiled code that still calls them), it survives ``importlib.reload`` (attached Probes keep recording), and
concurrent registrations get distinct slots."""

from __future__ import annotations

import gc
import importlib
import sys
import threading
import weakref

import pytest
import torch
from torch import nn

import isoprobe.compiled
from isoprobe import Probe


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 8))


def gaps(probe: Probe) -> list[tuple[str, float]]:
    return [(r.key, r.isometry_gap) for r in probe.records]


X = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))


def test_a_probe_never_detached_is_freed_with_its_model():
    m = model()
    probe = Probe(m).attach()
    with torch.no_grad():
        m(X)
    assert probe.records
    refs, tokens = (weakref.ref(m), weakref.ref(probe)), list(probe._tokens)
    assert tokens and all(t in isoprobe.compiled._REGISTRY for t in tokens)
    del m, probe
    gc.collect()
    assert [r() for r in refs] == [None, None], "the registry keeps the model alive"
    assert not any(t in isoprobe.compiled._REGISTRY for t in tokens), "a dead Probe's slots stay taken"


def test_a_detached_probe_is_freed_although_its_hooks_live_on():
    """Compiled code may keep calling the hooks it was traced with after the Probe is detached
    (which keep their entries alive, as they must while attached): ``release`` drops the Probe
    from them, so it is freed, and a hook called then runs nothing; its slots are free again."""
    m = model()
    probe = Probe(m).attach()
    kept = [h for mod in m.modules() for h in (*mod._forward_pre_hooks.values(), *mod._forward_hooks.values())]
    tokens = list(probe._tokens)
    probe.detach()
    assert kept and not any(t in isoprobe.compiled._REGISTRY for t in tokens), "detach left its slots taken"
    ref = weakref.ref(probe)
    del probe
    gc.collect()
    assert ref() is None, "a hook that outlives its removal keeps the detached Probe alive"
    again = Probe(m).attach()
    assert again._tokens == tokens
    again.detach()


def test_a_dead_entry_does_not_free_its_slot_once_reused():
    m, ran = nn.Linear(2, 2), []
    token, first = isoprobe.compiled._register(m, "site", ran.append)
    isoprobe.compiled.release(token)
    again, second = isoprobe.compiled._register(m, "site", ran.append)
    assert again == token
    del first
    gc.collect()
    isoprobe.compiled._dispatch(token, "second")
    assert ran == ["second"]
    isoprobe.compiled.release(token)
    del second
    isoprobe.compiled._dispatch(token, "released")
    assert ran == ["second"] and token not in isoprobe.compiled._REGISTRY


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_reload_keeps_attached_probes_recording(compiled):
    """IPython's autoreload reloads the module while Probes are attached: their hooks dispatch
    through the same registry, the operator stays registered, the records equal a fresh run's."""
    torch.compiler.reset()
    m = model()
    run = torch.compile(m, backend="eager") if compiled else m
    reference = Probe(run)
    with torch.no_grad(), reference:
        run(X)
    observe, registry = isoprobe.compiled._OBSERVE, isoprobe.compiled._REGISTRY
    probe = Probe(run).attach()
    importlib.reload(isoprobe.compiled)
    with torch.no_grad():
        run(X)
    probe.detach()
    assert gaps(probe) == gaps(reference) != []
    assert isoprobe.compiled._OBSERVE is observe and isoprobe.compiled._REGISTRY is registry
    torch.compiler.reset()


def test_concurrent_registrations_get_distinct_slots():
    """Four threads register 100 hooks each on one module, switching threads every microsecond:
    without the lock two of them take the same free slot (19 of 20 such rounds did)."""
    m, tokens = nn.Linear(2, 2), []
    interval = sys.getswitchinterval()

    def register() -> None:
        for _ in range(100):
            tokens.append(isoprobe.compiled._register(m, "site", print))

    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=register) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert len({token for token, _ in tokens}) == len(tokens) == 400
    for token, _ in tokens:
        isoprobe.compiled.release(token)
