"""The LayerNorm MLP of Joudaki et al. (2023) eq. (1) as an ordinary ``nn.Module``.

Built from one :class:`~isoprobe.theory.spec.LNMLPSpec`: its activation and norm modules call
the spec's own maps (:meth:`~isoprobe.theory.spec.LNMLPSpec.act_map`,
:meth:`~isoprobe.theory.spec.LNMLPSpec.norm_map`), and its weights are drawn by
:func:`~isoprobe.theory.sampler.sample_weight` from the same ``(seed, run, layer)`` streams as
the dense reference of :func:`isoprobe.theory.simulate`, so ``LNMLP(spec, d0, seed=s, run=r)``
*is* run ``r`` of ``simulate(..., method="dense", seed=s)``.

Sites, in execution order, each a real module a forward hook can watch::

    input_norm                              torch.nn.LayerNorm (no affine): x_0 = LN(x)
    layers.ℓ.fc                             torch.nn.Linear, no bias
    layers.ℓ.act   / layers.ℓ.norm          order "act-norm" (the paper's)
    layers.ℓ.norm  / layers.ℓ.act           order "norm-act"

``layers.ℓ.norm`` is ``torch.nn.LayerNorm`` (no affine) for layer centering and projection,
:class:`Norm` for the other switches, ``torch.nn.Identity`` for neither. Every site is seen by
:class:`isoprobe.Probe`; ``layers.ℓ.fc`` is selected by name (``sites=["layers.*.fc", "norm"]``).
"""

from __future__ import annotations

import torch
from torch import nn

from isoprobe.theory.sampler import sample_weight, weight_generator
from isoprobe.theory.spec import LayerPlan, LNMLPSpec

__all__ = ["Act", "LNBlock", "LNMLP", "Norm"]


class Act(nn.Module):
    """``σ(α x)`` of a spec, elementwise."""

    isoprobe_site = "activation"  # seen by isoprobe.Probe

    def __init__(self, spec: LNMLPSpec) -> None:
        super().__init__()
        self.spec = spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spec.act_map(x)

    def extra_repr(self) -> str:
        return f"{self.spec.name}, gain={self.spec.gain:g}"


class Norm(nn.Module):
    """Centering then projection of each item over its features (the non-LayerNorm switches).

    Seen by :class:`isoprobe.Probe` as a norm site (rule ``"rms"``, four points) when it is an
    RMS norm (no centering, layer projection), else as a ``"module"`` site (``pre``, ``post``):
    mean-field centering and projection subtract and divide by constants, and layer centering
    alone does not normalise.
    """

    def __init__(self, spec: LNMLPSpec, layer: LayerPlan) -> None:
        super().__init__()
        self.spec = spec
        self.layer = layer
        rms = spec.centering == "none" and spec.projection == "layer"
        self.isoprobe_site = "norm" if rms else "module"
        self.norm_rule, self.eps = "rms", spec.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spec.norm_map(x, self.layer)

    def extra_repr(self) -> str:
        return f"centering={self.spec.centering}, projection={self.spec.projection}"


def _norm_module(spec: LNMLPSpec, layer: LayerPlan, features: int) -> nn.Module:
    if spec.centering == "layer" and spec.projection == "layer":
        return nn.LayerNorm(features, eps=spec.eps, elementwise_affine=False)
    if spec.centering == "none" and spec.projection == "none":
        return nn.Identity()
    return Norm(spec, layer)


class LNBlock(nn.Module):
    """One layer: ``fc`` then ``act`` and ``norm`` in the spec's order."""

    def __init__(self, spec: LNMLPSpec, layer: LayerPlan) -> None:
        super().__init__()
        # weights are filled by LNMLP from the spec's streams: skip torch's own init (and RNG)
        self.fc = nn.utils.skip_init(nn.Linear, layer.d_in, layer.d_out, bias=False)
        norm_features = layer.d_out
        if spec.order == "act-norm":
            self.act = Act(spec)
            self.norm = _norm_module(spec, layer, norm_features)
        else:
            self.norm = _norm_module(spec, layer, norm_features)
            self.act = Act(spec)
        self.order = spec.order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if self.order == "act-norm":
            return self.norm(self.act(h))
        return self.act(self.norm(h))


class LNMLP(nn.Module):
    """The network of ``spec`` on inputs of ``in_features`` features (items as rows).

    Weights are drawn at construction from the ``(seed, run, layer)`` streams (see the module
    docstring), in float64 and then cast to ``dtype``.
    """

    def __init__(
        self,
        spec: LNMLPSpec,
        in_features: int,
        seed: int = 0,
        run: int = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.input_norm = nn.LayerNorm(in_features, eps=spec.eps, elementwise_affine=False)
        plans = spec.plan(in_features)
        self.layers = nn.ModuleList(LNBlock(spec, p) for p in plans)
        self.to(dtype=dtype, device=device)
        with torch.no_grad():
            for ell, (block, p) in enumerate(zip(self.layers, plans)):
                W = sample_weight(spec, p, weight_generator(seed, run, ell, device), torch.float64, device)
                block.fc.weight.copy_(W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_norm(x)
        for block in self.layers:
            x = block(x)
        return x

    def representations(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``[x_0, x_1, …, x_L]``: the normalised input and the output of every layer."""
        reps = [self.input_norm(x)]
        for block in self.layers:
            reps.append(block(reps[-1]))
        return reps
