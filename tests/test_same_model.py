"""Same model, exactly: the PyMC model's marginal likelihood is lme4's likelihood.

The first group of tests needs no R: the marginal likelihood is checked against
a dense multivariate normal, against lme4 numbers recorded at full precision
(tests/reference/same_model_lme4.R), and against the PyMC model's own density.
The second group runs lme4/nlme live through :func:`harness.checks.same_model.same_model`.
"""

from __future__ import annotations

import dataclasses
import json
from collections import OrderedDict

import numpy as np
import pandas as pd
import pytest
import scipy.stats as st

import harness as hz
from harness.checks import marginal as marginal_module
from harness.checks.marginal import MarginalLikelihood, psd_cholesky, pymc_model_loglik
from harness.checks.same_model import (
    ParameterValues,
    _blocks_from_theta,
    compare_estimates,
    harness_values,
    lme4_block_order,
    parameter_names,
    same_model,
)
from harness.model.spec import ModelSpec, RandomBlock, build_design
from tests.conftest import REFERENCE

REFERENCE_MODELS = json.loads((REFERENCE / "same_model_lme4.json").read_text())["models"]


# --------------------------------------------------------------------------- helpers


def _dense_loglik_and_reml(design, beta, factors, sigma):
    """The textbook O(n^3) formulas, with V built densely from the design's Z."""
    Z = design.Z().toarray()
    blocks = design.lme4_block_order()
    by_label = {b.label: F for b, F in zip(design.blocks, factors, strict=True)}
    lam = np.zeros((Z.shape[1], Z.shape[1]))
    start = 0
    for block in blocks:
        for _ in range(block.n_levels):
            k = block.n_terms
            lam[start : start + k, start : start + k] = by_label[block.label]
            start += k
    sigma = np.atleast_1d(sigma)
    resid_sd = (
        sigma[design.sigma_index] if design.sigma_index is not None else np.full(design.n, sigma[0])
    )
    V = Z @ lam @ lam.T @ Z.T + np.diag(resid_sd**2)
    X = design.X.to_numpy(float)
    loglik = st.multivariate_normal(X @ beta, V).logpdf(design.y)
    Vinv = np.linalg.inv(V)
    xvx = X.T @ Vinv @ X
    beta_gls = np.linalg.solve(xvx, X.T @ Vinv @ design.y)
    r = design.y - X @ beta_gls
    n, p = X.shape
    reml = (
        (n - p) * np.log(2 * np.pi)
        + np.linalg.slogdet(V)[1]
        + np.linalg.slogdet(xvx)[1]
        + r @ Vinv @ r
    )
    return loglik, reml


def _reference_design(name):
    data, spec = hz.datasets.load("sleepstudy")
    return build_design(spec.with_(formula=REFERENCE_MODELS[name]["formula"]), data)


def _reference_point(design, estimates):
    blocks = _blocks_from_theta(design, estimates["theta"], estimates["sigma"])
    beta = np.array([estimates["beta"][t] for t in design.fixed_terms])
    return beta, [b.F for b in blocks], estimates["sigma"]


# --------------------------------------------------------------------------- no R


@pytest.mark.parametrize("name", ["sleepstudy", "partially_clustered_hetero"])
def test_marginal_equals_dense_multivariate_normal(name):
    data, spec = hz.datasets.load(name)
    design = build_design(spec, data)
    marginal = MarginalLikelihood(design)
    rng = np.random.default_rng(7)
    ols = np.linalg.lstsq(design.X.to_numpy(float), design.y, rcond=None)[0]
    beta = ols + rng.normal(0, 1, design.X.shape[1])
    factors = [
        np.tril(rng.uniform(0.2, 2.0, (b.n_terms, b.n_terms))) * np.std(design.y) / 4
        for b in design.blocks
    ]
    sigma = rng.uniform(0.5, 1.5, marginal.n_sigma) * np.std(design.y) / 2
    values = marginal.evaluate(beta, factors, sigma)
    loglik, reml = _dense_loglik_and_reml(design, beta, factors, sigma)
    assert values["loglik"] == pytest.approx(loglik, abs=1e-8)
    assert values["reml_criterion"] == pytest.approx(reml, abs=1e-8)


def test_dense_form_equals_grouped_form(monkeypatch):
    """The q x q form used for crossed and nested factors agrees with the per-group form."""
    data, spec = hz.datasets.load("sleepstudy")
    design = build_design(spec, data)
    beta, factors, sigma = _reference_point(design, REFERENCE_MODELS["correlated"]["ml"])
    grouped = MarginalLikelihood(design)
    monkeypatch.setattr(marginal_module, "MAX_UNROLLED_TERMS", 0)
    dense = MarginalLikelihood(design)
    assert (grouped.stats.mode, dense.stats.mode) == ("grouped", "dense")
    a, b = grouped.evaluate(beta, factors, sigma), dense.evaluate(beta, factors, sigma)
    assert a["loglik"] == pytest.approx(b["loglik"], abs=1e-9)
    assert a["reml_criterion"] == pytest.approx(b["reml_criterion"], abs=1e-9)


@pytest.mark.parametrize("name", ["sleepstudy", "partially_clustered_hetero", "cafe"])
def test_gls_beta_of_many_draws_equals_one_evaluation_each(name):
    """The stacked NumPy GLS (attribution's integral over draws) is evaluate()'s beta_gls."""
    data, spec = hz.datasets.load(name)
    design = build_design(spec, data)
    marginal = MarginalLikelihood(design)
    rng = np.random.default_rng(3)
    scale = np.std(design.y) / 4
    factors = [
        np.tril(rng.uniform(0.0, 2.0, (9, b.n_terms, b.n_terms))) * scale for b in design.blocks
    ]
    factors[0][0] = 0.0  # a singular draw: every SD of the first block at zero
    sigma = rng.uniform(0.5, 1.5, (9, marginal.n_sigma)) * scale
    many = marginal.gls_beta_many(factors, sigma)
    one_by_one = [
        marginal.evaluate(np.zeros(marginal.p), [F[d] for F in factors], sigma[d])["beta_gls"]
        for d in range(9)
    ]
    assert marginal.method == "grouped"
    np.testing.assert_allclose(many, np.stack(one_by_one), rtol=1e-10, atol=1e-10 * scale)


@pytest.mark.parametrize("name", sorted(REFERENCE_MODELS))
def test_likelihood_identity_against_recorded_lme4(name):
    """logLik(refitML(m)) and REMLcrit(m), recorded from R, at lme4's own estimates."""
    ref = REFERENCE_MODELS[name]
    design = _reference_design(name)
    marginal = MarginalLikelihood(design)
    beta, factors, sigma = _reference_point(design, ref["ml"])
    assert abs(marginal.loglik(beta, factors, sigma) - ref["loglik_ml"]) < 1e-6
    _, reml_factors, reml_sigma = _reference_point(design, ref["reml"])
    assert abs(marginal.reml_criterion(reml_factors, reml_sigma) - ref["reml_criterion"]) < 1e-6


@pytest.mark.parametrize("name", ["correlated", "uncorrelated"])
def test_maximiser_reproduces_recorded_lme4_estimates(name):
    ref = REFERENCE_MODELS[name]
    design = _reference_design(name)
    marginal = MarginalLikelihood(design)
    beta, _, sigma = _reference_point(design, ref["ml"])
    lme4 = ParameterValues(
        dict(zip(design.fixed_terms, beta, strict=True)),
        _blocks_from_theta(design, ref["ml"]["theta"], sigma),
        {"": sigma},
    )
    optimum = marginal.maximise()
    assert optimum.converged
    assert abs(optimum.loglik - ref["loglik_ml"]) < 1e-6
    names = parameter_names(design)
    table = compare_estimates(lme4, harness_values(design, optimum), names, names)
    assert table["ok"].all(), table.to_string()
    assert set(table["kind"]) >= {"fixed", "sd", "sigma"}


def test_pymc_model_density_recovers_the_marginal():
    design = _reference_design("correlated")
    beta, factors, sigma = _reference_point(design, REFERENCE_MODELS["correlated"]["ml"])
    tie = pymc_model_loglik(design, beta, factors, sigma)
    assert abs(tie["at_mode"] - REFERENCE_MODELS["correlated"]["loglik_ml"]) < 1e-6
    assert tie["max_probe_gap"] < 1e-6


def test_pymc_model_density_catches_a_wrong_model(monkeypatch):
    """Negative control: a PyMC model with two subjects' rows swapped is caught."""
    import harness.engines.pymc as pymc_engine

    design = _reference_design("correlated")
    beta, factors, sigma = _reference_point(design, REFERENCE_MODELS["correlated"]["ml"])
    build = pymc_engine.build_model

    def wrong_model(d, priors=None):
        # Rows 0-9 (subject 308) and 10-19 (subject 309) swap their subject index.
        block = d.blocks[0]
        index = block.group_index.copy()
        index[:10], index[10:20] = block.group_index[10:20], block.group_index[:10]
        swapped = dataclasses.replace(block, group_index=index)
        return build(dataclasses.replace(d, blocks=[swapped]), priors)

    monkeypatch.setattr(pymc_engine, "build_model", wrong_model)
    monkeypatch.setattr(marginal_module, "_PYMC_LOGP", OrderedDict())
    tie = pymc_model_loglik(design, beta, factors, sigma)
    assert abs(tie["at_mode"] - REFERENCE_MODELS["correlated"]["loglik_ml"]) > 1e-3


def test_psd_cholesky_handles_singular_covariances():
    cov = np.array([[4.0, 2.0], [2.0, 1.0]])  # correlation +1
    L = psd_cholesky(cov)
    assert np.allclose(L @ L.T, cov) and np.allclose(L, np.tril(L))
    zero_sd = np.array([[0.0, 0.0], [0.0, 2.0]])
    L = psd_cholesky(zero_sd)
    assert np.allclose(L @ L.T, zero_sd)
    with pytest.raises(ValueError, match="positive semi-definite"):
        psd_cholesky(np.array([[1.0, 2.0], [2.0, 1.0]]))
    with pytest.raises(ValueError, match="positive semi-definite"):
        psd_cholesky(np.array([[0.0, 1.0], [1.0, 1.0]]))  # zero pivot, non-zero column


def test_lme4_block_order_reverses_ties_when_it_reorders():
    def block(label, n):
        return RandomBlock(
            label,
            ["(Intercept)"],
            [str(i) for i in range(n)],
            np.zeros(1, int),
            np.ones((1, 1)),
            True,
            label,
        )

    a, b, c = block("a", 5), block("b", 10), block("c", 10)
    # lme4's mkReTrms: rev(order(nl)) when any later term has more levels.
    assert [x.label for x in lme4_block_order([a, b, c])] == ["c", "b", "a"]
    # No reordering at all when levels never increase.
    assert [x.label for x in lme4_block_order([b, c, a])] == ["b", "c", "a"]


def test_parameter_names_follow_lme4():
    data, spec = hz.datasets.load("sleepstudy")
    correlated = parameter_names(build_design(spec, data))
    split = parameter_names(
        build_design(spec.with_(formula="Reaction ~ Days + (Days || Subject)"), data)
    )
    assert correlated == [
        "(Intercept)",
        "Days",
        "Subject: sd((Intercept))",
        "Subject: sd(Days)",
        "Subject: cor((Intercept),Days)",
        "sigma",
    ]
    assert split == [
        "(Intercept)",
        "Days",
        "Subject: sd((Intercept))",
        "Subject: sd(Days)",
        "sigma",
    ]


# --------------------------------------------------------------------------- with R


@pytest.fixture(scope="module")
def shipped_fits():
    fits = {}
    for name in ["cafe", "partially_clustered", "partially_clustered_hetero"]:
        data, spec = hz.datasets.load(name)
        fits[name] = (data, spec, hz.fit_lme4(spec, data, n_sims=0))
    return fits


@pytest.mark.r
@pytest.mark.parametrize(
    "name", ["sleepstudy", "cafe", "partially_clustered", "partially_clustered_hetero"]
)
def test_same_model_for_shipped_designs(name, shipped_fits, sleepstudy_freq):
    if name == "sleepstudy":
        data, spec = hz.datasets.load("sleepstudy")
        freq = sleepstudy_freq
    else:
        data, spec, freq = shipped_fits[name]
    result = same_model(spec, data, freq=freq)
    assert result.engine == ("nlme" if spec.sigma_by else "lme4")
    assert result.ok, result.reasons
    assert result.reasons == []
    assert abs(result.difference) < 1e-6
    assert abs(result.reml_difference) < 1e-6
    assert abs(result.loglik_pymc_model - result.loglik_lme4) < 1e-6
    table = result.estimates
    assert table["ok"].all(), table.to_string()
    fixed, variance = table[table["kind"] == "fixed"], table[table["kind"] != "fixed"]
    assert (fixed["rel_diff"] < 1e-4).all()
    assert (variance["rel_diff"] < 1e-3).all()
    payload = json.loads(json.dumps(result.to_dict()))
    assert payload["ok"] is True and len(payload["estimates"]) == len(table)


@pytest.mark.r
def test_pymc_simpler_than_lme4_fails_with_named_reasons(sleepstudy_freq):
    data, spec = hz.datasets.load("sleepstudy")
    result = same_model(
        spec,
        data,
        freq=sleepstudy_freq,
        pymc_spec=spec.with_(formula="Reaction ~ Days + (1 | Subject)"),
    )
    assert not result.ok
    text = "\n".join(result.reasons)
    assert "lme4 has Subject: sd(Days); the PyMC model has no such parameter" in text
    assert "lme4 has Subject: cor((Intercept),Days); the PyMC model has no such parameter" in text
    assert "log-likelihood at lme4's ML estimates" in text
    assert abs(result.difference) > 1.0


@pytest.mark.r
def test_uncorrelated_pymc_against_correlated_lme4_fails(sleepstudy_freq):
    data, spec = hz.datasets.load("sleepstudy")
    result = same_model(
        spec,
        data,
        freq=sleepstudy_freq,
        pymc_spec=spec.with_(formula="Reaction ~ Days + (Days || Subject)"),
    )
    assert not result.ok
    assert (
        "lme4 has Subject: cor((Intercept),Days); the PyMC model has no such parameter"
        in result.reasons
    )
    assert any(r.startswith("ML estimate of Subject: sd((Intercept))") for r in result.reasons)


@pytest.mark.r
def test_pymc_richer_than_lme4_fails_with_named_reasons():
    data, spec = hz.datasets.load("sleepstudy")
    lme4_spec = spec.with_(formula="Reaction ~ Days + (Days || Subject)")
    result = same_model(lme4_spec, data, pymc_spec=spec)
    assert not result.ok
    assert (
        "the PyMC model has Subject: cor((Intercept),Days); lme4 has no such parameter"
        in result.reasons
    )
    # lme4's model is the correlated one at cor = 0: the likelihoods agree there, and only
    # the parameter list and the optimum tell the two apart.
    assert abs(result.difference) < 1e-6
    assert any(r.startswith("maximised log-likelihood") for r in result.reasons)
    extra = result.estimates.set_index("parameter").loc["Subject: cor((Intercept),Days)"]
    assert extra["tolerance"] == "only in the PyMC model" and not extra["ok"]


@pytest.mark.r
@pytest.mark.parametrize("direction", ["pymc_homoscedastic", "pymc_heteroscedastic"])
def test_residual_structure_mismatch_fails(direction, shipped_fits):
    if direction == "pymc_homoscedastic":
        data, spec, freq = shipped_fits["partially_clustered_hetero"]
        other, engine = spec.with_(sigma_by=None), "nlme"
    else:
        data, spec, freq = shipped_fits["partially_clustered"]
        other, engine = spec.with_(sigma_by="arm"), "lme4"
    result = same_model(spec, data, freq=freq, pymc_spec=other)
    assert not result.ok
    assert result.reasons[0].startswith(f"residual SD: {engine} has ")


@pytest.mark.r
def test_crossed_factors_in_lme4s_reordered_block_order():
    """Three factors whose lme4 order (c, b, a) is neither formula nor stable-sorted order."""
    rng = np.random.default_rng(3)
    n = 240
    a, b, c = rng.integers(0, 5, n), rng.integers(0, 10, n), rng.integers(0, 10, n)
    x = rng.normal(size=n)
    y = (
        1
        + 0.5 * x
        + rng.normal(0, 1, 5)[a]
        + rng.normal(0, 0.7, 10)[b]
        + rng.normal(0, 0.4, 10)[c]
        + rng.normal(0, 1, n)
    )
    data = pd.DataFrame(
        {
            "y": y,
            "x": x,
            "a": [f"a{i}" for i in a],
            "b": [f"b{i}" for i in b],
            "c": [f"c{i}" for i in c],
        }
    )
    spec = ModelSpec("y ~ x + (1 | a) + (1 | b) + (1 | c)")
    result = same_model(spec, data, check_pymc_model=False)
    assert result.ok, result.reasons
    assert abs(result.difference) < 1e-6


@pytest.mark.r
def test_freq_of_another_formula_is_refused(sleepstudy_freq):
    data, spec = hz.datasets.load("sleepstudy")
    with pytest.raises(ValueError, match="freq was fitted to"):
        same_model(
            spec.with_(formula="Reaction ~ Days + (1 | Subject)"), data, freq=sleepstudy_freq
        )
