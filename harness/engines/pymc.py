"""The Bayesian engine: a PyMC model built from a :class:`~harness.spec.Design`.

The model only reads the design (as Bambi's backend only reads its spec).  It
is built by indexing: each random-effects block contributes
``sum_k Z[:, k] * u[group_index, k]``, never a dense n x (groups x terms) Z.
All data, including the data-scaled prior parameters, enter as ``pm.Data`` so
one compiled model can be refitted to new data of the same structure
(``CompiledModel.with_data`` in nutpie).
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd

from harness.priors import ResolvedPriors, resolve_priors
from harness.spec import Design, ModelSpec, RandomBlock, build_design

log = logging.getLogger("harness")

Sampler = Literal["nutpie", "pymc", "numpyro"]
SAMPLERS: tuple[str, ...] = ("nutpie", "pymc", "numpyro")


def level_dim(block: RandomBlock) -> str:
    """Name of the coordinate holding a block's group levels."""
    return f"{block.label}__level"


def term_dim(block: RandomBlock) -> str:
    """Name of the coordinate holding a block's term names."""
    return f"{block.label}__term"


def term_b_dim(block: RandomBlock) -> str:
    """Second term coordinate of a block's correlation matrix."""
    return f"{block.label}__term_b"


def offsets_var(block: RandomBlock) -> str:
    return f"u_{block.label}"


def coef_var(block: RandomBlock) -> str:
    return f"coef_{block.label}"


def sd_var(block: RandomBlock) -> str:
    return f"sd_{block.label}"


def corr_var(block: RandomBlock) -> str:
    return f"corr_{block.label}"


@dataclass
class BayesFit:
    """A PyMC fit: the InferenceData plus what produced it.

    ``idata.posterior`` holds ``beta`` (dim ``fixed_term``), ``sigma`` (or one
    per ``sigma_level``), and per random-effects block ``u_<label>``
    (offsets parameterization) or ``coef_<label>`` (baked_in), with
    ``sd_<label>`` and, for correlated blocks, ``corr_<label>``.  Coordinates
    carry lme4's group levels and term names.
    """

    spec: ModelSpec
    design: Design
    idata: Any
    sampler: str
    seed: int
    draws: int
    tune: int
    chains: int
    priors: ResolvedPriors
    compile_seconds: float
    sample_seconds: float
    model_code: str
    versions: dict[str, str] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def n_divergent(self) -> int:
        stats = self.idata.sample_stats
        name = "diverging" if "diverging" in stats else None
        return int(stats[name].sum()) if name else 0


# --------------------------------------------------------------------------- model


def _prior_rv(pm: Any, name: str, prior: Any, **kwargs: Any) -> Any:
    dist = getattr(pm, prior.dist)
    return dist(name, **{**dict(prior.params), **kwargs})


def build_model(design: Design, priors: ResolvedPriors | None = None) -> Any:
    """Build the PyMC model for a design.

    Parameters
    ----------
    design : Design
        From :func:`harness.spec.build_design`.
    priors : ResolvedPriors, optional
        Defaults to ``resolve_priors(design)``.

    Returns
    -------
    pymc.Model
    """
    import pymc as pm
    import pytensor.tensor as pt

    spec = design.spec
    priors = priors if priors is not None else resolve_priors(design)
    coords: dict[str, Any] = {
        "fixed_term": design.fixed_terms,
        "obs": np.arange(design.n),
    }
    for block in design.blocks:
        coords[level_dim(block)] = block.levels
        coords[term_dim(block)] = block.terms
        if block.correlated and block.n_terms > 1:
            coords[term_b_dim(block)] = block.terms
    if design.sigma_levels is not None:
        coords["sigma_level"] = design.sigma_levels

    baked = spec.parameterization == "baked_in"
    absorbed = _absorbed_terms(design) if baked else {}

    with pm.Model(coords=coords) as model:
        X = pm.Data("X", design.X.to_numpy(dtype=float), dims=("obs", "fixed_term"))
        y = pm.Data("y", design.y, dims="obs")
        beta = _fixed_effects(pm, pt, design, priors)
        keep = [j for j, t in enumerate(design.fixed_terms) if t not in absorbed]
        if len(keep) == len(design.fixed_terms):
            mu = pt.dot(X, beta)
        elif keep:
            mu = pt.dot(X[:, keep], beta[keep])
        else:
            mu = pt.zeros(design.n)
        for block in design.blocks:
            index = pm.Data(f"idx_{block.label}", block.group_index, dims="obs")
            values = pm.Data(f"Z_{block.label}", block.values, dims=("obs", term_dim(block)))
            effects = _block_effects(pm, pt, block, priors, beta, design, baked)
            mu = mu + (values * effects[index]).sum(axis=1)
        if design.sigma_levels is not None:
            sigma = _prior_rv(pm, "sigma", priors.sigma, dims="sigma_level")
            sigma_index = pm.Data("idx_sigma", design.sigma_index, dims="obs")
            sigma_obs = sigma[sigma_index]
        else:
            sigma_obs = _prior_rv(pm, "sigma", priors.sigma)
        pm.Normal("y_obs", mu=mu, sigma=sigma_obs, observed=y, dims="obs")
    return model


def _fixed_effects(pm: Any, pt: Any, design: Design, priors: ResolvedPriors) -> Any:
    terms = design.fixed_terms
    fixed = [priors.fixed[t] for t in terms]
    if all(p.dist == "Normal" for p in fixed):
        mus = pm.Data("prior_beta_mu", np.array([p.params["mu"] for p in fixed], float))
        sds = pm.Data("prior_beta_sigma", np.array([p.params["sigma"] for p in fixed], float))
        return pm.Normal("beta", mu=mus, sigma=sds, dims="fixed_term")
    parts = [_prior_rv(pm, f"beta_{j}", p) for j, p in enumerate(fixed)]
    return pm.Deterministic("beta", pt.stack(parts), dims="fixed_term")


def _block_effects(
    pm: Any, pt: Any, block: RandomBlock, priors: ResolvedPriors, beta: Any, design: Design,
    baked: bool,
) -> Any:
    """Group-level effects of one block, shape (levels, terms): offsets or coefficients."""
    dims = (level_dim(block), term_dim(block))
    sd_priors = [priors.sd[(block.label, t)] for t in block.terms]
    scales = np.array([p.params.get("sigma", p.params.get("lam", 1.0)) for p in sd_priors], float)
    dist_name = sd_priors[0].dist
    if any(p.dist != dist_name for p in sd_priors):
        raise ValueError(f"block {block.label!r}: all SD priors of one block must share a family")
    key = "sigma" if "sigma" in sd_priors[0].params else "lam"
    scale = pm.Data(f"prior_sd_{block.label}", scales)
    sd_dist_cls = getattr(pm, dist_name)
    centre = None
    if baked:
        positions = [design.fixed_terms.index(t) if t in design.fixed_terms else -1 for t in block.terms]
        centre = pt.stack([beta[p] if p >= 0 else pt.constant(0.0) for p in positions])
    k = block.n_terms
    if k == 1 or not block.correlated:
        sd = sd_dist_cls(sd_var(block), **{key: scale}, dims=term_dim(block))
        if baked:
            return pm.Normal(coef_var(block), mu=centre, sigma=sd, dims=dims)
        z = pm.Normal(f"z_{block.label}", 0.0, 1.0, dims=dims)
        return pm.Deterministic(offsets_var(block), z * sd, dims=dims)
    chol, corr, stds = pm.LKJCholeskyCov(
        f"chol_{block.label}",
        n=k,
        eta=priors.lkj_eta,
        sd_dist=sd_dist_cls.dist(**{key: scale}, shape=k),
        compute_corr=True,
    )
    pm.Deterministic(sd_var(block), stds, dims=term_dim(block))
    pm.Deterministic(corr_var(block), corr, dims=(term_dim(block), term_b_dim(block)))
    if baked:
        return pm.MvNormal(coef_var(block), mu=centre, chol=chol, dims=dims)
    z = pm.Normal(f"z_{block.label}", 0.0, 1.0, dims=dims)
    return pm.Deterministic(offsets_var(block), pt.dot(z, chol.T), dims=dims)


def _absorbed_terms(design: Design) -> dict[str, str]:
    """For baked_in: which fixed terms each block's coefficients absorb."""
    absorbed: dict[str, str] = {}
    for block in design.blocks:
        for term in block.terms:
            if term not in design.fixed_terms:
                continue
            if term in absorbed:
                raise ValueError(
                    f"parameterization 'baked_in' cannot centre term {term!r} on both "
                    f"{absorbed[term]!r} and {block.label!r}; use parameterization='offsets'"
                )
            absorbed[term] = block.label
    return absorbed


# --------------------------------------------------------------------------- sampling

_COMPILED: dict[str, Any] = {}


def structure_key(design: Design, priors: ResolvedPriors) -> str:
    """Identifies a model structure: same key, same compiled model (data may differ)."""
    parts = [
        design.spec.formula,
        str(design.spec.sigma_by),
        design.spec.parameterization,
        str(design.n),
        ",".join(design.fixed_terms),
        priors.structure(),
    ]
    for block in design.blocks:
        parts.append(f"{block.label}:{block.n_levels}:{','.join(block.terms)}:{block.correlated}")
    if design.sigma_levels is not None:
        parts.append("sigma:" + ",".join(design.sigma_levels))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


def model_data(design: Design, priors: ResolvedPriors) -> dict[str, np.ndarray]:
    """The values of every ``pm.Data`` in the model, for swapping into a compiled model."""
    values: dict[str, np.ndarray] = {"X": design.X.to_numpy(dtype=float), "y": design.y}
    fixed = [priors.fixed[t] for t in design.fixed_terms]
    if all(p.dist == "Normal" for p in fixed):
        values["prior_beta_mu"] = np.array([p.params["mu"] for p in fixed], float)
        values["prior_beta_sigma"] = np.array([p.params["sigma"] for p in fixed], float)
    for block in design.blocks:
        values[f"idx_{block.label}"] = block.group_index
        values[f"Z_{block.label}"] = block.values
        sd_priors = [priors.sd[(block.label, t)] for t in block.terms]
        values[f"prior_sd_{block.label}"] = np.array(
            [p.params.get("sigma", p.params.get("lam", 1.0)) for p in sd_priors], float
        )
    if design.sigma_index is not None:
        values["idx_sigma"] = design.sigma_index
    return values


def _labels_for(design: Design) -> dict[str, Any]:
    coords: dict[str, Any] = {"fixed_term": design.fixed_terms}
    for block in design.blocks:
        coords[level_dim(block)] = block.levels
    return coords


def _sample_nutpie(model: Any, key: str, design: Design, priors: ResolvedPriors, *, draws: int,
                   tune: int, chains: int, seed: int, target_accept: float, progress: bool,
                   ) -> tuple[Any, float, float]:
    import nutpie

    compile_seconds = 0.0
    compiled = _COMPILED.get(key)
    if compiled is None:
        started = time.perf_counter()
        compiled = nutpie.compile_pymc_model(model, backend="numba")
        compile_seconds = time.perf_counter() - started
        _COMPILED[key] = compiled
        log.info("nutpie compiled the model in %.1f s", compile_seconds)
    else:
        compiled = compiled.with_data(**model_data(design, priors))
    started = time.perf_counter()
    idata = nutpie.sample(
        compiled,
        draws=draws,
        tune=tune,
        chains=chains,
        cores=min(chains, 2),
        seed=seed,
        progress_bar=progress,
        target_accept=target_accept,
        save_warmup=False,
    )
    sample_seconds = time.perf_counter() - started
    # A reused compiled model keeps the coordinates of the data it was built with.
    idata = idata.assign_coords(_labels_for(design), groups="posterior")
    return idata, compile_seconds, sample_seconds


def _sample_pymc(model: Any, *, draws: int, tune: int, chains: int, seed: int,
                 target_accept: float, progress: bool, nuts_sampler: str) -> tuple[Any, float, float]:
    import pymc as pm

    started = time.perf_counter()
    with model:
        idata = pm.sample(
            draws=draws,
            tune=tune,
            chains=chains,
            cores=min(chains, 2),
            random_seed=seed,
            target_accept=target_accept,
            progressbar=progress,
            nuts_sampler=nuts_sampler,
            compute_convergence_checks=False,
        )
    return idata, 0.0, time.perf_counter() - started


def fit_pymc(
    spec: ModelSpec,
    data: pd.DataFrame,
    seed: int = 1,
    *,
    draws: int = 1000,
    tune: int = 1000,
    chains: int = 4,
    sampler: str = "nutpie",
    target_accept: float = 0.9,
    progress: bool = False,
    design: Design | None = None,
) -> BayesFit:
    """Fit ``spec`` to ``data`` with PyMC.

    Parameters
    ----------
    spec : ModelSpec
    data : DataFrame
    seed : int
        Same seed, same draws (for a given sampler and versions).
    draws, tune, chains : int
        Per chain.  Chains beyond the machine's cores run sequentially.
    sampler : {"nutpie", "pymc", "numpyro"}
        ``nutpie`` (numba backend, default and fastest here), PyMC's own NUTS,
        or numpyro (imported only when asked for).
    target_accept : float
    progress : bool
        Show the sampler's progress bar.
    design : Design, optional
        A design already built from (spec, data).

    Returns
    -------
    BayesFit
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {list(SAMPLERS)}")
    design = design if design is not None else build_design(spec, data)
    priors = resolve_priors(design)
    model = build_model(design, priors)
    key = structure_key(design, priors)
    log.info("sampling %s with %s: %d chains x %d draws", spec.name or spec.formula, sampler,
             chains, draws)
    if sampler == "nutpie":
        idata, compile_s, sample_s = _sample_nutpie(
            model, key, design, priors, draws=draws, tune=tune, chains=chains, seed=seed,
            target_accept=target_accept, progress=progress,
        )
    else:
        nuts = "numpyro" if sampler == "numpyro" else "pymc"
        idata, compile_s, sample_s = _sample_pymc(
            model, draws=draws, tune=tune, chains=chains, seed=seed, target_accept=target_accept,
            progress=progress, nuts_sampler=nuts,
        )
    return BayesFit(
        spec=spec,
        design=design,
        idata=idata,
        sampler=sampler,
        seed=seed,
        draws=draws,
        tune=tune,
        chains=chains,
        priors=priors,
        compile_seconds=compile_s,
        sample_seconds=sample_s,
        model_code=model_source(),
        versions=pymc_versions(sampler),
        settings={"target_accept": target_accept, "structure_key": key},
    )


def model_source() -> str:
    """The source of the functions that build the PyMC model (shown in reports)."""
    return "\n\n".join(
        inspect.getsource(f) for f in (build_model, _fixed_effects, _block_effects)
    )


def pymc_versions(sampler: str = "nutpie") -> dict[str, str]:
    """Versions of the Python side of a fit."""
    import arviz
    import pymc
    import pytensor

    versions = {"pymc": pymc.__version__, "pytensor": pytensor.__version__, "arviz": arviz.__version__}
    if sampler == "nutpie":
        import nutpie

        versions["nutpie"] = getattr(nutpie, "__version__", "unknown")
        try:
            import numba

            versions["numba"] = numba.__version__
        except ImportError:  # pragma: no cover - nutpie needs numba for this backend
            pass
    if sampler == "numpyro":
        import numpyro

        versions["numpyro"] = numpyro.__version__
    return versions
