"""Side-by-side tables of an lme4 fit and a PyMC fit, with distances and verdicts.

Every table is a tidy DataFrame with one row per compared quantity.  The
verdict vocabulary is ``pass`` / ``look`` / ``fail``, and ``unreliable`` when
the sampler's own diagnostics (R-hat, ESS, divergences) say the posterior
summary cannot be trusted, whatever the distance.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import xarray as xr

from harness.checks.align import check_alignment, informed_counts, posterior_offsets
from harness.checks.attribution import (
    BOUNDARY_COR,
    BOUNDARY_SD_RATIO,
    RB_Z_MAX,
    REMAINDER_VARIANCE_SD,
    WidePrior,
    attribute_agreement,
    attribute_row,
    integrate_variance_components,
    pick_conditioning,
    rao_blackwell_offsets,
    reweight_to_wide_prior,
    weighted_summary,
)
from harness.names import corr_var, sd_var

if TYPE_CHECKING:
    from harness.checks.glmm_attribution import GlmmAttribution
    from harness.fits import BayesFit, FreqFit

log = logging.getLogger("harness")

#: Tolerances behind the verdicts (all in the units named).
TOLERANCES = {
    "fixed_pass_se": 0.25,  # |difference| in lme4 SEs for "pass"
    "fixed_look_se": 0.5,  # ... for "look"; beyond is "fail"
    "rhat_max": 1.01,
    "ess_min": 400.0,
    "offset_corr_pass": 0.98,
    "offset_corr_look": 0.9,
    # lme4's offsets (or a conditional SD) count as (near) zero below this fraction of the
    # posterior's matching scale; a correlation, slope or ratio over them is meaningless.
    "offset_spread_min": 0.01,
}

UNCERTAINTY_SOURCES = pd.DataFrame(
    [
        {
            "table": "fixed",
            "lme4": "SE of beta-hat with variance components fixed at their estimates "
            "(Wald interval; Satterthwaite df from lmerTest)",
            "pymc": "posterior SD: integrates over variance components, residual SD and priors",
        },
        {
            "table": "variance",
            "lme4": "profile-likelihood interval when requested (REML/ML point estimate otherwise)",
            "pymc": "posterior: mean and median differ because SD posteriors are skewed",
        },
        {
            "table": "offsets",
            "lme4": "conditional SD (condsd) and merTools::REsim: conditional on the estimated "
            "variance components and fixed effects",
            "pymc": "posterior SD of the offset: integrates over every parameter",
        },
        {
            "table": "mcse",
            "lme4": "none (deterministic optimum)",
            "pymc": "Monte Carlo error of the posterior mean (ArviZ mcse)",
        },
    ]
)


@dataclass
class Comparison:
    """What ``compare(freq, bayes)`` returns: aligned tables plus the fits.

    ``engines`` names the pair by registry name: the reference, then the
    Bayesian engine (``("lme4", "pymc")``).
    """

    fixed: pd.DataFrame
    variance: pd.DataFrame
    offsets: pd.DataFrame
    agreement: pd.DataFrame
    diagnostics: pd.DataFrame
    sampler_stats: dict[str, Any]
    uncertainty: pd.DataFrame
    freq: FreqFit
    bayes: BayesFit
    notes: list[str] = field(default_factory=list)
    engines: tuple[str, str] = ("lme4", "pymc")

    @property
    def verdict(self) -> str:
        """Worst verdict over fixed effects, variance components and agreement."""
        order = ["pass", "look", "fail", "unreliable"]
        verdicts = list(self.fixed["verdict"]) + list(self.variance["verdict"])
        verdicts += list(self.agreement["verdict"])
        worst = max((order.index(v) for v in verdicts if v in order), default=0)
        return order[worst]

    def tables(self) -> dict[str, pd.DataFrame]:
        return {
            "fixed": self.fixed,
            "variance": self.variance,
            "offsets": self.offsets,
            "agreement": self.agreement,
            "diagnostics": self.diagnostics,
            "uncertainty": self.uncertainty,
        }

    def __repr__(self) -> str:
        rows = (
            f"{len(self.fixed)} fixed, {len(self.variance)} variance, {len(self.agreement)} offsets"
        )
        return f"Comparison(verdict={self.verdict!r}; rows: {rows})"

    def _repr_html_(self) -> str | None:
        """Jupyter: the verdict table with its pictures (registered by the report package)."""
        from harness.views import html

        return html(self)


def _hdi(values: np.ndarray, prob: float) -> tuple[float, float]:
    import arviz as az

    interval = np.asarray(az.hdi(np.asarray(values).ravel(), hdi_prob=prob)).ravel()
    return float(interval[0]), float(interval[1])


def _scalar(value: Any) -> float:
    return float(np.asarray(value, dtype=float).ravel()[0])


def _draws(array: xr.DataArray) -> np.ndarray:
    return np.asarray(array.values).reshape(array.sizes["chain"], array.sizes["draw"])


def _summary(array: xr.DataArray, prob: float) -> dict[str, float]:
    import arviz as az

    draws = _draws(array)
    lower, upper = _hdi(draws, prob)
    return {
        "mean": float(draws.mean()),
        "median": float(np.median(draws)),
        "sd": float(draws.std(ddof=1)),
        "lower": lower,
        "upper": upper,
        "mcse": _scalar(az.mcse(draws, method="mean")),
        "ess_bulk": _scalar(az.ess(draws, method="bulk")),
        "ess_tail": _scalar(az.ess(draws, method="tail")),
        "r_hat": _scalar(az.rhat(draws)),
    }


def interval_overlap(a_low: float, a_high: float, b_low: float, b_high: float) -> float:
    """Length of the intersection over the length of the union (0 = disjoint, 1 = same)."""
    if any(pd.isna(v) for v in (a_low, a_high, b_low, b_high)):
        return float("nan")
    inter = max(0.0, min(a_high, b_high) - max(a_low, b_low))
    union = max(a_high, b_high) - min(a_low, b_low)
    return inter / union if union > 0 else 1.0


def _reliable(stats: dict[str, float]) -> bool:
    return (
        stats["r_hat"] <= TOLERANCES["rhat_max"]
        and stats["ess_bulk"] >= TOLERANCES["ess_min"]
        and stats.get("ess_tail", TOLERANCES["ess_min"]) >= TOLERANCES["ess_min"]
    )


def _adaptive(bayes: BayesFit) -> dict[str, Any] | None:
    adaptive = getattr(bayes, "settings", {}).get("adaptive")
    return adaptive if isinstance(adaptive, dict) else None


def _row_reliable(stats: dict[str, float], bayes: BayesFit) -> bool:
    """R-hat <= 1.01, bulk and tail ESS >= 400 and no divergence.

    An adaptive fit whose loop met its targets (``reliable``) is reliable by
    construction: the loop checked the same rule on every compared quantity.
    Otherwise each row is judged on its own draws, so a row that meets the
    rule keeps its verdict when another quantity missed it.
    """
    adaptive = _adaptive(bayes)
    if adaptive is not None and adaptive.get("reliable") is True:
        return True
    return _reliable(stats) and bayes.n_divergent == 0


def _unreliable_reason(stats: dict[str, float], bayes: BayesFit) -> str:
    reasons = []
    if stats["r_hat"] > TOLERANCES["rhat_max"]:
        reasons.append(f"R-hat {stats['r_hat']:.3f} > {TOLERANCES['rhat_max']}")
    for kind in ("bulk", "tail"):
        value = stats.get(f"ess_{kind}", float("inf"))
        if value < TOLERANCES["ess_min"]:
            reasons.append(f"{kind} ESS {value:.0f} < {TOLERANCES['ess_min']:.0f}")
    if bayes.n_divergent:
        reasons.append(f"{bayes.n_divergent} divergent transitions")
    text = "unreliable: " + ", ".join(reasons) if reasons else "unreliable"
    adaptive = _adaptive(bayes)
    if adaptive is not None and adaptive.get("reliable") is False:
        # "budget spent: ..." or "no remedy left: ...", with the diagnostics that still miss.
        text += f" (adaptive sampling stopped: {adaptive.get('reason', 'no reason recorded')})"
    return text


def _verdict(passes: bool, explained: bool) -> str:
    """pass by the row's own rule; else look when the named sources explain the gap."""
    if passes:
        return "pass"
    return "look" if explained else "fail"


def _explain(attr: Any, verdict: str, reason: str | None = None) -> str:
    if verdict == "unreliable":
        return f"{reason}. {attr.explanation}"
    if verdict == "pass":
        return f"within tolerance: {attr.explanation}"
    if verdict == "look":
        return f"explained by the named sources, but large: {attr.explanation}"
    return f"not explained ({attr.tolerance} fails): {attr.explanation}"


def _optimizer_shifts(freq: FreqFit, table: str) -> tuple[dict[str, float], str]:
    """Best refit minus lme4's estimate, per term or component, when lme4 stopped short.

    Empty when no refit was tried or none beat lme4's own estimates (in the
    fit's own criterion: REML for a REML fit).  The text says what the refits
    found (:func:`harness.engines.lme4.optimizer_sentence`).
    """
    best = getattr(freq, "best_fit", None) or {}
    if not best.get("improved"):
        return {}, ""
    chosen = best["by_method"][best["method"]]
    values = chosen["fixed"] if table == "fixed" else chosen["variance"]
    column = "term" if table == "fixed" else "component"
    frame = freq.fixed if table == "fixed" else freq.variance
    shifts = {}
    for key, estimate in zip(frame[column], frame["estimate"], strict=True):
        if key in values:
            shifts[str(key)] = float(values[key]) - float(estimate)
    return shifts, str(best.get("sentence", ""))


def _wide_draws(wide: WidePrior, bayes: BayesFit, pick: Any) -> np.ndarray:
    return np.asarray(pick(wide.source(bayes)).values, dtype=float).ravel()


def compare_fixed(
    freq: FreqFit,
    bayes: BayesFit,
    prob: float = 0.95,
    wide: WidePrior | None = None,
    glmm: GlmmAttribution | None = None,
) -> pd.DataFrame:
    """Fixed effects side by side, with differences in lme4 SEs and in MCSEs.

    ``explanation`` and ``attribution`` split each gap into the prior, Monte
    Carlo error, the summary (for Gaussian models: integrating over the variance
    components against lme4's GLS estimate at its own) and a remainder
    (:mod:`harness.checks.attribution`); ``wide`` is the wide-prior posterior
    (computed when not given).  ``glmm`` (a GLMM's exact-likelihood shares,
    :mod:`harness.checks.glmm_attribution`) adds the ``laplace`` source and the
    summary's share of integrating over the variance components.
    """
    wide = wide if wide is not None else reweight_to_wide_prior(bayes)
    beta = bayes.idata.posterior["beta"]
    integration = integrate_variance_components(freq, bayes, wide)
    shares = integration.shares if integration is not None else {}
    if glmm is not None and glmm.integration is not None:
        shares = glmm.integration.shares
    shifts, optimizer_text = _optimizer_shifts(freq, "fixed")
    rows = []
    for record in freq.fixed.to_dict("records"):
        term = record["term"]
        stats = _summary(beta.sel(fixed_term=term), prob)
        diff = stats["mean"] - record["estimate"]
        diff_se = diff / record["se"] if record["se"] > 0 else float("nan")
        diff_mcse = diff / stats["mcse"] if stats["mcse"] > 0 else float("nan")
        se = record["se"] if record["se"] > 0 else stats["sd"]
        attr = attribute_row(
            _draws(beta.sel(fixed_term=term)),
            record["estimate"],
            how="mean",
            wide_values=_wide_draws(
                wide, bayes, lambda f, t=term: f.idata.posterior["beta"].sel(fixed_term=t)
            ),
            wide=wide,
            scale=se,
            scale_name="lme4 SE",
            tolerance=TOLERANCES["fixed_pass_se"] * se,
            tolerance_text=f"{TOLERANCES['fixed_pass_se']} lme4 SE",
            use_mode=False,
            integration=shares.get(term),
            laplace=glmm.laplace.get(term) if glmm is not None else None,
            laplace_text=glmm.laplace_text(term) if glmm is not None else "",
            integration_text=glmm.integration_text() if glmm is not None else "",
            optimizer_shift=shifts.get(term),
            optimizer_text=optimizer_text,
        )
        if not _row_reliable(stats, bayes):
            verdict = "unreliable"
        else:
            passes = bool(abs(diff_se) < TOLERANCES["fixed_pass_se"])
            verdict = _verdict(passes, attr.explained)
        explanation = _explain(attr, verdict, _unreliable_reason(stats, bayes))
        rows.append(
            {
                "term": term,
                "lme4_estimate": record["estimate"],
                "lme4_se": record["se"],
                "lme4_lower": record["lower"],
                "lme4_upper": record["upper"],
                "pymc_mean": stats["mean"],
                "pymc_sd": stats["sd"],
                "pymc_lower": stats["lower"],
                "pymc_upper": stats["upper"],
                "mcse": stats["mcse"],
                "diff": diff,
                "diff_in_se": diff_se,
                "diff_in_mcse": diff_mcse,
                "overlap": interval_overlap(
                    record["lower"], record["upper"], stats["lower"], stats["upper"]
                ),
                "r_hat": stats["r_hat"],
                "ess_bulk": stats["ess_bulk"],
                "ess_tail": stats["ess_tail"],
                "k_hat": attr.extra["k_hat"],
                "tolerance": f"pass: |diff| < {TOLERANCES['fixed_pass_se']} lme4 SE; "
                f"fail: {attr.tolerance}",
                "verdict": verdict,
                "explanation": explanation,
                "attribution": attr.attribution,
            }
        )
    return pd.DataFrame(rows)


_SD = re.compile(r"^(?P<grp>.+): sd\((?P<term>.+)\)$")
_COR = re.compile(r"^(?P<grp>.+): cor\((?P<a>.+),(?P<b>[^,]+)\)$")
_SIGMA_LEVEL = re.compile(r"^sigma: (?P<col>[^=]+)=(?P<level>.+)$")


def _posterior_component(bayes: BayesFit, component: str) -> xr.DataArray | None:
    posterior = bayes.idata.posterior
    if component == "sigma":
        return posterior["sigma"]
    own = bayes.design.family.components.get(component)  # the family's own parameters
    if own is not None:
        return posterior[own]
    match = _SIGMA_LEVEL.match(component)
    if match:
        return posterior["sigma"].sel(sigma_level=match["level"])
    blocks = {b.label: b for b in bayes.design.blocks}
    match = _SD.match(component)
    if match and match["grp"] in blocks:
        block = blocks[match["grp"]]
        return posterior[sd_var(block)].sel({f"{block.label}__term": match["term"]})
    match = _COR.match(component)
    if match and match["grp"] in blocks:
        block = blocks[match["grp"]]
        return posterior[corr_var(block)].sel(
            {f"{block.label}__term": match["a"], f"{block.label}__term_b": match["b"]}
        )
    return None


def compare_variance(
    freq: FreqFit,
    bayes: BayesFit,
    prob: float = 0.95,
    wide: WidePrior | None = None,
    glmm: GlmmAttribution | None = None,
) -> pd.DataFrame:
    """Variance components (SDs, correlations) and residual SD(s) side by side.

    ``explanation`` and ``attribution`` split each gap (posterior median minus
    lme4's estimate) into the prior, the summary (median of a skewed posterior
    against its mode), a boundary (a singular fit, a correlation at +/-1),
    Monte Carlo error and a remainder (:mod:`harness.checks.attribution`).
    With ``glmm`` (a GLMM's exact likelihood) each row also gets its
    ``laplace`` source, and the joint mode is conditioned on the fixed effects
    and other components at their exact ML values.
    """
    wide = wide if wide is not None else reweight_to_wide_prior(bayes)
    source = wide.source(bayes)
    shifts, optimizer_text = _optimizer_shifts(freq, "variance")
    best_values = _best_variance(freq)
    wide_components = {}
    for rec in freq.variance.to_dict("records"):
        picked = _posterior_component(source, rec["component"])
        if glmm is not None:
            at = glmm.exact.values.get(rec["component"])
            value = float(at) if at is not None else float("nan")
        else:
            value = _reference_value(rec, shifts, best_values)
        if picked is not None and np.isfinite(value):
            wide_components[rec["component"]] = (
                np.asarray(picked.values, dtype=float).ravel(),
                value,
            )
    if glmm is not None:
        # glmer's and the exact ML estimates are joint modes over beta and theta too.
        for term, value in glmm.fixed_values().items():
            wide_components[f"beta: {term}"] = (
                np.asarray(source.idata.posterior["beta"].sel(fixed_term=term).values).ravel(),
                value,
            )
    rows = []
    n_groups = {b.label: b.n_levels for b in bayes.design.blocks}
    for record in freq.variance.to_dict("records"):
        component = record["component"]
        draws = _posterior_component(bayes, component)
        if draws is None:
            raise ValueError(f"no PyMC parameter matches lme4 component {component!r}")
        stats = _summary(draws, prob)
        estimate = record["estimate"]
        reference = _reference_value(record, shifts, best_values)
        shift = shifts.get(component)
        undefined = ""
        if not np.isfinite(estimate):
            undefined = _undefined_reason(record, freq.variance)
            shift = None  # no shift from an undefined value: compared with the best refit's
        in_pymc = bool(stats["lower"] <= estimate <= stats["upper"])
        has_ci = not (pd.isna(record["lower"]) or pd.isna(record["upper"]))
        in_lme4 = has_ci and record["lower"] <= stats["median"] <= record["upper"]
        notes = []
        group = record.get("group_factor")
        if isinstance(group, str) and n_groups.get(group, 99) < 30 and record["kind"] == "sd":
            notes.append(
                f"{n_groups[group]} groups: the posterior of an SD is right-skewed, so its mean "
                f"exceeds the {freq.method} estimate; compare the median"
            )
        if undefined:
            notes.append(undefined)
        boundary = None
        if record["kind"] == "sd" and reference < BOUNDARY_SD_RATIO * max(stats["median"], 1e-12):
            notes.append("lme4 estimate at the boundary (singular fit)")
            boundary = "lower"
        elif record["kind"] == "cor" and abs(reference) >= BOUNDARY_COR:
            notes.append(f"lme4 correlation at the boundary ({reference:+.0f})")
            boundary = "upper" if reference > 0 else "lower"
        bounds = (-1.0, 1.0) if record["kind"] == "cor" else (0.0, None)
        reliable = _row_reliable(stats, bayes)
        if not np.isfinite(reference):
            # Nothing to measure a gap from: the row says why, and the boundary explains it.
            attr = _undefined_attribution(stats, undefined)
            verdict = "look" if reliable else "unreliable"
        else:
            attr = attribute_row(
                _draws(draws),
                reference if undefined else estimate,
                how="median",
                wide_values=_wide_draws(
                    wide, bayes, lambda f, c=component: _posterior_component(f, c)
                ),
                wide=wide,
                scale=stats["sd"],
                scale_name="posterior SD",
                tolerance=REMAINDER_VARIANCE_SD * stats["sd"],
                tolerance_text=f"{REMAINDER_VARIANCE_SD} posterior SD",
                bounds=bounds,
                boundary=boundary,
                conditioning=pick_conditioning(
                    wide_components[component][0],
                    {k: v for k, v in wide_components.items() if k != component},
                )
                if component in wide_components
                else None,
                optimizer_shift=shift,
                optimizer_text=optimizer_text,
                laplace=glmm.laplace.get(component) if glmm is not None else None,
                laplace_text=glmm.laplace_text(component) if glmm is not None else "",
                summary_at=glmm.summary_at(component) if glmm is not None else None,
                integration_text=glmm.median_text() if glmm is not None else "",
            )
            if undefined:
                attr.explanation = (
                    f"{undefined}; {optimizer_text}: the best refit's value {reference:.4g} "
                    f"stands in: {attr.explanation}"
                )
            if not reliable:
                verdict = "unreliable"
            else:
                passes = bool(in_pymc and (in_lme4 or not has_ci))
                verdict = _verdict(passes, attr.explained)
        explanation = _explain(attr, verdict, _unreliable_reason(stats, bayes))
        rows.append(
            {
                "component": component,
                "kind": record["kind"],
                "lme4_estimate": estimate,
                "lme4_lower": record["lower"],
                "lme4_upper": record["upper"],
                "lme4_ci_method": record.get("ci_method"),
                "pymc_mean": stats["mean"],
                "pymc_median": stats["median"],
                "pymc_sd": stats["sd"],
                "pymc_lower": stats["lower"],
                "pymc_upper": stats["upper"],
                "mcse": stats["mcse"],
                "diff_median": stats["median"] - estimate,
                "lme4_in_pymc_interval": in_pymc,
                "pymc_median_in_lme4_interval": in_lme4 if has_ci else None,
                "r_hat": stats["r_hat"],
                "ess_bulk": stats["ess_bulk"],
                "ess_tail": stats["ess_tail"],
                "k_hat": attr.extra.get("k_hat", float("nan")),
                "tolerance": "pass: lme4 estimate inside the PyMC 95% HDI (and PyMC median "
                f"inside the lme4 interval when there is one); fail: {attr.tolerance}",
                "verdict": verdict,
                "note": "; ".join(notes),
                "explanation": explanation,
                "attribution": attr.attribution,
            }
        )
    return pd.DataFrame(rows)


def _best_variance(freq: FreqFit) -> dict[str, float]:
    """The best refit's variance components when it beat lme4's own estimates, else empty."""
    best = getattr(freq, "best_fit", None) or {}
    if not best.get("improved"):
        return {}
    return dict(best["by_method"][best["method"]]["variance"])


def _reference_value(
    record: dict[str, Any], shifts: dict[str, float], best: dict[str, float]
) -> float:
    """The value a row's gap is measured from: lme4's estimate, or its best refit's."""
    component = record["component"]
    estimate = float(record["estimate"])
    if np.isfinite(estimate):
        return estimate + shifts.get(component, 0.0)
    return float(best.get(component, float("nan")))


def _undefined_reason(record: dict[str, Any], variance: pd.DataFrame) -> str:
    """Why lme4 reports no number for a row (a correlation whose SD is 0)."""
    if record["kind"] != "cor":
        return f"lme4's {record['component']} is undefined"
    sds = variance[
        (variance["kind"] == "sd")
        & (variance["group_factor"] == record["group_factor"])
        & variance["term"].isin([record["term"], record["term2"]])
    ]
    zero = [
        str(t)
        for t, v in zip(sds["term"], sds["estimate"], strict=True)
        if not (np.isfinite(v) and v > 0)
    ]
    which = " and ".join(zero) if zero else f"{record['term']} or {record['term2']}"
    return (
        f"lme4's correlation is undefined: its SD of {which} is 0 (singular fit), "
        "so the correlation has no value at lme4's estimates"
    )


def _undefined_attribution(stats: dict[str, float], reason: str) -> Any:
    """A row with no lme4 number: no gap to split; the boundary (a zero SD) is why."""
    from harness.checks.attribution import RowAttribution

    text = (
        f"{reason}; the posterior median is {stats['median']:.3g} (95% HDI "
        f"{stats['lower']:.3g} to {stats['upper']:.3g}): a correlation of an SD at its "
        "boundary 0 is not identified, so the posterior spreads over its range (boundary)"
    )
    return RowAttribution(
        gap=float("nan"),
        mcse=stats["mcse"],
        attribution={
            "mcse": stats["mcse"],
            "prior": None,
            "summary": None,
            "boundary": None,
            "remainder": None,
        },
        explained=True,
        explanation=text,
        tolerance="no lme4 value to compare",
        extra={},
    )


def compare_offsets(freq: FreqFit, bayes: BayesFit, prob: float = 0.95) -> pd.DataFrame:
    """Per group and term: lme4 conditional mode and SD against PyMC's aligned offset."""
    offsets = posterior_offsets(bayes)
    pieces = []
    for factor, draws in offsets.items():
        stacked = draws.stack(sample=("chain", "draw"))
        mean = stacked.mean("sample").to_pandas()
        sd = stacked.std("sample", ddof=1).to_pandas()
        lower = stacked.quantile((1 - prob) / 2, dim="sample").drop_vars("quantile").to_pandas()
        upper = stacked.quantile((1 + prob) / 2, dim="sample").drop_vars("quantile").to_pandas()
        frame = pd.DataFrame(
            {
                "pymc_mean": mean.stack(),
                "pymc_sd": sd.stack(),
                "pymc_lower": lower.stack(),
                "pymc_upper": upper.stack(),
            }
        ).reset_index()
        frame.columns = ["group", "term", *frame.columns[2:]]
        frame["group_factor"] = factor
        pieces.append(frame)
    pymc = pd.concat(pieces, ignore_index=True)
    for column in ("group", "term", "group_factor"):
        pymc[column] = pymc[column].astype(str)
    lme4 = freq.ranef.rename(columns={"mode": "lme4_mode", "condsd": "lme4_condsd"}).copy()
    for column in ("group", "term", "group_factor"):
        lme4[column] = lme4[column].astype(str)
    table = lme4.merge(pymc, on=["group_factor", "group", "term"], how="left", validate="1:1")
    if freq.ranef_sims is not None:
        sims = freq.ranef_sims.rename(
            columns={"sim_sd": "lme4_sim_sd", "sim_mean": "lme4_sim_mean"}
        )
        sims = sims[["group_factor", "group", "term", "lme4_sim_mean", "lme4_sim_sd"]].astype(
            {"group_factor": str, "group": str, "term": str}
        )
        table = table.merge(sims, on=["group_factor", "group", "term"], how="left")
    counts = informed_counts(bayes)
    table = table.merge(counts, on=["group_factor", "group", "term"], how="left")
    table["diff"] = table["pymc_mean"] - table["lme4_mode"]
    # A singular lme4 component has condsd 0 (or rounding noise): no ratio over it.
    condsd = table["lme4_condsd"].where(
        table["lme4_condsd"] > TOLERANCES["offset_spread_min"] * table["pymc_sd"]
    )
    table["sd_ratio"] = table["pymc_sd"] / condsd
    columns = [
        "group_factor",
        "group",
        "term",
        "lme4_mode",
        "lme4_condsd",
        "pymc_mean",
        "pymc_sd",
        "pymc_lower",
        "pymc_upper",
        "diff",
        "sd_ratio",
        "n_obs",
    ]
    extra = [c for c in table.columns if c not in columns]
    return table[columns + extra]


def _agreement_metrics(informed: pd.DataFrame) -> dict[str, Any]:
    """Correlation, slope and SD ratio of one term, where they mean something.

    They are defined only when lme4's offsets have spread: the SD of lme4's
    modes across groups must reach ``offset_spread_min`` (1%) of the larger of
    the posterior means' SD across groups and the typical posterior SD of an
    offset.  Below that, lme4 has shrunk the term to zero (a singular fit) and a
    regression slope or ratio over that spread is rounding noise; the metrics
    stay NaN and ``reason`` says what is true instead.
    """
    nan = float("nan")
    out = {"correlation": nan, "slope": nan, "sd_ratio": nan, "reason": ""}
    x = informed["lme4_mode"].to_numpy(float)
    y = informed["pymc_mean"].to_numpy(float)
    if len(x) == 0:
        out["reason"] = "no group has data on this term; both sides follow the prior"
        return out
    spread_lme4 = float(np.std(x))
    spread_pymc = float(np.std(y))
    posterior_sd = float(np.mean(informed["pymc_sd"]))
    scale = max(spread_pymc, posterior_sd)
    if not spread_lme4 > TOLERANCES["offset_spread_min"] * scale:
        out["reason"] = (
            f"lme4 shrinks this term to zero (singular fit): its offsets spread "
            f"{spread_lme4:.3g} across groups; the posterior's offsets have spread "
            f"{spread_pymc:.3g} (posterior SD of an offset {posterior_sd:.3g}); "
            "correlation, slope and SD ratio are undefined"
        )
        return out
    reasons = []
    condsd = informed["lme4_condsd"].to_numpy(float)
    pymc_sd = informed["pymc_sd"].to_numpy(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.where(
            condsd > TOLERANCES["offset_spread_min"] * pymc_sd, pymc_sd / condsd, np.nan
        )
    if np.all(np.isfinite(ratios)):
        out["sd_ratio"] = float(np.mean(ratios))
    else:
        reasons.append(
            f"lme4's conditional SD is (near) zero in {int((~np.isfinite(ratios)).sum())} "
            "group(s): no SD ratio"
        )
    if len(x) < 3:
        reasons.append(
            f"only {len(x)} group(s) with data on this term; correlation and slope need 3"
        )
    elif not spread_pymc > 0:
        reasons.append("the posterior means of the offsets do not vary across groups")
    else:
        out["correlation"] = float(np.corrcoef(x, y)[0, 1])
        out["slope"] = float(np.polyfit(x, y, 1)[0])
    out["reason"] = "; ".join(reasons)
    return out


def offset_agreement(offsets: pd.DataFrame) -> pd.DataFrame:
    """Per factor and term: correlation, RMSE, slope and SD ratio over informed groups.

    ``reason`` is empty when every metric is defined and otherwise says why one
    is not (see :func:`_agreement_metrics`); a row without a correlation is
    never a "pass".
    """
    rows = []
    for (factor, term), part in offsets.groupby(["group_factor", "term"], sort=False):
        informed = part[part["n_obs"] > 0]
        x = informed["lme4_mode"].to_numpy(float)
        y = informed["pymc_mean"].to_numpy(float)
        metrics = _agreement_metrics(informed)
        correlation = metrics["correlation"]
        rmse = float(np.sqrt(np.mean((y - x) ** 2))) if len(x) else float("nan")
        if np.isnan(correlation):
            verdict = "look"
        elif correlation >= TOLERANCES["offset_corr_pass"]:
            verdict = "pass"
        elif correlation >= TOLERANCES["offset_corr_look"]:
            verdict = "look"
        else:
            verdict = "fail"
        rows.append(
            {
                "group_factor": factor,
                "term": term,
                "n_groups": len(part),
                "n_informed": len(informed),
                "correlation": correlation,
                "rmse": rmse,
                "slope": metrics["slope"],
                "sd_ratio": metrics["sd_ratio"],
                "tolerance": f"correlation >= {TOLERANCES['offset_corr_pass']}",
                "verdict": verdict,
                "reason": metrics["reason"],
            }
        )
    return pd.DataFrame(rows)


def _sigma_rows(design: Any, sigma: dict[str, float]) -> np.ndarray:
    """Residual SD of every row from component values (``sigma`` or one per level)."""
    if design.sigma_levels is None:
        return np.full(design.n, sigma["sigma"])
    by_level = np.array(
        [sigma[f"sigma: {design.spec.sigma_by}={level}"] for level in design.sigma_levels]
    )
    return by_level[design.sigma_index]


def explain_agreement(
    freq: FreqFit,
    bayes: BayesFit,
    variance: pd.DataFrame,
    offsets: pd.DataFrame,
    agreement: pd.DataFrame,
    wide: WidePrior,
) -> pd.DataFrame:
    """Agreement rows with ``explanation`` and ``attribution``, and verdicts that use them.

    A row below the correlation threshold is "look" when conditional modes at
    lme4's own variance components reproduce lme4's modes (the gap is then the
    posterior's variance components, its prior and its averaging), "fail" when
    they do not.
    """
    import arviz as az

    vc_lme4 = dict(zip(freq.variance["component"], freq.variance["estimate"], strict=True))
    vc_post = dict(zip(variance["component"], variance["pymc_median"], strict=True))
    source = wide.source(bayes)
    vc_wide = {}
    for component in variance["component"]:
        values = _posterior_component(source, component)
        if values is not None:
            vc_wide[component] = weighted_summary(
                np.asarray(values.values, dtype=float).ravel(), wide.weights, "median"
            )
    design = bayes.design
    sigma_rows: dict[str, np.ndarray] = {}
    if design.family.has_scale:  # a GLMM has no residual SD; attribute_agreement says why
        try:
            sigma_rows = {
                "lme4": _sigma_rows(design, vc_lme4),
                "post": _sigma_rows(design, vc_post),
                "wide": _sigma_rows(design, vc_wide),
            }
        except KeyError as err:
            log.warning("no residual SD for the conditional modes: %s", err)
    mcse = []
    for factor, draws in posterior_offsets(bayes).items():
        values = az.mcse(xr.Dataset({"u": draws}), method="mean")["u"].to_pandas().stack()
        frame = values.rename("mcse_mean").reset_index()
        frame.columns = ["group", "term", "mcse_mean"]
        frame["group_factor"] = factor
        mcse.append(frame)
    keyed = pd.concat(mcse, ignore_index=True).astype({"group": str, "term": str})
    merged = offsets[["group_factor", "group", "term"]].merge(
        keyed, on=["group_factor", "group", "term"], how="left"
    )
    passes = agreement["verdict"] == "pass"
    try:
        rao_blackwell = rao_blackwell_offsets(bayes)
    except (ValueError, KeyError, np.linalg.LinAlgError) as err:
        log.warning("E[E[u|y,theta]] over the posterior draws: %s", err)
        rao_blackwell = None
    out = attribute_agreement(
        agreement,
        offsets,
        design,
        vc_lme4,
        vc_post,
        vc_wide,
        sigma_rows,
        merged["mcse_mean"],
        passes,
        rao_blackwell,
    )
    reliability = _offset_reliability(bayes, offsets)
    verdicts, reasons = [], []
    for row in out.itertuples():
        stats = reliability.get((str(row.group_factor), str(row.term)))
        if stats is not None and not _row_reliable(stats, bayes):
            # The same R-hat/ESS rule as every other row: offsets that did not mix say nothing.
            verdicts.append("unreliable")
            reasons.append(_unreliable_reason(stats, bayes))
        elif row.verdict == "pass" or not np.isfinite(row.correlation):
            verdicts.append(row.verdict)
            reasons.append("")
        else:
            verdicts.append("look" if row.explained else "fail")
            reasons.append("")
    out["verdict"] = verdicts
    out["explanation"] = [
        (
            e
            if v == "pass" or not np.isfinite(c)
            else (
                f"explained by the named sources, but large: {e}"
                if v == "look"
                else f"not explained (the remainder fails: conditional modes at lme4's "
                f"estimates must correlate at least {1 - attribution_tolerance():.2f} with "
                f"lme4's, and the posterior means must equal E[E[u|y,theta]] within "
                f"{RB_Z_MAX:g} MCSE): {e}"
            )
        )
        for e, v, c in zip(out["explanation"], out["verdict"], out["correlation"], strict=True)
    ]
    out["explanation"] = [
        f"{reason} (worst over the term's informed groups). {e}" if reason else e
        for e, reason in zip(out["explanation"], reasons, strict=True)
    ]
    return out.drop(columns=["explained"])


def _offset_reliability(
    bayes: BayesFit, offsets: pd.DataFrame
) -> dict[tuple[str, str], dict[str, float]]:
    """Worst R-hat and smallest bulk/tail ESS over each factor/term's informed offsets."""
    import arviz as az

    informed = offsets[offsets["n_obs"] > 0]
    out: dict[tuple[str, str], dict[str, float]] = {}
    for factor, draws in posterior_offsets(bayes).items():
        if draws.sizes["chain"] * draws.sizes["draw"] < 4:
            continue
        data = xr.Dataset({"u": draws})
        with np.errstate(invalid="ignore", divide="ignore"):
            rhat = az.rhat(data)["u"].to_pandas()
            bulk = az.ess(data, method="bulk")["u"].to_pandas()
            tail = az.ess(data, method="tail")["u"].to_pandas()
        for term in draws["term"].values:
            groups = informed[
                (informed["group_factor"] == str(factor)) & (informed["term"] == str(term))
            ]["group"]
            keep = [g for g in rhat.index.astype(str) if g in set(groups)]
            if not keep:
                continue
            pick = rhat.index.astype(str).isin(keep)
            out[(str(factor), str(term))] = {
                "r_hat": float(np.nanmax(rhat.loc[pick, term].to_numpy(float))),
                "ess_bulk": float(np.nanmin(bulk.loc[pick, term].to_numpy(float))),
                "ess_tail": float(np.nanmin(tail.loc[pick, term].to_numpy(float))),
            }
    return out


def attribution_tolerance() -> float:
    from harness.checks.attribution import REMAINDER_CORRELATION

    return REMAINDER_CORRELATION


def sampler_diagnostics(bayes: BayesFit) -> tuple[pd.DataFrame, dict[str, Any]]:
    """R-hat, ESS and MCSE per parameter, plus divergences and tree-depth hits."""
    import arviz as az

    posterior = bayes.idata.posterior
    names = [v for v in posterior.data_vars if not v.startswith(("z_", "chol_")) and "__" not in v]
    summary: pd.DataFrame = az.summary(
        bayes.idata, var_names=names, kind="diagnostics", round_to="none"
    )  # type: ignore[assignment]
    summary = summary.reset_index().rename(columns={"index": "parameter"})
    stats = bayes.idata.sample_stats
    depth_name = next((n for n in ("depth", "tree_depth") if n in stats), None)
    max_hits_name = next(
        (n for n in ("maxdepth_reached", "reached_max_treedepth") if n in stats), None
    )
    sampler_stats = {
        "divergences": bayes.n_divergent,
        "max_tree_depth": int(stats[depth_name].max()) if depth_name else None,
        "max_tree_depth_hits": int(stats[max_hits_name].sum()) if max_hits_name else None,
        "min_ess_bulk": float(summary["ess_bulk"].min()),
        "min_ess_tail": float(summary["ess_tail"].min()),
        "max_r_hat": float(summary["r_hat"].max()),
        "draws": bayes.draws,
        "chains": bayes.chains,
        "sampler": bayes.sampler,
    }
    return summary, sampler_stats


def _glmm_attribution(freq: FreqFit, bayes: BayesFit, wide: WidePrior) -> GlmmAttribution | None:
    """A GLMM's exact-likelihood shares (None for Gaussian models or when they fail: logged)."""
    if not freq.design.family.laplace:
        return None
    from harness.checks.glmm_attribution import glmm_attribution

    try:
        return glmm_attribution(freq, bayes, wide)
    except Exception as err:  # explanatory: the comparison stands without the Laplace share
        log.warning("exact-likelihood attribution of the GLMM failed: %s", err)
        return None


def compare(
    freq: FreqFit,
    bayes: BayesFit,
    prob: float = 0.95,
    *,
    refit_wide: bool = True,
    engines: tuple[str, str] | None = None,
) -> Comparison:
    """Align an lme4 fit and a PyMC fit of the same spec and compare them.

    Parameters
    ----------
    freq : FreqFit
        From :func:`harness.fit_lme4`.
    bayes : BayesFit
        From :func:`harness.fit_pymc`.
    prob : float
        Interval probability (HDI for PyMC, the lme4 CI level is 0.95).
    refit_wide : bool
        When importance re-weighting to the wide prior is untrustworthy
        (Pareto k-hat > 0.7), refit with the wide prior to measure the prior's
        share of each gap.
    engines : (str, str), optional
        Registry names of the pair; default lme4 and ``bayes.engine``.

    Returns
    -------
    Comparison
    """
    if freq.spec.family != bayes.spec.family or freq.spec.link != bayes.spec.link:
        raise ValueError(  # GLMM hook (issue 12)
            f"fits are of different families: lme4 {freq.design.family.key}, "
            f"PyMC {bayes.design.family.key}"
        )
    if freq.spec.formula != bayes.spec.formula or freq.spec.sigma_by != bayes.spec.sigma_by:
        raise ValueError(
            f"fits are of different models: lme4 {freq.spec.formula!r} (sigma_by="
            f"{freq.spec.sigma_by!r}), PyMC {bayes.spec.formula!r} (sigma_by={bayes.spec.sigma_by!r})"
        )
    check_alignment(freq, bayes)
    wide = reweight_to_wide_prior(bayes, refit=refit_wide)
    glmm = _glmm_attribution(freq, bayes, wide)
    fixed = compare_fixed(freq, bayes, prob, wide, glmm)
    variance = compare_variance(freq, bayes, prob, wide, glmm)
    offsets = compare_offsets(freq, bayes, prob)
    agreement = explain_agreement(freq, bayes, variance, offsets, offset_agreement(offsets), wide)
    diagnostics, sampler_stats = sampler_diagnostics(bayes)
    notes = list(freq.messages)
    if freq.stand_in:
        notes.insert(0, freq.stand_in)
    if wide.note:
        notes.append(f"prior attribution: {wide.note}")
    if sampler_stats["divergences"]:
        notes.append(
            f"{sampler_stats['divergences']} divergent transitions: PyMC summaries are unreliable"
        )
    uncertainty = UNCERTAINTY_SOURCES.copy()
    if freq.design.family.laplace:  # glmer's likelihood is an approximation
        from harness.checks.compare_glmm import GLMM_UNCERTAINTY, explain_glmm_gaps

        variance, glmm_notes = explain_glmm_gaps(freq, variance, glmm)
        notes.extend(glmm_notes)
        uncertainty = GLMM_UNCERTAINTY.copy()
    return Comparison(
        fixed=fixed,
        variance=variance,
        offsets=offsets,
        agreement=agreement,
        diagnostics=diagnostics,
        sampler_stats=sampler_stats,
        uncertainty=uncertainty,
        freq=freq,
        bayes=bayes,
        notes=notes,
        engines=engines if engines is not None else ("lme4", bayes.engine),
    )
