"""Named sites: any module by its qualified name, every value against an independent float64
recomputation from activations captured here with plain forward hooks (test_hooks.Capture)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from test_hooks import Capture, check_records, ref_stats, rowwise_norm_parts
from torch import nn

from isoprobe import LNMLP, Probe
from isoprobe.names import match_name
from isoprobe.sites import NormSpec, discover_sites
from isoprobe.theory.spec import CENTERINGS, PROJECTIONS, LNMLPSpec

NAMES = [
    "transformer",
    "transformer.h",
    "transformer.h.0",
    "transformer.h.0.attn",
    "transformer.h.0.attn.c_attn",
    "transformer.h.0.ln_1",
    "transformer.h.11.mlp.act",
    "transformer.ln_f",
]


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("transformer.h.*", ["transformer.h.0"]),
        ("*.attn", ["transformer.h.0.attn"]),
        ("attn", ["transformer.h.0.attn"]),
        ("ln_f", ["transformer.ln_f"]),
        ("transformer.h.*.ln_*", ["transformer.h.0.ln_1"]),
        ("h.*.ln_?", ["transformer.h.0.ln_1"]),
        ("transformer.h.**", NAMES[1:7]),
        ("transformer.h.1?.**.act", ["transformer.h.11.mlp.act"]),
        ("transformer.**", NAMES),
        ("*", NAMES),
        ("h", ["transformer.h"]),
        ("ransformer.h", []),
    ],
)
def test_name_globs_match_dotted_components_and_suffixes(pattern, expected):
    assert [n for n in NAMES if match_name(n, pattern)] == expected


def first_in(args):
    return args[0]


def test_gpt2_blocks_and_attention_outputs_match_reference(gpt2_small):
    model = gpt2_small
    blocks = [f"transformer.h.{i}" for i in range(12)]
    attns = [f"{b}.attn" for b in blocks]
    torch.manual_seed(2)
    ids = torch.randint(0, 50257, (2, 48))
    mask = torch.ones(2, 48, dtype=torch.long)
    mask[0, 30:] = 0
    capture = Capture(model, blocks + attns)
    with torch.no_grad(), Probe(model, sites=["transformer.h.*", "*.attn"]) as probe:
        model(input_ids=ids, attention_mask=mask)
    capture.close()
    assert [s.name for s in probe.sites] == [n for pair in zip(blocks, attns) for n in pair]
    assert {s.kind for s in probe.sites} == {"module"}
    records = probe.records
    assert {(r.site, r.point) for r in records} == {(s, p) for s in blocks + attns for p in ("pre", "post")}
    assert {r.view for r in records} == {"token"} and {r.n for r in records} == {30, 48}
    check_records(records, capture, {}, mask=mask.numpy())
    # the block's input is the previous block's output: the same Gram, the same value
    for i in range(1, 12):
        pre = {r.item: r.isometry_gap for r in probe[f"transformer.h.{i}:pre"]}
        post = {r.item: r.isometry_gap for r in probe[f"transformer.h.{i - 1}:post"]}
        assert pre == pytest.approx(post, rel=1e-12)


def test_named_modules_next_to_discovered_norms_keep_their_points(gpt2_small):
    probe = Probe(gpt2_small, sites=["transformer.h.0", "transformer.h.0.ln_*", "activation"])
    kinds = {s.name: s.kind for s in probe.sites}
    assert kinds == {
        "transformer.h.0": "module",
        "transformer.h.0.ln_1": "norm",
        "transformer.h.0.ln_2": "norm",
        **{f"transformer.h.{i}.mlp.act": "activation" for i in range(12)},
    }
    with torch.no_grad(), probe:
        gpt2_small(input_ids=torch.randint(0, 50257, (1, 10)))
    assert {r.point for r in probe["transformer.h.0.ln_1"]} == {"pre", "centered", "normalized", "post"}
    assert {r.point for r in probe["transformer.h.0"]} == {"pre", "post"}


def test_pretrained_minilm_layers_attention_and_pooler(minilm_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path)
    model = AutoModel.from_pretrained(minilm_path).eval()
    batch = tok(
        ["Named sites measure whole blocks.", "Attention outputs too, and the pooler."],
        padding=True,
        return_tensors="pt",
    )
    layers = [f"encoder.layer.{i}" for i in range(6)]
    attention = [f"{n}.attention" for n in layers]
    norms = [f"{n}.output.LayerNorm" for n in layers]
    capture = Capture(model, [*layers, *attention, *norms, "pooler"])
    with (
        torch.no_grad(),
        Probe(model, sites=["encoder.layer.*", "*.attention", "layer.*.output.LayerNorm", "pooler"]) as probe,
    ):
        model(**batch)
    capture.close()
    assert len(probe.sites) == 6 * 3 + 1
    records = probe.records
    # the pooler maps (batch, seq, hidden) to (batch, hidden): both points in the sample view
    assert {(r.view, r.n) for r in probe["pooler"]} == {("sample", 2)}
    mask = batch["attention_mask"].numpy()
    token = [r for r in records if r.site != "pooler"]
    eps = {n: (dict(model.named_modules())[n].eps, True) for n in norms}
    assert check_records(token, capture, eps, mask=mask) == 6 * 2
    check_records(probe["pooler"], capture, {})


def test_module_sites_that_cannot_be_measured_warn_once_and_record_nothing(gpt2_small):
    probe = Probe(gpt2_small, sites=["transformer.wte", "transformer.h.0"])
    with torch.no_grad(), probe, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            gpt2_small(input_ids=torch.randint(0, 50257, (1, 6)))
    messages = [str(w.message) for w in caught if "not measured" in str(w.message)]
    assert messages == [
        (
            "site 'transformer.wte' is not measured: its first input and its output are not both "
            "floating-point tensors (got a torch.int64 tensor and a torch.float32 tensor)"
        )
    ]
    assert {r.site for r in probe.records} == {"transformer.h.0"}


# --------------------------------------------------------------- isoprobe's own networks


@pytest.mark.parametrize("projection", PROJECTIONS)
@pytest.mark.parametrize("centering", CENTERINGS)
def test_every_lnmlp_norm_module_is_a_site(centering, projection):
    """Every non-identity norm module of every LNMLP variant is measured (mean-field ones too)."""
    spec = LNMLPSpec("tanh", depth=2, width=24, centering=centering, projection=projection)
    net = LNMLP(spec, 10, dtype=torch.float64)
    norm_modules = [n for n, m in net.named_modules() if n.endswith(".norm") and not isinstance(m, nn.Identity)]
    with torch.no_grad(), Probe(net, sites=None) as probe:
        x = torch.randn(16, 10, dtype=torch.float64)
        net(x)
    names = {s.name for s in probe.sites}
    assert set(norm_modules) <= names, f"{centering}/{projection}: {set(norm_modules) - names} not seen"
    assert {f"layers.{i}.act" for i in range(2)} <= names
    capture = Capture(net, norm_modules)
    net(x)
    capture.close()
    is_norm = projection == "layer" and centering in ("none", "layer")  # an RMS norm or a LayerNorm
    for r in probe.records:
        if r.site not in norm_modules:
            continue
        assert r.kind == ("norm" if is_norm else "module"), r
        xin, out = capture.data[r.site][0]
        if r.point in ("pre", "post"):
            Z = xin if r.point == "pre" else out
        else:
            Z = rowwise_norm_parts(xin, spec.eps, center=centering == "layer")[r.point == "normalized"]
        gap, _ = ref_stats(Z)
        assert r.isometry_gap == pytest.approx(gap, rel=1e-9, abs=1e-12) or (math.isinf(gap) and r.isometry_gap == gap)


def test_lnmlp_fc_layers_are_named_sites():
    net = LNMLP(LNMLPSpec("relu", depth=3, width=32), 16, dtype=torch.float64)
    x = torch.randn(12, 16, dtype=torch.float64)
    with torch.no_grad(), Probe(net, sites="layers.*.fc") as probe:
        net(x)
    with torch.no_grad():
        reps = net.representations(x)
    for i in range(3):  # the fc input of layer i is the representation x_i (sample view)
        (rec,) = probe[f"layers.{i}.fc:pre"]
        assert rec.view == "sample" and rec.isometry_gap == pytest.approx(ref_stats(reps[i].numpy())[0], rel=1e-9)
        (post,) = probe[f"layers.{i}.fc:post"]
        W = net.layers[i].fc.weight.detach().numpy()
        assert post.isometry_gap == pytest.approx(ref_stats(reps[i].numpy() @ W.T)[0], rel=1e-9)
    assert np.isfinite([r.isometry_gap for r in probe.records]).all()


# --------------------------------------------------------------- discovery by behaviour


def test_olmo_layernorm_bloom_gelu_and_channels_first_layernorm_by_behaviour():
    """Found by what they do: OLMo's LayerNorm has no parameter and no eps attribute (its eps,
    1e-5, is measured), BLOOM's GELU is its own class, ConvNeXt's LayerNorm subclasses
    nn.LayerNorm but normalises over the channels; every value against the reference."""
    from transformers.models.bloom.modeling_bloom import BloomGelu
    from transformers.models.convnext.modeling_convnext import ConvNextLayerNorm
    from transformers.models.olmo.modeling_olmo import OlmoLayerNorm

    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(12, 16), OlmoLayerNorm(16), BloomGelu()).double()
    conv = nn.Sequential(nn.Conv2d(3, 8, 3), ConvNextLayerNorm(8, eps=1e-6, data_format="channels_first")).double()
    found = {s.name: s for s in Probe(seq).sites}
    assert {n: s.kind for n, s in found.items()} == {"1": "norm", "2": "activation"}
    assert (found["1"].norm.rule, found["1"].norm.eps) == ("layer", 1e-5)
    (ln,) = Probe(conv).sites
    assert (ln.name, ln.norm.rule, ln.norm.eps, ln.norm.channels) == ("1", "layer", 1e-6, True)

    x = torch.randn(3, 9, 12, dtype=torch.float64)
    capture = Capture(seq, ["1", "2"])
    with torch.no_grad(), Probe(seq) as probe:
        seq(x)
    capture.close()
    assert check_records(probe.records, capture, {"1": (1e-5, True)}) == 3

    def channel_parts(a):  # the reference's own channels-first layer norm, before the affine part
        ac = a - a.mean(1, keepdims=True)
        return ac, ac / np.sqrt((ac**2).mean(1, keepdims=True) + 1e-6)

    img = torch.randn(5, 3, 6, 6, dtype=torch.float64)
    capture = Capture(conv, ["1"])
    with torch.no_grad(), Probe(conv) as probe:
        conv(img)
    capture.close()
    # pre and post in the depth view; the norm's own points where it normalises whole items:
    # each image's positions over the channels (the spatial view)
    assert {(r.point, r.view) for r in probe.records} >= {("pre", "sample"), ("normalized", "spatial")}
    assert {r.item for r in probe.records if r.view == "spatial"} == set(range(5))
    check_records(probe.records, capture, {"1": channel_parts})


class _OwnLayerNorm(nn.Module):
    """Normalises itself with the weight and bias of a wrapped nn.LayerNorm that never runs
    (how TransformerLens's NormalizationBridge computes, with its eps from elsewhere);
    ``call_inner`` runs the wrapped one."""

    def __init__(self, d: int, call_inner: bool = False):
        super().__init__()
        self.inner, self.call_inner = nn.LayerNorm(d, eps=1e-3 if call_inner else 0.1), call_inner

    def __getattr__(self, name):  # forwards to the wrapped module, as the bridge does
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "inner":
                raise
            return getattr(self.inner, name)

    def forward(self, x):
        if self.call_inner:
            return self.inner(x)
        xc = x - x.mean(-1, keepdim=True)
        return xc / (xc.square().mean(-1, keepdim=True) + 1e-3).sqrt() * self.inner.weight + self.inner.bias


def test_a_norm_computed_from_a_wrapped_layernorm_is_the_site_and_the_wrapped_one_is_not():
    """The wrapper that normalises itself is found as a norm in place of the nn.LayerNorm it
    wraps, which never runs (its eps, 1e-3, is measured: the 0.1 it forwards from the wrapped
    module is not what it computes with); a wrapper that calls it is a container and
    the nn.LayerNorm stays the site. Every value against the reference."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), _OwnLayerNorm(16), _OwnLayerNorm(16, call_inner=True)).double()
    with torch.no_grad():
        model[1].inner.weight.uniform_(0.5, 2)
        model[1].inner.bias.normal_()
    sites = {s.name: s for s in Probe(model).sites}
    assert {n: s.kind for n, s in sites.items()} == {"1": "norm", "2.inner": "norm"}
    assert (sites["1"].norm.rule, sites["1"].norm.eps) == ("layer", 1e-3)
    x = torch.randn(3, 9, 12, dtype=torch.float64)
    capture = Capture(model, ["1", "2.inner"])  # discovery's trials run without its hooks
    with torch.no_grad(), Probe(model) as probe:
        model(x)
    capture.close()
    assert {r.site for r in probe.records} == {"1", "2.inner"}
    assert [len(calls) for calls in capture.data.values()] == [1, 1]
    assert check_records(probe.records, capture, {"1": (1e-3, True), "2.inner": (1e-3, True)}) == 6


class _HookedNet(nn.Module):
    """A model naming its modules twice, as TransformerLens's ``hook_dict`` does."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 6), nn.LayerNorm(6), nn.Identity())

    @property
    def hook_dict(self):
        return {"resid": self.body[0], "lnorm": self.body[1], "ln.out": self.body[2], "nowhere": nn.Identity()}

    def forward(self, x):
        return self.body(x)


def test_hook_dict_aliases_select_the_modules_they_name():
    """``hook_dict`` names (and their parents, by a shared last component) select the module
    they stand for, under that name; one module picked twice is one site; a name outside the
    model is not an alias."""
    from isoprobe.sites import hook_aliases

    model = _HookedNet()
    assert hook_aliases(model) == {"resid": "body.0", "lnorm": "body.1", "ln.out": "body.2"}
    assert [(s.name, s.kind) for s in Probe(model, sites=["lnorm", "norm"]).sites] == [("lnorm", "norm")]
    assert [(s.name, s.kind) for s in Probe(model, sites=["norm", "lnorm"]).sites] == [("body.1", "norm")]
    assert hook_aliases(nn.Linear(2, 2)) == {}
    with pytest.raises(ValueError, match="nowhere"):
        Probe(model, sites=["nowhere"])
    probe = Probe(model, sites=["res*", "body.0", "norm"])
    assert [(s.name, s.kind, s.module) for s in probe.sites] == [
        ("resid", "module", model.body[0]),
        ("body.1", "norm", model.body[1]),
    ]
    x = torch.randn(2, 5, 6)
    with torch.no_grad(), probe:
        model(x)
    with torch.no_grad(), Probe(model, sites=["body.0"]) as plain:
        model(x)
    assert [(r.point, r.isometry_gap) for r in probe.records if r.site == "resid"] == [
        (r.point, r.isometry_gap) for r in plain.records
    ]


class RunningLayerNorm(nn.Module):
    """A foreign LayerNorm that, in training mode, updates a running mean of its inputs (like a
    BatchNorm's statistics or a torch.ao observer) and counts its calls in a Python attribute."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, d))
        self.register_buffer("running_mean", torch.zeros(d))
        self.eps, self.calls = 1e-5, 0

    def forward(self, h):
        self.calls += 1
        if self.training:
            self.running_mean.mul_(0.9).add_(0.1 * h.detach().flatten(0, -2).mean(0))
        hc = h - h.mean(-1, keepdim=True)
        return self.weight * hc / torch.sqrt(hc.square().mean(-1, keepdim=True) + self.eps)


class CachingGelu(nn.Module):
    """A foreign GELU that remembers the shape of every input it saw."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, h):
        self.seen.append(tuple(h.shape))
        return nn.functional.gelu(h)


def test_discovery_by_behaviour_leaves_buffers_counters_and_caches_untouched():
    """The trials run on copies: the model's buffers, Python attributes and caches are as they
    were after Probe(model) and discover_sites(model); only the real forward reaches them."""
    from isoprobe.sites import discover_sites

    d = 6
    model = nn.Sequential(nn.Linear(4, d), RunningLayerNorm(d), CachingGelu()).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    found = {s.name: s.kind for s in discover_sites(model)}
    probe = Probe(model)
    assert found == {s.name: s.kind for s in probe.sites} == {"1": "norm", "2": "activation"}
    assert probe.sites[0].module is model[1] and probe.sites[1].module is model[2]
    assert model[1].calls == 0 and model[2].seen == []
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with probe:
        model(torch.randn(3, 5, 4))
    assert model[1].calls == 1 and model[2].seen == [(3, 5, d)]
    assert not torch.equal(model[1].running_mean, before["1.running_mean"])


def test_discovery_copies_only_small_modules_and_shares_the_rest_of_the_model(monkeypatch):
    """A candidate with more parameter and buffer entries (or modules) than the bound is not
    tried, hence not copied nor called; a model module a candidate refers to is not copied."""
    from isoprobe import sites

    big = CachingGelu()
    big.register_buffer("table", torch.zeros(sites._TRIAL_MAX_ENTRIES + 1))
    model = nn.Sequential(nn.Linear(4, 4), big, CachingGelu())
    object.__setattr__(model[2], "owner", model)  # a plain reference up to the whole model
    assert [s.name for s in sites.discover_sites(model)] == ["2"]
    assert big.seen == [] and model[2].seen == []
    shared = sites._shared_objects(model)
    copied = sites._trial_copy(model[2], shared)
    assert copied is not model[2] and copied.owner is model
    wrapped = nn.Sequential(nn.Linear(4, 4), WrappedGelu())  # a candidate of two modules
    assert [s.name for s in sites.discover_sites(wrapped)] == ["1"]
    monkeypatch.setattr(sites, "_TRIAL_MAX_MODULES", 1)
    assert sites.discover_sites(wrapped) == [] and wrapped[1].seen == []


class WrappedGelu(CachingGelu):
    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.0)

    def forward(self, h):
        return super().forward(self.drop(h))


class _Wrapper(nn.Module):
    """A module behind pass-through hook points (how TransformerLens wraps a HuggingFace
    RMSNorm); ``scale_in``/``scale_out`` scale what goes in or comes out (no pass-through)."""

    def __init__(self, inner: nn.Module, scale_in: float = 1.0, scale_out: float = 1.0):
        super().__init__()
        self.hook_in, self.inner, self.hook_out = nn.Identity(), inner, nn.Identity()
        self.scale_in, self.scale_out = scale_in, scale_out

    def forward(self, x):
        return self.hook_out(self.inner(self.hook_in(x) * self.scale_in) * self.scale_out)


def test_a_selected_wrapper_of_one_norm_is_that_norm_with_its_four_points():
    """A module selected by name that passes its input unchanged to the one site below it and
    returns its output unchanged is that site (a norm with four points, values against the
    reference captured at the wrapper); one that scales the norm's input or output stays a
    module (pre and post); a wrapper and its norm picked together are one site, named as
    picked first."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 6),
        _Wrapper(nn.RMSNorm(6, eps=1e-4)),
        _Wrapper(nn.LayerNorm(6), scale_in=2.0),
        _Wrapper(nn.GELU()),
        _Wrapper(nn.LayerNorm(6), scale_out=0.5),
    ).double()
    probe = Probe(model, sites=["1", "2", "3", "4"])
    assert [(s.name, s.kind, s.module) for s in probe.sites] == [
        ("1", "norm", model[1].inner),
        ("2", "module", model[2]),
        ("3", "activation", model[3].inner),
        ("4", "module", model[4]),
    ]
    assert [s.name for s in Probe(model, sites=["norm", "1"]).sites] == ["1.inner", "2.inner", "4.inner"]
    assert [s.name for s in Probe(model, sites=["1", "norm"]).sites] == ["1", "2.inner", "4.inner"]
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    capture = Capture(model, ["1", "2", "3", "4"])
    with torch.no_grad(), probe:
        model(x)
    capture.close()
    points = {(r.site, r.point) for r in probe.records}
    assert {p for s, p in points if s == "1"} == {"pre", "centered", "normalized", "post"}
    assert {p for s, p in points if s != "1"} == {"pre", "post"}
    gaps = {(r.site, r.point, r.item): r.isometry_gap for r in probe.records}
    assert all(gaps[("1", "centered", i)] == gaps[("1", "pre", i)] for i in range(3))  # RMS: not centred
    assert check_records(probe.records, capture, {"1": (1e-4, False)}) == 3


def test_discovery_trials_fire_neither_global_nor_the_models_own_hooks():
    """Probe(model) tries a foreign norm (whose forward calls a child module) on copies: torch's
    global forward hook and pre-hook and the hooks a user put on the modules do not fire; the
    real forward afterwards fires every one of them, once per module call."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), _Wrapper(RunningLayerNorm(6)), _Wrapper(CachingGelu()))
    calls = {"global pre": 0, "global": 0, "own pre": 0, "own": 0}

    def count(key):
        return lambda *_: calls.__setitem__(key, calls[key] + 1)

    handles = [
        nn.modules.module.register_module_forward_pre_hook(count("global pre")),
        nn.modules.module.register_module_forward_hook(count("global")),
        *(m.register_forward_pre_hook(count("own pre")) for m in (model[1], model[1].inner, model[1].hook_in)),
        *(m.register_forward_hook(count("own")) for m in (model[1], model[1].inner, model[1].hook_in)),
    ]
    try:
        probe = Probe(model)
        assert [(s.name, s.kind) for s in probe.sites] == [("1.inner", "norm"), ("2.inner", "activation")]
        Probe(model, sites=["1", "2"])  # the wrappers' trials too
        assert calls == dict.fromkeys(calls, 0)
        with torch.no_grad(), probe:
            model(torch.randn(2, 3, 4))
        assert calls == {"global pre": 10, "global": 10, "own pre": 3, "own": 3}  # 10 module calls
        assert len(probe.records) > 0
    finally:
        for handle in handles:
            handle.remove()


# ------------------------------------------------- fused and subclassed norms, found by behaviour
# Hand-made modules in the patterns of timm's BatchNormAct2d, GroupNormAct, LayerNormAct and
# PoolFormer's GroupNorm1 (timm itself is not needed): torch norm subclasses with their own
# forward that normalise with the functional form and then apply an ``act`` child.


class _BatchNormAct(nn.BatchNorm2d):
    def __init__(self, c):
        super().__init__(c, eps=1e-3)
        self.drop, self.act = nn.Identity(), nn.ReLU(inplace=True)

    def forward(self, x):
        use_batch = self.training or self.running_mean is None
        x = nn.functional.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, use_batch, 0.1, self.eps
        )
        return self.act(self.drop(x))


class _GroupNormAct(nn.GroupNorm):
    def __init__(self, c, groups):
        super().__init__(groups, c, eps=1e-4)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(nn.functional.group_norm(x, self.num_groups, self.weight, self.bias, self.eps))


class _LayerNormAct(nn.LayerNorm):
    def __init__(self, c):
        super().__init__(c, eps=1e-5)
        self.act = nn.GELU()

    def forward(self, x):
        return self.act(nn.functional.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps))


class _GroupNorm1(nn.GroupNorm):
    def __init__(self, c):
        super().__init__(1, c, eps=1e-5)

    def forward(self, x):
        return nn.functional.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class _PlainBatchNorm(nn.Module):
    """Batch statistics, an eps of 1e-3 that no attribute states (measured), no centring."""

    def __init__(self, c):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))

    def forward(self, x):
        return self.weight[:, None, None] * x / (x.square().mean((0, 2, 3), keepdim=True) + 1e-3).sqrt()


class _InstanceNorm(nn.Module):
    def forward(self, x):
        xc = x - x.mean((2, 3), keepdim=True)
        return xc / (xc.square().mean((2, 3), keepdim=True) + 1e-5).sqrt()


class _FusedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = _BatchNormAct(8)
        self.gn = _GroupNormAct(8, 4)
        self.gn1 = _GroupNorm1(8)
        self.rms = _PlainBatchNorm(8)
        self.inorm = _InstanceNorm()
        self.ln = _LayerNormAct(8)

    def forward(self, x):
        x = self.gn1(self.gn(self.bn(self.conv(x))))
        x = self.inorm(self.rms(x))
        return self.ln(x.amax((2, 3)))


def test_fused_and_subclassed_norms_are_found_by_behaviour():
    model = _FusedNet().eval()
    sites = {s.name: s for s in discover_sites(model)}
    assert sites["bn"].norm == NormSpec("batch", 1e-3)  # found in eval mode too (its trial copy trains)
    assert sites["gn"].norm == NormSpec("group", 1e-4, groups=4)
    assert sites["gn1"].norm == NormSpec("group", 1e-5, groups=1)
    assert sites["rms"].norm == NormSpec("batch-rms", 1e-3)  # eps measured
    assert sites["ln"].norm == NormSpec("layer", 1e-5)
    assert "inorm" not in sites  # per sample and channel: not a group or batch norm
    # the activations inside the fused norms stay sites of their own
    assert {n for n, s in sites.items() if s.kind == "activation"} == {"bn.act", "gn.act", "ln.act"}
    assert not model.training and int(model.bn.num_batches_tracked) == 0


@pytest.mark.parametrize("train", [True, False])
def test_fused_norms_points_against_float64_reference(train):
    """Every point of the fused norms against numpy; ``normalized`` is the normalisation before
    the module's activation (and affine part); ``post`` is the module's output, after it."""
    torch.manual_seed(0)
    model = _FusedNet().double().train(train)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64)
    names = ["bn", "gn", "gn1", "rms", "ln"]
    capture = Capture(model, names)
    with torch.no_grad(), Probe(model, sites="norm") as probe:
        model(x)
    capture.close()

    def batch(a, center, eps):
        ac = a - a.mean((0, 2, 3), keepdims=True) if center else a
        return ac, ac / np.sqrt((ac**2).mean((0, 2, 3), keepdims=True) + eps)

    def group(a, groups, eps):
        g = a.reshape(a.shape[0], groups, -1)
        gc = g - g.mean(-1, keepdims=True)
        return gc.reshape(a.shape), (gc / np.sqrt((gc**2).mean(-1, keepdims=True) + eps)).reshape(a.shape)

    norms = {
        "bn": lambda a: batch(a, True, 1e-3),
        "gn": lambda a: group(a, 4, 1e-4),
        "gn1": lambda a: group(a, 1, 1e-5),
        "rms": lambda a: batch(a, False, 1e-3),
        "ln": (1e-5, True),
    }
    # Theorem 1 / Cor. 3 at every aligned norm; in eval mode the batch norm with running
    # statistics is a per-channel affine map, measured at pre and post only
    assert check_records(probe.records, capture, norms) == (4 if train else 3)
    views = {(r.site, r.point): r.view for r in probe.records}
    assert views["rms", "normalized"] == "feature"
    assert views.get(("bn", "normalized")) == ("feature" if train else None)
    assert views["gn1", "normalized"] == "sample" and views["bn", "post"] == "sample"
    bn = {r.point: r for r in probe.records if r.site == "bn"}
    out = capture.data["bn"][0][1]
    assert bn["post"].isometry_gap == pytest.approx(ref_stats(out.reshape(6, -1))[0], rel=1e-9)
