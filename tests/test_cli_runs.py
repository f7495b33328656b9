"""Runs as processes: one run per ``--out`` folder, Ctrl-C and resuming, through the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from isoprobe.cli import main
from isoprobe.outlock import LOCK_NAME, hold_folder

TEXT = "Layer normalization makes tokens more isometric."


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def run(*args):
    return CliRunner().invoke(main, list(args))


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _same_but_timing(a: dict[str, bytes], b: dict[str, bytes]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        if name.endswith(".json"):
            ja, jb = json.loads(a[name]), json.loads(b[name])
            ja.pop("elapsed_s"), jb.pop("elapsed_s")
            assert ja == jb, name
        else:
            assert a[name] == b[name], name


def test_two_concurrent_runs_into_one_folder_one_refuses_the_other_is_a_lone_runs(tmp_path):
    shared, lone = tmp_path / "same", tmp_path / "lone"
    first = subprocess.Popen(
        [sys.executable, "-m", "isoprobe", "repro", "fig3", "--quick", "--out", str(shared)],
        cwd=Path(__file__).parents[1],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (shared / LOCK_NAME).exists():  # the first run holds the folder while it works
        assert first.poll() is None and time.monotonic() < deadline, "the first run never took its folder"
        time.sleep(0.01)
    for seed in ("1", "0"):  # another seed, and the same seed twice
        second = run("repro", "fig3", "--quick", "--seed", seed, "--out", str(shared))
        assert second.exit_code == 2, second.output
        assert f"pid {first.pid}" in second.stderr and "isoprobe repro fig3 --quick --out" in second.stderr
    assert first.wait(timeout=300) == 0, first.stderr.read()
    assert run("repro", "fig3", "--quick", "--out", str(lone)).exit_code == 0
    _same_but_timing(_files(shared), _files(lone))
    assert not (shared / LOCK_NAME).exists()


def test_gpt2_and_inspect_refuse_a_held_out_folder_before_loading(tmp_path, tiny_gpt2_dir):
    with hold_folder(tmp_path, "isoprobe inspect --out there", lambda _m: None):
        for command in ("gpt2", "inspect"):
            result = run(command, "--model", str(tiny_gpt2_dir), "--text", TEXT, "--out", str(tmp_path))
            assert result.exit_code == 2, result.output
            assert f"pid {os.getpid()}" in result.stderr and "isoprobe inspect --out there" in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == []
    result = run("gpt2", "--model", str(tiny_gpt2_dir), "--text", TEXT, "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_stale_lock_is_taken_over_with_a_message(tmp_path, tiny_gpt2_dir):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": gone.pid, "command": "isoprobe gpt2 (killed)"}))
    result = run("gpt2", "--model", str(tiny_gpt2_dir), "--text", TEXT, "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert f"taking over the stale lock of {tmp_path} (its process is gone: pid {gone.pid}" in result.stderr
    assert not (tmp_path / LOCK_NAME).exists()


def test_the_lock_is_released_on_errors_and_ctrl_c(tmp_path):
    for error in (RuntimeError, KeyboardInterrupt):
        with pytest.raises(error), hold_folder(tmp_path, "cmd", lambda _m: None):
            assert (tmp_path / LOCK_NAME).exists()
            raise error
        assert not (tmp_path / LOCK_NAME).exists()


def test_ctrl_c_in_repro_says_the_same_command_resumes(tmp_path, monkeypatch):
    from isoprobe.experiments import base

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(base, "_compute", interrupted)
    args = ["repro", "fig3", "--quick", "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", ["/somewhere/isoprobe", *args])
    result = run(*args)
    assert result.exit_code == 130
    assert "Aborted" not in result.output
    assert f"what finished is kept in {tmp_path} (finished reproductions, the rows of finished units" in result.stderr
    assert "run the same command again to resume" in result.stderr
    assert f"\n  isoprobe repro fig3 --quick --out {tmp_path}\n" in result.stderr
    assert not (tmp_path / LOCK_NAME).exists()


def test_repro_names_are_case_insensitive_on_the_command_line(tmp_path):
    result = run("repro", "FIG3", "--quick", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "fig3.json").exists()


def test_fig7_epoch_axis_has_whole_epochs_only():
    from isoprobe.experiments.training import figure_fig7

    cfg = {"acts": ["relu", "tanh"], "epochs": 3, "depth": 2, "width": 8, "lr": 0.01, "batch": 4}
    rows = [
        {"act": a, "beta": 1.0, "run": r, "epoch": e, "loss": 1.0 / (e + 1 + r + k)}
        for k, a in enumerate(cfg["acts"])
        for r in range(2)
        for e in range(4)
    ]
    fig = figure_fig7(rows, cfg)
    fig.canvas.draw()
    ticks = [t for t in fig.axes[0].get_xticks() if fig.axes[0].get_xlim()[0] <= t <= fig.axes[0].get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_a_lock_made_since_the_stale_one_was_read_is_not_taken_over(tmp_path):
    from isoprobe.outlock import _take_over

    lock = tmp_path / LOCK_NAME
    lock.write_text(json.dumps({"pid": os.getpid(), "command": "a live run"}))
    assert not _take_over(lock, {"pid": 999999999, "command": "the stale one read before"})
    assert json.loads(lock.read_text())["command"] == "a live run"  # put back untouched
    assert _take_over(lock, {"pid": os.getpid(), "command": "a live run"}) and not lock.exists()


def test_an_unreadable_lock_is_busy_while_fresh_and_stale_once_old(tmp_path):
    from isoprobe.outlock import FolderBusy

    lock = tmp_path / LOCK_NAME
    lock.write_text("")  # a run that has just created its lock and not yet written it
    with pytest.raises(FolderBusy, match="in use by another isoprobe run"), hold_folder(tmp_path, "b", print):
        pass
    os.utime(lock, (time.time() - 60, time.time() - 60))
    notes = []
    with hold_folder(tmp_path, "b", notes.append):
        assert json.loads(lock.read_text())["command"] == "b"
    assert notes and "stale lock" in notes[0] and not lock.exists()
