"""Batched ensemble training (isoprobe.training) against training the same models one after another.

    python bench/bench_train.py [--steps 15] [--repeat 3] [--threads 1 2] [--device cpu] [--repro]

Two workloads, each with the same models and the same minibatches both ways:

* ``fig7-quick``: the LN-MLPs of ``isoprobe repro fig7 --quick`` (7 activations × 2 runs, depth 10,
  width 128, batch 64, 784 inputs);
* ``meterez-fig4-quick``: the BN nets of ``meterez-fig4 --quick`` (orthogonal and Gaussian, depths
  4/16/64, width 32, batch 64, 2 runs each): many tiny products, where per-op overhead dominates.

*Ensemble*: one :class:`~isoprobe.training.Ensemble` step (vmap per group, one loss, one
backward, one SGD step). *Sequential*: for each model, its own forward, backward and
``torch.optim.SGD`` step. Before timing, the script checks that both give the same losses.
Throughput is model-samples per second (models × batch × steps / s); the two ways are timed
alternately, ``repeat`` times each, and the medians compared. ``--repro`` also times the four
training reproductions end to end (``--quick``, one process, default threads).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import tempfile
import time
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from isoprobe.nets import BNMLP, LNMLP
from isoprobe.theory import LNMLPSpec
from isoprobe.training import Ensemble

ACTS = ["sigmoid", "selu", "elu", "tanh", "silu", "relu", "gelu"]


def fig7_models() -> dict[str, list[nn.Module]]:
    def one(act: str, run: int) -> nn.Module:
        head = nn.Linear(128, 10, bias=False)
        return nn.Sequential(OrderedDict(body=LNMLP(LNMLPSpec(act, depth=10, width=128), 784, run=run), head=head))

    return {a: [one(a, r) for r in range(2)] for a in ACTS}


def fig4_models() -> dict[str, list[nn.Module]]:
    return {
        f"{w}-{L}": [BNMLP(784, 32, L, 10, weights=w, generator=torch.Generator().manual_seed(r)) for r in range(2)]
        for w in ("orthogonal", "gaussian")
        for L in (4, 16, 64)
    }


def run_ensemble(ens: Ensemble, opt, x, y) -> torch.Tensor:
    losses = ens.losses(x, y)
    opt.zero_grad(set_to_none=True)
    losses.sum().backward()
    opt.step()
    return losses.detach()


def run_sequential(models, opts, x, y) -> torch.Tensor:
    out = []
    for row, opt_row in zip(models, opts):
        out.append([])
        for r, (m, opt) in enumerate(zip(row, opt_row)):
            loss = F.cross_entropy(m(x[r]), y[r])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            out[-1].append(loss.detach())
    return torch.stack([torch.stack(r) for r in out])


def bench(name: str, groups: dict[str, list[nn.Module]], batch: int, steps: int, repeat: int, device: str) -> dict:
    seq_models = [[copy.deepcopy(m).to(device) for m in ms] for ms in groups.values()]
    ens = Ensemble(groups, device=device)
    runs, G = ens.runs, len(ens.names)
    gen = torch.Generator().manual_seed(0)
    xs = torch.rand(steps, runs, batch, 784, generator=gen).to(device)
    ys = torch.randint(0, 10, (steps, runs, batch), generator=gen).to(device)
    e_opt = torch.optim.SGD(ens.parameters(), lr=0.01)
    s_opts = [[torch.optim.SGD(m.parameters(), lr=0.01) for m in row] for row in seq_models]
    # same models, same data: the same losses (checked on the first steps)
    for t in range(2):
        a, b = run_ensemble(ens, e_opt, xs[t], ys[t]), run_sequential(seq_models, s_opts, xs[t], ys[t])
        torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-5)

    def timed(fn) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for t in range(steps):
            fn(t)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    e_times, s_times = [], []
    for _ in range(repeat):
        e_times.append(timed(lambda t: run_ensemble(ens, e_opt, xs[t], ys[t])))
        s_times.append(timed(lambda t: run_sequential(seq_models, s_opts, xs[t], ys[t])))
    e, s = statistics.median(e_times), statistics.median(s_times)
    work = G * runs * batch * steps
    return {
        "workload": name,
        "models": G * runs,
        "ensemble_s_per_step": e / steps,
        "sequential_s_per_step": s / steps,
        "ensemble_throughput": work / e,
        "sequential_throughput": work / s,
        "ratio": s / e,
    }


def time_reproductions() -> dict[str, tuple[float, str]]:
    from isoprobe.experiments import run_reproductions

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("fig7", "fig2-trained", "meterez-fig4", "meterez-fig6"):
            t0 = time.perf_counter()
            (s,) = run_reproductions([name], quick=True, out_dir=tmp, show_progress=False, echo=lambda _m: None)
            out[name] = (time.perf_counter() - t0, s["verdict"])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--device", default="cpu")
    p.add_argument("--repro", action="store_true", help="also time the four --quick training reproductions")
    args = p.parse_args()
    print(
        f"# torch {torch.__version__}, Python {platform.python_version()}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}, device {args.device}"
    )
    print(
        "| workload | models | threads | ensemble (ms/step) | sequential (ms/step) | ensemble (model-samples/s) "
        "| sequential (model-samples/s) | ratio |"
    )
    print("|---|---|---|---|---|---|---|---|")
    before = torch.get_num_threads()
    for threads in args.threads:
        torch.set_num_threads(threads)
        for name, make, batch in (("fig7-quick", fig7_models, 64), ("meterez-fig4-quick", fig4_models, 64)):
            r = bench(name, make(), batch, args.steps, args.repeat, args.device)
            print(
                f"| {r['workload']} | {r['models']} | {threads} | {1e3 * r['ensemble_s_per_step']:.0f} | "
                f"{1e3 * r['sequential_s_per_step']:.0f} | {r['ensemble_throughput']:.0f} | "
                f"{r['sequential_throughput']:.0f} | {r['ratio']:.2f}× |",
                flush=True,
            )
    torch.set_num_threads(before)
    if args.repro:
        total = 0.0
        print("\n| reproduction (--quick, offline data) | wall time (s) | verdict |\n|---|---|---|")
        for name, (secs, verdict) in time_reproductions().items():
            total += secs
            print(f"| {name} | {secs:.1f} | {verdict} |", flush=True)
        print(f"| all four | {total:.1f} | |")
        print(f"# load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
