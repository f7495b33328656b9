"""`isoprobe repro NAME --protocol paper` for Joudaki et al.'s Figs. 4, 5, 6, 8a, 8b and 9, end to end."""

import json

import pytest

from isoprobe.experiments import (
    REGISTRY,
    Options,
    ReproductionOptionError,
    run_reproductions,
)
from isoprobe.experiments.base import _read_rows
from isoprobe.experiments.joudaki_protocol import SETUPS

SIX = ["fig4", "fig5", "fig6", "fig8a", "fig8b", "fig9"]


def _run(names, out, **opts):
    return run_reproductions(names, Options(**opts), out, show_progress=False, echo=lambda m: None)


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """Every one of the six under both protocols, one run each, in one output directory."""
    out = tmp_path_factory.mktemp("paper")
    paper = _run(SIX, out, protocol="paper", quick=True, runs=1)
    return out, {s["name"]: s for s in paper}


@pytest.mark.parametrize("name", SIX)
def test_paper_protocol_writes_the_default_layout_with_its_own_stem(both, name):
    out, paper = both
    s = paper[name]
    on_disk = json.loads((out / f"{name}.paper.json").read_text())
    assert on_disk["config"]["protocol"] == "paper" and s["verdict"] in (
        "held",
        "not held",
        "undecided",
    )
    assert (out / f"{name}.paper.png").stat().st_size > 10_000 and (out / f"{name}.paper.csv").exists()
    assert on_disk["config"]["inputs"] == {
        "kind": "degenerate-gaussian",
        "degeneracy": SETUPS[name].degeneracy,
        "then": "rows rescaled to unit RMS, not centred",
    }
    notes = " ".join(on_disk["notes"])
    assert "pre-norm and post-norm" in notes and "under isoprobe's protocol" in notes and "published" in notes
    # the same measured keys as isoprobe's own protocol, which ran alongside with its own config
    default = json.loads(json.dumps(on_disk["config"]["isoprobe"]))
    assert default["protocol"] == "isoprobe" and default["inputs"]["kind"] == "correlated"


def _keys(measured: dict) -> set:
    """Measured keys, with the per-width entries of fig9 (widths differ between protocols) as one."""
    return {"<width>" if k.isdigit() else k for k in measured}


@pytest.mark.parametrize("name", SIX)
def test_paper_protocol_has_the_measured_keys_of_the_default_run(both, name):
    out, paper = both
    rep = REGISTRY[name]
    rows = _read_rows((out / f"{name}.paper.csv").read_text().splitlines(keepends=True))
    iso_cfg = paper[name]["config"]["isoprobe"]
    default = rep.verdict([r for r in rows if r["protocol"] == "isoprobe"], iso_cfg)  # the default rule, its rows
    assert _keys(default.measured) == _keys(paper[name]["measured"])
    assert {r["protocol"] for r in rows} == {"paper", "isoprobe"}


def test_paper_protocol_follows_the_notebook_sizes(both):
    _, paper = both
    assert paper["fig9"]["config"]["widths"] == [100, 500, 1000]
    assert paper["fig8b"]["config"]["acts"] == ["relu"]
    nb = paper["fig8a"]["config"]["notebook"]
    assert nb["extra_variants"] == {"notebook:layer-None": ["layer", "None", True]}  # the published series
    assert nb["variants"]["mean-field-projection"] == ["MF", "MF", True]
    assert paper["fig9"]["measured"].keys() >= {"100", "500", "1000"}


def test_paper_protocol_is_refused_where_there_is_none(tmp_path):
    with pytest.raises(ReproductionOptionError, match="protocol paper"):
        _run(["fig3"], tmp_path, protocol="paper")


def _fig8b_rows(protocol: str, final: dict[str, float], depth: int = 30) -> list[dict]:
    """Hand-made fig8b rows of one run: the gap falls from 5 to ``final[variant]`` at the last layer."""
    rows = []
    for variant, end in final.items():
        for ell in range(depth + 1):
            gap = 5.0 if ell < depth else end
            rows.append(
                {
                    "act": "relu",
                    "variant": variant,
                    "beta": 1.27,
                    "run": 0,
                    "layer": ell,
                    "gap": gap,
                    "rms": 1.0,
                    "norm_cv": 0.0,
                    "below_floor": 0,
                    "protocol": protocol,
                    "gap_pre": gap if ell else "",
                    "gap_post": gap,
                }
            )
    return rows


@pytest.mark.parametrize(
    ("paper_final", "iso_final", "verdict"),
    [
        (
            {"act-norm": 0.1, "norm-act": 5.0},
            {"act-norm": 1.0, "norm-act": 1.1},
            "held",
        ),
        (
            {"act-norm": 1.0, "norm-act": 1.1},
            {"act-norm": 0.1, "norm-act": 5.0},
            "not held",
        ),
    ],
)
def test_paper_verdict_applies_the_default_rule_to_the_notebook_rows_alone(paper_final, iso_final, verdict):
    rep = REGISTRY["fig8b"]
    opts = Options(protocol="paper", runs=1)
    cfg = {
        "quick": False,
        "seed": 0,
        "device": "cpu",
        "protocol": "paper",
        **rep.config(opts),
    }
    tanh = {
        "act-norm": 1.0,
        "norm-act": 1.1,
    }  # c₀ = 0: the order does not matter, in both cases
    rows = _fig8b_rows("paper", paper_final) + [
        {**r, "act": a}
        for a in ("relu", "tanh", "sigmoid")
        for r in _fig8b_rows("isoprobe", tanh if a == "tanh" else iso_final)
    ]
    v = rep.verdict(rows, cfg)
    assert v.verdict == verdict
    assert v.measured["ratio_normact_to_actnorm"]["relu"] == pytest.approx(
        paper_final["norm-act"] / paper_final["act-norm"]
    )
    other = "not held" if verdict == "held" else "held"
    assert f"under isoprobe's protocol (the default run, computed alongside): {other}" in " ".join(v.notes)


@pytest.mark.parametrize("name", SIX)
def test_only_the_paper_protocol_adds_columns(name):
    columns = REGISTRY[name].columns
    default, paper = columns({"protocol": "isoprobe"}), columns({"protocol": "paper"})
    assert "protocol" not in default and paper == (
        *default,
        "protocol",
        "gap_pre",
        "gap_post",
    )
