"""``isoprobe gpt2`` and ``isoprobe inspect`` through click's CliRunner, offline."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from isoprobe.cli import main
from isoprobe.records import read_json

TEXT = "Layer normalization makes tokens more isometric."
TEXT2 = "A second, shorter text."


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def run(*args):
    return CliRunner().invoke(main, list(args))


def test_gpt2_table_from_a_saved_model(tiny_gpt2_dir):
    result = run("gpt2", "--model", str(tiny_gpt2_dir), "--text", TEXT, "--text", TEXT2)
    assert result.exit_code == 0, result.output
    assert "byte-level fallback" in result.stderr  # no tokenizer files next to the weights
    lines = result.stdout.splitlines()
    sites = list(dict.fromkeys(line.split()[0] for line in lines[3:-1]))
    assert sites == [
        "transformer.h.0.ln_1",
        "transformer.h.0.ln_2",
        "transformer.h.0.mlp.act",
        "transformer.h.1.ln_1",
        "transformer.h.1.ln_2",
        "transformer.h.1.mlp.act",
        "transformer.ln_f",
    ]
    assert [line.split()[1] for line in lines[3:7]] == ["pre", "centered", "normalized", "post"]
    n = sorted((len(TEXT.encode()), len(TEXT2.encode())))
    assert all(line.split()[3] == f"{n[0]}–{n[1]}" for line in lines[3:-1])  # tokens per text: a range
    assert lines[0].endswith(f"2 sequences, {len(TEXT.encode()) + len(TEXT2.encode())} tokens")
    assert lines[-1].endswith("10/10 checks held")


def test_gpt2_json_matches_the_tokens(tiny_gpt2_dir):
    result = run("gpt2", "--model", str(tiny_gpt2_dir), "--text", TEXT, "--text", TEXT2, "--format", "json")
    assert result.exit_code == 0, result.output
    obj = json.loads(result.stdout)
    assert set(obj) == {"model", "tokenizer", "tokens", "sequences", "records", "theorem1"}
    assert obj["tokens"] == [len(TEXT.encode()), len(TEXT2.encode())]
    assert obj["theorem1"] == {"checked": 10, "violations": 0, "eps_dominated": 0}
    records = obj["records"]
    assert len(records) == (5 * 4 + 2 * 2) * 2
    assert {(r["item"], r["n"]) for r in records} == {(0, obj["tokens"][0]), (1, obj["tokens"][1])}


def test_gpt2_csv_and_out_folder_and_plot(tiny_gpt2_dir, tmp_path):
    out, plot = tmp_path / "out", tmp_path / "fig.png"
    result = run(
        "gpt2",
        "--model",
        str(tiny_gpt2_dir),
        "--text",
        TEXT,
        "--format",
        "csv",
        "--out",
        str(out),
        "--plot",
        str(plot),
        "--sites",
        "norm",
    )
    assert result.exit_code == 0, result.output
    header, *rows = result.stdout.splitlines()
    assert header.startswith("site,kind,point,view,item") and len(rows) == 5 * 4
    assert sorted(p.name for p in out.iterdir()) == [
        "plot.png",
        "records.csv",
        "records.json",
        "table.txt",
        "texts.jsonl",
    ]
    records, extra = read_json(out / "records.json")
    assert len(records) == 20 and extra["theorem1"] == {"checked": 5, "violations": 0, "eps_dominated": 0}
    assert (out / "records.csv").read_text().strip() == result.stdout.strip()
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_gpt2_random_init_from_a_config_path_and_train_mode(tiny_gpt2_dir):
    result = run(
        "gpt2",
        "--model",
        str(tiny_gpt2_dir),
        "--init",
        "random",
        "--seed",
        "3",
        "--train-mode",
        "--text",
        TEXT,
        "--format",
        "json",
    )
    assert result.exit_code == 0, result.output
    obj = json.loads(result.stdout)
    assert obj["model"].endswith("(random init, seed 3)") and obj["theorem1"]["violations"] == 0


def test_gpt2_random_small_the_readme_job():
    result = run(
        "gpt2", "--init", "random", "--text", "The quick brown fox jumps over the lazy dog.", "--format", "json"
    )
    assert result.exit_code == 0, result.output
    obj = json.loads(result.stdout)
    sites = {r["site"] for r in obj["records"]}
    assert len(sites) == 37 and obj["theorem1"] == {"checked": 25, "violations": 0, "eps_dominated": 0}


def test_pretrained_offline_says_what_to_do():
    result = run("gpt2", "--text", TEXT)
    assert result.exit_code == 2
    assert "--init random" in result.output and "--model PATH" in result.output
    assert "Traceback" not in result.output


def test_unknown_model_and_bad_input_are_usage_errors(tiny_gpt2_dir, tmp_path):
    model = ("--model", str(tiny_gpt2_dir))
    cases = [
        (("gpt2", "--model", "no-such-org/no-such-model", "--text", TEXT), "cannot load"),
        (("gpt2", "--model", str(tmp_path), "--text", TEXT), "cannot load"),
        (("gpt2", *model, "--text", ""), "text 1 is empty"),
        (("gpt2", *model), "no text given"),
        (("gpt2", *model, "--text", TEXT, "--stride", "0"), "--stride must be between"),
        (("gpt2", *model, "--text", TEXT, "--sites", "transformer.h.*.ln1"), "matches none"),
        (("gpt2", *model, "--text", TEXT, "--device", "cuda:7"), "device"),
        (("inspect", "--model", str(tiny_gpt2_dir), "--text", TEXT), "no usable tokenizer files"),
        (
            ("inspect", "--model", str(tiny_gpt2_dir), "--dataset", "no-such-dataset-xyz", "--text", TEXT),
            "cannot load dataset",
        ),
    ]
    for args, message in cases:
        if message == "device" and torch.cuda.device_count() > 7:
            continue
        result = run(*args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output and "Traceback" not in result.output, (args, result.output)


def test_one_token_text_is_reported_undefined(tiny_gpt2_dir):
    result = run("gpt2", "--model", str(tiny_gpt2_dir), "--text", "x")
    assert result.exit_code == 0, result.output
    assert "single token" in result.stderr
    rows = result.stdout.splitlines()[3:-1]
    assert rows and all("undefined" in row for row in rows)
    assert result.stdout.splitlines()[-1].endswith("nothing to check (no sequence of at least 2 tokens)")


def test_long_text_truncated_or_windowed(tiny_gpt2_dir):
    long_text = "abcdefghij" * 10  # 100 byte tokens, context 64
    result = run("gpt2", "--model", str(tiny_gpt2_dir), "--text", long_text, "--format", "json")
    assert result.exit_code == 0, result.output
    assert "truncated to 64" in result.stderr and json.loads(result.stdout)["tokens"] == [64]
    result = run(
        "gpt2",
        "--model",
        str(tiny_gpt2_dir),
        "--text",
        long_text,
        "--stride",
        "16",
        "--batch-size",
        "3",
        "--format",
        "json",
    )
    assert result.exit_code == 0, result.output
    obj = json.loads(result.stdout)
    assert "probing" not in result.stderr and "batch 1/2" not in result.stderr  # no bar: not a terminal
    assert obj["tokens"] == [64] * 4  # windows start at 0, 16, 32 and 36 (the tail)
    assert {(r["step"], r["item"]) for r in obj["records"]} == {(0, 0), (0, 1), (0, 2), (1, 0)}


def test_nan_activations_are_flagged_and_the_run_continues(tiny_gpt2_dir, tmp_path):
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir)
    with torch.no_grad():
        model.transformer.h[1].ln_1.weight[0] = float("nan")
    model.save_pretrained(tmp_path)
    result = run("gpt2", "--model", str(tmp_path), "--text", TEXT, "--format", "json")
    assert result.exit_code == 0, result.output
    assert "non-finite" in result.stderr
    records = json.loads(result.stdout)["records"]
    flagged = {r["site"] for r in records if r["flag"] == "non-finite"}
    assert "transformer.h.0.ln_1" not in flagged and "transformer.ln_f" in flagged
    assert all(r["flag"] is None for r in records if r["site"].startswith("transformer.h.0"))


def test_inspect_pretrained_minilm_with_texts_and_a_dataset_file(minilm_path, tmp_path):
    result = run("inspect", "--model", str(minilm_path), "--text", TEXT, "--text", TEXT2, "--format", "json")
    assert result.exit_code == 0, result.output
    obj = json.loads(result.stdout)
    assert len({r["site"] for r in obj["records"]}) == 20
    assert obj["theorem1"] == {"checked": 13 * 2, "violations": 0, "eps_dominated": 0}
    data = tmp_path / "texts.csv"
    data.write_text("id,sentence\n1,Isometry is scale invariant.\n2,Norms help.\n3,Unused row.\n")
    result = run(
        "inspect",
        "--model",
        str(minilm_path),
        "--dataset",
        str(data),
        "--column",
        "sentence",
        "--limit",
        "2",
        "--sites",
        "encoder.layer.5.*",
    )
    assert result.exit_code == 0, result.output
    assert "2 sequences" in result.stdout.splitlines()[0]
    # header (3 lines), layer 5's three child modules (attention, intermediate, output) by point, footer
    assert len(result.stdout.splitlines()) == 3 + 3 * 2 + 1


def test_text_file_paragraphs_and_low_precision_options(tiny_gpt2_dir, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text(f"{TEXT2}\nmore.\n\n{TEXT}\n")
    result = run(
        "gpt2",
        "--model",
        str(tiny_gpt2_dir),
        "--text-file",
        str(texts),
        "--dtype",
        "bfloat16",
        "--gram-dtype",
        "float32",
        "--format",
        "json",
    )
    assert result.exit_code == 0, result.output
    obj = json.loads(result.stdout)
    assert obj["tokens"] == [len(f"{TEXT2}\nmore.".encode()), len(TEXT.encode())]
    assert obj["theorem1"]["checked"] == 10


def test_inspect_llama_style_model(minilm_path, tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaModel

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=tokenizer.vocab_size,
        max_position_embeddings=64,
    )
    LlamaModel(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    result = run("inspect", "--model", str(tmp_path), "--text", TEXT, "--text", TEXT2, "--format", "json")
    assert result.exit_code == 0, result.output
    obj = json.loads(result.stdout)
    norms = {r["site"] for r in obj["records"] if r["kind"] == "norm"}
    assert norms == {
        "layers.0.input_layernorm",
        "layers.0.post_attention_layernorm",
        "layers.1.input_layernorm",
        "layers.1.post_attention_layernorm",
        "norm",
    }
    assert obj["theorem1"] == {"checked": 5 * 2, "violations": 0, "eps_dominated": 0}
    pre = {(r["site"], r["item"]): r["isometry_gap"] for r in obj["records"] if r["point"] == "pre"}
    centered = {(r["site"], r["item"]): r["isometry_gap"] for r in obj["records"] if r["point"] == "centered"}
    assert all(centered[k] == pre[k] for k in centered)  # RMSNorm: no centering


def test_unwritable_outputs_and_missing_paths_give_clean_errors(tiny_gpt2_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for extra in (["--out", str(blocker / "sub")], ["--plot", str(blocker / "sub" / "p.png")]):
        result = CliRunner().invoke(
            main, ["gpt2", "--model", str(tiny_gpt2_dir), "--init", "random", "--text", "hello there world", *extra]
        )
        assert result.exit_code == 1 and "cannot write" in result.output, result.output
        assert "Traceback" not in result.output
    result = CliRunner().invoke(main, ["gpt2", "--model", str(tmp_path / "missing"), "--text", "hi there"])
    assert result.exit_code == 2 and "no such directory" in result.output
    result = CliRunner().invoke(main, ["repro", "table2", "--out", str(blocker / "sub")])
    assert result.exit_code == 1 and "cannot write" in result.output


@pytest.mark.parametrize("command", ["gpt2", "inspect"])
def test_gram_dtype_help_says_float32_is_cheaper_and_states_its_error(command):
    """bench/RESULTS.md measures float32 Grams cheaper on CPU (1.53× vs 1.83× of a plain forward)."""
    result = run(command, "--help")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "float32: cheaper" in text and "gap_error" in text and "not faster" not in text


def test_calls_flag_and_gpt2_has_no_functional_site_of_its_own(tiny_gpt2_dir, monkeypatch):
    """GPT-2 applies its functions inside its module sites (LayerNorm's F.layer_norm, the MLP
    activation's torch.tanh): the default table (functional sites on) equals --no-calls, and
    the flag reaches the Probe."""
    import isoprobe.jobs

    default = run("gpt2", "--model", str(tiny_gpt2_dir), "--text", TEXT, "--format", "csv")
    without = run("gpt2", "--model", str(tiny_gpt2_dir), "--text", TEXT, "--format", "csv", "--no-calls")
    assert default.exit_code == without.exit_code == 0, default.output + without.output
    assert default.stdout == without.stdout and ":" not in default.stdout.splitlines()[1].split(",")[0]
    made = []
    real = isoprobe.jobs.Probe
    monkeypatch.setattr(isoprobe.jobs, "Probe", lambda *a, **kw: made.append(kw) or real(*a, **kw))
    for flag in ("--calls", "--no-calls"):
        assert run("gpt2", "--model", str(tiny_gpt2_dir), "--text", TEXT, flag).exit_code == 0
    assert [kw["calls"] for kw in made] == [True, False]


def test_a_selection_that_matches_no_site_is_a_usage_error(tiny_gpt2_dir):
    """It printed an empty table, 'nothing to check (no sequence of at least 2 tokens)' and a
    warning that the model had no site at all, with exit status 0."""
    result = run("gpt2", "--model", str(tiny_gpt2_dir), "--text", TEXT, "--sites", "*:softmax")
    assert result.exit_code == 2, result.output
    assert "selected no site that ran" in result.output and "transformer.h.0.ln_1" in result.output
