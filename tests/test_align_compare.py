"""Alignment and comparison on constructed draws whose answers are known exactly."""

from __future__ import annotations

import arviz as az
import numpy as np
import pandas as pd
import pytest

from harness.checks.align import AlignmentError, check_alignment, posterior_offsets
from harness.checks.compare import compare, interval_overlap, offset_agreement
from harness.fits import BayesFit, FreqFit
from harness.model.priors import resolve_priors
from harness.model.spec import ModelSpec, build_design

CHAINS, DRAWS = 4, 500
LEVELS = ["a", "b", "c", "d", "e"]
TERMS = ["(Intercept)", "x"]


def _data() -> pd.DataFrame:
    rng = np.random.default_rng(7)
    g = np.repeat(LEVELS, 6)
    x = np.tile(np.arange(6.0), len(LEVELS))
    return pd.DataFrame({"y": rng.normal(size=g.size) + x, "x": x, "g": g})


def _offsets_truth() -> np.ndarray:
    return np.array([[-2.0, 0.5], [-1.0, -0.5], [0.0, 0.0], [1.0, 0.25], [2.0, -0.25]])


def _draws(rng: np.random.Generator, centre: np.ndarray, sd: float) -> np.ndarray:
    """Draws whose sample mean and SD are exactly ``centre`` and ``sd`` per element."""
    raw = rng.normal(size=(CHAINS, DRAWS, *np.shape(centre)))
    flat = raw.reshape(CHAINS * DRAWS, -1)
    flat = (flat - flat.mean(0)) / flat.std(0, ddof=1)
    return (centre + sd * flat.reshape(raw.shape)).astype(float)


def _bayes(parameterization: str, beta=(10.0, 2.0), offsets_sd=0.3) -> tuple[BayesFit, np.ndarray]:
    spec = ModelSpec("y ~ 1 + x + (1 + x | g)", parameterization=parameterization)
    design = build_design(spec, _data())
    rng = np.random.default_rng(11)
    u = _draws(rng, _offsets_truth(), offsets_sd)
    b = _draws(rng, np.asarray(beta), 0.1)
    rho = _draws(rng, np.asarray(0.0), 0.1)
    corr = np.broadcast_to(np.eye(2), (CHAINS, DRAWS, 2, 2)).copy()
    corr[..., 0, 1] = corr[..., 1, 0] = rho
    posterior = {
        "beta": b,
        "sigma": _draws(rng, np.asarray(1.0), 0.05),
        "sd_g": _draws(rng, np.array([1.5, 0.4]), 0.1),
        "corr_g": corr,
    }
    if parameterization == "offsets":
        posterior["u_g"] = u
    else:
        posterior["coef_g"] = u + b[:, :, None, :]  # group coefficient = fixed + offset, per draw
    dims = {
        "beta": ["fixed_term"],
        "sd_g": ["g__term"],
        "corr_g": ["g__term", "g__term_b"],
        "u_g": ["g__level", "g__term"],
        "coef_g": ["g__level", "g__term"],
    }
    coords = {"fixed_term": TERMS, "g__term": TERMS, "g__term_b": TERMS, "g__level": LEVELS}
    idata = az.from_dict(
        posterior=posterior,
        sample_stats={"diverging": np.zeros((CHAINS, DRAWS), bool)},
        coords=coords,
        dims={k: v for k, v in dims.items() if k in posterior},
    )
    fit = BayesFit(
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
    return fit, u


def _freq(design, modes=None, condsd=0.25) -> FreqFit:
    modes = _offsets_truth() if modes is None else modes
    ranef = pd.DataFrame(
        [
            {"group_factor": "g", "group": lvl, "term": t, "mode": modes[i, j], "condsd": condsd}
            for j, t in enumerate(TERMS)
            for i, lvl in enumerate(LEVELS)
        ]
    )
    fixed = pd.DataFrame(
        {
            "term": TERMS,
            "estimate": [10.05, 2.0],
            "se": [0.2, 0.1],
            "df": [4.0, 4.0],
            "statistic": [50.0, 20.0],
            "p_value": [0.0, 0.0],
            "lower": [9.6, 1.8],
            "upper": [10.5, 2.2],
            "ci_method": "Wald",
        }
    )
    variance = pd.DataFrame(
        [
            {
                "component": "g: sd((Intercept))",
                "group_factor": "g",
                "kind": "sd",
                "term": "(Intercept)",
                "term2": None,
                "estimate": 1.5,
                "lower": 1.0,
                "upper": 2.0,
            },
            {
                "component": "g: cor((Intercept),x)",
                "group_factor": "g",
                "kind": "cor",
                "term": "(Intercept)",
                "term2": "x",
                "estimate": 0.0,
                "lower": -0.5,
                "upper": 0.5,
            },
            {
                "component": "g: sd(x)",
                "group_factor": "g",
                "kind": "sd",
                "term": "x",
                "term2": None,
                "estimate": 5.0,
                "lower": 4.0,
                "upper": 6.0,
            },
            {
                "component": "sigma",
                "group_factor": None,
                "kind": "sigma",
                "term": None,
                "term2": None,
                "estimate": 1.0,
                "lower": 0.9,
                "upper": 1.1,
            },
        ]
    )
    return FreqFit(
        spec=design.spec,
        design=design,
        engine="lme4",
        method="REML",
        fixed=fixed,
        variance=variance,
        ranef=ranef,
        ranef_sims=None,
        loglik=0.0,
        loglik_ml=0.0,
        reml_criterion=0.0,
        singular=False,
        converged=True,
        messages=[],
        versions={},
        r_call="",
        fit_seconds=0.0,
    )


@pytest.mark.parametrize("parameterization", ["offsets", "baked_in"])
def test_aligned_offsets_are_exact(parameterization):
    bayes, truth = _bayes(parameterization)
    aligned = posterior_offsets(bayes)["g"]
    assert aligned.dims == ("chain", "draw", "group", "term")
    assert list(aligned["group"].values) == LEVELS
    np.testing.assert_allclose(aligned.values, truth, atol=1e-12)


def test_compare_tables_have_known_values():
    bayes, _ = _bayes("baked_in")
    freq = _freq(bayes.design)
    cmp = compare(freq, bayes)
    fixed = cmp.fixed.set_index("term")
    # Posterior means are exactly 10 and 2; lme4 says 10.05 (SE 0.2) and 2.0.
    assert fixed.loc["(Intercept)", "pymc_mean"] == pytest.approx(10.0)
    assert fixed.loc["(Intercept)", "diff_in_se"] == pytest.approx(-0.25)
    assert fixed.loc["(Intercept)", "verdict"] == "look"
    assert fixed.loc["x", "diff_in_se"] == pytest.approx(0.0, abs=1e-12)
    assert fixed.loc["x", "verdict"] == "pass"
    assert fixed.loc["x", "pymc_sd"] == pytest.approx(0.1)
    offsets = cmp.offsets.set_index(["group", "term"])
    assert offsets.loc[("b", "x"), "pymc_mean"] == pytest.approx(-0.5)
    assert offsets.loc[("b", "x"), "pymc_sd"] == pytest.approx(0.3)
    assert offsets.loc[("b", "x"), "sd_ratio"] == pytest.approx(0.3 / 0.25)
    agreement = cmp.agreement.set_index("term")
    assert agreement.loc["x", "correlation"] == pytest.approx(1.0)
    assert agreement.loc["x", "rmse"] == pytest.approx(0.0, abs=1e-12)
    assert agreement.loc["x", "slope"] == pytest.approx(1.0)
    variance = cmp.variance.set_index("component")
    assert variance.loc["g: sd((Intercept))", "verdict"] == "pass"
    # lme4 says sd(x) = 5 (CI 4-6); the posterior sits at 0.4: both checks fail.
    assert variance.loc["g: sd(x)", "verdict"] == "fail"
    assert cmp.verdict == "fail"
    assert set(cmp.uncertainty["table"]) >= {"fixed", "variance", "offsets"}


def test_agreement_metrics_on_a_known_linear_relation():
    offsets = pd.DataFrame(
        {
            "group_factor": "g",
            "term": "t",
            "group": list("abcd"),
            "lme4_mode": [0.0, 1.0, 2.0, 3.0],
            "pymc_mean": [1.0, 3.0, 5.0, 7.0],
            "lme4_condsd": 1.0,
            "pymc_sd": [2.0, 2.0, 2.0, 2.0],
            "n_obs": [3, 3, 3, 0],
        }
    )
    row = offset_agreement(offsets).iloc[0]
    # Only informed groups (n_obs > 0) count: pymc = 1 + 2 * lme4 over a, b, c.
    assert row["n_informed"] == 3 and row["n_groups"] == 4
    assert row["slope"] == pytest.approx(2.0)
    assert row["correlation"] == pytest.approx(1.0)
    assert row["rmse"] == pytest.approx(np.sqrt((1 + 4 + 9) / 3))
    assert row["sd_ratio"] == pytest.approx(2.0)


def test_interval_overlap():
    assert interval_overlap(0, 2, 1, 3) == pytest.approx(1 / 3)
    assert interval_overlap(0, 1, 2, 3) == 0.0
    assert interval_overlap(0, 1, 0, 1) == 1.0


def test_alignment_names_the_mismatch():
    bayes, _ = _bayes("offsets")
    freq = _freq(bayes.design)
    freq.ranef.loc[freq.ranef["group"] == "e", "group"] = "E"
    with pytest.raises(
        AlignmentError, match=r"'g' groups differ: only in lme4 \['E'\], only in PyMC \['e'\]"
    ):
        check_alignment(freq, bayes)
    freq = _freq(bayes.design)
    freq.fixed.loc[1, "term"] = "x1"
    with pytest.raises(AlignmentError, match=r"only in lme4 \['x1'\], only in PyMC \['x'\]"):
        check_alignment(freq, bayes)


def test_divergences_make_the_verdict_unreliable():
    bayes, _ = _bayes("offsets")
    bayes.idata.sample_stats["diverging"][0, :3] = True
    cmp = compare(_freq(bayes.design), bayes)
    assert set(cmp.fixed["verdict"]) == {"unreliable"}
    assert any("divergent" in n for n in cmp.notes)


def test_adaptive_record_decides_reliability_and_names_why_it_stopped():
    """A loop that met its targets makes rows reliable; one that stopped says why."""
    bayes, _ = _bayes("offsets")
    bayes.idata.sample_stats["diverging"][0, :3] = True
    bayes.settings["adaptive"] = {
        "reliable": False,
        "budget_spent": True,
        "reason": "budget spent: 4 rounds; still 3 divergences",
        "rounds": [],
    }
    cmp = compare(_freq(bayes.design), bayes)
    assert set(cmp.fixed["verdict"]) == {"unreliable"}
    assert all("budget spent: 4 rounds" in e for e in cmp.fixed["explanation"])

    clean, _ = _bayes("offsets")
    clean.settings["adaptive"] = {
        "reliable": True,
        "budget_spent": False,
        "reason": "",
        "rounds": [],
    }
    cmp = compare(_freq(clean.design), clean)
    assert "unreliable" not in set(cmp.fixed["verdict"])
