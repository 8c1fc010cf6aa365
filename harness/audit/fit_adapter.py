"""The one place the audit touches the harness's fit types and sampler.

The user's model is sampled the way the harness samples its own (nutpie via
:mod:`harness.engines.samplers`, same seed conventions) and its draws, under
the harness's names, are wrapped as a :class:`~harness.fits.BayesFit` (engine ``audit``)
so :func:`harness.checks.compare.compare` reads them as one more Bayesian fit.
"""

from __future__ import annotations

import time
from typing import Any

import xarray as xr

from harness.model.priors import ResolvedPriors
from harness.model.spec import Design

__all__ = ["as_bayes_fit", "sample_user_model"]


def sample_user_model(
    model: Any, *, draws: int, tune: int, chains: int, seed: int, target_accept: float = 0.9
) -> tuple[Any, float, float]:
    """Sample the user's PyMC model with nutpie; returns (idata, compile s, sample s)."""
    import nutpie

    from harness.engines.nutpie_entry import light_entry_points
    from harness.engines.samplers import sample_nutpie

    started = time.perf_counter()
    with light_entry_points():
        compiled = nutpie.compile_pymc_model(model, backend="numba")
    compile_seconds = time.perf_counter() - started
    idata, seconds = sample_nutpie(
        compiled,
        draws=draws,
        tune=tune,
        chains=chains,
        seed=seed,
        target_accept=target_accept,
        progress=False,
    )
    return idata, compile_seconds, seconds


def as_bayes_fit(
    design: Design,
    priors: ResolvedPriors,
    idata: Any,
    hposterior: xr.Dataset,
    *,
    seed: int,
    draws: int,
    tune: int,
    chains: int,
    compile_seconds: float,
    sample_seconds: float,
    source: str,
) -> Any:
    """The user's fit as a BayesFit whose posterior holds the harness's names."""
    import arviz as az

    from harness.engines.pymc import pymc_versions
    from harness.fits import BayesFit

    groups = {"posterior": hposterior}
    if hasattr(idata, "sample_stats"):
        groups["sample_stats"] = idata.sample_stats
    return BayesFit(
        spec=design.spec,
        design=design,
        idata=az.InferenceData(**groups),  # type: ignore[arg-type]
        sampler="nutpie",
        engine="audit",
        seed=seed,
        draws=draws,
        tune=tune,
        chains=chains,
        priors=priors,
        compile_seconds=compile_seconds,
        sample_seconds=sample_seconds,
        model_code=source,
        versions=pymc_versions("nutpie"),
        settings={"audited": True},
    )
