"""lme4 stopped short of its maximum (issue 20, causes 6 and 7).

The R test constructs the failure deterministically: bobyqa with ``maxfun = 2``
from ``start = c(1, 0, 0)`` (the slope's SD at 0) stops on sleepstudy at a
singular non-optimum, 21 log-likelihood units below lme4's own maximum, and
warns "convergence code 1 from bobyqa".  The unit tests feed constructed
posterior draws (answers known) to the comparison.
"""

from __future__ import annotations

import arviz as az
import numpy as np
import pandas as pd
import pytest

from harness.checks.compare import compare_variance
from harness.engines.lme4 import OPTIMIZERS, best_fit_summary
from harness.fits import BayesFit, FreqFit
from harness.model.priors import resolve_priors
from harness.model.spec import ModelSpec, build_design
from harness.report.tables import attribution_text

CHAINS, DRAWS = 4, 1000
LEVELS = [f"s{i}" for i in range(10)]
COR = "g: cor((Intercept),x)"


def _data() -> pd.DataFrame:
    rng = np.random.default_rng(5)
    g = np.repeat(LEVELS, 6)
    x = np.tile(np.arange(6.0), len(LEVELS))
    a = dict(zip(LEVELS, rng.normal(scale=1.0, size=len(LEVELS)), strict=True))
    y = 2.0 + np.array([a[v] for v in g]) + 0.5 * x + rng.normal(size=g.size)
    return pd.DataFrame({"y": y, "x": x, "g": g})


def _bayes(rng: np.random.Generator) -> BayesFit:
    """A posterior for ``y ~ x + (x | g)`` drawn independently (no sampler needed)."""
    spec = ModelSpec("y ~ x + (x | g)")
    design = build_design(spec, _data())
    shape = (CHAINS, DRAWS)
    n = CHAINS * DRAWS
    r = np.tanh(rng.normal(0.1, 0.4, n))
    corr = np.zeros((n, 2, 2))
    corr[:, 0, 0] = corr[:, 1, 1] = 1.0
    corr[:, 0, 1] = corr[:, 1, 0] = r
    idata = az.from_dict(
        posterior={
            "beta": np.stack([rng.normal(2.0, 0.3, n), rng.normal(0.5, 0.05, n)], -1).reshape(
                *shape, 2
            ),
            "sd_g": np.stack(
                [np.abs(rng.normal(1.0, 0.3, n)), np.abs(rng.normal(0.05, 0.04, n))], -1
            ).reshape(*shape, 2),
            "corr_g": corr.reshape(*shape, 2, 2),
            "sigma": np.abs(rng.normal(1.0, 0.05, n)).reshape(shape),
        },
        sample_stats={"diverging": np.zeros(shape, bool)},
        coords={
            "fixed_term": ["(Intercept)", "x"],
            "g__term": ["(Intercept)", "x"],
            "g__term_b": ["(Intercept)", "x"],
        },
        dims={"beta": ["fixed_term"], "sd_g": ["g__term"], "corr_g": ["g__term", "g__term_b"]},
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


def _variance(sd_slope: float, cor: float) -> pd.DataFrame:
    rows = [
        ("g: sd((Intercept))", "g", "sd", "(Intercept)", None, 1.0),
        (COR, "g", "cor", "(Intercept)", "x", cor),
        ("g: sd(x)", "g", "sd", "x", None, sd_slope),
        ("sigma", None, "sigma", None, None, 1.0),
    ]
    frame = pd.DataFrame(
        rows, columns=["component", "group_factor", "kind", "term", "term2", "estimate"]
    )
    frame["lower"] = np.nan
    frame["upper"] = np.nan
    return frame


def _freq(design, variance: pd.DataFrame, **extra) -> FreqFit:
    return FreqFit(
        spec=design.spec,
        design=design,
        engine="lme4",
        method="ML",
        fixed=pd.DataFrame(),
        variance=variance,
        ranef=pd.DataFrame(),
        ranef_sims=None,
        loglik=-100.0,
        loglik_ml=-100.0,
        reml_criterion=None,
        singular=True,
        converged=False,
        messages=[],
        versions={},
        r_call="",
        fit_seconds=0.0,
        **extra,
    )


def _no_nan(table: pd.DataFrame) -> None:
    for column in ("explanation", "note"):
        for text in table[column]:
            assert "nan" not in str(text).lower().replace("nanos", ""), text
    for attribution in table["attribution"]:
        assert "nan" not in attribution_text(attribution)


def test_an_undefined_lme4_correlation_says_why_and_is_not_a_fail():
    bayes = _bayes(np.random.default_rng(1))
    freq = _freq(bayes.design, _variance(0.0, float("nan")))
    table = compare_variance(freq, bayes).set_index("component")
    row = table.loc[COR]
    assert row["verdict"] == "look"
    assert "lme4's correlation is undefined: its SD of x is 0 (singular fit)" in row["explanation"]
    assert "boundary" in row["explanation"]
    _no_nan(table.reset_index())


def test_lme4_optimizer_source_carries_the_shift_to_the_best_refit():
    bayes = _bayes(np.random.default_rng(2))
    design = bayes.design
    # lme4 stopped at SD(x) = 0 with an undefined correlation; its best refit has both.
    freq = _freq(design, _variance(0.0, float("nan")))
    best = {
        "ML": {
            "optimizer": "bobyqa",
            "start": "lme4's default start",
            "criterion": 190.0,
            "loglik": -95.0,
            "fixed": {},
            "variance": {
                "g: sd((Intercept))": 1.0,
                COR: 0.1,
                "g: sd(x)": 0.05,
                "sigma": 1.0,
            },
            "beta": {},
            "theta": {},
            "sigma": 1.0,
        }
    }
    freq.best_fit = best_fit_summary(freq, best)
    assert freq.best_fit["improved"]
    assert freq.best_fit["sentence"].startswith(
        "lme4 did not reach its maximum (log-likelihood -100.000000 at lme4's estimates, "
        "-95.000000 at the best fit"
    )
    table = compare_variance(freq, bayes).set_index("component")
    sd_row = table.loc["g: sd(x)"]
    assert sd_row["attribution"]["lme4_optimizer"] == pytest.approx(0.05)
    parts = sd_row["attribution"]
    total = sum(
        parts[k] or 0.0 for k in ("lme4_optimizer", "prior", "summary", "boundary", "remainder")
    )
    assert total == pytest.approx(sd_row["pymc_median"] - 0.0)
    assert "lme4 did not reach its maximum" in sd_row["explanation"]
    assert sd_row["verdict"] != "fail"
    assert "lme4 optimizer +0.05" in attribution_text(sd_row["attribution"])
    cor_row = table.loc[COR]
    assert "the best refit's value 0.1 stands in" in cor_row["explanation"]
    assert cor_row["verdict"] != "fail"
    _no_nan(table.reset_index())


# --------------------------------------------------------------------------- with R


@pytest.mark.r
def test_lme4_stopped_short_is_refitted_named_and_not_a_different_model():
    import harness as hz
    from harness.checks.same_model import same_model

    data, spec = hz.datasets.load("sleepstudy")
    spec = spec.with_(reml=False)
    control = {"optimizer": "bobyqa", "maxfun": 2, "start": [1.0, 0.0, 0.0]}
    freq = hz.fit_lme4(spec, data, n_sims=0, control=control)
    assert not freq.converged and freq.singular
    assert any("convergence code 1 from bobyqa" in m for m in freq.messages)
    # lme4 warned, so its other optimizers were tried at once, from lme4's own start.
    refits = freq.optimizer_refits
    assert refits is not None
    tried = set(refits.loc[refits["start"] == "lme4's default start", "optimizer"])
    assert tried == set(OPTIMIZERS)
    assert freq.best_fit["improved"]
    assert refits["best"].sum() == 1
    best = freq.best_fit["by_method"]["ML"]
    assert best["loglik"] == pytest.approx(-875.969672, abs=1e-5)  # DESIGN.md: ML logLik -875.97
    assert best["loglik_original"] < best["loglik"] - 20

    result = same_model(spec, data, freq=freq, check_pymc_model=False)
    assert result.ok, result.reasons
    assert result.verdict == "same model; lme4 did not reach its maximum"
    assert abs(result.difference) < 1e-6  # the identity at lme4's own (short) estimates
    assert result.lme4_short
    assert "the harness's ML optimum" in set(result.lme4_refits["start"])
    assert result.loglik_lme4_best == pytest.approx(result.loglik_pymc_max, abs=1e-4)
    assert any(
        n.startswith("lme4 did not reach its maximum (log-likelihood -897.05") for n in result.notes
    )
    assert "lme4_original" in result.estimates.columns
    assert not any("different" in r for r in result.reasons)
    assert result.to_dict()["verdict"] == "same model; lme4 did not reach its maximum"


@pytest.mark.r
def test_control_is_checked_before_r_sees_it():
    import harness as hz

    data, spec = hz.datasets.load("sleepstudy")
    with pytest.raises(ValueError, match="optimizer must be one of"):
        hz.fit_lme4(spec, data, n_sims=0, control={"optimizer": "system('ls')"})
    with pytest.raises(ValueError, match="unknown key"):
        hz.fit_lme4(spec, data, n_sims=0, control={"calc.derivs": True})


@pytest.mark.r
def test_a_reml_fit_stopped_short_is_named_by_its_reml_criterion():
    import harness as hz
    from harness.checks.same_model import same_model

    data, spec = hz.datasets.load("sleepstudy")  # REML
    control = {"optimizer": "bobyqa", "maxfun": 2, "start": [1.0, 0.0, 0.0]}
    freq = hz.fit_lme4(spec, data, n_sims=0, control=control)
    reml = freq.best_fit["by_method"]["REML"]
    assert freq.best_fit["improved"] and freq.best_fit["method"] == "REML"
    assert reml["criterion"] == pytest.approx(1743.628, abs=1e-3)  # DESIGN.md: REML criterion
    result = same_model(spec, data, freq=freq, check_pymc_model=False)
    assert result.ok and result.verdict == "same model; lme4 did not reach its maximum"
    assert result.lme4_optimum.startswith("lme4's REML fit did not reach its maximum (REML")


# --------------------------------------------------------------------------- glmer (GLMMs)


def test_glmm_optimizer_share_comes_before_the_laplace_share():
    """glmer short of its Laplace maximum: optimizer share to it, Laplace share from it on."""
    from harness.checks.attribution import WidePrior, attribute_row

    rng = np.random.default_rng(0)
    draws = rng.normal(1.5, 0.2, size=(2, 2000))
    wide = WidePrior("psis", 0.0, np.full(draws.size, 1.0 / draws.size))
    # glmer 1.2; its best refit (the Laplace maximum) 1.25; exact ML 1.4 (laplace runs from
    # glmer's 1.2: +0.2); the summary's share is measured from the exact ML estimate.
    attr = attribute_row(
        draws,
        1.2,
        how="mean",
        wide_values=draws.ravel(),
        wide=wide,
        scale=0.2,
        scale_name="lme4 SE",
        tolerance=0.05,
        tolerance_text="0.25 lme4 SE",
        use_mode=False,
        integration=0.1,
        laplace=0.2,
        laplace_text="exact ML by quadrature: 1.4",
        optimizer_shift=0.05,
        optimizer_text="lme4 did not reach its maximum (Laplace log-likelihood ...)",
    )
    parts = attr.attribution
    assert parts["lme4_optimizer"] == pytest.approx(0.05)
    assert parts["laplace"] == pytest.approx(0.15)
    assert parts["summary"] == pytest.approx(0.1)
    total = sum(v for k, v in parts.items() if k != "mcse")
    assert total == pytest.approx(attr.gap, abs=1e-12)
    assert "its best refit moves lme4's estimate by +0.05" in attr.explanation


def _short_glmer_data() -> pd.DataFrame:
    """A binary design: 40 groups of 5, one covariate, a random intercept of SD 1."""
    rng = np.random.default_rng(3)
    g = np.repeat(np.arange(40), 5)
    x = rng.normal(size=g.size)
    u = rng.normal(scale=1.0, size=40)[g]
    y = (rng.random(g.size) < 1 / (1 + np.exp(-(-0.3 + 0.8 * x + u)))).astype(int)
    return pd.DataFrame({"y": y, "x": x, "g": pd.Categorical(g.astype(str))})


@pytest.fixture(scope="module")
def short_glmer():
    """glmer stopped after 5 evaluations per stage (bobyqa, ``maxfun = 5``): short of its max."""
    import harness as hz

    data = _short_glmer_data()
    spec = ModelSpec("y ~ x + (1 | g)", family="binomial")
    control = {"optimizer": "bobyqa", "maxfun": 5}
    freq = hz.fit_lme4(spec, data, n_sims=0, control=control, refit_on_warning=False)
    return spec, data, freq


@pytest.mark.r
def test_glmer_stopped_short_is_the_same_model_and_its_refits_feed_the_optimizer_source(
    short_glmer,
):
    from harness.checks.compare import _optimizer_shifts
    from harness.checks.same_model import same_model, with_lme4_refits

    spec, data, freq = short_glmer
    assert not freq.converged
    assert any("convergence code 1 from bobyqa" in m for m in freq.messages)
    assert 'glmerControl(optimizer = "bobyqa", optCtrl = list(maxfun = 5))' in freq.r_call
    # Recorded (lme4 1.1, R 4.2): glmer's short Laplace log-likelihood and the maximum.
    assert freq.loglik == pytest.approx(-113.499943, abs=1e-5)

    result = same_model(spec, data, freq=freq, check_pymc_model=False)
    assert result.ok, result.reasons
    assert result.verdict == "same model; lme4 did not reach its maximum"
    assert abs(result.difference) < 1e-6  # the identity at glmer's own (short) estimates
    assert result.lme4_short
    refits = result.lme4_refits
    assert set(refits.loc[refits["start"] == "glmer's default start", "optimizer"]) == set(
        OPTIMIZERS
    )
    assert {"bobyqa", "Nelder_Mead"} <= set(
        refits.loc[refits["start"] == "the harness's Laplace optimum", "optimizer"]
    )
    assert refits["best"].sum() == 1
    assert result.loglik_lme4_best == pytest.approx(-113.313821, abs=1e-5)
    assert result.loglik_lme4_best == pytest.approx(result.loglik_pymc_max, abs=1e-4)
    assert abs(result.loglik_pymc_at_best - result.loglik_lme4_best) < 1e-6
    assert result.lme4_optimum.startswith(
        "lme4 did not reach its maximum (Laplace log-likelihood -113.499943 at lme4's "
        "estimates, -113.313821 at the best fit"
    )
    assert "lme4_original" in result.estimates.columns
    assert result.estimates["ok"].all()
    assert result.to_dict()["verdict"] == "same model; lme4 did not reach its maximum"

    # The comparison's lme4_optimizer source: the best refit's estimate minus glmer's.
    carried = with_lme4_refits(freq, result)
    best = carried.best_fit["by_method"]["ML"]
    fixed, text = _optimizer_shifts(carried, "fixed")
    assert text.startswith("lme4 did not reach its maximum (Laplace log-likelihood")
    for term, estimate in zip(freq.fixed["term"], freq.fixed["estimate"], strict=True):
        assert fixed[term] == pytest.approx(best["fixed"][term] - estimate)
    assert abs(fixed["x"]) > 0.05  # x: 1.0376 at glmer's stop, 1.1644 at the maximum
    variance, _ = _optimizer_shifts(carried, "variance")
    assert variance["g: sd((Intercept))"] == pytest.approx(
        best["variance"]["g: sd((Intercept))"] - float(freq.variance["estimate"].iloc[0])
    )


@pytest.mark.r
def test_glmer_different_models_only_when_the_identity_fails(short_glmer):
    import dataclasses

    from harness.checks.same_model import same_model

    spec, data, freq = short_glmer
    # The same short fit with a log-likelihood the Laplace approximation does not give.
    wrong = dataclasses.replace(freq, loglik=freq.loglik - 0.5, loglik_ml=freq.loglik_ml - 0.5)
    result = same_model(spec, data, freq=wrong, check_pymc_model=False)
    assert not result.ok
    assert result.verdict == "different models"
    assert any(r.startswith("Laplace log-likelihood at glmer's estimates") for r in result.reasons)


@pytest.mark.r
def test_a_glmer_start_needs_theta_and_beta(short_glmer):
    from harness.engines.lme4 import refit_lme4

    _, _, freq = short_glmer
    with pytest.raises(ValueError, match="needs both theta and the fixed effects"):
        refit_lme4(freq, start=[1.0])
    with pytest.raises(ValueError, match="finite"):
        refit_lme4(freq, start=[float("nan")], beta=[0.0, 1.0])


@pytest.mark.r
def test_r_logical_na_reads_as_missing_not_an_error():
    """A refit that errored has ``singular = NA``: the table reads it as missing (was a crash)."""
    import rpy2.robjects as ro

    from harness.engines.lme4 import _vector

    assert list(_vector(ro.r("c(TRUE, NA, FALSE)"))) == [True, None, False]
    assert _vector(ro.r("c(TRUE, FALSE)")).dtype == bool
