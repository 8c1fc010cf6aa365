"""'Same model?' for GLMMs: glmer's Laplace likelihood against the PyMC model's.

glmer's ``logLik`` is itself an approximation (Laplace, ``nAGQ = 1``), so the
identity checked here is: the Laplace approximation of the PyMC model's
marginal likelihood, from the harness's own design, at glmer's estimates,
equals glmer's ``logLik`` (:mod:`harness.checks.laplace`).  Level 2 maximises that
approximation and compares the maximiser with glmer's estimates.  The PyMC
model's own log density (the graph :func:`harness.engines.pymc.build_model`
makes) is tied in by evaluating it at the conditional modes: its conditional
log-likelihood must equal the family's.

lme4 stops its penalised IRLS at a relative tolerance (``tolPwrss = 1e-7``)
and takes ``log det L`` from its last factorisation; solving the modes
exactly moves the approximation by about 1e-4 (cbpp: 2.8e-4).  The check
reproduces lme4's iteration from glmer's own starting linear predictor, and
the notes report the exact-mode value and its distance too.

When glmer warned or the maximiser climbs above glmer's ``logLik``, glmer is
refitted with lme4's other optimizers and from the maximiser's point
(:func:`harness.engines.lme4.refit_lme4`); the estimates are compared with the
best fit.  A higher Laplace likelihood with the identity holding is glmer
stopping short ("same model; lme4 did not reach its maximum"), never a
different model: that takes the identity itself failing.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import numpy as np
import pandas as pd

from harness.checks.laplace import laplace_loglik, maximise_laplace, theta_size
from harness.checks.marginal import evaluation_mode
from harness.engines.lme4 import optimizer_sentence
from harness.model.spec import Design

log = logging.getLogger("harness")

LOGLIK_TOLERANCE = 1e-6
FIXED_RTOL = 1e-4
FIXED_SE_FRACTION = 1e-3
THETA_RTOL = 1e-3
THETA_ATOL = 1e-4  # a theta at its boundary (singular fit)
#: The harness's maximiser must climb this far above an lme4 fit to count as higher.
OPTIMUM_LOGLIK_TOLERANCE = 1e-4

__all__ = ["glmm_same_model", "pymc_conditional_loglik", "theta_names"]


def theta_names(design: Design) -> list[str]:
    """lme4's theta names: ``herd.(Intercept)``, ``g.x.(Intercept)`` for off-diagonals."""
    names = []
    for block in design.blocks:
        k = block.n_terms
        cols, rows = np.triu_indices(k)
        for r, c in zip(rows, cols, strict=True):
            names.append(
                f"{block.label}.{block.terms[r]}"
                if r == c
                else f"{block.label}.{block.terms[r]}.{block.terms[c]}"
            )
    return names


def pymc_conditional_loglik(
    design: Design, theta: np.ndarray, beta: np.ndarray, u: np.ndarray
) -> float | None:
    """log p(y | beta, random effects) from the PyMC model's own graph at the modes.

    Only for designs whose blocks are scalar or uncorrelated (the model's
    offsets are then ``z * sd`` with ``sd = theta``); None otherwise.
    """
    if any(b.n_terms > 1 and b.correlated for b in design.blocks):
        return None
    from pymc.model.transform.conditioning import remove_value_transforms

    from harness.engines.pymc import build_model
    from harness.names import sd_var

    model = build_model(design)
    beta = np.asarray(beta, dtype=float)
    if "beta" in {rv.name for rv in model.free_RVs}:
        point: dict[str, Any] = {"beta": beta}
    else:  # one scalar per fixed effect (their priors' families differ, some bounded)
        point = {f"beta_{j}": value for j, value in enumerate(beta)}
    # The sampler moves beta in the centred basis (or onto a prior's support); set beta itself.
    model = remove_value_transforms(model, [model[name] for name in point])
    start_theta = start_u = 0
    for block in design.blocks:
        k, j = block.n_terms, block.n_levels
        sd = np.asarray(theta[start_theta : start_theta + k], dtype=float)
        start_theta += k
        point[f"z_{block.label}"] = u[start_u : start_u + j * k].reshape(j, k)
        start_u += j * k
        # The log transform of a zero SD is -inf; a singular SD is nudged (offsets z * sd = 0).
        point[f"{sd_var(block)}_log__"] = np.log(np.maximum(sd, 1e-300))
    point.update(design.family.model_point())  # the family's own parameters at lme4's values
    logp = model.compile_fn(  # one evaluation: no C compile of every node
        model.logp(vars=[model["y_obs"]], sum=True),
        inputs=model.value_vars,
        mode=evaluation_mode(),
    )
    return float(logp({k: point[k] for k in (v.name for v in model.value_vars)}))


def glmm_same_model(
    freq: Any, pymc_design: Design, engine: str, reasons: list[str], notes: list[str]
) -> dict[str, Any]:
    """The GLMM identity and optimum checks; returns the fields of :class:`SameModel`."""
    started = time.perf_counter()
    design: Design = freq.design
    ml = freq.ml_estimates
    theta = np.array(list(ml["theta"].values()), dtype=float)
    beta = np.array([ml["beta"][t] for t in design.fixed_terms], dtype=float)
    lp0 = ml.get("lp0")
    tol = float(ml.get("tol_pwrss", 1e-7))
    if design.family_params and pymc_design is not design:
        # glmer's likelihood holds the family's own parameters (glmer.nb's theta) fixed.
        pymc_design = dataclasses.replace(pymc_design, family_params=design.family_params)
    if pymc_design.family.key != design.family.key:
        reasons.append(f"family: lme4 {design.family.key}, PyMC {pymc_design.family.key}")
    if theta.size != theta_size(pymc_design) or pymc_design.fixed_terms != design.fixed_terms:
        reasons.append(
            "parameters: lme4 has fixed terms "
            f"{design.fixed_terms} and {theta.size} covariance parameters, the PyMC model "
            f"{pymc_design.fixed_terms} and {theta_size(pymc_design)}"
        )
        return {
            "loglik_pymc": float("nan"),
            "loglik_pymc_max": float("nan"),
            "estimates": pd.DataFrame(),
            "loglik_pymc_model": None,
        }
    at_ml = laplace_loglik(pymc_design, theta, beta, lme4_start=lp0, lme4_tol=tol)
    exact = laplace_loglik(pymc_design, theta, beta)
    loglik_lme4 = float(freq.loglik)
    difference = at_ml.loglik - loglik_lme4
    notes.append(
        f"Laplace approximation with the modes solved exactly: {exact.loglik:.8f} "
        f"({exact.loglik - loglik_lme4:+.2g} from glmer's logLik, which stops its penalised "
        f"IRLS at tolPwrss = {tol:g})"
    )
    if lp0 is None:
        notes.append("glmer's starting linear predictor was not returned; exact modes used")
        at_ml = exact
        difference = exact.loglik - loglik_lme4
    if not abs(difference) < LOGLIK_TOLERANCE:
        reasons.append(
            f"Laplace log-likelihood at glmer's estimates: glmer {loglik_lme4:.8f}, PyMC model "
            f"{at_ml.loglik:.8f}, difference {difference:.3g} (tolerance {LOGLIK_TOLERANCE:g})"
        )
    # The PyMC graph's likelihood at the same modes.
    model_loglik = None
    conditional = pymc_conditional_loglik(pymc_design, theta, beta, at_ml.u)
    if conditional is None:
        notes.append("the PyMC model's own density was not checked (correlated block)")
    else:
        model_loglik = conditional - at_ml.penalty - at_ml.log_det
        gap = conditional - at_ml.conditional_loglik
        if not abs(gap) < LOGLIK_TOLERANCE:
            reasons.append(
                f"PyMC model density: log p(y | modes) from build_model's graph {conditional:.8f}, "
                f"from the family {at_ml.conditional_loglik:.8f}"
            )
    identity_holds = not reasons  # the structure, the identity and the PyMC density
    optimum = maximise_laplace(pymc_design, theta0=theta, beta0=beta, lme4_start=lp0, lme4_tol=tol)
    harness_theta = np.asarray(optimum["theta"], dtype=float)
    harness_beta = optimum["beta"].to_numpy(dtype=float)

    # glmer's optimum is the reference unless glmer stopped short of it: when it warned, or
    # the harness climbs higher, lme4's other optimizers (and a start at the harness's
    # optimum) say whether a higher point exists; the estimates are then compared with it.
    refits = _glmer_refits(
        freq,
        (harness_theta, harness_beta) if pymc_design is design else None,
        higher=float(optimum["loglik"]) > loglik_lme4 + OPTIMUM_LOGLIK_TOLERANCE,
        notes=notes,
    )
    by_method = refits.best_fit["by_method"] if refits is not None else {}
    best = by_method.get("ML")
    if best is not None:
        notes.append(optimizer_sentence(by_method, "ML", laplace=True))
        if refits.best_fit.get("missing"):
            notes.append(
                "allFit's optimizers not tried (R packages missing): "
                + ", ".join(refits.best_fit["missing"])
            )
    short = bool(best and best["improved"])
    ref_theta, ref_beta, ref_loglik, who = theta, beta, loglik_lme4, engine
    at_best = None
    if short and best is not None:
        ref_theta = np.array(list(best["theta"].values()), dtype=float)
        ref_beta = np.array([best["beta"][t] for t in design.fixed_terms], dtype=float)
        ref_loglik = float(best["loglik"])
        who = f"lme4's best refit ({best['optimizer']} from {best['start']})"
        best_lp0 = best.get("lp0")
        at_best = laplace_loglik(
            pymc_design,
            ref_theta,
            ref_beta,
            lme4_start=best_lp0 if best_lp0 is not None else None,
            lme4_tol=float(best.get("tol_pwrss") or tol),
        ).loglik
        if not abs(at_best - ref_loglik) < LOGLIK_TOLERANCE:
            reasons.append(
                f"Laplace log-likelihood at {who}'s estimates: lme4 {ref_loglik:.8f}, PyMC model "
                f"{at_best:.8f}, difference {at_best - ref_loglik:.3g} "
                f"(tolerance {LOGLIK_TOLERANCE:g})"
            )
        if ref_loglik > float(optimum["loglik"]) + OPTIMUM_LOGLIK_TOLERANCE:
            # Below lme4's best refit.  glmer's Laplace value depends on where its penalised
            # IRLS restarts (lp0; a refit from a given start skips the nAGQ = 0 stage that
            # sets glmer's), by ~1e-3 where the modes converge slowly (guImmun): climb the
            # best refit's own function, from its point; keep the better.
            again = maximise_laplace(
                pymc_design,
                theta0=ref_theta,
                beta0=ref_beta,
                lme4_start=best_lp0 if best_lp0 is not None else lp0,
                lme4_tol=float(best.get("tol_pwrss") or tol),
            )
            notes.append(
                f"the harness's maximiser reached {float(optimum['loglik']):.6f} from glmer's "
                f"estimates, below {who}'s {ref_loglik:.6f}; from there it reaches "
                f"{float(again['loglik']):.6f}"
            )
            if float(again["loglik"]) > float(optimum["loglik"]):
                optimum = again
                harness_theta = np.asarray(optimum["theta"], dtype=float)
                harness_beta = optimum["beta"].to_numpy(dtype=float)
    # Above every lme4 fit: the identity holds, so the harness's maximiser climbs glmer's own
    # likelihood higher than lme4 does; lme4 stopped short, and the estimates, compared
    # between a maximum and a point that is not one, are no test of the model.
    above = float(optimum["loglik"]) > ref_loglik + OPTIMUM_LOGLIK_TOLERANCE
    harness_best = above and identity_holds
    # Below lme4's best fit even so: the harness's maximiser, not the model, stopped short.
    harness_short = (
        identity_holds and ref_loglik > float(optimum["loglik"]) + OPTIMUM_LOGLIK_TOLERANCE
    )
    if harness_short:
        notes.append(
            f"the harness's maximiser stopped at {float(optimum['loglik']):.6f}, below {who}'s "
            f"{ref_loglik:.6f} of the same Laplace likelihood: its estimates are not a maximum, "
            "so they are no test of the model"
        )
    if harness_best:
        notes.append(
            f"lme4 did not reach its maximum (Laplace log-likelihood {loglik_lme4:.6f} at lme4's "
            f"estimates, {float(optimum['loglik']):.6f} at the best fit: the harness's maximiser "
            f"of the same Laplace likelihood; lme4's best refit {ref_loglik:.6f})"
        )
    rows = []
    names = theta_names(design)
    standard_errors = dict(zip(freq.fixed["term"], freq.fixed["se"], strict=True))
    for kind, labels, a_values, b_values, originals in (
        ("fixed", design.fixed_terms, ref_beta, harness_beta, beta),
        ("theta", names, ref_theta, harness_theta, theta),
    ):
        for name, a, b, a0 in zip(labels, a_values, b_values, originals, strict=True):
            diff = abs(b - a)
            if kind == "fixed":
                # glmer's optimiser stops on the deviance, so a flat likelihood leaves its
                # beta loose by a small fraction of an SE (VerbAgg: 3e-5 on 0.12, SE 0.75).
                se = float(standard_errors.get(name, 0.0))
                tolerance = f"{FIXED_RTOL:g} relative or {FIXED_SE_FRACTION:g} SE"
                ok = diff <= max(FIXED_RTOL * abs(a), FIXED_SE_FRACTION * se, 1e-10)
            else:
                tolerance = f"{THETA_RTOL:g} relative or {THETA_ATOL:g} absolute"
                ok = diff <= max(THETA_RTOL * abs(a), THETA_ATOL)
            rows.append(
                {
                    "parameter": name,
                    "kind": kind,
                    **({"lme4_original": a0} if short else {}),
                    "lme4": a,
                    "harness": b,
                    "abs_diff": diff,
                    "rel_diff": diff / abs(a) if a else np.nan,
                    "tolerance": tolerance,
                    "ok": bool(ok),
                }
            )
            if not ok:
                text = (
                    f"ML estimate of {name}: {who} {a:.8g}, maximiser of the PyMC model's "
                    f"Laplace likelihood {b:.8g} (tolerance {tolerance})"
                )
                (notes if harness_best or harness_short else reasons).append(text)
    if above and not identity_holds:
        reasons.append(
            f"maximised Laplace log-likelihood {optimum['loglik']:.8f} is above {who}'s "
            f"{ref_loglik:.8f}"
        )
    log.debug("GLMM same-model checks took %.2f s", time.perf_counter() - started)
    return {
        "loglik_pymc": at_ml.loglik,
        "loglik_pymc_max": float(optimum["loglik"]),
        "estimates": pd.DataFrame(rows),
        "loglik_pymc_model": model_loglik,
        "optimizer": {
            "method": "L-BFGS-B then Nelder-Mead (scipy) on the Laplace likelihood",
            "message": optimum["message"],
        },
        "lme4_refits": refits.optimizer_refits if refits is not None else None,
        "lme4_best": refits.best_fit if refits is not None else {},
        "lme4_short": short or harness_best,
        "loglik_lme4_best": ref_loglik if short else None,
        "loglik_pymc_at_best": at_best,
    }


def _glmer_refits(
    freq: Any, optimum: tuple[np.ndarray, np.ndarray] | None, *, higher: bool, notes: list[str]
) -> Any:
    """``freq`` refitted with lme4's other optimizers when glmer warned or the harness is higher.

    ``optimum`` (theta and beta of the harness's Laplace maximum, on glmer's
    design) is one more start.  None when none was needed; a failure is a note.
    """
    from harness.engines.lme4 import refit_lme4, refits_apply

    if not (higher or not freq.converged) or not refits_apply(freq):
        return None
    theta, beta = optimum if optimum is not None else (None, None)
    try:
        return refit_lme4(freq, start=theta, beta=beta)
    except (RuntimeError, ValueError) as err:
        log.warning("refits with lme4's other optimizers failed: %s", err)
        notes.append(f"refits with lme4's other optimizers failed: {err}")
        return None
