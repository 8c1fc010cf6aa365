"""Two posteriors compared in combined Monte Carlo error (issue 22): PyMC against brms.

The table is tested on posteriors built here: independent draws from one
distribution (two samplers of the same posterior) pass, a copy shifted by a few
MCSE fails (the negative control), a stuck chain makes its rows unreliable.  Two
halves of one PyMC fit are two real samplers of one posterior.  The end-to-end run
with brms skips where R's brms is missing, and is slow.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import arviz as az
import numpy as np
import pandas as pd
import pytest
import xarray as xr

import harness as hz
from harness.checks.compare import Comparison
from harness.checks.compare_bayes import (
    BayesComparison,
    bayes_rows,
    compare_bayes,
    gap_side,
    three_way_table,
)
from harness.fits import BayesFit
from harness.model.priors import resolve_priors
from harness.model.spec import build_design
from harness.names import corr_var, sd_var, term_b_dim, term_dim

ROOT = Path(__file__).resolve().parents[1]
CHAINS, DRAWS = 4, 1000
#: Posterior centre and spread of each variable (sleepstudy-like values).
CENTRE = {"beta": [251.4, 10.5], "sd": [27.0, 6.5], "cor": 0.08, "sigma": 25.9}
SPREAD = {"beta": [7.0, 1.6], "sd": [5.0, 1.3], "cor": 0.25, "sigma": 1.6}


@pytest.fixture(scope="module")
def design():
    data, spec = hz.datasets.load("sleepstudy")
    return build_design(spec, data)


def _fit(design, seed: int, shift: dict[str, float] | None = None, stuck: bool = False) -> BayesFit:
    """A posterior of sleepstudy's shape: independent normal draws around fixed centres.

    ``shift`` moves one row's draws (``"beta:Days"``, ``"sigma"``); ``stuck`` puts the
    first chain of every variable far from the others (R-hat far above 1.01).
    """
    rng = np.random.default_rng(seed)
    shift = shift or {}
    block = design.blocks[0]

    def draws(centre: np.ndarray, spread: np.ndarray) -> np.ndarray:
        values = centre + spread * rng.standard_normal((CHAINS, DRAWS, *np.shape(centre)))
        if stuck:
            values[0] += 5 * spread
        return values

    beta = draws(np.array(CENTRE["beta"]), np.array(SPREAD["beta"]))
    beta[..., 1] += shift.get("beta:Days", 0.0)
    sd = draws(np.array(CENTRE["sd"]), np.array(SPREAD["sd"]))
    cor = draws(np.array(CENTRE["cor"]), np.array(SPREAD["cor"]))
    corr = np.ones((CHAINS, DRAWS, 2, 2))
    corr[..., 0, 1] = corr[..., 1, 0] = cor
    sigma = draws(np.array(CENTRE["sigma"]), np.array(SPREAD["sigma"])) + shift.get("sigma", 0.0)
    posterior = xr.Dataset(
        {
            "beta": (("chain", "draw", "fixed_term"), beta),
            sd_var(block): (("chain", "draw", term_dim(block)), sd),
            corr_var(block): (("chain", "draw", term_dim(block), term_b_dim(block)), corr),
            "sigma": (("chain", "draw"), sigma),
        },
        coords={
            "chain": np.arange(CHAINS),
            "draw": np.arange(DRAWS),
            "fixed_term": design.fixed_terms,
            term_dim(block): block.terms,
            term_b_dim(block): block.terms,
        },
    )
    stats = xr.Dataset(
        {"diverging": (("chain", "draw"), np.zeros((CHAINS, DRAWS), dtype=bool))},
        coords={"chain": np.arange(CHAINS), "draw": np.arange(DRAWS)},
    )
    return BayesFit(
        spec=design.spec,
        design=design,
        idata=az.InferenceData(posterior=posterior, sample_stats=stats),
        sampler="independent draws",
        seed=seed,
        draws=DRAWS,
        tune=0,
        chains=CHAINS,
        priors=resolve_priors(design),
        compile_seconds=0.0,
        sample_seconds=0.0,
        model_code="",
    )


def test_rows_are_the_lme4_comparisons_names(design) -> None:
    names = [row for _, row in bayes_rows(_fit(design, 1))]
    assert names == [
        "(Intercept)",
        "Days",
        "Subject: sd((Intercept))",
        "Subject: sd(Days)",
        "Subject: cor((Intercept),Days)",
        "sigma",
    ]


def test_two_samplers_of_one_posterior_pass(design) -> None:
    result = compare_bayes(_fit(design, 1), _fit(design, 2), engines=("pymc", "brms"))
    table = result.table
    assert result.verdict == "pass"
    assert list(table["verdict"]) == ["pass"] * 6
    # The columns are what they say: diff of the means, MCSEs combined, z their ratio.
    assert np.allclose(table["diff"], table["pymc_mean"] - table["brms_mean"])
    assert np.allclose(table["mcse"], np.hypot(table["pymc_mcse"], table["brms_mcse"]))
    assert np.allclose(table["z"], table["diff"] / table["mcse"])
    # ArviZ's MCSE of the mean, one side's draws on their own.
    days = _fit(design, 1).idata.posterior["beta"].sel(fixed_term="Days")
    assert table.loc[1, "pymc_mcse"] == pytest.approx(
        float(np.ravel(az.mcse(days.values, method="mean"))[0])
    )


def test_a_shifted_copy_fails_on_the_shifted_rows_only(design) -> None:
    """The negative control: a posterior moved by 10 combined MCSE is not the same posterior."""
    base = compare_bayes(_fit(design, 1), _fit(design, 2), engines=("pymc", "brms")).table
    days_mcse = float(base.loc[base["row"] == "Days", "mcse"].iloc[0])
    sigma_mcse = float(base.loc[base["row"] == "sigma", "mcse"].iloc[0])
    shifted = _fit(design, 2, shift={"beta:Days": 10 * days_mcse, "sigma": -10 * sigma_mcse})
    result = compare_bayes(_fit(design, 1), shifted, engines=("pymc", "brms"))
    verdicts = dict(zip(result.table["row"], result.table["verdict"], strict=True))
    assert verdicts == {
        "(Intercept)": "pass",
        "Days": "fail",
        "Subject: sd((Intercept))": "pass",
        "Subject: sd(Days)": "pass",
        "Subject: cor((Intercept),Days)": "pass",
        "sigma": "fail",
    }
    assert result.verdict == "fail"
    assert result.max_abs_z > 3
    sentence = gap_side(result, None, {"pymc": "PyMC"})
    assert "one of the Bayesian fits is wrong" in sentence
    assert "Days" in sentence and "sigma" in sentence


def test_a_stuck_chain_makes_rows_unreliable_not_failing(design) -> None:
    result = compare_bayes(_fit(design, 1), _fit(design, 2, stuck=True), engines=("pymc", "brms"))
    assert set(result.table["verdict"]) == {"unreliable"}
    assert result.table["note"].str.startswith("brms: unreliable: R-hat").all()
    assert result.verdict == "unreliable"
    assert gap_side(result, None, {}).startswith("Cannot tell")


def test_two_halves_of_a_pymc_fit_agree(sleepstudy_bayes) -> None:
    """Real draws: chains 0-1 and 2-3 of one PyMC fit are two samplers of one posterior."""
    fit = sleepstudy_bayes
    halves = []
    for chains in ([0, 1], [2, 3]):
        idata = az.InferenceData(
            posterior=fit.idata.posterior.isel(chain=chains),
            sample_stats=fit.idata.sample_stats.isel(chain=chains),
        )
        halves.append(dataclasses.replace(fit, idata=idata, settings={}))
    result = compare_bayes(*halves, engines=("pymc", "pymc"))
    assert result.engines == ("pymc_1", "pymc_2")
    assert len(result.table) == 6
    # Half the draws may leave a row short of 400 ESS (unreliable, by the rule); none fails.
    table = result.table
    assert (table["z"].abs() <= 3).all(), table[["row", "z", "verdict", "note"]]
    assert set(table["verdict"]) <= {"pass", "unreliable"}
    assert table.loc[table["verdict"] == "unreliable", "note"].str.contains("ESS").all()


def _reference(verdicts: dict[str, str]) -> Comparison:
    """An lme4-vs-PyMC comparison's two tables with the given verdicts (the rest unused here)."""
    fixed = [r for r in verdicts if ": " not in r and r != "sigma"]
    variance = [r for r in verdicts if r not in fixed]
    empty = pd.DataFrame()
    return Comparison(
        fixed=pd.DataFrame(
            {"term": fixed, "lme4_estimate": 1.0, "verdict": [verdicts[r] for r in fixed]}
        ),
        variance=pd.DataFrame(
            {
                "component": variance,
                "lme4_estimate": 2.0,
                "verdict": [verdicts[r] for r in variance],
            }
        ),
        offsets=empty,
        agreement=empty,
        diagnostics=empty,
        sampler_stats={},
        uncertainty=empty,
        freq=None,  # type: ignore[arg-type]
        bayes=None,  # type: ignore[arg-type]
    )


def test_a_gap_to_lme4_is_placed_on_the_right_side(design) -> None:
    rows = [row for _, row in bayes_rows(_fit(design, 1))]
    reference = _reference(
        {r: ("look" if r == "Subject: sd((Intercept))" else "pass") for r in rows}
    )
    agree = compare_bayes(_fit(design, 1), _fit(design, 2), engines=("pymc", "brms"))
    table = three_way_table(agree, reference)
    assert list(table.columns[:5]) == ["table", "row", "lme4", "pymc", "brms"]
    sides = dict(zip(table["row"], table["side"], strict=True))
    assert sides["Subject: sd((Intercept))"] == "Bayes vs (RE)ML"
    assert sides["Days"] == "no gap"
    sentence = gap_side(agree, reference, {"pymc": "PyMC"})
    assert "(RE)ML" in sentence and "Subject: sd((Intercept))" in sentence

    shifted = _fit(design, 2, shift={"beta:Days": 5.0})
    disagree = compare_bayes(_fit(design, 1), shifted, engines=("pymc", "brms"))
    sides = dict(zip(*three_way_table(disagree, reference)[["row", "side"]].T.values, strict=True))
    assert sides["Days"] == "between the Bayesian fits"


def test_fits_of_different_designs_are_refused(design) -> None:
    data, spec = hz.datasets.load("cafe")
    cafe = build_design(spec, data)  # two fixed terms and one correlated block, other names
    with pytest.raises(ValueError, match="different quantities"):
        compare_bayes(_fit(design, 1), _fit(cafe, 3))


# --------------------------------------------------------------------------- with brms


@pytest.mark.r
@pytest.mark.slow
def test_three_engines_end_to_end_on_sleepstudy(tmp_path: Path) -> None:
    """lme4, PyMC and brms through the runner: the pair's table, the identity, report and JSON."""
    from harness.engines import brms
    from harness.engines.lme4 import RUnavailableError

    try:
        brms._env()
    except RUnavailableError as err:
        pytest.skip(f"brms unavailable: {err}")
    from harness.pipeline.runner import fit_design
    from harness.report.page import render_report
    from harness.user_data import comparison_json

    # Compiled Stan programs are kept where the brms tests keep them; the fits in tmp_path.
    os.environ.setdefault("HARNESS_CACHE_DIR", str(ROOT / ".cache" / "harness"))
    result = fit_design("sleepstudy", cache_dir=tmp_path, engines=["lme4", "pymc", "brms"])
    pair = result.comparisons[("pymc", "brms")]
    assert isinstance(pair, BayesComparison)
    assert len(pair.table) == 6
    assert pair.verdict == "pass", pair.table[["row", "z", "verdict", "note"]]
    assert result.same_model_bayes is not None and result.same_model_bayes.ok
    assert result.same_model_bayes.max_abs_diff < 1e-8
    html = render_report(result)
    assert 'id="three-engines"' in html and "brms mean" in html
    payload = json.loads(json.dumps(comparison_json(result)))
    assert payload["bayes_pairs"][0]["engines"] == ["pymc", "brms"]
    assert len(payload["bayes_pairs"][0]["three_way"]) == 6
    assert payload["same_model_bayes"]["ok"] is True
    # A warm run loads the pair's comparison and the identity from the cache.
    again = fit_design("sleepstudy", cache_dir=tmp_path, engines=["lme4", "pymc", "brms"])
    assert again.cached["compare:pymc-brms"] and again.cached["same_model_bayes"]
