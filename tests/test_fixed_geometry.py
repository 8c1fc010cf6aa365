"""The fixed effects are sampled in the centred basis and mapped back (issue 20, item 1).

An uncentred predictor (``cake``'s temperatures near 200) ties the intercept to
its slope a posteriori; the PyMC model therefore samples ``beta`` through a
unit-triangular value transform (:func:`harness.engines.pymc.centred_transform`).
These tests show the model is unchanged in meaning: the density of ``beta``
(prior included) equals the direct parameterisation's at random points, the
likelihood identity holds at lme4's recorded estimates on a shifted design, and
draws mapped back match the direct parameterisation's in distribution, while
the intercept's effective sample size is far larger.
"""

from __future__ import annotations

import json

import arviz as az
import numpy as np
import pandas as pd
import pytest
import scipy.stats as st

import harness as hz
from harness.checks.marginal import MarginalLikelihood, compile_mode, pymc_model_loglik
from harness.checks.same_model import _blocks_from_theta
from harness.checks.same_model_glmm import pymc_conditional_loglik
from harness.engines.pymc import (
    build_model,
    centring_intercept,
    fixed_means,
    model_data,
    pack_data,
)
from harness.model.priors import resolve_priors
from harness.model.spec import ModelSpec, Prior, build_design
from tests.conftest import REFERENCE

SHIFT = 200.0  # sleepstudy's Days moved to 200-209: the intercept is far from the data


def _shifted_sleepstudy(formula: str):
    data, spec = hz.datasets.load("sleepstudy")
    data = data.assign(Days=data["Days"] + SHIFT)
    return build_design(spec.with_(formula=formula), data)


def _simulated(offset: float, seed: int = 0, n_groups: int = 8, per_group: int = 10):
    """y = 1 + 0.5 x + group effect + noise, with x ~ offset + Normal(0, 1)."""
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(n_groups), per_group)
    x = offset + rng.normal(0.0, 1.0, g.size)
    y = 1.0 + 0.5 * (x - offset) + rng.normal(0.0, 0.7, n_groups)[g] + rng.normal(0.0, 1.0, g.size)
    return pd.DataFrame({"y": y, "x": x, "g": pd.Categorical([f"g{i}" for i in g])})


def _centred_value(design, beta: np.ndarray) -> np.ndarray:
    """beta in the centred basis, computed apart from the model: intercept + m' beta."""
    value = np.array(beta, dtype=float)
    means = design.X.to_numpy(float).mean(axis=0)
    slopes = [j for j, t in enumerate(design.fixed_terms) if t != "(Intercept)"]
    value[design.fixed_terms.index("(Intercept)")] += means[slopes] @ value[slopes]
    return value


def _random_point(model, rng) -> dict[str, np.ndarray]:
    point = model.initial_point()
    return {k: v + rng.normal(0.0, 0.3, size=np.shape(v)) for k, v in point.items()}


# --------------------------------------------------------------------------- exact, no sampling


@pytest.mark.parametrize(
    "formula, priors",
    [
        ("Reaction ~ Days + (Days | Subject)", "weak"),
        # Families differ by term: beta is one vector variable with a prior per entry.
        (
            "Reaction ~ Days + (1 | Subject)",
            {"Days": Prior("StudentT", {"nu": 3.0, "mu": 0.0, "sigma": 10.0})},
        ),
    ],
)
def test_log_density_of_beta_equals_the_direct_parameterisation(formula, priors):
    """At random points the centred model's log density, at beta's centred value, is the
    direct model's at beta (the map has Jacobian 1: no constant), prior included."""
    data, spec = hz.datasets.load("sleepstudy")
    design = build_design(
        spec.with_(formula=formula, priors=priors), data.assign(Days=data["Days"] + SHIFT)
    )
    prior = resolve_priors(design)
    assert centring_intercept(design, prior) == 0
    centred = build_model(design, prior)
    direct = build_model(design, prior, fixed_basis="direct")
    assert "beta_centred__" in {v.name for v in centred.value_vars}
    # The direct form has one variable, or one per term when the families differ.
    direct_names = {v.name for v in direct.value_vars}
    direct_fixed = ["beta"] if "beta" in direct_names else ["beta_0", "beta_1"]
    assert set(direct_fixed) <= direct_names
    # Evaluated at four points: the checks' NumPy mode, not a C compile of every node.
    mode = compile_mode()
    beta_of = centred.compile_fn(
        centred.replace_rvs_by_values([centred["beta"]])[0],
        inputs=centred.value_vars,
        on_unused_input="ignore",
        mode=mode,
    )
    logp_c, logp_d = centred.compile_logp(mode=mode), direct.compile_logp(mode=mode)
    prior_c = centred.compile_logp(vars=[centred["beta"]], mode=mode)
    prior_d = direct.compile_logp(vars=[direct[name] for name in direct_fixed], mode=mode)
    rng = np.random.default_rng(11)
    for _ in range(4):
        point = _random_point(direct, rng)
        beta = np.array([250.0 - 10.0 * SHIFT, 10.0]) + rng.normal(0, [300.0, 3.0])
        c_point = {k: v for k, v in point.items() if k not in direct_fixed}
        c_point["beta_centred__"] = _centred_value(design, beta)
        if direct_fixed == ["beta"]:
            point["beta"] = beta
        else:
            point.update({"beta_0": beta[0], "beta_1": beta[1]})
        np.testing.assert_allclose(beta_of(c_point), beta, rtol=1e-12)
        total = float(logp_d(point))
        assert abs(float(logp_c(c_point)) - total) < 1e-10 * max(1.0, abs(total))
        # The prior term alone is the prior of beta in lme4's basis.
        assert float(prior_c(c_point)) == pytest.approx(float(prior_d(point)), rel=1e-12)


def test_no_centring_without_intercept_or_with_a_bounded_prior():
    design = _shifted_sleepstudy("Reaction ~ 0 + Days + (1 | Subject)")
    assert centring_intercept(design, resolve_priors(design)) is None
    data, spec = hz.datasets.load("sleepstudy")
    bounded = build_design(
        spec.with_(priors={"Days": Prior("Uniform", {"lower": -50.0, "upper": 50.0})}), data
    )
    priors = resolve_priors(bounded)
    assert centring_intercept(bounded, priors) is None
    model = build_model(bounded, priors)
    assert "beta_centred__" not in {v.name for v in model.value_vars}


def test_means_are_data_so_a_refit_centres_at_the_new_means():
    """Same structure, other data: X's means travel in the packed data, not in the graph."""
    a = build_design(ModelSpec("y ~ x + (1 | g)"), _simulated(offset=0.0))
    b = build_design(ModelSpec("y ~ x + (1 | g)"), _simulated(offset=SHIFT))
    values_a = model_data(a, resolve_priors(a))
    values_b = model_data(b, resolve_priors(b))
    np.testing.assert_allclose(values_b["X_mean"], fixed_means(b))
    assert values_b["X_mean"][1] == pytest.approx(b.X["x"].mean())
    assert values_b["X_mean"][0] == 0.0
    layout_a, layout_b = pack_data(values_a)[1], pack_data(values_b)[1]
    assert layout_a == layout_b


def test_likelihood_identity_at_lme4s_estimates_on_a_shifted_design():
    """Shifting Days by 200 is a change of basis of lme4's model (intercepts move by -200 x
    slope, fixed and random): the PyMC model's own density recovers lme4's recorded
    log-likelihood at the moved estimates."""
    ref = json.loads((REFERENCE / "same_model_lme4.json").read_text())["models"]["correlated"]
    design = _shifted_sleepstudy(ref["formula"])
    ml = ref["ml"]
    beta = np.array([ml["beta"][t] for t in design.fixed_terms])
    beta[0] -= SHIFT * beta[1]
    # A subject's line u0 + u1 Days is (u0 - 200 u1) + u1 (Days + 200): its covariance moves too.
    move = np.array([[1.0, -SHIFT], [0.0, 1.0]])
    factors = [
        np.linalg.cholesky(move @ b.F @ b.F.T @ move.T)
        for b in _blocks_from_theta(design, ml["theta"], ml["sigma"])
    ]
    marginal = MarginalLikelihood(design)
    assert abs(marginal.loglik(beta, factors, ml["sigma"]) - ref["loglik_ml"]) < 1e-6
    tie = pymc_model_loglik(design, beta, factors, ml["sigma"], marginal=marginal)
    assert abs(tie["at_mode"] - ref["loglik_ml"]) < 1e-6
    assert tie["max_probe_gap"] < 1e-6


def test_glmm_conditional_likelihood_reads_beta_in_lme4s_basis():
    """The GLMM identity sets beta itself in a model that samples it centred."""
    frame = _simulated(offset=SHIFT, seed=3)
    rng = np.random.default_rng(4)
    frame["k"] = rng.binomial(6, 0.4, len(frame))
    frame["fail"] = 6 - frame["k"]
    design = build_design(ModelSpec("cbind(k, fail) ~ x + (1 | g)", family="binomial"), frame)
    assert centring_intercept(design, resolve_priors(design)) == 0
    beta = np.array([-0.4 - 0.02 * SHIFT, 0.02])
    theta = np.array([0.6])
    u = rng.normal(0.0, 1.0, design.blocks[0].n_levels)
    got = pymc_conditional_loglik(design, theta, beta, u)
    eta = design.X.to_numpy(float) @ beta + (theta[0] * u)[design.blocks[0].group_index]
    expected = st.binom.logpmf(design.y, design.trials, 1.0 / (1.0 + np.exp(-eta))).sum()
    assert got == pytest.approx(expected, rel=1e-10)


# --------------------------------------------------------------------------- sampling (small)


@pytest.fixture(scope="module")
def compiled():
    """One compiled model per basis for ``y ~ x + (1 | g)``; data are swapped in."""
    import nutpie

    from harness.engines.nutpie_entry import light_entry_points

    design = build_design(ModelSpec("y ~ x + (1 | g)"), _simulated(offset=0.0))
    priors = resolve_priors(design)
    with light_entry_points():
        return {
            basis: nutpie.compile_pymc_model(build_model(design, priors, fixed_basis=basis))
            for basis in ("centred", "direct")
        }


def _sample(compiled, offset: float, seed: int):
    import nutpie

    design = build_design(ModelSpec("y ~ x + (1 | g)"), _simulated(offset=offset))
    packed, _ = pack_data(model_data(design, resolve_priors(design)))
    model = compiled.with_data(**{k: v for k, v in packed.items() if k in compiled.shared_data})
    idata = nutpie.sample(
        model, draws=500, tune=500, chains=2, seed=seed, progress_bar=False, cores=1
    )
    return idata.posterior["beta"]


def _mcse_sd(draws: np.ndarray) -> float:
    """Monte Carlo SE of the SD (ArviZ's formula; its numba path fails on a plain array here)."""
    squares = (draws - draws.mean()) ** 2
    ess = float(az.ess(squares, method="mean"))
    var_of_var = (np.mean(squares**2) - np.mean(squares) ** 2) / ess
    return float(np.sqrt(var_of_var / np.mean(squares) / 4))


def test_draws_mapped_back_equal_the_direct_parameterisations(compiled):
    """A moderately uncentred predictor (both bases mix): means and SDs of beta agree within
    four combined Monte Carlo standard errors."""
    draws = {basis: _sample(c, offset=3.0, seed=5) for basis, c in compiled.items()}
    for term in draws["centred"]["fixed_term"].values:
        a, b = (draws[basis].sel(fixed_term=term).values for basis in ("centred", "direct"))
        se_mean = np.hypot(az.mcse(a, method="mean"), az.mcse(b, method="mean"))
        se_sd = np.hypot(_mcse_sd(a), _mcse_sd(b))
        assert abs(a.mean() - b.mean()) < 4 * se_mean, (term, a.mean(), b.mean(), se_mean)
        assert abs(a.std() - b.std()) < 4 * se_sd, (term, a.std(), b.std(), se_sd)


def test_centred_basis_mixes_the_intercept_of_an_uncentred_design(compiled):
    """x near 200: the direct basis crawls (the intercept and slope correlate almost
    perfectly), the centred basis does not.  Fixed seeds; the margin is generous."""
    ess = {
        basis: float(az.ess(_sample(c, offset=SHIFT, seed=7).sel(fixed_term="(Intercept)").values))
        for basis, c in compiled.items()
    }
    assert ess["centred"] > 400
    assert ess["centred"] > 3 * ess["direct"], ess


def test_low_rank_mass_matrix_is_nutpies_alone():
    data, spec = hz.datasets.load("sleepstudy")
    with pytest.raises(ValueError, match="low_rank needs sampler 'nutpie'"):
        hz.fit_pymc(spec, data, sampler="pymc", low_rank=True)
