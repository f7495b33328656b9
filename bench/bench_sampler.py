"""Fast exact sampler vs dense random weights: one LN-MLP Gram trajectory, side by side.

    python bench/bench_sampler.py [--width 5000] [--n 100] [--depth 30] [--runs 10] [--dense-layers 30] [--threads 1]

Both run ``isoprobe.theory.simulate_spec`` on the same spec and input (ReLU, layer norm,
float64), one after the other in this process:

* ``sampler``: pre-activations drawn from their exact law given the Gram (``O(d n²)`` per layer);
* ``dense``: real ``d × d`` weights drawn and multiplied (``O(d² n)``, plus ``d²`` normals);
* ``dense, multiply only``: the same matrix products with the weights drawn beforehand (not
  timed) — the least any dense method has to pay.

Dense runs are slow on a CPU: ``--dense-layers L'`` times only ``L'`` layers (and one run) and
scales the time linearly to ``depth`` layers and ``runs`` runs (every layer costs the same at
constant width); the output says when it did. Orthogonal weights are timed too (dense: a QR of
``d × d`` per layer). ``--threads`` (default 1) fixes torch's thread count for both methods:
on a CPU shared with other jobs, multi-threaded BLAS swings by 10× from run to run. Results are
recorded in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from isoprobe.metrics import isometry_gap
from isoprobe.theory import LNMLPSpec, sample_weight, simulate_spec, weight_generator


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def multiply_only(spec: LNMLPSpec, X0: torch.Tensor, layers: int) -> float:
    """Seconds of the dense forward with weights drawn beforehand (one run)."""
    plan = spec.plan(X0.shape[1])[:layers]
    Ws = [sample_weight(spec, p, weight_generator(0, 0, ell)) for ell, p in enumerate(plan)]
    t0 = time.perf_counter()
    x = spec.input_map(X0)
    for W, p in zip(Ws, plan):
        x = spec.block_map(x @ W.mT, p)
        (x @ x.mT) / x.shape[-1]
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=5000)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--depth", type=int, default=30)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--dense-layers", type=int, default=30, help="layers timed for dense (then scaled)")
    ap.add_argument("--orthogonal-dense-layers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for both methods")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    d, n, L, R = args.width, args.n, args.depth, args.runs
    g = torch.Generator().manual_seed(0)
    X0 = torch.randn(n, d, generator=g, dtype=torch.float64) + 2 * torch.randn(1, d, generator=g, dtype=torch.float64)
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; d = {d}, n = {n}, depth {L}, float64, ReLU + layer norm"
    )
    print(
        "| weights | method | runs timed | layers timed | seconds (timed) | seconds for depth "
        f"{L}, 1 run | sampler speed-up |"
    )
    print("|---|---|---|---|---|---|---|")
    for weights, dense_layers in (("gaussian", args.dense_layers), ("orthogonal", args.orthogonal_dense_layers)):
        spec = LNMLPSpec("relu", depth=L, width=d, weights=weights)
        short = LNMLPSpec("relu", depth=dense_layers, width=d, weights=weights)
        simulate_spec(spec, X0[:, :50], runs=1)  # warm-up (allocator, kernels)
        t_one = best_of(lambda: simulate_spec(spec, X0, runs=1, seed=1), args.repeat)
        t_batch = best_of(lambda: simulate_spec(spec, X0, runs=R, seed=1), args.repeat)
        t0 = time.perf_counter()
        G_dense = simulate_spec(short, X0, runs=1, method="dense", seed=1)
        t_dense = time.perf_counter() - t0
        dense_full = t_dense * L / dense_layers
        t_mult = multiply_only(spec, X0, dense_layers) * L / dense_layers
        scaled = "" if dense_layers == L else f" (scaled from {dense_layers})"
        print(f"| {weights} | sampler | 1 | {L} | {t_one:.3f} | {t_one:.3f} | 1 |")
        print(
            f"| {weights} | sampler, {R} runs batched | {R} | {L} | {t_batch:.3f} | {t_batch / R:.3f} per run | "
            f"{dense_full / (t_batch / R):.0f}× vs dense per run |"
        )
        print(
            f"| {weights} | dense | 1 | {dense_layers} | {t_dense:.3f} | {dense_full:.3f}{scaled} | "
            f"{dense_full / t_one:.0f}× |"
        )
        print(
            f"| {weights} | dense, multiply only | 1 | {dense_layers} | – | {t_mult:.3f}{scaled} | "
            f"{t_mult / t_one:.0f}× |"
        )
        G = simulate_spec(spec, X0, runs=1, seed=1)
        print(
            f"|  | (check) gap at layer {dense_layers}: sampler {isometry_gap(G[0, dense_layers]).item():.4f}, "
            f"dense {isometry_gap(G_dense[0, -1]).item():.4f} | | | | | |"
        )


if __name__ == "__main__":
    main()
