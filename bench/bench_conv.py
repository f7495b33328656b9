"""Cost of the Probe on a convolutional net: a ResNet-50-like net (torch only) at 64 px.

Setup: bottleneck blocks [3, 4, 6, 3], widths 64 to 2048, BatchNorm2d after every convolution,
one ``nn.ReLU(inplace=True)`` per block called three times (as torchvision's ResNet does),
random init, eval mode, batch 8 × 3 × 64 × 64 (``--px``, ``--batch``), ``torch.no_grad``; all
53 BatchNorms and 17 ReLU modules (49 ReLU calls) are sites. At 64 px the last stage's maps
are 2 × 2, so a BatchNorm's feature Gram there (2048 channels, 8 · 2 · 2 = 32 entries per
channel) is singular by construction, as are many spatial Grams.

Compared, interleaved over the repetitions (medians of process CPU time, one torch thread by
default; wall time also recorded):

* ``plain``                the forward alone;
* ``probe``                ``Probe(model)`` (the default view);
* ``probe-feature``        ``Probe(model, view="feature")``;
* ``probe-spatial``        ``Probe(model, view="spatial")`` (if the checkout has it).

Each isoprobe checkout given (``--checkout PATH``, repeatable; default: this one) is timed in a
child process of its own, one after the other in the same run, so that a change can be measured
before and after side by side (e.g. ``--checkout . --checkout /path/to/main``).

    python bench/bench_conv.py [--reps 5] [--threads 1] [--px 64] [--batch 8] [--checkout PATH ...]

It prints a Markdown table ready for ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _resnet50_like():
    from torch import nn

    class Bottleneck(nn.Module):
        def __init__(self, cin: int, width: int, stride: int) -> None:
            super().__init__()
            cout = 4 * width
            self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
            self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
            self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
            self.relu = nn.ReLU(inplace=True)
            self.down = None
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
            return self.relu(out + (x if self.down is None else self.down(x)))

    layers, cin = [], 64
    for i, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512))):
        for b in range(blocks):
            layers.append(Bottleneck(cin, width, 2 if b == 0 and i > 0 else 1))
            cin = 4 * width
    return nn.Sequential(
        nn.Conv2d(3, 64, 7, 2, 3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1),
        *layers,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(cin, 1000),
    )


def _child(args: argparse.Namespace) -> dict:
    """Runs in the child process: the timings of one checkout."""
    import torch

    import isoprobe
    import isoprobe.hooks
    from isoprobe import Probe

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = _resnet50_like().eval()
    x = torch.randn(args.batch, 3, args.px, args.px)
    views = ["auto", "feature"] + (["spatial"] if "spatial" in isoprobe.hooks._VIEWS else [])
    configs = {"plain": None, **{f"probe{'' if v == 'auto' else '-' + v}": v for v in views}}
    cpu: dict[str, list[float]] = {k: [] for k in configs}
    wall: dict[str, list[float]] = {k: [] for k in configs}
    records = {}
    with torch.no_grad():
        for rep in range(args.reps + 1):  # the first round warms up
            for name, view in configs.items():
                probe = None if view is None else Probe(model, view=view).attach()
                t0, c0 = time.perf_counter(), time.process_time()
                model(x)
                c1, t1 = time.process_time(), time.perf_counter()
                if probe is not None:
                    probe.detach()
                    records[name] = len(probe.records)
                if rep:
                    cpu[name].append(c1 - c0)
                    wall[name].append(t1 - t0)
    return {
        "isoprobe": str(Path(isoprobe.__file__).resolve().parent.parent),
        "cpu": {k: statistics.median(v) for k, v in cpu.items()},
        "wall": {k: statistics.median(v) for k, v in wall.items()},
        "records": records,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--px", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--checkout", action="append", default=None, help="isoprobe checkout to time (repeatable)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args)))
        return
    checkouts = args.checkout or [str(Path(__file__).resolve().parents[1])]
    results = []
    for checkout in checkouts:
        env = {**os.environ, "PYTHONPATH": str(Path(checkout).resolve())}
        cmd = [sys.executable, __file__, "--child", *sys.argv[1:]]
        out = subprocess.run(cmd, env=env, cwd=checkout, capture_output=True, text=True, check=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    print(
        f"ResNet-50-like, batch {args.batch} × 3 × {args.px} × {args.px}, {args.threads} thread(s), median of {args.reps}"
    )
    print("\n| checkout | config | records | CPU time | ratio to plain | wall time |\n|---|---|---|---|---|---|")
    for res in results:
        plain = res["cpu"]["plain"]
        for name, t in res["cpu"].items():
            n = res["records"].get(name, "")
            row = f"| {res['isoprobe']} | {name} | {n} | {t * 1e3:.1f} ms | {t / plain:.2f}× | {res['wall'][name] * 1e3:.1f} ms |"
            print(row)


if __name__ == "__main__":
    main()
