"""Issue 15: real data sets that showed defects (lme4's and nlme's own data).

Reference values come from lme4 run directly in R on the same CSV files
(``tests/reference/repeated_factor_profile.R``, which also exported
``tests/data/orthodont.csv`` from nlme; date and versions in its JSON).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import harness as hz
from harness.model.spec import ModelSpec

ROOT = Path(__file__).resolve().parents[1]
PROFILE = json.loads((ROOT / "tests" / "reference" / "repeated_factor_profile.json").read_text())


def _read(csv: str) -> pd.DataFrame:
    from harness.user_data import read_data

    return read_data(ROOT / csv)


@pytest.mark.r
@pytest.mark.parametrize("name", sorted(PROFILE["models"]))
def test_profile_intervals_of_repeated_factor_equal_r(name):
    """Every variance row of a `||` / repeated-factor model has R's profile interval."""
    ref = PROFILE["models"][name]
    freq = hz.fit_lme4(ModelSpec(ref["formula"]), _read(ref["csv"]), profile=True, n_sims=0)
    assert freq.reml_criterion == pytest.approx(ref["reml_criterion"], rel=1e-9)
    variance = freq.variance.set_index("component")
    assert list(variance.index) == [row["component"] for row in ref["variance"]]
    for row in ref["variance"]:
        ours = variance.loc[row["component"]]
        assert ours["estimate"] == pytest.approx(row["estimate"], rel=1e-6, abs=1e-8)
        assert ours["lower"] == pytest.approx(row["lower"], abs=1e-3), row["component"]
        assert ours["upper"] == pytest.approx(row["upper"], abs=1e-3), row["component"]
        assert ours["ci_method"] == "profile"


# --------------------------------------------------------------------------- formula forms (no R)


@pytest.mark.parametrize(
    ("formula", "response", "columns"),
    [
        (
            "log(Reaction) ~ log(Days + 1) + (log(Days + 1) | Subject)",
            "log(Reaction)",
            ("Reaction",),
        ),
        ("sqrt(Reaction) ~ Days + (Days | Subject)", "sqrt(Reaction)", ("Reaction",)),
        ("I(Reaction/10) ~ Days + (Days | Subject)", "I(Reaction/10)", ("Reaction",)),
        ("Reaction ~ Days + (Days | Subject)", "Reaction", ("Reaction",)),
    ],
)
def test_transformed_response_is_evaluated_once(formula, response, columns):
    from harness.model.spec import parse_formula

    data = _read("harness/datasets/sleepstudy.csv")
    parsed = parse_formula(formula)
    assert (parsed.response, parsed.response_columns) == (response, columns)
    design = hz.build_design(ModelSpec(formula), data)
    assert design.response == response
    raw = data["Reaction"].to_numpy(float)
    expected = {
        "log(Reaction)": np.log(raw),
        "sqrt(Reaction)": np.sqrt(raw),
        "I(Reaction/10)": raw / 10,
        "Reaction": raw,
    }[response]
    np.testing.assert_array_equal(design.y, expected)


@pytest.mark.parametrize(
    "lhs", ["Reaction + 1", "-Reaction", "log(Reaction, 2)", "foo(Reaction)", "log(Subject)"]
)
def test_response_forms_outside_scope_are_refused_with_the_response_named(lhs):
    data = _read("harness/datasets/sleepstudy.csv")
    with pytest.raises(ValueError, match=re.escape(lhs)):
        hz.build_design(ModelSpec(f"{lhs} ~ Days + (1 | Subject)"), data)


def test_response_transform_of_nonpositive_values_names_the_rows():
    data = _read("harness/datasets/sleepstudy.csv")
    with pytest.raises(ValueError, match=r"log\(Reaction - 300\) is not finite in \d+ row"):
        hz.build_design(ModelSpec("log(Reaction - 300) ~ Days + (1 | Subject)"), data)


@pytest.mark.parametrize(
    ("formula", "fixed", "expr", "correlated"),
    [
        ("Yield ~ 1 | Batch", "1", ["1"], True),
        # '|' binds more loosely than '+': lme4's findbars/nobars read one bar, fixed part 1.
        ("Yield ~ x + 1 | Batch", "1", ["x + 1"], True),
        ("Yield ~ x || Batch", "1", ["1", "0 + x"], False),
    ],
)
def test_bare_bar_reads_as_lme4_reads_it(formula, fixed, expr, correlated):
    from harness.model.spec import parse_formula

    parsed = parse_formula(formula)
    assert parsed.fixed_rhs == fixed
    assert [b.expr for b in parsed.bars] == expr
    assert {b.factor for b in parsed.bars} == {"Batch"}
    assert all(b.correlated is correlated for b in parsed.bars)


# --------------------------------------------------------------------------- formula forms (lme4)


@pytest.mark.r
def test_lme4_fits_the_same_transformed_values():
    """lme4's own response vector (model.response of lFormula's frame) equals design.y."""
    import rpy2.robjects as ro

    from harness.engines.lme4 import to_r_frame

    data = _read("harness/datasets/sleepstudy.csv")
    for formula in (
        "log(Reaction) ~ log(Days + 1) + (log(Days + 1) | Subject)",
        "sqrt(Reaction) ~ Days + (Days | Subject)",
        "I(Reaction/10) ~ Days + (Days | Subject)",
    ):
        design = hz.build_design(ModelSpec(formula), data)
        response = ro.r("function(d, f) model.response(lme4::lFormula(as.formula(f), d)$fr)")
        y_r = np.asarray(response(to_r_frame(design.data), formula), dtype=float)
        np.testing.assert_allclose(y_r, design.y, rtol=1e-15, atol=0)


@pytest.mark.r
@pytest.mark.parametrize(
    "formula",
    [
        "log(Reaction) ~ log(Days + 1) + (log(Days + 1) | Subject)",
        "sqrt(Reaction) ~ Days + (Days | Subject)",
        "I(Reaction/10) ~ Days + (Days || Subject)",
    ],
)
def test_transformed_response_same_model_identity(formula):
    data = _read("harness/datasets/sleepstudy.csv")
    result = hz.same_model(ModelSpec(formula), data, check_pymc_model=False)
    assert result.ok, result.reasons
    assert abs(result.difference) < 1e-6


@pytest.mark.r
def test_bare_bar_on_dyestuff_equals_the_parenthesised_fit():
    reference = json.loads((ROOT / "tests" / "reference" / "lme4_datasets.json").read_text())
    ref = reference["models"]["dyestuff"]
    data = _read("tests/data/dyestuff.csv")
    freq = hz.fit_lme4(ModelSpec("Yield ~ 1 | Batch"), data, n_sims=0)
    assert freq.reml_criterion == pytest.approx(ref["reml_criterion"], rel=1e-9)
    variance = dict(zip(freq.variance["component"], freq.variance["estimate"], strict=True))
    assert variance == pytest.approx(ref["variance"], rel=1e-6)
    result = hz.same_model(ModelSpec("Yield ~ 1 | Batch"), data, freq=freq, check_pymc_model=False)
    assert result.ok, result.reasons


# --------------------------------------------------------------------------- one naming


@pytest.mark.r
def test_orthodont_components_named_as_varcorr_everywhere():
    """The second Subject block is "Subject.1" in the variance AND the same-model tables."""
    ref = PROFILE["models"]["orthodont_nsex"]
    data = _read(ref["csv"])
    spec = ModelSpec(ref["formula"])
    freq = hz.fit_lme4(spec, data, n_sims=0)
    variance_names = [c for c in freq.variance["component"] if c != "sigma"]
    assert variance_names == [r["component"] for r in ref["variance"] if r["component"] != "sigma"]
    assert "Subject.1: sd(nsex)" in variance_names
    result = hz.same_model(spec, data, freq=freq, check_pymc_model=False)
    assert result.ok, result.reasons
    sd_and_cor = [p for p in result.estimates["parameter"] if ": " in p]
    assert sorted(sd_and_cor) == sorted(variance_names)


# --------------------------------------------------------------------------- end to end (CLI)


def _run_compare(tmp_path, csv, formula, caplog):
    import logging

    from harness.cli import main

    out, out_json = tmp_path / "report.html", tmp_path / "tables.json"
    with pytest.MonkeyPatch.context() as mp, caplog.at_level(logging.INFO, logger="harness"):
        mp.setenv("HARNESS_CACHE_DIR", str(tmp_path / "cache"))
        for key, value in {"HARNESS_DRAWS": "200", "HARNESS_TUNE": "200"}.items():
            mp.setenv(key, value)
        mp.setenv("HARNESS_CHAINS", "2")
        rc = main(
            [
                "compare",
                str(ROOT / csv),
                "--formula",
                formula,
                "--out",
                str(out),
                "--json",
                str(out_json),
            ]
        )
    assert rc == 0
    text = re.sub(r"data:[^\"')]+", "", out.read_text(encoding="utf-8"))
    return json.loads(out_json.read_text()), re.sub(r"<[^>]+>", " ", text), out


@pytest.mark.r
def test_singular_dyestuff2_agreement_has_a_reason_not_absurd_numbers(tmp_path, caplog):
    """lme4 shrinks Batch to zero on Dyestuff2: no slope/ratio over zero spread, no "pass"."""
    tables, text, out = _run_compare(
        tmp_path, "tests/data/dyestuff2.csv", "Yield ~ 1 + (1 | Batch)", caplog
    )
    (row,) = tables["tables"]["agreement"]
    assert row["correlation"] is None and row["slope"] is None and row["sd_ratio"] is None
    assert row["verdict"] != "pass"
    assert row["reason"].startswith("lme4 shrinks this term to zero (singular fit)")
    assert all(r["sd_ratio"] is None for r in tables["tables"]["offsets"])
    assert "lme4 shrinks this term to zero" in text
    assert "∞" not in text and not re.search(r"\b(nan|inf)\b", text)
    # issue 15.5: the log names the output, never the temporary file it was written through
    wrote = [r.getMessage() for r in caplog.records if r.getMessage().startswith("wrote ")]
    assert any(str(out) in m for m in wrote) and not any(".tmp" in m for m in wrote)


@pytest.mark.r
@pytest.mark.slow
def test_log_response_through_harness_compare_identity_passes(tmp_path, caplog):
    """lme4's own test formula log(Reaction) ~ log(Days + 1) + (log(Days + 1) | Subject)."""
    tables, text, _ = _run_compare(
        tmp_path,
        "harness/datasets/sleepstudy.csv",
        "log(Reaction) ~ log(Days + 1) + (log(Days + 1) | Subject)",
        caplog,
    )
    same = tables["same_model"]
    assert same["ok"] is True and abs(same["difference"]) < 1e-6
    assert same["formula_pymc"] == same["formula_lme4"]
    assert "log-likelihoods are of log(Reaction), not of Reaction" in text


def test_agreement_over_rounding_noise_is_undefined():
    """The issue's case: lme4 modes ~1e-14 (a singular term) gave slope 5e14 and "pass"."""
    from harness.checks.compare import offset_agreement

    rng = np.random.default_rng(1)
    n = 18
    posterior = rng.normal(0.0, 3.0, n)
    offsets = pd.DataFrame(
        {
            "group_factor": "Subject.1",
            "group": [str(i) for i in range(n)],
            "term": "nsex",
            "lme4_mode": posterior * 1e-14,  # perfectly correlated, but at rounding level
            "lme4_condsd": 1e-9,
            "pymc_mean": posterior,
            "pymc_sd": 1.0,
            "n_obs": 4,
        }
    )
    (row,) = offset_agreement(offsets).to_dict("records")
    assert np.isnan(row["correlation"]) and np.isnan(row["slope"]) and np.isnan(row["sd_ratio"])
    assert row["verdict"] == "look"
    assert "lme4 shrinks this term to zero" in row["reason"]
    # with real spread the metrics are back
    offsets["lme4_mode"] = posterior * 0.9
    offsets["lme4_condsd"] = 0.8
    (row,) = offset_agreement(offsets).to_dict("records")
    assert row["correlation"] == pytest.approx(1.0) and row["slope"] == pytest.approx(1 / 0.9)
    assert row["sd_ratio"] == pytest.approx(1.25) and row["verdict"] == "pass"
    assert row["reason"] == ""
