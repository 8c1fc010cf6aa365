"""The R bridge: lme4 and nlme fits as tidy tables, reproducing published numbers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import harness as hz
from harness.engines.lme4 import lformula

REFERENCE = Path(__file__).resolve().parent / "reference"

pytestmark = pytest.mark.r


def _given_digits(value: float) -> int:
    return len(repr(abs(value)).replace(".", "").lstrip("0"))


def _agrees(ours: float, published: float, digits: int = 3) -> bool:
    """Equal to 3 significant digits, or to all the digits the reference gives if fewer."""
    digits = min(digits, _given_digits(published))
    half_unit = 0.5 * 10 ** (np.floor(np.log10(abs(published))) - (digits - 1))
    return abs(ours - published) <= half_unit


@pytest.mark.parametrize("reference", ["sleepstudy_published.json", "sleepstudy_lme4.json"])
def test_sleepstudy_reml_matches_reference(sleepstudy_freq, reference):
    ref = json.loads((REFERENCE / reference).read_text())
    fit = sleepstudy_freq
    fixed = fit.fixed.set_index("term")
    variance = fit.variance.set_index("component")
    pairs = {
        "REML criterion": (fit.reml_criterion, ref["reml_criterion"]),
        "(Intercept)": (fixed.loc["(Intercept)", "estimate"], ref["fixed"]["(Intercept)"]),
        "Days": (fixed.loc["Days", "estimate"], ref["fixed"]["Days"]),
        "SE (Intercept)": (fixed.loc["(Intercept)", "se"], ref["se"]["(Intercept)"]),
        "SE Days": (fixed.loc["Days", "se"], ref["se"]["Days"]),
        "sd intercept": (variance.loc["Subject: sd((Intercept))", "estimate"], ref["sd_intercept"]),
        "sd Days": (variance.loc["Subject: sd(Days)", "estimate"], ref["sd_days"]),
        "cor": (variance.loc["Subject: cor((Intercept),Days)", "estimate"], ref["cor"]),
        "sigma": (variance.loc["sigma", "estimate"], ref["sigma"]),
        "ML logLik": (fit.loglik_ml, ref["loglik_ml"]),
    }
    for name, (ours, published) in pairs.items():
        assert _agrees(ours, published), f"{name}: {ours} vs {published}"
    assert fit.engine == "lme4" and fit.method == "REML"
    assert fit.df_method.startswith("Satterthwaite")
    assert fixed.loc["Days", "df"] == pytest.approx(17.0, abs=0.1)


def test_sleepstudy_tables_are_tidy_and_complete(sleepstudy_freq):
    fit = sleepstudy_freq
    assert list(fit.fixed.columns[:8]) == [
        "term",
        "estimate",
        "se",
        "df",
        "statistic",
        "p_value",
        "lower",
        "upper",
    ]
    assert set(fit.ranef["group"]) == {str(s) for s in fit.design.factor_levels["Subject"]}
    assert len(fit.ranef) == 18 * 2
    assert (fit.ranef["condsd"] > 0).all()
    # Profile intervals were asked for and bracket the estimates.
    v = fit.variance
    assert (v["ci_method"] == "profile").all()
    assert ((v["lower"] <= v["estimate"]) & (v["estimate"] <= v["upper"])).all()
    # merTools::REsim simulations agree with the conditional modes.
    sims = fit.ranef_sims.merge(fit.ranef, on=["group_factor", "group", "term"])
    assert np.corrcoef(sims["sim_mean"], sims["mode"])[0, 1] > 0.99
    # Whatever R said is kept as plain text (its wording depends on R's numerical libraries).
    assert all(isinstance(m, str) for m in fit.messages)


def test_lformula_matches_design(sleepstudy):
    data, spec = sleepstudy
    design = hz.build_design(spec, data)
    lf = lformula(spec, data)
    assert list(lf["X_names"]) == design.fixed_terms
    np.testing.assert_allclose(np.asarray(lf["X"]), design.X.to_numpy())
    np.testing.assert_allclose(np.asarray(lf["Z"]), design.Z().toarray())


def test_nlme_stands_in_for_sigma_by():
    data, spec = hz.datasets.load("partially_clustered_hetero")
    fit = hz.fit_lme4(spec, data)
    assert fit.engine == "nlme"
    assert "nlme::lme" in fit.stand_in and "varIdent" in fit.r_call
    sigma = fit.variance[fit.variance["kind"] == "sigma"].set_index("term")
    assert list(sigma.index) == ["control", "treatment"]
    # Simulated with residual SDs 1 and 2.
    assert sigma.loc["control", "estimate"] == pytest.approx(1.0, rel=0.2)
    assert sigma.loc["treatment", "estimate"] == pytest.approx(2.0, rel=0.2)
    assert (sigma["lower"] < sigma["estimate"]).all() and (sigma["estimate"] < sigma["upper"]).all()
    assert len(fit.ranef) == data["group"].nunique()


def test_singular_fit_is_reported():
    """nlme standing in: the harness's flag and its own note, whatever nlme/BLAS print."""
    data, spec = hz.datasets.load("partially_clustered_hetero", seed=1)
    fit = hz.fit_lme4(spec, data)
    assert fit.engine == "nlme" and fit.singular
    sd = fit.variance.set_index("component").loc["group: sd(tx)", "estimate"]
    sigma = fit.variance.loc[fit.variance["kind"] == "sigma", "estimate"].min()
    assert sd < 1e-3 * sigma  # what the flag means
    # The harness's note, which compare() carries into the comparison's notes and the report.
    assert any(m.startswith("singular fit:") for m in fit.messages)


def test_cafe_rethinking_draws_are_rs():
    book = hz.datasets.simulate_cafe(method="rethinking")
    again = hz.datasets.simulate_cafe(method="rethinking")
    pd.testing.assert_frame_equal(book, again)
    assert book.shape == (200, 3)
    # Statistical Rethinking's cafe data (R: set.seed(5); mvrnorm; set.seed(22); rnorm).
    assert book["wait"].iloc[0] == pytest.approx(3.96788, abs=1e-4)
