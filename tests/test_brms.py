"""The brms engine (issue 22): priors and data as brms sees them, the log-density identity
with the PyMC model, and the posterior against PyMC's.

The tables brms receives are built in Python and tested without R.  The tests that run
brms skip cleanly where R's brms or rstan is missing (it is optional); they keep the
compiled Stan programs in ``$HARNESS_CACHE_DIR`` (else ``.cache/harness``), so only a
first run compiles (about 2 minutes and 2.5 GB per model structure).
"""

from __future__ import annotations

import os
from pathlib import Path

import arviz as az
import numpy as np
import pytest

import harness as hz
from harness.engines import brms
from harness.model.priors import resolve_priors
from harness.model.spec import Prior, build_design

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def brms_cache() -> Path:
    """Where compiled Stan programs are kept between test runs."""
    env = os.environ.get("HARNESS_CACHE_DIR")
    return Path(env) if env else ROOT / ".cache" / "harness"


@pytest.fixture(scope="module")
def brms_ready() -> None:
    """Skip (not fail) where R's brms or rstan is missing: the engine is optional."""
    from harness.engines.lme4 import RUnavailableError

    try:
        brms._env()
    except RUnavailableError as err:
        pytest.skip(f"brms unavailable: {err}")


def _design(name: str):
    data, spec = hz.datasets.load(name)
    return build_design(spec, data)


# --------------------------------------------------------------------------- no R needed


def test_priors_are_the_resolved_priors_on_uncentred_coefficients() -> None:
    design = _design("sleepstudy")
    priors = resolve_priors(design)
    table, hp = brms.stan_priors(design, priors)
    b = table[table["class"] == "b"]
    assert list(b["coef"]) == ["xf1", "xf2"]  # X's own columns: the intercept is one of them
    assert list(b["prior"]) == ["normal(hp[1], hp[2])", "normal(hp[3], hp[4])"]
    intercept = priors.fixed["(Intercept)"].params
    assert hp[0] == intercept["mu"]
    assert hp[1] == intercept["sigma"]
    sd = table[table["class"] == "sd"]
    assert list(sd["prior"]) == ["normal(0, hp[5])", "normal(0, hp[6])"]
    assert hp[4] == priors.sd[("Subject", "(Intercept)")].params["sigma"]
    lkj = table[table["class"] == "L"]
    assert list(lkj["group"]) == ["gb1"]
    assert hp[6] == priors.lkj_eta
    sigma = table[table["class"] == "sigma"]
    assert list(sigma["prior"]) == ["exponential(hp[8])"]
    assert hp[7] == priors.sigma.params["lam"]


def test_one_residual_sd_per_level_is_a_bounded_sigma_regression() -> None:
    design = _design("partially_clustered_hetero")
    table, _ = brms.stan_priors(design, resolve_priors(design))
    sigma = table[table["dpar"] == "sigma"]
    assert len(sigma) == 1
    assert sigma["class"].iloc[0] == "b"
    assert sigma["lb"].iloc[0] == 0.0
    frame = brms.brms_frame(design)
    indicators = frame[["sa1", "sa2"]].to_numpy()
    assert np.all(indicators.sum(axis=1) == 1)
    assert np.array_equal(indicators.argmax(axis=1), design.sigma_index)


def test_the_frame_holds_the_design_under_internal_names_only() -> None:
    design = _design("sleepstudy")
    frame = brms.brms_frame(design)
    assert list(frame.columns) == ["yy", "xf1", "xf2", "zb1t1", "zb1t2", "gb1"]
    np.testing.assert_array_equal(frame[["xf1", "xf2"]].to_numpy(), design.X.to_numpy())
    np.testing.assert_array_equal(frame[["zb1t1", "zb1t2"]].to_numpy(), design.blocks[0].values)
    group = frame["gb1"]
    assert list(group.cat.categories) == [f"L{i:02d}" for i in range(1, 19)]
    np.testing.assert_array_equal(group.cat.codes.to_numpy(), design.blocks[0].group_index)


def test_a_prior_without_a_stan_counterpart_is_refused_by_name() -> None:
    data, spec = hz.datasets.load("sleepstudy")
    spec = spec.with_(priors={"Days": Prior("Laplace", {"mu": 0.0, "b": 1.0})})
    design = build_design(spec, data)
    with pytest.raises(ValueError, match=r"Laplace.*'Days'"):
        brms.stan_priors(design, resolve_priors(design))


def test_a_fixed_effect_prior_off_the_real_line_is_refused() -> None:
    data, spec = hz.datasets.load("sleepstudy")
    spec = spec.with_(priors={"Days": Prior("HalfNormal", {"sigma": 5.0})})
    design = build_design(spec, data)
    with pytest.raises(ValueError, match="real line"):
        brms.stan_priors(design, resolve_priors(design))


def test_the_lkj_constant_matches_the_closed_form() -> None:
    from harness.checks.same_model_bayes import lkj_log_constant

    # k = 2: the correlation's density is c (1 - r^2)^(eta - 1) on (-1, 1).
    r = np.linspace(-1.0, 1.0, 400_001)
    for eta in (1.0, 2.0, 3.5):
        exact = -np.log(np.trapezoid((1.0 - r**2) ** (eta - 1.0), r))
        assert lkj_log_constant(eta, 2) == pytest.approx(exact, abs=1e-6)
    # k = 3, eta = 1: the volume of 3 x 3 correlation matrices is pi^2 / 2.
    assert lkj_log_constant(1.0, 3) == pytest.approx(-np.log(np.pi**2 / 2.0), abs=1e-12)


# --------------------------------------------------------------------------- with brms


@pytest.mark.r
def test_sleepstudy_log_density_is_pymcs(brms_ready, brms_cache) -> None:
    from harness.checks.same_model_bayes import same_model_bayes

    result = same_model_bayes(_design("sleepstudy"), n_points=10, cache_dir=brms_cache)
    assert len(result.table) == 10
    assert result.ok, (result.max_abs_diff, result.reasons)
    assert result.max_abs_diff < 1e-8
    # The points differ: the identity is not one value checked ten times.
    assert result.table["logp_brms"].nunique() == 10


POISSON = {
    "formula": "incidence ~ period + offset(log(size)) + (1 | herd)",
    "family": "poisson",
    "link": None,
}


@pytest.mark.r
@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "changes"),
    [
        ("cafe", {"priors": "m14.1"}),
        ("partially_clustered_hetero", {}),
        ("cbpp", {}),
        ("cbpp", POISSON),
    ],
    ids=["cafe-m14.1", "hetero", "cbpp-binomial", "cbpp-poisson-offset"],
)
def test_log_density_is_pymcs_for_lkj_residual_sd_per_arm_binomial_and_poisson(
    brms_ready, brms_cache, name, changes
) -> None:
    """LKJ(2) with Exponential SDs, one residual SD per arm, binomial, Poisson with an
    offset: a compile each (about 2 minutes and 2.5 GB on a first run)."""
    from harness.checks.same_model_bayes import same_model_bayes

    data, spec = hz.datasets.load(name)
    spec = spec.with_(**changes)
    result = same_model_bayes(build_design(spec, data), n_points=10, cache_dir=brms_cache)
    assert result.ok, (result.max_abs_diff, result.reasons)


@pytest.mark.r
def test_a_changed_prior_is_named_by_the_identity(brms_ready, brms_cache, monkeypatch) -> None:
    """The check can fail: PyMC's prior on sigma moved, brms's kept, and sigma is named."""
    import dataclasses

    from harness.checks import same_model_bayes as smb

    design = _design("sleepstudy")
    priors = resolve_priors(design)
    stan = brms.prepare(design, priors)
    changed = dataclasses.replace(priors, sigma=Prior("Exponential", {"lam": 1.0}))
    monkeypatch.setattr(brms, "prepare", lambda design, priors=None: stan)
    result = smb.same_model_bayes(design, changed, n_points=3, cache_dir=brms_cache)
    assert not result.ok
    assert result.verdict == "fail"
    assert any(reason.startswith("sigma:") for reason in result.reasons), result.reasons


@pytest.mark.r
def test_brms_posterior_has_pymcs_names_and_coordinates(brms_ready, brms_cache) -> None:
    data, spec = hz.datasets.load("sleepstudy")
    fit = brms.fit_brms(spec, data, draws=50, tune=50, chains=2, seed=3, cache_dir=brms_cache)
    posterior = fit.idata.posterior
    block = fit.design.blocks[0]
    assert set(posterior.data_vars) == {"beta", "sigma", "sd_Subject", "corr_Subject", "u_Subject"}
    assert posterior["beta"].dims == ("chain", "draw", "fixed_term")
    assert list(posterior["fixed_term"].values) == ["(Intercept)", "Days"]
    assert posterior["u_Subject"].dims == ("chain", "draw", "Subject__level", "Subject__term")
    assert list(posterior["Subject__level"].values) == block.levels
    assert posterior["corr_Subject"].shape == (2, 50, 2, 2)
    np.testing.assert_allclose(posterior["corr_Subject"].values[..., 0, 0], 1.0)
    assert fit.sampler == "brms"
    assert fit.settings["structure_key"]
    assert "sd_1" in fit.model_code  # the Stan program is kept with the fit
    assert "diverging" in fit.idata.sample_stats
    # rstan's warnings (100 draws: too few for its ESS) are kept with the fit, not printed.
    assert any("Effective Samples Size" in m for m in fit.settings["messages"])


@pytest.mark.r
@pytest.mark.slow
def test_sleepstudy_brms_and_pymc_agree_within_mcse(
    brms_ready, brms_cache, sleepstudy_bayes
) -> None:
    data, spec = hz.datasets.load("sleepstudy")
    fit = brms.fit_brms(spec, data, draws=1000, tune=1000, chains=4, seed=1, cache_dir=brms_cache)
    gaps = {}
    for var in ("beta", "sigma", "sd_Subject"):
        a = az.summary(fit.idata, var_names=[var], round_to="none")
        b = az.summary(sleepstudy_bayes.idata, var_names=[var], round_to="none")
        for name in a.index:
            combined = np.hypot(a.loc[name, "mcse_mean"], b.loc[name, "mcse_mean"])
            gaps[name] = (a.loc[name, "mean"] - b.loc[name, "mean"]) / combined
    assert len(gaps) == 5
    assert all(abs(g) < 3.0 for g in gaps.values()), gaps


@pytest.mark.r
def test_doctor_reports_brms_and_rstan_as_optional() -> None:
    from harness.doctor import BRMS_FIX, check_r_stack, doctor_ok

    assert "install_r.sh --with-brms" in BRMS_FIX
    rows = {row["piece"]: row for row in check_r_stack()}
    for name in ("brms", "rstan"):
        row = rows[name]
        assert row["required"] is False
        assert row["ok"] == bool(row["version"])
        assert row["ok"] or row["fix"] == BRMS_FIX
    # Missing brms never fails the doctor: only the optional engine is lost.
    missing = {**rows["brms"], "ok": False, "version": ""}
    assert doctor_ok([missing])
