"""The Probe on a ``torch.compile``d GPT-2 small (inductor, the default backend), side by side.

Setup as ``bench_probe.py``: random-init ``GPT2Model``, batch 8 × 256 tokens (``--seq``), all 37
sites, ``torch.no_grad``, one torch thread, process CPU time per forward (medians of ``--reps``).
Compared in one process:

* ``eager``               the forward alone;
* ``eager+probe``         ``Probe(model)``;
* ``compiled``            ``torch.compile(model)``;
* ``compiled+probe``      ``Probe(torch.compile(model))`` (compile, then probe);
* ``probe+compiled``      ``Probe(model)`` attached, then ``torch.compile(model)``.

For every compiled configuration: the wall and process CPU time of its first forward (the
compilation; inductor's compile workers are other processes, so its CPU time is not all of it),
dynamo's graph count and graph breaks, whether it compiled again after the first forward, and
for the probed ones the largest difference of an isometry gap from the eager Probe's records
next to the compiled model's own deviation from the eager output (max |Δ| / max |output|).

    python bench/bench_compile.py [--reps 2] [--seq 256]

It prints a Markdown table ready for ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

BATCH = 8


def forward_times(model, batch, reps: int) -> tuple[list[float], torch.Tensor]:
    """Process CPU seconds of ``reps`` forwards, and the last output."""
    times = []
    for _ in range(reps):
        t = time.process_time()
        out = model(input_ids=batch).last_hidden_state
        times.append(time.process_time() - t)
    return times, out


def compiled_config(name: str, model, batch, reps: int, eager_out, eager_records) -> dict:
    """Compile (in the order ``name`` says), time the first forward and ``reps`` more."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from isoprobe import Probe

    torch._dynamo.reset()
    counters.clear()
    probe = None
    if name == "probe+compiled":
        probe = Probe(model).attach()
    compiled = torch.compile(model)
    if name == "compiled+probe":
        probe = Probe(compiled).attach()
    wall, cpu = time.time(), time.process_time()
    compiled(input_ids=batch)
    row = {"compile wall s": time.time() - wall, "compile cpu s": time.process_time() - cpu}
    frames = dict(counters["frames"])
    times, out = forward_times(compiled, batch, reps)
    row["s/forward"] = statistics.median(times)
    row["graphs"] = counters["stats"]["unique_graphs"]
    row["graph breaks"] = sum(counters["graph_break"].values())
    row["recompiled"] = dict(counters["frames"]) != frames
    row["output dev"] = float((out - eager_out).abs().max() / eager_out.abs().max())
    if probe is not None:
        probe.detach()
        first = [r for r in probe.records if r.step == 0]
        row["names equal"] = [s.name for s in probe.sites] == [s.name for s in Probe(model).sites]
        row["max |Δgap|"] = max(abs(a.isometry_gap - b.isometry_gap) for a, b in zip(eager_records, first))
        row["records equal keys"] = [r.key for r in first] == [r.key for r in eager_records]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from transformers import GPT2Config, GPT2Model

    from isoprobe import Probe

    torch.manual_seed(0)
    model = GPT2Model(GPT2Config()).eval()
    batch = torch.randint(0, 50257, (BATCH, args.seq), generator=torch.Generator().manual_seed(1))
    rows = {}
    with torch.no_grad():
        times, eager_out = forward_times(model, batch, args.reps + 1)
        rows["eager"] = {"s/forward": statistics.median(times[1:])}
        with Probe(model) as probe:
            times, _ = forward_times(model, batch, args.reps + 1)
        rows["eager+probe"] = {"s/forward": statistics.median(times[1:])}
        eager_records = [r for r in probe.records if r.step == 0]
        for name in ("compiled", "compiled+probe", "probe+compiled"):
            rows[name] = compiled_config(name, model, batch, args.reps, eager_out, eager_records)
    print(f"GPT-2 small, {BATCH} × {args.seq} tokens, no_grad, 1 thread, load {os.getloadavg()[0]:.2f}")
    base = rows["eager"]["s/forward"]
    keys = [k for k in rows["compiled+probe"] if k != "s/forward"]
    print("| configuration | s/forward | × eager | " + " | ".join(keys) + " |")
    print("|---" * (3 + len(keys)) + "|")
    for name, row in rows.items():
        cells = [_cell(row.get(k, "")) for k in keys]
        print(f"| {name} | {row['s/forward']:.2f} | {row['s/forward'] / base:.2f} | " + " | ".join(cells) + " |")


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


if __name__ == "__main__":
    main()
