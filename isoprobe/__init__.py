"""isoprobe: measure how deep networks keep or lose the geometry of their inputs.

The public API is re-exported here; see README.md for a tour.
"""

from importlib.metadata import PackageNotFoundError, version

from isoprobe.activations import Activation, get_activation, list_activations
from isoprobe.data import load_images
from isoprobe.hermite import (
    ActivationStats,
    activation_stats,
    dual_activation,
    hermite_coefficients,
    isometry_strength,
    mean_field_map,
)
from isoprobe.hooks import Probe
from isoprobe.metrics import (
    effective_rank,
    gram,
    isometry,
    isometry_gap,
    lyapunov_gamma,
    norm_variation_factor,
    numerical_rank,
    orthogonality_gap,
    spectral_stats,
)
from isoprobe.nets import LNMLP
from isoprobe.records import Record
from isoprobe.theory import (
    LNMLPSpec,
    corollary_b2_bound,
    mean_field_grams,
    simulate,
    theorem4_bound,
    theorem4_constant,
)

try:
    __version__ = version("isoprobe")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "__version__",
    "LNMLP",
    "LNMLPSpec",
    "corollary_b2_bound",
    "load_images",
    "mean_field_grams",
    "simulate",
    "theorem4_bound",
    "theorem4_constant",
    "Probe",
    "Record",
    "Activation",
    "ActivationStats",
    "activation_stats",
    "dual_activation",
    "get_activation",
    "hermite_coefficients",
    "isometry_strength",
    "list_activations",
    "mean_field_map",
    "effective_rank",
    "gram",
    "isometry",
    "isometry_gap",
    "lyapunov_gamma",
    "norm_variation_factor",
    "numerical_rank",
    "orthogonality_gap",
    "spectral_stats",
]
