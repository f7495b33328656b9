"""``isoprobe compare`` and ``isoprobe inspect --baseline random``: runs side by side."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from isoprobe import jobs
from isoprobe.cli import main
from isoprobe.compare import ProbeRun, compare_runs, comparison_json, format_comparison, load_run
from isoprobe.models import load_model
from isoprobe.records import Record, read_json, summarize

TEXTS = ("Layer normalization makes tokens more isometric.", "A second, shorter text.")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def run(*args):
    return CliRunner().invoke(main, list(args))


def _texts():
    return [a for t in TEXTS for a in ("--text", t)]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_gpt2_dir):
    """The tiny GPT-2 at random init, seeds 0 and 1, each written to an --out folder."""
    root = tmp_path_factory.mktemp("runs")
    for seed in (0, 1):
        args = ["gpt2", "--model", str(tiny_gpt2_dir), "--init", "random", "--seed", str(seed), "--out"]
        assert run(*args, str(root / f"s{seed}"), *_texts()).exit_code == 0
    return root / "s0", root / "s1"


def _gaps(folder):
    records, _ = read_json(folder / "records.json")
    return {(r["site"], r["point"]): r["gap_mean"] for r in summarize(records)}


def test_compare_prints_each_runs_gap_and_the_difference_and_draws_one_figure(two_runs, tmp_path):
    plot = tmp_path / "cmp.png"
    result = run("compare", *map(str, two_runs), "--plot", str(plot), "--format", "json")
    assert result.exit_code == 0, result.output
    obj = json.loads(result.stdout)
    a, b = (_gaps(f) for f in two_runs)
    assert len(obj["rows"]) == len(a) == 7 * 4 - 2 * 2  # 5 norms × 4 points, 2 activations × 2
    for row in obj["rows"]:
        key = (row["site"], row["point"])
        assert row["gaps"] == pytest.approx([a[key], b[key]], rel=1e-12)
        assert row["differences"] == pytest.approx([b[key] - a[key]], rel=1e-9, abs=1e-15)
    assert any(abs(d) > 1e-3 for row in obj["rows"] for d in row["differences"])  # two seeds differ
    assert plot.read_bytes()[:4] == b"\x89PNG"
    table = run("compare", *map(str, two_runs)).stdout.splitlines()
    assert table[0].startswith("A: ") and "(random init, seed 1)" in table[1]
    row = next(line.split() for line in table if line.startswith("transformer.ln_f") and " post " in line)
    key = ("transformer.ln_f", "post")
    assert [float(x) for x in row[2:]] == pytest.approx([a[key], b[key], b[key] - a[key]], rel=1e-3)


def test_compare_reports_the_shared_points_and_what_each_run_lacks(two_runs, tiny_gpt2_dir, tmp_path):
    norms = tmp_path / "norms"
    args = ["gpt2", "--model", str(tiny_gpt2_dir), "--init", "random", "--sites", "norm", "--out", str(norms)]
    assert run(*args, *_texts()).exit_code == 0
    result = run("compare", str(two_runs[0]), str(norms / "records.json"))
    assert result.exit_code == 0, result.output
    assert "comparing the 20 shared ones" in result.stderr
    assert "B (" in result.stdout and "lacks 4: transformer.h.0.mlp.act:pre" in result.stdout
    acts = tmp_path / "acts"
    args[args.index("norm")] = "activation"
    args[-1] = str(acts)
    assert run(*args, *_texts()).exit_code == 0
    result = run("compare", str(norms), str(acts))
    assert result.exit_code == 2
    assert "the runs share no site and point: A (" in result.stderr and "transformer.h.0.mlp.act" in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["only-one"], "two or more runs"),
        (["missing-a", "missing-b"], "missing-a: no such file or folder"),
    ],
)
def test_compare_bad_inputs_are_usage_errors(args, message):
    result = run("compare", *args)
    assert result.exit_code == 2 and message in result.stderr


def test_compare_of_a_folder_without_records_says_so(tmp_path, two_runs):
    result = run("compare", str(tmp_path), str(two_runs[0]))
    assert result.exit_code == 2 and "no records.json or records.csv" in result.stderr


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory, minilm_path):
    """A 2-layer, 32-wide BERT with random weights and the MiniLM's tokenizer, saved."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    path = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    BertModel(
        BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    ).save_pretrained(path)
    AutoTokenizer.from_pretrained(minilm_path).save_pretrained(path)
    return path


def test_inspect_baseline_random_is_the_same_architecture_at_random_init(tiny_bert_dir, tmp_path):
    from transformers import AutoConfig, AutoModel

    out = tmp_path / "run"
    args = ["inspect", "--model", str(tiny_bert_dir), "--baseline", "random", "--seed", "3", "--out", str(out)]
    result = run(*args, *_texts())
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[1].startswith("A: ") and "(random init, seed 3)" in result.stdout
    assert sorted(p.name for p in (out / "baseline-random").iterdir()) == sorted(
        ["plot.png", "records.csv", "records.json", "table.txt", "texts.jsonl"]
    )
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG" and (out / "compare.txt").exists()
    # independently: the same class and config, seeded by 3, probed on the same texts
    torch.manual_seed(3)
    fresh = AutoModel.from_config(AutoConfig.from_pretrained(tiny_bert_dir)).eval()
    loaded = load_model(str(tiny_bert_dir))
    loaded.model = fresh
    expected = {(r["site"], r["point"]): r["gap_mean"] for r in summarize(jobs.probe_texts(loaded, TEXTS).records)}
    assert _gaps(out / "baseline-random") == pytest.approx(expected, rel=1e-9)
    assert _gaps(out) != pytest.approx(expected, rel=1e-3)  # the trained run is not the baseline
    comparison = compare_runs([load_run(out), load_run(out / "baseline-random")])
    assert all(not math.isnan(comparison.difference(1, k) or 0.0) for k in comparison.keys)
    figure = tmp_path / "both.png"
    printed = json.loads(run(*args[:-2], "--format", "json", "--plot", str(figure), *_texts()).stdout)
    assert figure.read_bytes()[:4] == b"\x89PNG"
    assert set(printed) >= {"records", "baseline", "comparison"} and "random init" in printed["baseline"]["model"]
    assert len(printed["comparison"]["rows"]) == len(comparison.keys)


def test_pretrained_minilm_against_its_random_baseline(minilm_path, tmp_path):
    out, plot = tmp_path / "minilm", tmp_path / "cmp.png"
    result = run("inspect", "--model", str(minilm_path), "--baseline", "random", "--out", str(out), *_texts())
    assert result.exit_code == 0, result.output
    result = run("compare", str(out), str(out / "baseline-random"), "--plot", str(plot))
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "BertModel" in lines[0] and "random init" in lines[1]
    assert any(line.startswith("encoder.layer.5.output.LayerNorm") for line in lines)
    assert plot.stat().st_size > 10_000


def _record(point, gap, view="token", item=0, window=None, n=4):
    """One synthetic record of site ``m`` (closed-form isometry ``exp(−gap)``)."""
    iso = 0.0 if math.isinf(gap) else math.exp(-gap)
    return Record("m", "activation", point, view, item, 0, n, 16, iso, gap, None, window=window)


def test_compare_differences_only_points_measured_in_one_view():
    """A point a run measures in another view (sample vs token Grams) is listed, not differenced;
    when no point is left the comparison is refused."""
    a = ProbeRun("A", [_record("pre", 1.0), _record("post", 2.0)])
    b = ProbeRun("B", [_record("pre", 1.5), _record("post", 0.5, view="sample")])
    comparison = compare_runs([a, b])
    assert comparison.keys == [("m", 0, "pre")] and comparison.difference(1, ("m", 0, "pre")) == pytest.approx(0.5)
    assert comparison.mixed_views == {("m", 0, "post"): ["token", "sample"]}
    text = format_comparison(comparison)
    assert "measured in different views, not differenced (1): m:post (A token, B sample)" in text
    assert "-1.5" not in text  # the post gaps (2.0 token vs 0.5 sample) are not differenced
    obj = json.loads(comparison_json(comparison))
    assert [r["point"] for r in obj["rows"]] == ["pre"] and obj["mixed_views"][0]["views"] == ["token", "sample"]
    only_mixed = ProbeRun("C", [_record("pre", 1.0, view="sample")])
    with pytest.raises(
        ValueError,
        match=r"every shared point in different views, nothing to compare \(1\): m:pre \(A token, B sample\)",
    ):
        compare_runs([ProbeRun("A", [_record("pre", 1.0)]), only_mixed])


def test_compare_refuses_runs_over_different_token_windows():
    whole = ProbeRun("whole", [_record("pre", 1.0, n=9)])
    win3 = ProbeRun("w3", [_record("pre", 0.5, window=w, n=3) for w in range(3)])
    win4 = ProbeRun("w4", [_record("pre", 0.5, window=w, n=n) for w, n in ((0, 4), (1, 4), (2, 1))])
    with pytest.raises(ValueError, match=r"A \(whole\): whole sequences; B \(w3\): windows of up to 3 tokens"):
        compare_runs([whole, win3])
    with pytest.raises(ValueError, match="windows of up to 4 tokens"):
        compare_runs([win3, win4])
    same = compare_runs([win3, ProbeRun("w3'", [_record("pre", 0.75, window=w, n=3) for w in range(3)])])
    assert same.difference(1, ("m", 0, "pre")) == pytest.approx(0.25)


def test_compare_shows_singular_grams_as_inf_and_counts_them():
    """Every Gram singular: ``inf (k singular)`` and inf − finite = +inf, inf − inf undefined;
    some singular: the finite mean with ``(+k singular)``."""
    inf = math.inf
    a = ProbeRun("A", [_record("pre", 1.0), _record("post", inf), _record("out", 1.0), _record("out", 3.0, item=1)])
    b = ProbeRun("B", [_record("pre", inf), _record("pre", inf, item=1), _record("post", inf), _record("out", inf)])
    b.records.append(_record("out", 2.0, item=1))
    comparison = compare_runs([a, b])
    pre, post, out = (("m", 0, p) for p in ("pre", "post", "out"))
    assert comparison.gaps[1][pre] == inf and comparison.difference(1, pre) == inf
    assert comparison.difference(1, post) is None
    assert comparison.gaps[1][out] == 2.0 and comparison.difference(1, out) == pytest.approx(0.0)
    rows = {line.split()[1]: line for line in format_comparison(comparison).splitlines()[3:]}
    assert "inf (2 singular)" in rows["pre"] and rows["pre"].rstrip().endswith("+inf")
    assert rows["post"].count("inf (1 singular)") == 2 and rows["post"].rstrip().endswith("-")
    assert "2 (+1 singular)" in rows["out"]
    obj = json.loads(comparison_json(comparison))
    assert obj["rows"][0]["gaps"] == [1.0, "inf"] and obj["rows"][0]["singular"] == [0, 2]
