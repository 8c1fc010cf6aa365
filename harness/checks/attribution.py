"""Why lme4's estimate and the posterior summary differ: the gap split into named sources.

For every compared quantity the gap ``posterior summary - lme4 estimate`` is
split, in the row's own units, into

``prior``
    the posterior summary minus the same summary under a much wider prior
    (the ``flat`` profile).  The wide-prior posterior comes from
    Pareto-smoothed importance sampling of the draws (ArviZ ``psislw``; the
    log weights are ``log p_wide(theta) - log p_current(theta)`` over the
    fixed effects, the group SDs, the residual SD(s) and the LKJ
    correlations), or, when the Pareto k-hat exceeds 0.7, from a refit with
    the wide prior;
``summary``
    a posterior median (or mean) against a point estimate.  For a fixed
    effect of a Gaussian model it is the share of integrating over the
    variance components: lme4's estimate is the GLS estimate at the REML
    variance components, ``beta_hat(theta_hat)``, while the posterior mean is
    ``E_theta[E[beta | theta, y]]``, and with flat priors on ``beta``
    ``E[beta | theta, y]`` is the GLS estimate at ``theta``.  So the summary's
    share is the wide-prior-weighted mean of the GLS estimates at
    :data:`INTEGRATION_DRAWS` evenly spaced posterior draws of the variance
    components minus the GLS estimate at lme4's own (which reproduces lme4's
    estimate; a mismatch beyond :data:`GLS_CHECK_SE` lme4 SEs drops the share
    with a note).  A GLMM's share is measured from the exact ML estimate
    (:mod:`harness.checks.glmm_attribution`).  For a variance component: the wide-prior
    posterior's summary minus its mode.  With flat priors the fixed effects
    integrate out into the REML likelihood, so the mode of a variance
    component's marginal posterior sits near lme4's REML estimate; the
    distance from the median to that mode is the skew of the posterior;
``laplace``
    GLMMs only: the maximum of the exact marginal likelihood (adaptive
    quadrature or importance sampling) minus glmer's Laplace estimate
    (:mod:`harness.checks.glmm_attribution`);
``boundary``
    lme4's SD at 0 (singular fit) or a correlation at +/-1: a posterior of a
    bounded quantity cannot be centred on its bound, so the gap up to the
    wide-prior posterior's near tail is the boundary's, and the posterior
    mass beyond that tail is the summary's;
``lme4_optimizer``
    lme4 did not reach its maximum: the shift from lme4's estimate to its
    best refit with another optimizer or start (``FreqFit.best_fit``, see
    :func:`harness.engines.lme4.refit_lme4`); the other sources are then
    measured from the best refit's estimate;
``remainder``
    what is left; the row fails only when it exceeds
    ``max(3 MCSE, the row's tolerance)``.

``mcse`` (the Monte Carlo error of the summary) is reported beside them: it
is the size below which no gap means anything.  The offsets' agreement rows
(correlation of lme4's conditional modes with the posterior means) are
explained by a chain of replacements that telescopes exactly: the posterior
means against the conditional modes at the posterior's variance components
(averaging over their uncertainty, and Monte Carlo noise), those against the
modes at the wide-prior posterior's variance components (the prior), those
against the modes at lme4's own estimates (the summary of the variance
components), and the last against lme4's modes (``remainder``: zero when
both engines fit the same model).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from harness.checks.noise import noise_floor

if TYPE_CHECKING:
    from harness.fits import BayesFit
    from harness.model.priors import ResolvedPriors

log = logging.getLogger("harness")

#: The prior profile the gaps are measured against.
WIDE_PROFILE = "flat"
#: Pareto k-hat above which importance weights are not trusted (Vehtari et al. 2024).
K_HAT_MAX = 0.7
#: Tolerances on what the named sources leave unexplained.
REMAINDER_MCSE = 3.0  # |remainder| must exceed this many MCSE to fail ...
REMAINDER_VARIANCE_SD = 0.5  # ... and this many posterior SDs (variance rows)
REMAINDER_CORRELATION = 0.02  # agreement rows: correlation not explained
#: Relative size under which an lme4 SD counts as 0, and |cor| as 1.
BOUNDARY_SD_RATIO = 1e-4
BOUNDARY_COR = 1.0 - 1e-6
SOURCES = ("prior", "summary", "boundary", "remainder")
#: A posterior "piled against" a bound has density there of at least this fraction of its peak.
BULK_FRACTION = 0.1
#: Edges of the bulk this close to the bound (in posterior SDs) are KDE resolution, not distance.
BOUNDARY_EDGE_SD = 0.1
#: Posterior draws whose conditional means average to E[u | y] (agreement rows).
RB_DRAWS = 40
#: RMS, over a term's informed groups, of (posterior mean - E[E[u|y,theta]]) / MCSE above which
#: the posterior means are not those of the model's offsets.
RB_Z_MAX = 3.0
#: The source of a gap that lme4's optimizer leaves (it stopped short of its maximum).
OPTIMIZER_SOURCE = "lme4_optimizer"
#: Kernel width (posterior SDs) and the least kernel ESS for a conditional mode.
CONDITION_BANDWIDTH = 0.35
MIN_CONDITION_ESS = 50.0
#: Other components enter the conditioning when their draws correlate this much (at most 3).
CONDITION_MIN_CORRELATION = 0.2
CONDITION_MAX = 3
#: Posterior draws (evenly spaced, so deterministic) at which the GLS fixed effects are recomputed.
INTEGRATION_DRAWS = 300
#: The GLS estimate at lme4's variance components must reproduce lme4's to this many lme4 SEs.
GLS_CHECK_SE = 0.01


# --------------------------------------------------------------------------- weighted summaries


def weighted_quantile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    """Quantile ``q`` of a weighted sample (weights need not be normalised)."""
    order = np.argsort(values)
    v, w = values[order], weights[order]
    cum = np.cumsum(w)
    cum = (cum - 0.5 * w) / cum[-1]
    return float(np.interp(q, cum, v))


def weighted_summary(values: np.ndarray, weights: np.ndarray, how: str) -> float:
    """``mean`` or ``median`` of a weighted sample."""
    if how == "mean":
        return float(np.sum(values * weights) / np.sum(weights))
    return weighted_quantile(values, weights, 0.5)


def weighted_mode(
    values: np.ndarray,
    weights: np.ndarray,
    lower: float | None = None,
    upper: float | None = None,
    grid: int = 512,
) -> float:
    """Mode of a weighted Gaussian KDE, reflected at the bounds of the support.

    Reflection keeps the density of an SD near 0 (or of a correlation near
    +/-1) from leaking past the bound, where a plain KDE would pull the mode
    inwards.
    """
    values = np.asarray(values, dtype=float)
    if np.ptp(values) == 0:
        return float(values[0])
    xs, density = weighted_density(values, weights, lower, upper, grid)
    return float(xs[int(np.argmax(density))])


def weighted_density(
    values: np.ndarray,
    weights: np.ndarray,
    lower: float | None = None,
    upper: float | None = None,
    grid: int = 512,
) -> tuple[np.ndarray, np.ndarray]:
    """A weighted Gaussian KDE reflected at the bounds, on a grid spanning the draws and bounds."""
    values = np.asarray(values, dtype=float)
    weights = np.asarray(weights, dtype=float)
    pieces, wpieces = [values], [weights]
    if lower is not None:
        pieces.append(2 * lower - values)
        wpieces.append(weights)
    if upper is not None:
        pieces.append(2 * upper - values)
        wpieces.append(weights)
    # Bandwidth from the sample itself (Scott's rule on its effective size), not from the
    # mirrored cloud, whose spread the reflection inflates.
    n_eff = np.sum(weights) ** 2 / np.sum(weights**2)
    mean = np.sum(values * weights) / np.sum(weights)
    sd = np.sqrt(np.sum(weights * (values - mean) ** 2) / np.sum(weights))
    bandwidth = max(sd * n_eff ** (-1 / 5), 1e-300)
    cloud, cloud_w = np.concatenate(pieces), np.concatenate(wpieces)
    lo = max(values.min(), lower) if lower is not None else values.min()
    hi = min(values.max(), upper) if upper is not None else values.max()
    xs = np.linspace(lo, hi, grid)
    density = np.array(
        [np.sum(cloud_w * np.exp(-0.5 * ((x - cloud) / bandwidth) ** 2)) for x in xs]
    )
    return xs, density


def bulk_edge(
    values: np.ndarray,
    weights: np.ndarray,
    bounds: tuple[float | None, float | None],
    side: str,
    fraction: float = BULK_FRACTION,
) -> float:
    """Where the posterior's bulk begins, seen from a bound.

    From the bound (``side`` "lower" or "upper") inwards, the first point where
    the reflected KDE reaches ``fraction`` of its peak.  A posterior piled
    against the bound starts at the bound itself.
    """
    values = np.asarray(values, dtype=float)
    if np.ptp(values) == 0:
        return float(values[0])
    lower, upper = bounds
    xs, density = weighted_density(values, weights, lower, upper)
    # Extend to the bound itself: the grid starts at the draws' extreme.
    bound = lower if side == "lower" else upper
    if bound is not None:
        xs = np.concatenate([[bound], xs]) if side == "lower" else np.concatenate([xs, [bound]])
        at_bound = weighted_density(values, weights, lower, upper, grid=2)[1]
        edge_value = at_bound[0] if side == "lower" else at_bound[-1]
        density = (
            np.concatenate([[edge_value], density])
            if side == "lower"
            else np.concatenate([density, [edge_value]])
        )
    above = density >= fraction * density.max()
    if side == "lower":
        return float(xs[int(np.argmax(above))])
    return float(xs[len(xs) - 1 - int(np.argmax(above[::-1]))])


def conditional_weights(
    weights: np.ndarray, conditioning: list[tuple[np.ndarray, float]]
) -> np.ndarray:
    """``weights`` times a Gaussian kernel around the given values of other quantities."""
    log_k = np.zeros_like(weights)
    for values, at in conditioning:
        sd = float(np.std(values))
        if sd > 0:
            log_k += -0.5 * ((values - at) / (CONDITION_BANDWIDTH * sd)) ** 2
    local = weights * np.exp(log_k - np.max(log_k))
    return local / local.sum()


def pick_conditioning(
    values: np.ndarray, others: dict[str, tuple[np.ndarray, float]]
) -> list[tuple[np.ndarray, float]]:
    """The other components whose draws move with ``values`` (rank correlation >= 0.2)."""
    from scipy.stats import spearmanr

    scored = []
    for draws, at in others.values():
        if np.std(draws) == 0 or not np.isfinite(at):
            continue
        rho = float(spearmanr(values, draws)[0])
        if np.isfinite(rho) and abs(rho) >= CONDITION_MIN_CORRELATION:
            scored.append((abs(rho), draws, at))
    scored.sort(key=lambda item: -item[0])
    return [(draws, at) for _, draws, at in scored[:CONDITION_MAX]]


# --------------------------------------------------------------------------- the wide prior


def _logp_graph(prior: Any, values: np.ndarray) -> Any:
    """Log density of a harness Prior at values, as a PyMC graph (PyMC's own logp: any family)."""
    import pymc as pm

    dist = getattr(pm, prior.dist).dist(**dict(prior.params))
    return pm.logp(dist, np.asarray(values, dtype=float))


def _lkj_logp(eta: float, corr: np.ndarray) -> np.ndarray:
    """LKJ log density up to its constant: ``(eta - 1) log det R`` per draw."""
    if eta == 1.0:
        return np.zeros(corr.shape[0])
    sign, logdet = np.linalg.slogdet(corr)
    return (eta - 1.0) * np.where(sign > 0, logdet, -np.inf)


def prior_logp(bayes: BayesFit, priors: ResolvedPriors) -> np.ndarray:
    """Log prior density of every draw (chain-major, flattened) under ``priors``.

    Only the parameters whose priors a profile sets enter: the fixed effects,
    the group SDs, the residual SD(s) and each correlated block's correlation
    matrix.  The offsets' standard-normal prior is the same under every
    profile and cancels.
    """
    return prior_logps(bayes, [priors])[0]


def prior_logps(bayes: BayesFit, profiles: list[ResolvedPriors]) -> list[np.ndarray]:
    """:func:`prior_logp` under each of several priors, from one compiled PyTensor function.

    Compiling costs far more than evaluating these densities, so every term
    of every profile is evaluated by one function (``.eval()`` per term
    compiled ten functions per comparison); the terms are then added in the
    order :func:`prior_logp` documents.
    """
    import pytensor

    from harness.checks.marginal import compile_mode
    from harness.names import corr_var, sd_var, term_dim

    posterior = bayes.idata.posterior
    n = posterior.sizes["chain"] * posterior.sizes["draw"]
    graphs: list[Any] = []
    plans: list[list[tuple[str, Any]]] = []  # per profile: ("graph", index) or ("array", values)
    for priors in profiles:
        plan: list[tuple[str, Any]] = []
        beta = posterior["beta"]
        for term, prior in priors.fixed.items():
            graphs.append(_logp_graph(prior, beta.sel(fixed_term=term).values.reshape(n)))
            plan.append(("graph", len(graphs) - 1))
        for block in bayes.design.blocks:
            sds = posterior[sd_var(block)]
            for term in block.terms:
                values = sds.sel({term_dim(block): term}).values.reshape(n)
                graphs.append(_logp_graph(priors.sd[(block.label, term)], values))
                plan.append(("graph", len(graphs) - 1))
            if block.correlated and block.n_terms > 1 and corr_var(block) in posterior:
                corr = posterior[corr_var(block)].values.reshape(n, block.n_terms, block.n_terms)
                plan.append(("array", _lkj_logp(priors.lkj_eta, corr)))
        if "sigma" in posterior:  # binomial / Poisson models have no residual SD
            sigma = posterior["sigma"].values.reshape(n, -1)
            graphs.append(_logp_graph(priors.sigma, sigma))
            plan.append(("sigma", len(graphs) - 1))
        plans.append(plan)
    # Python thunks and light rewrites (as for the marginal likelihood): the C linker's
    # module cache alone takes a second to open in a fresh process.
    values = pytensor.function([], graphs, mode=compile_mode())() if graphs else []
    totals = []
    for plan in plans:
        total = np.zeros(n)
        for kind, item in plan:
            if kind == "array":
                total += item
            elif kind == "graph":
                total += np.asarray(values[item], dtype=float)
            else:
                total += np.asarray(values[item], dtype=float).reshape(n, -1).sum(axis=1)
        totals.append(total)
    return totals


@dataclass
class WidePrior:
    """The posterior under the wide prior: importance weights on the draws, or a refit.

    ``weights`` are normalised over the flattened (chain-major) draws of the
    fit they belong to: the original fit for ``method == "psis"``, ``refit``
    (uniform weights) for ``method == "refit"``.
    """

    method: str
    k_hat: float
    weights: np.ndarray
    refit: BayesFit | None = None
    note: str = ""
    profile: str = WIDE_PROFILE

    def source(self, original: BayesFit) -> BayesFit:
        """The fit whose draws ``weights`` weigh."""
        return self.refit if self.refit is not None else original

    def describe(self) -> str:
        if self.method == "refit":
            return f"refit with the wide prior (PSIS k-hat {self.k_hat:.2f} > {K_HAT_MAX})"
        if self.method == "none":
            return "no wide-prior posterior"
        return f"k-hat {self.k_hat:.2f}"


def wide_priors(bayes: BayesFit) -> ResolvedPriors:
    """The wide (``flat`` profile) priors for ``bayes``'s design."""
    from harness.model.priors import resolve_priors
    from harness.model.spec import Design

    design = bayes.design
    wide_design = Design(**{**design.__dict__, "spec": design.spec.with_(priors=WIDE_PROFILE)})
    return resolve_priors(wide_design)


def reweight_to_wide_prior(bayes: BayesFit, *, refit: bool = True) -> WidePrior:
    """Re-weight ``bayes``'s draws to the wide prior by PSIS; refit when k-hat > 0.7.

    Parameters
    ----------
    bayes : BayesFit
    refit : bool
        Refit with the wide prior (same sampler, seed, draws) when the
        weights are not trustworthy.  Without it the weights are used anyway,
        and the note says so.

    Returns
    -------
    WidePrior
    """
    import arviz as az

    wide = wide_priors(bayes)
    wide_logp, fit_logp = prior_logps(bayes, [wide, bayes.priors])
    log_w = wide_logp - fit_logp
    n = log_w.shape[0]
    if bayes.priors.profile == WIDE_PROFILE and not _has_overrides(bayes):
        return WidePrior("psis", 0.0, np.full(n, 1.0 / n), note="the fit's prior is the wide one")
    finite = np.isfinite(log_w)
    if not finite.all():
        log_w = np.where(finite, log_w, -np.inf)
    smoothed, k_hat = az.psislw(log_w - np.max(log_w[finite]), reff=1.0)
    weights = np.exp(np.asarray(smoothed, dtype=float))
    weights = weights / weights.sum()
    k_hat = float(np.asarray(k_hat))
    if k_hat <= K_HAT_MAX:
        return WidePrior("psis", k_hat, weights)
    if not refit:
        return WidePrior(
            "psis",
            k_hat,
            weights,
            note=f"PSIS k-hat {k_hat:.2f} > {K_HAT_MAX}: the prior's share is rough (no refit)",
        )
    try:
        wide_fit = _refit_wide(bayes)
    except Exception as err:  # a refit is best effort; the weights still say something
        log.warning("refit with the wide prior failed: %s", err)
        return WidePrior(
            "psis",
            k_hat,
            weights,
            note=f"PSIS k-hat {k_hat:.2f} > {K_HAT_MAX} and the refit failed ({err}): "
            "the prior's share is rough",
        )
    m = wide_fit.idata.posterior.sizes["chain"] * wide_fit.idata.posterior.sizes["draw"]
    return WidePrior(
        "refit",
        k_hat,
        np.full(m, 1.0 / m),
        refit=wide_fit,
        note=f"PSIS k-hat {k_hat:.2f} > {K_HAT_MAX}: refitted with the wide prior",
    )


def _has_overrides(bayes: BayesFit) -> bool:
    return not isinstance(bayes.spec.priors, str)


def _refit_wide(bayes: BayesFit) -> BayesFit:
    from harness.engines.pymc import fit_pymc

    spec = bayes.spec.with_(priors=WIDE_PROFILE)
    log.info("refitting %s with the wide prior", spec.name or spec.formula)
    samplers = [bayes.sampler] + (["pymc"] if bayes.sampler != "pymc" else [])
    for i, sampler in enumerate(samplers):
        try:
            return fit_pymc(
                spec,
                bayes.design.data,
                seed=bayes.seed,
                draws=bayes.draws,
                tune=bayes.tune,
                chains=bayes.chains,
                sampler=sampler,
                target_accept=float(bayes.settings.get("target_accept", 0.8)),
            )
        except Exception as err:
            # nutpie can fail to find a starting point under the flat profile's huge scales
            # (seen on Orthodont); PyMC's own NUTS starts from the model's initial point.
            if i == len(samplers) - 1:
                raise
            log.warning(
                "wide-prior refit with %s failed (%s); trying %s", sampler, err, samplers[i + 1]
            )
    raise AssertionError("unreachable")  # pragma: no cover


# --------------------------------------------------------------------------- one row


@dataclass
class RowAttribution:
    """The gap of one row, split into sources, with the verdict those sources allow."""

    gap: float
    mcse: float
    attribution: dict[str, float | None]
    explained: bool
    explanation: str
    tolerance: str
    extra: dict[str, Any] = field(default_factory=dict)


def _fmt(value: float | None, spec: str = "+.3g") -> str:
    # An undefined number says so: "nan" in a sentence tells a reader nothing.
    if value is None or not np.isfinite(value):
        return "undefined"
    return f"{value:{spec}}"


def attribute_row(
    draws: np.ndarray,
    estimate: float,
    *,
    how: str,
    wide_values: np.ndarray,
    wide: WidePrior,
    scale: float,
    scale_name: str,
    tolerance: float,
    tolerance_text: str,
    bounds: tuple[float | None, float | None] = (None, None),
    boundary: str | None = None,
    use_mode: bool = True,
    conditioning: list[tuple[np.ndarray, float]] | None = None,
    integration: float | None = None,
    laplace: float | None = None,
    laplace_text: str = "",
    integration_text: str = "",
    summary_at: float | None = None,
    optimizer_shift: float | None = None,
    optimizer_text: str = "",
) -> RowAttribution:
    """Split ``summary(draws) - estimate`` into prior, summary, boundary and remainder.

    Parameters
    ----------
    draws : array (chain, draw)
        The posterior draws of the quantity under the fit's prior.
    estimate : float
        lme4's estimate.
    how : {"mean", "median"}
        The posterior summary the row compares.
    wide_values : array
        The same quantity's draws that ``wide.weights`` weigh (flattened).
    wide : WidePrior
    scale, scale_name : float, str
        The row's scale (lme4 SE, posterior SD) and its name, for the sentence.
    tolerance : float
        What the remainder may be, in the row's units, besides ``3 MCSE``.
    tolerance_text : str
        The tolerance in words.
    bounds : (lower, upper)
        Support of the quantity (0 for SDs, +/-1 for correlations).
    boundary : {"lower", "upper"}, optional
        lme4's estimate sits on that bound.
    use_mode : bool
        Measure the summary's share (median or mean against the mode).  Off for
        fixed effects, whose posteriors are symmetric to within KDE noise.
    conditioning : list of (values, estimate), optional
        The wide-prior draws of the other variance components that move with
        this one, and lme4's estimates of them.  lme4's estimate is a joint
        mode; the posterior's mode is a marginal one.  Kernel weights
        (Gaussian, :data:`CONDITION_BANDWIDTH` posterior SDs) around lme4's
        values give the mode conditional on them, and the distance between the
        two modes joins the summary's share.
    integration : float, optional
        Without ``use_mode`` (fixed effects): the share of integrating over
        the variance components (:func:`integrate_variance_components`), which
        becomes the summary's share.
    laplace : float, optional
        A GLMM's ``laplace`` source: the exact ML estimate minus glmer's
        (:mod:`harness.checks.glmm_attribution`); with ``optimizer_shift``,
        the share is measured from the best refit (the Laplace maximum).  The summary's share is then
        measured from the exact ML estimate, and the remainder is what neither
        explains.
    laplace_text, integration_text : str
        How the Laplace share and (fixed effects) the summary's share were
        computed, for the sentence.
    summary_at : float, optional
        The same summary (``how``) of the wide-prior posterior computed without
        draws (a GLMM's variance component: from the exact likelihood).  The
        summary's share is then that summary minus the mode (lme4's estimate
        plus ``laplace``), and the remainder is the draws' summary minus it.
    optimizer_shift : float, optional
        lme4's best refit minus ``estimate`` when lme4 did not reach its
        maximum: the ``lme4_optimizer`` source.  The other sources are then
        measured from the best refit's estimate (``integration``, measured
        from lme4's own estimate, gives up the shift it already holds).
    optimizer_text : str
        What the refits found (:func:`harness.engines.lme4.optimizer_sentence`).
    """
    import arviz as az

    draws = np.asarray(draws, dtype=float)
    flat = draws.ravel()
    post = float(np.mean(flat)) if how == "mean" else float(np.median(flat))
    mcse = float(np.asarray(az.mcse(draws, method=how)).ravel()[0])
    gap = post - estimate
    opt = float(optimizer_shift) if optimizer_shift is not None else 0.0
    opt = opt if np.isfinite(opt) else 0.0
    values = np.asarray(wide_values, dtype=float).ravel()
    weights = wide.weights
    at_wide = weighted_summary(values, weights, how)
    prior = post - at_wide
    parts: dict[str, float | None] = {"mcse": mcse, "prior": prior}
    extra: dict[str, Any] = {"k_hat": wide.k_hat, "prior_method": wide.method}
    lap = 0.0  # the Laplace share: lme4's estimate moved to the exact ML estimate
    if laplace is not None and np.isfinite(laplace):
        # ``laplace`` runs from glmer's estimate; when glmer stopped short, the optimizer's
        # share holds the way to the Laplace maximum and the Laplace share the rest.
        lap = float(laplace) - opt
        parts["laplace"] = lap
        extra["laplace_text"] = laplace_text
    # What the other sources are measured from: the best fit lme4 reaches (its own
    # estimate without refits), moved to the exact ML estimate for a GLMM.
    reference = estimate + opt + lap
    if integration_text:
        extra["integration_text"] = integration_text
    if boundary is not None:
        q = 0.025 if boundary == "lower" else 0.975
        tail = weighted_quantile(values, weights, q)
        # The bound explains the gap up to the near tail only for a posterior piled against
        # it: its mode must lie between the bound and that tail.  A mode beyond the tail is a
        # posterior that disagrees with lme4's boundary estimate: the remainder, honestly.
        # The bound explains the gap up to the near tail only for a posterior piled against
        # it.  Where the posterior's bulk begins away from the bound (its density there under
        # BULK_FRACTION of its peak), lme4's boundary estimate and the posterior disagree: the
        # distance from lme4's estimate to that edge is the remainder, honestly.
        edge = bulk_edge(values, weights, bounds, boundary)
        far = edge - reference
        if abs(far) <= BOUNDARY_EDGE_SD * float(np.std(values)):
            far = 0.0
        lower_side = boundary == "lower"
        start = reference + far
        boundary_share = max(tail - start, 0.0) if lower_side else min(tail - start, 0.0)
        parts["boundary"] = boundary_share
        parts["remainder"] = far
        parts["summary"] = at_wide - reference - far - boundary_share
        extra["bulk_edge"] = edge
    elif summary_at is not None and np.isfinite(summary_at):
        parts["summary"] = float(summary_at) - reference
        parts["boundary"] = 0.0
        parts["remainder"] = at_wide - float(summary_at)
        extra["summary_at"] = float(summary_at)
        extra["integration_text"] = integration_text
    elif use_mode:
        mode = weighted_mode(values, weights, *bounds)
        joint = mode
        if conditioning:
            local = conditional_weights(weights, conditioning)
            n_eff = float(np.sum(local) ** 2 / np.sum(local**2))
            if n_eff >= MIN_CONDITION_ESS:
                joint = weighted_mode(values, local, *bounds)
                extra["conditional_mode"] = joint
                extra["conditional_ess"] = n_eff
        parts["summary"] = at_wide - joint
        parts["boundary"] = 0.0
        parts["remainder"] = joint - reference
        extra["wide_mode"] = mode
        extra["skew"] = at_wide - mode
    else:
        # A Gaussian integration share is measured from lme4's own estimate: it holds opt.
        # A GLMM's (with ``laplace``) is measured from the exact ML estimate, the reference.
        held = opt if laplace is None or not np.isfinite(laplace) else 0.0
        share = float(integration) - held if integration is not None else 0.0
        parts["summary"] = share
        parts["boundary"] = 0.0
        parts["remainder"] = at_wide - reference - share
        if integration is not None:
            extra["variance_components"] = share
    if optimizer_shift is not None:
        parts[OPTIMIZER_SOURCE] = opt
    remainder = float(parts["remainder"] or 0.0)
    limit = max(REMAINDER_MCSE * mcse, tolerance)
    explained = abs(remainder) <= limit
    extra["remainder_in_mcse"] = remainder / mcse if mcse > 0 else float("nan")
    sentence = _sentence(gap, parts, how, scale, scale_name, wide, boundary, mcse, estimate, extra)
    if optimizer_shift is not None:
        sentence = _with_optimizer(sentence, opt, estimate + opt, optimizer_text)
    tol = f"|remainder| <= max({REMAINDER_MCSE:g} MCSE, {tolerance_text})"
    return RowAttribution(
        gap=gap,
        mcse=mcse,
        attribution={k: _clean(v) for k, v in parts.items()},
        explained=explained,
        explanation=sentence,
        tolerance=tol,
        extra=extra,
    )


def _with_optimizer(sentence: str, shift: float, reference: float, text: str) -> str:
    """The sentence with the ``lme4_optimizer`` share after its opening (the gap)."""
    head, sep, rest = sentence.partition("; ")
    piece = (
        f"{text or 'lme4 did not reach its maximum'}: its best refit moves lme4's estimate by "
        f"{_fmt(shift)} to {reference:.4g}, and the other sources are measured from there"
    )
    return f"{head}; {piece}{sep}{rest}" if sep else f"{head}; {piece}"


def _clean(value: float | None) -> float | None:
    if value is None or not np.isfinite(value):
        return None
    return float(value)


def _sentence(
    gap: float,
    parts: dict[str, float | None],
    how: str,
    scale: float,
    scale_name: str,
    wide: WidePrior,
    boundary: str | None,
    mcse: float,
    estimate: float,
    extra: dict[str, Any],
) -> str:
    floor = noise_floor(scale, mcse)

    def share(value: float | None) -> str:
        # A share below the row's numerical noise is 0, as the report's picture draws it.
        if value is not None and np.isfinite(value) and abs(value) < floor:
            value = 0.0
        return _fmt(value)

    in_scale = f" ({_fmt(gap / scale, '+.2g')} {scale_name})" if scale > 0 else ""
    pieces = [
        f"gap {_fmt(gap)}{in_scale} of the posterior {how} from lme4's {_fmt(estimate, '.4g')}"
    ]
    pieces.append(f"the prior accounts for {share(parts['prior'] or 0.0)} ({wide.describe()})")
    if parts.get("laplace") is not None:
        pieces.append(
            f"glmer's Laplace approximation accounts for {share(parts['laplace'] or 0.0)} "
            f"({extra.get('laplace_text') or 'exact ML estimate minus glmer'})"
        )
    if boundary is not None:
        bound = "0 (singular fit)" if boundary == "lower" and estimate >= 0 else f"{estimate:+.0f}"
        pieces.append(
            f"lme4's estimate is on the boundary {bound}: {share(parts['boundary'] or 0.0)} up to "
            f"the posterior's {'2.5%' if boundary == 'lower' else '97.5%'} tail, "
            f"{share(parts['summary'] or 0.0)} of posterior mass beyond it (a posterior "
            "cannot be centred on its bound)"
        )
    elif "summary_at" in extra:
        pieces.append(
            f"the summary accounts for {share(parts['summary'] or 0.0)}: the {how} of the "
            f"wide-prior posterior computed from the exact likelihood ({extra['summary_at']:.4g}; "
            f"{extra.get('integration_text') or 'no draws'}) against its joint mode, the exact ML "
            "estimate"
        )
    elif "conditional_mode" in extra:
        # With a Laplace share the conditioning values are the exact ML estimates (GLMMs).
        held = "the exact ML values" if parts.get("laplace") is not None else "lme4's values"
        pieces.append(
            f"the summary accounts for {share(parts['summary'] or 0.0)}: the {how} of a skewed "
            f"posterior against its mode {share(extra['skew'])}, and that marginal mode "
            f"({extra['wide_mode']:.4g}) against the mode with the components that move with it "
            f"held at {held} ({extra['conditional_mode']:.4g}, a joint mode as lme4's is) "
            f"{share(extra['wide_mode'] - extra['conditional_mode'])}"
        )
    elif "variance_components" in extra:
        how_integrated = extra.get("integration_text") or (
            "the posterior mean averages the GLS estimate over the variance components' "
            "posterior, lme4's is the GLS estimate at its own (REML) variance components"
        )
        pieces.append(
            f"the summary accounts for {share(parts['summary'] or 0.0)}: {how_integrated}"
        )
    elif summary := parts.get("summary"):
        pieces.append(f"the {how} of a skewed posterior against its mode {share(summary)}")
    remainder = float(parts["remainder"] or 0.0)
    in_mcse = f"{_fmt(remainder / mcse, '+.1f')} MCSE" if mcse > 0 else "n/a MCSE"
    pieces.append(f"the rest is {share(remainder)} = {in_mcse} (MCSE {_fmt(mcse, '.2g')})")
    text = "; ".join(pieces)
    if wide.note:
        text += f" [{wide.note}]"
    return text


# --------------------------------------------------------------------------- fixed effects


@dataclass
class VarianceIntegration:
    """What integrating over the variance components moves each fixed effect by.

    ``shares`` (term -> amount) is the wide-prior-weighted mean of the GLS
    estimates at ``n_draws`` posterior draws minus ``at_lme4``, the GLS
    estimate at lme4's own variance components; ``check`` is the largest
    ``|at_lme4 - lme4's estimate|`` in lme4 SEs.
    """

    shares: dict[str, float]
    at_lme4: dict[str, float]
    n_draws: int
    check: float
    gls_draws: np.ndarray = field(repr=False, default_factory=lambda: np.zeros((0, 0)))
    weights: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))


def draw_factors(bayes: BayesFit, index: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Block factors and residual SDs of the given (flattened, chain-major) posterior draws.

    Returns
    -------
    factors : list of array (len(index), k, k)
        One per ``design.blocks``, with ``F F'`` the block's covariance.
    sigma : array (len(index), n_sigma)
    """
    from harness.checks.marginal import psd_cholesky
    from harness.names import corr_var, sd_var

    posterior = bayes.idata.posterior
    n = posterior.sizes["chain"] * posterior.sizes["draw"]
    factors = []
    for block in bayes.design.blocks:
        k = block.n_terms
        sds = posterior[sd_var(block)].values.reshape(n, k)[index]
        if block.correlated and k > 1 and corr_var(block) in posterior:
            corr = posterior[corr_var(block)].values.reshape(n, k, k)[index]
            cov = corr * sds[:, :, None] * sds[:, None, :]
            factors.append(np.stack([psd_cholesky(0.5 * (c + c.T)) for c in cov]))
        else:
            factors.append(np.stack([np.diag(s) for s in sds]))
    sigma = posterior["sigma"].values.reshape(n, -1)[index]
    return factors, sigma


def integrate_variance_components(
    freq: Any, bayes: BayesFit, wide: WidePrior, n_draws: int = INTEGRATION_DRAWS
) -> VarianceIntegration | None:
    """The fixed effects' share of integrating over the variance components.

    Parameters
    ----------
    freq : FreqFit
        lme4's (or nlme's) fit; its variance components give ``beta_hat(theta_hat)``.
    bayes : BayesFit
    wide : WidePrior
        The weights the integral is taken under (the wide-prior posterior).
    n_draws : int
        Evenly spaced draws of the weighted fit (deterministic thinning).

    Returns
    -------
    VarianceIntegration or None
        None for GLMMs (no GLS estimate), designs without random effects, and
        when the GLS estimate at lme4's variance components does not
        reproduce lme4's estimate (logged).
    """
    from harness.checks.marginal import MarginalLikelihood
    from harness.checks.same_model import lme4_ml_values, lme4_reml_values, project

    if bayes.design.family.laplace or not bayes.design.blocks or freq.fixed.empty:
        return None
    source = wide.source(bayes)
    design = source.design
    terms = [str(t) for t in freq.fixed["term"]]
    if not set(terms) <= set(design.fixed_terms):
        return None
    try:
        values = lme4_reml_values(freq) or lme4_ml_values(freq)
        _, factors_hat, sigma_hat = project(values, design)
        marginal = MarginalLikelihood(design)
        at_lme4 = marginal.gls_beta_many(
            [np.asarray(F, dtype=float)[None] for F in factors_hat],
            np.atleast_1d(np.asarray(sigma_hat, dtype=float))[None],
        )[0]
    except (ValueError, KeyError, np.linalg.LinAlgError) as err:
        log.warning("GLS fixed effects at lme4's variance components: %s", err)
        return None
    position = {t: i for i, t in enumerate(design.fixed_terms)}
    idx = [position[t] for t in terms]
    estimate = freq.fixed["estimate"].to_numpy(float)
    se = freq.fixed["se"].to_numpy(float)
    scale = np.where(se > 0, se, np.maximum(np.abs(estimate), 1.0))
    check = float(np.max(np.abs(at_lme4[idx] - estimate) / scale))
    if check > GLS_CHECK_SE:
        log.warning(
            "the GLS estimate at lme4's variance components differs from lme4's estimate by "
            "%.3g lme4 SE; no variance-component share for the fixed effects",
            check,
        )
        return None
    n = wide.weights.shape[0]
    index = np.unique(np.linspace(0, n - 1, min(n_draws, n)).round().astype(int))
    weights = wide.weights[index]
    if not np.isfinite(weights).all() or weights.sum() <= 0:
        return None
    weights = weights / weights.sum()
    factors, sigma = draw_factors(source, index)
    gls = marginal.gls_beta_many(factors, sigma)[:, idx]
    mean = weights @ gls
    shares = {
        t: float(mean[j] - at_lme4[i]) for j, (t, i) in enumerate(zip(terms, idx, strict=True))
    }
    return VarianceIntegration(
        shares=shares,
        at_lme4={t: float(at_lme4[i]) for t, i in zip(terms, idx, strict=True)},
        n_draws=len(index),
        check=check,
        gls_draws=gls,
        weights=weights,
    )


# --------------------------------------------------------------------------- offsets


def _block_covariances(bayes_or_freq: Any, values: dict[str, float], blocks: list[Any]) -> dict:
    covs = {}
    for block in blocks:
        sds = np.array([values.get(f"{block.label}: sd({t})", 0.0) for t in block.terms])
        corr = np.eye(block.n_terms)
        for i, a in enumerate(block.terms):
            for j, b in enumerate(block.terms):
                if i < j:
                    key = f"{block.label}: cor({b},{a})"
                    alt = f"{block.label}: cor({a},{b})"
                    r = values.get(key, values.get(alt, 0.0))
                    corr[i, j] = corr[j, i] = 0.0 if not np.isfinite(r) else r
        covs[block.label] = corr * np.outer(sds, sds)
    return covs


def conditional_modes(
    design: Any,
    covs: dict[str, np.ndarray],
    sigma_rows: np.ndarray,
    beta_prior: tuple[np.ndarray, np.ndarray] | None = None,
    Z: Any = None,
) -> pd.DataFrame:
    """Conditional modes (BLUPs) of the offsets for given variance components.

    Solves Henderson's mixed-model equations in lme4's spherical form,
    ``u = Lambda v``, so that a zero SD (a singular fit) needs no inverse:
    ``[X'WX, X'WZL; L'Z'WX, L'Z'WZL + I] [b; v] = [X'Wy; L'Z'Wy]`` with
    ``W = diag(1 / sigma_i^2)``.

    ``beta_prior`` (means, precisions) adds independent Normal priors on the
    fixed effects; the solution is then ``E[u | y, theta]`` under them (without,
    under a flat prior: the BLUP).  ``Z`` is ``design.Z()`` when the caller
    already holds it (many solves on one design).

    Returns
    -------
    DataFrame
        group_factor, group, term, mode.
    """
    import scipy.sparse as sp
    from scipy.sparse.linalg import spsolve

    from harness.checks.marginal import psd_cholesky

    Z = design.Z() if Z is None else Z
    lambdas = []
    for block in design.lme4_block_order():
        L = psd_cholesky(covs[block.label])
        lambdas.append(sp.kron(sp.identity(block.n_levels), sp.csc_matrix(L)))
    Lam = sp.block_diag(lambdas, format="csc")
    w = 1.0 / np.asarray(sigma_rows, dtype=float)
    Xw = sp.csc_matrix(design.X.to_numpy(float) * w[:, None])
    ZL = sp.diags(w) @ Z @ Lam
    yw = design.y * w
    p, q = Xw.shape[1], ZL.shape[1]
    XtX = Xw.T @ Xw
    Xty = Xw.T @ yw
    if beta_prior is not None:
        mean, precision = (np.asarray(a, dtype=float) for a in beta_prior)
        XtX = XtX + sp.diags(precision)
        Xty = Xty + precision * mean
    A = sp.bmat([[XtX, Xw.T @ ZL], [ZL.T @ Xw, ZL.T @ ZL + sp.identity(q)]], format="csc")
    rhs = np.concatenate([Xty, ZL.T @ yw])
    solution = spsolve(A, rhs)
    u = Lam @ solution[p:]
    rows = [
        {"group_factor": block.factor, "group": str(level), "term": term, "mode": float(value)}
        for (block, level, term), value in zip(design.Z_columns(), u, strict=True)
    ]
    return pd.DataFrame(rows)


def _beta_prior(bayes: BayesFit) -> tuple[np.ndarray, np.ndarray] | None:
    """(means, precisions) of Normal priors on every fixed effect; None for any other prior."""
    means, precisions = [], []
    for term in bayes.design.fixed_terms:
        prior = bayes.priors.fixed.get(term)
        if prior is None or prior.dist != "Normal":
            return None
        means.append(float(prior.params.get("mu", 0.0)))
        precisions.append(1.0 / float(prior.params["sigma"]) ** 2)
    return np.array(means), np.array(precisions)


def rao_blackwell_offsets(bayes: BayesFit, n_draws: int = RB_DRAWS) -> pd.DataFrame | None:
    """The posterior mean of the offsets from the variance components' draws alone.

    For a Gaussian model ``E[u | y] = E[E[u | y, theta] | y]``: the average, over
    evenly spaced posterior draws of the variance components ``theta``, of the
    offsets' conditional means (Henderson's equations with the fixed effects'
    Normal priors).  The posterior means of the offsets must equal it within
    Monte Carlo error; offsets in the wrong groups cannot.

    Returns
    -------
    DataFrame or None
        group_factor, group, term, rb_mean, rb_se (the Monte Carlo SE of the
        average over the draws); None for a GLMM or a design without random effects.
    """
    design = bayes.design
    if design.family.laplace or not design.blocks:
        return None
    posterior = bayes.idata.posterior
    n = posterior.sizes["chain"] * posterior.sizes["draw"]
    index = np.unique(np.linspace(0, n - 1, min(n_draws, n)).round().astype(int))
    factors, sigma = draw_factors(bayes, index)
    prior = _beta_prior(bayes)
    columns = design.Z_columns()
    Z = design.Z()
    values = np.empty((len(index), len(columns)))
    for s in range(len(index)):
        covs = {
            block.label: factors[b][s] @ factors[b][s].T for b, block in enumerate(design.blocks)
        }
        if design.sigma_index is not None:
            rows = sigma[s][design.sigma_index]
        else:
            rows = np.full(design.n, sigma[s][0])
        values[s] = conditional_modes(design, covs, rows, prior, Z)["mode"].to_numpy(float)
    se = (
        values.std(axis=0, ddof=1) / np.sqrt(len(index))
        if len(index) > 1
        else np.zeros(values.shape[1])
    )
    return pd.DataFrame(
        {
            "group_factor": [block.factor for block, _, _ in columns],
            "group": [str(level) for _, level, _ in columns],
            "term": [term for _, _, term in columns],
            "rb_mean": values.mean(axis=0),
            "rb_se": se,
        }
    )


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 3 or np.std(a) == 0 or np.std(b) == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def attribute_agreement(
    agreement: pd.DataFrame,
    offsets: pd.DataFrame,
    design: Any,
    vc_lme4: dict[str, float],
    vc_post: dict[str, float],
    vc_wide: dict[str, float],
    sigma_rows: dict[str, np.ndarray],
    offset_mcse: pd.Series,
    passes: pd.Series,
    rao_blackwell: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Explain each agreement row's correlation deficit ``1 - r`` in correlation units.

    The deficit telescopes over offsets computed as conditional modes at three
    sets of variance components (:mod:`harness.checks.attribution`'s docstring).

    Parameters
    ----------
    agreement : DataFrame
        From :func:`harness.checks.compare.offset_agreement`.
    offsets : DataFrame
        From :func:`harness.checks.compare.compare_offsets`.
    design : Design
    vc_lme4, vc_post, vc_wide : dict
        Variance components by lme4 component name: lme4's estimates, the
        posterior medians, the wide-prior posterior's medians.
    sigma_rows : dict
        Residual SD per row under each of ``"lme4"``, ``"post"``, ``"wide"``.
    offset_mcse : Series
        MCSE of each offset's posterior mean, aligned with ``offsets``.
    passes : Series
        The agreement rows' own pass rule.
    rao_blackwell : DataFrame, optional
        :func:`rao_blackwell_offsets`: the posterior means of the offsets as the
        model defines them.  With it, the remainder involves the posterior
        draws: the posterior means must equal it within Monte Carlo error.

    Returns
    -------
    DataFrame
        ``agreement`` with ``attribution``, ``explanation`` and ``explained``.
    """
    blocks = list(design.blocks)
    modes = {}
    no_modes = "the conditional modes could not be computed; no attribution"
    # A GLMM's conditional modes are not a linear function of the data (glmer finds them
    # by penalised IRLS), so the closed-form chain below is for lmer's exact model only.
    laplace = design.family.laplace
    if laplace:
        no_modes = (
            f"no attribution for a {design.family.name} model: its conditional modes are not "
            "linear in the data, so the closed-form split of 1 - r does not apply"
        )
    for name, vc in () if laplace else (("lme4", vc_lme4), ("post", vc_post), ("wide", vc_wide)):
        try:
            covs = _block_covariances(None, vc, blocks)
            modes[name] = conditional_modes(design, covs, sigma_rows[name]).rename(
                columns={"mode": f"mode_{name}"}
            )
        except (ValueError, np.linalg.LinAlgError, KeyError) as err:
            log.warning("conditional modes at the %s variance components: %s", name, err)
            modes = {}
            break
    table = offsets.copy()
    table["mcse_mean"] = offset_mcse.to_numpy()
    for frame in modes.values():
        table = table.merge(frame, on=["group_factor", "group", "term"], how="left")
    if rao_blackwell is not None and modes:
        table = table.merge(rao_blackwell, on=["group_factor", "group", "term"], how="left")
    out = agreement.copy()
    attributions: list[dict[str, float | None]] = []
    explanations, explained = [], []
    for (_, row), ok in zip(out.iterrows(), passes, strict=True):
        part = table[
            (table["group_factor"] == row["group_factor"])
            & (table["term"] == row["term"])
            & (table["n_obs"] > 0)
        ]
        r = float(row["correlation"])
        x = part["lme4_mode"].to_numpy(float)
        y = part["pymc_mean"].to_numpy(float)
        if not modes or not np.isfinite(r):
            attributions.append({s: None for s in ("mcse", *SOURCES)})
            if np.isfinite(r):
                text = no_modes
            elif len(x) >= 3 and np.std(x) == 0:
                rmse = float(np.sqrt(np.mean((y - x) ** 2)))
                text = (
                    f"lme4's conditional modes are all {x[0]:.3g} (its SD for this term is at "
                    f"the boundary 0, a singular fit), so no correlation exists; the posterior "
                    f"means, shrunk by a posterior SD above 0, lie {rmse:.3g} from them (RMSE)"
                )
            else:
                text = "no correlation to explain (fewer than 3 informed groups or no spread)"
            explanations.append(text)
            explained.append(False)
            continue
        d_obs = 1.0 - r
        d_post = 1.0 - _corr(x, part["mode_post"].to_numpy(float))
        d_wide = 1.0 - _corr(x, part["mode_wide"].to_numpy(float))
        d_lme4 = 1.0 - _corr(x, part["mode_lme4"].to_numpy(float))
        mc_var = float(np.mean(part["mcse_mean"].to_numpy(float) ** 2))
        mcse = r * mc_var / (2.0 * float(np.var(y))) if np.var(y) > 0 else 0.0
        rb_z = float("nan")
        if "rb_mean" in part and part["rb_mean"].notna().all():
            # The Bayesian part of the gap: the posterior means against E[E[u|y,theta]].
            rb = part["rb_mean"].to_numpy(float)
            spread = np.sqrt(
                part["mcse_mean"].to_numpy(float) ** 2 + part["rb_se"].to_numpy(float) ** 2
            )
            with np.errstate(divide="ignore", invalid="ignore"):
                z = np.where(spread > 0, (y - rb) / spread, 0.0)
            rb_z = float(np.sqrt(np.mean(z**2)))
            d_rb = 1.0 - _corr(x, rb)
            parts = {
                "mcse": mcse,
                "prior": d_post - d_wide,
                "summary": (d_rb - d_post) + (d_wide - d_lme4),
                "boundary": 0.0,
                "remainder": d_lme4 + (d_obs - d_rb - mcse),
            }
        else:
            parts = {
                "mcse": mcse,
                "prior": d_post - d_wide,
                "summary": (d_obs - d_post - mcse) + (d_wide - d_lme4),
                "boundary": 0.0,
                "remainder": d_lme4,
            }
        ok_rest = abs(d_lme4) <= REMAINDER_CORRELATION and not rb_z > RB_Z_MAX
        slope = row.get("slope", float("nan"))
        sd_ratio = _sd_ratio(row, vc_post, vc_lme4, blocks)
        sentence = (
            f"correlation {r:.3f} (1 - r = {d_obs:.3f}): the posterior's variance components "
            f"give conditional modes correlating {1 - d_post:.3f} with lme4's; the prior "
            f"accounts for {d_post - d_wide:+.3f} (the wide-prior posterior's components give "
            f"{1 - d_wide:.3f}); averaging over the components' uncertainty and the median vs "
            f"REML estimate {parts['summary']:+.3f}; Monte Carlo noise {mcse:.3f}; at lme4's own "
            f"estimates the modes correlate {1 - d_lme4:.4f} with lme4's (the rest, "
            f"{d_lme4:.2g})"
        )
        if np.isfinite(rb_z):
            sentence += (
                f"; the posterior means lie {rb_z:.2g} MCSE (RMS over groups) from the average "
                "over posterior draws of the conditional means, E[E[u|y,theta]]"
                + (
                    " -- more than Monte Carlo error: the offsets are not the model's (wrong "
                    "groups or terms?)"
                    if rb_z > RB_Z_MAX
                    else ""
                )
            )
        if np.isfinite(slope) and np.isfinite(sd_ratio):
            sentence += (
                f"; the slope of posterior means on lme4's modes, {slope:.2f}, follows the ratio "
                f"of the SDs (posterior median / lme4), {sd_ratio:.2f}"
            )
        attributions.append({k: _clean(v) for k, v in parts.items()})
        explanations.append(sentence)
        explained.append(bool(ok) or ok_rest)
    out["attribution"] = attributions
    out["explanation"] = explanations
    out["explained"] = explained
    return out


def _sd_ratio(
    row: pd.Series, vc_post: dict[str, float], vc_lme4: dict[str, float], blocks: list[Any]
) -> float:
    for block in blocks:
        if block.factor == row["group_factor"] and row["term"] in block.terms:
            key = f"{block.label}: sd({row['term']})"
            if key in vc_post and key in vc_lme4 and vc_lme4[key] > 0:
                return vc_post[key] / vc_lme4[key]
    return float("nan")
