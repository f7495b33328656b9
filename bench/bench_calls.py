"""Cost of functional sites (``Probe(calls=True)``, the default): side by side in one run.

Two random-init models, ``torch.no_grad``, one torch thread, process CPU time, configurations
interleaved over the repetitions (medians):

* **GPT-2 small** (``GPT2Model``, ``GPT2Config()`` defaults), batch 4 × 128 tokens: every
  activation and norm is a module (its functional calls belong to the module site), so
  ``calls=True`` records nothing more; the difference is the mechanism alone (a pre/post hook on
  each of its modules, the torch-function mode seeing every torch call of the forward);
* **a conv net with F.relu** (eight torchvision-Inception ``BasicConv2d`` blocks, conv → batch
  norm → ``F.relu(x, inplace=True)``, 32 channels, batch 16 × 32 × 32): ``calls=True`` adds the
  eight functional ReLU sites (a copy of each in-place input, two Grams each); and the same
  net at batch 2 × 8 × 8, where the mechanism's fixed cost per forward weighs most.

Configurations: ``plain`` (the forward), ``calls=False`` (module sites only), ``calls=True``;
and both again with ``sites="norm"``, where the calls are seen and counted but none is
measured: their difference is the mechanism alone, on both models.

    python bench/bench_calls.py [--reps 7]

Prints a Markdown table for ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from isoprobe import Probe  # noqa: E402


class BasicConv2d(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


def conv_net(batch: int = 16, size: int = 32) -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    model = nn.Sequential(BasicConv2d(3, 32), *(BasicConv2d(32, 32) for _ in range(7))).eval()
    return model, {"input": torch.randn(batch, 3, size, size)}


def gpt2() -> tuple[nn.Module, dict]:
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    model = GPT2Model(GPT2Config()).eval()
    return model, {"input_ids": torch.randint(0, 50257, (4, 128))}


def timed(model: nn.Module, batch: dict, probe: dict | None) -> float:
    """CPU seconds of one forward (with a Probe made with ``probe`` attached, if given)."""
    args = list(batch.values()) if "input" in batch else []
    kwargs = {} if "input" in batch else batch
    with torch.no_grad(), Probe(model, **probe) if probe is not None else torch.no_grad():
        start = time.process_time()
        model(*args, **kwargs)
        return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    configs = {
        "plain": None,
        "calls=False": {"calls": False},
        "calls=True": {},
        "norm, calls=False": {"sites": "norm", "calls": False},
        "norm, calls=True": {"sites": "norm"},
    }
    rows = []
    models = {
        "GPT-2 small, 4×128": gpt2(),
        "conv net, F.relu, 16×32×32": conv_net(),
        "conv net, F.relu, 2×8×8": conv_net(2, 8),  # the per-forward cost, in a small forward
    }
    for label, (model, batch) in models.items():
        for probe in configs.values():  # warm-up
            timed(model, batch, probe)
        times: dict[str, list[float]] = {name: [] for name in configs}
        for _ in range(args.reps):
            for name, probe in configs.items():
                times[name].append(timed(model, batch, probe))
        med = {name: statistics.median(t) for name, t in times.items()}
        with torch.no_grad(), Probe(model) as probe:
            model(*batch.values()) if "input" in batch else model(**batch)
        functional = len(probe.functional_sites)
        rows.append((label, med, functional))
    print(f"| model | {' | '.join(configs)} | functional sites |")
    print(f"|---|{'---|' * len(configs)}---|")
    for label, med, functional in rows:
        plain = med["plain"]
        cells = [f"{med[name] * 1e3:.0f} ms ({med[name] / plain:.2f}×)" for name in configs]
        print(f"| {label} | {' | '.join(cells)} | {functional} |")
    for label, med, _ in rows:
        extra = (med["calls=True"] - med["calls=False"]) / med["plain"]
        mechanism = (med["norm, calls=True"] - med["norm, calls=False"]) / med["plain"]
        print(
            f"{label}: calls=True − calls=False = {extra:+.3f}× plain; "
            f'the mechanism alone (sites="norm", calls=True − calls=False) {mechanism:+.3f}× plain'
        )


if __name__ == "__main__":
    main()
