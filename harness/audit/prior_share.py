"""The prior share between the user's priors and the harness's, by importance re-weighting.

Check (a) establishes that both models have the same likelihood, so the two
posteriors differ only by their priors: re-weighting the user's draws by
``p_harness(theta) / p_user(theta)`` estimates the harness's posterior from the
user's draws.  ``theta`` is the harness's rows in their natural units (fixed
effects, SDs, correlations, residual SDs); the offsets' law given the SDs is the
same on both sides once check (b) passes, so it cancels from the ratio.

The user's prior density of a row is read from the user's model: the log
density (no Jacobian: natural units) of the free variable the mapping names, or,
for the SDs and correlations of an ``LKJCholeskyCov``, its ``sd_dist`` at the SDs
plus the LKJ density of the correlation matrix.  A
row mapped through a callable or a deterministic, or whose variable's prior
depends on other variables, has no density there; the share is then not
computed and the result says which rows stopped it.  The weights are smoothed
with Pareto-smoothed importance sampling (``arviz.psislw``); above
:data:`K_HAT_MAX` the re-weighted estimates are not reliable.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xarray as xr

from harness.audit.likelihood import _row_values
from harness.audit.mapping import _INDEXED, Row, harness_rows
from harness.model.priors import ResolvedPriors
from harness.model.spec import Design, Prior
from harness.names import corr_var

log = logging.getLogger("harness")

__all__ = ["K_HAT_MAX", "PriorShare", "harness_log_prior", "prior_share", "user_log_prior"]

#: Pareto k-hat above which importance re-weighting is not reliable (Vehtari et al.).
K_HAT_MAX = 0.7


@dataclass
class PriorShare:
    """Normalised importance weights over the user's draws (flattened chain x draw) and k-hat.

    ``weights`` is None when the share could not be computed; ``why`` says why.
    """

    weights: np.ndarray | None
    k_hat: float = float("nan")
    why: str = ""
    unavailable: list[str] = field(default_factory=list)

    @property
    def reliable(self) -> bool:
        return self.weights is not None and bool(self.k_hat <= K_HAT_MAX)


def _flat(values: np.ndarray) -> np.ndarray:
    """(chain, draw, ...) -> (chain * draw, ...)."""
    return values.reshape((values.shape[0] * values.shape[1], *values.shape[2:]))


def _prior_logp(prior: Prior, values: np.ndarray) -> np.ndarray:
    import pymc as pm

    dist = getattr(pm, prior.dist).dist(**dict(prior.params))
    return np.asarray(pm.logp(dist, values.astype(float)).eval(), dtype=float)


def harness_log_prior(design: Design, priors: ResolvedPriors, hdraws: xr.Dataset) -> np.ndarray:
    """The harness's log prior density of every non-offset row, per draw (flattened).

    Fixed effects, SDs and residual SDs from their :class:`~harness.model.spec.Prior`;
    each correlated block's correlation matrix ``R`` adds ``(eta - 1) log det R``
    (the LKJ density up to its constant, which cancels in normalised weights).
    """
    total: np.ndarray | None = None
    for row in harness_rows(design):
        values = _row_values(row, hdraws)
        if values is None:
            continue
        if row.kind == "fixed":
            part = _prior_logp(priors.fixed[str(row.term)], _flat(values))
        elif row.kind == "sd" and row.block is not None:
            part = _prior_logp(priors.sd[(row.block.label, str(row.term))], _flat(values))
        elif row.kind == "sigma":
            part = _prior_logp(priors.sigma, _flat(values))
        else:
            continue
        total = part if total is None else total + part
    for block in design.blocks:
        if block.correlated and block.n_terms > 1 and corr_var(block) in hdraws:
            corr = _flat(hdraws[corr_var(block)].values)
            _, logdet = np.linalg.slogdet(corr)
            part = (priors.lkj_eta - 1.0) * logdet
            total = part if total is None else total + part
    if total is None:
        raise ValueError("no row has a prior")
    return total


def _lkj_parent(model: Any, name: str) -> Any:
    """The ``LKJCholeskyCov`` free variable whose ``<name>_stds`` or ``<name>_corr`` this is."""
    for suffix in ("_stds", "_corr"):
        if name.endswith(suffix):
            var = model.named_vars.get(name.removesuffix(suffix))
            if var is not None and "LKJCholeskyCov" in type(var.owner.op).__name__:
                return var
    return None


def _lkj_log_prior(var: Any, draws: xr.Dataset) -> np.ndarray:
    """``LKJCholeskyCov``'s density on (SDs, correlations): sd_dist at the SDs + LKJ on R.

    The LKJ part is ``(eta - 1) log det R``, up to its constant as on the
    harness's side.  The inputs are (rng, n, eta, sd_dist).
    """
    import pymc as pm

    eta = float(np.asarray(var.owner.inputs[2].eval()))
    sd_dist = var.owner.inputs[3]
    stds = _flat(draws[f"{var.name}_stds"].values)
    corr = _flat(draws[f"{var.name}_corr"].values)
    x = np.asarray(pm.logp(sd_dist, stds).eval(), dtype=float)
    _, logdet = np.linalg.slogdet(corr)
    return x.reshape(x.shape[0], -1).sum(axis=1) + (eta - 1.0) * logdet


def _user_variable(model: Any, value: Any) -> tuple[Any, tuple[int, ...] | None] | str:
    """The model's free variable a mapping value names (and its index), or why there is none.

    The SDs and correlations of an ``LKJCholeskyCov`` (deterministics
    ``<name>_stds``, ``<name>_corr``) stand for the free variable ``<name>``.
    """
    import pytensor

    if not isinstance(value, str):
        return "mapped through a callable"
    match = _INDEXED.match(value.strip())
    name = match["name"].strip() if match else value.strip()
    lkj = _lkj_parent(model, name)
    if lkj is not None:
        sd_dist = lkj.owner.inputs[3]
        if set(pytensor.graph.ancestors([sd_dist])) & set(model.free_RVs):
            return f"the SD prior of {lkj.name!r} depends on other variables"
        return lkj, None
    var = model.named_vars.get(name)
    if var is None or var not in model.free_RVs:
        return f"{name!r} is not a free variable"
    parents = set(pytensor.graph.ancestors(var.owner.inputs)) - {var}
    if parents & set(model.free_RVs):
        return f"the prior of {name!r} depends on other variables"
    index = tuple(int(i) for i in match["index"].split(",")) if match else None
    return var, index


def user_log_prior(
    model: Any, mapping: dict[str, Any], design: Design, draws: xr.Dataset
) -> tuple[np.ndarray | None, list[str]]:
    """The user's log prior density of the mapped non-offset rows, per draw (flattened).

    Returns (log density or None, the rows whose density is not available, with why).
    """
    import pymc as pm
    import pytensor
    import pytensor.tensor as pt

    missing: list[str] = []
    used: dict[str, tuple[Any, list[tuple[int, ...] | None]]] = {}
    rows: list[Row] = [r for r in harness_rows(design) if r.kind != "offsets"]
    for row in rows:
        found = _user_variable(model, mapping.get(row.name))
        if isinstance(found, str):
            missing.append(f"{row.name} ({found})")
            continue
        var, index = found
        used.setdefault(var.name, (var, []))[1].append(index)
    if missing:
        return None, missing
    total: np.ndarray | None = None
    for name, (var, indices) in used.items():
        if "LKJCholeskyCov" in type(var.owner.op).__name__:
            part = _lkj_log_prior(var, draws)
            total = part if total is None else total + part
            continue
        values = draws[name].values
        x = pt.tensor(name=f"{name}_value", shape=(None, *values.shape[2:]), dtype=var.dtype)
        # One draw per row of x: the variable's elementwise log density, vectorised over draws.
        lp = pm.logp(var, x[0])
        fn = pytensor.function([x], lp, on_unused_input="ignore")
        flat = _flat(values).astype(var.dtype)
        per = np.stack([np.asarray(fn(flat[i : i + 1])) for i in range(flat.shape[0])])
        if per.ndim == 1:  # a joint density (e.g. MvNormal): once, whatever is indexed
            part = per
        elif None in indices:
            part = per.reshape(per.shape[0], -1).sum(axis=1)
        else:
            part = np.zeros(per.shape[0])
            for index in {i for i in indices if i is not None}:
                flat_at = int(np.ravel_multi_index(index, per.shape[1:]))
                part = part + per.reshape(per.shape[0], -1)[:, flat_at]
        total = part if total is None else total + part
    return total, []


def prior_share(
    model: Any,
    mapping: dict[str, Any],
    design: Design,
    priors: ResolvedPriors,
    user_posterior: xr.Dataset,
    hposterior: xr.Dataset,
) -> PriorShare:
    """Importance weights taking the user's posterior to the harness's priors (PSIS).

    Parameters
    ----------
    model : pymc.Model
        The user's model.
    mapping : dict
        Harness row -> the model's quantity.
    design, priors
        The harness's design and resolved priors.
    user_posterior : Dataset
        The user's posterior draws under the model's own names.
    hposterior : Dataset
        The same draws under the harness's names.
    """
    import arviz as az

    try:
        user, missing = user_log_prior(model, mapping, design, user_posterior)
        if user is None:
            return PriorShare(
                None,
                why="the model's prior density is not available for " + "; ".join(missing[:4]),
                unavailable=missing,
            )
        harness = harness_log_prior(design, priors, hposterior)
    except Exception as err:  # a density that cannot be evaluated: no share, said so
        log.warning("audit: prior share not computed: %s", err)
        return PriorShare(None, why=f"the prior densities could not be evaluated: {err}")
    log_ratio = harness - user
    if not np.all(np.isfinite(log_ratio)):
        return PriorShare(
            None, why="a posterior draw lies outside the support of one of the priors"
        )
    lw, k = az.psislw(log_ratio - log_ratio.max())
    return PriorShare(np.exp(np.asarray(lw, dtype=float)), k_hat=float(np.asarray(k)))
