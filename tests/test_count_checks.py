"""Count checks (issue 23): frequency bins, rootogram and dispersion tables, the figure, the page.

The tables are checked on exact posterior draws: a Poisson model with one
rate per group under a Gamma(1/2, 0) prior has the conjugate posterior
Gamma(sum y + 1/2, rate = group size), so no sampler is needed to see
whether overdispersed counts fitted as Poisson get a small p-value while
Poisson counts (the negative control) do not.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from harness.checks.dispersion import count_bins, dispersion_table, rootogram_table
from harness.model.family import get_family
from harness.report.plots import FigureDataError
from harness.report.rootogram import rootogram_figure

POISSON = get_family("poisson")
GROUPS, PER_GROUP = 20, 15


def conjugate_fit(
    y: np.ndarray, groups: np.ndarray, rng: np.random.Generator, draws: int = 400
) -> tuple[np.ndarray, np.ndarray]:
    """Per-group Poisson rates: the ML means per observation and exact posterior draws of them."""
    n_groups = int(groups.max()) + 1
    sums = np.bincount(groups, y, n_groups)
    sizes = np.bincount(groups, minlength=n_groups)
    rates = rng.gamma(sums + 0.5, 1 / sizes, size=(draws, n_groups))
    return (sums / sizes)[groups], rates[:, groups]


def simulated(rng: np.random.Generator, overdispersed: bool) -> tuple[np.ndarray, np.ndarray]:
    groups = np.repeat(np.arange(GROUPS), PER_GROUP)
    rate = np.exp(1.0 + rng.normal(0, 0.5, GROUPS))[groups]
    if overdispersed:  # negative binomial, size 2: variance mu + mu^2 / 2
        return rng.negative_binomial(2, 2 / (2 + rate)).astype(float), groups
    return rng.poisson(rate).astype(float), groups


# --------------------------------------------------------------------------- bins


def _assert_cover(bins: pd.DataFrame) -> None:
    assert bins["lower"].iloc[0] == 0 and np.isinf(bins["upper"].iloc[-1])
    assert np.all(bins["lower"].to_numpy()[1:] == bins["upper"].to_numpy()[:-1] + 1)


def test_bins_of_all_zeros_and_of_one_value():
    zeros = count_bins(np.zeros(7))
    assert list(zeros["label"]) == ["0", "≥1"]
    single = count_bins(np.full(5, 3.0))
    assert list(single["label"]) == ["≤2", "3", "≥4"]
    for bins in (zeros, single):
        _assert_cover(bins)


def test_huge_counts_bin_the_tail():
    rng = np.random.default_rng(2)
    y = np.r_[rng.poisson(3, 300), 10**6].astype(float)
    bins = count_bins(y, max_bins=30)
    _assert_cover(bins)
    assert len(bins) <= 32
    assert list(bins["label"][:4]) == ["0", "1", "2", "3"]  # unit bins where counts are dense
    table = rootogram_table(POISSON, y, np.full(y.size, 3.0), np.full((2, y.size), 3.0))
    assert table["observed"].sum() == y.size


def test_a_heap_of_zeros_keeps_its_own_bin_beside_a_sparse_tail():
    bins = count_bins(np.r_[np.zeros(1000), [50.0, 80.0]], max_bins=30)
    _assert_cover(bins)
    assert list(bins["label"][:3]) == ["0", "1–49", "50"]


def test_expected_frequencies_are_the_summed_probabilities():
    rng = np.random.default_rng(4)
    mu = rng.gamma(3, 1, size=50)
    y = rng.poisson(mu).astype(float)
    draws = mu * rng.gamma(50, 1 / 50, size=(30, 1))
    table = rootogram_table(POISSON, y, mu, draws)
    assert table["expected_lme4"].sum() == pytest.approx(y.size)
    assert table["expected_pymc"].sum() == pytest.approx(y.size)
    unit = table[table["count"] == table["upper"]]
    for k, expected in zip(unit["count"], unit["expected_pymc"], strict=True):
        assert expected == pytest.approx(stats.poisson.pmf(k, draws).sum(axis=1).mean())
    assert list(table["observed"][unit.index]) == [int(np.sum(y == k)) for k in unit["count"]]


# --------------------------------------------------------------------------- dispersion


def test_overdispersion_is_caught_and_poisson_counts_pass():
    """Overdispersed counts fitted as Poisson: both engines look; Poisson counts: mostly pass."""
    rng = np.random.default_rng(23)
    found: dict[bool, list[np.ndarray]] = {True: [], False: []}
    for overdispersed in (True, False):
        for _ in range(20):
            y, groups = simulated(rng, overdispersed)
            mu_hat, mu = conjugate_fit(y, groups, rng)
            table = dispersion_table(POISSON, y, mu_hat, mu, n_parameters=GROUPS, seed=1)
            assert list(table["engine"]) == ["lme4", "PyMC"]
            found[overdispersed].append(table["p_value"].to_numpy())
            if overdispersed:
                assert set(table["verdict"]) == {"look"}
                assert "overdispersion" in table["why"].iloc[1]
    over, plain = np.array(found[True]), np.array(found[False])
    assert np.all(over < 0.01)
    # A two-sided 5% rule looks at about 10% of Poisson data sets (fewer for the
    # posterior predictive p, which is conservative); 6 of 20 would be a broken check.
    looks = (plain < 0.05) | (plain > 0.95)
    assert looks.sum(axis=0).max() <= 5
    assert 0.2 < float(np.median(plain)) < 0.8


def test_underdispersed_counts_look_in_the_posterior_predictive_check():
    rng = np.random.default_rng(5)
    groups = np.repeat(np.arange(GROUPS), PER_GROUP)
    y = rng.binomial(4, 0.5, size=groups.size).astype(float)  # variance half the mean
    mu_hat, mu = conjugate_fit(y, groups, rng)
    table = dispersion_table(POISSON, y, mu_hat, mu, n_parameters=GROUPS)
    lme4, pymc = table.iloc[0], table.iloc[1]
    assert pymc["verdict"] == "look" and "underdispersion" in pymc["why"]
    # lme4's Pearson ratio at the conditional modes leans low: read one-sided (overdispersion).
    assert lme4["p_value"] > 0.95 and lme4["verdict"] == "pass"
    assert "one-sided" in lme4["why"]


# --------------------------------------------------------------------------- figure


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "y",
    [np.zeros(40), np.full(30, 4.0), np.r_[np.arange(200) * 5000.0, 10.0**7]],
    ids=["all zeros", "one value", "huge counts"],
)
def test_rootogram_draws_the_edge_cases(y):
    rng = np.random.default_rng(0)
    mu = np.maximum(y, 0.1) * rng.gamma(20, 1 / 20, size=y.size)
    table = rootogram_table(POISSON, y, mu, mu[None, :] * rng.gamma(50, 1 / 50, size=(20, 1)))
    assert len(table) <= 32
    assert _png(rootogram_figure(table, "y (count)")).startswith(b"\x89PNG")


def test_a_rootogram_that_cannot_be_drawn_becomes_a_note():
    from harness.report.page import _figure

    empty = pd.DataFrame(columns=["label", "observed", "expected_lme4", "expected_pymc"])
    with pytest.raises(FigureDataError, match="no bins"):
        rootogram_figure(empty)
    shown = _figure("rootogram", lambda: rootogram_figure(empty), "rootogram")
    assert shown["uri"] == "" and "could not be drawn" in shown["note"]


def test_only_count_families_have_count_checks():
    assert POISSON.unbounded_counts
    assert not get_family("binomial").unbounded_counts
    assert not get_family("gaussian").unbounded_counts
    rng = np.random.default_rng(1)
    mu = np.full(20000, 3.5)
    assert POISSON.draw(rng, mu, None).mean() == pytest.approx(3.5, rel=0.02)
    assert POISSON.cdf(np.asarray(-1), mu[:1], None)[0] == 0.0


# --------------------------------------------------------------------------- the page


def overdispersed_design() -> tuple[object, pd.DataFrame]:
    """A small overdispersed count design (12 sites x 10), fitted as Poisson."""
    from harness.model.spec import ModelSpec

    rng = np.random.default_rng(7)
    groups = np.repeat(np.arange(12), 10)
    x = rng.normal(size=groups.size)
    rate = np.exp(1.2 + 0.3 * x + rng.normal(0, 0.4, 12)[groups])
    data = pd.DataFrame(
        {
            "y": rng.negative_binomial(1.5, 1.5 / (1.5 + rate)),
            "x": x,
            "site": [f"s{i}" for i in groups],
        }
    )
    return ModelSpec("y ~ x + (1 | site)", family="poisson", name="overdispersed"), data


def count_result(cache_dir: Path):
    """The overdispersed design fitted as Poisson (few draws), its figures drawn."""
    from harness.pipeline.runner import fit_design
    from harness.pipeline.settings import FitSettings
    from harness.report.page import render_figures

    settings = FitSettings(draws=200, tune=200, chains=2, n_sims=0, profile=False, max_rounds=1)
    return fit_design(
        overdispersed_design(),
        seed=1,
        cache_dir=cache_dir,
        settings=settings,
        render=render_figures,
    )


@pytest.mark.r
@pytest.mark.sampling
def test_poisson_page_shows_the_rootogram_and_the_overdispersion(tmp_path, tmp_path_factory):
    from harness.report.page import write_report

    result = count_result(tmp_path_factory.getbasetemp() / "harness-cache")
    assert result.figures is not None
    rows = result.figures["dispersion_table"]
    assert [r["engine"] for r in rows] == ["lme4", "PyMC"]
    assert all(r["verdict"] == "look" and r["p_value"] < 0.01 for r in rows)
    page = write_report(result, tmp_path / "overdispersed.html").read_text()
    assert 'id="counts"' in page and "Hanging rootogram" in page
    assert "could not be drawn" not in page


@pytest.mark.r
@pytest.mark.sampling
def test_lme4_dispersion_is_glmers_own_pearson_statistic(tmp_path_factory):
    """lme4's row: sum(residuals(m, "pearson")^2) / df.residual(m) of glmer run in R itself."""
    import rpy2.robjects as ro

    from harness.engines.lme4 import to_r_frame

    result = count_result(tmp_path_factory.getbasetemp() / "harness-cache")
    assert result.figures is not None
    lme4 = result.figures["dispersion_table"][0]
    spec, data = overdispersed_design()
    in_r = ro.r(
        """function(d, f) {
          m <- lme4::glmer(as.formula(f), data = d, family = poisson)
          chi2 <- sum(residuals(m, type = "pearson")^2)
          c(chi2 / df.residual(m), pchisq(chi2, df.residual(m), lower.tail = FALSE))
        }"""
    )
    ratio, p_value = np.asarray(in_r(to_r_frame(data), spec.formula), dtype=float)
    assert lme4["observed"] == pytest.approx(ratio, rel=1e-5)
    assert lme4["p_value"] == pytest.approx(p_value, rel=1e-3)
