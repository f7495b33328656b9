"""Random-init theory: the fast exact sampler, the mean-field recursion and the depth bounds.

Pure tensor math (no ``nn.Module``, no file I/O). One :class:`LNMLPSpec` declares a LayerNorm
MLP (Joudaki et al. 2023, eq. 1, with the switches of :mod:`isoprobe.theory.spec`); :func:`simulate` draws its
Grams at finite width (fast sampler or dense reference), :func:`mean_field_grams` gives their
infinite-width limit, and :mod:`~isoprobe.theory.bounds` the Theorem 4 / Corollary B.2 bounds.
The same spec builds the real network, :class:`isoprobe.nets.LNMLP`.
"""

from isoprobe.theory.bounds import (
    corollary_b2_bound,
    theorem4_bound,
    theorem4_constant,
    theorem4_min_depth,
)
from isoprobe.theory.mean_field import cosine_matrix, mean_field_grams, mean_field_spec
from isoprobe.theory.sampler import sample_weight, simulate, simulate_spec, weight_generator
from isoprobe.theory.spec import LayerPlan, LNMLPSpec

__all__ = [
    "LNMLPSpec",
    "LayerPlan",
    "corollary_b2_bound",
    "cosine_matrix",
    "mean_field_grams",
    "mean_field_spec",
    "sample_weight",
    "simulate",
    "simulate_spec",
    "theorem4_bound",
    "theorem4_constant",
    "theorem4_min_depth",
    "weight_generator",
]
