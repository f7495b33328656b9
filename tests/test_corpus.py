"""A corpus shared among processes (isoprobe.corpus): summaries merged exactly (Chan et al.),
two gloo ranks under torchrun against one process, resuming from the finished batches."""

from __future__ import annotations

import json
import math
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import save_tiny_bert

from isoprobe import corpus, jobs
from isoprobe.records import UNDEFINED, Record, RunningSummary, read_json, summarize

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
    "norms",
    "keep",
    "tokens",
    "apart",
    "in",
    "deep",
    "nets",
]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A 2-layer, 64-wide random BERT with the MiniLM package's WordPiece tokenizer."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), hidden=64, positions=48)


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    """23 texts of 1 to 30 words, one JSON object per line (an empty one among them)."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    rows = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30))) for _ in range(23)]
    rows[5] = "  "
    path.write_text("".join(json.dumps({"text": t, "n": i}) + "\n" for i, t in enumerate(rows)))
    return path


def _job(model, data, **kw) -> jobs.TextJob:
    options = dict(model=str(model), family="auto", dataset=str(data), limit=20, batch_size=3, quiet=True)
    return jobs.TextJob(**{**options, **kw})


def _close(a: float | None, b: float | None) -> bool:
    if a is None or b is None or math.isinf(a) or math.isinf(b):
        return a == b
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def _same_records(a: list[Record], b: list[Record]) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        for name, u in x.to_dict().items():
            v = getattr(y, name)
            assert _close(u, v) if isinstance(u, float) else u == v, (x.key, x.step, x.item, name, u, v)


def _same_rows(a, b) -> None:
    assert [r["key"] for r in a] == [r["key"] for r in b]
    for x, y in zip(a, b):
        for name, u in x.items():
            v = y[name]
            v = math.inf if v == "inf" else v
            assert _close(u, v) if isinstance(u, float) else u == v, (x["key"], name, u, v)


# ----------------------------------------------------------------------------- Chan's merge


def _record(i: int, gap: float | None, n: int = 4, point: str = "pre") -> Record:
    iso = None if gap is None else math.exp(-gap)
    flag = UNDEFINED if gap is None else None
    return Record("h.0", "norm", point, "token", i, i, n, 8, iso, gap, None, flag=flag)


def test_merged_summaries_equal_one_summary_of_all_records_and_float64_moments():
    rng = np.random.default_rng(0)
    gaps = list(rng.lognormal(0.0, 1.5, size=200)) + [math.inf] * 3 + [None] * 4
    records = [_record(i, g, n=int(rng.integers(2, 9))) for i, g in enumerate(gaps)]
    records += [_record(i, 0.5 * i, point="post") for i in range(5)]  # a group only the last part has
    rng.shuffle(records)
    cuts = [0, 1, 1, 60, 150, len(records)]  # an empty part and a one-record part among them
    merged = RunningSummary()
    for lo, hi in zip(cuts, cuts[1:]):
        part = RunningSummary()
        part.add(records[lo:hi])
        merged.merge(part)
    _same_rows(list(merged.summary()), list(summarize(records)))
    finite = np.array([g for g in gaps if g is not None and math.isfinite(g)], dtype=np.float64)
    iso = np.array([math.exp(-g) for g in gaps if g is not None], dtype=np.float64)
    row = next(r for r in merged.summary() if r["point"] == "pre")
    assert row["count"] == 207 and row["undefined"] == 4 and row["singular"] == 3
    assert math.isclose(row["isometry_mean"], iso.mean(), rel_tol=1e-12)
    assert math.isclose(row["isometry_std"], iso.std(), rel_tol=1e-10)
    assert finite.size == 200 and row["n_min"] >= 2 and row["n_max"] <= 8
    post = next(r for r in merged.summary() if r["point"] == "post")
    assert post["count"] == 5 and math.isclose(post["gap_std"], np.std([0.5 * i for i in range(5)]), rel_tol=1e-12)


def test_merging_leaves_the_other_summary_unchanged():
    a, b = RunningSummary(), RunningSummary()
    a.add([_record(0, 1.0)])
    b.add([_record(1, 3.0), _record(2, 5.0, point="post")])
    before = list(b.summary())
    a.merge(b)
    a.add([_record(3, 7.0, point="post")])
    assert list(b.summary()) == before


# ----------------------------------------------------------------------------- streaming


def test_streamed_texts_are_the_first_rows_and_no_arrow_copy_is_made(corpus_file, tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    texts = corpus.stream_texts(str(corpus_file), limit=7)
    lines = [json.loads(line)["text"] for line in corpus_file.read_text().splitlines()[:7]]
    assert texts == [t for t in lines if t.strip()] and len(texts) == 6
    assert not list((tmp_path / "cache").rglob("*.arrow"))  # the file was never converted whole
    with pytest.raises(ValueError, match="no column 'sentence'; columns: text, n"):
        corpus.stream_texts(str(corpus_file), column="sentence")


# ----------------------------------------------------------------------------- two processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1"]
    command += [f"--master_port={_free_port()}", "-m", "isoprobe", "inspect", *args]
    path = os.pathsep.join(p for p in (str(cwd), os.environ.get("PYTHONPATH")) if p)  # keep conftest's entry
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": path}
    return subprocess.run(command, capture_output=True, text=True, timeout=240, env=env, cwd=cwd)


def test_two_gloo_ranks_give_the_single_process_records_and_summaries_then_resume(tiny_bert, corpus_file, tmp_path):
    root = Path(__file__).resolve().parents[1]
    single = jobs.run(_job(tiny_bert, corpus_file), notify=lambda m: None)
    out = tmp_path / "run"
    args = ["--model", str(tiny_bert), "--dataset", str(corpus_file), "--limit", "20", "--batch-size", "3"]
    done = _torchrun([*args, "--out", str(out)], cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("model: ") == 1  # printed once, by rank 0
    assert done.stdout.strip() == jobs.render(single).strip()
    records, meta = read_json(out / "records.json")
    _same_records(records, single.records)
    assert meta["tokens"] == single.tokens
    _same_rows(json.loads((out / "summary.json").read_text())["rows"], list(summarize(single.records)))
    assert {r.step for r in records} == set(range(7))  # 19 texts in 7 batches of 3, over 2 ranks
    # resume in one process from the two ranks' finished batches: one lost, one altered on disk
    parts = out / "parts"
    (parts / "batch-0000004.json").unlink()
    altered = json.loads((parts / "batch-0000001.json").read_text())
    altered["records"][0]["isometry_gap"] = 123.0
    (parts / "batch-0000001.json").write_text(json.dumps(altered))
    said: list[str] = []
    again = corpus.run_corpus(_job(tiny_bert, corpus_file, out=str(out)), said.append)
    assert any("resumed: 6 of 7 batches" in m for m in said)
    first_of_batch1 = next(r for r in again.report.records if r.step == 1)
    assert first_of_batch1.isometry_gap == 123.0  # read back, not probed again
    assert (parts / "batch-0000004.json").is_file()  # probed again
    redone = [r for r in again.report.records if r.step == 4]
    _same_records(redone, [r for r in single.records if r.step == 4])


def test_another_runs_parts_and_changed_texts_are_refused(tiny_bert, corpus_file, tmp_path):
    out = tmp_path / "run"
    corpus.run_corpus(_job(tiny_bert, corpus_file, out=str(out), limit=4), lambda m: None)
    with pytest.raises(ValueError, match="holds the finished batches of another run"):
        corpus.run_corpus(_job(tiny_bert, corpus_file, out=str(out), limit=4, batch_size=2), lambda m: None)
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"text": f"text number {i} is new"}) + "\n" for i in range(4)))
    with pytest.raises(ValueError, match="made from other texts than batch 0"):
        corpus.run_corpus(_job(tiny_bert, other, out=str(out), limit=4), lambda m: None)


def test_train_mode_is_refused_before_any_work(tmp_path):
    job = jobs.TextJob(model=str(tmp_path / "absent"), family="auto", texts=("a b",), train_mode=True)
    with pytest.raises(ValueError, match="--train-mode cannot be shared among processes"):
        corpus.run_corpus(job)


def test_a_run_interrupted_mid_forward_resumes_with_what_it_finished(tiny_bert, corpus_file, tmp_path, monkeypatch):
    from isoprobe import models

    out, calls = tmp_path / "run", [0]
    load = models.load_model

    def interrupted_at_batch_3(*args, **kwargs):
        loaded = load(*args, **kwargs)

        def stop(module, args, kwargs):
            if tuple(kwargs["input_ids"].shape) == (1, 2):  # the two-token run that names singular sites
                return
            calls[0] += 1
            if calls[0] == 4:  # Ctrl-C inside the fourth forward over the texts
                raise KeyboardInterrupt

        loaded.model.register_forward_pre_hook(stop, with_kwargs=True)
        return loaded

    monkeypatch.setattr(corpus, "load_model", interrupted_at_batch_3)
    with pytest.raises(KeyboardInterrupt):
        corpus.run_corpus(_job(tiny_bert, corpus_file, out=str(out)), lambda m: None)
    assert sorted(p.name for p in (out / "parts").glob("batch-*")) == [f"batch-000000{k}.json" for k in range(3)]
    monkeypatch.undo()
    said: list[str] = []
    again = corpus.run_corpus(_job(tiny_bert, corpus_file, out=str(out)), said.append)
    assert any("resumed: 3 of 7 batches" in m for m in said)
    single = jobs.run(_job(tiny_bert, corpus_file), notify=lambda m: None)
    _same_records(again.report.records, single.records)


def test_rank_0_shows_progress(tiny_bert, corpus_file, monkeypatch, capsys):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    corpus.run_corpus(_job(tiny_bert, corpus_file, limit=4, quiet=False), lambda m: None)
    assert "probing (rank 0 of 1)" in capsys.readouterr().err
