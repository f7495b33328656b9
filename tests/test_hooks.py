"""Probe: every recorded value against an independent float64 recomputation.

The reference captures activations with its own plain forward hooks, builds every Gram in numpy
float64 and takes numpy eigenvalues; it shares no code with isoprobe.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from isoprobe import Probe
from isoprobe.hooks import discover_sites
from isoprobe.records import EPS_DOMINATED, SINGULAR, format_table

# ----------------------------------------------------------------------------- reference


def ref_stats(X: np.ndarray) -> tuple[float, float]:
    """(isometry gap, orthogonality gap) of the items X (n, m) from numpy eigenvalues; the gap
    is inf when numpy's matrix_rank (SVD, tolerance n·eps·σ_max) says G is singular."""
    G = X @ X.T
    n = len(G)
    lam = np.linalg.eigvalsh(G)
    singular = np.linalg.matrix_rank(G) < n
    gap = math.inf if singular else float(np.log(lam.mean()) - np.log(lam).mean())
    return gap, float(np.linalg.norm(G / np.trace(G) - np.eye(n) / n))


def rowwise_norm_parts(X: np.ndarray, eps: float, center: bool) -> tuple[np.ndarray, np.ndarray]:
    Xc = X - X.mean(1, keepdims=True) if center else X
    return Xc, Xc / np.sqrt((Xc**2).mean(1, keepdims=True) + eps)


def ref_theorem1(Xc: np.ndarray, Xn: np.ndarray) -> tuple[float, bool]:
    """(bound I(centered)·factor, whether I(normalized) reaches it) — Theorem 1, eq. (4)."""
    a = np.linalg.norm(Xc, axis=1)
    factor = 1 + ((a - a.mean()) ** 2).mean() / a.mean() ** 2
    bound = math.exp(-ref_stats(Xc)[0]) * factor
    return bound, math.exp(-ref_stats(Xn)[0]) >= bound * (1 - 1e-9)


class Capture:
    """Plain forward hooks keeping (input, output) of named modules as float64 numpy, per call;
    the output of a module returning a tuple is its first entry."""

    def __init__(self, model: nn.Module, names: list[str]):
        modules = dict(model.named_modules())
        self.data: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {n: [] for n in names}
        self.handles = [modules[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            self.data[name].append((args[0].detach().double().cpu().numpy(), out.detach().double().cpu().numpy()))

        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def items_of(a: np.ndarray, view: str, item, mask) -> np.ndarray:
    if view == "token":
        seq = a[item]
        return seq if mask is None else seq[mask[item].astype(bool)]
    if view == "sample":
        return a.reshape(a.shape[0], -1)
    if view == "spatial":  # image ``item``'s positions; channels-first unless ``mask == "last"``
        image = a[item] if mask == "last" else np.moveaxis(a[item], 0, -1)
        return image.reshape(-1, image.shape[-1])
    return np.moveaxis(a, 1, 0).reshape(a.shape[1], -1)


def check_records(records, capture: Capture, norms: dict, mask=None, rtol=1e-7):
    """Compare every record with the reference. ``norms``: site -> (eps, center) for row-wise norms
    (normalisation over each item's entries) or a function x -> (xc, xn) in the original layout.
    An undecided Theorem 1 check must be eps-dominated: the normalized items miss the bound and
    the exact projection x_c/‖x_c‖ meets it. Returns the number of decided checks."""
    assert records
    checked_theorem = 0
    for r in records:
        x, y = capture.data[r.site][r.step]
        m = None if mask is None else mask
        X = items_of(x, r.view, r.item, m)
        if r.point == "pre":
            Z = X
        elif r.point == "post":
            Z = items_of(y, r.view, r.item, m)
        else:
            spec = norms[r.site]
            if callable(spec):
                xc, xn = spec(x)
                Xc, Xn = items_of(xc, r.view, r.item, m), items_of(xn, r.view, r.item, m)
            else:
                Xc, Xn = rowwise_norm_parts(X, *spec)
            Z = Xc if r.point == "centered" else Xn
        assert r.n == len(Z) and r.dim == Z.shape[1], r
        gap, og = ref_stats(Z)
        assert r.flag in (None, EPS_DOMINATED, SINGULAR), r
        assert r.flag != EPS_DOMINATED or r.theorem1_holds is None, r
        assert (r.flag == SINGULAR) == (math.isinf(gap) and r.n > r.dim - (r.point in ("centered", "normalized"))), r
        if math.isinf(gap):
            assert r.isometry_gap == math.inf and r.isometry == 0.0, r
        else:
            assert r.isometry_gap == pytest.approx(gap, rel=rtol, abs=1e-9), r
            assert r.isometry == pytest.approx(math.exp(-gap), rel=rtol, abs=1e-12), r
        assert r.orthogonality_gap == pytest.approx(og, rel=rtol, abs=1e-12), r
        if r.point == "normalized" and r.theorem1_bound is not None:
            bound, holds = ref_theorem1(Xc, Xn)
            assert r.theorem1_bound == pytest.approx(bound, rel=rtol, abs=1e-12), r
            if r.theorem1_holds is None:
                projected = Xc / np.linalg.norm(Xc, axis=1, keepdims=True)
                assert r.flag == EPS_DOMINATED and not holds and ref_theorem1(Xc, projected)[1], r
                continue
            assert r.flag is None and r.theorem1_holds == holds, r
            checked_theorem += 1
    return checked_theorem


def gpt2_site_names(model) -> tuple[list[str], list[str]]:
    """The test's own list: every nn.LayerNorm and every MLP activation of a GPT-2."""
    norms = [n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)]
    acts = [n for n, _ in model.named_modules() if n.endswith("mlp.act")]
    return norms, acts


# ------------------------------------------------------------------------- acceptance tests


def test_gpt2_small_every_value_matches_reference(gpt2_small):
    model = gpt2_small
    norms, acts = gpt2_site_names(model)
    assert (len(norms), len(acts)) == (25, 12)
    torch.manual_seed(1)
    ids = torch.randint(0, 50257, (2, 64))
    mask = torch.ones(2, 64, dtype=torch.long)
    mask[1, 41:] = 0  # a padded second sequence of 41 tokens
    capture = Capture(model, norms + acts)
    with torch.no_grad(), Probe(model) as probe:
        model(input_ids=ids, attention_mask=mask)
    capture.close()
    records = probe.records
    assert {s.name for s in probe.sites} == set(norms + acts)
    keys = {(r.site, r.point) for r in records}
    assert keys == {(s, p) for s in norms for p in ("pre", "centered", "normalized", "post")} | {
        (s, p) for s in acts for p in ("pre", "post")
    }
    assert {r.n for r in records} == {64, 41} and all(r.view == "token" for r in records)
    eps = {s: (dict(model.named_modules())[s].eps, True) for s in norms}
    checked = check_records(records, capture, eps, mask=mask.numpy())
    assert checked == 25 * 2
    assert all(r.theorem1_holds for r in records if r.point == "normalized")
    # forward order: ln_1 of block 0 first, ln_f last
    assert records[0].site == "transformer.h.0.ln_1" and records[-1].site == "transformer.ln_f"


def test_pretrained_minilm_padded_batch(minilm_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path)
    model = AutoModel.from_pretrained(minilm_path).eval()
    texts = [
        "Isometry measures how evenly a Gram matrix spreads its eigenvalues.",
        "Layer normalization provably increases it.",
        "A short one.",
    ]
    batch = tok(texts, padding=True, return_tensors="pt")
    lengths = batch["attention_mask"].sum(1).tolist()
    assert len(set(lengths)) == 3
    norms = [n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)]
    acts = [n for n, m in model.named_modules() if n.endswith("act_fn") or isinstance(m, nn.Tanh)]
    capture = Capture(model, norms + acts)
    with torch.no_grad(), Probe(model) as probe:
        model(**batch)
    capture.close()
    assert len(probe.sites) == len(norms) + len(acts) == 13 + 6 + 1  # 1: the pooler's tanh
    records = probe.records
    assert {r.view for r in records if r.site == "pooler.activation"} == {"sample"}
    assert {r.n for r in records if r.view == "token"} == set(lengths)
    eps = {s: (dict(model.named_modules())[s].eps, True) for s in norms}
    checked = check_records(records, capture, eps, mask=batch["attention_mask"].numpy())
    assert checked == 13 * 3
    assert all(r.theorem1_holds for r in records if r.point == "normalized")


# ----------------------------------------------------------------------------- views


def test_sample_view_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 48), nn.ReLU(), nn.Linear(48, 48), nn.LayerNorm(48), nn.Tanh())
    x = torch.randn(16, 20)
    capture = Capture(model, ["1", "3", "4"])
    with Probe(model) as probe:
        model(x)
    capture.close()
    records = probe.records
    assert [s.name for s in probe.sites] == ["1", "3", "4"]
    assert all(r.view == "sample" and r.item is None and r.n == 16 for r in records)
    assert check_records(records, capture, {"3": (1e-5, True)}) == 1


def test_sample_view_cnn_groupnorm():
    """GroupNorm(1) normalises whole samples (Theorem 1 checked); GroupNorm(4) does not."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.GELU(), nn.GroupNorm(1, 8), nn.Conv2d(8, 8, 3), nn.GroupNorm(4, 8), nn.ReLU()
    )
    x = torch.randn(6, 3, 9, 9)
    capture = Capture(model, ["1", "2", "4", "5"])
    with Probe(model) as probe:
        model(x)
    capture.close()

    def group_parts(groups, eps):
        def parts(a):
            g = a.reshape(a.shape[0], groups, -1)
            gc = g - g.mean(-1, keepdims=True)
            gn = gc / np.sqrt((gc**2).mean(-1, keepdims=True) + eps)
            return gc.reshape(a.shape), gn.reshape(a.shape)

        return parts

    records = probe.records
    assert all(r.view == "sample" and r.n == 6 for r in records)
    checked = check_records(records, capture, {"2": group_parts(1, 1e-5), "4": group_parts(4, 1e-5)})
    assert checked == 1
    normalized = {r.site: r for r in records if r.point == "normalized"}
    assert normalized["2"].theorem1_holds and normalized["4"].theorem1_holds is None


@pytest.mark.parametrize("train", [True, False])
def test_feature_view_batchnorm_corollary3(train):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 24), nn.BatchNorm1d(24), nn.Tanh(), nn.Linear(24, 12), nn.BatchNorm1d(12))
    model.train(train)
    x = torch.randn(64, 40) * torch.linspace(0.1, 3, 40)
    capture = Capture(model, ["1", "2", "4"])
    with torch.no_grad(), Probe(model) as probe:
        model(x)
    capture.close()
    records = probe.records
    bn = [r for r in records if r.kind == "norm"]
    if not train:  # running statistics: a per-channel affine map, measured at pre and post only
        assert {r.point for r in bn} == {"pre", "post"} and all(r.view == "sample" for r in bn)
        assert check_records(records, capture, {}) == 0
        return
    # auto: one view along depth (sample, as the batch-norm papers plot) at pre and post; the
    # centered and normalized points in the feature view that Corollary 3 concerns
    inner = [r for r in bn if r.point in ("centered", "normalized")]
    assert len(inner) == 4 and all(r.view == "feature" and r.n in (24, 12) and r.dim == 64 for r in inner)
    assert all(r.view == "sample" and r.n == 64 for r in bn if r.point in ("pre", "post"))
    assert [r.point for r in bn if r.site == "1"] == ["pre", "centered", "normalized", "post"]
    assert all(r.view == "sample" for r in records if r.kind == "activation")
    # the feature covariance is normalised per feature (row) with batch statistics, always
    checked = check_records(records, capture, {"1": (1e-5, True), "4": (1e-5, True)})
    assert checked == 2
    assert all(r.theorem1_holds for r in bn if r.point == "normalized")


def test_batchnorm2d_feature_view():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU())
    x = torch.randn(4, 3, 7, 7)
    capture = Capture(model, ["1", "2"])
    with Probe(model, sites="norm", view="feature") as probe:  # every point in the feature view
        model(x)
    with Probe(model, sites="norm") as auto:  # auto: pre and post in the sample view
        model(x)
    capture.close()
    records = probe.records
    assert all(r.n == 6 and r.dim == 4 * 5 * 5 for r in records)
    assert check_records(records, capture, {"1": (1e-5, True)}) == 1
    capture.data["1"].append(capture.data["1"][0])
    auto_records = [dataclasses.replace(r, step=1) for r in auto.records]
    assert [(r.point, r.view) for r in auto_records] == [
        ("pre", "sample"),
        ("centered", "feature"),
        ("normalized", "feature"),
        ("post", "sample"),
    ]
    assert check_records(auto_records, capture, {"1": (1e-5, True)}) == 1


def test_n_larger_than_dim_is_singular():
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    with Probe(model) as probe:
        model(torch.randn(10, 4))
    for r in probe.records:
        assert r.isometry_gap == math.inf and r.isometry == 0.0
    normalized = [r for r in probe.records if r.point == "normalized"]
    # the bound would be 0, true of anything: no check, and the record says why (issue 21)
    assert normalized[0].theorem1_bound is None and normalized[0].theorem1_holds is None
    assert all(r.flag == SINGULAR for r in probe.records)
    assert "n/a: singular" in format_table(probe.records)


# ---------------------------------------------------------------------- site discovery


class ToyRMSNorm(nn.Module):
    """Llama-style RMSNorm of another library: weight and variance_epsilon, no centering."""

    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, d))
        self.variance_epsilon = eps

    def forward(self, h):
        return self.weight * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)


class ToyLayerNorm(ToyRMSNorm):
    def forward(self, h):
        return super().forward(h - h.mean(-1, keepdim=True))


class ScaleNorm(ToyRMSNorm):
    """Named like a norm, has weight and eps, but does not normalise: not a site."""

    def forward(self, h):
        return self.weight * h


def test_foreign_norms_found_by_behaviour():
    d = 16
    model = nn.Sequential(
        nn.Linear(d, d), ToyRMSNorm(d), nn.SiLU(), ToyLayerNorm(d), ScaleNorm(d), nn.RMSNorm(d, eps=1e-5)
    )
    sites = {s.name: s for s in discover_sites(model)}
    assert set(sites) == {"1", "2", "3", "5"}
    assert (sites["1"].norm.rule, sites["3"].norm.rule, sites["5"].norm.rule) == ("rms", "layer", "rms")
    assert sites["1"].norm.eps == 1e-6
    torch.manual_seed(0)
    x = torch.randn(3, 12, d)
    capture = Capture(model, ["1", "2", "3", "5"])
    with Probe(model) as probe:
        model(x)
    capture.close()
    records = probe.records
    spec = {"1": (1e-6, False), "3": (1e-6, True), "5": (1e-5, False)}
    assert check_records(records, capture, spec) == 3 * 3
    # an RMSNorm does not centre: its centered point is its pre point
    by = {(r.site, r.point, r.item): r for r in records}
    for item in range(3):
        assert by[("1", "centered", item)].isometry_gap == by[("1", "pre", item)].isometry_gap


def test_llama_style_model():
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
    )
    model = LlamaModel(config).eval()
    norm_names = [n for n, m in model.named_modules() if type(m).__name__ == "LlamaRMSNorm"]
    probe = Probe(model, sites="norm")
    assert [s.name for s in probe.sites] == norm_names and len(norm_names) == 5
    assert all(s.norm.rule == "rms" and s.norm.eps == config.rms_norm_eps for s in probe.sites)
    capture = Capture(model, norm_names)
    with torch.no_grad(), probe:
        model(input_ids=torch.randint(0, 100, (2, 10)))
    capture.close()
    spec = dict.fromkeys(norm_names, (config.rms_norm_eps, False))
    # a repeated token id makes the first norm's G_c singular (bound 0): no check there
    finite = sum(1 for r in probe.records if r.point == "centered" and math.isfinite(r.isometry_gap))
    assert check_records(probe.records, capture, spec) == finite >= 5 * 2 - 1


def test_site_selection_and_messages(gpt2_small):
    probe = Probe(gpt2_small, sites="transformer.h.*.ln_*")
    assert len(probe.sites) == 24 and all(s.kind == "norm" for s in probe.sites)
    assert len(Probe(gpt2_small, sites="activation").sites) == 12
    assert len(Probe(gpt2_small, sites=["transformer.ln_f", "activation"]).sites) == 13
    with pytest.raises(ValueError, match="matches none of the module names"):
        Probe(gpt2_small, sites="transformer.h.*.ln1")
    with pytest.raises(ValueError, match="selects no site; the model has only: norm"):
        Probe(nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3)), sites="activation")
    no_site = "no site found in Sequential: searched .*LayerNorm.*probe input.*select any module by name"
    linear = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    with pytest.raises(ValueError, match=no_site):
        Probe(linear)
    assert [(s.name, s.kind) for s in Probe(linear, sites="1").sites] == [("1", "module")]
    with pytest.raises(ValueError, match="view must be one of"):
        Probe(gpt2_small, view="tokens")
    with pytest.raises(ValueError, match="every must be a positive integer"):
        Probe(gpt2_small, every=0)


def test_record_keys_are_typeable(gpt2_small):
    with torch.no_grad(), Probe(gpt2_small, sites="transformer.h.3.*") as probe:
        gpt2_small(input_ids=torch.randint(0, 50257, (1, 8)))
    pre = probe["transformer.h.3.ln_1:pre"]
    assert len(pre) == 1 and pre[0].key == "transformer.h.3.ln_1:pre"
    assert len(probe["*:normalized"]) == 2


# ---------------------------------------------------------------- the model left as found


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


class Boom(nn.Module):
    def __init__(self):
        super().__init__()
        self.fire = False

    def forward(self, x):
        if self.fire:
            raise RuntimeError("boom")
        return x


def test_hooks_removed_after_exception_and_partial_records_kept():
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), Boom(), nn.LayerNorm(8))
    before = _hook_count(model)
    model[2].fire = True
    with pytest.raises(RuntimeError, match="boom"), Probe(model) as probe:
        model(torch.randn(4, 5))
    assert _hook_count(model) == before == 0
    assert {r.site for r in probe.records} == {"1"}  # the ReLU ran before the error
    model[2].fire = False
    with Probe(model):
        assert _hook_count(model) > 0
    assert _hook_count(model) == 0


def test_autograd_and_outputs_unchanged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 1))
    x = torch.randn(8, 6)

    def grads():
        model.zero_grad()
        out = model(x)
        out.square().sum().backward()
        return out.detach().clone(), [p.grad.clone() for p in model.parameters()]

    out0, g0 = grads()
    with Probe(model) as probe:
        out1, g1 = grads()
    assert torch.equal(out0, out1)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1))
    assert len(probe.records) == 4 + 2  # LayerNorm: 4 points, GELU: 2; one sample-view Gram each
    with torch.no_grad(), Probe(model) as probe:
        assert torch.equal(model(x), out0)
    with torch.inference_mode(), Probe(model) as probe:
        model(x)
    assert len(probe.records) == 6


class Residual(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln, self.act = nn.LayerNorm(d), nn.ReLU()

    def forward(self, x):
        return x + self.act(self.ln(x))  # reads x again after the hooks saw it


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_activations_read_by_the_hooks_are_not_modified(dtype):
    torch.manual_seed(0)
    model = Residual(12).to(dtype)
    x = torch.randn(2, 5, 12, dtype=dtype)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    expected = model(x)
    with Probe(model, attention_mask=mask) as probe:
        assert torch.equal(model(x), expected)
    assert len(probe.records) == 2 * (4 + 2)


def test_modes_untouched_and_every():
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.1), nn.BatchNorm1d(8), nn.ReLU())
    model.train()
    model[1].eval()  # a mixed state must survive as it is
    modes = [m.training for m in model.modules()]
    with torch.no_grad(), Probe(model, every=3) as probe:
        for _ in range(7):
            model(torch.randn(10, 4))
    assert [m.training for m in model.modules()] == modes
    assert sorted({r.step for r in probe.records}) == [0, 3, 6]


def test_pop_records_and_summary():
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
    with Probe(model) as probe:
        for _ in range(3):
            model(torch.randn(5, 4))
        rows = probe.summary()
        popped = probe.pop_records()
        model(torch.randn(5, 4))
    assert len(popped) == 6 and len(probe.records) == 2
    gaps = [r.isometry_gap for r in popped if r.point == "pre"]
    (pre,) = [row for row in rows if row["point"] == "pre"]
    assert pre["count"] == 3 and pre["gap_mean"] == pytest.approx(np.mean(gaps))
    assert pre["gap_std"] == pytest.approx(np.std(gaps))


class SharedGelu(nn.Module):
    """One GELU module applied after two linear layers: two calls per forward."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(12, 24), nn.Linear(24, 20), nn.GELU()

    def forward(self, x):
        return self.act(self.fc2(self.act(self.fc1(x))))


def test_module_called_twice_records_each_call_apart():
    torch.manual_seed(0)
    model = SharedGelu()
    capture = Capture(model, ["act"])  # two (input, output) pairs per forward, in call order
    with torch.no_grad(), Probe(model) as probe:
        for _ in range(3):
            model(torch.randn(2, 9, 12))
    capture.close()
    records = probe.records
    assert {(r.step, r.call) for r in records} == {(s, c) for s in range(3) for c in (0, 1)}
    for r in records:  # every value against the reference of that very call
        x, y = capture.data["act"][2 * r.step + r.call]
        Z = (x if r.point == "pre" else y)[r.item]
        gap, og = ref_stats(Z)
        assert r.dim == (24 if r.call == 0 else 20)
        assert r.isometry_gap == pytest.approx(gap, rel=1e-7) and r.orthogonality_gap == pytest.approx(og, rel=1e-7)
    # lookups: no "@" = every call; "@k" = the k-th call only
    assert len(probe["act:pre"]) == 3 * 2 * 2
    assert {r.call for r in probe["act@1:pre"]} == {1} and len(probe["act@1:pre"]) == 3 * 2
    assert {r.call for r in probe["act@0:*"]} == {0} and len(probe["act@0:*"]) == 3 * 2 * 2
    assert {r.key for r in records} == {"act:pre", "act:post", "act@1:pre", "act@1:post"}
    # the summary keeps the calls apart: its means are those of each call's own records
    rows = {(row["site"], row["call"], row["point"]): row for row in probe.summary()}
    assert sorted(rows) == [("act", c, p) for c in (0, 1) for p in ("post", "pre")]
    for (_, call, point), row in rows.items():
        own = [r.isometry_gap for r in records if (r.call, r.point) == (call, point)]
        assert row["count"] == 6 and row["gap_mean"] == pytest.approx(np.mean(own))
        assert row["key"] == (f"act:{point}" if call == 0 else f"act@1:{point}")
    table = format_table(records).splitlines()
    assert [line.split()[0] for line in table[2:]] == ["act", "act", "act@1", "act@1"]  # one line per point


# ---------------------------------------------------------------------- numerics


def test_half_precision_model_gives_float64_answer_of_its_activations():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.LayerNorm(64), nn.GELU()).to(torch.bfloat16)
    x = torch.randn(3, 20, 32, dtype=torch.bfloat16)
    capture = Capture(model, ["1", "2"])
    with torch.no_grad(), Probe(model) as probe:
        model(x)
    capture.close()
    assert check_records(probe.records, capture, {"1": (1e-5, True)}) == 3


def test_autocast_does_not_lower_gram_precision():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.LayerNorm(64), nn.ReLU())
    x = torch.randn(2, 24, 32)
    capture = Capture(model, ["1", "2"])
    with torch.autocast("cpu", dtype=torch.bfloat16), Probe(model) as probe:
        model(x)
    capture.close()
    assert check_records(probe.records, capture, {"1": (1e-5, True)}) == 2


def test_float32_gram_option_close_to_float64():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.LayerNorm(64), nn.ReLU())
    x = torch.randn(2, 24, 32)
    with Probe(model) as p64, Probe(model, gram_dtype=torch.float32) as p32:
        model(x)
    for a, b in zip(p64.records, p32.records):
        assert a.key == b.key and b.isometry_gap == pytest.approx(a.isometry_gap, rel=1e-4)
    with pytest.raises(ValueError, match="gram_dtype"):
        Probe(model, gram_dtype=torch.float16)


def test_deferred_statistics_path_matches(monkeypatch):
    """The device path (statistics finished once per forward) gives the same records."""
    from isoprobe import hooks

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.GELU(), nn.RMSNorm(32))
    x = torch.randn(3, 10, 16)
    mask = torch.ones(3, 10)
    mask[0, 6:] = 0
    with Probe(model, attention_mask=mask) as direct:
        model(x)
    monkeypatch.setattr(hooks, "_defer", lambda device: True)
    with Probe(model, attention_mask=mask) as deferred:
        model(x)
    capped = Probe(model, attention_mask=mask)
    capped.max_pending_bytes = 1  # finish the waiting statistics at every site
    with capped:
        model(x)
    assert len(direct.records) == len(deferred.records) == len(capped.records) == 10 * 3
    for a, b, c in zip(direct.records, deferred.records, capped.records):
        assert a == b == c


def test_nonfinite_activations_are_flagged_and_run_continues():
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU())
    x = torch.randn(3, 6, 8)
    x[1, 2, 0] = float("nan")
    with torch.no_grad(), Probe(model) as probe:
        out = model(x)
    assert torch.isnan(out[1]).any() and not torch.isnan(out[0]).any()
    bad = [r for r in probe.records if r.item == 1]
    good = [r for r in probe.records if r.item != 1]
    assert bad and all(r.flag == "non-finite" and r.isometry is None for r in bad)
    assert all(r.flag is None and r.isometry is not None for r in good)


def test_one_token_sequences_are_undefined():
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16))
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    with Probe(model, attention_mask=mask) as probe:
        model(torch.randn(2, 4, 8))
    one = [r for r in probe.records if r.item == 1]
    assert all(r.n == 1 and r.flag.startswith("undefined") and r.isometry_gap is None for r in one)
    with Probe(model) as probe:
        model(torch.randn(2, 1, 8))
    assert all(r.flag.startswith("undefined") for r in probe.records)


class MaskedEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(8)

    def forward(self, x, attention_mask=None):
        return self.ln(x)


def test_attention_mask_found_by_keyword_or_position():
    model = MaskedEncoder()
    x, mask = torch.randn(2, 5, 8), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    with Probe(model) as probe:
        model(x, mask)
        model(x, attention_mask=mask)
        model(x)
    assert [r.n for r in probe.records if r.point == "pre"] == [3, 4, 3, 4, 5, 5]


def test_attention_mask_of_other_shape_warns_and_counts_all_tokens():
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh())
    probe = Probe(model, attention_mask=torch.ones(2, 5))
    with probe, pytest.warns(UserWarning, match="does not match"):
        model(torch.randn(2, 4, 8))
    assert all(r.n == 4 for r in probe.records)


def test_token_view_on_flat_activations_is_a_clear_error():
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh())
    with pytest.raises(ValueError, match="token view needs"), Probe(model, view="token"):
        model(torch.randn(4, 8))


@pytest.mark.parametrize("eps", [1.0, 1e-12])
def test_theorem1_check_is_undecided_where_eps_dominates(eps):
    """var ≈ 1e-4 with 5 % spread: with eps = 1 the norm is nearly linear, its normalized items
    miss the bound (the projection meets it): undecided, flagged, values still reported; with
    eps = 1e-12 on the same input the check is decided and holds."""
    torch.manual_seed(0)
    ln = nn.LayerNorm(64, eps=eps, elementwise_affine=False)
    scale = 1e-2 * (1 + 0.05 * torch.rand(2, 30, 1))
    x = torch.randn(2, 30, 64) * scale
    capture = Capture(ln, [""])
    with Probe(ln) as probe:
        ln(x)
    capture.close()
    decided = check_records(probe.records, capture, {"": (eps, True)})
    normalized = [r for r in probe.records if r.point == "normalized"]
    assert all(r.isometry_gap is not None and r.theorem1_bound is not None for r in normalized)
    if eps == 1.0:
        assert decided == 0 and all(r.theorem1_holds is None and r.flag == EPS_DOMINATED for r in normalized)
    else:
        assert decided == 2 and all(r.theorem1_holds is True and r.flag is None for r in normalized)


def test_normalized_point_of_a_numerically_singular_centered_gram():
    """A token of tiny norm makes G_c singular to rounding; normalising it restores the rank."""
    torch.manual_seed(0)
    ln = nn.LayerNorm(16, eps=1e-30).double()
    x = torch.randn(1, 6, 16, dtype=torch.float64)
    x[0, 2] *= 1e-9
    capture = Capture(ln, [""])
    with Probe(ln) as probe:
        ln(x)
    capture.close()
    by = {r.point: r for r in probe.records}
    assert by["centered"].isometry_gap == math.inf and math.isfinite(by["normalized"].isometry_gap)
    # I(centered) = 0 makes Theorem 1's bound 0, true of anything: not counted as a check
    assert check_records(probe.records, capture, {"": (1e-30, True)}) == 0
    assert by["normalized"].theorem1_holds is None and by["normalized"].theorem1_bound is None


@pytest.mark.skipif(not os.environ.get("ISOPROBE_TEST_CUDA"), reason="set ISOPROBE_TEST_CUDA=1 on a GPU")
def test_cuda_matches_cpu():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.GELU(), nn.BatchNorm1d(10))
    x = torch.randn(4, 10, 32 // 2)
    mask = torch.ones(4, 10)
    mask[2, 3:] = 0
    with Probe(model, attention_mask=mask) as cpu:
        model(x)
    model.cuda()
    with Probe(model, attention_mask=mask) as gpu:
        model(x.cuda())
    for a, b in zip(cpu.records, gpu.records):
        assert a.key == b.key and b.isometry_gap == pytest.approx(a.isometry_gap, rel=1e-6)


def test_probe_sees_isoprobe_own_networks():
    """The papers' nets declare their sites: LN-MLP activations and Meterez's RMS batch norm,
    whose feature-view Corollary 3 check must hold and whose normalized point must equal the
    module's own output (no affine part)."""
    from isoprobe.nets import BNMLP, LNMLP
    from isoprobe.theory import LNMLPSpec

    ln = LNMLP(LNMLPSpec("tanh", depth=3, width=32), in_features=16, seed=0)
    with Probe(ln) as probe:
        ln(torch.randn(8, 16))
    kinds = {(r.site, r.kind) for r in probe.records}
    assert ("layers.0.act", "activation") in kinds and ("layers.0.norm", "norm") in kinds

    bn = BNMLP(
        32,
        32,
        4,
        weights="orthogonal",
        norm="rms",
        activation="identity",
        generator=torch.Generator().manual_seed(0),
        dtype=torch.float64,
    )
    x = torch.randn(48, 32, dtype=torch.float64)  # as many inputs as channels, more samples: full rank
    with Probe(bn, sites="norm") as auto:  # auto: Corollary 3 checked in the feature view
        bn(x)
    views = {(r.point, r.view) for r in auto.records}
    assert views == {("pre", "sample"), ("centered", "feature"), ("normalized", "feature"), ("post", "sample")}
    assert all(r.theorem1_holds for r in auto.records if r.point == "normalized")
    with Probe(bn, sites="norm", view="feature") as probe:
        bn(x)
    norm_records = [r for r in probe.records if r.kind == "norm"]
    assert norm_records and all(r.view == "feature" for r in norm_records)
    checks = [r for r in norm_records if r.point == "normalized"]
    assert checks and all(r.theorem1_holds for r in checks)
    inner = {(r.site, r.point): r.isometry_gap for r in auto.records if r.view == "feature"}
    assert inner == {
        (r.site, r.point): r.isometry_gap for r in checks + [r for r in norm_records if r.point == "centered"]
    }
    by_site = {}
    for r in norm_records:
        by_site.setdefault(r.site, {})[r.point] = r.isometry_gap
    for points in by_site.values():
        assert points["normalized"] == pytest.approx(points["post"], rel=1e-9)
        assert points["centered"] == pytest.approx(points["pre"], rel=1e-12)


# ------------------------------------------------------------- in-place modules, one view along depth


class PreCapture:
    """The true inputs (read by forward pre-hooks, before the module runs) and outputs of named
    modules, as float64 numpy, per call: the reference for in-place modules."""

    def __init__(self, model: nn.Module, names: list[str]):
        modules = dict(model.named_modules())
        self.data: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {n: [] for n in names}
        self._inputs: dict[str, list[np.ndarray]] = {n: [] for n in names}
        self.handles = []
        for n in names:
            self.handles.append(modules[n].register_forward_pre_hook(self._pre(n)))
            self.handles.append(modules[n].register_forward_hook(self._post(n)))

    def _pre(self, name):
        def hook(module, args):
            self._inputs[name].append(args[0].detach().double().numpy().copy())

        return hook

    def _post(self, name):
        def hook(module, args, output):
            self.data[name].append((self._inputs[name].pop(), output.detach().double().numpy().copy()))

        return hook

    def close(self):
        for h in self.handles:
            h.remove()


class _InplaceNet(nn.Module):
    """Conv net with ``inplace=True`` activations everywhere, one of them reused in a loop."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.convs = nn.ModuleList(nn.Conv2d(8, 8, 3, padding=1) for _ in range(3))
        self.act6 = nn.ReLU6(inplace=True)
        self.silu = nn.SiLU(inplace=True)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.relu(self.bn(self.conv(x)))
        for conv in self.convs:  # the same in-place module, three calls
            x = self.act6(4 * conv(x))
        x = self.silu(x)
        return self.fc(x.mean((2, 3)))


def _reference_records(probe_records, data, rtol=1e-7):
    for r in probe_records:
        x, y = data[r.site][r.call]
        Z = items_of(x if r.point == "pre" else y, r.view, r.item, None)
        gap, og = ref_stats(Z)
        assert r.isometry_gap == (math.inf if math.isinf(gap) else pytest.approx(gap, rel=rtol, abs=1e-9)), r
        assert r.orthogonality_gap == pytest.approx(og, rel=rtol, abs=1e-12), r


@pytest.mark.parametrize("view", ["auto", "spatial"])
def test_inplace_activations_pre_is_the_true_input(view):
    """``pre`` of an in-place activation is its input before it ran (before, pre == post)."""
    torch.manual_seed(0)
    model = _InplaceNet().double()
    x = torch.randn(6, 3, 2, 2, dtype=torch.float64)  # 4 positions, 8 channels: finite spatial Grams
    names = ["relu", "act6", "silu"]
    capture = PreCapture(model, names)
    with torch.no_grad(), Probe(model, sites="activation", view=view) as probe:
        out = model(x)
    capture.close()
    records = probe.records
    assert sorted({(r.site, r.call) for r in records}) == [
        ("act6", 0),
        ("act6", 1),
        ("act6", 2),
        ("relu", 0),
        ("silu", 0),
    ]
    _reference_records(records, capture.data)
    gaps = {(r.site, r.call, r.point, r.item): r.isometry_gap for r in records}
    assert any(gaps[k] != gaps[(*k[:2], "post", k[3])] for k in gaps if k[2] == "pre")
    with torch.no_grad():
        assert torch.equal(out, model(x))  # the model's output as without the Probe


def test_inplace_activation_pre_with_float32_grams():
    torch.manual_seed(1)
    model = _InplaceNet().double()
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64)
    capture = PreCapture(model, ["relu", "act6"])
    with torch.no_grad(), Probe(model, sites=["relu", "act6"], gram_dtype=torch.float32) as probe:
        model(x)
    capture.close()
    _reference_records(probe.records, capture.data, rtol=1e-4)


def test_default_view_is_one_view_along_depth():
    """ResNet-like stem: the batch norm's output and the next ReLU's input are one tensor and get
    one number in the default view (before: a C×C feature Gram against a B×B sample Gram)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(inplace=True),
        nn.Conv2d(16, 16, 3),
        nn.BatchNorm2d(16),
    )
    with torch.no_grad(), Probe(model) as probe:
        model(torch.randn(8, 3, 6, 6))
    by = {(r.site, r.point): r for r in probe.records}
    assert by["1", "post"].view == by["2", "pre"].view == "sample"
    assert by["1", "post"].isometry_gap == pytest.approx(by["2", "pre"].isometry_gap, rel=1e-12)
    assert {r.view for r in probe.records if r.point in ("pre", "post")} == {"sample"}
    assert by["1", "normalized"].view == "feature" and by["1", "normalized"].theorem1_holds


def test_spatial_view_channels_last_layernorm_theorem1():
    """ConvNeXt-style block: a channels-last LayerNorm, a GELU on channels-last maps, and a
    channels-first LayerNorm (LayerNorm2d-like, by behaviour). In view="spatial" every 4-D
    site's items are its image's positions with the channels as entries; Theorem 1 is checked
    at both norms there; the same tensor gets one number at consecutive sites."""

    class LayerNorm2d(nn.LayerNorm):
        def forward(self, x):
            return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12)
            self.norm = nn.LayerNorm(12)
            self.fc1, self.act, self.fc2 = nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 12)
            self.down = LayerNorm2d(12)

        def forward(self, x):
            h = self.norm(self.dw(x).permute(0, 2, 3, 1))
            h = self.fc2(self.act(self.fc1(h))).permute(0, 3, 1, 2)
            return self.down(x + h)

    torch.manual_seed(0)
    model = Block().double()
    x = torch.randn(3, 12, 3, 3, dtype=torch.float64)
    capture = PreCapture(model, ["norm", "act", "down"])
    with torch.no_grad(), Probe(model, view="spatial") as probe:
        model(x)
    capture.close()
    records = probe.records
    assert {r.view for r in records} == {"spatial"} and {r.item for r in records} == {0, 1, 2}
    assert {r.n for r in records} == {9} and {r.dim for r in records if r.site != "act"} == {12}
    assert {r.dim for r in records if r.site == "act"} == {16}  # channels-last, as its norm
    last = {"norm", "act"}
    for r in records:
        x_in, y_out = capture.data[r.site][0]
        layout = "last" if r.site in last else None
        X = items_of(x_in, "spatial", r.item, layout)
        if r.point == "post":
            Z = items_of(y_out, "spatial", r.item, layout)
        elif r.point == "pre":
            Z = X
        else:
            Z = rowwise_norm_parts(X, 1e-5, True)[r.point == "normalized"]
        assert r.isometry_gap == pytest.approx(ref_stats(Z)[0], rel=1e-7), r
    checks = [r for r in records if r.point == "normalized"]
    assert len(checks) == 6 and all(r.theorem1_holds for r in checks)


def test_forward_that_raises_before_any_site_does_not_warn():
    class Fails(nn.Module):
        def __init__(self):
            super().__init__()
            self.act = nn.ReLU()

        def forward(self, x):
            raise ValueError("bad input")

    model = Fails()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with Probe(model) as probe, pytest.raises(ValueError, match="bad input"):
            model(torch.randn(2, 3))
    assert probe.records == []


def test_an_activation_that_changes_the_shape_is_measured_from_input_and_output():
    """GLU halves its input: ``pre`` and ``post`` each in their own width, against numpy."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.GLU()).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    capture = Capture(model, ["1"])
    with torch.no_grad(), Probe(model) as probe:
        model(x)
    capture.close()
    assert [(r.point, r.dim) for r in probe.records] == [("pre", 8), ("post", 4)]
    check_records(probe.records, capture, {})


def test_a_named_module_that_changes_its_input_in_place_is_skipped_with_a_warning():
    class AddInPlace(nn.Module):
        def forward(self, x):
            return x.add_(1.0)

    model = nn.Sequential(nn.Linear(4, 4), AddInPlace(), nn.Tanh())
    with torch.no_grad(), Probe(model, sites=["1", "2"]) as probe, pytest.warns(UserWarning, match="changed its input"):
        model(torch.randn(6, 4))
    assert {r.site for r in probe.records} == {"2"}
