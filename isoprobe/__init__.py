"""isoprobe: measure how deep networks keep or lose the geometry of their inputs.

The public API is re-exported here; see README.md for a tour.
"""

from importlib.metadata import PackageNotFoundError, version

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

try:
    __version__ = version("isoprobe")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "__version__",
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
