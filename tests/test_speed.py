"""Compile once per structure: reuse, relabelling, reproducibility (small real samplings).

The structure is sleepstudy's (correlated intercept and slope): the one the default
run's report fit compiles, so its operations are compiled already when this module runs.
"""

from __future__ import annotations

import arviz as az
import numpy as np
import pytest

import harness as hz
from harness.checks.marginal import compile_mode
from harness.engines import samplers
from harness.engines.pymc import clear_compiled, refit

pytestmark = pytest.mark.sampling

SMALL = {"chains": 2, "draws": 200, "tune": 200, "adaptive": False}
VARS = ("beta", "u_Subject", "sd_Subject", "corr_Subject", "sigma")


def _renamed(seed: int):
    """Sleepstudy's structure with other responses and other subject names."""
    data = hz.datasets.load("sleepstudy")[0]
    noise = np.random.default_rng(seed).normal(0.0, 20.0, len(data))
    data = data.assign(Reaction=data["Reaction"] + noise)
    data["Subject"] = data["Subject"].cat.rename_categories(lambda s: f"subject {s}")
    return data


@pytest.fixture(scope="module")
def fits():
    """A first fit (compiles), then a refit of new data through the cache, then a fresh compile."""
    # The structures other modules compiled are set aside, not lost: the modules after
    # this one refit them without compiling them again.
    kept = [(key, samplers.COMPILED.get(key)) for key in samplers.COMPILED.keys()]
    data, spec = hz.datasets.load("sleepstudy")
    clear_compiled()
    first = hz.fit_pymc(spec, data, seed=1, **SMALL)
    reused = hz.fit_pymc(spec, _renamed(seed=2), seed=7, **SMALL)
    again = refit(reused, _renamed(seed=2))
    clear_compiled()
    fresh = hz.fit_pymc(spec, _renamed(seed=2), seed=7, **SMALL)
    yield {"first": first, "reused": reused, "again": again, "fresh": fresh}
    for key, entry in kept:
        if entry is not None and key not in samplers.COMPILED:
            samplers.COMPILED.put(key, entry)


def test_second_fit_of_a_structure_does_not_compile(fits):
    first, reused = fits["first"], fits["reused"]
    assert first.compile_seconds > 0 and not first.settings["compiled_model_reused"]
    assert reused.compile_seconds == 0 and reused.settings["compiled_model_reused"]
    assert reused.settings["structure_key"] == first.settings["structure_key"]


def test_reused_model_carries_the_new_data_labels(fits):
    posterior = fits["reused"].idata.posterior
    subjects = hz.datasets.load("sleepstudy")[0]["Subject"].cat.categories
    assert list(posterior["Subject__level"].values) == [f"subject {s}" for s in subjects]
    assert list(posterior["fixed_term"].values) == ["(Intercept)", "Days"]


def test_refit_through_the_cache_equals_a_fresh_compile(fits):
    """Swapping data into the compiled model gives the draws a new compile gives."""
    for name in VARS:
        np.testing.assert_array_equal(
            fits["reused"].idata.posterior[name].values,
            fits["fresh"].idata.posterior[name].values,
            err_msg=name,
        )
    assert fits["fresh"].compile_seconds > 0


def test_same_seed_same_draws_other_seed_other_draws(fits):
    reused, again = fits["reused"], fits["again"]
    assert again.seed == reused.seed and again.compile_seconds == 0
    for name in VARS:
        np.testing.assert_array_equal(
            reused.idata.posterior[name].values, again.idata.posterior[name].values
        )
    other = refit(reused, _renamed(seed=2), seed=8)
    assert not np.array_equal(
        reused.idata.posterior["beta"].values, other.idata.posterior["beta"].values
    )


def test_offsets_computed_after_sampling_equal_the_model_deterministic(fits):
    """u is left out of nutpie's trace and rebuilt from z and the Cholesky factor."""
    fit = fits["fresh"]
    model = samplers.COMPILED.get(fit.settings["structure_key"]).model
    u_of = model.compile_fn(
        model.replace_rvs_by_values([model["u_Subject"]])[0],
        inputs=model.value_vars,
        on_unused_input="ignore",
        mode=compile_mode(),  # two evaluations: NumPy thunks, no C compile of every node
    )
    posterior = fit.idata.posterior
    for chain, draw in ((0, 0), (1, 57)):
        point = {v.name: posterior[v.name].values[chain, draw] for v in model.value_vars}
        np.testing.assert_allclose(
            posterior["u_Subject"].values[chain, draw], u_of(point), rtol=1e-12, atol=1e-12
        )


def _intercept(fit) -> tuple[float, float]:
    """Posterior mean of the intercept and its Monte Carlo standard error."""
    draws = fit.idata.posterior["beta"].sel(fixed_term="(Intercept)")
    return float(draws.mean()), float(az.mcse(draws.to_dataset(name="b"))["b"])


def test_refit_fits_the_new_data(fits):
    """The reused model's posterior moves with the data: shifted responses shift the intercept.

    The posterior moves by the shift exactly (the priors' centre moves with the data); the
    two runs' paths differ, so their means agree to a few Monte Carlo standard errors.
    """
    data = _renamed(seed=2)
    shifted = data.assign(Reaction=data["Reaction"] + 100.0)
    moved = refit(fits["reused"], shifted)
    before, after = _intercept(fits["reused"]), _intercept(moved)
    se = float(np.hypot(before[1], after[1]))
    assert se < 1.0  # the check below is sharper than 1 % of the shift
    assert after[0] - before[0] == pytest.approx(100.0, abs=4 * se)


def test_cache_keeps_a_bounded_number_of_structures():
    cache = samplers.CompiledCache(size=2)
    for key in ("a", "b", "c"):
        cache.put(key, samplers._Entry(model=None, compiled=None, compile_seconds=0.0, shared={}))
    assert cache.keys() == ["b", "c"]
    assert cache.get("b") is not None
    cache.put("d", samplers._Entry(model=None, compiled=None, compile_seconds=0.0, shared={}))
    assert cache.keys() == ["b", "d"], "the least recently used structure goes first"


@pytest.mark.slow
def test_pymc_sampler_gives_the_same_variables():
    data, spec = hz.datasets.load("cafe")
    nut = hz.fit_pymc(spec, data, seed=1, **SMALL)
    own = hz.fit_pymc(spec, data, seed=1, sampler="pymc", **SMALL)
    for name in ("beta", "u_cafe", "sd_cafe", "corr_cafe", "sigma"):
        assert own.idata.posterior[name].dims == nut.idata.posterior[name].dims, name
    assert own.sampler == "pymc" and "nutpie" not in own.versions
    diff = abs(float(own.idata.posterior["beta"].mean() - nut.idata.posterior["beta"].mean()))
    assert diff < 0.2
