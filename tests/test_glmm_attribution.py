"""A GLMM's gaps explained: the ``laplace`` and ``summary`` sources (issue 20, cause 5).

A binary GLMM with four observations per cluster (60 clusters), simulated here,
is where glmer's Laplace approximation is biased.  The exact likelihood is
checked against brute-force quadrature and against ``glmer(nAGQ = 25)``; the
sources against the negative control of a posterior shifted away from the
model's.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import harness as hz
from harness.checks import glmm_attribution as ga
from harness.checks.attribution import REMAINDER_MCSE, attribute_row, reweight_to_wide_prior
from harness.checks.compare import TOLERANCES, compare_fixed, compare_variance
from harness.checks.laplace import laplace_loglik
from harness.model.spec import ModelSpec, build_design
from harness.report.tables import attribution_text

#: Clusters, rows per cluster, group SD, intercept, slope: binary and few rows per cluster.
J, M, SD, B0, B1 = 60, 4, 2.5, -1.0, 1.0


def simulate(seed: int = 7, slope: bool = False) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(J), M)
    x = rng.normal(size=J * M)
    u = rng.normal(scale=SD, size=J)
    v = rng.normal(scale=0.7, size=J) if slope else np.zeros(J)
    eta = B0 + (B1 + v[g]) * x + u[g]
    y = (rng.random(J * M) < 1 / (1 + np.exp(-eta))).astype(int)
    return pd.DataFrame({"y": y, "x": x, "g": [f"c{k:02d}" for k in g]})


SPEC = ModelSpec("y ~ x + (1 | g)", family="binomial", name="binary_4_per_cluster")


def _brute_force(design, theta, beta) -> float:
    """log-likelihood by a fine grid over each cluster's (one or two) random effects."""
    from harness.checks.laplace import _block_factor

    block = design.blocks[0]
    k = block.n_terms
    T = _block_factor(np.asarray(theta, dtype=float), k)
    fixed = design.X.to_numpy(float) @ np.asarray(beta, dtype=float)
    Z = design.Z().toarray()
    axis = np.linspace(-7, 7, 801 if k == 1 else 241)
    if k == 1:
        nodes = axis[:, None]
    else:
        a, b = np.meshgrid(axis, axis, indexing="ij")
        nodes = np.column_stack([a.ravel(), b.ravel()])
    log_phi = -0.5 * np.sum(nodes**2, axis=1) - 0.5 * k * np.log(2 * np.pi)
    cell = (axis[1] - axis[0]) ** k
    total = 0.0
    for j in range(block.n_levels):
        rows = block.group_index == j
        zj = Z[np.ix_(rows, np.arange(j * k, (j + 1) * k))]  # each row's own columns
        eta = fixed[rows][:, None] + zj @ T @ nodes.T
        mu = design.family.link.inverse(eta)
        f = design.family.loglik(design.y[rows][:, None], mu, design.trials[rows][:, None])
        log_g = f.sum(axis=0) + log_phi
        top = log_g.max()
        total += top + np.log(np.sum(np.exp(log_g - top)) * cell)
    return float(total)


# --------------------------------------------------------------------------- no R, no sampler


@pytest.fixture(scope="module")
def design():
    return build_design(SPEC, simulate())


def test_scalar_quadrature_is_laplace_loglik_agq_and_brute_force(design):
    quadrature = ga.ScalarQuadrature(design)
    beta = np.array([-1.2, 1.3])
    for theta in (0.0, 1.0, 2.5):
        value = quadrature(np.array([theta]), beta)
        reference = laplace_loglik(design, [theta], beta, n_agq=ga.AGQ_POINTS).loglik
        assert value == pytest.approx(reference, abs=1e-8)
    # 25 points against the grid: 4e-6 over 60 clusters (measured), at SD 2.5.
    assert quadrature(np.array([2.5]), beta) == pytest.approx(
        _brute_force(design, [2.5], beta), abs=1e-4
    )


def test_importance_sampling_matches_brute_force_for_a_vector_random_effect():
    """(1 + x | g): one 2-D integral per cluster, against a 241 x 241 grid per cluster."""
    spec = SPEC.with_(formula="y ~ x + (1 + x | g)")
    design = build_design(spec, simulate(slope=True))
    theta, beta = np.array([2.0, 0.3, 0.6]), np.array([-1.0, 1.0])
    sampler = ga.ImportanceLikelihood(design)
    value = sampler(theta, beta)
    # 1000 draws per cluster: the sum over 60 clusters is good to about 0.1.
    assert value == pytest.approx(_brute_force(design, theta, beta), abs=0.25)
    assert sampler.last_ess > ga.IS_MIN_ESS


def test_importance_sampling_ml_is_the_quadrature_ml(design):
    """Both exact likelihoods give the same maximiser (scalar design; IS has no polish)."""
    start_theta, start_beta = np.array([2.4]), np.array([-1.4, 1.5])
    q_theta, q_beta, _ = ga._maximise(ga.ScalarQuadrature(design), design, start_theta, start_beta)
    s_theta, s_beta, _ = ga._maximise(
        ga.ImportanceLikelihood(design), design, start_theta, start_beta, polish=False
    )
    # Against SEs of about 0.4 (intercept, slope) and 0.6 (SD): within 0.05 SE.
    assert s_theta[0] == pytest.approx(q_theta[0], abs=0.03)
    np.testing.assert_allclose(s_beta, q_beta, atol=0.02)


def test_components_from_theta_reads_lme4s_factor():
    spec = SPEC.with_(formula="y ~ x + (1 + x | g)")
    design = build_design(spec, simulate(slope=True))
    values = ga.components_from_theta(design, np.array([2.0, 0.3, 0.6]))
    assert values["g: sd((Intercept))"] == pytest.approx(2.0)
    assert values["g: sd(x)"] == pytest.approx(np.hypot(0.3, 0.6))
    assert values["g: cor((Intercept),x)"] == pytest.approx(0.3 / np.hypot(0.3, 0.6))


def test_marginal_median_of_a_known_density():
    """A right-skewed density on 25 points, as the SD's marginal posterior is computed."""
    grid = np.linspace(0.3, 14, 25)
    log_density = 3 * np.log(grid) - grid  # Gamma(4, 1): median 3.6721
    assert ga.marginal_median(grid, log_density) == pytest.approx(3.6721, abs=1e-3)


def test_laplace_share_enters_the_row_with_the_other_sources():
    rng = np.random.default_rng(0)
    draws = rng.normal(1.5, 0.2, size=(2, 2000))
    wide = ga_wide(draws.size)
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
    )
    parts = attr.attribution
    total = sum(v for k, v in parts.items() if k != "mcse")
    assert total == pytest.approx(attr.gap, abs=1e-12)
    assert parts["laplace"] == 0.2
    assert attr.explained
    assert "Laplace approximation accounts for +0.2" in attr.explanation
    text = attribution_text(parts)
    assert "Laplace (glmer vs exact ML) +0.2 · summary +0.1 · rest" in text


def ga_wide(n: int):
    from harness.checks.attribution import WidePrior

    return WidePrior("psis", 0.0, np.full(n, 1.0 / n))


# --------------------------------------------------------------------------- glmer and a posterior


@pytest.fixture(scope="module")
def fits():
    data = simulate()
    freq = hz.fit_lme4(SPEC, data, n_sims=0)
    bayes = hz.fit_pymc(SPEC, data, seed=3, draws=1000, tune=500, chains=2, adaptive=False)
    wide = reweight_to_wide_prior(bayes, refit=False)
    glmm = ga.glmm_attribution(freq, bayes, wide)
    return data, freq, bayes, wide, glmm


@pytest.mark.r
def test_laplace_source_is_glmer_nagq25_minus_glmer(fits):
    """The exact ML is glmer's own nAGQ = 25 fit; the share is it minus glmer's Laplace fit."""
    from harness.engines.lme4 import fit_glmer_agq

    data, freq, _bayes, _wide, glmm = fits
    assert glmm is not None and glmm.exact.method == "agq"
    agq = fit_glmer_agq(SPEC, data, 25)
    estimates = freq.fixed.set_index("term")["estimate"]
    for term in ("(Intercept)", "x"):
        expected = agq["ml_beta"][term] - estimates[term]
        assert glmm.laplace[term] == pytest.approx(expected, abs=2e-3)
    sd = "g: sd((Intercept))"
    lme4_sd = float(freq.variance.set_index("component").loc[sd, "estimate"])
    expected_sd = float(next(iter(agq["ml_theta"].values()))) - lme4_sd
    assert glmm.laplace[sd] == pytest.approx(expected_sd, abs=2e-3)
    # Where Laplace is biased: the exact SD is clearly larger than glmer's.
    assert glmm.laplace[sd] > 0.05


@pytest.mark.r
def test_summary_sources_leave_a_small_remainder(fits):
    _data, freq, bayes, wide, glmm = fits
    fixed = compare_fixed(freq, bayes, wide=wide, glmm=glmm).set_index("term")
    variance = compare_variance(freq, bayes, wide=wide, glmm=glmm).set_index("component")
    for term, row in fixed.iterrows():
        parts = row["attribution"]
        assert parts["summary"] == pytest.approx(glmm.integration.shares[term])
        total = sum(v for k, v in parts.items() if k != "mcse")
        assert total == pytest.approx(row["pymc_mean"] - row["lme4_estimate"], abs=1e-9)
        limit = max(REMAINDER_MCSE * row["mcse"], TOLERANCES["fixed_pass_se"] * row["lme4_se"])
        assert abs(parts["remainder"]) <= limit, row["explanation"]
        # (Few draws: a row may miss the ESS rule; its sources are then still measured.)
        assert row["verdict"] in ("pass", "look", "unreliable")
    # Without the GLMM's sources the same slope gap is not explained.
    plain = compare_fixed(freq, bayes, wide=wide).set_index("term")
    assert abs(plain.loc["x", "attribution"]["remainder"]) > 2 * abs(
        fixed.loc["x", "attribution"]["remainder"]
    )
    row = variance.loc["g: sd((Intercept))"]
    parts = row["attribution"]
    # The SD's summary: the exact-likelihood posterior median against the exact ML estimate.
    assert parts["summary"] == pytest.approx(
        glmm.integration.theta_median - glmm.exact.values["g: sd((Intercept))"]
    )
    assert parts["summary"] > 0  # a right-skewed posterior: median above its mode
    assert abs(parts["remainder"]) <= 0.5 * row["pymc_sd"], row["explanation"]
    assert row["verdict"] in ("pass", "look", "unreliable")
    assert "Laplace (glmer vs exact ML)" in attribution_text(parts)


@pytest.mark.r
def test_a_shifted_posterior_still_fails(fits):
    """Negative control: beta draws moved by 3 posterior SDs are not explained by any source."""
    _data, freq, bayes, _wide, glmm = fits
    idata = bayes.idata.copy()
    beta = idata.posterior["beta"]
    idata.posterior["beta"] = beta + 3.0 * beta.std(("chain", "draw"))
    shifted = type(bayes)(**{**bayes.__dict__, "idata": idata})
    wide = reweight_to_wide_prior(shifted, refit=False)
    # The Laplace and summary shares come from the exact likelihood and the SD's draws, which
    # the shift leaves alone (up to the prior weights), so the fit's own are reused.
    fixed = compare_fixed(freq, shifted, wide=wide, glmm=glmm).set_index("term")
    for _, row in fixed.iterrows():
        limit = max(REMAINDER_MCSE * row["mcse"], TOLERANCES["fixed_pass_se"] * row["lme4_se"])
        assert row["attribution"]["remainder"] > max(2.0 * row["pymc_sd"], limit)
        assert row["verdict"] in ("fail", "unreliable")
        if row["verdict"] == "fail":
            assert row["explanation"].startswith("not explained")


def test_importance_sampling_factorises_over_nested_sets_and_matches_quadrature():
    """(1 | a/b): the integral splits into one 3-D integral per level of ``a`` (its effect
    and its two nested ``b`` effects), checked against a 24^3 Gauss-Hermite product rule."""
    rng = np.random.default_rng(3)
    a = np.repeat(np.arange(12), 10)
    b = np.tile(np.repeat([0, 1], 5), 12)
    eta = -0.3 + rng.normal(scale=1.2, size=12)[a] + rng.normal(scale=0.8, size=24)[2 * a + b]
    frame = pd.DataFrame(
        {
            "y": (rng.random(a.size) < 1 / (1 + np.exp(-eta))).astype(int),
            "a": [f"a{k:02d}" for k in a],
            "b": [f"b{k}" for k in b],
        }
    )
    design = build_design(ModelSpec("y ~ 1 + (1 | a/b)", family="binomial"), frame)
    theta, beta = np.array([0.9, 1.3]), np.array([-0.3])
    sampler = ga.ImportanceLikelihood(design)
    assert len(sampler.components) == 12
    assert sorted({c.size for c in sampler.components}) == [3]
    value = sampler(theta, beta)
    assert sampler.last_ess > ga.IS_MIN_ESS

    M = (design.Z() @ ga.lambda_matrix(design, theta)).tocsc().toarray()
    fixed = design.X.to_numpy(float) @ beta
    x, w = np.polynomial.hermite.hermgauss(24)
    grid = np.stack(np.meshgrid(x, x, x, indexing="ij"), -1).reshape(-1, 3) * np.sqrt(2)
    log_w = np.log(np.prod(np.stack(np.meshgrid(w, w, w, indexing="ij"), -1), -1)).ravel()
    total = 0.0
    for cols in sampler.components:
        rows = np.flatnonzero(np.abs(M[:, cols]).sum(axis=1) > 0)
        eta_rows = fixed[rows][:, None] + M[np.ix_(rows, cols)] @ grid.T
        f = design.family.loglik(
            design.y[rows][:, None],
            design.family.link.inverse(eta_rows),
            design.trials[rows][:, None],
        ).sum(axis=0)
        log_g = f + log_w - 1.5 * np.log(np.pi)
        top = log_g.max()
        total += top + np.log(np.exp(log_g - top).sum())
    assert value == pytest.approx(total, abs=0.1)


def test_importance_draws_grow_until_the_weights_are_trusted():
    """Too few draws for an ESS of IS_MIN_ESS: the sampler grows them (ESS ~ draws) and says so."""
    spec = SPEC.with_(formula="y ~ x + (1 + x | g)")
    design = build_design(spec, simulate(slope=True))
    theta, beta = np.array([2.0, 0.3, 0.6]), np.array([-1.0, 1.0])
    few = ga.ImportanceLikelihood(design, n_draws=80)
    grown = ga._enough_draws(design, few, theta, beta)
    assert few.last_ess < ga.IS_MIN_ESS  # precondition: 80 draws cannot give an ESS of 100
    assert grown is not few
    assert grown.n_draws > few.n_draws
    assert grown.last_ess >= ga.IS_MIN_ESS
    # Enough already: the same sampler comes back.
    assert ga._enough_draws(design, grown, theta, beta) is grown


def test_binomial_and_poisson_loglik_equal_scipys():
    """The families' log-likelihoods are scipy.stats' formulas (edge cases included)."""
    from scipy import stats

    from harness.model.family import get_family

    rng = np.random.default_rng(5)
    n = rng.integers(1, 20, 500).astype(float)
    y = np.minimum(rng.integers(0, 20, 500), n).astype(float)
    mu = rng.uniform(0.0, 1.0, 500)
    y[:2], mu[:2] = [0.0, n[1]], [0.0, 1.0]
    binomial = get_family("binomial").loglik(y, mu, n)
    np.testing.assert_allclose(binomial, stats.binom.logpmf(y, n, mu), rtol=1e-13, atol=1e-12)
    rate = rng.uniform(0.0, 10.0, 500)
    rate[0], y[0] = 0.0, 0.0
    poisson = get_family("poisson").loglik(y, rate, None)
    np.testing.assert_allclose(poisson, stats.poisson.logpmf(y, rate), rtol=1e-13, atol=1e-12)


def _slope_design(scale_x: float = 1.0):
    frame = simulate(slope=True)
    frame["x"] = frame["x"] * scale_x
    return build_design(SPEC.with_(formula="y ~ x + (1 + x | g)"), frame)


def test_importance_gradient_in_beta_is_the_estimates_own():
    """The exact gradient (draws' centre and scale move with beta) against central differences
    of the estimate itself, away from its maximum."""
    design = _slope_design()
    sampler = ga.ImportanceLikelihood(design)
    theta, beta = np.array([2.0, 0.3, 0.6]), np.array([-1.0, 1.0])
    value, gradient = sampler.value_and_beta_gradient(theta, beta)
    assert value == sampler(theta, beta)
    h = 1e-4
    numeric = [
        (sampler(theta, beta + h * e) - sampler(theta, beta - h * e)) / (2 * h) for e in np.eye(2)
    ]
    assert np.max(np.abs(gradient)) > 0.1  # not at the maximum: the check can fail
    np.testing.assert_allclose(gradient, numeric, atol=1e-6)


def test_conditional_beta_with_the_gradient_is_the_finite_difference_maximiser():
    """beta_hat(theta) is the same point with the exact gradient as with L-BFGS-B's own
    finite differences of the same estimate, and a predictor in other units moves it only
    by those units (a badly scaled column once stopped the search at its start)."""
    from scipy import optimize

    design = _slope_design()
    sampler = ga.ImportanceLikelihood(design)
    theta, beta = np.array([2.0, 0.3, 0.6]), np.array([-1.0, 1.0])
    assert sampler.has_beta_gradient
    fast = ga.conditional_beta(sampler, theta, beta)
    plain = optimize.minimize(
        lambda b: -sampler(theta, b), beta, method="L-BFGS-B", options={"ftol": 1e-12, "gtol": 1e-7}
    ).x
    np.testing.assert_allclose(fast, plain, atol=1e-5)
    assert np.max(np.abs(fast - beta)) > 0.05  # it moved from the start

    # x in thousandths: theta's slope entries and beta's slope carry the factor.
    wide = _slope_design(scale_x=1000.0)
    scaled = ga.conditional_beta(
        ga.ImportanceLikelihood(wide), theta * np.array([1.0, 1e-3, 1e-3]), beta * [1.0, 1e-3]
    )
    np.testing.assert_allclose(scaled * [1.0, 1e3], fast, atol=1e-5)
