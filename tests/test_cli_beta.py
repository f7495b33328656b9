"""`isoprobe beta`: the table, --json, --list and the usage errors (click's CliRunner)."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from isoprobe.cli import main

RELU = (3 * math.pi - 4) / (2 * math.pi - 2)


def _run(*args):
    return CliRunner().invoke(main, ["beta", *args])


def _sin(a):  # Table C.1
    return 2 * (math.exp(2 * a * a) - math.exp(a * a) * a * a - 1) / (math.exp(2 * a * a) - 1)


def test_table_values_match_closed_forms():
    result = _run("relu", "tanh", "sin", "--gain", "1", "--gain", "2")
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0].split()[:6] == ["activation", "gain", "c0", "c1", "σ̄(1)", "β"]
    rows = {(cells[0], float(cells[1])): cells for cells in (line.split() for line in lines[2:])}
    assert set(rows) == {(a, g) for a in ("relu", "tanh", "sin") for g in (1.0, 2.0)}
    for gain in (1.0, 2.0):
        relu = rows["relu", gain]
        assert float(relu[2]) == pytest.approx(gain / math.sqrt(2 * math.pi), abs=1e-12)  # c0
        assert float(relu[3]) == pytest.approx(gain / 2, abs=1e-12)  # c1
        assert float(relu[4]) == pytest.approx(gain * gain * (0.5 - 1 / (2 * math.pi)), abs=1e-12)  # σ̄(1)
        assert float(relu[5]) == pytest.approx(RELU, abs=1e-12) and float(relu[6]) == pytest.approx(RELU, abs=1e-12)
        sin = rows["sin", gain]
        assert float(sin[5]) == pytest.approx(_sin(gain), abs=1e-12)
        assert float(sin[6]) == pytest.approx(_sin(gain), abs=1e-12)
        assert len(rows["tanh", gain]) == 6  # no closed form: the last column is blank


def test_json_output():
    result = _run("exp", "step", "--gain", "0.5", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [(r["activation"], r["gain"]) for r in rows] == [("exp", 0.5), ("step", 0.5)]
    a2 = 0.25
    assert rows[0]["beta"] == pytest.approx((2 - 2 * math.exp(a2) + a2) / (1 - math.exp(a2)), abs=1e-12)
    assert rows[1]["beta"] == pytest.approx(2 - 2 / math.pi, abs=1e-12)
    assert rows[1]["c0"] == pytest.approx(0.5, abs=1e-14) and rows[1]["var"] == pytest.approx(0.25, abs=1e-14)


def test_default_gain_is_one():
    rows = json.loads(_run("relu", "--json").output)
    assert [r["gain"] for r in rows] == [1.0]


def test_list():
    result = _run("--list")
    assert result.exit_code == 0
    for name in ("relu", "hardtanh", "gelu_tanh", "exp"):
        assert name in result.output
    rows = {r["name"]: r for r in json.loads(_run("--list", "--json").output)}
    assert rows["hardtanh"]["kinks"] == [-1.0, 1.0] and rows["step"]["closed_form_beta"]


def test_unknown_name_exits_2_listing_valid_names():
    result = _run("relu", "swish3")
    assert result.exit_code == 2
    assert "swish3" in result.output and "leaky_relu" in result.output and "gelu_tanh" in result.output


def test_no_activation_is_a_usage_error_with_an_example():
    result = _run()
    assert result.exit_code == 2
    assert "isoprobe beta relu" in result.output


def test_gain_zero_is_a_usage_error():
    result = _run("tanh", "--gain", "0")
    assert result.exit_code == 2 and "constant" in result.output


def test_help_has_an_example():
    result = _run("--help")
    assert result.exit_code == 0 and "isoprobe beta relu tanh sin --gain 1 --gain 2" in result.output


def test_small_gains_print_their_small_statistics_and_noise_as_zero():
    result = CliRunner().invoke(main, ["beta", "relu", "tanh", "--gain", "1e-12"])
    assert result.exit_code == 0, result.output
    relu, tanh = (line.split() for line in result.stdout.splitlines()[2:4])
    alpha = 1e-12  # ReLU(αz): c0 = α/√(2π), c1 = α/2, σ̄(1) = α²(1/2 − 1/(2π))
    expected = [alpha / math.sqrt(2 * math.pi), alpha / 2, alpha**2 * (0.5 - 1 / (2 * math.pi))]
    assert [float(x) for x in relu[2:5]] == pytest.approx(expected, rel=1e-10)
    assert relu[4] != "0.000000000000" and "e-25" in relu[4]
    assert tanh[2] == "0.000000000000"  # tanh is odd: c0 = 0, the quadrature's 1e-29 is noise
    assert float(tanh[4]) == pytest.approx(alpha**2, rel=1e-9)  # tanh(αz) ≈ αz: σ̄(1) ≈ α²
