"""Compile once per structure: reuse, relabelling, reproducibility (small real samplings)."""

from __future__ import annotations

import numpy as np
import pytest

import harness as hz
from harness.checks.marginal import compile_mode
from harness.engines import samplers
from harness.engines.pymc import clear_compiled, refit

pytestmark = pytest.mark.sampling

SMALL = {"chains": 2, "draws": 200, "tune": 200, "adaptive": False}
VARS = ("beta", "u_cafe", "sd_cafe", "corr_cafe", "sigma")


def _renamed(seed: int):
    """Cafe data of the same structure, other values and other cafe names."""
    data = hz.datasets.simulate_cafe(seed=seed)
    data["cafe"] = data["cafe"].cat.rename_categories(lambda c: f"cafe {int(c):02d}")
    return data


@pytest.fixture(scope="module")
def fits():
    """A first fit (compiles), then a refit of new data through the cache, then a fresh compile."""
    spec = hz.datasets.load("cafe")[1]
    clear_compiled()
    first = hz.fit_pymc(spec, hz.datasets.simulate_cafe(seed=1), seed=1, **SMALL)
    reused = hz.fit_pymc(spec, _renamed(seed=2), seed=7, **SMALL)
    again = refit(reused, _renamed(seed=2))
    clear_compiled()
    fresh = hz.fit_pymc(spec, _renamed(seed=2), seed=7, **SMALL)
    return {"first": first, "reused": reused, "again": again, "fresh": fresh}


def test_second_fit_of_a_structure_does_not_compile(fits):
    first, reused = fits["first"], fits["reused"]
    assert first.compile_seconds > 0 and not first.settings["compiled_model_reused"]
    assert reused.compile_seconds == 0 and reused.settings["compiled_model_reused"]
    assert reused.settings["structure_key"] == first.settings["structure_key"]


def test_reused_model_carries_the_new_data_labels(fits):
    posterior = fits["reused"].idata.posterior
    assert list(posterior["cafe__level"].values) == [f"cafe {i:02d}" for i in range(1, 21)]
    assert list(posterior["fixed_term"].values) == ["(Intercept)", "afternoon"]


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
        model.replace_rvs_by_values([model["u_cafe"]])[0],
        inputs=model.value_vars,
        on_unused_input="ignore",
        mode=compile_mode(),  # two evaluations: NumPy thunks, no C compile of every node
    )
    posterior = fit.idata.posterior
    for chain, draw in ((0, 0), (1, 57)):
        point = {v.name: posterior[v.name].values[chain, draw] for v in model.value_vars}
        np.testing.assert_allclose(
            posterior["u_cafe"].values[chain, draw], u_of(point), rtol=1e-12, atol=1e-12
        )


def test_refit_fits_the_new_data(fits):
    """The reused model's posterior moves with the data: shifted responses shift the intercept."""
    data = _renamed(seed=2)
    shifted = data.assign(wait=data["wait"] + 10.0)
    moved = refit(fits["reused"], shifted)
    before = float(fits["reused"].idata.posterior["beta"].sel(fixed_term="(Intercept)").mean())
    after = float(moved.idata.posterior["beta"].sel(fixed_term="(Intercept)").mean())
    assert after - before == pytest.approx(10.0, abs=0.2)


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
    for name in VARS:
        assert own.idata.posterior[name].dims == nut.idata.posterior[name].dims, name
    assert own.sampler == "pymc" and "nutpie" not in own.versions
    diff = abs(float(own.idata.posterior["beta"].mean() - nut.idata.posterior["beta"].mean()))
    assert diff < 0.2
