"""The partially clustered trial study: Type I error, power, coverage and bias.

Design (per replicate): 100 treated participants in groups of 5 or 10 (20 or
10 groups), 100 control participants each in a group of their own;
``y = effect * tx + u_group * tx + e`` with ``e ~ N(0, sigma_control^2)``
under control and ``N(0, sigma_treatment^2)`` under treatment.

Conditions: ICC 0, 0.05, 0.1, 0.2; residual SD ratio (treatment / control) 1
and 2; effect 0 and 0.5 (control-arm SD units); groups of 5 and 10.

**ICC** is defined within the treatment arm, relative to the treatment arm's
own residual variance: ``ICC = group_sd^2 / (group_sd^2 + sigma_treatment^2)``,
so ``group_sd = sigma_treatment * sqrt(ICC / (1 - ICC))``, with
``sigma_control = 1`` and ``sigma_treatment = sd_ratio``.

Fitters (all test H0: effect = 0 at the study's alpha and give 95% intervals):

- ``lm``: ordinary least squares ``y ~ 1 + tx`` ignoring the clustering, with
  a pooled residual variance and n - 2 df (identical to R's ``lm``, computed
  in NumPy/SciPy: it is the pooled two-sample t-test).
- ``lme4``: ``lmerTest::lmer(y ~ 1 + tx + (0 + tx | group))``, one residual
  variance, Satterthwaite df; the interval is estimate +/- t(df) SE so that it
  agrees with the test.
- ``nlme_hetero``: ``nlme::lme`` with ``varIdent(~ 1 | arm)``, with nlme's own
  containment df (the number of groups minus fixed effects: large here).
- ``nlme_hetero_satt``: the same fit with Welch-Satterthwaite df built from the
  estimated variance components (treatment-arm cluster means vs control-arm
  mean), the df that Satterthwaite gives for this design when groups are
  balanced (Bauer, Sterba & Hallfors 2008; Baldwin et al. 2011).
- ``pymc_homo`` / ``pymc_hetero``: PyMC with the harness's weak priors, one
  or one-per-arm residual SD; the "p-value" is the posterior tail probability
  ``2 min(P(b > 0), P(b < 0))`` and the interval the 95% equal-tailed one.
  The residual-SD prior is fixed at Exponential(0.5) (mean 2, the scale of y
  in this design) instead of the weak profile's data-scaled
  Exponential(1 / sd(y)): the PyMC engine compiles the residual-SD prior into
  the model (it is part of the structure key), so a data-scaled one would
  recompile the model for every replicate (about a minute each), while a
  fixed one lets each worker compile once and swap the data in.  The other
  weak priors are data-scaled as usual (they enter the model as data).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from itertools import product
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from harness.datasets.partially_clustered import simulate_partially_clustered
from harness.model.spec import ModelSpec, Prior
from harness.studies.core import Condition, Fitter, Study

FORMULA = "y ~ 1 + tx + (0 + tx | group)"
SPEC = ModelSpec(FORMULA, name="partially_clustered")
HETERO_SPEC = SPEC.with_(sigma_by="arm", name="partially_clustered_hetero")

#: Residual-SD prior of the PyMC fitters (see the module docstring).
SIGMA_PRIOR = Prior("Exponential", {"lam": 0.5})

ICCS = (0.0, 0.05, 0.1, 0.2)
SD_RATIOS = (1.0, 2.0)
EFFECTS = (0.0, 0.5)
GROUP_SIZES = (5, 10)
N_TREATED = 100
N_CONTROL = 100

DEFINITIONS = {
    "icc": "intra-class correlation within the treatment arm: group_sd^2 / (group_sd^2 + "
    "sigma_treatment^2)",
    "sd_ratio": "residual SD of the treatment arm over that of the control arm (sigma_control = 1)",
    "effect": "true treatment effect (0: the rejection rate is the Type I error; otherwise power)",
    "group_size": "participants per treatment group (100 treated in total; 100 controls, each "
    "their own group of one)",
    "group_sd": "SD of the treatment-group effects, from the ICC",
}


def group_sd_from_icc(icc: float, sigma_treatment: float) -> float:
    """``group_sd`` giving intra-class correlation ``icc`` in the treatment arm."""
    if not 0 <= icc < 1:
        raise ValueError(f"icc must be in [0, 1), got {icc}")
    return float(sigma_treatment * math.sqrt(icc / (1 - icc)))


def condition(icc: float, sd_ratio: float, effect: float, group_size: int, index: int) -> Condition:
    """One condition of the grid, with the generator's arguments spelled out."""
    if N_TREATED % group_size:
        raise ValueError(f"group_size must divide {N_TREATED}, got {group_size}")
    sigma_treatment = float(sd_ratio)
    params = {
        "icc": float(icc),
        "sd_ratio": float(sd_ratio),
        "effect": float(effect),
        "group_size": int(group_size),
        "n_groups": N_TREATED // group_size,
        "group_sd": group_sd_from_icc(icc, sigma_treatment),
        "sigma_control": 1.0,
        "sigma_treatment": sigma_treatment,
    }
    cid = f"icc={icc:g}_ratio={sd_ratio:g}_effect={effect:g}_m={group_size}"
    return Condition(cid, index, params)


def full_grid() -> list[Condition]:
    """All 32 conditions, in a fixed order (the order fixes the seeds)."""
    cells = product(ICCS, SD_RATIOS, EFFECTS, GROUP_SIZES)
    return [condition(*cell, index=i) for i, cell in enumerate(cells)]


def generate(params: Mapping[str, Any], seed: int) -> tuple[pd.DataFrame, dict[str, float]]:
    """One replicate's data set and its true treatment effect."""
    data = simulate_partially_clustered(
        seed=seed,
        n_groups=int(params["n_groups"]),
        group_size=int(params["group_size"]),
        n_control=N_CONTROL,
        effect=float(params["effect"]),
        group_sd=float(params["group_sd"]),
        sigma_control=float(params["sigma_control"]),
        sigma_treatment=float(params["sigma_treatment"]),
    )
    return data, {"tx": float(params["effect"])}


# --------------------------------------------------------------------------- fitters


def fit_ols(
    data: pd.DataFrame,
    truth: Mapping[str, float],
    seed: int,
    level: float = 0.95,
) -> list[dict[str, Any]]:
    """``lm(y ~ 1 + tx)``: OLS, pooled residual variance, t test on n - 2 df."""
    y = data["y"].to_numpy(dtype=float)
    X = np.column_stack([np.ones(len(y)), data["tx"].to_numpy(dtype=float)])
    beta, _, rank, _ = np.linalg.lstsq(X, y, rcond=None)
    if rank < X.shape[1]:
        raise ValueError("lm: the design matrix (1, tx) is rank deficient (one arm is empty)")
    df = len(y) - X.shape[1]
    resid = y - X @ beta
    s2 = float(resid @ resid) / df
    se = math.sqrt(s2 * np.linalg.inv(X.T @ X)[1, 1])
    return [_t_row("tx", float(beta[1]), se, df, level, converged=True)]


def _t_row(
    parameter: str, estimate: float, se: float, df: float, level: float, **extra: Any
) -> dict[str, Any]:
    q = stats.t.ppf(0.5 + level / 2, df)
    return {
        "parameter": parameter,
        "estimate": estimate,
        "se_or_sd": se,
        "df": df,
        "p_value": float(2 * stats.t.sf(abs(estimate / se), df)),
        "lower": estimate - q * se,
        "upper": estimate + q * se,
        **extra,
    }


def fit_lme4_homo(
    data: pd.DataFrame, truth: Mapping[str, float], seed: int, level: float = 0.95
) -> list[dict[str, Any]]:
    """lmerTest with one residual variance; Satterthwaite df, t interval."""
    from harness.engines.lme4 import fit_lme4

    fit = fit_lme4(SPEC, data, n_sims=0)
    row = fit.fixed.set_index("term").loc["tx"]
    out = _t_row(
        "tx",
        float(row["estimate"]),
        float(row["se"]),
        float(row["df"]),
        level,
        converged=fit.converged,
        singular=fit.singular,
    )
    out["p_value"] = float(row["p_value"])  # lmerTest's own, identical to the t row's
    return [out]


def fit_nlme_hetero(
    data: pd.DataFrame,
    truth: Mapping[str, float],
    seed: int,
    level: float = 0.95,
    df_method: str = "nlme",
) -> list[dict[str, Any]]:
    """nlme with one residual SD per arm; nlme's df or Welch-Satterthwaite df.

    Parameters
    ----------
    df_method : {"nlme", "satterthwaite"}
        ``satterthwaite``: ``(Vt + Vc)^2 / (Vt^2 / (k - 1) + Vc^2 / (n_c - 1))``
        where ``Vt = 1 / sum_j 1 / (tau^2 + sigma_t^2 / m_j)`` is the variance
        of the treatment arm's (GLS-weighted) cluster mean over ``k`` groups
        and ``Vc = sigma_c^2 / n_c`` that of the control mean.
    """
    from harness.engines.lme4 import fit_lme4

    if df_method not in ("nlme", "satterthwaite"):
        raise ValueError(f"df_method must be 'nlme' or 'satterthwaite', not {df_method!r}")
    fit = fit_lme4(HETERO_SPEC, data, n_sims=0)
    row = fit.fixed.set_index("term").loc["tx"]
    estimate, se = float(row["estimate"]), float(row["se"])
    df = float(row["df"])
    if df_method == "satterthwaite":
        df = welch_satterthwaite_df(data, fit.variance)
    return [_t_row("tx", estimate, se, df, level, converged=fit.converged, singular=fit.singular)]


def welch_satterthwaite_df(data: pd.DataFrame, variance: pd.DataFrame) -> float:
    """Satterthwaite df of the treatment contrast from nlme's variance estimates."""
    table = variance.set_index("component")["estimate"]
    tau = float(table.get("group: sd(tx)", 0.0))
    sig = variance[variance["kind"] == "sigma"].set_index("term")["estimate"]
    if not {"control", "treatment"} <= set(sig.index):
        raise ValueError(f"nlme variance table lacks per-arm sigmas; it has {list(sig.index)}")
    treated = data[data["tx"] == 1]
    sizes = treated.groupby("group", observed=True).size().to_numpy(dtype=float)
    n_control = int((data["tx"] == 0).sum())
    v_t = 1.0 / np.sum(1.0 / (tau**2 + sig["treatment"] ** 2 / sizes))
    v_c = sig["control"] ** 2 / n_control
    return float((v_t + v_c) ** 2 / (v_t**2 / (len(sizes) - 1) + v_c**2 / (n_control - 1)))


def fit_pymc_effect(
    data: pd.DataFrame,
    truth: Mapping[str, float],
    seed: int,
    *,
    hetero: bool,
    chains: int = 2,
    draws: int = 1000,
    tune: int = 1000,
    level: float = 0.95,
) -> list[dict[str, Any]]:
    """PyMC; posterior mean, SD, equal-tailed interval and tail probability of ``tx``."""
    from harness.engines.pymc import fit_pymc

    # One run per replicate (not adaptive): the study's speed, and its diagnostics are reported.
    fit = fit_pymc(
        pymc_spec(hetero), data, seed=seed, chains=chains, draws=draws, tune=tune, adaptive=False
    )
    return [posterior_row(fit, "tx", level)]


def pymc_spec(hetero: bool) -> ModelSpec:
    """The PyMC fitters' spec: weak priors with the fixed residual-SD prior."""
    return (HETERO_SPEC if hetero else SPEC).with_(priors={"sigma": SIGMA_PRIOR})


def posterior_row(fit: Any, term: str, level: float) -> dict[str, Any]:
    """Summary row of one fixed effect, with the sampler's diagnostics."""
    import arviz as az

    post = fit.idata.posterior
    draws = post["beta"].sel(fixed_term=term).to_numpy().ravel()
    tail = 0.5 - level / 2
    p_pos = float(np.mean(draws > 0))
    watched = [
        v
        for v in post.data_vars
        if v == "beta" or v == "sigma" or (v.startswith("sd_") and not v.endswith("_log__"))
    ]
    subset = post[watched]
    rhat = float(max(float(az.rhat(subset)[v].max()) for v in watched))
    ess = float(min(float(az.ess(subset, method="bulk")[v].min()) for v in watched))
    return {
        "parameter": term,
        "estimate": float(draws.mean()),
        "se_or_sd": float(draws.std(ddof=1)),
        "lower": float(np.quantile(draws, tail)),
        "upper": float(np.quantile(draws, 1 - tail)),
        "p_value": float(2 * min(p_pos, 1 - p_pos)),
        "rhat": rhat,
        "ess_bulk": ess,
        "divergences": int(fit.n_divergent),
        "converged": bool(rhat < 1.01 and fit.n_divergent == 0),
        "fit_seconds": float(fit.compile_seconds + fit.sample_seconds),
    }


def fitters(
    pymc_reps: int | None = None, chains: int = 2, draws: int = 1000, tune: int = 1000
) -> list[Fitter]:
    """The six analyses; ``pymc_reps`` caps the replicates the PyMC fitters run."""
    sampler = {"chains": chains, "draws": draws, "tune": tune}
    return [
        Fitter(
            "lm", fit_ols, "OLS y ~ 1 + tx ignoring the clustering (as R's lm), t test on n - 2 df."
        ),
        Fitter(
            "lme4",
            fit_lme4_homo,
            "lmerTest::lmer(y ~ 1 + tx + (0 + tx | group)), one residual SD, Satterthwaite df.",
        ),
        Fitter(
            "nlme_hetero",
            fit_nlme_hetero,
            "nlme::lme, random = ~ 0 + tx | group, varIdent(~ 1 | arm); nlme's containment df.",
            {"df_method": "nlme"},
        ),
        Fitter(
            "nlme_hetero_satt",
            fit_nlme_hetero,
            "The same nlme fit with Welch-Satterthwaite df from its variance components.",
            {"df_method": "satterthwaite"},
        ),
        Fitter(
            "pymc_homo",
            fit_pymc_effect,
            f"PyMC (nutpie), weak priors (sigma ~ Exponential(0.5)), one residual SD; "
            f"{chains} chains x {draws} draws; tail probability as p-value.",
            {"hetero": False, **sampler},
            max_reps=pymc_reps,
        ),
        Fitter(
            "pymc_hetero",
            fit_pymc_effect,
            f"PyMC (nutpie), weak priors (sigma ~ Exponential(0.5)), one residual SD "
            f"per arm; {chains} chains x {draws} draws; tail probability as p-value.",
            {"hetero": True, **sampler},
            max_reps=pymc_reps,
        ),
    ]


DESCRIPTION = (
    "A partially clustered (partially nested) randomised trial: the treatment is delivered in "
    "groups, the control arm is unclustered. Ignoring the clustering, or forcing one residual "
    "variance on both arms when they differ, is reported to inflate the Type I error of the "
    "treatment effect (Bauer, Sterba & Hallfors 2008; Baldwin et al. 2011; Candlish et al. "
    "2018), while the heteroscedastic partially nested model keeps it near the nominal level. "
    "ICC is defined within the treatment arm: group_sd^2 / (group_sd^2 + sigma_treatment^2)."
)


def study(pymc_reps: int | None = 50) -> Study:
    """The full 32-condition grid (PyMC fitters on the first ``pymc_reps`` replicates)."""
    return Study(
        "partially_clustered",
        DESCRIPTION,
        generate,
        full_grid(),
        fitters(pymc_reps),
        default_reps=200,
        definitions=DEFINITIONS,
    )


def type1_study() -> Study:
    """The acceptance cell: ICC 0.1, SD ratio 2, effect 0, groups of 10; all fitters."""
    cells = [
        c
        for c in full_grid()
        if c.params["icc"] == 0.1
        and c.params["sd_ratio"] == 2.0
        and c.params["effect"] == 0.0
        and c.params["group_size"] == 10
    ]
    return Study(
        "partially_clustered_type1",
        DESCRIPTION,
        generate,
        cells,
        fitters(None),
        default_reps=200,
        definitions=DEFINITIONS,
    )


def smoke_study() -> Study:
    """Two conditions, the fast frequentist fitters: for tests and the benchmark."""
    cells = [
        c
        for c in full_grid()
        if c.params["sd_ratio"] == 2.0
        and c.params["effect"] == 0.0
        and c.params["group_size"] == 10
        and c.params["icc"] in (0.0, 0.2)
    ]
    return Study(
        "smoke",
        "Two cells of the partially clustered study with the fast "
        "frequentist fitters (tests, benchmark). " + DESCRIPTION,
        generate,
        cells,
        fitters()[:3],
        default_reps=3,
        definitions=DEFINITIONS,
    )
