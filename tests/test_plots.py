"""Figures: built from a real small fit's tables, labelled, legible, greyscale-safe."""

from __future__ import annotations

import colorsys
import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure

from harness.pipeline.runner import DesignResult, fit_design
from harness.pipeline.settings import FitSettings
from harness.report import plots
from harness.report import tables as rt
from harness.report.page import render_figures

#: The default test run's one small fit (shared with test_report/test_runner/test_browser
#: through the runner's disk cache in the session's temp folder).
REPORT_SETTINGS = FitSettings(draws=500, tune=500, chains=2, n_sims=200, max_rounds=1)


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> DesignResult:
    return fit_design(
        "sleepstudy",
        seed=1,
        cache_dir=tmp_path_factory.getbasetemp() / "harness-cache",
        settings=REPORT_SETTINGS,
        render=render_figures,
    )


def _draw(fig: Figure) -> object:
    FigureCanvasAgg(fig)
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def _visible_axes(fig: Figure) -> list:
    return [ax for ax in fig.axes if ax.get_visible() and ax.get_label() != "<colorbar>"]


def _no_overlap(labels: list, renderer: object) -> bool:
    boxes = sorted(
        (t.get_window_extent(renderer) for t in labels if t.get_text()), key=lambda b: b.y0
    )
    return all(a.y1 <= b.y0 + 0.5 for a, b in itertools.pairwise(boxes))


def luminance(color: str) -> float:
    r, g, b = to_rgb(color)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


# --------------------------------------------------------------------------- no fit needed


def test_engines_stay_apart_in_greyscale() -> None:
    styles = [plots.LME4, plots.PYMC, plots.UNPOOLED]
    greys = sorted(luminance(s["color"]) for s in styles)
    assert min(np.diff(greys)) > 0.2  # black, mid grey, light grey once printed
    assert len({s["marker"] for s in styles}) == 3 and len({s["linestyle"] for s in styles}) == 3
    # and distinct hues on screen
    hues = {round(colorsys.rgb_to_hsv(*to_rgb(s["color"]))[0], 2) for s in styles[1:]}
    assert len(hues) == 2


@pytest.mark.parametrize("n_groups", [18, 100])
def test_caterpillar_group_names_stay_legible(n_groups: int) -> None:
    rng = np.random.default_rng(1)
    groups = [f"subject-{i:03d}" for i in range(n_groups)]
    coef = rng.normal(250, 30, n_groups)
    table = pd.DataFrame(
        {
            "group_factor": "Subject",
            "group": groups,
            "term": "(Intercept)",
            "n_obs": 10,
            "fixed": 250.0,
            "lme4_coef": coef,
            "lme4_lower": coef - 20,
            "lme4_upper": coef + 20,
            "pymc_mean": coef + 1,
            "pymc_lower": coef - 25,
            "pymc_upper": coef + 25,
        }
    )
    fig = plots.caterpillar(table, "Subject", {"(Intercept)": "ms"})
    assert fig.get_size_inches()[1] >= 0.2 * n_groups
    renderer = _draw(fig)
    (ax,) = _visible_axes(fig)
    labels = ax.get_yticklabels()
    assert [t.get_text() for t in labels] == list(table.sort_values("lme4_coef")["group"])
    assert min(t.get_fontsize() for t in labels) >= 7
    assert _no_overlap(labels, renderer)
    assert ax.get_xlabel() == "(Intercept) coefficient (ms)"


def test_z_matrix_picture_shape() -> None:
    import harness as hz
    from harness.model.spec import build_design

    data, spec = hz.datasets.load("partially_clustered")
    design = build_design(spec, data)
    fig = plots.z_matrix(design.Z(), design.Z_column_names())
    ax = _visible_axes(fig)[0]
    assert ax.images[0].get_array().shape == (design.n, 110)
    assert "110 columns" in ax.get_xlabel() and "observation" in ax.get_ylabel()


def _legend_wider_than_figure() -> Figure:
    """A constrained-layout figure whose figure legend sticks out on both sides."""
    fig = plots._fig(3.0, 2.5)
    axes = fig.subplots(1, 2, sharey=True)
    for k, ax in enumerate(axes):
        ax.plot([0, 1, 2], [k, 2 * k, 1], label=f"a rather long legend entry number {k}")
        ax.set_title(f"panel {k}")
    fig.legend(loc="outside lower center", ncols=2, frameon=False)
    fig.suptitle("a suptitle above the panels")
    fig.supylabel("a label for both")
    return fig


def test_inline_image_is_what_a_tight_savefig_draws() -> None:
    import base64
    import io

    from PIL import Image

    from harness.report.html import PAD_INCHES, figure_to_data_uri

    image = figure_to_data_uri(_legend_wider_than_figure())
    buffer = io.BytesIO()
    _legend_wider_than_figure().savefig(
        buffer,
        format="png",
        dpi=110,
        bbox_inches="tight",
        pad_inches=PAD_INCHES,
        facecolor="white",
        metadata={"Software": None},
    )
    # Laid out once and its box taken from the layout, not measured inside savefig: the
    # same pixels, the overhanging legend kept, the suptitle and supylabel edges exact;
    # written without the alpha channel of an opaque figure.
    inline = Image.open(io.BytesIO(base64.b64decode(image["uri"].split(",", 1)[1])))
    assert inline.mode == "RGB"
    saved = np.asarray(Image.open(buffer).convert("RGBA"))
    assert np.all(saved[..., 3] == 255)
    np.testing.assert_array_equal(np.asarray(inline), saved[..., :3])
    assert image["width"] > 300 + 10


def _predictive_table(n_groups: int, xs: list[float]) -> pd.DataFrame:
    rng = np.random.default_rng(5)
    rows = []
    for g in range(n_groups):
        for x in xs:
            for _ in range(3):
                mu = 10 * g + 2 * x
                rows.append(
                    {
                        "group_factor": "g",
                        "group": f"g{g}",
                        "x": x,
                        "y": mu + rng.normal(),
                        "lme4_fit": mu,
                        "pymc_mu": mu + 0.1,
                        "pymc_lower": mu - 2,
                        "pymc_upper": mu + 2,
                    }
                )
    return pd.DataFrame(rows)


def test_predictive_panels_share_limits_and_outer_labels() -> None:
    table = _predictive_table(8, [0.0, 1.0, 2.0])  # 6 + 2 panels
    fig = plots.predictive_panels(table, "x", "y")
    _draw(fig)
    axes = _visible_axes(fig)
    assert len(axes) == 8
    assert len({ax.get_xlim() for ax in axes}) == 1 and len({ax.get_ylim() for ax in axes}) == 1
    low, high = axes[0].get_ylim()
    assert low < table["pymc_lower"].min() and high > table["pymc_upper"].max()
    for i, ax in enumerate(axes):
        y_labels = [t for t in ax.get_yticklabels() if t.get_visible() and t.get_text()]
        x_labels = [t for t in ax.get_xticklabels() if t.get_visible() and t.get_text()]
        assert bool(y_labels) == (i % 6 == 0)  # first column only
        assert bool(x_labels) == (i >= 2)  # the lowest panel of each column
    # Groups observed at one covariate value: every panel shows that value alone.
    single = plots.predictive_panels(_predictive_table(3, [1.0]), "x", "y")
    assert {ax.get_xlim() for ax in _visible_axes(single)} == {(0.6, 1.4)}
    # No group with two observations: a figure that says so, not an error.
    empty = plots.predictive_panels(_predictive_table(2, [1.0]).drop_duplicates("group"), "x", "y")
    assert "0 of 2 groups" in empty.get_suptitle()


def test_panel_rows_follow_first_appearance_and_skip_groups_of_one() -> None:
    from harness.model.spec import ModelSpec, build_design

    frame = pd.DataFrame(
        {
            "g": ["c", "c", "a", "b", "b", "d", "d", "a", "e", "e"],
            "x": np.arange(10.0),
            "y": np.random.default_rng(0).normal(size=10),
        }
    )
    frame.loc[2, "g"] = "z"  # "z" has one row; "a" then has one too (row 7)
    design = build_design(ModelSpec("y ~ x + (1 | g)"), frame)
    rows = rt.panel_rows(design, max_groups=2)
    assert list(frame.loc[rows, "g"]) == ["c", "c", "b", "b"]
    assert list(rt.panel_rows(design)) == list(range(10))
    assert rt.panel_counts(design) == {"groups": 6, "single_observation_groups": 2}


# --------------------------------------------------------------------------- from a real fit


@pytest.mark.r
@pytest.mark.sampling
def test_forest_plot(result: DesignResult) -> None:
    units = {t: rt.coefficient_unit(t, result.design) for t in result.design.fixed_terms}
    assert units == {"(Intercept)": "ms", "Days": "ms per day"}
    fig = plots.forest_plot(result.comparison.fixed, units)
    axes = _visible_axes(fig)
    assert len(axes) == 2
    assert [ax.get_xlabel() for ax in axes] == ["(Intercept) (ms)", "Days (ms per day)"]
    for ax, row in zip(axes, result.comparison.fixed.to_dict("records"), strict=True):
        low, high = ax.get_xlim()
        assert low <= min(row["lme4_lower"], row["pymc_lower"]) and high >= max(
            row["lme4_upper"], row["pymc_upper"]
        )
        assert {t.get_text() for t in ax.get_yticklabels()} == {
            "lme4: estimate, 95% CI",
            "PyMC: mean, 95% HDI",
        }


@pytest.mark.r
@pytest.mark.sampling
def test_random_effects_scatter_and_caterpillar(result: DesignResult) -> None:
    cmp = result.comparison
    fig = plots.ranef_scatter(cmp.offsets, "Subject", {"(Intercept)": "ms", "Days": "ms per day"})
    axes = _visible_axes(fig)
    assert [ax.get_title() for ax in axes] == [
        "Subject: (Intercept)  (18 groups)",
        "Subject: Days  (18 groups)",
    ]
    assert axes[0].get_xlabel() == "lme4 conditional mode (ms)"
    assert axes[1].get_ylabel() == "PyMC posterior mean offset (ms per day)"
    named = {t.get_text() for t in axes[0].texts}
    assert named and named <= set(cmp.offsets["group"])  # outliers carry group names
    coefs = rt.group_coefficients(cmp, result.bayes)
    # lme4's coefficient is fixed + mode, as coef() gives it.
    row = coefs[(coefs["group"] == "308") & (coefs["term"] == "Days")].iloc[0]
    fixed = float(cmp.fixed.set_index("term").loc["Days", "lme4_estimate"])
    mode = float(cmp.offsets.set_index(["group", "term"]).loc[("308", "Days"), "lme4_mode"])
    assert row["lme4_coef"] == pytest.approx(fixed + mode)
    assert row["pymc_lower"] < row["pymc_mean"] < row["pymc_upper"]
    fig = plots.caterpillar(coefs, "Subject", {"(Intercept)": "ms", "Days": "ms per day"})
    renderer = _draw(fig)
    for ax in _visible_axes(fig):
        assert len(ax.get_yticklabels()) == 18 and _no_overlap(ax.get_yticklabels(), renderer)


@pytest.mark.r
@pytest.mark.sampling
def test_variance_components_figure(result: DesignResult) -> None:
    cmp = result.comparison
    draws = rt.variance_draws(result.bayes, cmp.variance)
    assert set(draws["component"]) == set(cmp.variance["component"])
    ml = rt.ml_variance(result.freq, result.design)
    # ML SDs are smaller than REML's (published: 23.78 vs 24.74 for the intercept SD).
    assert ml["Subject: sd((Intercept))"] == pytest.approx(23.78, abs=0.01)
    assert ml["sigma"] == pytest.approx(25.59, abs=0.01)
    fig = plots.variance_density(draws, cmp.variance, ml, {"sigma": "ms"}, "REML")
    axes = _visible_axes(fig)
    assert len(axes) == len(cmp.variance)
    sigma_ax = axes[list(cmp.variance["component"]).index("sigma")]
    assert sigma_ax.get_xlabel() == "sigma (ms)"
    estimate = float(cmp.variance.set_index("component").loc["sigma", "lme4_estimate"])
    assert any(np.allclose(line.get_xdata(), estimate) for line in sigma_ax.lines)


@pytest.mark.r
@pytest.mark.sampling
def test_shrinkage_figure(result: DesignResult) -> None:
    coefs = rt.group_coefficients(result.comparison, result.bayes)
    (shrink,) = rt.shrinkage(result.comparison, coefs, result.design)
    assert shrink.note == "" and shrink.table["unpooled"].notna().all()
    # No pooling for subject 308 is its own least-squares line.
    rows = result.design.data["Subject"] == "308"
    slope, intercept = np.polyfit(result.design.data.loc[rows, "Days"], result.design.y[rows], 1)
    own = shrink.table.set_index(["group", "term"])["unpooled"]
    assert own[("308", "Days")] == pytest.approx(slope) and own[
        ("308", "(Intercept)")
    ] == pytest.approx(intercept)
    fig = plots.shrinkage_plot(shrink, {"(Intercept)": "ms", "Days": "ms per day"})
    (ax,) = _visible_axes(fig)
    arrows = [c for c in ax.texts if getattr(c, "arrow_patch", None) is not None]
    assert len(arrows) == 2 * 18  # one to each engine's estimate per subject
    assert ax.get_xlabel() == "(Intercept) coefficient (ms)"


@pytest.mark.r
@pytest.mark.sampling
def test_predictive_and_new_group_figures(result: DesignResult) -> None:
    cmp, design = result.comparison, result.design
    pred = rt.predictive_table(cmp, result.bayes, design)
    assert len(pred) == design.n and (pred["pymc_lower"] < pred["pymc_upper"]).all()
    inside = ((pred["y"] >= pred["pymc_lower"]) & (pred["y"] <= pred["pymc_upper"])).mean()
    assert 0.85 < inside <= 1.0  # a 95% predictive interval covers most observations
    fig = plots.predictive_panels(pred, "Days (days)", "Reaction (ms)")
    axes = _visible_axes(fig)
    assert [ax.get_title() for ax in axes] == list(design.blocks[0].levels)
    new = rt.new_group_table(cmp, result.bayes, design)
    assert list(new["x"]) == list(range(10))
    # A new subject is far less certain than a known one.
    assert (new["pymc_upper"] - new["pymc_lower"]).min() > (
        pred["pymc_upper"] - pred["pymc_lower"]
    ).max()
    fig = plots.new_group_plot(new, "Reaction (ms)")
    assert _visible_axes(fig)[0].get_ylabel() == "Reaction (ms)"
    # Only the rows the panels show, with the counts of every group for the title.
    few = rt.predictive_table(cmp, result.bayes, design, max_groups=5)
    first = list(design.blocks[0].levels[:5])
    assert list(dict.fromkeys(few["group"])) == first and len(few) == 5 * 10
    full = pred.set_index("row").loc[few["row"]]
    np.testing.assert_allclose(few["lme4_fit"], full["lme4_fit"], rtol=1e-12)
    np.testing.assert_allclose(few["pymc_mu"], full["pymc_mu"], rtol=1e-12)
    title = plots.predictive_panels(few, "Days (days)", "Reaction (ms)", max_panels=5)
    assert title.get_suptitle() == "5 of 18 groups of Subject (first 5 shown)"


@pytest.mark.r
@pytest.mark.sampling
def test_rank_plot(result: DesignResult, tmp_path: Path) -> None:
    draws = rt.rank_draws(result.bayes)
    assert "corr_Subject[Days,(Intercept)]" in set(draws["parameter"])
    assert not draws["parameter"].str.contains(r"\(Intercept\),\(Intercept\)").any()  # no diagonal
    fig = plots.rank_plot(draws)
    assert len(_visible_axes(fig)) == draws["parameter"].nunique()
    fig.savefig(tmp_path / "rank.png")
    assert (tmp_path / "rank.png").stat().st_size > 5000


def test_caterpillar_of_thousands_of_groups_shows_a_labelled_selection() -> None:
    n_groups = 3000
    rng = np.random.default_rng(2)
    coef = rng.normal(0, 1, n_groups)
    table = pd.DataFrame(
        {
            "group_factor": "s",
            "group": [f"s{i}" for i in range(n_groups)],
            "term": "(Intercept)",
            "n_obs": 5,
            "fixed": 0.0,
            "lme4_coef": coef,
            "lme4_lower": coef - 1,
            "lme4_upper": coef + 1,
            "pymc_mean": coef,
            "pymc_lower": coef - 1,
            "pymc_upper": coef + 1,
        }
    )
    fig = plots.caterpillar(table, "s")
    (ax,) = _visible_axes(fig)
    labels = [t.get_text() for t in ax.get_yticklabels()]
    ordered = list(table.sort_values("lme4_coef")["group"])
    assert len(labels) == plots.MAX_GROUP_ROWS
    assert labels[0] == ordered[0] and labels[-1] == ordered[-1]
    assert f"of {n_groups} groups" in ax.get_title()
