"""Record writers and summaries, against values computed here by hand / with numpy."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import sys

import numpy as np
import pytest

from isoprobe.records import (
    SINGULAR,
    Record,
    RecordSink,
    RunningSummary,
    Summary,
    csv_text,
    format_table,
    json_text,
    plot_records,
    read_json,
    read_records,
    summarize,
    theorem1_counts,
    to_csv,
    to_json,
)


def rec(site="a.ln", point="pre", gap=0.5, item=0, step=0, kind="norm", **kw):
    iso = None if gap is None else math.exp(-gap)
    return Record(
        site=site,
        kind=kind,
        point=point,
        view="token",
        item=item,
        step=step,
        n=8,
        dim=16,
        isometry=iso,
        isometry_gap=gap,
        orthogonality_gap=None if gap is None else 0.1,
        **kw,
    )


def sample_records():
    return [
        rec(point="pre", gap=0.9, item=0),
        rec(point="pre", gap=0.7, item=1),
        rec(point="normalized", gap=0.4, item=0, theorem1_bound=0.6, theorem1_holds=True, norm_factor=1.1),
        rec(point="normalized", gap=0.6, item=1, theorem1_bound=0.6, theorem1_holds=False, norm_factor=1.2),
        rec(site="b.act", kind="activation", point="pre", gap=math.inf),
        rec(site="b.act", kind="activation", point="pre", gap=None, item=1, flag="non-finite"),
        rec(site="b.act", kind="activation", point="post", gap=0.2),
    ]


def test_key_and_dict_roundtrip():
    r = rec(site="transformer.h.3.ln_1", point="pre")
    assert r.key == "transformer.h.3.ln_1:pre"
    assert Record.from_dict(r.to_dict()) == r


def test_summarize_means_and_flags():
    rows = {(r["site"], r["point"]): r for r in summarize(sample_records())}
    assert list(rows) == [("a.ln", "pre"), ("a.ln", "normalized"), ("b.act", "pre"), ("b.act", "post")]
    pre = rows[("a.ln", "pre")]
    assert pre["gap_mean"] == pytest.approx(np.mean([0.9, 0.7]))
    assert pre["gap_std"] == pytest.approx(np.std([0.9, 0.7]))
    assert pre["isometry_mean"] == pytest.approx(np.mean(np.exp([-0.9, -0.7])))
    norm = rows[("a.ln", "normalized")]
    assert (norm["theorem1_checked"], norm["theorem1_violations"], norm["bound_mean"]) == (2, 1, 0.6)
    act = rows[("b.act", "pre")]
    assert act["gap_mean"] is None and act["gap_std"] is None  # no finite gap
    assert (act["count"], act["singular"], act["nonfinite"], act["isometry_mean"]) == (2, 1, 1, 0.0)
    assert theorem1_counts(sample_records()) == {"checked": 2, "violations": 1, "eps_dominated": 0}


def test_csv_rows():
    records = sample_records()
    rows = list(csv.DictReader(io.StringIO(csv_text(records))))
    assert len(rows) == len(records)
    assert float(rows[0]["isometry_gap"]) == 0.9 and rows[0]["theorem1_bound"] == ""
    assert rows[4]["isometry_gap"] == "inf" and rows[5]["flag"] == "non-finite"


def test_json_is_strict_and_roundtrips(tmp_path):
    records = sample_records()

    def no_constants(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    obj = json.loads(json_text(records, model="m"), parse_constant=no_constants)
    assert obj["model"] == "m" and obj["records"][4]["isometry_gap"] == "inf"
    back, extra = read_json(to_json(records, tmp_path / "r.json", model="m"))
    assert back == records and extra == {"model": "m"}
    to_csv(records, tmp_path / "r.csv")
    assert (tmp_path / "r.csv").read_text() == csv_text(records)


def test_table_rows_in_forward_order():
    lines = format_table(sample_records()).splitlines()
    assert lines[0].split()[:4] == ["site", "point", "view", "n"]
    cells = [line.split()[:2] for line in lines[2:]]
    assert cells == [["a.ln", "pre"], ["a.ln", "normalized"], ["b.act", "pre"], ["b.act", "post"]]
    assert "0.80 ± 0.10" in lines[2]  # mean ± population std of 0.9 and 0.7, to one precision
    assert "NO 1/2" in lines[3]
    assert "inf (1 singular)" in lines[4] and "1 nonfinite" in lines[4]


def test_table_says_undefined():
    records = [rec(gap=None, flag="undefined: fewer than 2 items")]
    assert "undefined" in format_table(records).splitlines()[2]


def test_table_n_is_an_integer_or_a_range():
    records = [dataclasses.replace(rec(item=i), n=n) for i, n in enumerate((9, 15, 1024))]
    records.append(dataclasses.replace(rec(site="c", item=0), n=1024))
    lines = format_table(records).splitlines()
    assert lines[2].split()[3] == "9–1024" and lines[3].split()[3] == "1024"
    row = summarize(records)[0]
    assert (row["n_min"], row["n_max"], row["n_mean"]) == (9, 1024, (9 + 15 + 1024) / 3)


def test_summary_object_prints_the_table_iterates_rows_and_converts_to_pandas(monkeypatch):
    records = sample_records()
    summary = summarize(records)
    assert isinstance(summary, Summary)
    assert str(summary) == format_table(records) and str(summary) in repr(summary)
    rows = list(summary)
    assert all(isinstance(row, dict) for row in rows) and len(summary) == 4
    assert summary[0]["key"] == "a.ln:pre" and summary[-1]["key"] == "b.act:post"
    assert summary == rows
    frame = summary.to_pandas()
    assert list(frame["key"]) == [row["key"] for row in rows]
    assert frame["gap_mean"][0] == pytest.approx(0.8)
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match="pip install pandas"):
        summary.to_pandas()


def test_running_summary_equals_summarize_of_all_records():
    rng = np.random.default_rng(0)
    gaps = rng.exponential(0.3, size=500)
    records = [rec(site=f"s{i % 3}", gap=float(g), item=i, step=i // 7) for i, g in enumerate(gaps)]
    running = RunningSummary()
    for start in range(0, len(records), 37):
        running.add(records[start : start + 37])
    got = running.summary()
    assert [row["key"] for row in got] == ["s0:pre", "s1:pre", "s2:pre"]
    for j, row in enumerate(got):
        own = gaps[j::3]
        assert row["count"] == len(own)
        assert row["gap_mean"] == pytest.approx(own.mean(), rel=1e-12)
        assert row["gap_std"] == pytest.approx(own.std(), rel=1e-10)
        assert row["isometry_std"] == pytest.approx(np.exp(-own).std(), rel=1e-10)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_sink_streams_records_and_reads_them_back(tmp_path, suffix):
    records = sample_records() + [rec(site="b.act", gap=0.3, call=1)]
    sink = RecordSink(tmp_path / f"r{suffix}")
    sink.write(records[:3])
    sink.close()
    sink.write(records[3:])  # reopens and appends
    sink.close()
    assert read_records(tmp_path / f"r{suffix}") == records
    assert read_records(to_csv(records, tmp_path / "all.csv")) == records
    with pytest.raises(OSError):
        RecordSink(tmp_path / "no-such-dir" / f"r{suffix}")


def test_plot_writes_png(tmp_path):
    path = plot_records(sample_records(), tmp_path / "p.png", title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no records"):
        plot_records([], tmp_path / "q.png")


def test_calls_are_keyed_apart_and_old_files_read_as_call_0(tmp_path):
    first, second = rec(site="b.act", gap=0.2), rec(site="b.act", gap=0.6, call=1)
    assert (first.key, second.key) == ("b.act:pre", "b.act@1:pre")
    assert first.matches("b.act:pre") and second.matches("b.act:pre")  # no "@": every call
    assert second.matches("b.act@1:*") and not first.matches("b.act@1:*") and first.matches("b.act@0:pre")
    rows = summarize([first, second])
    assert [(r["key"], r["gap_mean"]) for r in rows] == [("b.act:pre", 0.2), ("b.act@1:pre", 0.6)]
    row = first.to_dict()
    del row["call"]  # a file written before records had a call
    assert Record.from_dict(row) == first


def test_plot_leaves_the_users_matplotlib_backend_alone(tmp_path):
    import matplotlib

    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        plot_records(sample_records(), tmp_path / "p.png")
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)


def test_plot_ticks_name_layers_and_fit_a_column(tmp_path):
    from PIL import Image

    from isoprobe.records import _layer_ticks

    units = [
        ("transformer.h.0.ln_1", 0),
        ("transformer.h.0.mlp.act", 0),
        ("transformer.h.1.ln_1", 0),
        ("transformer.ln_f", 0),
    ]
    assert _layer_ticks(units) == ([0.5, 4.5, 6.5], ["0", "1", "ln_f"])
    many = [(f"h.{i}.ln", 0) for i in range(48)]
    assert len(_layer_ticks(many)[1]) <= 14
    records = [rec(site=site, point=p, gap=g) for site, _ in units for p, g in (("pre", 0.5), ("post", 0.2))]
    with Image.open(plot_records(records, tmp_path / "p.png", title="t")) as image:
        assert image.size == (1050, 930)  # 3.5 x 3.1 in at 300 dpi


def test_plot_does_not_join_sites_of_different_views():
    """A pooler's sample-view Gram (over the texts) after token-view sites is another quantity:
    no dotted line may join it to the token curve, as if the pooler restored isometry."""
    from matplotlib.figure import Figure

    from isoprobe.records import _draw_sites

    records = [rec(site=s, point=p, gap=g) for s in ("h.0.ln", "h.1.ln") for p, g in (("pre", 0.9), ("post", 0.8))]
    pooler = [rec(site="pooler.act", point=p, gap=0.1, kind="activation") for p in ("pre", "post")]
    records += [dataclasses.replace(r, view="sample") for r in pooler]
    rows = {(r["site"], r["call"], r["point"]): r for r in summarize(records)}
    ax = Figure().add_subplot()
    _draw_sites(ax, rows, list(dict.fromkeys((s, c) for s, c, _ in rows)))
    dotted = [line.get_xdata().tolist() for line in ax.lines if line.get_linestyle() == ":"]
    assert dotted == [[1, 2]]  # h.0.ln -> h.1.ln only; nothing into the pooler at x = 4


def test_a_single_gram_prints_its_gap_without_a_spread():
    one, two = [rec(site="a", gap=0.25)], [rec(site="b", gap=0.9), rec(site="b", gap=0.7, item=1)]
    lines = format_table(one + two).splitlines()
    assert "0.25 " in lines[2] and "±" not in lines[2]  # one text: no "± 0"
    assert "0.80 ± 0.10" in lines[3]


def test_one_singular_gram_leaves_the_mean_over_the_finite_gaps_and_is_counted():
    records = [rec(gap=0.9, item=0), rec(gap=0.5, item=1), rec(gap=math.inf, item=2)]
    row = summarize(records)[0]
    assert row["gap_mean"] == pytest.approx(0.7) and row["gap_std"] == pytest.approx(0.2)
    assert (row["singular"], row["singular_by_construction"]) == (1, 0)
    assert row["isometry_mean"] == pytest.approx((math.exp(-0.9) + math.exp(-0.5)) / 3)
    assert "0.70 ± 0.20 (+1 singular)" in format_table(records).splitlines()[2]


def test_grams_singular_by_construction_are_marked_and_not_theorem1_checks():
    short = dict(n=40, dim=16, flag=SINGULAR)
    records = [
        dataclasses.replace(rec(point="pre", gap=math.inf), **short),
        dataclasses.replace(rec(point="normalized", gap=math.inf), **short),
    ]
    lines = format_table(records).splitlines()
    assert "singular by construction ×1 (n > dim)" in lines[2] and "inf" not in lines[2].split("(")[0]
    assert "n/a: singular" in lines[3]
    assert theorem1_counts(records)["checked"] == 0
    # a file written before the flag existed: n > dim decides
    old = summarize([dataclasses.replace(records[0], flag=None)])[0]
    assert old["singular_by_construction"] == 1


def test_window_field_roundtrips_through_csv_and_json(tmp_path):
    records = [rec(item=3, window=2), rec(item=3, window=None)]
    assert read_records(to_csv(records, tmp_path / "r.csv")) == records
    assert read_json(to_json(records, tmp_path / "r.json"))[0] == records
