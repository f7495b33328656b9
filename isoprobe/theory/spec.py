"""One declaration of the LayerNorm MLP of Joudaki et al. (2023) eq. (1) and its variants.

A :class:`LNMLPSpec` is a small frozen record. The same record drives all three views of the
network, so they cannot drift apart:

* the simulated net, a real ``nn.Module`` (:class:`isoprobe.nets.LNMLP`), whose activation and
  norm modules call this record's :meth:`LNMLPSpec.act_map` and :meth:`LNMLPSpec.norm_map`;
* the fast exact sampler and the dense reference (:func:`isoprobe.theory.simulate`), which call
  the same two maps on batched tensors;
* the mean-field recursion (:func:`isoprobe.theory.mean_field_grams`), which reads the same
  switches and the same per-layer constants (:meth:`LNMLPSpec.plan`).

The network, on a batch of ``n`` items stacked as rows (``x ∈ R^{n×d}``)::

    x_0     = LN(x)                                     input: always centred and projected
    h_ℓ     = x_ℓ W_ℓᵀ                                  fc,  W_ℓ ∈ R^{d_ℓ × d_{ℓ-1}}
    x_{ℓ+1} = norm(σ(α h_ℓ))        order "act-norm"    (the paper's eq. 1)
    x_{ℓ+1} = σ(α norm(h_ℓ))        order "norm-act"

with ``norm = projection ∘ centering`` applied to each item over its features:

* centering ``"layer"``: ``a − mean(a)``; ``"mean-field"``: ``a − c₀`` with the offset
  ``c₀ = E σ(g z)``; ``"none"``;
* projection ``"layer"``: ``a / sqrt(mean(a²) + eps)``; ``"mean-field"``: ``a / sqrt(σ̄(1))``
  with the scale ``σ̄(1) = Var σ(g z)``; ``"none"``.

``layer``/``layer`` is exactly ``LN`` = ``torch.nn.LayerNorm`` without affine part. The
mean-field constants are taken at the layer's *nominal* pre-activation gain
``g = α · sqrt(d_in · Var W_ij)`` (the pre-activation std when ``x_ℓ`` has unit RMS: ``g = α``
for Gaussian and orthogonal weights). They are activation statistics, so the mean-field
switches exist only for the order ``act-norm``.

Weights (entries of per-entry variance ``v``; ``v · d_in`` is the pre-activation variance of a
unit-RMS input): ``"gaussian"`` iid ``N(0, 1/d_in)``; ``"xavier"`` iid
``N(0, ξ² · 2/(d_in + d_out))`` with ``ξ`` the activation's Xavier gain
(``torch.nn.init.calculate_gain``); ``"orthogonal"`` a Haar-random (semi-)orthogonal matrix
scaled to entry variance ``1/d_in``. No biases.

Widths ``d_1..d_L`` (``d_0`` is the input's): ``"constant"`` all ``width``; ``"growing"``
geometric from ``width/2`` to ``2·width``; ``"narrowing"`` the reverse; ``"alternating"``
``2·width, width/2, 2·width, …``; or an explicit tuple of ``depth`` widths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import NamedTuple

import torch
import torch.nn.functional as F

from isoprobe.activations import Activation, ActivationLike, get_activation
from isoprobe.hermite import ActivationStats, activation_stats, hermite_coefficients

__all__ = [
    "CENTERINGS",
    "LNMLPSpec",
    "LayerPlan",
    "ORDERS",
    "PROJECTIONS",
    "WEIGHTS",
    "WIDTH_SCHEDULES",
]

CENTERINGS = ("layer", "mean-field", "none")
PROJECTIONS = ("layer", "mean-field", "none")
ORDERS = ("act-norm", "norm-act")
WEIGHTS = ("gaussian", "xavier", "orthogonal")
WIDTH_SCHEDULES = ("constant", "growing", "narrowing", "alternating")

# registry name -> torch.nn.init.calculate_gain name, for Xavier weights
_TORCH_GAIN_NAMES = {
    "identity": "linear",
    "he1": "linear",
    "relu": "relu",
    "leaky_relu": "leaky_relu",
    "tanh": "tanh",
    "sigmoid": "sigmoid",
    "selu": "selu",
}


class LayerPlan(NamedTuple):
    """What one layer needs beyond the switches: its widths and its mean-field constants.

    ``preact_var = d_in · Var W_ij`` (1 for Gaussian and orthogonal weights); ``gain`` the
    nominal pre-activation gain ``g = α · sqrt(preact_var)``; ``offset`` and ``scale`` are
    ``c₀`` and ``σ̄(1)`` of ``σ(g z)``, computed only where a mean-field switch uses them
    (``None`` otherwise). ``shift = c₀ − σ(0) = E[σ(g z) − σ(0)]``, with ``offset``: the
    sampler centres as ``(σ(α h) − σ(0)) − shift``, which loses nothing when ``|h|`` is tiny.
    """

    d_in: int
    d_out: int
    preact_var: float
    gain: float
    offset: float | None
    scale: float | None
    shift: float | None = None


def _check_choice(what: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{what} must be one of {', '.join(choices)}; got {value!r}")


def _positive_int(what: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return value


@dataclass(frozen=True)
class LNMLPSpec:
    """The LayerNorm MLP of eq. (1) with every switch of the module docstring.

    The defaults are the paper's network: layer centering and projection after the activation,
    Gaussian weights, constant width, gain 1.
    """

    act: ActivationLike = "relu"
    depth: int = 10
    width: int = 1000
    gain: float = 1.0
    weights: str = "gaussian"
    centering: str = "layer"
    projection: str = "layer"
    order: str = "act-norm"
    widths: str | tuple[int, ...] = "constant"
    xavier_gain: float | None = None
    eps: float = 1e-12
    _stats_cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _positive_int("depth", self.depth)
        _positive_int("width", self.width)
        if not (isinstance(self.gain, (int, float)) and math.isfinite(self.gain) and self.gain != 0):
            raise ValueError(f"gain must be a finite non-zero number, got {self.gain!r}")
        _check_choice("weights", self.weights, WEIGHTS)
        _check_choice("centering", self.centering, CENTERINGS)
        _check_choice("projection", self.projection, PROJECTIONS)
        _check_choice("order", self.order, ORDERS)
        if self.order == "norm-act" and "mean-field" in (self.centering, self.projection):
            raise ValueError(
                "mean-field centering/projection use the activation's statistics c₀ and σ̄(1); "
                "they exist only for order='act-norm' (the norm comes after the activation)"
            )
        if isinstance(self.widths, str):
            _check_choice("widths", self.widths, WIDTH_SCHEDULES)
        else:
            widths = tuple(self.widths)
            if len(widths) != self.depth:
                raise ValueError(f"widths must list depth = {self.depth} widths, got {len(widths)}")
            for w in widths:
                _positive_int("every width", w)
            object.__setattr__(self, "widths", widths)
        if not (isinstance(self.eps, (int, float)) and self.eps >= 0):
            raise ValueError(f"eps must be a number >= 0, got {self.eps!r}")
        get_activation(self.act)  # a bad name fails here, at construction
        if self.weights == "xavier" and self.xavier_gain is None:
            self._torch_xavier_gain()  # likewise for an activation torch has no gain for

    # --- the activation and its statistics -------------------------------------------------

    @cached_property
    def activation(self) -> Activation:
        """The resolved :class:`~isoprobe.activations.Activation`."""
        return get_activation(self.act)

    @property
    def name(self) -> str:
        return self.activation.name

    def _torch_xavier_gain(self) -> float:
        torch_name = _TORCH_GAIN_NAMES.get(self.activation.name)
        if torch_name is None:
            raise ValueError(
                f"torch.nn.init.calculate_gain has no gain for {self.activation.name!r}; "
                f"pass xavier_gain=... (torch knows: {', '.join(_TORCH_GAIN_NAMES)})"
            )
        return float(torch.nn.init.calculate_gain(torch_name))

    @property
    def xavier_gain_value(self) -> float:
        """``ξ`` of Xavier weights: ``xavier_gain`` if given, else torch's gain for the activation."""
        return float(self.xavier_gain) if self.xavier_gain is not None else self._torch_xavier_gain()

    def stats(self, gain: float) -> ActivationStats:
        """Hermite statistics (``c0``, ``c1``, ``var``, ``beta``) of ``σ(gain · z)``, cached."""
        key = float(gain)
        if key not in self._stats_cache:
            self._stats_cache[key] = activation_stats(self.activation, gain=key)
        return self._stats_cache[key]

    def shift(self, gain: float) -> float:
        """``c₀ − σ(0) = E[σ(g z) − σ(0)]``, integrated over the even part of ``σ(g z) − σ(0)``
        (its odd part integrates to exactly 0, so the logistic's shift is exactly 0)."""
        key = ("shift", float(gain))
        if key not in self._stats_cache:
            act = self.activation
            even = Activation(
                f"{act.name} (even part)",
                lambda x: (act.from_origin(x) + act.from_origin(-x)) / 2,
                tuple(sorted({k for p in act.kinks for k in (p, -p)})),
                kinks_known=act.kinks_known,
            )
            self._stats_cache[key] = float(hermite_coefficients(even, 0, gain=key[1])[0])
        return self._stats_cache[key]

    @property
    def beta(self) -> float:
        """Isometry strength ``β`` of ``σ(α ·)`` (Definition 3), the rate of Theorem 4."""
        return float(self.stats(self.gain).beta)

    # --- widths and per-layer constants ---------------------------------------------------

    @property
    def layer_widths(self) -> tuple[int, ...]:
        """``(d_1, …, d_L)``, the output widths of the ``depth`` layers."""
        L, d = self.depth, self.width
        if not isinstance(self.widths, str):
            return self.widths
        if self.widths == "constant":
            return (d,) * L
        if self.widths == "alternating":
            return tuple(2 * d if ell % 2 == 0 else max(1, d // 2) for ell in range(L))
        exps = [0.0] if L == 1 else [-1 + 2 * ell / (L - 1) for ell in range(L)]
        grow = tuple(max(1, round(d * 2.0**e)) for e in exps)
        return grow if self.widths == "growing" else grow[::-1]

    def weight_variance(self, d_in: int, d_out: int) -> float:
        """Per-entry variance of ``W`` (``d_out × d_in``)."""
        if self.weights == "xavier":
            return self.xavier_gain_value**2 * 2.0 / (d_in + d_out)
        return 1.0 / d_in

    def plan(self, in_features: int) -> tuple[LayerPlan, ...]:
        """Per-layer widths and mean-field constants, for inputs of ``in_features`` features."""
        _positive_int("in_features", in_features)
        dims = (in_features, *self.layer_widths)
        out = []
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            pv = self.weight_variance(d_in, d_out) * d_in
            g = self.gain * math.sqrt(pv)
            centred = self.centering == "mean-field"
            offset = float(self.stats(g).c0) if centred else None
            scale = float(self.stats(g).var) if self.projection == "mean-field" else None
            out.append(LayerPlan(d_in, d_out, pv, g, offset, scale, self.shift(g) if centred else None))
        return tuple(out)

    # --- the maps shared by the nn.Module, the sampler and the dense reference -------------

    def input_map(self, x: torch.Tensor) -> torch.Tensor:
        """``x_0 = LN(x)`` over the last (feature) dimension, no affine part."""
        return F.layer_norm(x, (x.shape[-1],), eps=self.eps)

    def input_gram(self, X0: torch.Tensor) -> torch.Tensor:
        """``G_0 = x_0 x_0ᵀ / d_0`` of the normalised input ``x_0 = LN(X0)``, in float64.

        What :meth:`mean_field` starts from: the same ``G_0`` as index 0 of :meth:`simulate`.
        """
        x0 = self.input_map(torch.as_tensor(X0).to(torch.float64))
        return x0 @ x0.mT / x0.shape[-1]

    def act_map(self, h: torch.Tensor) -> torch.Tensor:
        """``σ(α h)`` elementwise."""
        return self.activation.fn(h if self.gain == 1 else self.gain * h)

    def norm_map(self, a: torch.Tensor, layer: LayerPlan) -> torch.Tensor:
        """Centering then projection of each item over its features (last dimension)."""
        if self.centering == "layer" and self.projection == "layer":
            return F.layer_norm(a, (a.shape[-1],), eps=self.eps)
        if self.centering == "layer":
            a = a - a.mean(-1, keepdim=True)
        elif self.centering == "mean-field":
            a = a - layer.offset
        return self._project(a, layer)

    def _project(self, a: torch.Tensor, layer: LayerPlan) -> torch.Tensor:
        if self.projection == "layer":
            return a * torch.rsqrt(a.square().mean(-1, keepdim=True) + self.eps)
        if self.projection == "mean-field":
            return a / math.sqrt(layer.scale)
        return a

    def block_map(self, h: torch.Tensor, layer: LayerPlan) -> torch.Tensor:
        """The representation ``x_{ℓ+1}`` from the pre-activation ``h_ℓ`` of one layer.

        With mean-field centering, ``σ(α h) − c₀`` is computed as ``(σ(α h) − σ(0)) − (c₀ − σ(0))``
        (:meth:`~isoprobe.activations.Activation.from_origin`, ``layer.shift``): equal to
        :meth:`norm_map` of :meth:`act_map` up to rounding, but without its cancellation when
        ``|h|`` is so small that ``σ(α h)`` rounds to ``c₀`` (the logistic without projection
        shrinks 4× per layer and reaches ``|h| ≈ 1e-16`` by layer 26).
        """
        if self.order == "norm-act":
            return self.act_map(self.norm_map(h, layer))
        if self.centering == "mean-field":
            return self._project(self.activation.from_origin(h, self.gain) - layer.shift, layer)
        return self.norm_map(self.act_map(h), layer)

    # --- the two computations of isoprobe.theory, for convenience ----------------------------

    def simulate(self, X0: torch.Tensor, runs: int = 1, method: str = "sampler", **kwargs) -> torch.Tensor:
        """Grams of ``x_0..x_L`` over ``runs`` random draws: :func:`isoprobe.theory.simulate_spec`."""
        from isoprobe.theory.sampler import simulate_spec

        return simulate_spec(self, X0, runs=runs, method=method, **kwargs)

    def mean_field(self, G0: torch.Tensor, in_features: int | None = None) -> torch.Tensor:
        """Mean-field Grams of ``x_0..x_L``: :func:`isoprobe.theory.mean_field_spec`."""
        from isoprobe.theory.mean_field import mean_field_spec

        return mean_field_spec(self, G0, in_features=in_features)
