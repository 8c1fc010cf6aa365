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

from harness.align import check_alignment, informed_counts, posterior_offsets
from harness.engines.pymc import corr_var, sd_var

if TYPE_CHECKING:
    from harness.engines.lme4 import FreqFit
    from harness.engines.pymc import BayesFit

log = logging.getLogger("harness")

#: Tolerances behind the verdicts (all in the units named).
TOLERANCES = {
    "fixed_pass_se": 0.25,  # |difference| in lme4 SEs for "pass"
    "fixed_look_se": 0.5,  # ... for "look"; beyond is "fail"
    "rhat_max": 1.01,
    "ess_min": 400.0,
    "offset_corr_pass": 0.98,
    "offset_corr_look": 0.9,
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
    """What ``compare(freq, bayes)`` returns: aligned tables plus the fits."""

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
    return stats["r_hat"] <= TOLERANCES["rhat_max"] and stats["ess_bulk"] >= TOLERANCES["ess_min"]


def compare_fixed(freq: FreqFit, bayes: BayesFit, prob: float = 0.95) -> pd.DataFrame:
    """Fixed effects side by side, with differences in lme4 SEs and in MCSEs."""
    beta = bayes.idata.posterior["beta"]
    rows = []
    for record in freq.fixed.to_dict("records"):
        term = record["term"]
        stats = _summary(beta.sel(fixed_term=term), prob)
        diff = stats["mean"] - record["estimate"]
        diff_se = diff / record["se"] if record["se"] > 0 else float("nan")
        diff_mcse = diff / stats["mcse"] if stats["mcse"] > 0 else float("nan")
        if not _reliable(stats) or bayes.n_divergent > 0:
            verdict = "unreliable"
        elif abs(diff_se) < TOLERANCES["fixed_pass_se"]:
            verdict = "pass"
        elif abs(diff_se) < TOLERANCES["fixed_look_se"]:
            verdict = "look"
        else:
            verdict = "fail"
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
                "tolerance": f"|diff| < {TOLERANCES['fixed_pass_se']} lme4 SE",
                "verdict": verdict,
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


def compare_variance(freq: FreqFit, bayes: BayesFit, prob: float = 0.95) -> pd.DataFrame:
    """Variance components (SDs, correlations) and residual SD(s) side by side."""
    rows = []
    n_groups = {b.label: b.n_levels for b in bayes.design.blocks}
    for record in freq.variance.to_dict("records"):
        component = record["component"]
        draws = _posterior_component(bayes, component)
        if draws is None:
            raise ValueError(f"no PyMC parameter matches lme4 component {component!r}")
        stats = _summary(draws, prob)
        estimate = record["estimate"]
        in_pymc = stats["lower"] <= estimate <= stats["upper"]
        has_ci = not (pd.isna(record["lower"]) or pd.isna(record["upper"]))
        in_lme4 = has_ci and record["lower"] <= stats["median"] <= record["upper"]
        notes = []
        group = record.get("group_factor")
        if isinstance(group, str) and n_groups.get(group, 99) < 30 and record["kind"] == "sd":
            notes.append(
                f"{n_groups[group]} groups: the posterior of an SD is right-skewed, so its mean "
                f"exceeds the {freq.method} estimate; compare the median"
            )
        if record["kind"] == "sd" and estimate < 1e-4 * max(stats["median"], 1e-12):
            notes.append("lme4 estimate at the boundary (singular fit)")
        if not _reliable(stats) or bayes.n_divergent > 0:
            verdict = "unreliable"
        elif in_pymc and (in_lme4 or not has_ci):
            verdict = "pass"
        elif in_pymc or in_lme4:
            verdict = "look"
        else:
            verdict = "fail"
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
                "tolerance": "lme4 estimate inside the PyMC 95% HDI (and PyMC median inside "
                "the lme4 interval when there is one)",
                "verdict": verdict,
                "note": "; ".join(notes),
            }
        )
    return pd.DataFrame(rows)


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
    table["sd_ratio"] = table["pymc_sd"] / table["lme4_condsd"]
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


def offset_agreement(offsets: pd.DataFrame) -> pd.DataFrame:
    """Per factor and term: correlation, RMSE, slope and SD ratio over informed groups."""
    rows = []
    for (factor, term), part in offsets.groupby(["group_factor", "term"], sort=False):
        informed = part[part["n_obs"] > 0]
        x = informed["lme4_mode"].to_numpy(float)
        y = informed["pymc_mean"].to_numpy(float)
        if len(x) >= 3 and np.std(x) > 0 and np.std(y) > 0:
            correlation = float(np.corrcoef(x, y)[0, 1])
            slope = float(np.polyfit(x, y, 1)[0])
        else:
            correlation = slope = float("nan")
        rmse = float(np.sqrt(np.mean((y - x) ** 2))) if len(x) else float("nan")
        sd_ratio = (
            float(np.mean(informed["pymc_sd"] / informed["lme4_condsd"]))
            if len(x)
            else float("nan")
        )
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
                "slope": slope,
                "sd_ratio": sd_ratio,
                "tolerance": f"correlation >= {TOLERANCES['offset_corr_pass']}",
                "verdict": verdict,
            }
        )
    return pd.DataFrame(rows)


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
        "max_r_hat": float(summary["r_hat"].max()),
        "draws": bayes.draws,
        "chains": bayes.chains,
        "sampler": bayes.sampler,
    }
    return summary, sampler_stats


def compare(freq: FreqFit, bayes: BayesFit, prob: float = 0.95) -> Comparison:
    """Align an lme4 fit and a PyMC fit of the same spec and compare them.

    Parameters
    ----------
    freq : FreqFit
        From :func:`harness.fit_lme4`.
    bayes : BayesFit
        From :func:`harness.fit_pymc`.
    prob : float
        Interval probability (HDI for PyMC, the lme4 CI level is 0.95).

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
    fixed = compare_fixed(freq, bayes, prob)
    variance = compare_variance(freq, bayes, prob)
    offsets = compare_offsets(freq, bayes, prob)
    agreement = offset_agreement(offsets)
    diagnostics, sampler_stats = sampler_diagnostics(bayes)
    notes = list(freq.messages)
    if freq.stand_in:
        notes.insert(0, freq.stand_in)
    if sampler_stats["divergences"]:
        notes.append(
            f"{sampler_stats['divergences']} divergent transitions: PyMC summaries are unreliable"
        )
    uncertainty = UNCERTAINTY_SOURCES.copy()
    if freq.design.family.glm:  # GLMM hook (issue 12): glmer's likelihood is an approximation
        from harness.compare_glmm import GLMM_UNCERTAINTY, explain_glmm_gaps

        variance, glmm_notes = explain_glmm_gaps(freq, variance)
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
    )
