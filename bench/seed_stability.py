"""Seed stability of the reproductions' verdicts: ``isoprobe repro all --quick`` at several seeds.

    python bench/seed_stability.py [--seeds 0 1 2 3 4] [--out DIR] [--names all]

Runs ``python -m isoprobe repro NAMES --quick --seed S --out DIR/seed-S`` once per seed, one after
another, each in its own process, and prints (markdown) the verdict of every reproduction at every
seed, whether they agree, and each run's wall time, CPU time (user + system of the child: what the
run would take alone on one core, since ``--quick`` runs torch single-threaded) and the load
average before and after. An existing ``DIR/seed-S`` is resumed: finished reproductions are read
back, not re-run (their time then counts only what was left).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path


def run_seed(seed: int, out: Path, names: list[str]) -> dict:
    """Run one seed; its wall and CPU seconds, the load before and after, and the JSON summaries."""
    load0 = os.getloadavg()[0]
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "isoprobe", "repro", *names, "--quick", "--seed", str(seed), "--out", str(out)]
    subprocess.run([*cmd, "--quiet"], check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    summaries = {
        p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json")) if not p.name.endswith("units.json")
    }
    return {"wall": wall, "cpu": cpu, "load": (load0, os.getloadavg()[0]), "summaries": summaries}


def table(results: dict[int, dict]) -> str:
    """The markdown table: one row per reproduction, one column per seed, then agreement."""
    seeds = sorted(results)
    names = sorted({n for r in results.values() for n in r["summaries"]})
    lines = ["| reproduction | " + " | ".join(f"seed {s}" for s in seeds) + " | same at every seed |"]
    lines.append("|---" * (len(seeds) + 2) + "|")
    for n in names:
        v = [results[s]["summaries"].get(n, {}).get("verdict", "—") for s in seeds]
        lines.append(f"| {n} | " + " | ".join(v) + f" | {'yes' if len(set(v)) == 1 else '**no**'} |")
    lines.append(
        "| *wall s (CPU s), load before→after* | "
        + " | ".join(
            f"{results[s]['wall']:.0f} ({results[s]['cpu']:.0f}), {results[s]['load'][0]:.1f}→{results[s]['load'][1]:.1f}"
            for s in seeds
        )
        + " | |"
    )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--out", type=Path, default=Path("seed-stability"))
    ap.add_argument("--names", nargs="+", default=["all"])
    a = ap.parse_args()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}"
    )
    results = {}
    for s in a.seeds:
        results[s] = run_seed(s, a.out / f"seed-{s}", a.names)
        r = results[s]
        print(
            f"seed {s}: {r['wall']:.0f} s wall, {r['cpu']:.0f} s CPU, load {r['load'][0]:.1f}→{r['load'][1]:.1f}",
            flush=True,
        )
    print(table(results))
    per = {
        n: [results[s]["summaries"][n].get("elapsed_s", float("nan")) for s in results if n in results[s]["summaries"]]
        for n in sorted({n for r in results.values() for n in r["summaries"]})
    }
    print("\nwall seconds per reproduction (min–max over seeds):")
    for n, v in per.items():
        print(f"  {n}: {min(v):.1f}–{max(v):.1f}")


if __name__ == "__main__":
    main()
