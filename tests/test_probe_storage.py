"""The Probe's record storage: summary object, bounded streaming mode (sink), `sites` checks."""

from __future__ import annotations

import dataclasses
import tracemalloc

import pytest
import torch
from torch import nn

from isoprobe import Probe
from isoprobe.records import RecordSink, RunningSummary, Summary, read_records, summarize


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.Tanh())


def test_summary_is_a_table_object_of_the_records():
    model = tiny_model()
    with torch.no_grad(), Probe(model) as probe:
        for _ in range(3):
            model(torch.randn(5, 6))
    summary = probe.summary()
    assert isinstance(summary, Summary) and summary == summarize(probe.records)
    lines = str(summary).splitlines()
    assert lines[0].split() == ["site", "point", "view", "n", "gap", "mean", "±", "std", "Theorem", "1", "flagged"]
    assert [line.split()[:2] for line in lines[2:]] == [
        ["1", "pre"],
        ["1", "centered"],
        ["1", "normalized"],
        ["1", "post"],
        ["2", "pre"],
        ["2", "post"],
    ]
    assert "yes 3/3" in lines[4]
    assert [row["key"] for row in summary] == [r.key for r in probe.records[:6]]


def test_sink_streams_every_record_and_keeps_only_running_summaries(tmp_path):
    model = tiny_model()
    reference = tiny_model()
    inputs = [torch.randn(5, 6) for _ in range(40)]
    path = tmp_path / "records.jsonl"
    with torch.no_grad(), Probe(model, every=3, sink=path) as probe, Probe(reference, every=3) as kept:
        for x in inputs:
            model(x)
            reference(x)
            assert probe._records == []  # nothing kept in memory
        streamed = probe.summary()
    written = read_records(path)
    assert written == kept.records and len(written) == 14 * 6  # calls 0, 3, ..., 39
    expected = summarize(kept.records)
    for got, want in zip(streamed, expected, strict=True):
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert got[key] == (pytest.approx(value, rel=1e-12) if isinstance(value, float) else value), key
    for access in (lambda: probe.records, probe.pop_records, lambda: probe["1:pre"]):
        with pytest.raises(RuntimeError, match="read_records"):
            access()


def test_sink_path_that_cannot_be_written_fails_before_any_forward(tmp_path):
    with pytest.raises(OSError, match="the sink's folder does not exist"):
        Probe(tiny_model(), sink=tmp_path / "missing-dir" / "r.csv")
    with pytest.raises(ValueError, match=r"give a \.csv or \.jsonl file"):
        Probe(tiny_model(), sink=tmp_path / "r.parquet")  # was written as JSON lines under a parquet name


def test_bounded_storage_stays_flat_over_10000_probed_steps(tmp_path):
    """10 000 steps' records of a real probed forward through the sink and running summaries:
    traced memory stays flat, while keeping the records (the Probe without a sink) grows."""
    model = tiny_model()
    with torch.no_grad(), Probe(model, sites="activation") as probe:
        model(torch.randn(5, 6))
    step_records = probe.records  # the 2 records of one probed step
    sink, running = RecordSink(tmp_path / "r.csv"), RunningSummary()
    kept: list = []

    def traced_growth(store, steps: int) -> int:
        tracemalloc.start()
        try:
            store(step_records)  # first groups and buffers
            start = tracemalloc.get_traced_memory()[0]
            for step in range(1, steps + 1):  # fresh records every step, as a probed forward makes
                store([dataclasses.replace(r, step=step) for r in step_records])
            return tracemalloc.get_traced_memory()[0] - start
        finally:
            tracemalloc.stop()

    bounded = traced_growth(lambda rs: (sink.write(rs), running.add(rs)), 10_000)
    sink.close()
    unbounded = traced_growth(kept.extend, 1_000)
    assert bounded < 32_000, bounded
    assert unbounded > 10 * 32_000, unbounded  # a tenth of the steps, kept: far above the bound
    assert running.summary()[0]["count"] == 10_001
    with (tmp_path / "r.csv").open() as f:
        assert sum(1 for _ in f) == 1 + 2 * 10_001


def probed_growth(probe: Probe, model: nn.Module, steps: int) -> int:
    """Bytes of Python memory still allocated after ``steps`` probed forwards of ``model``, traced
    from after a warm-up of 50 (first-time groups, buffers and caches are made there). One torch
    thread: on a shared 2-core machine tiny ops run ~6× faster than with two."""
    xs = [torch.randn(5, 6) for _ in range(8)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.no_grad(), probe:
        for i in range(50):
            model(xs[i % 8])
        tracemalloc.start()
        try:
            start = tracemalloc.get_traced_memory()[0]
            for i in range(steps):
                model(xs[i % 8])
            return tracemalloc.get_traced_memory()[0] - start
        finally:
            tracemalloc.stop()
            torch.set_num_threads(threads)


def test_probe_with_a_sink_stays_flat_over_1000_real_probed_forwards(tmp_path):
    """The Probe's own storage (records, pending statistics, per-forward site calls, Gram
    workspaces, the sink's file and running summaries) over 1000 real probed forwards of
    Linear → LayerNorm → GELU (6 records each): the Python memory traced from step 50 to the
    end grows by under 32 KiB, i.e. under 33 bytes a step, less than two floats kept per step
    (a float is 24 bytes, a record hundreds; measured: 1-6 KB in all, once 19 KB under load,
    whether over 200, 1000 or 2000 steps, so not per step). Without a sink, 200 steps' records
    alone grow it more than 10-fold beyond the bound: the measurement sees a per-step leak. (1000 steps, not more:
    traced forwards take 10-45 ms each on the shared 2-core machine.)"""
    model = nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.GELU())
    path = tmp_path / "records.csv"
    probe = Probe(model, sink=path)
    bounded = probed_growth(probe, model, 1000)
    assert bounded < 32 * 1024, bounded
    assert probe.summary()[0]["count"] == 1050
    with path.open() as f:
        assert sum(1 for _ in f) == 1 + 6 * 1050
    kept = probed_growth(Probe(model), model, 200)
    assert kept > 10 * 32 * 1024, kept


@pytest.mark.parametrize(("sites", "shown"), [(123, "int 123"), (["norm", 5], "int 5"), ({"norm"}, "set")])
def test_sites_of_the_wrong_type_say_what_sites_accepts(sites, shown):
    with pytest.raises(TypeError, match="sites must be None .every site., 'norm', 'activation', a glob") as info:
        Probe(tiny_model(), sites=sites)
    assert shown in str(info.value)


def test_a_lookup_that_names_no_point_or_matches_nothing_says_what_there_is():
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.GELU())
    probe = Probe(model)
    assert probe["1:pre"] == []  # nothing recorded yet: an empty answer, not an error
    with probe:
        model(torch.randn(5, 4))
    assert len(probe["1:pre"]) == 1 and len(probe["*:post"]) == 2
    with pytest.raises(KeyError, match=r"must be a point \(pre, centered, normalized, post\), a function"):
        probe["1:bogus"]
    with pytest.raises(KeyError, match=r"no record matches 'h\.\*'; recorded sites: 1, 2"):
        probe["h.*"]


# ---- sinks never clobber; clean errors (issue 21, items 5 and 6)


def _run(model, path, **options):
    with torch.no_grad(), Probe(model, sink=path, **options) as probe:
        model(torch.randn(5, 6, generator=torch.Generator().manual_seed(0)))
    return probe


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_an_existing_sink_file_is_refused_appended_or_overwritten_as_asked(tmp_path, suffix):
    model, path = tiny_model(), tmp_path / f"run{suffix}"
    _run(model, path)
    first = read_records(path)
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match=r"not empty.*sink_mode='append'") as info:
        Probe(model, sink=path)
    assert info.value.filename == str(path)
    assert path.read_bytes() == before  # untouched
    _run(model, path, sink_mode="append")
    assert read_records(path) == first + first  # the forward counter restarts with a new Probe
    _run(model, path, sink_mode="overwrite")
    assert read_records(path) == first
    with pytest.raises(ValueError, match="sink_mode must be one of new, append, overwrite"):
        Probe(model, sink=tmp_path / "other.jsonl", sink_mode="keep")


def test_an_empty_existing_sink_file_is_a_new_file(tmp_path):
    path = tmp_path / "run.csv"
    path.touch()
    _run(tiny_model(), path)
    assert len(read_records(path)) == 6


def test_appending_to_a_csv_of_other_columns_is_refused(tmp_path):
    path = tmp_path / "run.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="cannot append to .*run.csv.*header"):
        Probe(tiny_model(), sink=path, sink_mode="append")


def test_probe_index_by_position_is_a_type_error_about_keys():
    model = tiny_model()
    with torch.no_grad(), Probe(model) as probe:
        model(torch.randn(5, 6))
    with pytest.raises(TypeError, match=r"keys are site names or glob patterns.*not int 0.*probe.records"):
        probe[0]


@pytest.mark.parametrize(
    "name, text, line, what",
    [
        ("r.jsonl", '{"site": "a", "point": "pre", "step": 0}\n{"site": "a", "po\n', 2, "one JSON object per line"),
        ("r.jsonl", "\n[1, 2]\n", 2, "not an object"),
        ("r.jsonl", '{"point": "pre"}\n', 1, "no site, step"),
        ("r.csv", "x,y\n1,2\n", 1, "a CSV header of record fields"),
    ],
)
def test_a_damaged_records_file_names_the_file_and_the_line(tmp_path, name, text, line, what):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"{name}, line {line}: expected .*{what}"):
        read_records(path)


def test_a_damaged_csv_row_names_its_line(tmp_path):
    model, path = tiny_model(), tmp_path / "r.csv"
    _run(model, path)
    lines = path.read_text().splitlines()
    lines[3] = lines[3].replace(",0,", ",zero,", 1)  # the step column of the third record
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"r.csv, line 4: expected a CSV row of record fields"):
        read_records(path)
