"""Negative binomial (NB2, log link; issue 23): the family, glmer.nb, the Laplace identity, a fit.

References: tests/reference/negbin_lme4.json, written by tests/reference/negbin_lme4.R
(glmer.nb, then glmer with theta fixed at glmer.nb's estimate, run directly in R on the
shipped CSV, with date and versions).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

import harness as hz
from harness.model.family import NegativeBinomial, get_family
from harness.model.spec import ModelSpec, build_design

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = json.loads((ROOT / "tests" / "reference" / "negbin_lme4.json").read_text())


# --------------------------------------------------------------------------- no R needed


def test_negbin_loglik_is_scipys_nbinom_and_needs_theta():
    family = get_family("negbin")
    assert isinstance(family, NegativeBinomial) and family.key == "negbin(log)"
    y = np.array([0.0, 1, 3, 12, 40])
    mu = np.array([0.3, 1.5, 2.0, 9.0, 25.0])
    with pytest.raises(ValueError, match="theta is not fixed"):
        family.loglik(y, mu, None)
    fixed = family.with_params(nb_theta=2.5)
    expected = stats.nbinom.logpmf(y, 2.5, 2.5 / (2.5 + mu))
    np.testing.assert_allclose(fixed.loglik(y, mu, None), expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(fixed.pmf(y, mu), np.exp(expected), rtol=1e-12)
    # The score and the Fisher weight are the derivatives of that log-likelihood in eta.
    eta, h = np.log(mu), 1e-6
    numeric = (fixed.loglik(y, np.exp(eta + h), None) - fixed.loglik(y, np.exp(eta - h), None)) / (
        2 * h
    )
    score, weight = fixed.score_weights(y, eta, None)
    np.testing.assert_allclose(score, numeric, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(weight, mu**2 / fixed.variance(mu, None), rtol=1e-12)
    # Newton's weight (log is not NB's canonical link) is -d score / d eta.
    up, down = fixed.score_weights(y, eta + h, None)[0], fixed.score_weights(y, eta - h, None)[0]
    np.testing.assert_allclose(
        fixed.newton_weights(y, eta, None), -(up - down) / (2 * h), rtol=1e-6
    )
    with pytest.raises(ValueError, match="no parameter"):
        family.with_params(sigma=1.0)


def test_negbin_predictive_draws_have_its_mean_and_variance():
    family = get_family("negbin").with_params(nb_theta=2.0)
    rng = np.random.default_rng(3)
    draws = family.draw(rng, np.full(200_000, 4.0))
    assert draws.mean() == pytest.approx(4.0, rel=0.02)
    assert draws.var() == pytest.approx(4.0 + 16.0 / 2.0, rel=0.03)
    # Per posterior draw: theta of shape (draws, 1) against means (draws, rows).
    per_draw = family.draw(rng, np.full((3, 5), 4.0), params={"nb_theta": np.ones((3, 1))})
    assert per_draw.shape == (3, 5)


def test_unknown_family_is_an_error_naming_negbin():
    with pytest.raises(ValueError, match=r"unknown family 'negbinomial'.*'negbin'"):
        ModelSpec("y ~ x + (1 | g)", family="negbinomial")
    with pytest.raises(ValueError, match="link 'logit' is not available for family 'negbin'"):
        get_family("negbin", "logit")


def test_grouseticks_design_reads_counts():
    data, spec = hz.datasets.load("grouseticks")
    design = build_design(spec, data)
    assert design.n == REFERENCE["nobs"] == 403
    assert design.fixed_terms == list(REFERENCE["glmer_nb"]["fixed"])
    assert [b.label for b in design.blocks] == ["BROOD"]
    assert spec.formula == REFERENCE["formula"]
    assert design.family.key == "negbin(log)" and design.trials is None
    with pytest.raises(ValueError, match="non-negative count"):
        build_design(spec, data.assign(TICKS=data["TICKS"] - 1))


def test_pymc_model_likelihood_is_the_family_loglik_at_fixed_theta():
    """The observed node of build_model's graph equals NegativeBinomial.loglik at theta."""
    import dataclasses

    from harness.checks.laplace import lambda_matrix
    from harness.checks.same_model_glmm import pymc_conditional_loglik

    data, spec = hz.datasets.load("grouseticks")
    design = dataclasses.replace(build_design(spec, data), family_params={"nb_theta": 3.3})
    rng = np.random.default_rng(1)
    theta = np.array([0.9])
    beta = np.array([0.5, 1.1, -1.0, -0.02])
    u = rng.normal(size=sum(b.n_levels for b in design.blocks))
    eta = design.X.to_numpy() @ beta + design.Z() @ (lambda_matrix(design, theta) @ u)
    family = design.family
    expected = family.loglik(design.y, np.exp(eta), None).sum()
    assert pymc_conditional_loglik(design, theta, beta, u) == pytest.approx(expected, abs=1e-8)


def test_negbin_prior_on_theta_is_in_the_prior_table():
    from harness.model.priors import resolve_priors

    data, spec = hz.datasets.load("grouseticks")
    rows = resolve_priors(build_design(spec, data)).table()
    assert {
        "parameter": "nb_theta (negative binomial shape theta)",
        "prior": "nb_phi = 1/sqrt(nb_theta) ~ HalfNormal(sigma=1)",
    } in rows
    assert not any(r["parameter"] == "sigma" for r in rows)


# --------------------------------------------------------------------------- against glmer.nb


@pytest.fixture(scope="module")
def grouse_fit():
    data, spec = hz.datasets.load("grouseticks")
    return hz.fit_lme4(spec, data, n_sims=0, profile=False)


@pytest.mark.r
def test_glmer_nb_matches_r(grouse_fit):
    freq = grouse_fit
    ref = REFERENCE["glmer_fixed_theta"]
    assert freq.ml_estimates["family_params"]["nb_theta"] == pytest.approx(
        REFERENCE["nb_theta"], rel=1e-8
    )
    assert freq.ml_estimates["glmer_nb"]["loglik"] == pytest.approx(
        REFERENCE["glmer_nb"]["loglik"], abs=1e-6
    )
    assert freq.loglik == pytest.approx(ref["loglik"], abs=1e-6)
    fixed = freq.fixed.set_index("term")
    for term, value in ref["fixed"].items():
        assert fixed.loc[term, "estimate"] == pytest.approx(value, rel=1e-6, abs=1e-9)
        assert fixed.loc[term, "se"] == pytest.approx(ref["se"][term], rel=1e-5)
    row = freq.variance.set_index("component").loc["nb_theta"]
    assert row["kind"] == "dispersion" and row["estimate"] == pytest.approx(REFERENCE["nb_theta"])
    assert "glmer.nb" in freq.r_call and "negative.binomial" in freq.r_call


@pytest.mark.r
def test_laplace_identity_reproduces_glmer_logLik_at_fixed_theta(grouse_fit):
    """The harness's Laplace computation at lme4's estimates, theta fixed: 1e-6 of glmer's."""
    from harness.checks.laplace import laplace_loglik

    freq = grouse_fit
    ml = freq.ml_estimates
    theta = np.array(list(ml["theta"].values()))
    beta = np.array([ml["beta"][t] for t in freq.design.fixed_terms])
    assert freq.design.family.fixed_params() == {"nb_theta": pytest.approx(REFERENCE["nb_theta"])}
    result = laplace_loglik(
        freq.design, theta, beta, lme4_start=ml["lp0"], lme4_tol=ml["tol_pwrss"]
    )
    assert abs(result.loglik - REFERENCE["glmer_fixed_theta"]["loglik"]) < 1e-6


@pytest.mark.r
def test_same_model_identity_holds_for_negbin(grouse_fit):
    data, spec = hz.datasets.load("grouseticks")
    result = hz.same_model(spec, data, freq=grouse_fit, check_pymc_model=True)
    assert abs(result.loglik_pymc - grouse_fit.loglik) < 1e-6, result.reasons
    assert result.ok, result.reasons


# --------------------------------------------------------------------------- through the pipeline


@pytest.mark.r
@pytest.mark.sampling
def test_shipped_negbin_fit_through_the_pipeline(grouseticks_result):
    """lme4 (glmer.nb) and PyMC on the same NB model: theta compared, same model, verdicts.

    The shipped design's small fit, shared with the browser test of its page.
    """
    result = grouseticks_result
    assert result.same_model is not None and result.same_model.ok, result.same_model.reasons
    assert abs(result.same_model.difference) < 1e-6
    variance = result.comparison.variance.set_index("component")
    row = variance.loc["nb_theta"]
    theta_hat = result.freq.ml_estimates["family_params"]["nb_theta"]
    assert row["lme4_estimate"] == pytest.approx(theta_hat)
    # The posterior of theta is PyMC's own (sampled), near glmer.nb's estimate on 403 rows.
    draws = result.bayes.idata.posterior["nb_theta"].values.ravel()
    assert draws.std() > 0 and 0.3 * theta_hat < np.median(draws) < 3 * theta_hat
    assert row["verdict"] in {"pass", "look", "fail", "unreliable"}
    assert result.comparison.verdict in {"pass", "look", "fail", "unreliable"}


def test_compare_command_takes_negbin_and_refuses_its_bad_input_before_fitting(tmp_path, capsys):
    from harness.cli import build_parser, main

    args = build_parser().parse_args(
        ["compare", "x.csv", "--formula", "y ~ (1 | g)", "--family", "negbin"]
    )
    assert args.family == "negbin"
    data, spec = hz.datasets.load("grouseticks")
    csv = tmp_path / "ticks.csv"
    data.assign(TICKS=data["TICKS"] + 0.5).to_csv(csv, index=False)
    out = tmp_path / "report.html"
    argv = ["compare", str(csv), "--formula", spec.formula, "--family", "negbin", "--out", str(out)]
    assert main(argv) == 1
    assert "must hold whole numbers" in capsys.readouterr().err
    assert not out.exists()
    assert main([*argv[:-2], "--family", "negbin", "--link", "logit"]) == 1
    assert "link 'logit' is not available for family 'negbin'" in capsys.readouterr().err


@pytest.mark.r
def test_negbin_with_an_exposure_offset_keeps_the_identity():
    rng = np.random.default_rng(2)
    g = np.repeat(np.arange(15), 8)
    x, exposure = rng.normal(size=g.size), rng.uniform(0.5, 3, g.size)
    mu = exposure * np.exp(0.5 + 0.4 * x + rng.normal(0, 0.6, 15)[g])
    data = pd.DataFrame(
        {
            "y": rng.negative_binomial(1.5, 1.5 / (1.5 + mu)),
            "x": x,
            "expo": exposure,
            "g": [f"h{i}" for i in g],
        }
    )
    spec = ModelSpec("y ~ x + offset(log(expo)) + (1 | g)", family="negbin")
    freq = hz.fit_lme4(spec, data, n_sims=0, profile=False)
    result = hz.same_model(spec, data, freq=freq)
    assert result.ok and abs(result.difference) < 1e-6, result.reasons
