"""Simulation-based calibration (Talts et al. 2018) of the PyMC cafe model.

Each replicate draws the parameters from the prior, simulates a data set from
them, fits the model and records the rank of each true value among ``L``
thinned posterior draws.  If the sampler computes the posterior correctly,
every rank is uniform on ``0..L``.

The prior must be proper and must not depend on the data, so SBC uses the
m14.1 profile (Normal(5, 2), Normal(-1, 0.5), Exponential(1) for the SDs and
sigma, LKJ(2)) rather than the default weak priors, which are scaled by the
simulated data.  The prior draws are read from the same resolved priors the
PyMC model is built from, so the two cannot drift apart.

Uniformity is judged two ways: a chi-square test on binned ranks, and the
ECDF of the ranks against simultaneous bands (Säilynoja, Bürkner & Vehtari
2022, simulation method).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from harness.datasets.cafe import simulate_cafe
from harness.model.spec import ModelSpec, Prior, build_design
from harness.studies.core import Condition, Fitter, Study

SPEC = ModelSpec("wait ~ 1 + afternoon + (1 + afternoon | cafe)", priors="m14.1", name="cafe_sbc")
#: Posterior draws the ranks are computed among (ranks take L + 1 = 100 values).
N_THIN = 99
#: SBC parameter -> (posterior variable, selection).
PARAMETERS: dict[str, tuple[str, dict[str, str]]] = {
    "a": ("beta", {"fixed_term": "(Intercept)"}),
    "b": ("beta", {"fixed_term": "afternoon"}),
    "sigma_a": ("sd_cafe", {"cafe__term": "(Intercept)"}),
    "sigma_b": ("sd_cafe", {"cafe__term": "afternoon"}),
    "rho": ("corr_cafe", {"cafe__term": "(Intercept)", "cafe__term_b": "afternoon"}),
    "sigma": ("sigma", {}),
}


@cache
def _priors() -> Any:
    from harness.model.priors import resolve_priors

    return resolve_priors(build_design(SPEC, simulate_cafe(seed=0)))


def _draw(prior: Prior, rng: np.random.Generator) -> float:
    params = dict(prior.params)
    if prior.dist == "Normal":
        return float(rng.normal(params["mu"], params["sigma"]))
    if prior.dist == "Exponential":
        return float(rng.exponential(1.0 / params["lam"]))
    if prior.dist == "HalfNormal":
        return float(abs(rng.normal(0.0, params["sigma"])))
    raise ValueError(
        f"SBC cannot draw from prior {prior.describe()}; use Normal, Exponential or "
        "HalfNormal priors"
    )


def draw_prior(rng: np.random.Generator) -> dict[str, float]:
    """One draw of (a, b, sigma_a, sigma_b, rho, sigma) from the m14.1 priors.

    For two terms, LKJ(eta) puts ``(rho + 1) / 2 ~ Beta(eta, eta)`` on the correlation.
    """
    priors = _priors()
    eta = float(priors.lkj_eta)
    return {
        "a": _draw(priors.fixed["(Intercept)"], rng),
        "b": _draw(priors.fixed["afternoon"], rng),
        "sigma_a": _draw(priors.sd[("cafe", "(Intercept)")], rng),
        "sigma_b": _draw(priors.sd[("cafe", "afternoon")], rng),
        "rho": float(2.0 * rng.beta(eta, eta) - 1.0),
        "sigma": _draw(priors.sigma, rng),
    }


def generate(params: Mapping[str, Any], seed: int) -> tuple[pd.DataFrame, dict[str, float]]:
    """Parameters from the prior, then the cafe data from those parameters."""
    rng = np.random.default_rng(seed)
    truth = draw_prior(rng)
    data_seed = int(rng.integers(2**32))
    data = simulate_cafe(
        data_seed, int(params["n_cafes"]), int(params["n_visits"]), "numpy", **truth
    )
    return data, truth


def thin_indices(total: int, n_thin: int = N_THIN) -> np.ndarray:
    """``n_thin`` evenly spaced positions among ``total`` pooled draws."""
    if total < n_thin:
        raise ValueError(f"need at least {n_thin} posterior draws to thin, got {total}")
    return np.linspace(0, total - 1, n_thin).round().astype(int)


def fit_sbc(
    data: pd.DataFrame,
    truth: Mapping[str, float],
    seed: int,
    *,
    chains: int = 2,
    draws: int = 1000,
    tune: int = 1000,
    n_thin: int = N_THIN,
    level: float = 0.95,
) -> list[dict[str, Any]]:
    """Fit the m14.1 model; rank of each true value among ``n_thin`` thinned draws."""
    import arviz as az

    from harness.engines.pymc import fit_pymc

    # One run per replicate (not adaptive), for the study's speed.
    fit = fit_pymc(SPEC, data, seed=seed, chains=chains, draws=draws, tune=tune, adaptive=False)
    post = fit.idata.posterior
    keep = thin_indices(chains * draws, n_thin)
    tail = 0.5 - level / 2
    rows: list[dict[str, Any]] = []
    for name, (var, sel) in PARAMETERS.items():
        values = post[var].sel(sel) if sel else post[var]
        pooled = values.to_numpy().reshape(-1)
        thinned = pooled[keep]
        rows.append(
            {
                "parameter": name,
                "estimate": float(pooled.mean()),
                "se_or_sd": float(pooled.std(ddof=1)),
                "lower": float(np.quantile(pooled, tail)),
                "upper": float(np.quantile(pooled, 1 - tail)),
                "rank": int(np.sum(thinned < truth[name])),
                "n_draws": int(n_thin),
                "rhat": float(az.rhat(values.to_dataset(name="v"))["v"]),
                "ess_bulk": float(az.ess(values.to_dataset(name="v"), method="bulk")["v"]),
                "divergences": int(fit.n_divergent),
                "fit_seconds": float(fit.compile_seconds + fit.sample_seconds),
            }
        )
    worst = max(r["rhat"] for r in rows)
    for row in rows:
        row["converged"] = bool(worst < 1.01 and fit.n_divergent == 0)
    return rows


DESCRIPTION = (
    "Simulation-based calibration of the PyMC cafe model (Statistical Rethinking m14.1: "
    "correlated varying intercepts and slopes, 20 cafes x 10 visits). Each replicate draws "
    "a, b, sigma_a, sigma_b, rho and sigma from the m14.1 priors, simulates a data set, fits "
    "the model with the same priors, and records the rank of each true value among 99 thinned "
    "posterior draws. A correct sampler gives uniform ranks."
)


def study(chains: int = 2, draws: int = 1000, tune: int = 1000) -> Study:
    """SBC of the cafe model with the m14.1 priors."""
    cells = [Condition("cafe_20x10", 0, {"n_cafes": 20, "n_visits": 10})]
    fitter = Fitter(
        "pymc_m14.1",
        fit_sbc,
        f"PyMC (nutpie) with the m14.1 priors; {chains} chains "
        f"x {draws} draws, thinned to {N_THIN} for the ranks.",
        {"chains": chains, "draws": draws, "tune": tune},
    )
    return Study(
        "cafe_sbc",
        DESCRIPTION,
        generate,
        cells,
        [fitter],
        default_reps=200,
        kind="sbc",
        definitions={
            "rank": f"number of the {N_THIN} thinned posterior draws below the "
            "true value (uniform on 0..99 if calibrated)"
        },
    )


# --------------------------------------------------------------------------- uniformity


def _bins(n_ranks: int, n: int) -> int:
    """Most bins (at most 20) dividing the rank range evenly, at least 10 expected per bin."""
    options = [b for b in range(2, min(n_ranks, 20) + 1) if n_ranks % b == 0 and n / b >= 10]
    return max(options) if options else 1


def rank_uniformity(
    ranks: np.ndarray, n_draws: int, alpha: float = 0.01, level: float = 0.99, seed: int = 0
) -> dict[str, Any]:
    """Chi-square test of binned ranks and the simultaneous ECDF band check.

    Parameters
    ----------
    ranks : array of int
        Ranks in ``0..n_draws``.
    n_draws : int
        ``L``: the number of posterior draws ranked among.
    alpha : float
        Level of the chi-square test.
    level : float
        Simultaneous coverage of the ECDF band.

    Returns
    -------
    dict
        n, bins, chi2, chi2_df, chi2_p, max_ecdf_diff, outside_band, uniform.
    """
    ranks = np.asarray(ranks, dtype=int)
    n, n_ranks = len(ranks), n_draws + 1
    if n == 0:
        raise ValueError("no ranks to test")
    if ranks.min() < 0 or ranks.max() > n_draws:
        raise ValueError(f"ranks must lie in 0..{n_draws}, got {ranks.min()}..{ranks.max()}")
    bins = _bins(n_ranks, n)
    if bins >= 2:
        counts = np.bincount(ranks * bins // n_ranks, minlength=bins)
        chi2, p = stats.chisquare(counts)
    else:
        chi2, p = np.nan, np.nan
    diff = ecdf_difference(ranks, n_draws)
    band = ecdf_band(n, n_draws, level=level, seed=seed)
    outside = bool(np.any((diff["diff"] < band["lower"]) | (diff["diff"] > band["upper"])))
    return {
        "n": n,
        "bins": bins,
        "chi2": float(chi2),
        "chi2_df": bins - 1,
        "chi2_p": float(p),
        "max_ecdf_diff": float(np.abs(diff["diff"]).max()),
        "outside_band": outside,
        "uniform": bool((np.isnan(p) or p >= alpha) and not outside),
    }


def ecdf_difference(ranks: np.ndarray, n_draws: int) -> pd.DataFrame:
    """ECDF of the ranks minus the uniform CDF at ``z_i = i / (L + 1)``, ``i = 1..L``."""
    ranks = np.asarray(ranks, dtype=int)
    n_ranks = n_draws + 1
    counts = np.cumsum(np.bincount(ranks, minlength=n_ranks))[:-1]
    z = np.arange(1, n_ranks) / n_ranks
    return pd.DataFrame({"z": z, "ecdf": counts / len(ranks), "diff": counts / len(ranks) - z})


@cache
def _band(n: int, n_draws: int, level: float, n_sims: int, seed: int) -> pd.DataFrame:
    n_ranks = n_draws + 1
    z = np.arange(1, n_ranks) / n_ranks
    rng = np.random.default_rng(seed)
    sims = rng.integers(0, n_ranks, size=(n_sims, n))
    counts = np.stack([np.cumsum(np.bincount(s, minlength=n_ranks))[:-1] for s in sims])
    lower_tail = stats.binom.cdf(counts, n, z)
    upper_tail = stats.binom.sf(counts - 1, n, z)
    min_p = np.minimum(1.0, 2 * np.minimum(lower_tail, upper_tail)).min(axis=1)
    gamma = float(np.quantile(min_p, 1 - level))
    lower = stats.binom.ppf(gamma / 2, n, z) / n - z
    upper = stats.binom.ppf(1 - gamma / 2, n, z) / n - z
    return pd.DataFrame({"z": z, "lower": lower, "upper": upper, "gamma": gamma})


def ecdf_band(
    n: int, n_draws: int, level: float = 0.99, n_sims: int = 2000, seed: int = 0
) -> pd.DataFrame:
    """Simultaneous band for the ECDF difference of ``n`` uniform ranks on ``0..n_draws``.

    The pointwise binomial level ``gamma`` is chosen by simulation so that
    ``level`` of uniform samples stay inside the band at every ``z_i`` at once
    (Säilynoja, Bürkner & Vehtari 2022).

    Returns
    -------
    DataFrame
        z, lower, upper (on the ECDF-difference scale), gamma.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    return _band(int(n), int(n_draws), float(level), int(n_sims), int(seed)).copy()


def sbc_summary(results: pd.DataFrame, alpha: float = 0.01, level: float = 0.99) -> pd.DataFrame:
    """Per fitter and parameter: rank uniformity tests, coverage, diagnostics."""
    ok = results[results["error"].isna() & results["rank"].notna()]
    rows = []
    for (fitter, parameter), group in ok.groupby(["fitter", "parameter"], sort=False):
        n_draws = int(group["n_draws"].iloc[0])
        test = rank_uniformity(group["rank"].to_numpy(dtype=int), n_draws, alpha, level)
        covered = group["covered"].astype(float)
        rows.append(
            {
                "fitter": fitter,
                "parameter": parameter,
                **test,
                "coverage": float(covered.mean()),
                "coverage_mcse": float(np.sqrt(covered.mean() * (1 - covered.mean()) / len(group))),
                "share_divergent": float((group["divergences"].fillna(0) > 0).mean()),
                "max_rhat": float(group["rhat"].max()),
                "min_ess_bulk": float(group["ess_bulk"].min()),
            }
        )
    return pd.DataFrame(rows)
