"""Beyond one GPU: runs spread over ranks (torchrun), and the sample Gram of a global batch.

Run the training reproductions on several GPUs or machines with ``torchrun``::

    torchrun --nproc_per_node=4 -m isoprobe.distributed fig7 fig2-trained --out results/
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
        -m isoprobe.distributed all --out results/

(options as ``isoprobe repro``: ``--quick``, ``--runs``, ``--seed``, ``--data``). Each rank
takes a share of the runs (:func:`shard_runs`) and trains them as one batched ensemble on its
own GPU (``cuda:LOCAL_RANK``; gloo on CPU-only hosts). The rows every rank produced are
all-gathered (:func:`gather_rows`), so every rank decides the same verdict; rank 0 writes
``NAME.csv/png/json`` into ``--out``, rank ``r > 0`` writes its identical copy and its
checkpoints into ``--out/.rank{r}/``. Sharding does not change the computation: a run's
weights and data order depend on its global run index only (:mod:`isoprobe.training`); the
numbers can differ only by the rounding of batched kernels of another batch count (on the CPU,
2 ranks gave byte-identical CSVs to 1 process in our check). A reproduction
that trains nothing runs whole on every rank. Resuming after an interruption needs the same
world size (the checkpoints are per rank).

**Global-batch Gram under DistributedDataParallel.** Each rank sees ``n`` of the batch's
``world · n`` samples; the paper's sample Gram is over the whole batch.
:func:`all_gather_features` gathers the features of every rank (no gradient, unequal
per-rank batch sizes allowed) and :func:`global_sample_gram` forms the Gram of the gathered
batch. Where a :class:`~isoprobe.hooks.Probe` should use it: in its site hook, replace the
activation and output by ``all_gather_features(x, same_size=...)`` before forming the items of
the sample (or feature) view, on every rank; every rank then records the same sites at the
same steps, as the gathers are collective. (The Probe does not do this yet.)

Outside ``torchrun`` (no process group) every function is the single-process identity:
rank 0 of 1, all runs here, rows and features unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.distributed as dist

from isoprobe.metrics import gram

__all__ = [
    "agree_min",
    "all_gather_features",
    "gather_rows",
    "global_sample_gram",
    "main",
    "rank_world",
    "shard_runs",
]


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` without a process group."""
    return (dist.get_rank(), dist.get_world_size()) if _active() else (0, 1)


def shard_runs(runs: int, rank: int | None = None, world: int | None = None) -> list[int]:
    """The global run indices ``rank`` trains: a contiguous share, sizes differing by at most 1.

    The shares of ranks ``0..world-1`` partition ``0..runs-1`` in order. A rank may get none
    when ``runs < world``.
    """
    if rank is None or world is None:
        rank, world = rank_world()
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 0:
        raise ValueError(f"runs must be an integer >= 0, got {runs!r}")
    if not 0 <= rank < world:
        raise ValueError(f"rank must lie in 0..{world - 1}, got {rank}")
    base, extra = divmod(runs, world)
    start = rank * base + min(rank, extra)
    return list(range(start, start + base + (rank < extra)))


def _device_for_collectives() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_rows(rows: Sequence[dict]) -> list[dict]:
    """Every rank's rows, concatenated in rank order, on every rank (``all_gather_object``)."""
    rows = list(rows)
    if not _active():
        return rows
    parts: list[list[dict] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, rows)
    return [r for part in parts for r in (part or [])]


def agree_min(value: int) -> int:
    """The minimum of an integer over all ranks (e.g. the last epoch every rank finished)."""
    if not _active():
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64, device=_device_for_collectives())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


@torch.no_grad()
def all_gather_features(x: torch.Tensor, same_size: bool = False) -> torch.Tensor:
    """The batches of all ranks, ``(Σ_r n_r, ...)`` in rank order, on every rank; no gradient.

    ``x``: this rank's activation ``(n_r, ...)``; the ``n_r`` may differ between ranks (the last
    batch of an epoch), the other dimensions may not. Exchanging the sizes costs one host
    synchronisation; ``same_size=True`` (every rank's batch has the same size, as under
    ``DistributedDataParallel`` with ``drop_last``) skips it, so a forward hook on a GPU does not
    stall. Collective: every rank must call it, with the same ``same_size``.
    """
    x = x.detach()
    if not _active():
        return x
    if x.ndim < 1:
        raise ValueError("x must have a batch dimension")
    world = dist.get_world_size()
    if same_size:
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)
    n = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    counts = [int(s.item()) for s in sizes]
    padded = x.new_zeros((max(counts), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:c] for p, c in zip(parts, counts)])


def global_sample_gram(x: torch.Tensor, dtype: torch.dtype = torch.float64, same_size: bool = False) -> torch.Tensor:
    """Sample Gram ``G_ij = <x_i, x_j>`` over the global batch (every rank's samples, flattened).

    ``(N, N)`` with ``N = Σ_r n_r``, samples ordered by rank; :func:`isoprobe.metrics.gram`
    in ``dtype`` (float64 by default, as the spectrum needs). ``same_size``: as in
    :func:`all_gather_features`.
    """
    xs = all_gather_features(x, same_size=same_size)
    return gram(xs.reshape(xs.shape[0], -1), dtype=dtype)


def main(argv: Sequence[str] | None = None) -> None:
    """``torchrun ... -m isoprobe.distributed NAME... --out DIR``: reproductions with runs sharded."""
    import argparse
    from pathlib import Path

    from isoprobe.experiments import run_reproductions

    p = argparse.ArgumentParser(prog="torchrun ... -m isoprobe.distributed", description=main.__doc__)
    p.add_argument("names", nargs="+", help="reproduction names (or all)")
    p.add_argument("--out", default="results")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--runs", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default="auto")
    args = p.parse_args(argv)
    if "RANK" not in os.environ:
        p.error("start it with torchrun (RANK/WORLD_SIZE unset); on one process use `isoprobe repro`")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        rank, _ = rank_world()
        out = Path(args.out) if rank == 0 else Path(args.out) / f".rank{rank}"
        run_reproductions(args.names, quick=args.quick, runs=args.runs, seed=args.seed, data=args.data,
                          device="cuda" if cuda else "cpu", out_dir=out, show_progress=rank == 0,
                          echo=print if rank == 0 else (lambda _msg: None))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
