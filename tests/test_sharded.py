"""Sharded activations, two gloo ranks on CPU: tensor-parallel Grams summed from partial Grams,
sequence parallelism refused (and measured whole by the Probe), FSDP2 records per rank, each
against the same computation in one process."""

from __future__ import annotations

import copy
import math
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from isoprobe import Probe
from isoprobe.records import Record

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, timeout: float = 180.0) -> None:
    """Run ``fn(rank, world, port)`` in 2 processes (gloo, 127.0.0.1); fail after ``timeout``."""
    context = mp.start_processes(fn, args=(2, _free_port()), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for p in context.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"the two ranks did not finish within {timeout:.0f} s")


def _group(rank: int, world: int, port: int):
    from torch.distributed.device_mesh import init_device_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    return init_device_mesh("cpu", (world,))


def _same(a: list[Record], b: list[Record], rel: float = 1e-9) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        for name, u in x.to_dict().items():
            v = getattr(y, name)
            if isinstance(u, float) and math.isfinite(u):
                assert math.isclose(u, v, rel_tol=rel, abs_tol=1e-12), (x.key, name, u, v)
            else:
                assert u == v, (x.key, name, u, v)


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16), nn.LayerNorm(16)).eval()


def _tensor_and_sequence_parallel(rank: int, world: int, port: int) -> None:
    from torch.distributed.tensor import DTensor, Partial, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from isoprobe.sharded import ShardingRefused, norm_point_grams, token_gaps, token_grams

    mesh = _group(rank, world, port)
    ref = _model()
    tp = parallelize_module(
        copy.deepcopy(ref), mesh, {"0": ColwiseParallel(use_local_output=False), "2": RowwiseParallel()}
    )
    x = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        h, h_ref = tp[0](x), ref[0](x)
        assert h.placements == (Shard(2),) and h.to_local().shape[-1] == 32  # half the hidden dim per rank
        G = h_ref.double() @ h_ref.double().transpose(-1, -2)
        torch.testing.assert_close(token_grams(h), G, rtol=1e-12, atol=1e-12)
        norm = nn.Sequential(nn.LayerNorm(64))  # a LayerNorm over the sharded dimension
        grams = norm_point_grams(h, eps=norm[0].eps)
        with Probe(norm) as probe:  # measured in one process, on the whole activation
            norm(h_ref)
        for point in ("pre", "centered", "normalized"):
            expected = [r.isometry_gap for r in probe.records if r.point == point]
            got = token_gaps(grams[point])
            assert all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(got, expected, strict=True)), point
        # the Probe on the tensor-parallel model: every site's records equal one process's
        with Probe(tp) as on_tp, Probe(ref) as on_ref:
            tp(x), ref(x)
        _same(on_tp["1"], on_ref["1"])  # the GELU, on the column-sharded DTensor
        # the LayerNorm after the row-parallel sum: the model's own float32 activations differ there
        # by the rounding of a sum of two partial products (relative ~1e-7), the records by as much
        _same(on_tp["3"], on_ref["3"], rel=1e-5)
        assert len(on_tp.records) == len(on_ref.records) == 18  # 3 sequences: GELU 2 points, LayerNorm 4
        # sequence parallel: refused without gathering; a Probe measures the gathered value
        tokens = distribute_tensor(h_ref, mesh, [Shard(1)])
        with pytest.raises(ShardingRefused, match="sharded over tokens"):
            token_grams(tokens)
        with pytest.raises(ShardingRefused, match="pending sum"):
            token_grams(DTensor.from_local(h_ref / world, mesh, [Partial()]))
        act, plain = nn.Sequential(nn.GELU()), nn.Sequential(nn.GELU())
        with Probe(act) as on_sp, Probe(plain) as on_plain:
            act(tokens), plain(h_ref)
        _same(on_sp.records, on_plain.records)
    torch.distributed.destroy_process_group()


def test_tensor_parallel_grams_are_exact_and_sequence_parallel_is_refused():
    _spawn(_tensor_and_sequence_parallel)


def _fsdp2(rank: int, world: int, port: int) -> None:
    from torch.distributed.fsdp import fully_shard

    mesh = _group(rank, world, port)
    ref = _model()
    sharded = copy.deepcopy(ref)
    for layer in (sharded[0], sharded[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(10 + rank))  # each rank its own batch
    with torch.no_grad(), Probe(sharded) as on_fsdp, Probe(ref) as on_ref:
        sharded(x), ref(x)
    assert any(p.to_local().numel() < p.numel() for p in sharded.parameters())  # parameters really sharded
    _same(on_fsdp.records, on_ref.records)
    torch.distributed.destroy_process_group()


def test_fsdp2_records_equal_one_process_on_each_ranks_batch():
    _spawn(_fsdp2)
