"""The vision sweep: timm's architecture families and torchvision's classifiers, built small at
random init (``vision.build``), probed in eval and train mode against the oracle of
``vision.py``: every norm and activation that runs (module or functional) recorded, every
recorded gap equal to a float64 recomputation from the true tensor (relative 1e-6), Theorem 1
never failing, outputs, gradients, buffers, RNG state and hooks bit-for-bit as without the Probe.

``data/vision_sweep.json`` is the full sweep (``python tests/vision.py SCRATCH.jsonl``, about
20-40 minutes on two busy cores, then ``python tests/vision.py --commit SCRATCH.jsonl
tests/data/vision_sweep.json``), one row per type: checked (both modes' results) or skipped
(with the reason). The CI part re-checks a fixed selection: the checked types in order of their
sweep CPU time within ``_CI_BUDGET_S`` seconds, plus every type the installed timm and
torchvision have that the file lacks (checked, with a warning asking to regenerate the file).
``ISOPROBE_VISION_ALL=1`` checks every type. Needs timm (the ``test`` extra).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("timm")
import vision  # noqa: E402  (imports timm)

SWEEP = json.loads((Path(__file__).parent / "data" / "vision_sweep.json").read_text())
ROWS = {row["type"]: row for row in SWEEP["rows"]}
SAME_VERSION = all(SWEEP[k] == v for k, v in vision.versions().items())
_CI_BUDGET_S = 12.0  # sweep CPU seconds (one thread) of the selection: about 30 s of a pytest run here
_POINT_FIELDS = ("missed", "extra", "wrong_kind", "disagree", "failed", "bound_differs", "view_breaks")
# Where the Probe and the oracle disagree, and why (the test fails if a disagreement changes):
# type -> field -> value, for both modes, or type -> mode -> field -> value.
KNOWN: dict[str, dict] = {}


def ci_selection() -> list[str]:
    """The checked types in order of sweep CPU time (ties by name) within ``_CI_BUDGET_S``."""
    checked = sorted((row["cpu_s"], t) for t, row in ROWS.items() if row["status"] == "checked")
    chosen, total = [], 0.0
    for seconds, model_type in checked:
        if total + seconds > _CI_BUDGET_S:  # CPU seconds
            break
        chosen.append(model_type)
        total += seconds
    return chosen


NEW = sorted(set(vision.all_types()) - set(ROWS))
SELECTED = list(ROWS) if os.environ.get("ISOPROBE_VISION_ALL") == "1" else ci_selection()


def test_committed_sweep_is_current():
    """The file covers the installed timm and torchvision; new types are checked below."""
    assert len(ci_selection()) >= 4, "the CI selection is too small to catch anything"
    if SAME_VERSION:
        assert not NEW, "the sweep file does not match its own versions"
    elif NEW:
        warnings.warn(
            f"the installed timm/torchvision have {len(NEW)} types that data/vision_sweep.json "
            f"({SWEEP['timm']}, {SWEEP['torchvision']}) lacks, checked here: {', '.join(NEW)}; "
            "regenerate it as the docstring of tests/test_vision_sweep.py says",
            stacklevel=1,
        )


def _assert_clean(model_type: str, result: dict, known: dict) -> None:
    assert not result["changed"], f"{model_type}: the Probe changed {result['changed']}"
    assert not result["oracle_changed"], f"{model_type}: the oracle changed {result['oracle_changed']}"
    assert not result["unchecked"], f"{model_type}: records without an oracle tensor {result['unchecked']}"
    for field in _POINT_FIELDS:
        assert result[field] == known.get(field, []), f"{model_type}: {field}: {result[field]}"


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("model_type", SELECTED + NEW)
def test_probe_agrees_with_the_oracle(model_type):
    committed = ROWS.get(model_type, {})
    row = vision.sweep_one(model_type, committed.get("model"), limit_s=120.0)
    if row["status"] == "skipped":
        if SAME_VERSION and committed.get("status") == "checked":
            pytest.fail(f"{model_type} built and ran in the sweep but not now: {row['reason']}")
        pytest.skip(f"{model_type}: {row['stage']}: {row['reason']}")
    assert row["status"] == "checked", f"{model_type}: {row['stage']}: {row['reason']}"
    for mode in ("eval", "train"):
        known = KNOWN.get(model_type, {})
        _assert_clean(f"{model_type} ({mode})", row[mode], known.get(mode, known))
        if SAME_VERSION and committed:
            counts = ("norms", "activations", "functional", "records")
            assert {k: row[mode][k] for k in counts} == {k: committed[mode][k] for k in counts}, "not as in the sweep"


# ------------------------------------------------------------------ hand-built models


class _FusedBatchNormAct(nn.BatchNorm2d):
    """A batch norm subclass whose own forward normalises, then applies its child activation."""

    def __init__(self, channels: int):
        super().__init__(channels)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training, 0.1, self.eps)
        return self.act(x)


class _GroupNormOne(nn.GroupNorm):
    """timm's ``GroupNorm1``: one group, its own forward."""

    def __init__(self, channels: int):
        super().__init__(1, channels)

    def forward(self, x):
        return F.group_norm(x, 1, self.weight, self.bias, self.eps)


class _LayerNorm2d(nn.LayerNorm):
    """A channels-first layer norm: permute, normalise the channels, permute back."""

    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps).permute(
            0, 3, 1, 2
        )


class _Functional(nn.Module):
    """Activations called as functions: ``F.relu`` (in place), ``torch.sigmoid`` and ``x.tanh()``."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        x = F.relu(self.conv(x), inplace=True)
        return x * torch.sigmoid(x) + x.tanh()


class HandBuilt(nn.Module):
    """In-place activations, a fused and two subclassed norms, functional calls, and one
    in-place activation module reused in a loop."""

    def __init__(self, channels: int = 8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
        self.fused = _FusedBatchNormAct(channels)
        self.group = _GroupNormOne(channels)
        self.functional = _Functional(channels)
        self.ln2d = _LayerNorm2d(channels)
        self.convs = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in range(2))
        self.act = nn.ReLU6(inplace=True)  # reused by every conv of the loop
        self.head = nn.Linear(channels, 10)

    def forward(self, x):
        x = self.ln2d(self.functional(self.group(self.fused(self.stem(x)))))
        for conv in self.convs:
            x = self.act(conv(x))
        return self.head(x.mean((2, 3)))


def test_oracle_on_the_hand_built_model():
    """The oracle itself: its sites, the true input of an in-place activation (not its output)."""
    torch.manual_seed(0)
    model, x = HandBuilt().train(), torch.randn(4, 3, 8, 8)
    capture = vision.Oracle(model)
    with capture:
        model(x)
    capture.close()
    modules, functional = vision.oracle_sites(capture)
    assert modules == {
        "stem.1": "norm",
        "stem.2": "activation",
        "fused": "norm",
        "fused.act": "activation",
        "group": "norm",
        "ln2d": "norm",
        "act": "activation",
    }
    assert functional == {"functional": ["relu_", "sigmoid", "tanh"]}
    call = capture.calls["stem.2"][0]
    assert torch.equal(call["pre"], capture.calls["stem.1"][0]["post"]) and (call["pre"] < 0).any()
    assert len(capture.calls["act"]) == 2 and not torch.equal(
        capture.calls["act"][0]["pre"], capture.calls["act"][1]["pre"]
    )
    xc, xn = vision.norm_parts(vision._input_norm_op(capture.calls["ln2d"][0]))
    mapped = vision.to_layout(xn, capture.calls["ln2d"][0]["ops"][0]["input"], capture.calls["ln2d"][0]["pre"])
    ref = F.layer_norm(capture.calls["ln2d"][0]["pre"].double().permute(0, 2, 3, 1), (8,), eps=1e-5)
    assert torch.allclose(mapped, ref.permute(0, 3, 1, 2), atol=1e-12)


def test_oracle_sees_a_wrong_pre():
    """The comparison fails on a record whose ``pre`` is the in-place activation's output."""
    import dataclasses

    model, x = HandBuilt().eval(), torch.randn(4, 3, 8, 8)
    capture = vision.Oracle(model)
    with capture:
        model(x)
    capture.close()
    modules, _ = vision.oracle_sites(capture)
    post = capture.calls["stem.2"][0]["post"]
    from isoprobe.records import Record

    gap = vision.gap64(post.reshape(4, -1).double())[0]
    fake = Record("stem.2", "activation", "pre", "sample", None, 0, 4, post[0].numel(), None, gap, None)
    assert vision.compare_records([fake], capture, modules)["disagree"]
    right = dataclasses.replace(fake, isometry_gap=vision.gap64(capture.calls["stem.2"][0]["pre"].reshape(4, -1))[0])
    assert not vision.compare_records([right], capture, modules)["disagree"]


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_probe_on_the_hand_built_model(train):
    torch.manual_seed(0)
    result = vision._compact(vision.check(HandBuilt(), torch.randn(4, 3, 8, 8), train))
    known = KNOWN.get("hand-built", {})
    _assert_clean("hand-built", result, known.get("train" if train else "eval", known))
