"""Which random-effects blocks to centre: the information rule, at draws or at the likelihood's maximum.

A block's offsets are best sampled centred when each group's data pin them down
more than the block's covariance does, and non-centred when the covariance
(the prior of the offsets) dominates: the funnel of the centred form appears
exactly when the data are weak (Papaspiliopoulos, Roberts and Skold 2007;
Betancourt and Girolami 2015).  The ratio of the two precisions needs values
of the SDs, the residual SD and the linear predictor.  The adaptive loop reads
them from a run's posterior medians (:func:`harness.engines.adaptive.suggest_centering`);
before any draw exists, :func:`centring_at_maximum` reads them at the
likelihood's maximum (the same point lme4 reports, found here by the harness's
own maximisers), so that the first run already samples in the form the data
call for instead of spending a round to find it.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from harness.model.spec import Design

log = logging.getLogger("harness")

#: A block is centred when the prior-whitened data precision of its groups' offsets
#: (median over groups of the smallest eigenvalue) exceeds this.
CENTRE_ABOVE = 1.0

#: At the likelihood's maximum the rule reads the block's covariance at the lower end of
#: its plausible range: scaled by the 10% quantile of chi^2(J - 1) / (J - 1) for J groups,
#: the sampling spread of a variance estimated from J group means.  The funnel of the
#: centred form lives at small SDs, which the posterior reaches when J is small.
LOWER_QUANTILE = 0.10


def ratios_at(
    design: Design, covariances: list[np.ndarray], row_weight: np.ndarray
) -> dict[str, dict[str, Any]]:
    """Per block: the data precision of its offsets in units of their prior precision.

    Parameters
    ----------
    design : Design
    covariances : list of ndarray
        One ``k x k`` covariance matrix of the offsets per block, in ``design.blocks`` order.
    row_weight : ndarray
        Fisher information of each row about its linear predictor (``1 / sigma_i^2``
        for a Gaussian model, the family's IRLS weight otherwise).

    Returns
    -------
    dict
        Per block label: ``min_eigenvalue`` (median over the groups with data of the
        smallest eigenvalue of ``L' D_j L``, ``Sigma = L L'``, ``D_j = sum_i w_i z_i z_i'``)
        and ``terms`` (the same per term alone, ``D_j[k, k] sd_k^2``).
    """
    ratios: dict[str, dict[str, Any]] = {}
    for block, cov in zip(design.blocks, covariances, strict=True):
        k = block.n_terms
        sd = np.sqrt(np.clip(np.diag(cov), 0.0, None))
        # Medians or estimates need not make a positive definite matrix: clip its eigenvalues.
        values, vectors = np.linalg.eigh(cov)
        root = vectors * np.sqrt(np.clip(values, 0.0, None))  # cov = root root'
        weighted = np.asarray(block.values, dtype=float) * np.sqrt(row_weight)[:, None]
        precision = np.zeros((block.n_levels, k, k))
        np.add.at(precision, block.group_index, weighted[:, :, None] * weighted[:, None, :])
        informed = np.trace(precision, axis1=1, axis2=2) > 0
        whitened = np.einsum("ai,gab,bj->gij", root, precision[informed], root)
        smallest = np.linalg.eigvalsh(whitened)[:, 0] if informed.any() else np.zeros(1)
        per_term = precision[informed][:, range(k), range(k)] * sd**2
        ratios[block.label] = {
            "min_eigenvalue": float(np.median(smallest)),
            "terms": {
                term: float(np.median(per_term[:, j])) if informed.any() else 0.0
                for j, term in enumerate(block.terms)
            },
        }
    return ratios


def choose(ratios: dict[str, dict[str, Any]]) -> tuple[frozenset[str], dict[str, Any]]:
    """The rule on :func:`ratios_at`'s output: the blocks to centre and the evidence per block."""
    chosen = set()
    evidence: dict[str, Any] = {}
    for label, ratio in ratios.items():
        centred = ratio["min_eigenvalue"] > CENTRE_ABOVE
        if centred:
            chosen.add(label)
        evidence[label] = {**ratio, "choice": "centred" if centred else "non-centred"}
    return frozenset(chosen), evidence


@dataclass(frozen=True)
class MaximumPoint:
    """The variance parameters and row information at the likelihood's maximum."""

    covariances: list[np.ndarray]
    row_weight: np.ndarray
    source: str
    seconds: float


def _gaussian_point(design: Design) -> tuple[list[np.ndarray], np.ndarray, str]:
    from harness.checks.marginal import MarginalLikelihood

    # The rule compares precisions on a log scale around 1: a loose tolerance does.
    estimate = MarginalLikelihood(design).maximise(gtol=1e-5)
    covariances = [F @ F.T for F in estimate.factors]
    sigma = np.asarray(estimate.sigma, dtype=float).ravel()
    per_row = sigma[np.asarray(design.sigma_index)] if design.sigma_index is not None else sigma[0]
    return covariances, np.broadcast_to(1.0 / per_row**2, (design.n,)).copy(), "ML maximum"


def _laplace_point(design: Design) -> tuple[list[np.ndarray], np.ndarray, str]:
    from scipy import optimize

    from harness.checks.laplace import (
        _block_factor,
        beta_scale,
        laplace_loglik,
        one_blas_thread,
        theta_size,
    )

    family = design.family
    t, p = theta_size(design), len(design.fixed_terms)
    centre, _ = family.prior_centre_scale(design.y, design.trials)
    beta0 = np.zeros(p)
    if "(Intercept)" in design.fixed_terms:
        beta0[design.fixed_terms.index("(Intercept)")] = centre
    theta0 = np.ones(t)
    scale = beta_scale(design, theta0, beta0)
    Z = design.Z()
    state: dict[str, Any] = {"u": None}
    lower: list[float | None] = []
    for block in design.blocks:
        cols, rows = np.triu_indices(block.n_terms)
        lower.extend(0.0 if r == c else None for r, c in zip(rows, cols, strict=True))

    def negative(x: np.ndarray) -> float:
        beta = beta0 + np.linalg.solve(scale, x[t:])
        result = laplace_loglik(design, x[:t], beta, tol=1e-8, u_start=state["u"], Z=Z)
        state.update(u=result.u, b=result.b, beta=beta)
        return -result.loglik

    # No polish (the same-model check's maximiser has one): the rule needs magnitudes.
    with one_blas_thread():
        best = optimize.minimize(
            negative,
            np.concatenate([theta0, np.zeros(p)]),
            method="L-BFGS-B",
            bounds=[(lo, None) for lo in lower] + [(None, None)] * p,
            options={"ftol": 1e-8, "maxiter": 200},
        )
    negative(best.x)
    eta = design.X.to_numpy(dtype=float) @ state["beta"] + Z @ state["b"]
    if design.offset is not None:
        eta = eta + np.asarray(design.offset, dtype=float)
    _, weight = family.score_weights(np.asarray(design.y, dtype=float), eta, design.trials)
    covariances, start = [], 0
    for block in design.blocks:
        k = block.n_terms
        factor = _block_factor(best.x[start : start + k * (k + 1) // 2], k)
        start += k * (k + 1) // 2
        covariances.append(factor @ factor.T)
    return covariances, np.asarray(weight, dtype=float), "Laplace maximum"


def maximum_point(design: Design) -> MaximumPoint | str:
    """The covariances and row weights at the likelihood's maximum, or why there are none.

    Gaussian: the exact marginal likelihood's maximum (ML,
    :class:`harness.checks.marginal.MarginalLikelihood`).  Binomial and Poisson:
    the Laplace approximation's (:func:`harness.checks.laplace.laplace_loglik`,
    no polish).  A family with a parameter of its own that is not fixed (the
    negative binomial's shape) has none here: its first run stays non-centred.
    """
    started = time.perf_counter()
    family = design.family
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            # The optimisers' trial points overflow exp() on the way; they are not the answer.
            warnings.simplefilter("ignore", RuntimeWarning)
            if family.laplace:
                covariances, weight, source = _laplace_point(design)
            else:  # lmer's exact marginal likelihood
                covariances, weight, source = _gaussian_point(design)
    except (ValueError, ArithmeticError) as err:  # numpy's LinAlgError is a ValueError
        return f"no likelihood maximum to read the rule at ({err})"
    if not all(np.all(np.isfinite(c)) for c in covariances) or not np.all(np.isfinite(weight)):
        return "the likelihood's maximum has non-finite values"
    return MaximumPoint(covariances, weight, source, time.perf_counter() - started)


def group_level_terms(design: Design, block: Any) -> list[str]:
    """Fixed terms other than the block's own whose column is constant within each of its groups.

    Such a column (a factor the block's groups nest in, a group-level predictor)
    moves every group's mean at once, as the block's offsets do: the likelihood
    informs only their sum, and the prior on the offsets alone separates them.
    """
    X = design.X.to_numpy(dtype=float)
    groups = np.asarray(block.group_index)
    order = np.argsort(groups, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(groups[order]) != 0])
    terms = []
    for j, term in enumerate(design.fixed_terms):
        if term in block.terms or np.ptp(X[:, j]) == 0:
            continue
        column = X[order, j]
        spread = np.maximum.reduceat(column, starts) - np.minimum.reduceat(column, starts)
        if np.all(spread == 0):
            terms.append(term)
    return terms


def centring_at_maximum(design: Design) -> tuple[frozenset[str], dict[str, Any], str]:
    """The rule at the likelihood's maximum: blocks to centre, evidence and a sentence.

    Each block's covariance enters at the low end of its plausible range
    (:data:`LOWER_QUANTILE`): a block of few groups is centred only when the data
    outweigh the prior even at a smaller SD than the maximum's.  A block the rule would centre stays non-centred when fixed terms other than
    its own are constant within its groups (:func:`group_level_terms`): the
    centred form is centred on the block's own terms only, so with data that
    outweigh the prior those fixed effects and the centred offsets move together
    (measured: lme4's ``cake``, whose replicates nest in the fixed ``recipe``,
    sampled 3x the draws centred).  The loop still applies the rule to the first
    run's draws when they fail.

    Returns no block (every block non-centred, the loop's former first run) when
    the design is not in offsets form or the maximum cannot be found; the
    sentence says which.
    """
    if design.spec.parameterization != "offsets" or not design.blocks:
        return frozenset(), {}, ""
    point = maximum_point(design)
    if isinstance(point, str):
        log.info("first run non-centred: %s", point)
        return frozenset(), {}, f"first run non-centred: {point}"
    from scipy import stats

    scales = [
        float(stats.chi2.ppf(LOWER_QUANTILE, b.n_levels - 1) / (b.n_levels - 1))
        if b.n_levels > 1
        else 0.0
        for b in design.blocks
    ]
    low = [c * scale for c, scale in zip(point.covariances, scales, strict=True)]
    blocks, evidence = choose(ratios_at(design, low, point.row_weight))
    for block, scale in zip(design.blocks, scales, strict=True):
        evidence[block.label]["covariance_scale"] = scale
    for block in design.blocks:
        tied = group_level_terms(design, block) if block.label in blocks else []
        if tied:
            blocks = blocks - {block.label}
            evidence[block.label].update(choice="non-centred", group_level_terms=tied)
    text = f"rule at the {point.source} ({point.seconds:.1f} s): " + ", ".join(
        f"{label}: {e['choice']} (smallest eigenvalue {e['min_eigenvalue']:.2g}"
        + (
            f"; fixed {', '.join(e['group_level_terms'])} constant within its groups"
            if "group_level_terms" in e
            else ""
        )
        + ")"
        for label, e in evidence.items()
    )
    log.info("first run's form by the %s", text)
    return blocks, {"centring_at_maximum": evidence, "source": point.source}, text
