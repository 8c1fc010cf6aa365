"""The core claims of the harness on real fits of the shipped designs.

Each test fits both engines; the sleepstudy one runs by default, the rest are
marked slow (``pytest -m slow`` or ``nox -s tests_slow``).
"""

from __future__ import annotations

import numpy as np
import pytest

import harness as hz

pytestmark = [pytest.mark.r, pytest.mark.sampling]


def _assert_equivalent(cmp) -> None:
    assert (cmp.agreement["correlation"] >= 0.98).all(), cmp.agreement
    assert (cmp.fixed["diff_in_se"].abs() < 0.25).all(), cmp.fixed
    assert cmp.sampler_stats["divergences"] == 0


def test_sleepstudy_lme4_and_pymc_agree(sleepstudy_freq, sleepstudy_bayes):
    cmp = hz.compare(sleepstudy_freq, sleepstudy_bayes)
    _assert_equivalent(cmp)
    assert list(cmp.fixed.columns[:13]) == [
        "term",
        "lme4_estimate",
        "lme4_se",
        "lme4_lower",
        "lme4_upper",
        "pymc_mean",
        "pymc_sd",
        "pymc_lower",
        "pymc_upper",
        "mcse",
        "diff",
        "diff_in_se",
        "diff_in_mcse",
    ]
    assert set(cmp.variance["component"]) == {
        "Subject: sd((Intercept))",
        "Subject: sd(Days)",
        "Subject: cor((Intercept),Days)",
        "sigma",
    }
    # Group labels and term names are lme4's, on both sides.
    assert set(cmp.offsets["group"]) == set(sleepstudy_freq.ranef["group"])
    assert cmp.sampler_stats["max_r_hat"] < 1.01


@pytest.mark.slow
def test_cafe_lme4_and_pymc_agree():
    data, spec = hz.datasets.load("cafe")
    cmp = hz.compare(hz.fit_lme4(spec, data), hz.fit_pymc(spec, data, seed=1))
    _assert_equivalent(cmp)


@pytest.mark.slow
def test_offsets_and_baked_in_give_the_same_offsets():
    data, spec = hz.datasets.load("cafe")
    freq = hz.fit_lme4(spec, data)
    offsets = hz.compare(freq, hz.fit_pymc(spec, data, seed=1)).offsets
    baked = hz.compare(freq, hz.fit_pymc(spec.with_(parameterization="baked_in"), data, seed=2))
    for term in ("(Intercept)", "afternoon"):
        a = offsets[offsets["term"] == term]["pymc_mean"].to_numpy()
        b = baked.offsets[baked.offsets["term"] == term]["pymc_mean"].to_numpy()
        assert np.corrcoef(a, b)[0, 1] > 0.99


@pytest.mark.slow
def test_partially_clustered_residual_sd_per_arm():
    data, spec = hz.datasets.load("partially_clustered_hetero")
    cmp = hz.compare(hz.fit_lme4(spec, data), hz.fit_pymc(spec, data, seed=1))
    sigma = cmp.variance[cmp.variance["kind"] == "sigma"].set_index("component")
    assert list(sigma.index) == ["sigma: arm=control", "sigma: arm=treatment"]
    for _, row in sigma.iterrows():
        assert row["pymc_lower"] <= row["lme4_estimate"] <= row["pymc_upper"]
        assert row["lme4_lower"] <= row["pymc_mean"] <= row["lme4_upper"]
    assert "nlme" in cmp.notes[0]
