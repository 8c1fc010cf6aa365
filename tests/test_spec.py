"""ModelSpec, formula parsing and the design both engines share (no R, no sampling)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import harness as hz
from harness.model.priors import resolve_priors
from harness.model.spec import BarTerm, ModelSpec, build_design, parse_formula


def test_parse_lme4_bars():
    parsed = parse_formula("Reaction ~ Days + (Days | Subject)")
    assert parsed.response == "Reaction"
    assert parsed.fixed_rhs == "Days"
    assert parsed.bars == (BarTerm("Days", "Subject", True),)


def test_parse_double_bar_and_nesting_follow_lme4():
    parsed = parse_formula("y ~ x + (1 + x || g) + (1 | a/b)")
    assert parsed.bars == (
        BarTerm("1", "g", False),
        BarTerm("0 + x", "g", False),
        BarTerm("1", "b:a", True),
        BarTerm("1", "a", True),
    )


@pytest.mark.parametrize(
    ("formula", "message"),
    [
        ("y x + (1 | g)", "needs 'response ~ terms'"),
        ("y ~ x + (1 | g", "unbalanced"),
        ("y ~ x + ", "empty term"),
        ("y ~ x + offset(z) + (1 | g)", "offset"),
        # lme4 reads a top-level bar (y ~ x + 1 | g) as (x + 1 | g), and a call on the left
        # as a transformed response (test_real_data.py); these it does not:
        ("y ~ x + I(1 | g)", "must be written"),
        ("y + 1 ~ x + (1 | g)", "column name or one call"),
    ],
)
def test_unparseable_formulas_are_refused(formula, message):
    with pytest.raises(ValueError, match=message):
        parse_formula(formula)


def test_sleepstudy_design():
    data, spec = hz.datasets.load("sleepstudy")
    design = build_design(spec, data)
    assert design.n == 180 and design.n_dropped == 0
    assert design.fixed_terms == ["(Intercept)", "Days"]
    (block,) = design.blocks
    assert block.factor == "Subject" and block.terms == ["(Intercept)", "Days"]
    assert block.levels[:3] == ["308", "309", "310"] and block.n_levels == 18
    Z = design.Z()
    assert Z.shape == (180, 36)
    # lme4 orders Z level-major: (308, Intercept), (308, Days), (309, Intercept), ...
    assert design.Z_column_names()[:3] == [
        "Subject:308:(Intercept)",
        "Subject:308:Days",
        "Subject:309:(Intercept)",
    ]
    row = data.index[(data["Subject"] == "309") & (data["Days"] == 4)][0]
    dense = Z.toarray()
    np.testing.assert_array_equal(dense[row, 2:4], [1.0, 4.0])
    assert dense[row].sum() == 5.0


def _toy(n_groups=4, per=5, seed=0):
    rng = np.random.default_rng(seed)
    g = np.repeat([f"g{i}" for i in range(n_groups)], per)
    x = rng.normal(size=g.size)
    return pd.DataFrame(
        {
            "y": 1 + x + rng.normal(size=g.size),
            "x": x,
            "g": g,
            "f": rng.choice(["lo", "mid", "hi"], size=g.size),
        }
    )


def test_missing_column_lists_the_columns():
    data = _toy()
    with pytest.raises(ValueError, match=r"\['z'\].*columns are \['f', 'g', 'x', 'y'\]"):
        build_design(ModelSpec("y ~ z + (1 | g)"), data)


def test_non_numeric_response():
    data = _toy().assign(y=lambda d: d["f"])
    with pytest.raises(ValueError, match="response 'y' must be numeric"):
        build_design(ModelSpec("y ~ x + (1 | g)"), data)


def test_nans_are_dropped_like_na_omit_and_counted():
    data = _toy()
    data.loc[[0, 3], "x"] = np.nan
    data.loc[7, "y"] = np.nan
    data.loc[9, "f"] = np.nan  # not used by the formula: the row stays
    design = build_design(ModelSpec("y ~ x + (1 | g)"), data)
    assert design.n_dropped == 3 and design.n == len(data) - 3
    assert "3 row(s) with missing values dropped" in design.notes[0]


def test_all_nan_column():
    data = _toy().assign(x=np.nan)
    with pytest.raises(ValueError, match="column 'x' has no non-missing values"):
        build_design(ModelSpec("y ~ x + (1 | g)"), data)


def test_grouping_factor_with_one_level():
    data = _toy().assign(g="only")
    with pytest.raises(ValueError, match="grouping factor 'g' has only one level"):
        build_design(ModelSpec("y ~ x + (1 | g)"), data)


def test_categorical_predictor_uses_r_treatment_names():
    design = build_design(ModelSpec("y ~ x * f + (1 | g)"), _toy(seed=3))
    # R sorts factor levels ("hi" < "lo" < "mid") and drops the first as reference.
    assert design.fixed_terms == ["(Intercept)", "x", "flo", "fmid", "x:flo", "x:fmid"]


def test_collinear_predictors_are_dropped_like_lme4_and_named():
    data = _toy().assign(x2=lambda d: 2 * d["x"])
    design = build_design(ModelSpec("y ~ x + x2 + (1 | g)"), data)
    assert design.fixed_terms == ["(Intercept)", "x"]
    assert any("['x2']" in note and "dropped" in note for note in design.notes)


def test_sigma_by_levels():
    data, spec = hz.datasets.load("partially_clustered_hetero")
    design = build_design(spec, data)
    assert design.sigma_levels == ["control", "treatment"]
    assert set(np.unique(design.sigma_index)) == {0, 1}


def test_bad_spec_settings():
    with pytest.raises(ValueError, match="parameterization"):
        ModelSpec("y ~ 1 + (1 | g)", parameterization="centred")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown prior profile"):
        ModelSpec("y ~ 1 + (1 | g)", priors="vague")


def test_weak_priors_scale_with_the_data():
    data, spec = hz.datasets.load("sleepstudy")
    priors = resolve_priors(build_design(spec, data))
    sy = data["Reaction"].std(ddof=0)
    assert priors.fixed["(Intercept)"].params["mu"] == pytest.approx(data["Reaction"].mean())
    assert priors.fixed["Days"].params["sigma"] == pytest.approx(
        2.5 * sy / data["Days"].std(ddof=0)
    )
    assert priors.sigma.params["lam"] == pytest.approx(1 / sy)


def test_m14_1_priors_are_the_books():
    data, spec = hz.datasets.load("cafe")
    priors = resolve_priors(build_design(spec.with_(priors="m14.1"), data))
    assert priors.fixed["(Intercept)"].describe() == "Normal(mu=5, sigma=2)"
    assert priors.fixed["afternoon"].describe() == "Normal(mu=-1, sigma=0.5)"
    assert priors.lkj_eta == 2.0
    assert {p.describe() for p in priors.sd.values()} == {"Exponential(lam=1)"}


def test_datasets_have_the_documented_shape():
    cafe, _ = hz.datasets.load("cafe", seed=3)
    assert cafe.shape == (200, 3) and cafe["cafe"].nunique() == 20
    trial, spec = hz.datasets.load("partially_clustered")
    assert len(trial) == 200 and spec.formula == "y ~ 1 + tx + (0 + tx | group)"
    treated = trial[trial["tx"] == 1].groupby("group", observed=True).size()
    assert len(treated) == 10 and (treated == 10).all()
    control = trial[trial["tx"] == 0].groupby("group", observed=True).size()
    assert len(control) == 100 and (control == 1).all()
    for name in hz.datasets.DATASETS:
        assert len(hz.datasets.describe(name)) > 100
