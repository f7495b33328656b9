"""Peak extra memory of the Probe on a model split by accelerate (CPU + disk offload), against the
plain forward of the same split model; side by side, each configuration in a fresh child process.

Setup: random-init BERT (hidden 512, 4 layers, FFN 2048), saved, then loaded with
``device_map`` = embeddings and layers 0–1 on the CPU, layers 2–3 and the pooler offloaded to the
disk (weights read into memory only for their block's forward); batch 8 × 256 tokens,
``torch.no_grad``, one torch thread. Each child runs one plain forward (warm-up), then samples
the live glibc heap (``mallinfo2``) every 0.5 ms during the measured forward (plain, or under
``Probe(model)`` with float64 Grams); *extra* = peak − heap before that forward.

The Probe's share is ``probe extra − plain extra``; it is compared with what one site needs: the
largest site's items in float64 (``B·T·d·8`` bytes, d = 2048 at the FFN activation) plus its
Grams (``B·T²·8`` per point), and with what all sites would need at once.

    python bench/bench_offload.py [--reps 3] [--seq 256]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import torch
from bench_probe import heap_bytes

HIDDEN, LAYERS, FFN, BATCH = 512, 4, 2048, 8
SPLIT = {"embeddings": "cpu", "encoder.layer.0": "cpu", "encoder.layer.1": "cpu", "encoder.layer.2": "disk"}
SPLIT |= {"encoder.layer.3": "disk", "pooler": "disk"}


def save_model(folder: str) -> None:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, intermediate_size=FFN, num_attention_heads=8)
    BertModel(config).save_pretrained(folder)


def child(config: str, folder: str, seq: int) -> dict:
    from transformers import AutoModel

    from isoprobe import Probe

    torch.set_num_threads(1)
    model = AutoModel.from_pretrained(folder, device_map=SPLIT, offload_folder=f"{folder}/offload").eval()
    ids = torch.randint(0, 30000, (BATCH, seq), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(input_ids=ids)
        before, peak, done = heap_bytes(), [0], threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], heap_bytes())
                time.sleep(0.0005)

        thread = threading.Thread(target=sample)
        thread.start()
        t0 = time.process_time()
        if config == "probe":
            with Probe(model) as probe:
                model(input_ids=ids)
            sites = len({r.site for r in probe.records})
        else:
            model(input_ids=ids)
            sites = 0
        cpu = time.process_time() - t0
        done.set()
        thread.join()
    return {"extra": peak[0] - before, "cpu_s": cpu, "sites": sites}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--child", nargs=2, metavar=("CONFIG", "FOLDER"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.seq)))
        return
    with tempfile.TemporaryDirectory() as folder:
        save_model(folder)
        runs: dict[str, list[dict]] = {"plain": [], "probe": []}
        for _ in range(args.reps):
            for config in runs:  # interleaved
                command = [sys.executable, __file__, "--child", config, folder, "--seq", str(args.seq)]
                out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
                runs[config].append(json.loads(out.strip().splitlines()[-1]))
    report(runs, args)


def report(runs: dict[str, list[dict]], args) -> None:
    mib = 2**20
    extra = {c: statistics.median(r["extra"] for r in rs) for c, rs in runs.items()}
    seq, sites = args.seq, runs["probe"][0]["sites"]
    one_site = BATCH * seq * FFN * 8 + 2 * BATCH * seq * seq * 8  # FFN activation: items, 2 Grams
    per_norm = BATCH * seq * HIDDEN * 8 + 4 * BATCH * seq * seq * 8
    print(f"\n| configuration | peak extra heap, MiB (median of {args.reps}) | runs | CPU s |")
    print("|---|---|---|---|")
    for c, rs in runs.items():
        shown = ", ".join(f"{r['extra'] / mib:.1f}" for r in rs)
        print(f"| {c} | {extra[c] / mib:.1f} | {shown} | {statistics.median(r['cpu_s'] for r in rs):.2f} |")
    share = extra["probe"] - extra["plain"]
    every = LAYERS * one_site + (2 * LAYERS + 1) * per_norm
    print(
        f"\nProbe's share (probe − plain): {share / mib:.1f} MiB = {share / one_site:.2f}× what the largest site "
        f"needs ({one_site / mib:.1f} MiB: the FFN activation's float64 items and 2 Grams; a LayerNorm site "
        f"{per_norm / mib:.1f} MiB) and {share / every:.2f}× what all {sites} sites would need at once ({every / mib:.0f} MiB)"
    )


if __name__ == "__main__":
    main()
