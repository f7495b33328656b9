"""The vision zoo: timm's architectures and torchvision's classifiers, built small at random
init, and the test's own oracle, independent of isoprobe's discovery, for what the Probe must
record in them and what each recorded number must be.

**Types.** A timm *type* is a module of ``timm.models`` (``resnet``, ``vision_transformer``,
``efficientnet``, ...: one architecture family, ``timm.list_modules()``), built as its variant
with the fewest parameters among those ``timm.list_models(module=...)`` lists; a torchvision
type is the builder module of its classification models (``resnet``, ``inception``, ...), also
as its smallest variant. Each is built at random init with ``num_classes=10`` and, where the
constructor takes one, ``img_size=64``, and runs on a batch of 4 images of 64 px (the default
input size where 64 px does not run). Limits: 100 M parameters (counted on the meta device
before building), 60 s of CPU time per model (both modes; the sweep runs torch on one thread).

**Oracle** (:class:`Oracle`). One forward with, on every module, a forward pre-hook that clones
its first tensor input *before* the module runs (an in-place ReLU overwrites it) and a forward
hook that clones its output, and a :class:`~torch.utils._python_dispatch.TorchDispatchMode`
that records every aten norm operation (``native_batch_norm``, ``native_layer_norm``,
``native_group_norm``, ...) and entrywise activation operation (``relu``, ``relu_``,
``hardtanh``, ``gelu``, ``silu``, ``sigmoid``, ...) with a clone of its input before it runs, its
output, its parameters (eps, normalised dimensions) and its *owner*, the innermost module whose
forward was running. From that capture:

- a **module norm site** is a leaf module that ``zoo.truth_kind`` finds to be a norm by
  behaviour, or any module (leaf or not: a fused norm+activation) whose own forward applies an
  aten norm operation to its input (the input itself, its channels-last permutation or a
  reshape of it);
- a **module activation site** is a leaf module that ``zoo.truth_kind`` finds entrywise and
  nonlinear (in eval mode, where dropout and stochastic depth are the identity);
- a **functional site** is an aten norm or activation operation whose owner is not a module
  site of that kind (``F.relu`` inside Inception's ``BasicConv2d``), named
  ``owner:op#j`` (the j-th such operation in one call of the owner). ``F.rms_norm`` decomposes
  into elementwise aten operations and is therefore not seen as a functional norm (an RMSNorm
  module is still found by behaviour).

**Checks** (:func:`check`). The model's state is copied before anything runs; then a plain
forward and backward (a fixed random output weighting), the same under the Probe, and the same
under the oracle, each on a fresh copy, with the same seed: outputs, parameter gradients,
buffers (batch-norm running statistics) and the RNG state after must be bit-for-bit equal
between the plain and the probed run (and the oracle's), and the model's hook dictionaries as
before. Every record of the Probe is recomputed in float64 (numpy eigenvalues) from the
oracle's tensor for its site, call and point in the record's view: ``pre`` (the true input),
``post``, and for norms ``centered`` and ``normalized`` from the aten operation's input with its
own dimensions and eps (batch statistics for batch norms); a gap must agree to relative 1e-6
(both infinite for a singular Gram; none for a Gram of one item; a Gram whose smallest
eigenvalue is within a factor 100 of the rank threshold is ``borderline`` and not compared). ``theorem1_holds`` must never be
``False``, and the bound must equal ``I(centered)`` times the norm-variation factor of the
centred items (not compared where the centred Gram is borderline). ``view_breaks``: a site's ``post`` and the next site's ``pre`` that are the
same tensor (bit-for-bit) but are measured in different views.

Run as a script: ``python tests/vision.py OUT.jsonl [TYPE ...]`` sweeps types (``timm:NAME``,
``torchvision:NAME``; default: all) into JSON lines, ``python tests/vision.py --commit
OUT.jsonl tests/data/vision_sweep.json`` writes the file ``test_vision_sweep.py`` reads (the
swept types' rows replace theirs; the other types' rows stay where the versions are the same).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from vision_env import import_torchvision
from zoo import truth_kind

from isoprobe import Probe

import_torchvision()  # before timm, which imports it (tests/vision_env.py)

_ACTIVATIONS = (
    "relu",
    "hardtanh",
    "gelu",
    "silu",
    "hardswish",
    "hardsigmoid",
    "mish",
    "elu",
    "leaky_relu",
    "sigmoid",
) + ("tanh", "softplus", "celu", "threshold", "_prelu_kernel", "log_sigmoid_forward", "rrelu_with_noise")
ACT_OPS = frozenset(_ACTIVATIONS) | {f"{name}_" for name in _ACTIVATIONS}  # with the in-place variants
# op -> (rule, index of eps among the arguments)
NORM_OPS = {
    "native_batch_norm": ("batch", 7),
    "_native_batch_norm_legit": ("batch", 7),
    "_native_batch_norm_legit_no_training": ("batch", 6),
    "_batch_norm_with_update": ("batch", 6),
    "_batch_norm_no_update": ("batch", 6),
    "native_layer_norm": ("layer", 4),
    "native_group_norm": ("group", 7),
}
IMAGE, BATCH = 64, 4
MAX_PARAMETERS = 100_000_000
RTOL = 1e-6
LIMIT_S = 60.0  # per model, both modes, in the sweep


def _first_tensor(value):
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        return next((t for v in value if (t := _first_tensor(v)) is not None), None)
    if isinstance(value, dict):
        return next((t for v in value.values() if (t := _first_tensor(v)) is not None), None)
    return None


def _clone(t):
    return t.detach().clone() if isinstance(t, torch.Tensor) else None


class Oracle(TorchDispatchMode):
    """The capture of one forward (module docstring): ``calls[name]`` is a list of module calls,
    each ``{"module", "args", "kwargs", "pre", "post", "ops"}``; ``ops`` are the norm and
    activation aten operations that call's own forward made, each ``{"op", "input", "output",
    "rule", "dims", "groups", "eps"}``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.calls: dict[str, list[dict]] = {}
        self.stack: list[dict] = []
        self.handles = []
        for name, module in model.named_modules():
            self.handles.append(module.register_forward_pre_hook(self._enter(name), with_kwargs=True))
            self.handles.append(module.register_forward_hook(self._leave, with_kwargs=True, always_call=True))

    def _enter(self, name):
        def hook(module, args, kwargs):
            first = next((a for a in args if isinstance(a, torch.Tensor)), None)
            entry = {"module": module, "args": args, "kwargs": kwargs, "pre": _clone(first), "ops": []}
            self.calls.setdefault(name, []).append(entry)
            self.stack.append(entry)

        return hook

    def _leave(self, module, args, kwargs, output):
        entry = self.stack.pop()
        entry["post"] = _clone(_first_tensor(output))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if not self.stack or (name not in ACT_OPS and name not in NORM_OPS):
            return func(*args, **kwargs)
        x = _clone(args[0])
        out = func(*args, **kwargs)
        op = {"op": name, "input": x, "output": _clone(_first_tensor(out))}
        if name in NORM_OPS:
            rule, at = NORM_OPS[name]
            op |= {"rule": rule, "eps": float(args[at]) if len(args) > at else 1e-5, "groups": 1}
            if rule == "layer":
                op["dims"] = tuple(range(x.ndim - len(args[1]), x.ndim))
            elif rule == "group":
                op["groups"] = int(args[6])
        self.stack[-1]["ops"].append(op)
        return out

    def close(self):
        for h in self.handles:
            h.remove()


# ------------------------------------------------------------------ float64 recomputation


def norm_parts(op: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(centered, normalized)`` of a norm operation's input in float64, before any affine
    part: batch norms with the batch's own statistics (Corollary 3 of Joudaki et al. 2023)."""
    x = op["input"].double()
    if op["rule"] == "batch":
        dims = (0, *range(2, x.ndim))
    elif op["rule"] == "group":
        x, dims = x.reshape(x.shape[0], op["groups"], -1), (-1,)
    else:
        dims = op["dims"]
    xc = x if op["rule"] == "rms" else x - x.mean(dims, keepdim=True)
    xn = xc / (xc.square().mean(dims, keepdim=True) + op["eps"]).sqrt()
    shape = op["input"].shape
    return xc.reshape(shape), xn.reshape(shape)


def to_layout(t: torch.Tensor, op_input: torch.Tensor, module_input: torch.Tensor) -> torch.Tensor | None:
    """``t`` (shaped like a norm operation's input) in the module input's layout, if the operation's
    input is the module's input itself, its channels-last permutation or a reshape of it."""
    if op_input.shape == module_input.shape and torch.equal(op_input, module_input):
        return t
    if module_input.ndim == 4 and torch.equal(module_input.permute(0, 2, 3, 1), op_input):
        return t.permute(0, 3, 1, 2)
    if op_input.numel() == module_input.numel() and torch.equal(op_input.flatten(), module_input.flatten()):
        return t.reshape(module_input.shape)
    return None


def items_of(x: torch.Tensor, record) -> torch.Tensor | None:
    """The rows of the Gram a record measures: its view (``token``, ``sample``, ``feature``,
    ``spatial``: one image's positions as items, channels-first or channels-last) and item."""
    x = x.double()
    if record.view == "token":
        return x[record.item] if x.ndim == 3 else None
    if record.view == "sample":
        return x.reshape(x.shape[0], -1)
    if record.view == "feature":
        return x.transpose(0, 1).reshape(x.shape[1], -1)
    if record.view == "spatial" and x.ndim >= 3:
        image = x[record.item]
        if image.shape[0] == record.dim and image[0].numel() == record.n:
            return image.reshape(record.dim, -1).T
        return image.reshape(-1, image.shape[-1])
    return None


def gap64(rows: torch.Tensor) -> tuple[float, bool]:
    """(isometry gap ``log mean λ - mean log λ``, borderline) of ``G = X Xᵀ`` from numpy's
    eigenvalues; ``inf`` where there are more items than entries, or where the rank (threshold ``n · eps · λ_max``, as numpy's
    ``matrix_rank``) is below n; borderline: ``λ_min`` within a factor 100 of that threshold."""
    X = rows.double().numpy()
    if X.shape[0] > X.shape[1]:  # rank <= entries < items: singular by construction
        return math.inf, False
    lam = np.linalg.eigvalsh(X @ X.T)
    n = len(lam)
    threshold = n * np.finfo(np.float64).eps * max(lam[-1], 0.0)
    borderline = threshold / 100 <= lam[0] <= threshold * 100
    if lam[0] <= threshold or lam[-1] <= 0:
        return math.inf, borderline
    return float(np.log(lam.mean()) - np.log(lam).mean()), borderline


def _agree(probe_gap, mine: float) -> bool:
    if probe_gap is None or math.isinf(mine) or math.isinf(probe_gap):
        return probe_gap is not None and math.isinf(mine) and math.isinf(probe_gap)
    return abs(probe_gap - mine) <= RTOL * max(abs(mine), abs(probe_gap)) + 1e-12


# ------------------------------------------------------------------ the oracle's sites


def _input_norm_op(call: dict) -> dict | None:
    """The first aten norm operation of a module call applied to the call's own input."""
    pre = call["pre"]
    for op in call["ops"]:
        if op["op"] in NORM_OPS and pre is not None and to_layout(op["input"], op["input"], pre) is not None:
            return op
    return None


def _behaviour_norm_op(call: dict) -> dict | None:
    """A norm found by behaviour alone (no aten norm operation: an RMSNorm decomposes): its input,
    centring (``zoo.centres``), the module's own eps and normalised dimensions."""
    from zoo import centres

    module, pre = call["module"], call["pre"]
    shape = getattr(module, "normalized_shape", None)
    dims = tuple(range(pre.ndim - len(shape), pre.ndim)) if isinstance(shape, (tuple, list)) else (pre.ndim - 1,)
    eps = next((float(getattr(module, a)) for a in ("eps", "variance_epsilon") if getattr(module, a, None)), None)
    if eps is None:
        eps = torch.finfo(pre.dtype).eps
    rule = "layer" if centres(module, (pre, *call["args"][1:]), call["kwargs"]) else "rms"
    return {"op": "behaviour", "input": pre, "rule": rule, "dims": dims, "eps": eps, "groups": 1}


def functional_in(call: dict, kind: str | None) -> list[dict]:
    """The functional operations of one module call: its norm and activation operations but
    those that are the module site's own (an activation module's activation operations, a norm
    module's norm of its input)."""
    own = _input_norm_op(call) if kind == "norm" else None
    return [op for op in call["ops"] if op is not own and not (kind == "activation" and op["op"] in ACT_OPS)]


def _truth_in_eval(call: dict) -> str | None:
    """``zoo.truth_kind`` of a leaf module in eval mode: dropout and stochastic depth then do
    nothing (in train mode their random masks can pass the entrywise test by chance); no
    activation depends on the mode, and a batch norm is a norm in both."""
    module, mode = call["module"], call["module"].training
    module.train(False)
    try:
        return truth_kind(module, (call["pre"], *call["args"][1:]), call["kwargs"], call["post"])
    finally:
        module.train(mode)


def oracle_sites(capture: Oracle) -> tuple[dict[str, str], dict[str, list[str]]]:
    """``(module sites, functional sites)``: module name -> kind, and owner -> the operations
    of its functional sites in one call of the owner, in order (module docstring)."""
    modules: dict[str, str] = {}
    for name, calls in capture.calls.items():
        call = calls[0]
        if call["pre"] is None or not call["pre"].is_floating_point():
            continue
        if _input_norm_op(call) is not None:
            modules[name] = "norm"
        elif not any(True for _ in call["module"].children()):
            kind = _truth_in_eval(call)
            if kind:
                modules[name] = kind
    functional = {}
    for name, calls in capture.calls.items():
        if ops := functional_in(calls[0], modules.get(name)):
            functional[name] = [op["op"] for op in ops]
    return modules, functional


def kind_of(op_name: str) -> str:
    return "norm" if op_name in NORM_OPS else "activation"


# ------------------------------------------------------------------ the comparison


def point_tensor(record, capture: Oracle, modules: dict[str, str], order: dict[str, int]) -> torch.Tensor | None:
    """The oracle's tensor for a record's site, call and point (``None`` if it has none).
    ``order``: a functional site's rank among the owner's functional sites in the Probe."""
    owner, functional, _ = record.site.partition(":")
    calls = capture.calls.get(owner, [])
    if record.call >= len(calls):
        return None
    call = calls[record.call]
    if functional:
        ops = functional_in(call, modules.get(owner))
        if order[record.site] >= len(ops):
            return None
        op = ops[order[record.site]]
        if record.point in ("pre", "post"):
            return op["input"] if record.point == "pre" else op["output"]
        return norm_parts(op)[record.point == "normalized"] if op["op"] in NORM_OPS else None
    if record.point in ("pre", "post"):
        return call[record.point]
    op = _input_norm_op(call) or (_behaviour_norm_op(call) if call["pre"] is not None else None)
    part = norm_parts(op)[record.point == "normalized"]
    return to_layout(part, op["input"], call["pre"])


def compare_records(records, capture: Oracle, modules: dict[str, str]) -> dict:
    """Every record's gap against :func:`gap64` of the oracle's tensor; Theorem 1 (module docstring)."""
    order, seen = {}, {}
    for r in records:
        owner, functional, _ = r.site.partition(":")
        if functional and r.site not in order:
            order[r.site] = seen[owner] = seen.get(owner, -1) + 1
    tensors, out = (
        {},
        {"points": 0, "borderline": 0, "unchecked": [], "disagree": [], "failed": [], "bound_differs": []},
    )
    for r in records:
        t = point_tensor(r, capture, modules, order)
        rows = None if t is None else items_of(t, r)
        if rows is None:
            out["unchecked"].append(f"{r.key} [{r.view}]")
            continue
        tensors[r.key, r.item] = t
        mine, borderline = gap64(rows)
        out["points"] += 1
        if borderline:
            out["borderline"] += 1
        elif rows.shape[0] < 2:  # the Probe's "undefined: fewer than 2 items"
            if r.isometry_gap is not None:
                out["disagree"].append((f"{r.key} [{r.view}]", f"Probe {r.isometry_gap} for one item"))
        elif not _agree(r.isometry_gap, mine) or rows.shape[0] != r.n:
            out["disagree"].append(
                (f"{r.key} [{r.view}]", f"Probe {r.isometry_gap} (n={r.n}), oracle {mine} (n={rows.shape[0]})")
            )
        if r.theorem1_holds is False:
            out["failed"].append(f"{r.key} [{r.view}]")
        if r.point == "normalized" and r.theorem1_bound is not None:
            centred = items_of(point_tensor(dataclasses.replace(r, point="centered"), capture, modules, order), r)
            a, (gap, borderline) = centred.norm(dim=1), gap64(centred)
            bound = math.exp(-gap) * float(1 + ((a - a.mean()) ** 2).mean() / a.mean() ** 2)
            if not borderline and abs(bound - r.theorem1_bound) > RTOL * max(bound, 1e-300) + 1e-12:
                out["bound_differs"].append(f"{r.key}: Probe {r.theorem1_bound}, oracle {bound}")
    out["view_breaks"] = view_breaks(records, tensors)
    return out


def view_breaks(records, tensors) -> list[str]:
    """A site's ``post`` and the next site's ``pre`` that are one tensor (bit-for-bit) measured in
    different views (records in forward order)."""
    ends = [r for r in records if r.point in ("pre", "post") and (r.item in (None, 0))]
    breaks = []
    for a, b in zip(ends, ends[1:]):
        if a.point != "post" or b.point != "pre" or a.view == b.view:
            continue
        ta, tb = tensors.get((a.key, a.item)), tensors.get((b.key, b.item))
        if ta is not None and tb is not None and ta.shape == tb.shape and torch.equal(ta, tb):
            breaks.append(f"{a.key} [{a.view}] -> {b.key} [{b.view}]")
    return breaks


# ------------------------------------------------------------------ one model, one mode


def _hook_counts(model: nn.Module) -> list[int]:
    from torch.nn.modules import module as torch_module

    names = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
    own = [sum(len(getattr(m, a)) for m in model.modules()) for a in names]
    return own + [len(getattr(torch_module, f"_global{a}")) for a in names]


def _run(model: nn.Module, x: torch.Tensor, weight: torch.Tensor | None, probe=None, oracle=None) -> dict:
    """Forward (seeded), backward of ``(output · weight).sum()``: output, gradients, buffers, RNG."""
    torch.manual_seed(1234)
    with contextlib.ExitStack() as stack:
        if oracle is not None:
            stack.enter_context(oracle)
        out = _first_tensor(model(x))
    if weight is None:
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    if out.requires_grad:
        (out * weight).sum().backward()
    return {
        "output": out.detach(),
        "weight": weight,
        "grads": {n: p.grad for n, p in model.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "rng": torch.get_rng_state(),
    }


def _differences(a: dict, b: dict) -> list[str]:
    """What differs bit-for-bit between two :func:`_run` results."""
    diff = [] if torch.equal(a["output"], b["output"]) else ["output"]
    for part in ("grads", "buffers"):
        for name, t in a[part].items():
            u = b[part].get(name)
            if (t is None) != (u is None) or (t is not None and not torch.equal(t, u)):
                diff.append(f"{part[:-1]} {name}")
    return diff + ([] if torch.equal(a["rng"], b["rng"]) else ["rng state"])


def check(model: nn.Module, x: torch.Tensor, train: bool) -> dict:
    """The checks of the module docstring for one mode; a result row."""
    base = copy.deepcopy(model).train(train)
    plain = _run(copy.deepcopy(base), x, None)
    probed_model = copy.deepcopy(base)
    hooks = _hook_counts(probed_model)
    with Probe(probed_model) as probe:
        probed = _run(probed_model, x, plain["weight"])
    changed = _differences(plain, probed) + (["hooks"] if _hook_counts(probed_model) != hooks else [])
    oracle_model = copy.deepcopy(base)
    capture = Oracle(oracle_model)
    try:
        captured = _run(oracle_model, x, plain["weight"], oracle=capture)
    finally:
        capture.close()
    state = torch.get_rng_state()
    modules, functional = oracle_sites(capture)
    torch.set_rng_state(state)
    recorded = {}
    for r in probe.records:
        recorded.setdefault(r.site, r.kind)
    row = {"changed": changed, "oracle_changed": _differences(plain, captured)}
    row |= _site_differences(modules, functional, recorded, capture)
    row |= compare_records(probe.records, capture, modules)
    row["records"] = len(probe.records)
    return row


def _site_differences(modules, functional, recorded: dict[str, str], capture: Oracle) -> dict:
    """Missed and extra sites, module and functional (functional ones counted per owner)."""

    def described(name, kind):
        return f"{name} ({type(capture.calls[name][0]['module']).__name__}: {kind})" if name in capture.calls else name

    probe_modules = {n: k for n, k in recorded.items() if ":" not in n}
    probe_functional: dict[str, list[str]] = {}
    for n, k in recorded.items():
        if ":" in n:
            probe_functional.setdefault(n.partition(":")[0], []).append(k)
    missed = [described(n, k) for n, k in modules.items() if n not in probe_modules]
    extra = [described(n, k) for n, k in probe_modules.items() if n not in modules]
    wrong = [n for n in modules.keys() & probe_modules.keys() if modules[n] != probe_modules[n]]
    for owner in functional.keys() | probe_functional.keys():
        want = sorted(kind_of(op) for op in functional.get(owner, []))
        got = sorted(probe_functional.get(owner, []))
        if want != got:
            ops = ",".join(functional.get(owner, []))
            (missed if len(want) > len(got) else extra).append(f"{owner}: [{ops}] (Probe {len(got)} functional sites)")
    kinds = list(modules.values()) + [kind_of(op) for ops in functional.values() for op in ops]
    return {
        "norms": kinds.count("norm"),
        "activations": kinds.count("activation"),
        "functional": sum(map(len, functional.values())),
        "missed": sorted(missed),
        "extra": sorted(extra),
        "wrong_kind": sorted(wrong),
    }


# ------------------------------------------------------------------ the builders


def _parameters(make) -> int:
    """The parameters of ``make()``, built on the meta device (on the CPU if its init needs data)."""
    try:
        with torch.device("meta"):
            return sum(p.numel() for p in make().parameters())
    except NotImplementedError:
        return sum(p.numel() for p in make().parameters())


def timm_types() -> dict[str, list[str]]:
    """``"timm:MODULE"`` -> the model names timm lists for that module of ``timm.models``."""
    import timm

    return {f"timm:{m}": timm.list_models(module=m) for m in timm.list_modules() if timm.list_models(module=m)}


def torchvision_types() -> dict[str, list[str]]:
    """``"torchvision:MODULE"`` -> torchvision's classification models built in that module."""
    import_torchvision()
    from torchvision import models

    types: dict[str, list[str]] = {}
    for name in models.list_models(module=models):
        module = models.get_model_builder(name).__module__.rpartition(".")[2]
        types.setdefault(f"torchvision:{module}", []).append(name)
    return types


def all_types() -> dict[str, list[str]]:
    return timm_types() | torchvision_types()


def _maker(model_type: str, name: str, sized: bool):
    """A function building ``name`` at random init (``sized``: with a 64 px image size)."""
    if model_type.startswith("timm:"):
        import timm

        extra = {"img_size": IMAGE} if sized else {}
        return lambda: timm.create_model(name, pretrained=False, num_classes=10, **extra)
    from torchvision import models

    extra = {"image_size": IMAGE} if sized else {}
    if name in ("inception_v3", "googlenet"):
        extra |= {"aux_logits": False, "init_weights": True}
    return lambda: models.get_model(name, num_classes=10, **extra)


def smallest(model_type: str, names: list[str]) -> str:
    """The variant with the fewest parameters (ties by name); those that fail to build are skipped."""
    counted = []
    for name in names:
        try:
            counted.append((_parameters(_maker(model_type, name, False)), name))
        except Exception:
            continue
    if not counted:
        raise RuntimeError("no variant builds")
    return min(counted)[1]


def build(model_type: str, name: str) -> tuple[nn.Module, torch.Tensor]:
    """``name`` at random init (eval) and a batch it runs on: 64 px (with ``img_size``/``image_size``
    64 where the constructor takes it), else its default input size."""
    for sized in (True, False):
        make = _maker(model_type, name, sized)
        try:
            count = _parameters(make)
        except Exception:
            if sized:
                continue
            raise
        if count > MAX_PARAMETERS:
            raise MemoryError(f"{count:,} parameters (limit {MAX_PARAMETERS:,})")
        torch.manual_seed(0)
        model = make().eval()
        cfg = getattr(model, "pretrained_cfg", None) or {}
        sizes = [IMAGE] + [s for s in [tuple(cfg.get("input_size", (3, 224, 224)))[-1]] if s != IMAGE]
        for size in sizes if not sized else [IMAGE]:
            x = torch.randn(BATCH, 3, size, size, generator=torch.Generator().manual_seed(1))
            try:
                with torch.no_grad():
                    model(x)
                return model, x
            except Exception as error:
                last = error
        if not sized:
            raise last
    raise AssertionError("unreachable")


# ------------------------------------------------------------------ the sweep


class _Timeout(Exception):
    pass


def _alarm(_signum, _frame):
    raise _Timeout


def _compact(result: dict) -> dict:
    """A mode's result for the data file: disagreements by key (three with their values)."""
    out = dict(result)
    out["disagree"] = sorted({key for key, _ in result["disagree"]})
    out["disagree_examples"] = [f"{k}: {v}" for k, v in result["disagree"][:3]]
    return out


def sweep_one(model_type: str, name: str | None, limit_s: float) -> dict:
    """Build ``name`` (default: the type's smallest variant) and check it in eval and train mode
    within ``limit_s`` seconds of this process's CPU time: a result row (``seconds``: wall time,
    ``cpu_s``: CPU time)."""
    row: dict = {"type": model_type}
    start, cpu = time.perf_counter(), time.process_time()
    signal.signal(signal.SIGPROF, _alarm)
    signal.setitimer(signal.ITIMER_PROF, limit_s)  # CPU time: a busy machine does not skip models
    stage = "build"
    try:
        row["model"] = name = name or smallest(model_type, all_types()[model_type])
        model, x = build(model_type, name)
        row |= {"image": x.shape[-1], "parameters": sum(p.numel() for p in model.parameters())}
        row["build_s"] = round(time.perf_counter() - start, 3)
        for mode in ("eval", "train"):
            stage = mode
            row[mode] = _compact(check(model, x, train=mode == "train"))
        row["status"] = "checked"
    except _Timeout:
        row |= {"status": "skipped", "stage": stage, "reason": f"over {limit_s:g} s of CPU time"}
    except Exception as error:
        first = (str(error).strip().splitlines() or [""])[0][:200]
        row |= {"status": "skipped" if stage == "build" else "probe-error", "stage": stage}
        row["reason"] = f"{type(error).__name__}: {first}"
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
    row["seconds"] = round(time.perf_counter() - start, 3)
    row["cpu_s"] = round(time.process_time() - cpu, 3)
    return row


def versions() -> dict[str, str]:
    import timm

    return {"timm": timm.__version__, "torchvision": import_torchvision().__version__, "torch": torch.__version__}


def _worker(out: str, types: list[str]) -> None:
    torch.set_num_threads(1)
    with open(out, "a") as sink:
        for model_type, _, name in (t.partition("=") for t in types):
            row = sweep_one(model_type, name or None, limit_s=LIMIT_S)
            sink.write(json.dumps(row | {"versions": versions()}) + "\n")
            sink.flush()


def commit(scratch: str, out: str) -> None:
    """The rows of ``scratch`` (JSON lines; the last row of a type wins), by type, as ``out``,
    replacing those types' rows where ``out`` exists and was made with the same versions (a rerun
    of some types keeps the others' rows; of other versions, only ``scratch``'s rows are kept)."""
    import platform

    rows = {}
    if Path(out).exists():
        previous = json.loads(Path(out).read_text())
        if all(previous.get(k) == v for k, v in versions().items()):
            rows = {row["type"]: row for row in previous["rows"]}
    with open(scratch) as lines:
        rows |= {row["type"]: row for row in map(json.loads, lines)}
    made = [row.pop("versions", None) for row in rows.values()]
    assert all(v in (None, versions()) for v in made), "rows of other timm/torchvision versions"
    document = versions() | {
        "python": platform.python_version(),
        "made_with": "python tests/vision.py SCRATCH.jsonl && python tests/vision.py --commit SCRATCH.jsonl OUT",
    }
    rows_text = ",\n".join(f"  {json.dumps(rows[t])}" for t in sorted(rows))
    Path(out).write_text(json.dumps(document, indent=1)[:-2] + f',\n "rows": [\n{rows_text}\n ]\n}}\n')


def main(argv: list[str], chunk: int = 10) -> None:
    """``OUT.jsonl --worker TYPE[=MODEL] ...``: sweep those types here (MODEL: the variant;
    default the smallest). ``OUT.jsonl [TYPE ...]``: sweep
    them (default: every type) in worker processes of ``chunk`` types, resuming after the types
    already in OUT; a type whose worker dies is a skipped row. ``--commit SCRATCH OUT``."""
    import subprocess

    out, rest = argv[0], argv[1:]
    if rest[:1] == ["--worker"]:
        return _worker(out, rest[1:])
    if out == "--commit":
        return commit(*rest)
    types = rest or list(all_types())
    while True:
        done = set()
        if Path(out).exists():
            done = {json.loads(line)["type"] for line in Path(out).read_text().splitlines()}
        left = [t for t in types if t.partition("=")[0] not in done]
        if not left:
            return
        try:
            code = subprocess.run([sys.executable, __file__, out, "--worker", *left[:chunk]], timeout=1800).returncode
        except subprocess.TimeoutExpired:
            code = "a timeout"
        if code != 0:
            after = (
                {json.loads(line)["type"] for line in Path(out).read_text().splitlines()}
                if Path(out).exists()
                else set()
            )
            dead = next(t.partition("=")[0] for t in left if t.partition("=")[0] not in after)
            with open(out, "a") as sink:
                row = {"type": dead, "status": "skipped", "stage": "process", "reason": f"worker exited with {code}"}
                sink.write(json.dumps(row | {"versions": versions()}) + "\n")


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")
    main(sys.argv[1:])
