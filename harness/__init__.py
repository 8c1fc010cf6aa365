"""Fit one linear mixed model with lme4 and PyMC, align, compare, report."""

from __future__ import annotations

import logging
from typing import Any

from harness import datasets, views

# Bound eagerly: a lazily imported submodule of the same name would replace the
# function attribute (``harness.checks.compare`` the module vs ``hz.compare`` the function).
from harness.checks.compare import Comparison, compare
from harness.checks.same_model import SameModel, same_model
from harness.model.spec import ModelSpec, Prior, build_design

__version__ = "0.1.0"
logging.getLogger("harness").addHandler(logging.NullHandler())


def _load_report_views() -> None:
    # Registers the results' HTML views: wired here, at the front door, because fitting
    # code (where the result types live) never imports report code.
    from harness.report import notebook  # noqa: F401


views.on_first_use(_load_report_views)

__all__ = [
    "Comparison",
    "ModelSpec",
    "Prior",
    "SameModel",
    "__version__",
    "audit",
    "build_design",
    "compare",
    "datasets",
    "fit_lme4",
    "fit_pymc",
    "same_model",
]


def fit_lme4(*args: Any, **kwargs: Any):
    """Fit with lme4 (see :func:`harness.engines.lme4.fit_lme4`)."""
    from harness.engines.lme4 import fit_lme4 as _fit

    return _fit(*args, **kwargs)


def fit_pymc(*args: Any, **kwargs: Any):
    """Fit with PyMC (see :func:`harness.engines.pymc.fit_pymc`)."""
    from harness.engines.pymc import fit_pymc as _fit

    return _fit(*args, **kwargs)


def audit(*args: Any, **kwargs: Any):
    """Audit a user's own PyMC model (see :func:`harness.audit.run.audit`)."""
    from harness.audit.run import audit as _audit

    return _audit(*args, **kwargs)
