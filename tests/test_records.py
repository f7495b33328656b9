"""Record writers and summaries, against values computed here by hand / with numpy."""

from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pytest

from isoprobe.records import (
    Record,
    csv_text,
    format_table,
    json_text,
    plot_records,
    read_json,
    summarize,
    theorem1_counts,
    to_csv,
    to_json,
)


def rec(site="a.ln", point="pre", gap=0.5, item=0, step=0, kind="norm", **kw):
    iso = None if gap is None else math.exp(-gap)
    return Record(site=site, kind=kind, point=point, view="token", item=item, step=step, n=8, dim=16,
                  isometry=iso, isometry_gap=gap, orthogonality_gap=None if gap is None else 0.1, **kw)


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
    assert act["gap_mean"] == math.inf and act["gap_std"] is None
    assert (act["count"], act["singular"], act["nonfinite"], act["isometry_mean"]) == (2, 1, 1, 0.0)
    assert theorem1_counts(sample_records()) == {"checked": 2, "violations": 1}


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
    assert lines[0].split()[:4] == ["site", "kind", "view", "n"]
    assert lines[2].startswith("a.ln") and lines[3].startswith("b.act")
    assert "NO 1/2" in lines[2]
    assert "inf" in lines[3] and "1 nonfinite" in lines[3]


def test_table_says_undefined():
    records = [rec(gap=None, flag="undefined: fewer than 2 items")]
    assert "undefined" in format_table(records).splitlines()[2]


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
