"""Audit a user's own PyMC model against the harness's model for the same formula, and lme4.

``harness audit MODEL.py --data CSV --formula F`` and :func:`audit`.  Checks:
the pointwise likelihood at the same parameter values (:mod:`.likelihood`),
the random-effects law (:mod:`.effects`), priors side by side (:mod:`.priors`)
and the posterior against lme4 (:mod:`.run`, through :mod:`.fit_adapter`).
"""

from harness.audit.loading import AuditError, UserModel, load_model_file
from harness.audit.run import AuditResult, audit

__all__ = ["AuditError", "AuditResult", "UserModel", "audit", "load_model_file"]
