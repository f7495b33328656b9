"""Cost of the Probe on vision networks: timm's ResNet-50 and a ViT at 224 px, side by side in one run.

Setup: random-init ``timm.create_model(NAME)`` (``resnet50``, ``vit_small_patch16_224``; ``--models``),
eval, ``torch.no_grad``, a batch of 16 images of 224 px, the CPU, every site the default Probe finds,
in its default views. Compared, interleaved over the repetitions (medians):

* ``plain``  the forward alone;
* ``probe``  ``Probe(model)``;
* ``floor``  the arithmetic that the Grams of the Probe's records need, on tensors of the same shapes
  made beforehand: per Gram the Probe forms (one per site call, point and view, but none for a
  norm's ``pre`` and ``normalized`` in the view of its ``centered``, which the Probe derives from
  the centred Gram, and none for a Gram singular by construction, more items than entries), the
  float32 → float64 conversion of its items into a reused buffer, the float64 product ``X Xᵀ``,
  and its Cholesky factorisation.

The Probe's own work is ``probe − plain − floor``; the target (issue 16) is at most 0.15 × ``plain``.
Which Grams are needed is read off one probed forward's records (site, call, point, view, items
``n``, entries ``dim``, and the number of Grams per point: the records of a token or spatial view
are one per image).

Time: process CPU time with one torch thread (``--threads 1``; on a shared machine wall time
mostly measures the neighbours) and wall time, both printed.

    python bench/bench_vision.py [--reps 3] [--threads 1] [--models resnet50 vit_small_patch16_224]

It prints a Markdown table ready for ``bench/RESULTS.md``. Needs timm (the ``test`` extra).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout
sys.path.insert(0, str(ROOT / "tests"))  # the torchvision import helper
from vision_env import import_torchvision  # noqa: E402

from isoprobe import Probe  # noqa: E402

_DERIVED = ("pre", "normalized")  # a norm's points derived from its centred Gram in the same view


def gram_shapes(model, x) -> list[tuple[int, int, int]]:
    """``(groups, items, entries)`` of every Gram the Probe forms in one forward of ``model``."""
    with torch.no_grad(), Probe(model) as probe:
        model(x)
    groups = Counter((r.site, r.call, r.point, r.view) for r in probe.records)
    centred = {(r.site, r.call, r.view) for r in probe.records if r.point == "centered"}
    shapes = {}
    for r in probe.records:
        if r.kind == "norm" and r.point in _DERIVED and (r.site, r.call, r.view) in centred:
            continue
        if r.n > r.dim:  # singular by construction: no Gram needed
            continue
        shapes[r.site, r.call, r.point, r.view] = (groups[r.site, r.call, r.point, r.view], r.n, r.dim)
    return list(shapes.values())


def floor_inputs(shapes) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per Gram: float32 items and a reused float64 buffer of their shape."""
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(g, n, m, generator=gen), torch.empty(g, n, m, dtype=torch.float64)) for g, n, m in shapes]


def floor(inputs) -> None:
    for items, buffer in inputs:
        X = buffer.copy_(items)
        torch.linalg.cholesky_ex(X @ X.mT)


def clocked(fn) -> tuple[float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - cpu, time.perf_counter() - wall


def bench(name: str, reps: int) -> dict:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(16, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    shapes = gram_shapes(model, x)
    inputs = floor_inputs(shapes)

    def probed():
        with Probe(model):
            model(x)

    configs = {"plain": lambda: model(x), "probe": probed, "floor": lambda: floor(inputs)}
    times: dict[str, list[tuple[float, float]]] = {c: [] for c in configs}
    with torch.no_grad():
        for fn in configs.values():  # warm-up
            fn()
        for _ in range(reps):
            for config, fn in configs.items():
                times[config].append(clocked(fn))
    med = {c: tuple(statistics.median(t[i] for t in ts) for i in (0, 1)) for c, ts in times.items()}
    return {"model": name, "grams": len(shapes), "median": med}


def report(results: list[dict], threads: int) -> None:
    print(f"torch {torch.__version__}, {threads} thread(s), batch 16 × 224 px, medians; CPU s (wall s)\n")
    print("| model | Grams | plain | probe | floor | probe − plain − floor | ÷ plain (CPU) | ÷ plain (wall) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        m = r["median"]
        own = [m["probe"][i] - m["plain"][i] - m["floor"][i] for i in (0, 1)]
        cells = " | ".join(f"{m[c][0]:.3f} ({m[c][1]:.3f})" for c in ("plain", "probe", "floor"))
        print(
            f"| {r['model']} | {r['grams']} | {cells} | {own[0]:.3f} ({own[1]:.3f}) | "
            f"**{own[0] / m['plain'][0]:.3f}** | {own[1] / m['plain'][1]:.3f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", nargs="+", default=["resnet50", "vit_small_patch16_224"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import_torchvision()
    report([bench(name, args.reps) for name in args.models], args.threads)


if __name__ == "__main__":
    main()
