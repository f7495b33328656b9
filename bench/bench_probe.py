"""Cost of the Probe on GPT-2 small: time and peak memory, side by side in one run.

Setup: random-init ``GPT2Model`` (GPT-2 small without the LM head, so the ratio is against the
transformer alone), CPU, batch 8 × 256 tokens, all 37 sites (25 LayerNorms, 12 MLP activations),
``torch.no_grad``. Compared, interleaved over the repetitions:

* ``plain``          the forward alone;
* ``probe``          ``Probe(model)``: float64 Grams (default), every point of every site;
* ``probe-f32``      ``Probe(model, gram_dtype=torch.float32)``;
* ``naive``          a hook as one would write it first: a Python loop over the sequences, a
                     float64 Gram per sequence and a float64 eigendecomposition per Gram, for the
                     input and the output of every site (two points, not four), ``.item()`` each.

Time: process CPU time (``time.process_time``) and wall time of each forward, minimum over the
repetitions. On a machine shared with other jobs the wall time mostly measures the neighbours;
CPU time with one torch thread (the default here: ``--threads 1``) measures the work.

Memory: each configuration runs in a fresh child process; a thread samples, every 0.5 ms during
the forward, the live heap (glibc ``mallinfo2``: bytes in use, freed memory not counted) and the
resident set size. Reported: peak live heap and its increment over the heap before the forward
(weights, interpreter and libraries are in the former, not the latter), and peak RSS.

Also timed: the README's main job, ``isoprobe gpt2 --init random --text ...``, in a fresh process.

    python bench/bench_probe.py [--reps 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

BATCH, SEQ = 8, 256
CONFIGS = ("plain", "probe", "probe-f32", "naive")


def build_model():
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    model = GPT2Model(GPT2Config()).eval()
    ids = torch.randint(0, model.config.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    return model, ids


class NaiveProbe:
    """Per-sequence float64 Gram and eigendecomposition in a Python loop, input and output."""

    def __init__(self, model, modules):
        self.gaps: list[float] = []
        self.handles = [m.register_forward_hook(self.hook) for m in modules]

    @staticmethod
    def gap(X: torch.Tensor) -> float:
        eig = torch.linalg.eigvalsh(X @ X.T)
        return (eig.mean().log() - eig.clamp_min(1e-300).log().mean()).item()

    def hook(self, module, args, output):
        for tensor in (args[0], output):
            for seq in tensor.detach().double():
                self.gaps.append(self.gap(seq))

    def close(self):
        for h in self.handles:
            h.remove()


def forward(config: str, model, ids) -> None:
    from isoprobe import Probe
    from isoprobe.hooks import discover_sites

    with torch.no_grad():
        if config == "plain":
            model(input_ids=ids)
        elif config in ("probe", "probe-f32"):
            dtype = torch.float64 if config == "probe" else torch.float32
            with Probe(model, gram_dtype=dtype) as probe:
                model(input_ids=ids)
            assert len({r.site for r in probe.records}) == 37
        else:
            naive = NaiveProbe(model, [s.module for s in discover_sites(model)])
            try:
                model(input_ids=ids)
            finally:
                naive.close()
            assert len(naive.gaps) == 37 * 2 * BATCH


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                     "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


_LIBC = ctypes.CDLL("libc.so.6")
_LIBC.mallinfo2.restype = _MallInfo2


def heap_bytes() -> int:
    """Bytes in use on the glibc heap (main arena and mmapped chunks; one torch thread)."""
    info = _LIBC.mallinfo2()
    return info.uordblks + info.hblkhd


def memory_child(config: str) -> dict:
    model, ids = build_model()
    forward("plain", model, ids)
    heap0, rss0 = heap_bytes(), rss_bytes()
    peak = {"heap": heap0, "rss": rss0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak["heap"] = max(peak["heap"], heap_bytes())
            peak["rss"] = max(peak["rss"], rss_bytes())
            time.sleep(0.0005)

    thread = threading.Thread(target=sample)
    thread.start()
    forward(config, model, ids)
    done.set()
    thread.join()
    return {"heap_before": heap0, "heap_peak": peak["heap"], "rss_peak": peak["rss"]}


def timings(reps: int) -> dict[str, dict[str, list[float]]]:
    model, ids = build_model()
    for config in CONFIGS:  # warm-up
        forward(config, model, ids)
    times: dict[str, dict[str, list[float]]] = {c: {"cpu": [], "wall": []} for c in CONFIGS}
    for _ in range(reps):
        for config in CONFIGS:
            cpu, wall = time.process_time(), time.perf_counter()
            forward(config, model, ids)
            times[config]["cpu"].append(time.process_time() - cpu)
            times[config]["wall"].append(time.perf_counter() - wall)
    return times


def cli_time() -> tuple[float, float]:
    """(wall, CPU) seconds of ``isoprobe gpt2 --init random --text ...`` in a fresh process."""
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(
        [str(Path(sys.executable).parent / "isoprobe"), "gpt2", "--init", "random", "--text",
         "The quick brown fox jumps over the lazy dog."],
        check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.perf_counter() - start, (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--memory-child", choices=CONFIGS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child)))
        return

    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), batch {BATCH} x {SEQ} tokens, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    times = timings(args.reps)
    best = {c: {k: min(v) for k, v in t.items()} for c, t in times.items()}
    print(f"\ntime per forward, minimum of {args.reps} interleaved runs")
    for c in CONFIGS:
        cpu, wall = best[c]["cpu"], best[c]["wall"]
        print(f"  {c:10s} CPU {cpu:7.2f} s  ratio {cpu / best['plain']['cpu']:.3f}x   "
              f"wall {wall:7.2f} s  ratio {wall / best['plain']['wall']:.3f}x   "
              f"(wall runs {', '.join(f'{t:.1f}' for t in times[c]['wall'])})")

    print("\npeak memory during the forward (fresh process per configuration)")
    mem = {}
    for c in CONFIGS:
        child = [sys.executable, __file__, "--memory-child", c]
        if args.threads:
            child += ["--threads", str(args.threads)]
        out = subprocess.run(child, check=True, capture_output=True, text=True).stdout
        mem[c] = json.loads(out.strip().splitlines()[-1])
    base = mem["plain"]
    base_inc = base["heap_peak"] - base["heap_before"]
    for c in CONFIGS:
        m = mem[c]
        inc = m["heap_peak"] - m["heap_before"]
        print(f"  {c:10s} live heap peak {m['heap_peak'] / 2**20:6.0f} MiB  "
              f"ratio {m['heap_peak'] / base['heap_peak']:.3f}x"
              f"   increment {inc / 2**20:5.0f} MiB  ratio {inc / base_inc:.2f}x"
              f"   peak RSS {m['rss_peak'] / 2**20:6.0f} MiB  ratio {m['rss_peak'] / base['rss_peak']:.3f}x")

    wall, cpu = cli_time()
    print(f"\n`isoprobe gpt2 --init random --text ...` in a fresh process: wall {wall:.1f} s, "
          f"CPU {cpu:.1f} s")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
