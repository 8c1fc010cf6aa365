"""Same model, third engine: PyMC's and brms's log densities at the same parameter values.

Both programs are written from one design and one set of resolved priors; this
check proves they define the same posterior density, point by point (issue 22).
Each side has its own parameters: PyMC samples the fixed effects ``beta``, the
standardised offsets ``z_<label>``, a correlated block's packed Cholesky factor of
the covariance ``chol_<label>`` and ``sigma``; brms (Stan) samples ``b``, ``z_g``
(terms x levels), ``sd_g``, the Cholesky factor of the correlation matrix ``L_g``
and ``sigma`` (or ``b_sigma``, one residual SD per level).  The points are drawn
from the PyMC model's prior, mapped to Stan's parameters (``L_cov = diag(sd) L``),
and the two densities compared on Stan's parameters: PyMC's density of ``L_cov``
becomes one of ``(sd, L)`` through the Jacobian of that map,
``sum_i [ i log sd_i - log L_ii ]`` (rows counted from 0), the one
``pm.LKJCholeskyCov`` itself adds the other way.  Neither side's own unconstraining
transforms enter (``jacobian=False`` / ``adjust_transform = FALSE``); their
values with those Jacobians are in the table for the record.

One known term is set right on the PyMC side before comparing: PyMC (to 5.28 at
least) adds the LKJ distribution's log normalising constant with the wrong sign
(pymc-devs/pymc#1042: ``LKJCorr(n=2, eta=1)`` has log density ``+log 2`` at every
correlation, where the density is 1/2).  The error is a constant in the parameters,
so PyMC's posterior is unaffected; :func:`lkj_constant_error` measures it through
PyMC's own ``LKJCorr`` at the identity, so the column is 0 once PyMC is fixed.

When the densities differ, the parameters are moved one at a time from one point
to another: a parameter whose move changes the difference is named; a difference
no parameter moves is a constant (a normalising term one side drops).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from harness.checks.marginal import evaluation_mode
from harness.engines import brms as brms_engine
from harness.engines.pymc import build_model
from harness.model.priors import ResolvedPriors, resolve_priors
from harness.model.spec import Design
from harness.names import sd_var

log = logging.getLogger("harness")

__all__ = ["SameModelBayes", "same_model_bayes"]

#: Largest |log density difference| the two programs may show at one point ...
TOLERANCE = 1e-8
#: ... plus this much of |log density|: a sum of thousands of terms near 1e10 (a Poisson
#: rate drawn far out in the prior) carries rounding of about 1e-16 per term in double
#: precision, far above 1e-8 yet not a difference between the models.
ROUNDING = 1e-13


@dataclass
class SameModelBayes:
    """The log-density identity between the PyMC model and brms's Stan program.

    Attributes
    ----------
    table : DataFrame
        point, logp_pymc (on Stan's parameters), logp_brms, diff, jacobian (the map's
        term added to PyMC's density), pymc_lkj_constant (the correction of PyMC's LKJ
        constant added too), logp_pymc_unconstrained, logp_brms_unconstrained (each
        side's own density with its own transforms' Jacobians, for the record) and
        allowed (the bound |diff| must keep).
    ok : bool
        Every |diff| within ``allowed``: ``tolerance`` plus ``ROUNDING`` times |log density|.
    reasons : list of str
        For a failure, the parameters whose values move the difference.
    """

    table: pd.DataFrame
    max_abs_diff: float
    tolerance: float
    ok: bool
    reasons: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        return "pass" if self.ok else "fail"


def _applicable(design: Design) -> None:
    if design.spec.parameterization != "offsets":
        raise ValueError(
            "the log-density identity with brms is for parameterization='offsets' "
            f"(brms samples standardised offsets); this spec has {design.spec.parameterization!r}"
        )


class _Maps:
    """PyMC's value variables <-> Stan's parameters for one design."""

    def __init__(self, design: Design, stan: brms_engine.BrmsModel, model: Any) -> None:
        self.design = design
        self.stan = stan
        self.model = model
        self.free = {rv.name: rv for rv in model.free_RVs}

    def value_point(self, constrained: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """PyMC's point (value variables, transformed) from constrained values."""
        import pytensor.tensor as pt

        point = {}
        for name, rv in self.free.items():
            value = np.asarray(constrained[name], dtype=float)
            transform = self.model.rvs_to_transforms.get(rv)
            var = self.model.rvs_to_values[rv]
            if transform is not None:
                value = np.asarray(
                    transform.forward(pt.as_tensor(value), *rv.owner.inputs).eval(), dtype=float
                )
            point[var.name] = value
        return point

    def stan_point(self, constrained: dict[str, np.ndarray]) -> tuple[dict[str, Any], float]:
        """Stan's parameters from PyMC's constrained values, and the map's log Jacobian."""
        design = self.design
        point: dict[str, Any] = {"b": np.asarray(constrained["beta"], dtype=float)}
        jacobian = 0.0
        if design.family.has_scale:
            sigma = np.asarray(constrained["sigma"], dtype=float)
            if design.sigma_levels is None:
                point["sigma"] = float(sigma)
            else:
                point["b_sigma"] = sigma
        for i, block in enumerate(design.blocks, start=1):
            gn, cns = self.stan.groups[f"gb{i}"]
            if cns != list(range(1, block.n_terms + 1)):
                raise RuntimeError(f"brms numbers the terms of block {block.label} as {cns}")
            z = np.asarray(constrained[f"z_{block.label}"], dtype=float)  # (levels, terms)
            point[f"z_{gn}"] = z.T
            k = block.n_terms
            if block.correlated and k > 1:
                packed = np.asarray(constrained[f"chol_{block.label}"], dtype=float)
                L_cov = np.zeros((k, k))
                L_cov[np.tril_indices(k)] = packed
                sd = np.sqrt(np.sum(L_cov**2, axis=1))
                L = L_cov / sd[:, None]
                point[f"sd_{gn}"] = sd
                point[f"L_{gn}"] = L
                jacobian += float(np.sum(np.arange(k) * np.log(sd) - np.log(np.diag(L))))
            else:
                point[f"sd_{gn}"] = np.atleast_1d(np.asarray(constrained[sd_var(block)], float))
        return point, jacobian


def lkj_log_constant(eta: float, k: int) -> float:
    """The exact log normalising constant of LKJ(eta) on k x k correlation matrices.

    ``-log int det(R)^(eta - 1) dR`` (Lewandowski, Kurowicka and Joe 2009, eq. 16):
    the integral is ``prod_{i=1}^{k-1} 2^((2 eta - 2 + k - i)(k - i)) B(b_i, b_i)^(k - i)``
    with ``b_i = eta + (k - i - 1) / 2``.
    """
    from scipy.special import betaln

    total = 0.0
    for i in range(1, k):
        b = eta + (k - i - 1) / 2.0
        total += (2.0 * eta - 2.0 + k - i) * (k - i) * np.log(2.0) + (k - i) * betaln(b, b)
    return -float(total)


def lkj_constant_error(eta: float, k: int) -> float:
    """What to add to PyMC's LKJ log density to make its normalising constant exact.

    PyMC's ``LKJCorr`` at the identity matrix is its constant alone (``det(I) = 1``);
    ``pm.LKJCholeskyCov`` adds the same constant (pymc-devs/pymc#1042).
    """
    import pymc as pm

    identity = np.zeros(k * (k - 1) // 2)
    pymc_constant = float(pm.logp(pm.LKJCorr.dist(n=k, eta=eta), identity).eval())
    return lkj_log_constant(eta, k) - pymc_constant


def _prior_points(model: Any, n_points: int, seed: int) -> list[dict[str, np.ndarray]]:
    """``n_points`` draws of every free variable from the PyMC model's prior."""
    import pymc as pm

    names = [rv.name for rv in model.free_RVs]
    with model:
        prior = pm.sample_prior_predictive(
            draws=n_points, var_names=names, random_seed=seed, return_inferencedata=False
        )
    return [{name: np.asarray(prior[name][i]) for name in names} for i in range(n_points)]


def same_model_bayes(
    design: Design,
    priors: ResolvedPriors | None = None,
    *,
    n_points: int = 10,
    seed: int = 1,
    tolerance: float = TOLERANCE,
    cache_dir: Any = None,
) -> SameModelBayes:
    """Compare PyMC's and brms's log densities at ``n_points`` parameter points.

    Parameters
    ----------
    design : Design
    priors : ResolvedPriors, optional
        Defaults to ``resolve_priors(design)``; both programs get the same.
    n_points : int
        Points drawn from the PyMC model's prior.
    seed : int
    tolerance : float
        Largest |difference| accepted at a point.
    cache_dir : path, optional
        Where brms's compiled model is kept (:func:`harness.engines.brms.compiled_model`).

    Returns
    -------
    SameModelBayes

    Raises
    ------
    ValueError
        For the ``baked_in`` parameterisation (brms has no such program).
    harness.engines.lme4.RUnavailableError
        When R, brms or rstan is missing.
    """
    _applicable(design)
    priors = priors if priors is not None else resolve_priors(design)
    stan = brms_engine.prepare(design, priors)
    model = build_model(design, priors)
    maps = _Maps(design, stan, model)
    # A few points each: no C compile of every node.
    logp_c = model.compile_logp(jacobian=False, mode=evaluation_mode())
    logp_u = model.compile_logp(jacobian=True, mode=evaluation_mode())
    lkj_fix = sum(
        lkj_constant_error(float(priors.lkj_eta), block.n_terms)
        for block in design.blocks
        if block.correlated and block.n_terms > 1
    )

    def evaluate(points: list[dict[str, np.ndarray]]) -> pd.DataFrame:
        rows, stan_points = [], []
        for i, constrained in enumerate(points):
            values = maps.value_point(constrained)
            stan_point, jacobian = maps.stan_point(constrained)
            stan_points.append(stan_point)
            rows.append(
                {
                    "point": i,
                    "logp_pymc_own": float(logp_c(values)),
                    "jacobian": jacobian,
                    "logp_pymc_unconstrained": float(logp_u(values)),
                }
            )
        table = pd.DataFrame(rows)
        brms_values = brms_engine.log_prob(stan, stan_points, cache_dir)
        table["pymc_lkj_constant"] = lkj_fix
        table["logp_pymc"] = table["logp_pymc_own"] + table["jacobian"] + lkj_fix
        table["logp_brms"] = brms_values["constrained"].to_numpy()
        table["logp_brms_unconstrained"] = brms_values["unconstrained"].to_numpy()
        table["diff"] = table["logp_pymc"] - table["logp_brms"]
        return table

    points = _prior_points(model, n_points, seed)
    table = evaluate(points)
    columns = [
        "point",
        "logp_pymc",
        "logp_brms",
        "diff",
        "jacobian",
        "pymc_lkj_constant",
        "logp_pymc_unconstrained",
        "logp_brms_unconstrained",
    ]
    table = table[columns].copy()
    table["allowed"] = tolerance + ROUNDING * np.abs(table["logp_brms"])
    finite = np.isfinite(table["diff"].to_numpy())
    max_abs = float(np.max(np.abs(table["diff"]))) if finite.all() else float("inf")
    ok = bool(finite.all() and (np.abs(table["diff"]) <= table["allowed"]).all())
    reasons = [] if ok else _name_parameters(points, table, evaluate, tolerance)
    log.info("same model (PyMC vs brms): max |diff| %.3g over %d points", max_abs, len(table))
    return SameModelBayes(
        table=table, max_abs_diff=max_abs, tolerance=tolerance, ok=ok, reasons=reasons
    )


def _name_parameters(
    points: list[dict[str, np.ndarray]], table: pd.DataFrame, evaluate: Any, tolerance: float
) -> list[str]:
    """Which parameters the difference moves with (moved one at a time, point 0 -> 1)."""
    if len(points) < 2:
        return ["the densities differ; too few points to name a parameter"]
    base, other = points[0], points[1]
    base_diff = float(table["diff"].iloc[0])
    moved = evaluate([{**base, name: other[name]} for name in base])
    allowed = tolerance + ROUNDING * np.abs(moved["logp_brms"].to_numpy())
    reasons = [
        f"{name}: moving it changes the difference by {d - base_diff:.3g}"
        for name, d, a in zip(base, moved["diff"].to_numpy(), allowed, strict=True)
        if not np.isfinite(d) or abs(d - base_diff) > a
    ]
    if not reasons:
        reasons.append(
            f"a constant difference of {base_diff:.6g} that no parameter moves "
            "(a normalising term one side leaves out)"
        )
    return reasons
