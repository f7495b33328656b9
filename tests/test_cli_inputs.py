"""What ``gpt2`` and ``inspect`` accept, and what their ``--out`` keeps of the inputs."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from isoprobe import jobs
from isoprobe.cli import main

TEXTS = ("Layer normalization makes tokens more isometric.", "A second, shorter text.", "Third one, mid size.")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def run(*args):
    return CliRunner().invoke(main, list(args))


@pytest.fixture(scope="module")
def bert_config_dir(tmp_path_factory):
    """A BERT folder holding only a config (no weights): refused from the config alone."""
    from transformers import BertConfig

    path = tmp_path_factory.mktemp("bert-config")
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(path)
    return path


@pytest.mark.parametrize("init", ["pretrained", "random"])
def test_gpt2_refuses_a_bert_folder_from_its_config_naming_inspect(bert_config_dir, init):
    result = run("gpt2", "--model", str(bert_config_dir), "--init", init, "--text", TEXTS[0])
    assert result.exit_code == 2, result.output
    assert "not a GPT-2-family checkpoint (model_type 'bert', BertConfig)" in result.stderr
    assert f"use `isoprobe inspect --model {bert_config_dir}`" in result.stderr


def test_gpt2_refuses_the_pretrained_minilm(minilm_path):
    result = run("gpt2", "--model", str(minilm_path), "--text", TEXTS[0])
    assert result.exit_code == 2, result.output
    assert "model_type 'bert'" in result.stderr and "isoprobe inspect" in result.stderr
    assert "(pretrained)" not in result.stdout


def test_a_folder_without_config_json_is_named_as_such(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0")
    for command in ("gpt2", "inspect"):
        result = run(command, "--model", str(tmp_path), "--text", TEXTS[0])
        assert result.exit_code == 2, result.output
        assert "the folder has no config.json" in result.stderr and "model_type" not in result.stderr


def test_a_missing_dataset_file_is_no_such_file(tmp_path):
    result = run("inspect", "--model", "any", "--dataset", str(tmp_path / "missing.csv"))
    assert result.exit_code == 2, result.output
    assert "missing.csv': no such file or folder" in result.stderr and "Hub" not in result.stderr


def test_a_non_text_column_is_refused_naming_column_and_type(tmp_path):
    data = tmp_path / "d.csv"
    data.write_text("sentence,label\nhello world,1\nbye now,0\n")
    result = run("inspect", "--model", "any", "--dataset", str(data), "--column", "label")
    assert result.exit_code == 2, result.output
    assert "column 'label' holds int64 values, not text; text columns: sentence" in result.stderr


def test_out_keeps_the_texts_and_each_record_points_to_its_own(tmp_path, tiny_gpt2_dir, monkeypatch):
    titles = []
    monkeypatch.setattr(jobs, "plot_records", lambda records, path, title: titles.append(title))
    long = "x" * 100  # more than the 64-token context: three windows with --stride 24 (0, 24, 36)
    args = ["gpt2", "--model", str(tiny_gpt2_dir), "--batch-size", "2", "--stride", "24", "--out", str(tmp_path)]
    result = run(*args, *(a for t in (*TEXTS, long) for a in ("--text", t)))
    assert result.exit_code == 0, result.output
    texts = [json.loads(line) for line in (tmp_path / "texts.jsonl").read_text().splitlines()]
    assert texts == [{"index": i, "text": t} for i, t in enumerate((*TEXTS, long))]
    obj = json.loads((tmp_path / "records.json").read_text())
    assert obj["tokenizer"]["fallback"] is True and "byte-level" in obj["tokenizer"]["name"]
    assert [(s["text"], s["start"]) for s in obj["sequences"]] == [(0, 0), (1, 0), (2, 0), (3, 0), (3, 24), (3, 36)]
    for record in obj["records"]:  # byte tokens: a record's item count is its text's length, or the window's
        text = texts[record["text"]]["text"]
        assert record["n"] == min(len(text.encode()), 64)
        assert obj["sequences"][record["sequence"]]["text"] == record["text"]
    csv_lines = (tmp_path / "records.csv").read_text().splitlines()
    assert csv_lines[0].endswith(",text") and {line.rsplit(",", 1)[1] for line in csv_lines[1:]} == {"0", "1", "2", "3"}
    assert "tokenizer: byte-level fallback" in result.stdout.splitlines()[0]
    assert all("tokenizer: byte-level fallback" in t for t in titles) and len(titles) == 1


def test_counts_in_the_header_are_singular_for_one(tiny_gpt2_dir):
    result = run("gpt2", "--model", str(tiny_gpt2_dir), "--text", "a")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0].endswith("; 1 sequence, 1 token")


@pytest.mark.parametrize(
    "gaps, cell",
    [
        ((0.122, 0.278), "0.200 ± 0.078"),  # was "0.2 ± 0.078": mean and std to one decimal place
        ((0.4064, 0.4106), "0.4085 ± 0.0021"),
        ((10.0, 30.0), "20 ± 10"),
        ((1.0, 1.0), "1 ± 0"),
    ],
)
def test_a_gap_cell_gives_mean_and_std_to_one_precision(gaps, cell):
    from isoprobe.records import Record, format_table

    records = [Record("m.ln", "norm", "pre", "token", i, 0, 4, 8, math.exp(-g), g, 0.0) for i, g in enumerate(gaps)]
    row = format_table(records).splitlines()[2]
    assert f"  {cell}  " in row, row
