"""Figures on edge cases, built from hand-made tables (no fit, no sampling).

Every figure either draws or raises an exception; the report turns an
exception into a note in the figure's place (tests/test_report_robust.py).
An estimate outside its own interval, NaN bounds, one group, NaN modes, a
constant term and empty tables are what real fits produce now and then
(issue 20: a profile interval that misses lme4's own estimate crashed a
report with "'xerr' must not contain negative values").
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from harness.report import plots
from harness.report.tables import Shrinkage

NAN = float("nan")


def _draw(fig: Figure) -> Figure:
    FigureCanvasAgg(fig)
    fig.canvas.draw()
    return fig


def _texts(fig: Figure) -> list[str]:
    return [t.get_text() for ax in fig.axes for t in ax.texts]


# --------------------------------------------------------------------------- tables


def _fixed(rows: list[tuple[float, float, float, float, float, float]]) -> pd.DataFrame:
    columns = [
        "lme4_estimate",
        "lme4_lower",
        "lme4_upper",
        "pymc_mean",
        "pymc_lower",
        "pymc_upper",
    ]
    table = pd.DataFrame(rows, columns=columns)
    table.insert(0, "term", [f"t{i}" for i in range(len(rows))])
    return table


def _variance(rows: list[dict[str, object]]) -> pd.DataFrame:
    base = {"lme4_ci_method": "profile"}
    return pd.DataFrame([{**base, **r} for r in rows])


def _offsets(modes: list[float], condsd: list[float], n_obs: int = 5) -> pd.DataFrame:
    n = len(modes)
    return pd.DataFrame(
        {
            "group_factor": "g",
            "group": [f"g{i}" for i in range(n)],
            "term": "(Intercept)",
            "n_obs": n_obs,
            "lme4_mode": modes,
            "lme4_condsd": condsd,
            "pymc_mean": np.asarray(modes, float) + 0.1,
            "pymc_sd": 0.5,
        }
    )


def _coefs(n: int, lower_shift: float = -1.0, fixed: float = 2.0) -> pd.DataFrame:
    coef = np.linspace(0, 1, n)
    return pd.DataFrame(
        {
            "group_factor": "g",
            "group": [f"g{i}" for i in range(n)],
            "term": "(Intercept)",
            "n_obs": 4,
            "fixed": fixed,
            "lme4_coef": coef,
            "lme4_lower": coef + lower_shift,
            "lme4_upper": coef + 1,
            "pymc_mean": coef,
            "pymc_lower": coef - 1,
            "pymc_upper": coef + 1,
        }
    )


def _predictive(n_groups: int, xs: list[float], mu_shift: float = 0.0) -> pd.DataFrame:
    rows = []
    for g in range(n_groups):
        for x in xs:
            rows.append(
                {
                    "group_factor": "g",
                    "group": f"g{g}",
                    "x": x,
                    "y": x + g,
                    "lme4_fit": x + g,
                    "pymc_mu": x + g + mu_shift,
                    "pymc_lower": x + g - 1,
                    "pymc_upper": x + g + 1,
                }
            )
    return pd.DataFrame(rows)


def _new_group(lower: list[float], mean: list[float], upper: list[float]) -> pd.DataFrame:
    n = len(mean)
    return pd.DataFrame(
        {
            "profile": [f"p{i}" for i in range(n)],
            "lme4_mean": mean,
            "lme4_lower": lower,
            "lme4_upper": upper,
            "pymc_mean": mean,
            "pymc_lower": np.asarray(mean, float) - 1,
            "pymc_upper": np.asarray(mean, float) + 1,
        }
    )


# --------------------------------------------------------------------------- intervals


def test_intervals_draw_a_point_outside_its_interval_and_mark_undefined_ones() -> None:
    fig = plots._fig(4, 3)
    ax = fig.subplots()
    # the estimate above its interval (a negative width for errorbar), NaN bounds, a NaN point
    marked = plots.intervals(
        ax,
        [0, 1, 2, 3, 4],
        [5.0, 1.0, 1.0, NAN, 2.0],
        [1.0, NAN, 0.0, 0.0, 3.0],
        [2.0, 2.0, 2.0, 1.0, 1.0],  # the last row's bounds come in the wrong order
        plots.LME4,
    )
    _draw(fig)
    assert list(marked) == [True, True, False, True, False]
    assert _texts(fig) == [
        "estimate outside its interval",
        "interval undefined",
        "estimate undefined",
    ]
    # what is defined is drawn: the three pairs of bounds and four points
    segments = ax.collections[0].get_segments()
    assert len(segments) == 4
    assert sorted(tuple(s[:, 0]) for s in segments)[0] == (0.0, 1.0)


def test_forest_plot_with_a_point_outside_its_interval_and_nan_bounds() -> None:
    fixed = _fixed(
        [
            (5.0, 1.0, 2.0, 1.5, 1.0, 2.0),  # lme4's estimate right of its own interval
            (1.0, NAN, NAN, 1.0, 0.5, 1.5),  # lme4 gave no interval
            (NAN, NAN, NAN, NAN, NAN, NAN),  # nothing defined
            (3.0, 3.0, 3.0, 3.0, 3.0, 3.0),  # zero widths
        ]
    )
    fig = _draw(plots.forest_plot(fixed, {"t0": "cm"}))
    texts = _texts(fig)
    assert "estimate outside its interval" in texts
    assert "interval undefined" in texts
    assert "estimate undefined" in texts


def test_variance_density_with_an_estimate_outside_its_profile_interval() -> None:
    rng = np.random.default_rng(1)
    variance = _variance(
        [
            {  # lme4's correlation below its own profile interval (the Sitka crash)
                "component": "g: cor((Intercept),x)",
                "kind": "cor",
                "lme4_estimate": -0.2,
                "lme4_lower": 0.1,
                "lme4_upper": 0.6,
                "pymc_median": 0.3,
                "pymc_lower": 0.0,
                "pymc_upper": 0.5,
            },
            {  # a constant posterior (all draws equal) and NaN bounds on both sides
                "component": "g: sd(x)",
                "kind": "sd",
                "lme4_estimate": 0.0,
                "lme4_lower": NAN,
                "lme4_upper": NAN,
                "pymc_median": 1.0,
                "pymc_lower": NAN,
                "pymc_upper": 1.0,
            },
            {  # NaN everywhere, no draws at all
                "component": "sigma",
                "kind": "sigma",
                "lme4_estimate": NAN,
                "lme4_lower": NAN,
                "lme4_upper": NAN,
                "pymc_median": NAN,
                "pymc_lower": NAN,
                "pymc_upper": NAN,
            },
        ]
    )
    draws = pd.concat(
        [
            pd.DataFrame({"component": "g: cor((Intercept),x)", "value": rng.uniform(0, 0.6, 400)}),
            pd.DataFrame({"component": "g: sd(x)", "value": np.ones(400)}),
        ]
    )
    fig = _draw(plots.variance_density(draws, variance, {"sigma": NAN}, {}, "REML"))
    texts = _texts(fig)
    assert "estimate outside its interval" in texts
    assert "interval undefined" in texts  # PyMC's half-defined HDI
    assert "estimate undefined" in texts


def test_ranef_scatter_with_nan_modes_negative_sds_and_a_single_group() -> None:
    _draw(plots.ranef_scatter(_offsets([0.5, NAN, -0.2], [0.1, 0.2, -1.0]), "g"))
    _draw(plots.ranef_scatter(_offsets([0.5], [0.1]), "g"))  # one group
    _draw(plots.ranef_scatter(_offsets([0.0, 0.0, 0.0], [0.0, 0.0, 0.0]), "g"))  # constant, SD 0
    nothing = _offsets([NAN, NAN], [NAN, NAN])
    nothing["pymc_mean"] = NAN
    nothing["pymc_sd"] = NAN
    with pytest.raises(plots.FigureDataError, match="no defined mode"):
        plots.ranef_scatter(nothing, "g")
    with pytest.raises(plots.FigureDataError, match="no group of g has data"):
        plots.ranef_scatter(_offsets([0.5], [0.1], n_obs=0), "g")


def test_caterpillar_with_inverted_intervals_nan_fixed_effect_and_one_group() -> None:
    _draw(plots.caterpillar(_coefs(5, lower_shift=2.0), "g"))  # lower above the estimate
    _draw(plots.caterpillar(_coefs(1, fixed=NAN), "g"))
    with pytest.raises(plots.FigureDataError):
        plots.caterpillar(_coefs(0), "g")


def test_shrinkage_with_nan_covariance_and_one_group() -> None:
    table = pd.DataFrame(
        {
            "group": ["a", "a", "b", "b"],
            "term": ["(Intercept)", "x"] * 2,
            "n_obs": 3,
            "unpooled": [1.0, 0.5, NAN, NAN],
            "lme4": [0.8, 0.4, 0.1, 0.0],
            "pymc": [0.7, 0.3, 0.1, 0.0],
        }
    )
    shrink = Shrinkage(
        factor="g",
        terms=["(Intercept)", "x"],
        table=table,
        population={"(Intercept)": 0.5, "x": NAN},
        covariance=np.array([[1.0, NAN], [NAN, 0.0]]),
        note="",
    )
    _draw(plots.shrinkage_plot(shrink))
    one_term = Shrinkage("g", ["(Intercept)"], table[table["term"] == "(Intercept)"], {}, None, "")
    _draw(plots.shrinkage_plot(one_term))


def test_predictive_panels_with_a_mean_outside_its_interval() -> None:
    # a mean outside its own predictive interval at a single covariate value
    fig = _draw(plots.predictive_panels(_predictive(3, [1.0, 1.0], mu_shift=5.0), "x", "y"))
    assert "estimate outside its interval" in _texts(fig)
    _draw(plots.predictive_panels(_predictive(1, [0.0, 1.0], mu_shift=5.0), "x", "y"))
    with pytest.raises(plots.FigureDataError, match="no observations"):
        plots.predictive_panels(_predictive(0, [1.0]), "x", "y")


def test_new_group_plot_with_negative_widths_and_nan_bounds() -> None:
    fig = _draw(
        plots.new_group_plot(_new_group([2.0, NAN, 0.0], [1.0, 1.0, 1.0], [3.0, NAN, 2.0]), "y")
    )
    assert {"estimate outside its interval", "interval undefined"} <= set(_texts(fig))
    with pytest.raises(plots.FigureDataError):
        plots.new_group_plot(_new_group([], [], []), "y")


def test_rank_plot_of_a_constant_term_and_nan_draws() -> None:
    n = 200
    draws = pd.DataFrame(
        {
            "parameter": ["constant"] * (2 * n) + ["with nan"] * (2 * n),
            "chain": np.tile(np.repeat([0, 1], n), 2),
            "draw": np.tile(np.arange(n), 4),
            "value": np.r_[np.ones(2 * n), np.where(np.arange(2 * n) % 7 == 0, NAN, 1.0)],
        }
    )
    _draw(plots.rank_plot(draws))
    with pytest.raises(plots.FigureDataError):
        plots.rank_plot(draws.iloc[:0])


def test_z_matrix_without_columns_says_so() -> None:
    with pytest.raises(plots.FigureDataError, match="shape 5 x 0"):
        plots.z_matrix(np.zeros((5, 0)), [])
    _draw(plots.z_matrix(np.ones((3, 1)), ["g:a:(Intercept)"]))  # a single group


def test_empty_tables_raise_clear_errors() -> None:
    with pytest.raises(plots.FigureDataError, match="no fixed effects"):
        plots.forest_plot(_fixed([]))
    with pytest.raises(plots.FigureDataError, match="no variance components"):
        plots.variance_density(pd.DataFrame(columns=["component", "value"]), _variance([]))


def test_new_group_mean_is_the_mean_through_the_link_not_the_median():
    """lme4's new-group mean for a log link is exp(eta + sd^2/2), not exp(eta) (the median)."""
    from scipy import special

    from harness.report.tables import new_group_mean

    eta, sd = np.array([1.0, 2.0, 0.5]), np.array([0.9, 0.0, 0.3])
    np.testing.assert_allclose(new_group_mean(np.exp, eta, sd), np.exp(eta + sd**2 / 2), rtol=1e-10)
    np.testing.assert_allclose(new_group_mean(lambda e: e, eta, sd), eta, rtol=1e-13)
    # logit: the mean moves toward 1/2 as the group effect's SD grows.
    p = new_group_mean(special.expit, np.array([2.0, 2.0]), np.array([0.0, 2.0]))
    assert p[0] == pytest.approx(special.expit(2.0)) and 0.5 < p[1] < p[0]
