"""Beyond one GPU: runs spread over ranks (torchrun), and the sample Gram of a global batch.

Run the reproductions on several GPUs or machines with ``torchrun`` and ``isoprobe repro``
(``python -m isoprobe`` is the same command line)::

    torchrun --nproc_per_node=4 -m isoprobe repro fig7 fig2-trained --out results/
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
        -m isoprobe repro all --out results/

The command line opens the process group (:func:`torchrun_group`: nccl on ``cuda:LOCAL_RANK``,
gloo on CPU-only hosts). The reproduction runner deals a reproduction's units round-robin
to the ranks, runs each inside :func:`local_only` (a unit is one rank's work), gathers their
rows on rank 0 (:func:`gather_rows`), and rank 0 alone writes ``STEM.csv/png/json``.
:func:`shard_runs` and :func:`agree_min` serve code that spreads its own runs over the ranks
outside the runner (:mod:`isoprobe.training` agrees on the checkpoint epoch with
:func:`agree_min`). Sharding does not change the computation: a run's weights and data order
depend on its global run index only; the numbers can differ only by the rounding of batched
kernels of another batch count.

**Global-batch Gram under DistributedDataParallel.** Each rank sees ``n`` of the batch's
``world · n`` samples; the paper's sample Gram is over the whole batch.
:func:`all_gather_features` gathers the features of every rank (no gradient, unequal
per-rank batch sizes allowed) and :func:`global_sample_gram` forms the Gram of the gathered
batch. Where a :class:`~isoprobe.hooks.Probe` should use it: in its site hook, replace the
activation and output by ``all_gather_features(x, same_size=...)`` before forming the items of
the sample (or feature) view, on every rank; every rank then records the same sites at the
same steps, as the gathers are collective. ``Probe(model, gather=True)`` does this.

Outside ``torchrun`` (no process group) every function is the single-process identity:
rank 0 of 1, all runs here, rows and features unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
import torch.distributed as dist

from isoprobe import outlock
from isoprobe.metrics import gram
from isoprobe.records import RunningSummary

__all__ = [
    "agree_min",
    "all_gather_features",
    "broadcast_object",
    "gather_to_root",
    "gather_rows",
    "global_sample_gram",
    "hold_folder_on_root",
    "launched_by_torchrun",
    "local_only",
    "merge_summaries",
    "rank_world",
    "shard_runs",
    "torchrun_group",
]


_LOCAL = [False]  # inside local_only(): every helper acts as in a single process


def _active() -> bool:
    return not _LOCAL[0] and dist.is_available() and dist.is_initialized()


@contextmanager
def local_only() -> Iterator[None]:
    """Inside the body every function here is the single-process identity, even under a process
    group: for work one rank does alone (a reproduction's unit), whose inner calls of
    :func:`agree_min`, :func:`gather_rows` or a gathering Probe must not wait for the other ranks."""
    before, _LOCAL[0] = _LOCAL[0], True
    try:
        yield
    finally:
        _LOCAL[0] = before


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


def gather_to_root(obj: Any, root: int = 0) -> list[Any] | None:
    """Every rank's ``obj`` in rank order on rank ``root`` (``gather_object``), ``None`` on the
    others; ``[obj]`` without a group. Unlike :func:`gather_rows` only ``root`` holds them all."""
    if not _active():
        return [obj]
    rank = dist.get_rank()
    parts: list[Any] | None = [None] * dist.get_world_size() if rank == root else None
    dist.gather_object(obj, parts, dst=root)
    return parts


def merge_summaries(running: RunningSummary, root: int = 0) -> RunningSummary | None:
    """The running summaries of all ranks merged into one on rank ``root`` (``None`` elsewhere):
    per (site, call, point) the counts added and the means and variances combined exactly by
    Chan et al.'s pairwise formulas (:meth:`isoprobe.records.RunningSummary.merge`), ranks in
    order; equal, to rounding, to one summary of every rank's records. Collective."""
    parts = gather_to_root(running, root)
    if parts is None:
        return None
    merged = RunningSummary()
    for part in parts:
        merged.merge(part)
    return merged


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (``broadcast_object_list``); ``obj`` itself without a group."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@contextmanager
def hold_folder_on_root(folder: Any, rank: int, command: str, notify: Any) -> Iterator[None]:
    """Rank 0 holds ``folder`` (:func:`isoprobe.outlock.hold_folder`) for the block; a refusal
    reaches every rank as :class:`~isoprobe.outlock.FolderBusy` (collective, like every call here)."""
    with ExitStack() as stack:
        refusal = None
        if rank == 0:
            try:
                stack.enter_context(outlock.hold_folder(folder, command, notify))
            except outlock.FolderBusy as error:
                refusal = str(error)
        refusal = broadcast_object(refusal)
        if refusal is not None:
            raise outlock.FolderBusy(refusal)
        yield


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


def launched_by_torchrun() -> bool:
    """Was this process started by ``torchrun`` with more than one process (``WORLD_SIZE > 1``)?"""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextmanager
def torchrun_group() -> Iterator[tuple[int, int]]:
    """Under ``torchrun`` (``WORLD_SIZE > 1`` in the environment) open the default process
    group for the body and close it after: nccl on ``cuda:LOCAL_RANK`` where CUDA is available,
    else gloo. Yields ``(rank, world)``; ``(0, 1)`` and nothing opened outside torchrun."""
    if not launched_by_torchrun() or _active():
        yield rank_world()
        return
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield rank_world()
    finally:
        dist.destroy_process_group()
