"""Paper reproductions: ``isoprobe repro NAME``. See :mod:`isoprobe.experiments.base` for how to add one.

Importing a per-paper module registers its reproductions, in this order.
"""

from isoprobe.experiments import (  # noqa: F401  (registers meterez-*, daneshmand-orth)
    daneshmand,
    joudaki,  # noqa: F401  (registers table2, fig2, fig3, ...)
    meterez,
    training,  # noqa: F401  (registers fig7, fig2-trained, meterez-fig4, -fig6)
    transformer,  # noqa: F401  (registers figC5)
)
from isoprobe.experiments.base import (
    REGISTRY,
    Options,
    Reproduction,
    ReproductionOptionError,
    Verdict,
    resolve_names,
    run_reproductions,
    summarize,
)

__all__ = [
    "REGISTRY",
    "Options",
    "Reproduction",
    "ReproductionOptionError",
    "Verdict",
    "resolve_names",
    "run_reproductions",
    "summarize",
]
