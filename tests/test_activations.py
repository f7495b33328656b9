"""The activation registry: names, formulas, kinks, closed-form β as printed in the paper."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import special

from isoprobe.activations import ACTIVATIONS, Activation, get_activation, list_activations, registry_report

REQUIRED = [
    "identity",
    "he1",
    "he2",
    "relu",
    "leaky_relu",
    "elu",
    "selu",
    "gelu",
    "gelu_tanh",
    "silu",
    "mish",
    "softplus",
    "tanh",
    "sigmoid",
    "hardtanh",
    "step",
    "abs",
    "sin",
    "cos",
    "exp",
]


def test_registry_has_every_required_activation():
    assert set(REQUIRED) <= set(list_activations())
    assert list_activations() == list(ACTIVATIONS)


def _np_reference(name: str, x: np.ndarray) -> np.ndarray:
    """Each formula written independently with numpy/scipy."""
    selu_l, selu_a = 1.0507009873554805, 1.6732632423543772
    return {
        "identity": x,
        "he1": x,
        "he2": x**2 - 1,
        "relu": np.maximum(x, 0),
        "leaky_relu": np.where(x > 0, x, 0.01 * x),
        "elu": np.where(x > 0, x, np.expm1(x)),
        "selu": selu_l * np.where(x > 0, x, selu_a * np.expm1(x)),
        "gelu": x * special.ndtr(x),
        "gelu_tanh": 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))),
        "silu": x * special.expit(x),
        "mish": x * np.tanh(np.logaddexp(x, 0)),
        "softplus": np.logaddexp(x, 0),
        "tanh": np.tanh(x),
        "sigmoid": special.expit(x),
        "hardtanh": np.clip(x, -1, 1),
        "step": (x > 0).astype(float),
        "abs": np.abs(x),
        "sin": np.sin(x),
        "cos": np.cos(x),
        "exp": np.exp(x - 2),
    }[name]


@pytest.mark.parametrize("name", REQUIRED)
def test_registry_formulas(name):
    x = np.linspace(-30, 30, 6001)
    got = get_activation(name).fn(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, _np_reference(name, x), rtol=1e-13, atol=1e-13)


def test_softplus_has_no_threshold_jump():
    # torch's softplus switches to x above 20: a 2e-9 jump the registry must not have
    x = torch.tensor([19.999999, 20.000001, 30.0], dtype=torch.float64)
    np.testing.assert_allclose(get_activation("softplus").fn(x).numpy(), np.logaddexp(x.numpy(), 0), rtol=1e-15)


def _jumps(f, k: float, h: float = 1e-4) -> bool:
    """Whether f, f' or f'' jumps at k (one-sided finite differences)."""
    left = torch.tensor([k - 3 * h, k - 2 * h, k - h], dtype=torch.float64)
    right = torch.tensor([k + h, k + 2 * h, k + 3 * h], dtype=torch.float64)
    fl, fr = f(left).numpy(), f(right).numpy()
    d1 = (fl[2] - fl[1]) / h, (fr[1] - fr[0]) / h
    d2 = (fl[2] - 2 * fl[1] + fl[0]) / h**2, (fr[2] - 2 * fr[1] + fr[0]) / h**2
    return abs(fl[2] - fr[0]) > 10 * h or abs(d1[0] - d1[1]) > 0.05 or abs(d2[0] - d2[1]) > 0.05


@pytest.mark.parametrize("name", [n for n in REQUIRED if ACTIVATIONS[n].kinks])
def test_declared_kinks_are_points_of_non_smoothness(name):
    act = get_activation(name)
    for k in act.kinks:
        assert _jumps(act.fn, k), f"{name} is smooth at its declared kink {k}"
        assert not _jumps(act.fn, k + 0.37), f"{name} is not smooth away from its kinks"


def test_expected_kinks():
    assert get_activation("relu").kinks == (0.0,)
    assert get_activation("step").kinks == (0.0,)
    assert get_activation("hardtanh").kinks == (-1.0, 1.0)
    assert get_activation("tanh").kinks == ()


# the paper's closed forms exactly as printed (Table 2, Table C.1), against the registry's
# numerically stable rewrites
PAPER_TABLE_C1 = {
    "exp": lambda a: (2 - 2 * math.exp(a * a) + a * a) / (1 - math.exp(a * a)),
    "sin": lambda a: 2 * (math.exp(2 * a * a) - math.exp(a * a) * a * a - 1) / (math.exp(2 * a * a) - 1),
    "relu": lambda a: (4 - 3 * math.pi) / (2 - 2 * math.pi),
}
PAPER_TABLE_2 = {
    "he1": 1.0,
    "he2": 2.0,
    "sin": 2 - 2 * math.e / (math.e**2 - 1),
    "exp": 2 - 1 / (math.e - 1),
    "step": 2 - 2 / math.pi,
    "relu": (3 * math.pi - 4) / (2 * math.pi - 2),
}


@pytest.mark.parametrize("name", sorted(PAPER_TABLE_2))
def test_closed_forms_match_table_2(name):
    assert get_activation(name).closed_form_beta(1.0) == pytest.approx(PAPER_TABLE_2[name], abs=1e-15)


@pytest.mark.parametrize("name", sorted(PAPER_TABLE_C1))
@pytest.mark.parametrize("gain", [0.1, 0.5, 1.0, 2.0, 3.0, -1.5])
def test_closed_forms_match_table_c1(name, gain):
    got = get_activation(name).closed_form_beta(gain)
    assert got == pytest.approx(PAPER_TABLE_C1[name](gain), abs=1e-12)


def test_get_activation_resolves_names_callables_and_objects():
    relu = get_activation("relu")
    assert get_activation("ReLU") is relu and get_activation("leaky-relu") is get_activation("leaky_relu")
    assert get_activation(relu) is relu
    f = lambda x: torch.relu(x - 0.3)  # noqa: E731
    wrapped = get_activation(f)
    assert wrapped.fn is f and not wrapped.kinks_known and wrapped.closed_form_beta is None
    assert wrapped == get_activation(f)  # same callable, equal activations (one cache entry)
    assert Activation("r", torch.relu, (0.0,))(torch.tensor([-2.0, 3.0]), gain=2.0).tolist() == [0.0, 6.0]


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as info:
        get_activation("swishy")
    for name in REQUIRED:
        assert name in str(info.value)
    with pytest.raises(TypeError):
        get_activation(3.0)


def test_registry_report():
    text = registry_report()
    for name in REQUIRED:
        assert name in text
    rows = {r["name"]: r for r in json.loads(registry_report(as_json=True))}
    assert rows["hardtanh"]["kinks"] == [-1.0, 1.0]
    assert rows["relu"]["closed_form_beta"] and not rows["tanh"]["closed_form_beta"]
