"""Formula features with lme4's meaning: the design equals ``lme4::lFormula``'s.

The first half needs no R: R's term algebra, column names and level order are
checked against values recorded from R 4.2.2 / lme4 1.1-31 (``terms()``,
``sort()``, ``lFormula``), quoted inline.  The second half builds X and Z in
R for every feature and compares them column by column.  No sampling.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from harness.model.rformula import (
    collinear_columns,
    model_matrix,
    parse_terms,
    r_level_labels,
    r_number,
    r_sort_key,
    uncorrelated_exprs,
)
from harness.model.spec import ModelSpec, build_design, make_names, parse_formula


def features_data(n: int = 72, seed: int = 11) -> pd.DataFrame:
    """Numeric, categorical (2, 3 levels, mixed case), logical and grouping columns."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    z = rng.normal(size=n)
    return pd.DataFrame(
        {
            "y": 2 + x + rng.normal(size=n),
            "x": x,
            "z": z,
            "pos": rng.uniform(0.5, 3.0, size=n),
            "f": rng.choice(["lo", "mid", "hi"], size=n),
            "h": rng.choice(["a", "b"], size=n),
            "k": rng.choice(["a", "B", "c"], size=n),
            "flag": rng.choice([True, False], size=n),
            "g": np.repeat([f"g{i}" for i in range(8)], n // 8),
            "a": rng.choice(["A1", "A2", "A3", "A4"], size=n),
            "b": rng.choice(["B1", "B2", "B3"], size=n),
            "c": rng.choice([1, 2, 3, 10], size=n),
            "x2": 2 * x,
            "xz": x + z,
        }
    )


# --------------------------------------------------------------------------- R's term algebra (no R)

# attr(terms(y ~ RHS), c("intercept", "term.labels")) printed by R 4.2.2.
R_TERM_LABELS = [
    ("z:x + x", 1, ["x", "z:x"]),
    ("x + z:x", 1, ["x", "x:z"]),
    ("(x + z + f)^2", 1, ["x", "z", "f", "x:z", "x:f", "z:f"]),
    ("x*z*f - x:z:f", 1, ["x", "z", "f", "x:z", "x:f", "z:f"]),
    ("x/f", 1, ["x", "x:f"]),
    ("f/x", 1, ["f", "f:x"]),
    ("x + f %in% h", 1, ["x", "f:h"]),
    ("x - 1", 0, ["x"]),
    ("0 + x:f", 0, ["x:f"]),
    ("-1 + x + 1", 1, ["x"]),
    ("(x+z)^3 - 1 + 0", 0, ["x", "z", "x:z"]),
    (
        "I(x^2) + log(x) + I(x*2.5) + I(x/2 - z) + I(-x) + I(x*0.0001) + I(x*1e5) + I(x*123456)",
        1,
        [
            "I(x^2)",
            "log(x)",
            "I(x * 2.5)",
            "I(x/2 - z)",
            "I(-x)",
            "I(x * 1e-04)",
            "I(x * 1e+05)",
            "I(x * 123456)",
        ],
    ),
]


@pytest.mark.parametrize(("rhs", "intercept", "labels"), R_TERM_LABELS)
def test_term_labels_and_order_are_rs(rhs, intercept, labels):
    terms = parse_terms(rhs)
    assert terms.intercept == bool(intercept)
    assert terms.labels() == labels


def test_double_bar_splits_like_expand_double_verts():
    assert uncorrelated_exprs("1 + x") == ["1", "0 + x"]
    assert uncorrelated_exprs("x * z") == ["1", "0 + x", "0 + z", "0 + x:z"]
    assert uncorrelated_exprs("0 + x + z") == ["0 + x", "0 + z"]
    assert uncorrelated_exprs("f") == ["1", "0 + f"]
    parsed = parse_formula("y ~ x + (x || g) + (1 | a/b/h)")
    assert [(b.expr, b.factor, b.correlated) for b in parsed.bars] == [
        ("1", "g", False),
        ("0 + x", "g", False),
        ("1", "h:(b:a)", True),
        ("1", "b:a", True),
        ("1", "a", True),
    ]


def test_varcorr_names_follow_make_names():
    assert make_names(["g", "g", "a"]) == ["g", "g.1", "a"]
    assert make_names(["b:a", "b:a", "h:(b:a)", "1x"]) == ["b.a", "b.a.1", "h..b.a.", "X1x"]


def test_numbers_print_as_r_prints_them():
    cases = {
        2.0: "2",
        2.5: "2.5",
        1e-4: "1e-04",
        1e5: "1e+05",
        123456.0: "123456",
        0.1 + 0.2: "0.3",
        -3.0: "-3",
        1000.0: "1000",
    }
    assert {v: r_number(v) for v in cases} == cases


def test_text_levels_sort_as_r_sorts_them():
    values = [
        "a_1",
        "a1",
        "a.1",
        "A1",
        "a-1",
        "10",
        "9",
        "Z",
        "z",
        "b",
        "B2",
        "b1",
        "Ab",
        "aB",
        "ab",
        "AB",
        "x y",
        "x_y",
        "xy",
        "x.y",
        "_a",
        "é",
        "e",
        "f",
        "ctl",
        "Control",
        "trt2",
        "trt10",
    ]
    # sort(values) in R 4.2.2 (ICU root collation, LC_COLLATE=C.UTF-8).
    r_sorted = [
        "_a",
        "10",
        "9",
        "a_1",
        "a-1",
        "a.1",
        "a1",
        "A1",
        "ab",
        "aB",
        "Ab",
        "AB",
        "b",
        "b1",
        "B2",
        "Control",
        "ctl",
        "e",
        "é",
        "f",
        "trt10",
        "trt2",
        "x y",
        "x_y",
        "x.y",
        "xy",
        "z",
        "Z",
    ]
    assert sorted(values, key=r_sort_key) == r_sorted
    labels, _ = r_level_labels(pd.Series(["B", "a", "c", "a"]))
    assert labels == ["a", "B", "c"]
    numeric, _ = r_level_labels(pd.Series([10, 2, 1, 2]))
    assert numeric == ["1", "2", "10"]


def test_interaction_without_margins_uses_rs_coding():
    data = features_data()
    # lme4::lFormula(y ~ f:h + (1 | g))$X: indicator-coded f within h, last cell dropped.
    design = build_design(ModelSpec("y ~ f:h + (1 | g)"), data)
    assert design.fixed_terms == ["(Intercept)", "fhi:ha", "flo:ha", "fmid:ha", "fhi:hb", "flo:hb"]
    assert design.dropped_columns == ["fmid:hb"]
    assert any("rank deficient" in n and "fmid:hb" in n for n in design.notes)
    # Without an intercept the first factor gets indicators, later ones contrasts.
    X = model_matrix(parse_terms("0 + x + f + h"), design.data.assign(x=data["x"]))
    assert list(X.columns) == ["x", "fhi", "flo", "fmid", "hb"]
    X = model_matrix(parse_terms("x + x:f"), design.data.assign(x=data["x"]))
    assert list(X.columns) == ["(Intercept)", "x", "x:flo", "x:fmid"]


def test_collinear_columns_follow_lme4s_pivoting():
    data = features_data()
    design = build_design(ModelSpec("y ~ x + z + xz + x2 + (1 | g)"), data)
    assert design.dropped_columns == ["xz", "x2"]
    assert design.fixed_terms == ["(Intercept)", "x", "z"]
    X = pd.DataFrame({"a": [1.0, 1, 1], "zero": [0.0, 0, 0], "b": [1.0, 2, 3]})
    assert collinear_columns(X) == ["zero"]


def test_lme4_block_order_and_labels():
    data = features_data()
    # nl = (4, 8, 8): lme4 reorders by rev(order(nl)), so tied blocks come in reverse order
    # and VarCorr calls the first 'g' block (0 + x) "g" and the intercept block "g.1".
    design = build_design(ModelSpec("y ~ x + (1 | a) + (1 | g) + (0 + x | g)"), data)
    assert [(b.label, b.terms) for b in design.blocks] == [
        ("g", ["x"]),
        ("g.1", ["(Intercept)"]),
        ("a", ["(Intercept)"]),
    ]
    # Already non-increasing: no reordering, labels in formula order.
    design = build_design(ModelSpec("y ~ x + (1 | g) + (0 + x | g) + (1 | a)"), data)
    assert [b.label for b in design.blocks] == ["g", "g.1", "a"]


def test_interaction_grouping_levels_follow_lme4():
    data = features_data()
    design = build_design(ModelSpec("y ~ x + (1 | c:a)"), data)
    (block,) = design.blocks
    # lme4's %i%: first factor's level order (numeric 1 < 2 < 3 < 10), then the second's.
    firsts = [lvl.split(":")[0] for lvl in block.levels]
    assert firsts == sorted(firsts, key=int)
    assert block.levels[0] == "1:A1"


def test_single_observation_group_with_slope_is_noted():
    data = features_data()
    data.loc[0, "g"] = "lonely"
    design = build_design(ModelSpec("y ~ x + (1 + x | g)"), data)
    assert any("single observation" in n and "lonely" in n for n in design.notes)


@pytest.mark.parametrize(
    ("formula", "message"),
    [
        ("y ~ x + offset(z) + (1 | g)", "offset"),
        ("y ~ poly(x, 2) + (1 | g)", "poly"),
        ("y ~ bs(x) + (1 | g)", "spline"),
        ("y ~ ns(x) + (1 | g)", "spline"),
        ("cbind(y, z) ~ x + (1 | g)", "binomial"),
        ("y ~ . + (1 | g)", "'.'"),
        ("y ~ `my x` + (1 | g)", "back-quoted"),
        ("y ~ foo(x) + (1 | g)", r"function foo\(\) is not supported"),
        ("y ~ factor(c) + (1 | g)", r"factor\(\)"),
        ("y ~ x %o% z + (1 | g)", "not supported"),
        ("y ~ 2 + x + (1 | g)", "only 0, 1 and -1"),
        ("y ~ x + (1 | g) + (x | log(g))", "column names"),
        ("y ~ x ~ z", "more than one"),
    ],
)
def test_out_of_scope_formulas_are_refused(formula, message):
    with pytest.raises(ValueError, match=message):
        parse_formula(formula)


def test_arithmetic_needs_numeric_columns():
    with pytest.raises(ValueError, match="I\\(f\\^2\\) uses column 'f', which is not numeric"):
        build_design(ModelSpec("y ~ I(f^2) + (1 | g)"), features_data())
    with pytest.raises(ValueError, match="log\\(z\\) is not finite"):
        build_design(ModelSpec("y ~ log(z) + (1 | g)"), features_data())


# --------------------------------------------------------------------------- against lme4::lFormula

FEATURES = {
    "intercept per group": "y ~ x + (1 | g)",
    "correlated slope": "y ~ 1 + x + (1 + x | g)",
    "uncorrelated slope": "y ~ x + (1 + x || g)",
    "several slopes": "y ~ x + z + (1 + x + z | g)",
    "crossed": "y ~ x + (1 | a) + (1 | b)",
    "nested a/b": "y ~ x + (1 | a/b)",
    "nested a/b/h": "y ~ x + (1 | a/b/h)",
    "interaction factor a:b": "y ~ x + (1 | a:b)",
    "numeric-coded a:b": "y ~ x + (1 | c:a)",
    "numeric-coded factor": "y ~ x + (1 | c)",
    "x:z": "y ~ x:z + (1 | g)",
    "x*z": "y ~ x * z + (1 | g)",
    "z:x + x (R reorders)": "y ~ z:x + x + (1 | g)",
    "0 +": "y ~ 0 + x + (1 | g)",
    "-1": "y ~ x - 1 + (1 | g)",
    "intercept only": "y ~ 1 + (1 | g)",
    "categorical 3 levels": "y ~ f + (1 | g)",
    "categorical no intercept": "y ~ 0 + f + h + (1 | g)",
    "categorical x categorical": "y ~ f * h + (1 | g)",
    "f:h without margins": "y ~ f:h + (1 | g)",
    "0 + f:h": "y ~ 0 + f:h + (1 | g)",
    "numeric x categorical": "y ~ x * f + (1 | g)",
    "x + x:f": "y ~ x + x:f + (1 | g)",
    "f:x": "y ~ f:x + (1 | g)",
    "f/x": "y ~ f/x + (1 | g)",
    "(x + z + f)^2": "y ~ (x + z + f)^2 + (1 | g)",
    "I(x^2)": "y ~ x + I(x^2) + (1 | g)",
    "calls": "y ~ log(pos) + I(x * 2.5) + I(x/2 - z) + sqrt(pos) + (1 | g)",
    "logical": "y ~ flag + (1 | g)",
    "mixed-case levels": "y ~ k + (1 | g)",
    "factor slope": "y ~ x + (f | g)",
    "0 + factor slope": "y ~ x + (0 + f | g)",
    "factor ||": "y ~ x + (f || g)",
    "x*z ||": "y ~ x + (x * z || g)",
    "ties reordered": "y ~ x + (1 | a) + (1 | g) + (0 + x | g)",
    "four factors": "y ~ x + (1 | h) + (1 | a) + (1 | b) + (1 | g)",
    "two slopes two factors": "y ~ x + (1 + x | g) + (1 + z | a)",
    "collinear": "y ~ x + z + xz + x2 + (1 | g)",
}


@pytest.fixture(scope="module")
def data():
    return features_data()


@pytest.mark.r
@pytest.mark.parametrize("formula", list(FEATURES.values()), ids=list(FEATURES))
def test_design_equals_lformula(formula, data):
    from harness.engines.lme4 import lformula

    spec = ModelSpec(formula)
    design = build_design(spec, data)
    lf = lformula(spec, data)
    assert [str(n) for n in np.atleast_1d(lf["X_names"])] == design.fixed_terms
    np.testing.assert_allclose(np.asarray(lf["X"]).reshape(design.X.shape), design.X.to_numpy())
    Z = design.Z().toarray()
    np.testing.assert_allclose(np.asarray(lf["Z"]).reshape(Z.shape), Z)
    assert [str(n) for n in np.atleast_1d(lf["Z_names"])] == [
        lvl for _, lvl, _ in design.Z_columns()
    ]
    flist = [str(n) for n in np.atleast_1d(lf["flist_names"])]
    assert flist == list(dict.fromkeys(b.factor for b in design.blocks))
    # cnms comes back as a dict, so a factor's last block wins (R's list keeps them all).
    last_terms = {b.factor: b.terms for b in design.blocks}
    for factor, terms in lf["cnms"].items():
        assert [str(t) for t in np.atleast_1d(terms)] == last_terms[factor], factor


@pytest.mark.r
def test_block_labels_and_terms_match_an_lme4_fit(data):
    import harness as hz

    spec = ModelSpec("y ~ x + k + (1 | a) + (1 | g) + (0 + x | g) + (1 | b:a)")
    fit = hz.fit_lme4(spec, data, n_sims=0)
    design = fit.design
    sds = fit.variance[fit.variance["kind"] == "sd"]
    assert list(zip(sds["group_factor"], sds["term"], strict=True)) == [
        (b.label, t) for b in design.blocks for t in b.terms
    ]
    ours = {(b.factor, lvl, t) for b in design.blocks for lvl in b.levels for t in b.terms}
    theirs = set(zip(fit.ranef["group_factor"], fit.ranef["group"], fit.ranef["term"], strict=True))
    assert ours == theirs
    assert list(fit.fixed["term"]) == design.fixed_terms == ["(Intercept)", "x", "kB", "kc"]
