"""The reproduction runner on toy declarations: verdicts, files, resume, provenance, options, ranks."""

from __future__ import annotations

import dataclasses
import json
from functools import partial

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from isoprobe import distributed
from isoprobe.data import DataUnavailable, load_images
from isoprobe.experiments import base
from isoprobe.experiments.base import (
    Options,
    Reproduction,
    ReproductionOptionError,
    Verdict,
    data_request,
    run_reproductions,
    summarize,
)
from isoprobe.experiments.common import new_figure

COLUMNS = ("unit", "run", "value", "rank")
CALLS: list[str] = []
SEEN: list[list[dict]] = []
FIGS: list = []


def _config(opt: Options, uses_data: bool = False, reads: tuple[str, ...] = ()) -> dict:
    cfg = {"units": 3, "runs": opt.n_runs(4, 2), **{k: getattr(opt, k) for k in reads}}
    if uses_data:
        cfg["data"] = data_request("cifar10", "synthetic", limit=20)
    return cfg


def _rows(cfg: dict, env: base.Env, i: int) -> list[dict]:
    CALLS.append(f"u{i}")
    assert distributed.agree_min(i) == i  # a unit is one rank's work: collectives inside it are local
    if env.images is not None:  # a unit sees what the runner loaded
        assert env.images.X.shape[0] <= 20
    return [dict(unit=i, run=r, value=0.5 * i + r, rank=env.rank) for r in range(cfg["runs"])]


def _units(cfg: dict, env: base.Env) -> list:
    env.scratch_path("ckpt").write_text("resume state")
    return [(f"u{i}", partial(_rows, cfg, env, i)) for i in range(cfg["units"])]


def _verdict(rows: list[dict], cfg: dict) -> Verdict:
    SEEN.append(rows)
    total = sum(r["value"] for r in rows)
    return Verdict(
        "held" if total > 0 else "not held",
        rule="held iff the values sum above 0",
        measured={"total": total, "n": len(rows)},
        reason=f"the values sum to {total}",
    )


def _draw(rows: list[dict], cfg: dict):
    fig, (ax,) = new_figure(1)
    ax.plot([r["value"] for r in rows], "o")
    FIGS.append(fig)
    return fig


def _toy(name: str, **kw) -> Reproduction:
    uses_data = kw.pop("uses_data", False)
    return Reproduction(
        name=name,
        paper="Toy et al. 2025",
        figure="Fig. 1",
        claim="values are positive",
        columns=COLUMNS,
        config=partial(_config, uses_data=uses_data, reads=kw.get("reads", ())),
        units=_units,
        verdict=_verdict,
        draw=_draw,
        uses_data=uses_data,
        **kw,
    )


@pytest.fixture
def toys(monkeypatch):
    CALLS.clear(), SEEN.clear(), FIGS.clear()
    reg = {
        r.name: r
        for r in (
            _toy("toy-a"),
            _toy("toy-b", protocols=("isoprobe", "paper")),
            _toy("toy-img", uses_data=True),
            _toy("toy-llm", reads=("model", "text_file")),
        )
    }
    monkeypatch.setattr(base, "REGISTRY", reg)
    return reg


def _quiet(messages: list | None = None) -> dict:
    return dict(show_progress=False, echo=(messages.append if messages is not None else (lambda _m: None)))


# --- Verdict ----------------------------------------------------------------------------------


def test_verdict_held_follows_verdict_and_bad_verdicts_are_refused():
    assert Verdict("held", "r", {}, reason="x = 2 > 1").held is True
    assert Verdict("not held", "r", {}, reason="x = 0 ≤ 1").held is False
    assert Verdict("undecided", "r", {}, reason="too few runs").held is None
    with pytest.raises(ValueError, match="one of"):
        Verdict("passed", "r", {})
    for verdict in ("held", "not held", "undecided"):  # held too: the numbers that decided it
        with pytest.raises(ValueError, match="reason"):
            Verdict(verdict, "r", {})
    with pytest.raises(ValueError, match="rule"):
        Verdict("held", "", {}, reason="x")


# --- files, JSON, resume ------------------------------------------------------------------------


def test_run_writes_the_contract_layout_and_cleans_resume_state(toys, tmp_path):
    (summary,) = run_reproductions(["toy-a"], Options(quick=True), tmp_path, **_quiet())
    on_disk = json.loads((tmp_path / "toy-a.json").read_text())
    assert on_disk == summary
    assert list(on_disk) == [
        "name",
        "paper",
        "figure",
        "claim",
        "verdict",
        "held",
        "rule",
        "measured",
        "theory",
        "reason",
        "notes",
        "config",
        "elapsed_s",
    ]
    assert on_disk["verdict"] == "held" and on_disk["held"] is True
    assert on_disk["config"] == {
        "quick": True,
        "seed": 0,
        "device": "cpu",
        "protocol": "isoprobe",
        "units": 3,
        "runs": 2,
    }
    assert on_disk["measured"] == {"total": 0.5 * 2 * 3 + 3 * 1.0, "n": 6}
    assert (tmp_path / "toy-a.csv").read_text().splitlines()[0] == ",".join(COLUMNS)
    assert (tmp_path / "toy-a.png").stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy-a.csv", "toy-a.json", "toy-a.png"]


def test_interrupted_run_resumes_by_unit_and_a_finished_one_is_skipped(toys, tmp_path, monkeypatch):
    def flaky(cfg, env, i):
        if i == 1:
            raise KeyboardInterrupt
        return _rows(cfg, env, i)

    cut = dataclasses.replace(
        base.REGISTRY["toy-a"],
        units=lambda cfg, env: [(key, partial(flaky, cfg, env, int(key[1:]))) for key, _ in _units(cfg, env)],
    )
    monkeypatch.setitem(base.REGISTRY, "toy-a", cut)
    with pytest.raises(KeyboardInterrupt):
        run_reproductions(["toy-a"], Options(quick=True), tmp_path, **_quiet())
    assert CALLS == ["u0"] and not (tmp_path / "toy-a.json").exists()
    assert (tmp_path / "toy-a.units.json").exists() and (tmp_path / "toy-a.ckpt").exists()
    monkeypatch.setitem(base.REGISTRY, "toy-a", _toy("toy-a"))
    (resumed,) = run_reproductions(["toy-a"], Options(quick=True), tmp_path, **_quiet())
    assert CALLS == ["u0", "u1", "u2"]  # u0 came back from the CSV
    assert "resumed 1 finished unit(s)" in " ".join(resumed["notes"])
    assert not (tmp_path / "toy-a.ckpt").exists() and not (tmp_path / "toy-a.units.json").exists()
    fresh_dir = tmp_path / "fresh"
    (fresh,) = run_reproductions(["toy-a"], Options(quick=True), fresh_dir, **_quiet())
    # the verdict saw the same rows, value for value and type for type, fresh or resumed
    assert [[(k, type(v), v) for k, v in r.items()] for r in SEEN[0]] == [
        [(k, type(v), v) for k, v in r.items()] for r in SEEN[1]
    ]
    assert resumed["measured"] == fresh["measured"]
    messages: list[str] = []
    (again,) = run_reproductions(["toy-a"], Options(quick=True), tmp_path, **_quiet(messages))
    assert again == resumed and len(CALLS) == 6 and "up to date" in messages[0]
    # another config is another run
    run_reproductions(["toy-a"], Options(quick=True, runs=3), tmp_path, **_quiet())
    assert json.loads((tmp_path / "toy-a.json").read_text())["config"]["runs"] == 3


# --- options ----------------------------------------------------------------------------------


def test_protocol_is_checked_before_any_work_and_all_keeps_those_that_have_it(toys, tmp_path):
    with pytest.raises(ReproductionOptionError, match="toy-a: no --protocol paper .*toy-b"):
        run_reproductions(["toy-b", "toy-a"], Options(protocol="paper"), tmp_path, **_quiet())
    with pytest.raises(ReproductionOptionError, match="--protocol must be one of"):
        run_reproductions(["toy-b"], Options(protocol="notebook"), tmp_path, **_quiet())
    assert CALLS == [] and not list(tmp_path.iterdir())
    messages: list[str] = []
    (summary,) = run_reproductions(["all"], Options(protocol="paper", quick=True), tmp_path, **_quiet(messages))
    assert summary["name"] == "toy-b" and summary["config"]["protocol"] == "paper"
    assert (tmp_path / "toy-b.paper.json").exists() and not (tmp_path / "toy-b.json").exists()
    assert "leaving out 3" in messages[0]


@pytest.mark.parametrize(
    "options, match",
    [
        (Options(model="gpt2"), "--model: none of the named reproductions reads it .only toy-llm"),
        (Options(text_file="/no/such/file.txt"), "--text-file /no/such/file.txt: no such file"),
        (Options(model="./no/such/model"), "--model ./no/such/model: no such directory"),
        (Options(runs=0), "--runs must be a positive integer"),
        (Options(data="imagenet"), "--data must be auto"),
    ],
)
def test_bad_options_fail_before_any_work(toys, tmp_path, options, match):
    with pytest.raises(ReproductionOptionError, match=match):
        run_reproductions(["toy-a"], options, tmp_path, **_quiet())
    assert CALLS == []


def test_model_and_text_file_reach_the_reproduction_that_reads_them(toys, tmp_path):
    text = tmp_path / "texts.txt"
    text.write_text("a text\n")
    opts = Options(quick=True, model="gpt2", text_file=str(text))
    llm, other = run_reproductions(["toy-llm", "toy-a"], opts, tmp_path / "out", **_quiet())
    assert llm["config"]["model"] == "gpt2" and llm["config"]["text_file"] == str(text)
    assert "model" not in other["config"]


# --- data provenance ----------------------------------------------------------------------------


def _offline(monkeypatch, available=("synthetic", "digits")):
    def fake(name, limit=None, seed=0):
        if name not in available and not name.endswith(".npz"):
            raise DataUnavailable(f"{name} is not here")
        return load_images("synthetic" if name == "cifar10" else name, limit=limit, seed=seed)

    monkeypatch.setattr(base, "load_images", fake)


def test_substitute_data_is_recorded_and_labelled_everywhere(toys, tmp_path, monkeypatch):
    _offline(monkeypatch)
    messages: list[str] = []
    (summary,) = run_reproductions(["toy-img"], Options(quick=True), tmp_path, **_quiet(messages))
    provenance = {"paper": "cifar10", "asked": "auto", "used": "synthetic", "substitute": True, "limit": 20}
    assert summary["data"] == provenance and summary["config"]["data"] == provenance
    label = "on substitute data: synthetic, not CIFAR10"
    assert label in FIGS[-1].get_suptitle()
    assert any(label in m and "held" in m for m in messages)
    assert any("in place of cifar10" in n for n in summary["notes"])
    own = tmp_path / "mine.npz"  # --data NAME: exactly that set (a local file here: no scikit-learn import)
    np.savez(own, x=np.random.default_rng(0).random((30, 4, 4)), y=np.arange(30) % 3)
    (named,) = run_reproductions(["toy-img"], Options(quick=True, data=str(own)), tmp_path / "d", **_quiet())
    assert named["data"]["asked"] == named["data"]["used"] == str(own) and named["data"]["substitute"] is True
    assert f"{own}, not CIFAR10" in FIGS[-1].get_suptitle()


def test_paper_data_is_not_labelled_and_a_named_missing_set_fails_before_work(toys, tmp_path, monkeypatch):
    _offline(monkeypatch, available=("cifar10",))
    (summary,) = run_reproductions(["toy-img"], Options(quick=True), tmp_path, **_quiet())
    assert summary["data"]["used"] == "cifar10" and summary["data"]["substitute"] is False
    assert FIGS[-1].get_suptitle() == ""
    CALLS.clear()
    with pytest.raises(DataUnavailable):
        run_reproductions(["toy-img"], Options(quick=True, data="mnist"), tmp_path / "m", **_quiet())
    assert CALLS == []


def test_several_paper_sets_keep_those_that_load_and_add_the_fallbacks(monkeypatch):
    _offline(monkeypatch, available=("cifar10", "synthetic"))
    notes: list[str] = []
    request = data_request(["mnist", "cifar10"], fallback=["synthetic", "cifar10"], limit=10)
    provenance, images = base.resolve_data(request, "auto", 0, notes.append)
    assert list(images) == ["cifar10", "synthetic"] and all(b.X.shape[0] == 10 for b in images.values())
    assert provenance == {
        "paper": ["mnist", "cifar10"],
        "asked": "auto",
        "used": ["cifar10", "synthetic"],
        "substitute": True,
        "limit": 10,
    }
    assert "offline: using synthetic in place of mnist" in notes
    assert base.data_label(provenance) == "on substitute data: synthetic, not MNIST"


def test_a_fallback_that_cannot_load_gives_way_to_the_synthetic_set(monkeypatch):
    """Without scikit-learn (the plain install) the digits substitute cannot load: the run goes on
    with the built-in synthetic set and says so, instead of stopping."""
    _offline(monkeypatch, available=("synthetic",))
    notes: list[str] = []
    provenance, images = base.resolve_data(data_request("cifar10", fallback="digits"), "auto", 0, notes.append)
    assert list(images) == ["synthetic"] and provenance["used"] == "synthetic" and provenance["substitute"]
    assert any("digits unavailable" in n and "synthetic set instead" in n for n in notes)
    with pytest.raises(DataUnavailable):  # asked by name, digits is not replaced
        base.resolve_data(data_request("cifar10", fallback="digits"), "digits", 0, notes.append)


def test_the_console_line_gives_the_claim_and_the_reason_of_every_verdict_but_held(tmp_path):
    lines: list[str] = []
    for verdict in ("not held", "undecided", "held"):
        summary = {
            "verdict": verdict,
            "figure": "Fig. 1",
            "claim": "values are positive (as tested: their sum)",
            "reason": f"why {verdict}",
            "elapsed_s": 1.0,
        }
        base._announce(summary, tmp_path / "x.json", lines.append, "x")
    assert lines[0].startswith("x (Fig. 1: values are positive): not held: why not held")
    assert lines[1].startswith("x (Fig. 1: values are positive): undecided: why undecided")
    assert lines[2].startswith("x (Fig. 1: values are positive): held (1.0 s)")


def test_the_png_states_the_claim_and_the_verdict(toys, tmp_path):
    (summary,) = run_reproductions(["toy-a"], Options(), tmp_path, **_quiet())
    footer = [t.get_text() for t in FIGS[-1].texts]
    assert any("Claim (Fig. 1): values are positive" in t and "Verdict: HELD — the values sum to" in t for t in footer)
    long = Verdict("not held", "r", {}, reason="x" * 1000)
    text = base._footer(toys["toy-a"], long, 4.0)
    assert len(text) < 600 and text.rstrip().endswith("…") and max(map(len, text.splitlines())) <= 60


def test_summary_counts_verdicts_and_keeps_substitute_data_apart():
    sub = {"substitute": True}
    rows = [
        dict(name="a", verdict="held"),
        dict(name="b", verdict="not held"),
        dict(name="c", verdict="undecided", data={"substitute": False}),
        dict(name="d", verdict="held", data=sub),
        dict(name="e", verdict="undecided", data=sub),
    ]
    text = summarize(rows, "out")
    first, paper, substitute = text.splitlines()
    assert first == "5 reproduction(s) in out:"
    assert paper == "  on the paper's data or no data (3): 1 held, 1 not held (b), 1 undecided (c)"
    assert substitute.startswith("  on substitute data (2): 1 held, 1 undecided (e)")
    assert "not about the paper's data sets" in substitute


# --- ranks: units dealt round-robin, rank 0 writes ---------------------------------------------


def _rank_worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        CALLS.clear(), base.REGISTRY.clear()
        rep = _toy("toy-a")
        base.REGISTRY["toy-a"] = dataclasses.replace(rep, config=lambda opt: {"units": 5, "runs": 1})
        (summary,) = run_reproductions(["toy-a"], Options(), out, show_progress=False, echo=lambda _m: None)
        torch.save({"summary": summary, "calls": list(CALLS)}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_units_are_dealt_round_robin_and_rank0_alone_writes(tmp_path):
    world = 2
    # fork: the ranks share the parent's imports (a spawned rank re-imports torch, ~10 s on a loaded machine)
    mp.start_processes(
        _rank_worker,
        args=(world, f"file://{tmp_path}/rendezvous", str(tmp_path)),
        nprocs=world,
        join=True,
        start_method="fork",
    )
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    assert got[0]["calls"] == ["u0", "u2", "u4"] and got[1]["calls"] == ["u1", "u3"]
    assert got[0]["summary"] == got[1]["summary"]  # every rank returns rank 0's JSON
    lines = (tmp_path / "toy-a.csv").read_text().splitlines()
    assert lines[1:] == [f"{i},0,{0.5 * i},{i % world}" for i in range(5)]  # unit order; unit i on rank i % 2
    assert not [p for p in (tmp_path / ".rank1").iterdir() if p.name.startswith("toy-a.") and p.suffix != ".ckpt"]
    assert not (tmp_path / ".rank1" / "toy-a.ckpt").exists()  # scratch cleaned on every rank


def test_torchrun_group_outside_torchrun_opens_nothing(monkeypatch):
    import torch.distributed as dist

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with distributed.torchrun_group() as (rank, world):
        assert (rank, world) == (0, 1) and not dist.is_initialized()
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}


def test_no_module_below_the_command_line_imports_the_experiments():
    import ast
    from pathlib import Path

    import isoprobe

    root = Path(isoprobe.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).as_posix()
        if rel.startswith("experiments/") or rel in ("cli.py", "__main__.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else ([node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            )
            offenders += [f"{rel}: {n}" for n in names if n.startswith("isoprobe.experiments")]
    assert offenders == []


# --- one run per output folder; no unit twice; time over sessions; names in any case -------------


def test_a_held_output_folder_refuses_a_second_run_and_no_unit_is_written_twice(toys, tmp_path):
    from isoprobe.outlock import LOCK_NAME, FolderBusy, hold_folder

    busy = r"in use by another isoprobe run \(pid \d+.*isoprobe repro toy-a --out X"
    with hold_folder(tmp_path, "isoprobe repro toy-a --out X", lambda _m: None), pytest.raises(FolderBusy, match=busy):
        run_reproductions(["toy-a"], Options(quick=True), tmp_path, **_quiet())
    assert CALLS == [] and sorted(p.name for p in tmp_path.iterdir()) == []
    run_reproductions(["toy-a"], Options(quick=True), tmp_path, **_quiet())
    assert not (tmp_path / LOCK_NAME).exists()  # released after the run
    table = base.TidyTable(tmp_path / "t.csv", COLUMNS, {"a": 1})
    table.add("u0", [dict(unit=0, run=0, value=1.0, rank=0)])
    with pytest.raises(ValueError, match="'u0' is already in .*not written twice"):
        table.add("u0", [dict(unit=0, run=0, value=1.0, rank=0)])
    assert len((tmp_path / "t.csv").read_text().splitlines()) == 2  # header and one row


def test_elapsed_s_of_a_resumed_run_counts_every_session(toys, tmp_path, monkeypatch):
    import time

    def slow_then_cut(cfg, env, i):
        if i == 1:
            raise KeyboardInterrupt
        time.sleep(0.4)
        return _rows(cfg, env, i)

    cut = dataclasses.replace(
        base.REGISTRY["toy-a"],
        units=lambda cfg, env: [(key, partial(slow_then_cut, cfg, env, int(key[1:]))) for key, _ in _units(cfg, env)],
    )
    monkeypatch.setitem(base.REGISTRY, "toy-a", cut)
    with pytest.raises(KeyboardInterrupt):
        run_reproductions(["toy-a"], Options(quick=True), tmp_path, **_quiet())
    assert json.loads((tmp_path / "toy-a.units.json").read_text())["elapsed_s"] >= 0.4
    monkeypatch.setitem(base.REGISTRY, "toy-a", _toy("toy-a"))
    start = time.perf_counter()
    (resumed,) = run_reproductions(["toy-a"], Options(quick=True), tmp_path, **_quiet())
    second = time.perf_counter() - start
    assert second < 0.4 <= resumed["elapsed_s"] <= second + 0.4 + 0.5


def test_reproduction_names_are_matched_in_any_case():
    assert base.resolve_names(["FIG3", "figc5", "Fig2-Trained"]) == ["fig3", "figC5", "fig2-trained"]
    assert len(base.resolve_names(["ALL"])) == len(base.REGISTRY)
    with pytest.raises(base.UnknownReproduction, match="'fig99'"):
        base.resolve_names(["fig99"])
