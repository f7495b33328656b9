"""The reproduction framework and the Joudaki et al. reproductions: CLI, outputs, resume, collapsed
values, and decision rules that must fail on fabricated data."""

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import isoprobe.experiments.joudaki as joudaki
from isoprobe.cli import main
from isoprobe.experiments import REGISTRY, run_reproductions
from isoprobe.experiments.base import (
    TidyTable,
    UnknownReproduction,
    gap_curves,
    make_context,
    mean_curve,
    new_figure,
    plot_depth_curves,
    resolve_names,
    run_curves,
)

JOUDAKI = ["table2", "fig2", "fig3", "fig4", "fig5", "fig6", "fig8a", "fig8b", "fig9", "figB1",
           "figC1", "figC2", "figC3", "figC4"]


def _quiet(**kw):
    return dict(show_progress=False, echo=lambda msg: None, **kw)


# --- registry and CLI ---------------------------------------------------------------------------


def test_registry_has_every_joudaki_reproduction():
    assert [n for n in REGISTRY if n in JOUDAKI] == JOUDAKI
    for name in JOUDAKI:
        rep = REGISTRY[name]
        assert rep.paper.startswith("Joudaki") and rep.figure and rep.claim


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(UnknownReproduction, match="valid names: all, table2"):
        resolve_names(["fig99"])
    assert resolve_names(["all"]) == list(REGISTRY)
    assert resolve_names(["fig3", "fig3", "table2"]) == ["fig3", "table2"]


def test_cli_list_and_usage_errors():
    runner = CliRunner()
    out = runner.invoke(main, ["repro", "--list"])
    assert out.exit_code == 0
    for name in JOUDAKI:
        assert f"  {name} " in out.output
    bad = runner.invoke(main, ["repro", "fig99"])
    assert bad.exit_code == 2 and "valid names" in bad.output and "figC4" in bad.output
    assert runner.invoke(main, ["repro"]).exit_code == 2
    assert runner.invoke(main, ["repro", "fig3", "--data", "imagenet"]).exit_code == 2
    if not torch.cuda.is_available():
        assert runner.invoke(main, ["repro", "fig3", "--device", "cuda"]).exit_code == 2


def test_cli_runs_writes_outputs_and_skips_when_up_to_date(tmp_path):
    runner = CliRunner()
    args = ["repro", "table2", "fig8b", "--quick", "--runs", "2", "--out", str(tmp_path), "--no-progress"]
    first = runner.invoke(main, args)
    assert first.exit_code == 0, first.output
    for name in ("table2", "fig8b"):
        for suffix in (".csv", ".png", ".json"):
            assert (tmp_path / f"{name}{suffix}").stat().st_size > 0
        assert not (tmp_path / f"{name}.units.json").exists()
    summary = json.loads((tmp_path / "fig8b.json").read_text())
    assert set(summary) >= {"claim", "measured", "theory", "held", "rule", "config", "elapsed_s"}
    assert summary["held"] is True and summary["config"]["runs"] == 2
    header = (tmp_path / "fig8b.csv").read_text().splitlines()[0]
    assert header == "act,variant,beta,run,layer,gap"
    rows = (tmp_path / "fig8b.csv").read_text().splitlines()[1:]
    assert len(rows) == 3 * 2 * 2 * 31  # activations × variants × runs × layers
    second = runner.invoke(main, args)
    assert second.exit_code == 0 and second.output.count("up to date") == 2


# --- resume -------------------------------------------------------------------------------------


def test_tidy_table_resumes_finished_units_only(tmp_path):
    path = tmp_path / "x.csv"
    t = TidyTable(path, ["a", "b"], {"k": 1})
    t.unit("u1", lambda: [dict(a=1, b=0.5), dict(a=2, b=math.inf)])
    t.unit("u2", lambda: [dict(a=3, b="x")])
    with path.open("a") as f:  # an interrupted unit: rows written, never recorded as done
        f.write("4,9.0\n5,")
    again = TidyTable(path, ["a", "b"], {"k": 1})
    assert again.resumed == ["u1", "u2"]
    assert again.rows() == [dict(a=1, b=0.5), dict(a=2, b=math.inf), dict(a=3, b="x")]
    assert again.unit("u1", lambda: pytest.fail("recomputed a finished unit")) == again.rows()[:2]
    assert path.read_text().count("\n") == 4  # header + 3 rows: the partial unit is gone
    fresh = TidyTable(path, ["a", "b"], {"k": 2})  # another config starts over
    assert fresh.resumed == [] and fresh.rows() == []


def test_interrupted_reproduction_resumes_by_units(tmp_path, monkeypatch):
    real = joudaki.simulate_spec
    calls = []

    def flaky(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(joudaki, "simulate_spec", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_reproductions(["fig8b"], quick=True, runs=2, out_dir=tmp_path, **_quiet())
    assert not (tmp_path / "fig8b.json").exists()
    monkeypatch.setattr(joudaki, "simulate_spec", real)
    (summary,) = run_reproductions(["fig8b"], quick=True, runs=2, out_dir=tmp_path, **_quiet())
    assert "resumed 2 finished unit(s)" in " ".join(summary["notes"])
    assert len((tmp_path / "fig8b.csv").read_text().splitlines()) == 1 + 3 * 2 * 2 * 31


# --- collapsed values ---------------------------------------------------------------------------


def test_collapsed_and_overflowed_grams_are_counted_never_dropped():
    G = torch.eye(3, dtype=torch.float64).repeat(2, 4, 1, 1)
    G[0, 2] = torch.ones(3, 3, dtype=torch.float64)  # collapsed: singular
    G[1, 3, 0, 0] = math.inf  # overflowed representation
    gaps, overflow = gap_curves(G)
    assert overflow == 1 and np.isinf(gaps[0, 2]) and np.isinf(gaps[1, 3]) and not np.isnan(gaps).any()
    mean = mean_curve(gaps)
    assert np.isinf(mean[2]) and np.isinf(mean[3]) and mean[0] == pytest.approx(0.0, abs=1e-12)
    fig, (ax,) = new_figure(1)
    assert plot_depth_curves(ax, gaps + 0.1, label="x") == 2
    assert "2 collapsed" in ax.get_legend_handles_labels()[1][0]


def test_a_curve_collapsed_everywhere_is_drawn_at_the_top_and_counted():
    import io

    fig, (ax, ax2) = new_figure(2)
    assert plot_depth_curves(ax, np.full((3, 5), np.inf), label="x") == 15  # log axis, nothing finite
    assert "15 collapsed" in ax.get_legend_handles_labels()[1][0]
    tops = [ln for ln in ax.get_lines() if ln.get_marker() == "^"]
    assert len(tops) == 1 and list(tops[0].get_xdata()) == [0, 1, 2, 3, 4]
    assert np.allclose(tops[0].get_ydata(), 0.97)  # axes fraction: the top edge
    # on shared axes, a finite curve drawn after it still gets its log axis
    assert plot_depth_curves(ax2, np.full((2, 4), np.inf), label="collapsed") == 8
    assert plot_depth_curves(ax2, np.full((2, 4), 0.5), label="finite") == 0
    assert ax2.get_yscale() == "log"
    fig.savefig(io.BytesIO(), format="png")  # drawing used to fail: "Data cannot be log-scaled"


def test_run_curves_places_rows_by_run_and_index():
    rows = [dict(s="a", run=1, layer=2, gap=5.0), dict(s="a", run=0, layer=0, gap=1.0),
            dict(s="a", run="", layer=1, gap=7.0), dict(s="b", run=0, layer=3, gap=9.0)]
    got = run_curves(rows, s="a")
    want = np.array([[1.0, np.nan, np.nan], [np.nan, np.nan, 5.0], [np.nan, 7.0, np.nan]])  # theory run last
    np.testing.assert_array_equal(got, want)
    assert run_curves(rows, "gap", length=5, s="b").shape == (1, 5)
    with pytest.raises(KeyError):
        run_curves(rows, s="c")


def test_norm_sites_compare_each_norm_with_the_site_before_it():
    order = joudaki.site_order(2)
    assert order == [(0, "input"), (0, "norm"), (1, "fc"), (1, "act"), (1, "norm"), (2, "fc"), (2, "act"),
                     (2, "norm")]
    values = np.arange(2 * len(order), dtype=float).reshape(2, len(order))
    before, after = joudaki.norm_site_gaps(values, order)
    np.testing.assert_array_equal(before, [0, 3, 6, 8, 11, 14])
    np.testing.assert_array_equal(after, [1, 4, 7, 9, 12, 15])


# --- decision rules on fabricated data ----------------------------------------------------------


def _fabricate(tmp_path, name, columns, units, **opts):
    """Write finished units with made-up rows, as if an earlier run had computed them."""
    ctx = make_context(name, out_dir=tmp_path, **_quiet(**opts))
    table = ctx.table(columns)
    for key, rows in units.items():
        table.unit(key, lambda rows=rows: rows)
    return ctx.config


def _fig4_units(acts, runs, depth, final):
    cols = ["act", "variant", "beta", "run", "layer", "gap"]
    units = {}
    for act in acts:
        for variant in ("layer", "mean-field"):
            end = final[variant]
            units[f"{act}|{variant}"] = [
                dict(act=act, variant=variant, beta=1.2, run=r, layer=ell, gap=0.5 * (end / 0.5) ** (ell / depth))
                for r in range(runs) for ell in range(depth + 1)
            ]
    return cols, units


@pytest.mark.parametrize("final, held", [({"layer": 0.01, "mean-field": 0.012}, True),
                                         ({"layer": 0.01, "mean-field": 0.1}, False)])
def test_fig4_rule_decides_on_the_data(tmp_path, final, held):
    cols, units = _fig4_units(joudaki._FIG_ACTS, 2, 30, final)
    _fabricate(tmp_path, "fig4", cols, units, quick=True, runs=2)
    (summary,) = run_reproductions(["fig4"], quick=True, runs=2, out_dir=tmp_path, **_quiet())
    assert summary["held"] is held
    assert "resumed 8 finished unit(s)" in " ".join(summary["notes"])


def _fig2_rows(act, run, depth, norm_gap):
    rows = [("input", 0, 2.0), ("norm:centered", 0, 1.9), ("norm:normalized", 0, 1.8), ("norm", 0, 1.8)]
    for ell in range(1, depth + 1):
        rows += [("fc", ell, 2.0), ("act", ell, 1.5), ("norm:centered", ell, 1.5), ("norm:normalized", ell, 1.4),
                 ("norm", ell, norm_gap)]
    return [dict(act=act, beta=1.1, run=run, layer=ell, site=site, gap=gap,
                 theorem1_holds=1 if site == "norm:normalized" else "") for site, ell, gap in rows]


@pytest.mark.parametrize("norm_gap, held", [(1.4, True), (1.6, False)])
def test_fig2_rule_fails_when_a_norm_raises_the_gap(tmp_path, norm_gap, held):
    cols = ["act", "beta", "run", "layer", "site", "gap", "theorem1_holds"]
    units = {f"{a}|0": _fig2_rows(a, 0, 10, norm_gap) for a in joudaki.FIG7_ACTS}
    _fabricate(tmp_path, "fig2", cols, units, quick=True, runs=1, data="synthetic")
    (summary,) = run_reproductions(["fig2"], quick=True, runs=1, out_dir=tmp_path, data="synthetic", **_quiet())
    assert summary["held"] is held
    assert summary["measured"]["norm_sites_raising_gap"] == (0 if held else 10 * len(joudaki.FIG7_ACTS))


def test_fig9_rule_fails_when_layer_norm_error_accumulates(tmp_path):
    cols = ["width", "variant", "run", "layer", "mf_error", "gap"]
    units = {}
    for d in (100, 1000, 10000):
        for v in ("mean-field", "LN"):
            grow = 2.0 if v == "LN" else 1.0  # fabricated: LN's error grows linearly with depth, fastest
            units[f"{d}|{v}"] = [dict(width=d, variant=v, run=r, layer=ell, mf_error=(1 + grow * ell) / math.sqrt(d),
                                      gap=0.1) for r in range(2) for ell in range(31)]
    _fabricate(tmp_path, "fig9", cols, units, quick=True, runs=2)
    (summary,) = run_reproductions(["fig9"], quick=True, runs=2, out_dir=tmp_path, **_quiet())
    assert summary["held"] is False
