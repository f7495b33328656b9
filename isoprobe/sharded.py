"""Token Grams of activations sharded across processes (DTensor), without gathering them.

Under tensor parallelism (``torch.distributed.tensor.parallel.parallelize_module``, e.g.
``ColwiseParallel(use_local_output=False)``) a site's activation ``X`` of shape ``(B, T, d)`` is a
DTensor sharded on the hidden dimension: rank ``r`` holds the columns ``X_r`` (``d_r`` of them).
The token Gram of sequence ``b`` (Joudaki et al. 2023, arXiv:2310.02012, Definition 1) is a sum
over the shards,

    G = X Xᵀ = Σ_r X_r X_rᵀ,

so an all-reduce (sum) of the ranks' partial Grams, ``B·T²`` numbers, gives every rank the exact
Gram without gathering the ``B·T·d`` activations. A norm's points are exact the same way:

* ``pre``: ``G`` as above;
* ``centered`` (LayerNorm): each token's mean over the hidden dimension ``μ_t = (1/d) Σ_r s_{r,t}``
  from an all-reduce of the shards' row sums ``s_r = X_r 1``; each rank centres its own columns
  with it and the partial Grams of the centred columns are summed: ``G_c = Σ_r (X_r − μ1ᵀ)(X_r − μ1ᵀ)ᵀ``
  (RMSNorm does not centre: ``G_c = G``);
* ``normalized``: ``x_t / sqrt(σ_t² + eps)`` with ``σ_t² = (G_c)_tt / d`` (the biased variance
  LayerNorm uses; mean square for RMSNorm), so ``G_n = D G_c D`` with ``D = diag(1/sqrt(σ² + eps))``:
  a scaling of ``G_c``, no further communication.

These are the Grams of the whole activation up to the order of the summation (float64 by default).

**Sequence parallelism** (tokens sharded, ``Shard(T-dim)``) is refused here with
:class:`ShardingRefused`: rank ``r`` holds the rows of its tokens only, so its partial products give
the diagonal blocks of ``G`` (and each token's norm, mean and variance, exactly), but the
off-diagonal blocks ``⟨x_t, x_u⟩`` between tokens on different ranks need one rank's activations on
the other; no determinant, isometry or Theorem 1 check can be had without them. A
:class:`~isoprobe.hooks.Probe` on a parallelized model measures any DTensor activation through
:func:`whole` (the full value, gathered: exact, at the cost of one site's activation on every rank).

**Batch sharding** (``Shard(0)``): each rank's Grams are those of its own sequences (as under
DDP/FSDP2, where activations are whole per rank); ``Replicate``: the local tensor is the whole one.
A pending sum (``Partial``) and meshes of more than one dimension are refused.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from isoprobe.metrics import isometry_gap

__all__ = ["ShardingRefused", "is_dtensor", "norm_point_grams", "token_gaps", "token_grams", "whole"]


class ShardingRefused(ValueError):
    """The activation's layout does not allow the exact Gram without gathering it."""


def is_dtensor(x: object) -> bool:
    """Is ``x`` a DTensor (without importing ``torch.distributed.tensor``)?"""
    module = sys.modules.get("torch.distributed.tensor")  # not imported: no DTensor can exist
    return module is not None and isinstance(x, module.DTensor)


def whole(x: torch.Tensor | None) -> torch.Tensor | None:
    """A DTensor's full value as a plain tensor on every rank (``full_tensor()``: a collective);
    any other value unchanged."""
    return x.full_tensor() if is_dtensor(x) else x


def _layout(x: torch.Tensor) -> tuple[torch.Tensor, dist.ProcessGroup | None]:
    """``(local tensor (B, T, d_r), the group to sum partial Grams over or None)``."""
    from torch.distributed.tensor import Replicate, Shard

    if not is_dtensor(x):
        local = x
        group = None
    else:
        if x.device_mesh.ndim != 1:
            raise ShardingRefused(f"a DTensor on a {x.device_mesh.ndim}-D device mesh: only 1-D meshes are supported")
        (placement,) = x.placements
        local, group = x.to_local(), None
        if isinstance(placement, Shard):
            dim = placement.dim % x.ndim
            if dim == x.ndim - 1:
                group = x.device_mesh.get_group()
            elif dim == x.ndim - 2:
                raise ShardingRefused(
                    "the activation is sharded over tokens (sequence parallel): the token Gram's entries "
                    "between tokens on different ranks need those tokens' activations, so it cannot be "
                    "summed from partial Grams; measure before the sequence is split, or with a Probe, "
                    "which gathers DTensor activations (isoprobe.sharded.whole)"
                )
        elif not isinstance(placement, Replicate):
            raise ShardingRefused(
                f"the activation is a pending sum ({placement}, not yet reduced over the ranks): its Gram is not the sum "
                "of the ranks' Grams; redistribute it to Replicate() or Shard(-1) first"
            )
    if local.ndim == 2:
        local = local[None]
    if local.ndim != 3:
        raise ValueError(f"expected an activation (B, T, d) or (T, d), got shape {tuple(local.shape)}")
    return local, group


def _summed(t: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(t, group=group)
    return t


def token_grams(x: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The token Grams ``(B, T, T)`` of ``x`` ``(B, T, d)`` (or ``(T, d)``), a tensor or a DTensor
    sharded on the hidden dimension, replicated or sharded on the batch: ``G = Σ_r X_r X_rᵀ``, the
    partial Grams all-reduced (no activation gathered). Collective for a hidden-sharded DTensor."""
    X, group = _layout(x)
    X = X.to(dtype)
    return _summed(X @ X.transpose(-1, -2), group)


def norm_point_grams(
    x: torch.Tensor, eps: float, center: bool = True, dtype: torch.dtype = torch.float64
) -> dict[str, torch.Tensor]:
    """A norm's token Grams at ``pre``, ``centered`` and ``normalized`` (see the module text),
    each ``(B, T, T)``, from partial Grams and partial row sums: exact for a hidden-sharded
    DTensor without gathering it. ``center``: LayerNorm (True) or RMSNorm (False); ``eps``: the
    norm's own."""
    X, group = _layout(x)
    X = X.to(dtype)
    d = x.shape[-1]
    grams = {"pre": _summed(X @ X.transpose(-1, -2), group)}
    if center:
        mean = _summed(X.sum(-1, keepdim=True), group) / d
        Xc = X - mean
        grams["centered"] = _summed(Xc @ Xc.transpose(-1, -2), group)
    else:
        grams["centered"] = grams["pre"]
    Gc = grams["centered"]
    scale = (torch.diagonal(Gc, dim1=-2, dim2=-1) / d + eps).rsqrt()
    grams["normalized"] = Gc * scale[..., :, None] * scale[..., None, :]
    return grams


def token_gaps(grams: torch.Tensor, mask: torch.Tensor | None = None) -> list[float]:
    """The isometry gap ``−log I(G)`` of each sequence's Gram in ``grams`` ``(B, T, T)``, over its
    real tokens (``mask`` ``(B, T)``, 1 for a token, 0 for padding; all tokens without it)."""
    gaps = []
    for b, G in enumerate(grams):
        keep = torch.ones(G.shape[-1], dtype=torch.bool) if mask is None else mask[b].bool().cpu()
        gaps.append(float(isometry_gap(G[keep][:, keep])))
    return gaps
