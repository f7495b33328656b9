"""isometry_gap on a batch of Grams: Cholesky path vs eigenvalue path vs a naive per-item loop.

    python bench/bench_metrics.py [--batch 64] [--n 256] [--repeat 5]

All three compute the same float64 gap; the script checks they agree before timing them side
by side in one run and prints the ratios (results recorded in bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from isoprobe.metrics import gram, isometry_gap


def eigen_path(G: torch.Tensor) -> torch.Tensor:
    """The same gap from a batched float64 eigendecomposition (what the fallback path does)."""
    lam = torch.linalg.eigvalsh(G.to(torch.float64))
    return lam.mean(-1).log() - lam.log().mean(-1)


def naive_loop(G: torch.Tensor) -> torch.Tensor:
    """One Gram at a time through numpy, as the papers' utility code does."""
    out = []
    for g in G.to(torch.float64).numpy():
        lam = np.linalg.eigvalsh(g)
        out.append(np.log(lam.mean()) - np.log(lam).mean())
    return torch.tensor(out)


def best_time(fn, G: torch.Tensor, repeat: int) -> float:
    fn(G)  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(G)
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    torch.manual_seed(0)
    G = gram(torch.randn(args.batch, args.n, args.d, dtype=torch.float64))
    ref = naive_loop(G)
    for name, fn in [("cholesky", isometry_gap), ("eigen", eigen_path)]:
        err = (fn(G) - ref).abs().max().item()
        assert err < 1e-10, f"{name} disagrees with the naive loop by {err}"

    timings = {
        "isometry_gap (Cholesky)": best_time(isometry_gap, G, args.repeat),
        "batched eigvalsh": best_time(eigen_path, G, args.repeat),
        "naive per-item numpy loop": best_time(naive_loop, G, args.repeat),
    }
    base = timings["isometry_gap (Cholesky)"]
    print(
        f"{args.batch} Grams of n = {args.n} (d = {args.d}), float64, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    )
    print(f"{'method':30s} {'best of ' + str(args.repeat):>12s} {'ratio':>8s}")
    for name, t in timings.items():
        print(f"{name:30s} {t * 1e3:10.2f} ms {t / base:7.2f}x")


if __name__ == "__main__":
    main()
