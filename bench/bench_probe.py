"""Cost of the Probe on GPT-2 small: time, where it goes, peak memory; side by side in one run.

Setup: random-init ``GPT2Model`` (GPT-2 small without the LM head, so the ratio is against the
transformer alone), batch 8 × 256 tokens (``--seq``), all 37 sites (25 LayerNorms, 12 MLP
activations), ``torch.no_grad``. Compared, interleaved over the repetitions (medians):

* ``plain``      the forward alone;
* ``probe``      ``Probe(model)``: float64 Grams (default), every point of every site;
* ``probe-f32``  ``Probe(model, gram_dtype=torch.float32)``;
* ``gemm-f64``, ``gemm-f32``: the floor — the Probe's 74 Gram products alone (two per site:
  the centred and output Grams of a norm, input and output of an activation), as batched
  GEMMs on activations captured beforehand and already converted, timed in the same loop;
* ``convert-f64``: the other part of the float64 answer's arithmetic that torch cannot fuse into
  its GEMM: converting those 74 float32 tensors to float64 (into buffers reused across calls,
  as the Probe does); memory traffic, 12 bytes per entry;
* ``chol-f64``: the 592 Cholesky factorisations of the float64 Grams (one per Gram and sequence,
  batched per site as the Probe batches them), on Grams formed beforehand.

The extra time of ``probe`` is then split into these floors and the rest (the Probe's own
overhead): ``probe − plain = gemm + convert + chol + rest``.

Time on the CPU: process CPU time (``time.process_time``) and wall time, both recorded; the
ratios use CPU time with one torch thread (``--threads 1``, the default: on a shared machine
the wall time mostly measures the neighbours) and wall time with more (``--threads 2``: the
CPU time of two threads is their sum, not what a user waits). On CUDA (``--device cuda``):
wall time between ``torch.cuda.synchronize()`` calls.

Breakdown: one profiled forward per Probe configuration (``torch.profiler``); the self time of
every operator run inside a Probe hook, by category (Gram GEMM, conversions and copies,
centring, other elementwise and reductions, Cholesky and triangular solves, eigenvalues,
Python and records). On CUDA: the kernels' device time, and a count of host synchronisations
(``cudaStreamSynchronize``, ``cudaDeviceSynchronize``, synchronous ``cudaMemcpy``, a value read
on the host) inside the site hooks, which must be zero for the default float64 Probe (it defers
them to the end of the forward; float32 Grams decide their float64 recomputation in the hook).

Memory (CPU only): each configuration in a fresh child process; a thread samples the live glibc
heap (``mallinfo2``) and the resident set every 0.5 ms during the forward.

    python bench/bench_probe.py [--reps 3] [--threads 1] [--device cpu] [--seq 256] [--no-memory]

It prints a Markdown table ready for ``bench/RESULTS.md``; ``--json PATH`` also writes the numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

BATCH = 8
TIMED = ("plain", "probe", "probe-f32", "gemm-f64", "gemm-f32", "convert-f64", "chol-f64")
FLOORS = ("gemm-f64", "gemm-f32", "convert-f64", "chol-f64")
CATEGORIES = (
    "Gram GEMM",
    "conversion/copy",
    "centring",
    "elementwise/reduction",
    "Cholesky/triangular",
    "zeroing above the diagonal (inside cholesky_ex)",
    "eigenvalues",
    "Python, records, host transfer",
)


def build_model(seq: int, device: str):
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    model = GPT2Model(GPT2Config(n_positions=max(1024, seq))).eval().to(device)
    ids = torch.randint(0, model.config.vocab_size, (BATCH, seq), generator=torch.Generator().manual_seed(1))
    return model, ids.to(device)


def capture_items(model, ids) -> list[torch.Tensor]:
    """The 74 item tensors whose Grams the Probe forms (centred norm inputs, outputs, ...)."""
    from isoprobe.hooks import discover_sites

    out: list[torch.Tensor] = []

    def hook(module, args, output):
        x = args[0].detach()
        if isinstance(module, torch.nn.LayerNorm):
            x = x - x.mean(-1, keepdim=True)
        out.extend([x.clone(), output.detach().clone()])

    handles = [s.module.register_forward_hook(hook) for s in discover_sites(model)]
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    return out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(config: str, model, ids, floor: dict[str, list[torch.Tensor]]) -> None:
    from isoprobe import Probe

    with torch.no_grad():
        if config == "plain":
            model(input_ids=ids)
        elif config.startswith("gemm"):
            for X in floor[config]:
                torch.matmul(X, X.mT)
        elif config == "convert-f64":
            for X, buf in zip(floor["gemm-f32"], floor["buffers"]):
                buf.copy_(X)
        elif config == "chol-f64":
            for G in floor["grams"]:
                torch.linalg.cholesky_ex(G)
        else:
            dtype = torch.float64 if config == "probe" else torch.float32
            with Probe(model, gram_dtype=dtype) as probe:
                model(input_ids=ids)
            assert len({r.site for r in probe.records}) == 37


def floor_inputs(model, ids) -> dict[str, list[torch.Tensor]]:
    """What the floors work on: the 74 item tensors in float64 and float32, float64 buffers for
    the conversions, and the Grams stacked per site as the Probe factorises them (2 × batch)."""
    f64 = [t.double() for t in capture_items(model, ids)]
    grams = [torch.cat([X @ X.mT for X in f64[i : i + 2]]) for i in range(0, len(f64), 2)]
    return {
        "gemm-f64": f64,
        "gemm-f32": [t.float() for t in f64],
        "buffers": [torch.empty_like(t) for t in f64],
        "grams": grams,
    }


def timings(model, ids, reps: int, device: str) -> dict[str, dict[str, list[float]]]:
    """``{"cpu": {config: seconds per rep}, "wall": ...}``, configurations interleaved."""
    floor = floor_inputs(model, ids)
    for config in TIMED:  # warm-up
        run(config, model, ids, floor)
    times: dict[str, dict[str, list[float]]] = {"cpu": {c: [] for c in TIMED}, "wall": {c: [] for c in TIMED}}
    for _ in range(reps):
        for config in TIMED:
            sync(device)
            cpu, wall = time.process_time(), time.perf_counter()
            run(config, model, ids, floor)
            sync(device)
            times["cpu"][config].append(time.process_time() - cpu)
            times["wall"][config].append(time.perf_counter() - wall)
    return times


def _category(name: str) -> str | None:
    if name in ("aten::bmm", "aten::mm", "aten::addmm", "aten::baddbmm"):
        return "Gram GEMM"
    if name in (
        "aten::copy_",
        "aten::to",
        "aten::_to_copy",
        "aten::clone",
        "aten::stack",
        "aten::cat",
        "aten::empty",
        "aten::empty_strided",
        "aten::empty_like",
        "aten::contiguous",
    ):
        return "conversion/copy"
    if name in ("aten::mean", "aten::sub_", "aten::mul_"):
        return "centring"
    if name in ("aten::tril", "aten::tril_"):
        return "zeroing above the diagonal (inside cholesky_ex)"
    if "cholesky" in name or "solve_triangular" in name:
        return "Cholesky/triangular"
    if "eigvalsh" in name or "eigh" in name:
        return "eigenvalues"
    if name.startswith("aten::"):
        return "elementwise/reduction"
    return None


# what makes the host wait for the device: explicit synchronisations, synchronous copies, and a
# tensor's value read on the host (.item(), bool(), .tolist(): aten::_local_scalar_dense)
_SYNC_EVENTS = (
    "cudaStreamSynchronize",
    "cudaDeviceSynchronize",
    "cudaEventSynchronize",
    "cudaMemcpy",
    "aten::_local_scalar_dense",
)


@contextlib.contextmanager
def labelled_hooks():
    """Wrap the Probe's site hooks and its end-of-forward flush in profiler ranges."""
    from torch.profiler import record_function

    from isoprobe import Probe

    site_hook, flush = Probe._site_hook, Probe._flush

    def wrapped_site_hook(self, site):
        inner = site_hook(self, site)

        def hook(*args, **kwargs):
            with record_function("isoprobe:site-hook"):
                return inner(*args, **kwargs)

        return hook

    def wrapped_flush(self):
        with record_function("isoprobe:flush"):
            flush(self)

    Probe._site_hook, Probe._flush = wrapped_site_hook, wrapped_flush
    try:
        yield
    finally:
        Probe._site_hook, Probe._flush = site_hook, flush


def breakdown(model, ids, dtype: torch.dtype, device: str) -> dict:
    """Self time of the operators inside the Probe's hooks, by category, from one profiled forward."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from isoprobe import Probe

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with labelled_hooks(), torch.no_grad(), profile(activities=activities) as prof:
        with Probe(model, gram_dtype=dtype) as probe:
            model(input_ids=ids)
        probe.records  # noqa: B018 (the host transfer and the records)
        sync(device)
    events = list(prof.events())
    ranges = [(e.time_range.start, e.time_range.end, e.name) for e in events if e.name.startswith("isoprobe:")]
    total = sum(end - start for start, end, name in ranges) / 1e6
    ranges.sort()

    def inside(e) -> str | None:
        for start, end, name in ranges:
            if start <= e.time_range.start and e.time_range.end <= end:
                return name
        return None

    cuda = device.startswith("cuda")
    seconds = dict.fromkeys(CATEGORIES, 0.0)
    syncs = {"site-hook": 0, "flush": 0}
    for e in events:
        if e.device_type != DeviceType.CPU or e.name.startswith("isoprobe:"):
            continue
        where = inside(e)
        if where is None:
            continue
        if e.name in _SYNC_EVENTS:
            syncs[where.split(":")[1]] += 1
        category = _category(e.name)
        if category is not None:  # on CUDA: the kernels' time, else the operators' CPU time
            seconds[category] += (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e6
    if cuda:
        total = sum(seconds.values())
    else:
        seconds["Python, records, host transfer"] = max(0.0, total - sum(seconds.values()))
    return {"total": total, "seconds": seconds, "syncs": syncs}


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def heap_bytes() -> int:
    """Bytes in use on the glibc heap (main arena and mmapped chunks; one torch thread)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


def memory_child(config: str, seq: int) -> dict:
    model, ids = build_model(seq, "cpu")
    run("plain", model, ids, {})
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
    run(config, model, ids, {})
    done.set()
    thread.join()
    return {"heap_before": heap0, "heap_peak": peak["heap"], "rss_peak": peak["rss"]}


def memory(args) -> dict[str, dict]:
    mem = {}
    for config in ("plain", "probe", "probe-f32"):
        child = [
            sys.executable,
            __file__,
            "--memory-child",
            config,
            "--seq",
            str(args.seq),
            "--threads",
            str(args.threads),
        ]
        out = subprocess.run(child, check=True, capture_output=True, text=True).stdout
        mem[config] = json.loads(out.strip().splitlines()[-1])
    return mem


LABELS = {
    "plain": "plain forward",
    "probe": "`Probe(model)` (float64 Grams)",
    "probe-f32": "`Probe(model, gram_dtype=torch.float32)`",
    "gemm-f64": "floor: the 74 Gram GEMMs alone, float64",
    "gemm-f32": "floor: the 74 Gram GEMMs alone, float32",
    "convert-f64": "floor: the 74 float32 → float64 conversions alone",
    "chol-f64": "floor: the 592 Cholesky factorisations alone",
}


def primary_clock(args) -> str:
    """CPU time for one CPU thread; wall time for several threads and on CUDA."""
    return "cpu" if args.threads == 1 and not args.device.startswith("cuda") else "wall"


def report_times(args, times: dict[str, dict[str, list[float]]]) -> dict[str, float]:
    """The table of times and ratios on the primary clock (the other clock's ratio beside it)."""
    clock = primary_clock(args)
    other = "wall" if clock == "cpu" else "cpu"
    med = {k: {c: statistics.median(v) for c, v in t.items()} for k, t in times.items()}
    print(
        f"\n| configuration | {clock} s / forward (median of {args.reps}) | ratio to plain | runs | {other}-time ratio |"
    )
    print("|---|---|---|---|---|")
    for c in TIMED:
        ratio = {k: med[k][c] / med[k]["plain"] for k in med}
        shown = f"1 + {ratio[clock]:.3f}" if c in FLOORS else f"**{ratio[clock]:.3f}×**"
        other_shown = f"1 + {ratio[other]:.3f}" if c in FLOORS else f"{ratio[other]:.3f}×"
        runs = ", ".join(f"{t:.2f}" for t in times[clock][c])
        print(f"| {LABELS[c]} | {med[clock][c]:.2f} | {shown} | {runs} | {other_shown} |")
    return med[clock]


def report_floors(med: dict[str, float]) -> None:
    """The Probe's extra time split into the floors and the rest, and the lowest ratios they allow."""
    base = med["plain"]
    parts = {
        "probe": (("Gram GEMMs", "gemm-f64"), ("conversion to float64", "convert-f64"), ("Cholesky", "chol-f64")),
        "probe-f32": (("Gram GEMMs", "gemm-f32"), ("Cholesky (of the Grams in float64)", "chol-f64")),
    }
    print("\n| configuration | part of the extra time | s | share of the extra time | × plain |\n|---|---|---|---|---|")
    for config, floors in parts.items():
        extra = med[config] - base
        for name, floor in floors:
            print(
                f"| {config} | floor: {name} | {med[floor]:.3f} | {med[floor] / extra:.0%} | {med[floor] / base:.3f} |"
            )
        rest = extra - sum(med[f] for _, f in floors)
        print(
            f"| {config} | the rest: the Probe's own work and overhead | {rest:.3f} | {rest / extra:.0%} | {rest / base:.3f} |"
        )
        floor = sum(med[f] for _, f in floors)
        half = floor - med[floors[0][1]] / 2
        print(
            f"| {config} | **lowest ratio the floors allow** (with a symmetric product at the same rate) | "
            f"{floor:.3f} | | **{1 + floor / base:.3f}×** ({1 + half / base:.3f}×) |"
        )


def report_breakdown(args, parts: dict) -> None:
    """Self time of the operators inside the hooks, by category, from the profiled forwards."""
    what = "device time of the kernels" if args.device.startswith("cuda") else "self CPU time of the operators"
    print(f"\nWhere the Probe's time goes (one profiled forward each; {what} inside its hooks):\n")
    print("| part | " + " | ".join(f"{k}: s (share)" for k in parts) + " |")
    print("|---|" + "---|" * len(parts))
    for cat in CATEGORIES:
        cells = [f"{p['seconds'][cat]:.3f} ({p['seconds'][cat] / p['total']:.0%})" for p in parts.values()]
        print(f"| {cat} | " + " | ".join(cells) + " |")
    print("| **all inside the hooks** | " + " | ".join(f"**{p['total']:.3f}**" for p in parts.values()) + " |")
    print(
        "| non-GEMM share of the hooks' time | "
        + " | ".join(f"{1 - p['seconds']['Gram GEMM'] / p['total']:.0%}" for p in parts.values())
        + " |"
    )
    if args.device.startswith("cuda"):
        print(
            "| host synchronisations inside site hooks / in the end-of-forward flush | "
            + " | ".join(f"{p['syncs']['site-hook']} / {p['syncs']['flush']}" for p in parts.values())
            + " |"
        )


def report_memory(mem: dict[str, dict]) -> None:
    b = mem["plain"]
    print("\n| configuration | peak live heap (MiB) | ratio | peak RSS (MiB) | ratio |\n|---|---|---|---|---|")
    for c, m in mem.items():
        print(
            f"| {c} | {m['heap_peak'] / 2**20:.0f} | {m['heap_peak'] / b['heap_peak']:.3f}× | "
            f"{m['rss_peak'] / 2**20:.0f} | {m['rss_peak'] / b['rss_peak']:.3f}× |"
        )


def report(args, times, parts, mem) -> dict:
    med = report_times(args, times)
    report_floors(med)
    report_breakdown(args, parts)
    if mem:
        report_memory(mem)
    return {"clock": primary_clock(args), "median": med, "times": times, "breakdown": parts, "memory": mem}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seq", type=int, default=256, help="tokens per sequence (batch of 8)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory children")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--memory-child", choices=("plain", "probe", "probe-f32"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args.seq)))
        return
    start = time.perf_counter()
    load0 = os.getloadavg()[0]
    print(
        f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} thread(s), "
        f"batch {BATCH} × {args.seq} tokens, {os.cpu_count()} CPUs, load average {load0:.1f} at start"
    )
    model, ids = build_model(args.seq, args.device)
    times = timings(model, ids, args.reps, args.device)
    parts = {
        "probe": breakdown(model, ids, torch.float64, args.device),
        "probe-f32": breakdown(model, ids, torch.float32, args.device),
    }
    mem = {} if args.no_memory or args.device != "cpu" else memory(args)
    out = report(args, times, parts, mem)
    print(
        f"\nload average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end; "
        f"whole script {time.perf_counter() - start:.0f} s"
    )
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
