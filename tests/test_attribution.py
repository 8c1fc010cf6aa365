"""Attribution of gaps to named sources, on constructed draws whose answers are known."""

from __future__ import annotations

import arviz as az
import numpy as np
import pandas as pd
import pytest

from harness.checks.attribution import (
    REMAINDER_MCSE,
    WidePrior,
    attribute_row,
    conditional_modes,
    reweight_to_wide_prior,
    weighted_mode,
)
from harness.checks.compare import compare_variance
from harness.fits import BayesFit, FreqFit
from harness.model.priors import resolve_priors
from harness.model.spec import ModelSpec, Prior, build_design

CHAINS, DRAWS = 4, 1000
LEVELS = list("abcdefgh")


def _data() -> pd.DataFrame:
    rng = np.random.default_rng(3)
    g = np.repeat(LEVELS, 5)
    offsets = dict(zip(LEVELS, rng.normal(scale=1.0, size=len(LEVELS)), strict=True))
    y = 10.0 + np.array([offsets[v] for v in g]) + rng.normal(size=g.size)
    return pd.DataFrame({"y": y, "g": g})


def _uniform(n: int) -> WidePrior:
    return WidePrior("psis", 0.0, np.full(n, 1.0 / n))


def _bayes(priors, beta_draws, sd_draws, sigma_draws) -> BayesFit:
    spec = ModelSpec("y ~ 1 + (1 | g)", priors=priors)
    design = build_design(spec, _data())
    shape = (CHAINS, DRAWS)
    idata = az.from_dict(
        posterior={
            "beta": beta_draws.reshape(*shape, 1),
            "sd_g": sd_draws.reshape(*shape, 1),
            "sigma": sigma_draws.reshape(shape),
        },
        sample_stats={"diverging": np.zeros(shape, bool)},
        coords={"fixed_term": ["(Intercept)"], "g__term": ["(Intercept)"]},
        dims={"beta": ["fixed_term"], "sd_g": ["g__term"]},
    )
    return BayesFit(
        spec=spec,
        design=design,
        idata=idata,
        sampler="constructed",
        seed=0,
        draws=DRAWS,
        tune=0,
        chains=CHAINS,
        priors=resolve_priors(design),
        compile_seconds=0.0,
        sample_seconds=0.0,
        model_code="",
    )


def test_prior_driven_posterior_recovers_the_known_prior_shift():
    # Likelihood for the intercept: Normal(10, 0.5).  The fit's prior Normal(8, 1) pulls the
    # posterior to Normal(9.6, sqrt(0.2)): precision 4 + 1, mean (4 * 10 + 1 * 8) / 5.
    # Re-weighting to the (flat) wide prior must give back 10: the prior's share is -0.4.
    rng = np.random.default_rng(5)
    n = CHAINS * DRAWS
    beta = rng.normal(9.6, np.sqrt(0.2), n)
    sd = np.abs(rng.normal(1.0, 0.05, n))
    sigma = np.abs(rng.normal(1.0, 0.05, n))
    bayes = _bayes({"(Intercept)": Prior("Normal", {"mu": 8.0, "sigma": 1.0})}, beta, sd, sigma)
    wide = reweight_to_wide_prior(bayes, refit=False)
    assert wide.method == "psis"
    assert wide.k_hat < 0.7
    attr = attribute_row(
        beta.reshape(CHAINS, DRAWS),
        10.0,
        how="mean",
        wide_values=beta,
        wide=wide,
        scale=0.5,
        scale_name="lme4 SE",
        tolerance=0.125,
        tolerance_text="0.25 lme4 SE",
        use_mode=False,
    )
    assert attr.gap == pytest.approx(-0.4, abs=0.03)
    assert attr.attribution["prior"] == pytest.approx(-0.4, abs=0.05)
    assert abs(attr.attribution["remainder"]) < 0.05
    assert attr.explained
    assert "the prior accounts for" in attr.explanation and "k-hat" in attr.explanation


def test_the_fits_own_wide_prior_gives_uniform_weights():
    rng = np.random.default_rng(6)
    n = CHAINS * DRAWS
    bayes = _bayes("flat", rng.normal(10, 0.3, n), np.abs(rng.normal(1, 0.1, n)), np.ones(n))
    wide = reweight_to_wide_prior(bayes, refit=False)
    np.testing.assert_allclose(wide.weights, 1.0 / n)


def test_boundary_estimate_is_explained_as_a_boundary():
    # lme4 says the SD is exactly 0 (singular); the posterior of a positive SD cannot sit there.
    rng = np.random.default_rng(8)
    draws = np.abs(rng.normal(0.0, 0.5, (CHAINS, DRAWS)))
    flat = draws.ravel()
    attr = attribute_row(
        draws,
        0.0,
        how="median",
        wide_values=flat,
        wide=_uniform(flat.size),
        scale=float(flat.std(ddof=1)),
        scale_name="posterior SD",
        tolerance=0.5 * float(flat.std(ddof=1)),
        tolerance_text="0.5 posterior SD",
        bounds=(0.0, None),
        boundary="lower",
    )
    q_low = float(np.quantile(flat, 0.025))
    assert attr.attribution["boundary"] == pytest.approx(q_low, abs=0.01)
    assert attr.attribution["summary"] == pytest.approx(np.median(flat) - q_low, abs=0.01)
    assert attr.attribution["remainder"] == 0.0
    assert attr.explained
    assert "boundary 0 (singular fit)" in attr.explanation


def test_only_monte_carlo_error_leaves_a_small_remainder():
    rng = np.random.default_rng(9)
    draws = rng.normal(3.0, 1.0, (CHAINS, DRAWS))
    flat = draws.ravel()
    attr = attribute_row(
        draws,
        3.0,
        how="mean",
        wide_values=flat,
        wide=_uniform(flat.size),
        scale=1.0,
        scale_name="lme4 SE",
        tolerance=0.25,
        tolerance_text="0.25 lme4 SE",
        use_mode=False,
    )
    assert attr.attribution["prior"] == pytest.approx(0.0, abs=1e-12)
    assert abs(attr.attribution["remainder"]) <= REMAINDER_MCSE * attr.mcse
    assert attr.mcse == pytest.approx(1.0 / np.sqrt(flat.size), rel=0.2)
    assert attr.explained


def test_an_unexplained_gap_is_not_explained():
    rng = np.random.default_rng(10)
    draws = rng.normal(5.0, 0.5, (CHAINS, DRAWS))
    flat = draws.ravel()
    attr = attribute_row(
        draws,
        3.0,
        how="mean",
        wide_values=flat,
        wide=_uniform(flat.size),
        scale=0.5,
        scale_name="lme4 SE",
        tolerance=0.125,
        tolerance_text="0.25 lme4 SE",
        use_mode=False,
    )
    assert attr.attribution["remainder"] == pytest.approx(2.0, abs=0.05)
    assert not attr.explained


def test_weighted_mode_of_a_skewed_sample():
    rng = np.random.default_rng(11)
    # Gamma(3, 1): mode 2, median about 2.67.
    values = rng.gamma(3.0, 1.0, 20000)
    mode = weighted_mode(values, np.ones_like(values), 0.0, None)
    assert mode == pytest.approx(2.0, abs=0.25)


def test_conditional_modes_match_the_one_way_formula():
    # Balanced one-way layout: the BLUP is n s_u^2 / (n s_u^2 + s^2) * (group mean - grand mean).
    data = _data()
    design = build_design(ModelSpec("y ~ 1 + (1 | g)"), data)
    su, s = 0.8, 1.1
    modes = conditional_modes(design, {"g": np.array([[su**2]])}, np.full(design.n, s))
    means = data.groupby("g")["y"].mean()
    shrink = 5 * su**2 / (5 * su**2 + s**2)
    expected = shrink * (means - data["y"].mean())
    got = modes.set_index("group")["mode"]
    np.testing.assert_allclose(got.loc[expected.index], expected.to_numpy(), atol=1e-10)
    # A singular fit (SD 0) needs no inverse: every mode is 0.
    zero = conditional_modes(design, {"g": np.zeros((1, 1))}, np.full(design.n, s))
    assert np.all(zero["mode"] == 0.0)


def _freq(design, sd_estimate: float) -> FreqFit:
    variance = pd.DataFrame(
        [
            {
                "component": "g: sd((Intercept))",
                "group_factor": "g",
                "kind": "sd",
                "term": "(Intercept)",
                "term2": None,
                "estimate": sd_estimate,
                "lower": np.nan,
                "upper": np.nan,
            },
            {
                "component": "sigma",
                "group_factor": None,
                "kind": "sigma",
                "term": None,
                "term2": None,
                "estimate": 1.0,
                "lower": np.nan,
                "upper": np.nan,
            },
        ]
    )
    return FreqFit(
        spec=design.spec,
        design=design,
        engine="lme4",
        method="REML",
        fixed=pd.DataFrame(),
        variance=variance,
        ranef=pd.DataFrame(),
        ranef_sims=None,
        loglik=0.0,
        loglik_ml=0.0,
        reml_criterion=0.0,
        singular=sd_estimate == 0,
        converged=True,
        messages=[],
        versions={},
        r_call="",
        fit_seconds=0.0,
    )


def test_singular_fit_is_a_look_with_a_boundary_explanation_not_a_fail():
    rng = np.random.default_rng(12)
    n = CHAINS * DRAWS
    sd = np.abs(rng.normal(0.0, 0.4, n))
    bayes = _bayes("weak", rng.normal(10, 0.2, n), sd, np.abs(rng.normal(1.0, 0.05, n)))
    table = compare_variance(_freq(bayes.design, 0.0), bayes).set_index("component")
    row = table.loc["g: sd((Intercept))"]
    # A posterior of a positive SD piled against 0 and lme4's 0: the whole gap is the
    # boundary's (up to the posterior's 2.5% tail) and the summary's (the mass above it).
    assert row["verdict"] in ("pass", "look")
    assert row["attribution"]["boundary"] > 0
    assert row["attribution"]["remainder"] == 0.0
    assert "boundary" in row["explanation"]
    assert "ess_tail" in table.columns


# --------------------------------------------------------------------------- fixed effects


def _unbalanced() -> pd.DataFrame:
    # Unequal group sizes and a covariate whose group means differ: the GLS estimate then
    # depends on the variance components (in a balanced one-way layout it would not).
    rng = np.random.default_rng(5)
    sizes = [2, 3, 4, 6, 9, 12]
    g = np.repeat([f"g{i}" for i in range(len(sizes))], sizes)
    x = rng.normal(size=g.size) + np.repeat(np.arange(len(sizes)) * 0.5, sizes)
    u = np.repeat(rng.normal(scale=1.5, size=len(sizes)), sizes)
    y = 2.0 + 0.7 * x + u + rng.normal(size=g.size)
    return pd.DataFrame({"y": y, "x": x, "g": g})


def _gls(design, sd: float, sigma: float) -> np.ndarray:
    """Dense GLS, written out independently of MarginalLikelihood."""
    X = design.X.to_numpy(float)
    Z = design.Z().toarray()
    V = sd**2 * Z @ Z.T + sigma**2 * np.eye(design.n)
    Vi_X = np.linalg.solve(V, X)
    return np.linalg.solve(X.T @ Vi_X, Vi_X.T @ design.y)


def _fixed_fits(sd_draws: np.ndarray, sd_hat: float, chains: int = 2):
    import dataclasses

    spec = ModelSpec("y ~ 1 + x + (1 | g)", priors="flat")
    design = build_design(spec, _unbalanced())
    n = sd_draws.size
    shape = (chains, n // chains)
    idata = az.from_dict(
        posterior={
            "beta": np.zeros((*shape, 2)),
            "sd_g": sd_draws.reshape(*shape, 1),
            "sigma": np.ones(shape),
        },
        sample_stats={"diverging": np.zeros(shape, bool)},
        coords={"fixed_term": ["(Intercept)", "x"], "g__term": ["(Intercept)"]},
        dims={"beta": ["fixed_term"], "sd_g": ["g__term"]},
    )
    bayes = BayesFit(
        spec=spec,
        design=design,
        idata=idata,
        sampler="constructed",
        seed=0,
        draws=shape[1],
        tune=0,
        chains=chains,
        priors=resolve_priors(design),
        compile_seconds=0.0,
        sample_seconds=0.0,
        model_code="",
    )
    beta_hat = _gls(design, sd_hat, 1.0)
    fixed = pd.DataFrame({"term": ["(Intercept)", "x"], "estimate": beta_hat, "se": [0.5, 0.1]})
    freq = dataclasses.replace(_freq(design, sd_hat), fixed=fixed)
    return freq, bayes, beta_hat


def test_variance_component_share_is_the_mean_gls_estimate_minus_lme4s():
    from harness.checks.attribution import integrate_variance_components

    rng = np.random.default_rng(8)
    sd_draws = np.abs(rng.normal(1.5, 1.0, 100)) + 0.05
    freq, bayes, beta_hat = _fixed_fits(sd_draws, 1.2)
    weights = rng.uniform(0.5, 1.5, 100)
    weights /= weights.sum()
    wide = WidePrior("psis", 0.1, weights)
    result = integrate_variance_components(freq, bayes, wide)
    assert result is not None and result.n_draws == 100
    gls = np.array([_gls(bayes.design, s, 1.0) for s in sd_draws])
    expected = weights @ gls - beta_hat
    got = np.array([result.shares["(Intercept)"], result.shares["x"]])
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9)
    assert abs(expected[1]) > 1e-3  # the constructed case has a real share
    assert result.check < 1e-6  # GLS at lme4's components reproduces lme4's estimate


def test_variance_component_share_is_zero_at_lme4s_components():
    from harness.checks.attribution import integrate_variance_components

    freq, bayes, _ = _fixed_fits(np.full(100, 1.2), 1.2)
    result = integrate_variance_components(freq, bayes, _uniform(100))
    assert result is not None
    assert max(abs(v) for v in result.shares.values()) < 1e-9


def test_variance_component_share_needs_lme4s_estimate_to_be_its_gls():
    import dataclasses

    from harness.checks.attribution import integrate_variance_components

    freq, bayes, beta_hat = _fixed_fits(np.full(100, 1.2), 1.2)
    shifted = freq.fixed.assign(estimate=beta_hat + np.array([0.5, 0.1]))
    wrong = dataclasses.replace(freq, fixed=shifted)
    assert integrate_variance_components(wrong, bayes, _uniform(100)) is None


def test_fixed_row_counts_the_variance_component_share_in_summary():
    rng = np.random.default_rng(9)
    draws = rng.normal(1.3, 0.1, (CHAINS, DRAWS))
    n = CHAINS * DRAWS
    attr = attribute_row(
        draws,
        1.0,
        how="mean",
        wide_values=draws.ravel(),
        wide=_uniform(n),
        scale=0.1,
        scale_name="lme4 SE",
        tolerance=0.025,
        tolerance_text="0.25 lme4 SE",
        use_mode=False,
        integration=0.3,
    )
    # Without the share the 0.3 gap is 3 SE and unexplained; with it only MC noise is left.
    assert attr.attribution["summary"] == pytest.approx(0.3)
    assert attr.attribution["remainder"] == pytest.approx(float(draws.mean()) - 1.3)
    assert attr.explained
    assert "variance components" in attr.explanation


def test_boundary_remainder_is_honest_for_a_posterior_away_from_the_bound():
    # Negative control (issue 21): lme4 says SD = 0, but the posterior sits well away from 0;
    # the boundary cannot explain that, so the remainder is not 0 and the row is not explained.
    rng = np.random.default_rng(18)
    draws = np.abs(rng.normal(1.0, 0.1, (CHAINS, DRAWS)))
    flat = draws.ravel()
    attr = attribute_row(
        draws,
        0.0,
        how="median",
        wide_values=flat,
        wide=_uniform(flat.size),
        scale=float(flat.std(ddof=1)),
        scale_name="posterior SD",
        tolerance=0.5 * float(flat.std(ddof=1)),
        tolerance_text="0.5 posterior SD",
        bounds=(0.0, None),
        boundary="lower",
    )
    assert attr.attribution["remainder"] > 0.1
    assert not attr.explained
    parts = attr.attribution
    assert parts["prior"] + parts["boundary"] + parts["summary"] + parts["remainder"] == (
        pytest.approx(attr.gap)
    )


def test_sentence_prints_noise_sized_shares_as_zero():
    """A share far below the row's scale and MCSE (rounding of nearly equal numbers) reads 0."""
    import numpy as np

    from harness.checks.attribution import WidePrior, _sentence

    wide = WidePrior(method="psis", k_hat=0.1, weights=np.ones(4) / 4)
    parts = {"prior": 0.02, "summary": 1.78e-15, "boundary": None, "remainder": -3e-16}
    text = _sentence(0.5, parts, "mean", 2.0, "lme4 SE", wide, None, 0.01, 1.0, {})
    assert "e-15" not in text and "e-16" not in text
    assert "the rest is +0 " in text
    assert "+0.02" in text  # a real share keeps its value
