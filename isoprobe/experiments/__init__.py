"""Paper reproductions: ``isoprobe repro NAME``. See :mod:`isoprobe.experiments.base` for how to add one.

Importing a per-paper module registers its reproductions, in this order.
"""

from isoprobe.experiments import joudaki  # noqa: F401  (registers table2, fig2, fig3, ...)
from isoprobe.experiments import daneshmand, meterez  # noqa: F401  (registers meterez-*, daneshmand-orth)
from isoprobe.experiments import training  # noqa: F401  (registers fig7, fig2-trained, meterez-fig4, -fig6)
from isoprobe.experiments import transformer  # noqa: F401  (registers figC5)
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

__all__ = ["REGISTRY", "Options", "Reproduction", "ReproductionOptionError", "Verdict", "resolve_names",
           "run_reproductions", "summarize"]
