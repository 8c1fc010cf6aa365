"""Parameter points and pointwise log-likelihoods of the user's model and the harness's.

The harness's likelihood at a set of parameter values is the formula's own:
``mu = X beta + sum_blocks Z_k u[group, k]`` and the family's density of the
response, read from the :class:`~harness.model.spec.Design` that also builds
the harness's PyMC model (a test holds the two equal).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import xarray as xr

from harness.audit.loading import AuditError
from harness.model.spec import Design
from harness.names import offsets_var

log = logging.getLogger("harness")

__all__ = ["harness_loglik", "observed_name", "user_loglik", "user_prior_draws"]


def user_prior_draws(model: Any, draws: int, seed: int) -> xr.Dataset:
    """Prior draws of every free variable and deterministic of the user's model (one chain)."""
    import pymc as pm

    with model:
        idata = pm.sample_prior_predictive(draws=draws, random_seed=seed, var_names=_latent(model))
    return idata.prior


def _latent(model: Any) -> list[str]:
    return [v.name for v in (*model.free_RVs, *model.deterministics)]


def observed_name(model: Any, n_rows: int) -> str | None:
    """The user's one observed variable over the rows, or None when the model has several."""
    observed = list(model.observed_RVs)
    if not observed:
        raise AuditError("the model has no observed variable (no likelihood to audit)")
    if len(observed) == 1:
        value = model.rvs_to_values[observed[0]]
        size = int(np.size(value.data if hasattr(value, "data") else value.eval()))
        if size != n_rows:
            raise AuditError(
                f"the observed variable {observed[0].name!r} has {size} values, the data "
                f"{n_rows} rows (after lme4's rules for missing values)"
            )
        return observed[0].name
    return None


def user_loglik(model: Any, draws: xr.Dataset) -> np.ndarray:
    """Pointwise observed-data log-likelihood of the user's model, shape (points, rows).

    With several observed variables the columns are their values in declaration
    order (the caller then compares totals only).
    """
    import arviz as az
    import pymc as pm

    free = [v.name for v in model.free_RVs]
    idata = az.InferenceData(posterior=draws[free])
    logs = pm.compute_log_likelihood(
        idata, model=model, extend_inferencedata=False, progressbar=False
    )
    parts = []
    for rv in model.observed_RVs:
        values = logs[rv.name].values
        parts.append(values.reshape(values.shape[0] * values.shape[1], -1))
    return np.concatenate(parts, axis=1)


def harness_mu(design: Design, hdraws: xr.Dataset) -> np.ndarray:
    """Linear predictor per point and row, shape (points, rows), from harness-named draws."""
    points = hdraws.sizes["chain"] * hdraws.sizes["draw"]
    beta = hdraws["beta"].values.reshape(points, -1)
    eta = beta @ design.X.to_numpy(dtype=float).T
    for block in design.blocks:
        u = hdraws[offsets_var(block)].values.reshape(points, block.n_levels, block.n_terms)
        eta = eta + np.einsum("pnk,nk->pn", u[:, block.group_index, :], block.values)
    if design.offset is not None:
        eta = eta + design.offset[None, :]
    return eta


def harness_loglik(design: Design, hdraws: xr.Dataset) -> np.ndarray:
    """The harness's pointwise log-likelihood at the given draws, shape (points, rows)."""
    eta = harness_mu(design, hdraws)
    family = design.family
    mu = family.link.inverse(eta)
    if not family.has_scale:
        return np.asarray(family.loglik(design.y[None, :], mu, design.trials))
    points = eta.shape[0]
    sigma = hdraws["sigma"].values.reshape(points, -1)
    if design.sigma_index is not None:
        scale = sigma[:, design.sigma_index]
    else:
        scale = np.broadcast_to(sigma[:, :1], eta.shape)
    return np.asarray(family.loglik(design.y[None, :], mu, design.trials, scale=scale))
