"""Functional sites (isoprobe.calls): every record against an independent float64 oracle.

The oracle shares no code with isoprobe: the test models *tap* their own tensors (a copy of
the input just before each functional call and of its output just after, under the name the
test expects) in a separate forward without a Probe; Grams, spectra and norm parts are then
computed in numpy float64. So names, call indices, ``call`` fields, the absence of double
records and every gap are checked against the models' own account of what they computed.
"""

from __future__ import annotations

import math
import threading
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import _get_current_function_mode_stack

from isoprobe import Probe

# ------------------------------------------------------------------------------- the oracle

TAPS: dict[tuple[str, str], list[np.ndarray]] | None = None


def tap(owner: nn.Module, function: str, point: str, t: torch.Tensor) -> None:
    """Keep a float64 copy of ``t`` as ``point`` of the site ``owner.tag:function`` (one entry
    per run of the owner in the forward: the records' ``call``)."""
    if TAPS is not None:
        TAPS.setdefault((f"{owner.tag}:{function}", point), []).append(t.detach().double().clone().numpy())


def tagged(model: nn.Module) -> nn.Module:
    for name, module in model.named_modules():
        module.tag = name
    return model


def tapped(model: nn.Module, *args: torch.Tensor) -> dict[tuple[str, str], list[np.ndarray]]:
    global TAPS
    TAPS = {}
    try:
        with torch.no_grad():
            model(*args)
        return TAPS
    finally:
        TAPS = None


def items(a: np.ndarray, view: str, item: int | None) -> np.ndarray:
    if view == "token":
        return a[item]
    if view == "sample":
        return a.reshape(a.shape[0], -1)
    return np.moveaxis(a, 1, 0).reshape(a.shape[1], -1)  # feature


def gap_of(X: np.ndarray) -> float:
    """log(mean λ) - mean log λ of ``G = X Xᵀ``; inf when numpy's rank (SVD) says G is singular."""
    G = X @ X.T
    if np.linalg.matrix_rank(G) < len(G):
        return math.inf
    lam = np.linalg.eigvalsh(G)
    return float(np.log(lam.mean()) - np.log(lam).mean())


def norm_parts(x: np.ndarray, rule: str, eps: float, groups: int = 1, dims: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(centered, normalized) as the norm computes them (batch: per channel over the batch and
    positions; group: per sample and group; layer/rms: over the last ``dims`` dimensions)."""
    if rule == "batch":
        axes = (0, *range(2, x.ndim))
        z = x
    elif rule == "group":
        z = x.reshape(x.shape[0], groups, -1)
        axes = (2,)
    else:
        z = x
        axes = tuple(range(x.ndim - dims, x.ndim))
    zc = z if rule == "rms" else z - z.mean(axes, keepdims=True)
    zn = zc / np.sqrt((zc**2).mean(axes, keepdims=True) + eps)
    return zc.reshape(x.shape), zn.reshape(x.shape)


def check(records, taps, norms: dict[str, tuple] | None = None, rtol: float = 1e-6) -> int:
    """Every record equals the oracle; every tapped (site, point, call) has its record. Returns
    how many Theorem 1 checks were decided (each must agree with the oracle's)."""
    norms = norms or {}
    want = {(site, point, call) for (site, point), runs in taps.items() for call in range(len(runs))}
    got = {(r.site, p, r.call) for r in records for p in (r.point,) if p in ("pre", "post")}
    assert got == want
    decided = 0
    for r in records:
        pre = taps[(r.site, "pre")][r.call]
        if r.point in ("pre", "post"):
            Z = items(taps[(r.site, r.point)][r.call], r.view, r.item)
        else:
            xc, xn = norm_parts(pre, *norms[r.site])
            Z = items(xc if r.point == "centered" else xn, r.view, r.item)
        assert (r.n, r.dim) == Z.shape, r
        assert r.isometry_gap == pytest.approx(gap_of(Z), rel=rtol), r
        if r.point == "normalized" and r.theorem1_holds is not None:
            Xc = items(norm_parts(pre, *norms[r.site])[0], r.view, r.item)
            a = np.linalg.norm(Xc, axis=1)
            bound = math.exp(-gap_of(Xc)) * (1 + a.var() / a.mean() ** 2)
            assert r.theorem1_bound == pytest.approx(bound, rel=rtol), r
            assert r.theorem1_holds == (math.exp(-gap_of(Z)) >= bound * (1 - 1e-9)), r
            decided += 1
    return decided


# ------------------------------------------------------------------------------- the models


class BasicConv2d(nn.Module):
    """torchvision Inception's BasicConv2d: conv, batch norm, then F.relu in place."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        tap(self, "relu@0", "pre", x)
        x = F.relu(x, inplace=True)
        tap(self, "relu@0", "post", x)
        return x


class Inceptionish(nn.Module):
    """Branches of BasicConv2d, an nn.ReLU(inplace=True) module (a module site: its own F.relu
    is not recorded again) and a final F.relu in the model's own forward (GoogLeNet, DenseNet)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = BasicConv2d(3, 8)
        self.branch1x1 = BasicConv2d(8, 8)
        self.branch3x3 = BasicConv2d(8, 8)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.act(self.branch1x1(x) + self.branch3x3(x) - 0.5)
        x = x - 0.3
        tap(self, "relu@0", "pre", x)
        x = F.relu(x, inplace=True)
        tap(self, "relu@0", "post", x)
        return x


class Spellings(nn.Module):
    """Activations in every spelling, and norms called directly, on (batch, seq, hidden)."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(d))
        self.bias = nn.Parameter(0.1 * torch.randn(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        calls = [
            ("gelu@0", lambda t: F.gelu(t)),
            ("relu@0", lambda t: torch.relu(t)),
            ("relu@1", lambda t: t.relu()),
            ("relu@2", lambda t: t.relu_()),
            ("tanh@0", lambda t: torch.tanh(t)),
            ("sigmoid@0", lambda t: t.sigmoid()),
            ("silu@0", lambda t: F.silu(t, inplace=True)),
        ]
        for name, fn in calls:  # each on a fresh input: no collapse to a singular Gram
            h = self.fc(x) - 0.1
            tap(self, name, "pre", h)
            y = fn(h)
            tap(self, name, "post", y)
            x = x + y
        tap(self, "layer_norm@0", "pre", x)
        x = F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, eps=1e-4)
        tap(self, "layer_norm@0", "post", x)
        x = self.fc(x)
        tap(self, "rms_norm@0", "pre", x)
        x = F.rms_norm(x, (x.shape[-1],), self.weight, eps=1e-3)
        tap(self, "rms_norm@0", "post", x)
        return x


class Norms(nn.Module):
    """F.batch_norm (batch statistics, running ones updated), F.group_norm, a whole-sample
    F.layer_norm and F.instance_norm on a (batch, C, H, W) map."""

    def __init__(self, c: int = 6, cin: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, c, 3, padding=1)
        self.register_buffer("mean", torch.zeros(c))
        self.register_buffer("var", torch.ones(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        for name, fn in (
            ("batch_norm@0", lambda t: F.batch_norm(t, self.mean, self.var, training=True, eps=1e-3)),
            ("group_norm@0", lambda t: F.group_norm(t, 3, eps=1e-4)),
            ("layer_norm@0", lambda t: F.layer_norm(t, t.shape[1:])),
            ("instance_norm@0", lambda t: F.instance_norm(t)),
        ):
            x = 1.5 * x + 0.3
            tap(self, name, "pre", x)
            x = fn(x)
            tap(self, name, "post", x)
        return x


class Repeated(nn.Module):
    """One function called three times in one forward: relu@0, relu@1, relu@2."""

    def __init__(self, d: int = 24) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for k in range(3):  # residual: the items stay far from collapse
            h = self.fc(x) - 0.1 * k
            tap(self, f"gelu@{k}", "pre", h)
            y = F.gelu(h)
            tap(self, f"gelu@{k}", "post", y)
            x = x + y
        return x


class Looped(nn.Module):
    """A block run four times in one forward: its functional sites' ``call`` is 0..3."""

    def __init__(self) -> None:
        super().__init__()
        self.block = Repeated()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(4):
            x = self.block(x)
        return x


def conv_input(batch: int = 5) -> torch.Tensor:
    return torch.randn(batch, 3, 6, 6, generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_inception_basic_conv_in_place_relu(train):
    torch.manual_seed(0)
    model = tagged(Inceptionish()).train(train)
    x = conv_input()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    taps = tapped(model, x)
    model.load_state_dict(state)  # the tapped forward updated the running statistics in train mode
    with torch.no_grad(), Probe(model) as probe:
        model(x)
    functional = [r for r in probe.records if ":" in r.site]
    assert {r.site for r in functional} == {"stem:relu@0", "branch1x1:relu@0", "branch3x3:relu@0", ":relu@0"}
    assert not any(r.site.startswith("act:") for r in probe.records)  # nn.ReLU's own F.relu: the module site
    assert {r.site for r in probe.records if ":" not in r.site} == {"stem.bn", "branch1x1.bn", "branch3x3.bn", "act"}
    check(functional, taps)
    pre, post = probe["stem:relu@0:pre"][0], probe["stem:relu@0:post"][0]
    assert pre.view == post.view == "sample" and pre.isometry_gap < post.isometry_gap  # not post read twice


def test_every_spelling_and_direct_norms_on_token_activations():
    torch.manual_seed(0)
    model = tagged(Spellings())
    x = torch.randn(3, 10, 16)
    taps = tapped(model, x)
    with torch.no_grad(), Probe(model) as probe:
        model(x)
    records = probe.records
    assert all(r.view == "token" for r in records) and {r.item for r in records} == {0, 1, 2}
    norms = {":layer_norm@0": ("layer", 1e-4), ":rms_norm@0": ("rms", 1e-3)}
    assert check(records, taps, norms) == 2 * 3  # Theorem 1 for each norm and sequence
    assert all(r.theorem1_holds for r in records if r.point == "normalized")
    assert [s.name for s in probe.functional_sites][:3] == [":gelu@0", ":relu@0", ":relu@1"]
    assert {s.kind for s in probe.functional_sites} == {"activation", "norm"}


def test_direct_batch_group_layer_instance_norms():
    torch.manual_seed(0)
    model = tagged(Norms())
    x = conv_input(6)
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    taps = tapped(model, x)
    after_one = model.mean.clone()
    model.load_state_dict(buffers)
    with torch.no_grad(), Probe(model) as probe:
        model(x)
    records = probe.records
    views = {r.site: r.view for r in records if r.point == "normalized"}  # where Theorem 1 is checked
    assert {r.view for r in records if r.site == ":batch_norm@0" and r.point in ("pre", "post")} == {"sample"}
    assert views == {
        ":batch_norm@0": "feature",
        ":group_norm@0": "sample",
        ":layer_norm@0": "sample",
        ":instance_norm@0": "sample",
    }
    norms = {
        ":batch_norm@0": ("batch", 1e-3),
        ":group_norm@0": ("group", 1e-4, 3),
        ":layer_norm@0": ("layer", 1e-5, 1, 3),
        ":instance_norm@0": ("group", 1e-5, 6),
    }
    assert check(records, taps, norms) == 2  # batch norm (feature view), layer norm (sample view)
    assert not torch.equal(after_one, buffers["mean"])
    assert torch.equal(model.mean, after_one)  # running statistics updated once, as without the Probe


def test_call_index_within_a_forward_and_call_field_across_runs():
    """``@k`` in the name: the k-th call of the function in one run of the owner's forward; the
    ``call`` field: the run of the owner within the model's forward (its key ``@i@call``)."""
    torch.manual_seed(0)
    model = tagged(Looped())
    x = torch.randn(7, 24)
    taps = tapped(model, x)
    with torch.no_grad(), Probe(model) as probe:
        model(x)
        model(x)
    records = [r for r in probe.records if r.step == 1]
    check(records, taps)
    assert sorted({r.site for r in records}) == ["block:gelu@0", "block:gelu@1", "block:gelu@2"]
    assert sorted({r.call for r in records}) == [0, 1, 2, 3]
    assert {r.key for r in probe["block:gelu@1@3:pre"]} == {"block:gelu@1@3:pre"}
    assert len(probe["block:gelu@1"]) == 2 * 4 * 2  # points, calls, steps
    assert len(probe["block:gelu"]) == 2 * 3 * 4 * 2 and len(probe["*:gelu@0:post"]) == 4 * 2


def test_outputs_gradients_and_buffers_bit_for_bit():
    def run(probed: bool, calls: bool = True):
        torch.manual_seed(0)
        model = nn.Sequential(tagged(Inceptionish()), tagged(Norms(3, cin=8))).train()
        x = conv_input().requires_grad_(True)
        with Probe(model, calls=calls) if probed else torch.enable_grad():
            y = model(x)
            y.square().mean().backward()
        return y.detach(), x.grad, [p.grad for p in model.parameters()], list(model.buffers())

    plain = run(False)
    for calls in (True, False):
        probed = run(True, calls)
        assert torch.equal(plain[0], probed[0]) and torch.equal(plain[1], probed[1])
        assert all(torch.equal(a, b) for a, b in zip(plain[2], probed[2]))
        assert all(torch.equal(a, b) for a, b in zip(plain[3], probed[3]))


def test_selection_by_kind_glob_and_lookup():
    torch.manual_seed(0)
    model = tagged(Inceptionish())
    x = conv_input()

    def sites(**kw):
        with torch.no_grad(), Probe(model, **kw) as probe:
            model(x)
        return sorted({r.site for r in probe.records})

    assert sites(sites="activation") == [":relu@0", "act", "branch1x1:relu@0", "branch3x3:relu@0", "stem:relu@0"]
    assert sites(sites="norm") == ["branch1x1.bn", "branch3x3.bn", "stem.bn"]
    assert sites(sites="*:relu") == [":relu@0", "branch1x1:relu@0", "branch3x3:relu@0", "stem:relu@0"]
    assert sites(sites=":relu") == [":relu@0"]
    assert sites(sites=["branch*:*", "stem.bn"]) == ["branch1x1:relu@0", "branch3x3:relu@0", "stem.bn"]
    assert sites(sites="stem") == ["stem"]  # a module by name: its functional calls are not picked
    assert sites(calls=False) == ["act", "branch1x1.bn", "branch3x3.bn", "stem.bn"]
    with pytest.warns(UserWarning, match=r"'\*:gelu' matched no functional call in forward 0 \(calls seen: "):
        assert sites(sites=["*:gelu", "act"]) == ["act"]
    with torch.no_grad(), Probe(model) as probe:
        model(x)
    assert {r.point for r in probe["stem:relu@0"]} == {"pre", "post"}
    with pytest.raises(KeyError, match="must be a point .* a function of a functional site"):
        probe["stem:prr"]


def test_a_model_with_only_functional_sites_and_errors_that_stay():
    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.tanh(self.fc(x)))

    with torch.no_grad(), Probe(Plain()) as probe:
        Plain()(torch.randn(4, 8))  # another instance: not the probed model
        probe.model(torch.randn(4, 8))
    assert [r.key for r in probe.records] == [":tanh@0:pre", ":tanh@0:post"]
    with pytest.raises(ValueError, match="no site found in Plain"):
        Probe(Plain(), calls=False)
    with pytest.raises(ValueError, match="no site found in Sequential"):  # only torch's own modules: known now
        Probe(nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3)))
    with pytest.raises(ValueError, match="selects no site; the model has only: norm"):
        Probe(nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3)), sites="activation")


def test_nothing_outside_the_probed_forward_and_clean_after_errors():
    torch.manual_seed(0)
    model = tagged(Repeated())
    x = torch.randn(4, 24)
    seen_in_thread = []

    class Raising(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            worker = threading.Thread(target=lambda: seen_in_thread.append(F.gelu(t)))
            worker.start()
            worker.join()
            self.inner(t)
            raise RuntimeError("boom")

    outer = Raising()
    with torch.no_grad(), Probe(outer) as probe:
        with pytest.raises(RuntimeError, match="boom"):
            outer(x)
        assert _get_current_function_mode_stack() == []  # removed although the forward raised
        F.gelu(x)  # outside the forward: not recorded
    assert sorted({r.site for r in probe.records}) == ["inner:gelu@0", "inner:gelu@1", "inner:gelu@2"]
    assert len(seen_in_thread) == 1 and len(probe.records) == 3 * 2
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in outer.modules())
    assert hooks == 0 and _get_current_function_mode_stack() == []


def test_compiled_model_records_module_sites_in_one_graph():
    """Under torch.compile functional calls are not recorded (README): the module sites are, as
    the eager Probe without functional sites records them, in one graph compiled once."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = tagged(Inceptionish()).eval()
    data = [conv_input() for _ in range(4)]
    with torch.no_grad(), Probe(model, calls=False) as eager:
        for x in data:
            model(x)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad(), Probe(compiled) as probe, warnings.catch_warnings():
        warnings.simplefilter("error")
        for i, x in enumerate(data):
            compiled(x)
            if i == 0:
                frames = dict(counters["frames"])
    torch._dynamo.reset()
    assert dict(counters["frames"]) == frames and not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] == 1
    assert [(r.key, r.step, r.isometry_gap) for r in probe.records] == [
        (r.key, r.step, r.isometry_gap) for r in eager.records
    ]


class Aten(nn.Module):
    """The ATen entry points, whose arguments come in another order than F's. Widths such that
    both Theorem 1 checks are decided on a batch of 6: the layer norm's sample Gram has 6 rows of
    16 entries, the batch norm's feature Gram 4 channels of 6 entries (centred: rank ≤ 5)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.narrow = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        tap(self, "layer_norm@0", "pre", h)
        a = torch.layer_norm(h, (16,), None, None, 1e-3, False)
        tap(self, "layer_norm@0", "post", a)
        a = self.narrow(a)
        tap(self, "batch_norm@0", "pre", a)
        b = torch.batch_norm(a, None, None, None, None, True, 0.1, 1e-4, False)
        tap(self, "batch_norm@0", "post", b)
        return b


def test_aten_spellings_of_the_norms():
    torch.manual_seed(0)
    model = tagged(Aten())
    x = torch.randn(6, 8)
    taps = tapped(model, x)
    with torch.no_grad(), Probe(model) as probe:
        model(x)
    norms = {":layer_norm@0": ("layer", 1e-3), ":batch_norm@0": ("batch", 1e-4)}
    assert check(probe.records, taps, norms) == 2  # sample view (whole rows), feature view
