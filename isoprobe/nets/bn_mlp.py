"""Batch-norm MLPs of Meterez et al. (2024, §3, eq. 4) and Daneshmand et al. (2021).

One block per layer, ``ℓ = 1..L``, on a batch ``H ∈ R^{n×d}`` (samples as rows, as torch
keeps them; the papers write the transpose)::

    H_ℓ = norm(σ(γ_ℓ · H_{ℓ-1} W_ℓᵀ)),      logits = H_L W_outᵀ

* weights ``W_ℓ``: Haar (semi-)orthogonal (:func:`haar_orthogonal_`, Meterez et al.) or
  Gaussian ``N(0, 1/fan_in)`` (:func:`gaussian_`, Daneshmand et al.'s ``1/sqrt(d)`` scaling).
  The read-out ``W_out`` is drawn the same way. No biases.
* ``norm``: ``"rms"`` — :class:`RMSBatchNorm`, batch norm without mean reduction (Meterez
  et al. eq. 4): each feature divided by its RMS over the batch; ``"batchnorm"`` —
  ``torch.nn.BatchNorm1d`` (mean reduction, affine at its identity initialisation, batch
  statistics in training mode, which is the mode these nets are studied in); ``"none"``.
* activation shaping (Meterez et al. §5, App. E): ``σ(γ_ℓ x)`` with
  ``γ_ℓ = gain · ℓ^(-gain_exponent)`` (:func:`isoprobe.theory.batchnorm.shaped_gains`). The
  extracted App. E lost its formulas; what we inferred, from its text and the authors' code:
  the gain multiplies the pre-activation, it decays as a power of the 1-based layer index,
  ``gain_exponent = 0`` is no shaping. The activation sits before the norm, as Meterez et al. §3
  writes the chain (``BN(σ(W H))``); the authors' code for their Fig. 5 applies σ after the
  norm instead. With the identity activation the order is immaterial.

Every piece is a real ``nn.Module`` with a stable name (``blocks.3.fc``, ``blocks.3.act``,
``blocks.3.norm``, ``readout``) so that forward hooks can watch it. For the feature view of
a batch-norm site (Corollary 3 of Joudaki et al.) pass ``H.T`` — features as items — to
:mod:`isoprobe.metrics`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from isoprobe.activations import ActivationLike, get_activation
from isoprobe.theory.batchnorm import shaped_gains

__all__ = [
    "BNMLP",
    "NORMS",
    "RMSBatchNorm",
    "ShapedActivation",
    "WEIGHTS",
    "first_layer_grad_log_norms",
    "gaussian_",
    "haar_orthogonal_",
]

WEIGHTS = ("orthogonal", "gaussian")
NORMS = ("rms", "batchnorm", "none")

WeightLaw = Literal["orthogonal", "gaussian"]
NormKind = Literal["rms", "batchnorm", "none"]


def _check_weight(weight: torch.Tensor) -> torch.Tensor:
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise ValueError("weight must be a 2-D tensor shaped (out_features, in_features)")
    if not weight.dtype.is_floating_point:
        raise ValueError(f"weight must be floating point, got {weight.dtype}")
    return weight


@torch.no_grad()
def haar_orthogonal_(weight: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Fill ``weight`` (out × in) in place with a Haar-random (semi-)orthogonal matrix.

    QR of a standard Gaussian ``Z`` (tall orientation), then ``Q ← Q · diag(sign(diag R))``
    (Mezzadri 2007): without the sign correction the factor is not Haar distributed. For a
    non-square weight the result has orthonormal rows (out ≤ in) or columns (out > in), and
    is uniform on that Stiefel manifold. Sampled in float64, then cast.
    """
    weight = _check_weight(weight)
    rows, cols = weight.shape
    tall = (max(rows, cols), min(rows, cols))
    Z = torch.randn(tall, dtype=torch.float64, generator=generator)
    Q, R = torch.linalg.qr(Z)
    signs = torch.sign(R.diagonal())
    signs[signs == 0] = 1.0  # a zero pivot has probability 0; keep Q orthogonal regardless
    Q = Q * signs
    weight.copy_(Q if rows >= cols else Q.T)
    return weight


@torch.no_grad()
def gaussian_(weight: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Fill ``weight`` (out × in) in place with iid ``N(0, 1/in)`` entries."""
    weight = _check_weight(weight)
    Z = torch.randn(weight.shape, dtype=torch.float64, generator=generator)
    weight.copy_(Z / weight.shape[1] ** 0.5)
    return weight


_INITS: dict[str, Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]] = {
    "orthogonal": haar_orthogonal_,
    "gaussian": gaussian_,
}


class RMSBatchNorm(nn.Module):
    """Batch norm without mean reduction (Meterez et al. eq. 4; Daneshmand et al. 2021).

    For a batch ``x`` shaped ``(n, d)``: ``y_ij = x_ij / sqrt((1/n) Σ_k x_kj² + eps)``: each
    feature (column) divided by its root mean square over the batch. No affine part, no running
    statistics. ``eps = 0`` (the default) keeps the map exactly scale invariant as analysed. A
    feature that is zero on the whole batch (ReLU without mean reduction makes them) has no
    direction to keep: it stays zero and passes a zero gradient, rather than turning into NaN.
    """

    isoprobe_site = "norm"  # seen by isoprobe.Probe as a feature-view norm (Corollary 3)
    norm_rule = "batch-rms"

    def __init__(self, eps: float = 0.0) -> None:
        super().__init__()
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps!r}")
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[0] < 2:
            raise ValueError(f"RMSBatchNorm expects a batch shaped (n, d) with n >= 2, got {tuple(x.shape)}")
        ms = x.square().mean(0, keepdim=True) + self.eps
        alive = ms > 0
        return x * torch.where(alive, torch.rsqrt(torch.where(alive, ms, 1.0)), 0.0)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


class ShapedActivation(nn.Module):
    """``σ(γ x)`` with a fixed pre-activation gain ``γ`` (Meterez et al., §5 and App. E)."""

    isoprobe_site = "activation"  # seen by isoprobe.Probe

    def __init__(self, activation: ActivationLike, gain: float = 1.0) -> None:
        super().__init__()
        act = get_activation(activation)
        self.name = act.name
        self.fn = act.fn
        self.gain = float(gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.gain * x)

    def extra_repr(self) -> str:
        return f"{self.name}, gain={self.gain:.6g}"


class BNBlock(nn.Module):
    """One layer ``norm(σ(γ · x Wᵀ))``: modules ``fc``, ``act``, ``norm``."""

    def __init__(self, fc: nn.Linear, act: ShapedActivation, norm: nn.Module) -> None:
        super().__init__()
        self.fc = fc
        self.act = act
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(self.fc(x)))


def _make_norm(norm: str, width: int, dtype: torch.dtype) -> nn.Module:
    if norm == "rms":
        return RMSBatchNorm()
    if norm == "batchnorm":
        return nn.BatchNorm1d(width, dtype=dtype)
    return nn.Identity()


class BNMLP(nn.Module):
    """The batch-norm MLP of Meterez et al. (2024, §3) (see the module docstring for the exact map).

    Args:
        d_in: input dimension (inputs shaped ``(n, ...)`` are flattened to ``(n, d_in)``).
        width: hidden width ``d``.
        depth: number of blocks ``L ≥ 1``.
        d_out: read-out dimension (classes).
        weights: ``"orthogonal"`` (Haar) or ``"gaussian"`` (``N(0, 1/fan_in)``).
        norm: ``"rms"``, ``"batchnorm"`` or ``"none"``.
        activation: a name known to :func:`isoprobe.activations.get_activation` or a callable.
        gain, gain_exponent: activation shaping ``γ_ℓ = gain · ℓ^(-gain_exponent)``.
        generator: a ``torch.Generator`` for reproducible weights.
        dtype: parameter dtype (float64 for measurements near isometry).
    """

    def __init__(
        self,
        d_in: int,
        width: int,
        depth: int,
        d_out: int = 10,
        *,
        weights: WeightLaw = "orthogonal",
        norm: NormKind = "rms",
        activation: ActivationLike = "identity",
        gain: float = 1.0,
        gain_exponent: float = 0.0,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        for name, value in (("d_in", d_in), ("width", width), ("depth", depth), ("d_out", d_out)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be floating point, got {dtype}")
        gains = shaped_gains(depth, gain, gain_exponent)
        self.d_in, self.width, self.depth, self.d_out = d_in, width, depth, d_out
        self.weight_law, self.norm_kind = weights, norm
        init = _INITS[weights]

        def linear(fan_in: int, fan_out: int) -> nn.Linear:
            fc = nn.Linear(fan_in, fan_out, bias=False, dtype=dtype)
            init(fc.weight, generator)
            return fc

        self.blocks = nn.ModuleList(
            BNBlock(
                linear(d_in if ell == 0 else width, width),
                ShapedActivation(activation, float(gains[ell])),
                _make_norm(norm, width, dtype),
            )
            for ell in range(depth)
        )
        self.readout = linear(width, d_out)

    def _flatten(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.ndim < 2:
            raise ValueError("input must be a tensor shaped (n, ...) with the batch first")
        x = x.reshape(x.shape[0], -1)
        if x.shape[1] != self.d_in:
            raise ValueError(f"input has {x.shape[1]} features per sample, the net expects {self.d_in}")
        if x.shape[0] < 2 and self.norm_kind != "none":
            raise ValueError(f"batch norm needs a batch of n >= 2 samples, got n = {x.shape[0]}")
        return x.to(self.readout.weight.dtype)

    def hidden(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Representations ``[H_0, H_1, ..., H_L]`` (``H_0`` the flattened input), each ``(n, ·)``."""
        hs = [self._flatten(x)]
        for block in self.blocks:
            hs.append(block(hs[-1]))
        return hs

    def logits_by_depth(self, x: torch.Tensor, depths: Iterable[int]) -> dict[int, torch.Tensor]:
        """Logits of the nested nets made of the first ``ℓ`` blocks and the shared read-out.

        One forward pass serves every ``ℓ`` in ``depths`` (each ``1 ≤ ℓ ≤ L``); the depth-``ℓ``
        net has exactly the law of a fresh ``BNMLP(depth=ℓ)``.
        """
        wanted = sorted(set(depths))
        if not wanted or wanted[0] < 1 or wanted[-1] > self.depth:
            raise ValueError(f"depths must lie in 1..{self.depth}, got {wanted}")
        hs = self.hidden(x)
        return {ell: self.readout(hs[ell]) for ell in wanted}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(self.hidden(x)[-1])


def first_layer_grad_log_norms(net: BNMLP, x: torch.Tensor, labels: torch.Tensor, depths: Iterable[int]) -> np.ndarray:
    """``log ‖∇_{W_1} L‖_F`` of the nested depth-``ℓ`` nets, for each ``ℓ`` in ``sorted(depths)``.

    ``L`` is the mean cross-entropy (a Lipschitz loss, Meterez et al. Lemma C.2) of the
    read-out logits against integer ``labels``; ``W_1`` is the first block's weight, the one
    Meterez et al. Theorem 5 and Fig. 3 differentiate. One forward pass, one backward per depth.
    Returns float64 log-norms; ``-inf`` for a zero gradient, never NaN for finite inputs.
    """
    labels = torch.as_tensor(labels)
    if labels.ndim != 1 or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError("labels must be a 1-D integer tensor of class indices")
    if labels.numel() and (labels.min() < 0 or labels.max() >= net.d_out):
        raise ValueError(f"labels must lie in 0..{net.d_out - 1}")
    logits = net.logits_by_depth(x, depths)
    if labels.shape[0] != next(iter(logits.values())).shape[0]:
        raise ValueError("labels must have one entry per sample of x")
    weight = net.blocks[0].fc.weight
    out = []
    for ell in sorted(logits):
        loss = F.cross_entropy(logits[ell], labels.long())
        (grad,) = torch.autograd.grad(loss, weight, retain_graph=ell != max(logits))
        out.append(torch.linalg.vector_norm(grad.double()).log().item())
    result = np.asarray(out, dtype=np.float64)
    if np.isnan(result).any():
        raise FloatingPointError("the gradient norm is NaN: the forward pass produced NaN (an all-zero feature?)")
    return result
