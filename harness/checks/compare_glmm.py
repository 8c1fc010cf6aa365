"""What the comparison tables must say about a GLMM: glmer's likelihood is an approximation.

glmer (``nAGQ = 1``) maximises the Laplace approximation of the marginal
likelihood; PyMC samples the exact posterior.  With few observations per
group, or binary data, the Laplace approximation is biased (variance
components too small, Breslow & Lin 1995), so a gap between glmer's SD and
the posterior is expected there and is not a failure of either engine.  For
one scalar random-effects term the size of that approximation is measured
here: the log-likelihood at glmer's estimates by 25-point adaptive
Gauss-Hermite quadrature (:mod:`harness.checks.laplace`), and the quadrature ML
estimates themselves.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd

from harness.checks.laplace import laplace_loglik, maximise_laplace

log = logging.getLogger("harness")

__all__ = ["GLMM_UNCERTAINTY", "explain_glmm_gaps", "laplace_accuracy"]

AGQ_POINTS = 25

GLMM_UNCERTAINTY = pd.DataFrame(
    [
        (
            "fixed",
            "Wald SE of beta-hat (z interval) with variance components fixed at their estimates; "
            "the likelihood is glmer's Laplace approximation",
            "posterior SD: integrates over the variance components and the priors, with the "
            "exact (not Laplace-approximated) likelihood",
        ),
        (
            "variance",
            "ML (Laplace) point estimate on the link scale; no residual SD in a binomial or "
            "Poisson model",
            "posterior: mean and median differ because SD posteriors are skewed",
        ),
        (
            "offsets",
            "conditional modes and conditional SDs on the link scale (ranef(condVar = TRUE))",
            "posterior SD of the offset: integrates over every parameter",
        ),
        (
            "mcse",
            "none (deterministic optimum)",
            "Monte Carlo error of the posterior mean (ArviZ mcse)",
        ),
    ],
    columns=["table", "lme4", "pymc"],
)


def laplace_accuracy(freq: Any, exact: Any | None = None) -> dict[str, Any] | None:
    """Laplace against 25-point adaptive quadrature, for one scalar random-effects term.

    Returns ``loglik_laplace``, ``loglik_agq`` (at glmer's estimates, both
    with every constant), ``agq_theta`` and ``agq_beta`` (the quadrature ML
    estimates); None for other designs.  ``exact`` (an
    :class:`~harness.checks.glmm_attribution.ExactML` by quadrature) supplies
    the quadrature ML estimates when they were computed already.
    """
    design = freq.design
    if not (len(design.blocks) == 1 and design.blocks[0].n_terms == 1):
        return None
    ml = freq.ml_estimates
    theta = np.array(list(ml["theta"].values()), dtype=float)
    beta = np.array([ml["beta"][t] for t in design.fixed_terms], dtype=float)
    laplace = laplace_loglik(design, theta, beta)
    agq = laplace_loglik(design, theta, beta, n_agq=AGQ_POINTS)
    if exact is not None and getattr(exact, "method", None) == "agq":
        return {
            "loglik_laplace": laplace.loglik,
            "loglik_agq": agq.loglik,
            "agq_theta": np.asarray(exact.theta),
            "agq_beta": exact.beta,
        }
    best = maximise_laplace(design, theta0=theta, beta0=beta, n_agq=AGQ_POINTS)
    return {
        "loglik_laplace": laplace.loglik,
        "loglik_agq": agq.loglik,
        "agq_theta": np.asarray(best["theta"]),
        "agq_beta": best["beta"],
    }


def explain_glmm_gaps(
    freq: Any, variance: pd.DataFrame, glmm: Any | None = None
) -> tuple[pd.DataFrame, list[str]]:
    """Notes on the Laplace approximation, added to the variance table and the comparison.

    ``glmm`` (:class:`~harness.checks.glmm_attribution.GlmmAttribution`) lends
    its exact ML estimates and notes.  Returns the variance table with its
    ``note`` column extended and the comparison-level notes.
    """
    design = freq.design
    notes: list[str] = []
    block_sizes = {
        b.label: float(np.median(np.bincount(b.group_index, minlength=b.n_levels)))
        for b in design.blocks
    }
    binary = design.trials is not None and bool(np.all(design.trials == 1))
    # Heuristic where the quadrature cannot measure it (more than one term or block).
    thin = [label for label, size in block_sizes.items() if size < 5 or binary]
    notes.append(
        f"{design.family.key} model: glmer maximises the Laplace approximation of the likelihood "
        "(nAGQ = 1); PyMC samples the exact posterior. Estimates, intervals and offsets are on the "
        f"{design.family.scale_name} scale."
    )
    accuracy = None
    try:
        accuracy = laplace_accuracy(freq, glmm.exact if glmm is not None else None)
    except Exception as err:  # the check is explanatory; the comparison stands without it
        log.warning("adaptive quadrature check failed: %s", err)
    extra: dict[str, str] = {}
    if accuracy is not None:
        block = design.blocks[0]
        gap = accuracy["loglik_laplace"] - accuracy["loglik_agq"]
        sd_laplace = float(np.array(list(freq.ml_estimates["theta"].values()))[0])
        sd_agq = float(accuracy["agq_theta"][0])
        notes.append(
            f"Laplace accuracy: at glmer's estimates the Laplace log-likelihood is {gap:+.3g} "
            f"from {AGQ_POINTS}-point adaptive Gauss-Hermite quadrature; maximising the "
            f"quadrature likelihood gives SD {sd_agq:.4g} for {block.label} (Laplace: "
            f"{sd_laplace:.4g})."
        )
        extra[f"{block.label}: sd({block.terms[0]})"] = (
            f"ML by {AGQ_POINTS}-point quadrature: {sd_agq:.4g} (Laplace {sd_laplace:.4g})"
        )
        # Measured, so the heuristic is replaced by the measurement.
        thin = [block.label] if abs(sd_agq - sd_laplace) > 0.05 * max(sd_laplace, 1e-8) else []
    for label in thin:
        why = "binary responses" if binary else f"median {block_sizes[label]:g} rows per group"
        notes.append(
            f"{label}: {why}; the Laplace approximation is least accurate here and tends to "
            "understate the group SD, so a PyMC SD above glmer's is expected and not by itself a "
            "sign of different models (the same-model check tests the likelihoods directly)."
        )
        for component in variance["component"]:
            if component.startswith(f"{label}: sd("):
                extra.setdefault(component, "")
                extra[component] = "; ".join(
                    p for p in (extra[component], f"Laplace bias likely ({why})") if p
                )
    if glmm is not None:
        notes.extend(glmm.notes)
    if extra and "note" in variance:
        variance = variance.copy()
        variance["note"] = [
            "; ".join(p for p in (str(note or ""), extra.get(component, "")) if p)
            for component, note in zip(variance["component"], variance["note"], strict=True)
        ]
    return variance, notes
