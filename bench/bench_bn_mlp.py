"""Gradient-vs-depth measurement on the batch-norm MLP: two choices, timed side by side.

    python bench/bench_bn_mlp.py [--width 32] [--depth 1000] [--repeat 3]

1. threads: ``first_layer_grad_log_norms`` (building the net included) under
   ``single_thread()`` vs torch's default intra-op thread count;
2. nesting: one depth-L net read out at every depth of the grid (what the reproductions do)
   vs a fresh net per depth (the papers' notebooks).

The script first checks that nested and fresh give the same log-norms on the same weights,
then prints best-of-``repeat`` times and ratios (recorded in bench/RESULTS.md). The fresh
variant also builds the depth-L net once to copy its weights: that is included in its time.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from isoprobe.experiments.meterez import DEPTHS, single_thread
from isoprobe.nets.bn_mlp import BNMLP, first_layer_grad_log_norms

F64 = torch.float64


def nested(width: int, depths: list[int], x, y, seed: int) -> list[float]:
    """One net of the largest depth, read out at every depth."""
    net = BNMLP(x.shape[1], width, max(depths), generator=torch.Generator().manual_seed(seed), dtype=F64)
    return first_layer_grad_log_norms(net, x, y, depths).tolist()


def fresh(width: int, depths: list[int], x, y, seed: int) -> list[float]:
    """A new net per depth; its weights are then overwritten with the nested net's so that the
    two answers can be compared (the load costs far less than building the net)."""
    big = BNMLP(x.shape[1], width, max(depths), generator=torch.Generator().manual_seed(seed), dtype=F64)
    state = big.state_dict()
    out = []
    for L in depths:
        net = BNMLP(x.shape[1], width, L, generator=torch.Generator().manual_seed(seed + L), dtype=F64)
        net.load_state_dict({k: v for k, v in state.items() if k.startswith("readout") or int(k.split(".")[1]) < L})
        out += first_layer_grad_log_norms(net, x, y, [L]).tolist()
    return out


def timed(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--depth", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    depths = [d for d in DEPTHS if d <= args.depth]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.width, args.width, dtype=F64, generator=g)
    y = torch.randint(0, 10, (args.width,), generator=g)

    with single_thread():
        a, b = nested(args.width, depths, x, y, 1), fresh(args.width, depths, x, y, 1)
    assert max(abs(p - q) for p, q in zip(a, b)) < 1e-9, (a, b)

    print(
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"default threads {torch.get_num_threads()}; width {args.width}, depths {depths}"
    )
    t_default = timed(lambda: nested(args.width, depths, x, y, 2), args.repeat)
    with single_thread():
        t_single = timed(lambda: nested(args.width, depths, x, y, 2), args.repeat)
        t_fresh = timed(lambda: fresh(args.width, depths, x, y, 2), args.repeat)
    print(f"nested, default threads : {t_default:8.3f} s")
    print(f"nested, single thread   : {t_single:8.3f} s   default/single = {t_default / t_single:.2f}x")
    print(f"fresh per depth, single : {t_fresh:8.3f} s   fresh/nested   = {t_fresh / t_single:.2f}x")


if __name__ == "__main__":
    main()
