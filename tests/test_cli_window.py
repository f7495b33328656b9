"""Long texts on the pretrained MiniLM (384 wide): the warning before any work, then --window
(issue 21, item 2)."""

from __future__ import annotations

import math

import pytest
from click.testing import CliRunner

from isoprobe import jobs
from isoprobe.cli import main
from isoprobe.models import load_model

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "wizards",
    "judge",
    "boxing",
    "matches",
]
LONG = " ".join(WORDS[i % len(WORDS)] for i in range(440))  # about 450 tokens: > 384, inside the context


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_the_warning_comes_before_the_texts_run_and_names_sites_tokens_and_window(minilm_path, monkeypatch):
    events: list[str] = []

    class Recorded(jobs.Probe):
        def __enter__(self):
            events.append("texts run")
            return super().__enter__()

    monkeypatch.setattr(jobs, "Probe", Recorded)
    loaded = load_model(str(minilm_path))
    report = jobs.probe_texts(loaded, [LONG], sites="norm", notify=events.append, progress=False)
    assert events[-1] == "texts run" and len(events) == 2, events
    tokens = report.tokens[0]
    assert tokens > 384
    assert f"Grams of {tokens} tokens are singular by construction at 13 sites" in events[0]
    assert "embeddings.LayerNorm (383), encoder.layer.0.attention.output.LayerNorm (383)" in events[0]
    assert "--window 383" in events[0]
    table = jobs.render(report)
    assert "yes" not in table and "n/a: singular" in table and "13 not checked" in table


def test_window_256_gives_finite_norm_rows_with_theorem1_counted(minilm_path):
    args = ["inspect", "--model", str(minilm_path), "--text", LONG, "--sites", "norm"]
    long = CliRunner().invoke(main, args)
    assert long.exit_code == 0, long.output
    assert "singular by construction" in long.stderr and "singular by construction ×1" in long.stdout
    windowed = CliRunner().invoke(main, [*args, "--window", "256", "--format", "json"])
    assert windowed.exit_code == 0, windowed.output
    assert "singular by construction" not in windowed.stderr
    import json

    out = json.loads(windowed.stdout)
    norms = [r for r in out["records"] if r["kind"] == "norm"]
    assert {r["window"] for r in norms} == {0, 1} and max(r["n"] for r in norms) <= 256
    assert all(math.isfinite(r["isometry_gap"]) for r in norms)
    assert out["theorem1"]["checked"] == 13 * 2 and out["theorem1"]["violations"] == 0
    table = CliRunner().invoke(main, [*args, "--window", "256"]).stdout
    assert "26/26 checks held" in table and "yes 2/2" in table


def test_window_option_refuses_fewer_than_two_tokens():
    result = CliRunner().invoke(main, ["gpt2", "--init", "random", "--text", "x", "--window", "1"])
    assert result.exit_code == 2 and "--window" in result.output
