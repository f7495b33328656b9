"""ProbeCallback driven like a Trainer drives it, the TensorBoard helper, and the examples."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState

from isoprobe.integrations import ProbeCallback, log_summary, tensorboard_writer

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


class FakeWriter:
    def __init__(self):
        self.scalars: list[tuple[str, float, int]] = []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))


def test_callback_records_every_nth_forward_and_removes_hooks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    writer = FakeWriter()
    callback = ProbeCallback(sites="norm", every=2, writer=writer)
    state, control = TrainerState(), TrainerControl()
    callback.on_train_begin(None, state, control, model=model)
    for step in range(1, 7):
        loss = model(torch.randn(16, 24)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        state.global_step = step
        callback.on_step_end(None, state, control)
    callback.on_train_end(None, state, control)
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 0
    # the step of the probed forward: optimizer steps before it (0: the initial weights)
    assert sorted({row["global_step"] for row in callback.history}) == [0, 2, 4]
    assert {(row["site"], row["point"]) for row in callback.history} == {
        ("1", p) for p in ("pre", "centered", "normalized", "post")
    }
    logged = {(tag, step): value for tag, value, step in writer.scalars}
    for row in callback.history:
        key = f"{row['site']}:{row['point']}"
        assert logged[(f"isoprobe/isometry/{key}", row["global_step"])] == row["isometry_mean"]
        assert logged[(f"isoprobe/gap/{key}", row["global_step"])] == row["gap_mean"]
    assert logged[("isoprobe/theorem1_violations/1", 4)] == 0


def test_log_summary_skips_infinite_gaps():
    rows = [
        {
            "site": "s",
            "point": "pre",
            "isometry_mean": 0.0,
            "gap_mean": float("inf"),
            "theorem1_checked": 0,
            "theorem1_violations": 0,
        }
    ]
    writer = FakeWriter()
    assert log_summary(writer, rows, 7, prefix="p") == 1
    assert writer.scalars == [("p/isometry/s:pre", 0.0, 7)]


def test_callback_needs_the_model():
    with pytest.raises(ValueError, match="needs the model"):
        ProbeCallback().on_train_begin(None, TrainerState(), TrainerControl())


def test_tensorboard_missing_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match="pip install tensorboard"):
        tensorboard_writer("runs/x")


def tiny_lm():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=16, n_positions=12, bos_token_id=0, eos_token_id=0)
    )


class PoppedCheck(TrainerCallback):
    """Runs after ProbeCallback at every step end: the probe must hold no record then."""

    def __init__(self, callback):
        self.callback, self.seen = callback, []

    def on_step_end(self, args, state, control, **kwargs):
        self.seen.append(len(self.callback.probe.records))


def test_callback_under_a_real_trainer_logs_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import Trainer, TrainingArguments

    ids = torch.arange(12).remainder(5).repeat(8, 1)
    data = [{"input_ids": row, "labels": row} for row in ids]
    writer = tensorboard_writer(tmp_path / "tb")
    callback = ProbeCallback(sites="transformer.h.*.ln_*", every=1, writer=writer)
    check = PoppedCheck(callback)
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        logging_strategy="no",
    )
    Trainer(model=tiny_lm(), args=args, train_dataset=data, callbacks=[callback, check]).train()
    writer.close()
    assert check.seen == [0, 0, 0] and callback.probe is None  # popped every step, detached at the end
    assert sorted({row["global_step"] for row in callback.history}) == [0, 1, 2]
    assert {row["key"] for row in callback.history} == {
        f"transformer.h.0.{ln}:{p}" for ln in ("ln_1", "ln_2") for p in ("pre", "centered", "normalized", "post")
    }
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    for row in callback.history:
        logged = {e.step: e.value for e in events.Scalars(f"isoprobe/gap/{row['key']}")}
        assert logged[row["global_step"]] == pytest.approx(row["gap_mean"], rel=1e-6)  # float32 in the file
    assert all(e.value == 0 for e in events.Scalars("isoprobe/theorem1_violations/transformer.h.0.ln_1"))


def load_example(name):
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), EXAMPLES / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_hf_model(tmp_path, capsys):
    load_example("probe_hf_model.py").main(tmp_path)
    out = capsys.readouterr().out
    assert "transformer.h.3.ln_1:normalized" in out and out.count("yes 2/2") == 9
    assert (tmp_path / "plot.png").exists() and (tmp_path / "records.csv").exists()


def test_example_training_loop(capsys):
    load_example("probe_training_loop.py").main(steps=41, every=20)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step")]
    assert len(lines) == 3 and all(line.endswith("Theorem 1 held: True") for line in lines)


def test_example_trainer(capsys):
    example = load_example("probe_trainer.py")
    if importlib.util.find_spec("accelerate") is None:
        with pytest.raises(SystemExit, match="accelerate"):
            example.main()
    else:
        example.main(steps=8)
        assert "Theorem 1 violations 0/" in capsys.readouterr().out
