"""The Bayesian engine: a PyMC model built from a :class:`~harness.model.spec.Design`.

The model only reads the design (as Bambi's backend only reads its spec).  It
is built by indexing: each random-effects block contributes
``sum_k Z[:, k] * u[group_index, k]``, one gathered column per term, never a
dense n x (groups x terms) Z, so its cost grows with rows, not rows x groups.
All data, including the data-scaled prior parameters, enter through two
statically shaped ``pm.Data`` containers (:func:`data_containers`), so one
compiled model serves every data set of the same :func:`structure`:
:func:`fit_pymc` compiles a structure once per process (nutpie) and swaps the
data of later fits into it; :func:`refit` does so for a given fit.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from harness.engines.samplers import (
    COMPILED,
    SAMPLERS,
    ExtendableChains,
    compiled_nutpie,
    require_sampler,
    sample_nutpie,
    sample_pymc,
)
from harness.fits import BayesFit
from harness.model.priors import ResolvedPriors, resolve_priors
from harness.model.spec import Design, ModelSpec, Prior, RandomBlock, build_design
from harness.names import (
    coef_var,
    corr_var,
    level_dim,
    offsets_var,
    sd_var,
    term_b_dim,
    term_dim,
)

if TYPE_CHECKING:
    from harness.engines.adaptive import AdaptiveSettings

log = logging.getLogger("harness")

Sampler = Literal["nutpie", "pymc", "numpyro"]
__all__ = [
    "SAMPLERS",
    "BayesFit",
    "build_model",
    "centered_blocks",
    "clear_compiled",
    "data_containers",
    "fit_pymc",
    "model_data",
    "pack_data",
    "refit",
    "structure",
    "structure_key",
]


# --------------------------------------------------------------------------- priors as data

#: Bumped when the graph build_model makes changes, so cached structures are not reused.
#: 3: the fixed effects are sampled in the centred basis (:class:`CentredFixed`).
GRAPH_VERSION = "3"


@dataclass(frozen=True)
class _PriorGroup:
    """Priors of one family that enter the model as data vectors, one value per entry."""

    dist: str
    params: dict[str, np.ndarray]  # parameter name -> values (one per term or level)

    def data_names(self, stem: str) -> dict[str, str]:
        return {param: f"{stem}_{param}" for param in self.params}

    def signature(self) -> str:
        return f"{self.dist}({','.join(self.params)})"


def _prior_group(priors: list[Prior], what: str) -> _PriorGroup:
    first = priors[0]
    for prior in priors[1:]:
        if prior.dist != first.dist or set(prior.params) != set(first.params):
            raise ValueError(
                f"{what}: priors {first.describe()} and {prior.describe()} must share a family "
                "and its parameter names"
            )
    params = {
        name: np.array([float(p.params[name]) for p in priors], dtype=float)
        for name in first.params
    }
    return _PriorGroup(first.dist, params)


def _fixed_groups(design: Design, priors: ResolvedPriors) -> list[_PriorGroup]:
    """One group for all fixed effects when they share a family, else one per term."""
    fixed = [priors.fixed[t] for t in design.fixed_terms]
    try:
        return [_prior_group(fixed, "fixed effects")]
    except ValueError:
        return [
            _prior_group([p], f"fixed effect {t!r}")
            for t, p in zip(design.fixed_terms, fixed, strict=True)
        ]


def _sd_group(block: RandomBlock, priors: ResolvedPriors) -> _PriorGroup:
    return _prior_group(
        [priors.sd[(block.label, t)] for t in block.terms], f"SD priors of block {block.label!r}"
    )


def _sigma_group(design: Design, priors: ResolvedPriors) -> _PriorGroup:
    n_sigma = len(design.sigma_levels) if design.sigma_levels is not None else 1
    return _prior_group([priors.sigma] * n_sigma, "residual SD prior")


def _fixed_stems(groups: list[_PriorGroup]) -> list[str]:
    return ["prior_beta"] if len(groups) == 1 else [f"prior_beta{j}" for j in range(len(groups))]


def _has_slope(block: RandomBlock) -> bool:
    return any(t != INTERCEPT for t in block.terms)


def model_data(design: Design, priors: ResolvedPriors) -> dict[str, np.ndarray]:
    """Every data value :func:`build_model`'s model reads, by name.

    :func:`pack_data` packs them into the model's ``pm.Data`` containers;
    swapping packed new values into a compiled model of the same structure
    refits it to new data without recompiling.
    """
    values: dict[str, np.ndarray] = {
        "X": np.ascontiguousarray(design.X.to_numpy(dtype=float)),
        "y": np.asarray(design.y, dtype=float),
    }
    if centring_intercept(design, priors) is not None:
        values["X_mean"] = fixed_means(design)
    groups = _fixed_groups(design, priors)
    for stem, group in zip(_fixed_stems(groups), groups, strict=True):
        for param, name in group.data_names(stem).items():
            values[name] = group.params[param]
    for block in design.blocks:
        values[f"idx_{block.label}"] = np.asarray(block.group_index, dtype=np.int64)
        if _has_slope(block):
            values[f"Z_{block.label}"] = np.ascontiguousarray(block.values, dtype=float)
        group = _sd_group(block, priors)
        for param, name in group.data_names(f"prior_sd_{block.label}").items():
            values[name] = group.params[param]
    values.update(_glm_data(design))  # trials, offset: none in a gaussian design
    if not design.family.has_scale:
        return values
    group = _sigma_group(design, priors)
    for param, name in group.data_names("prior_sigma").items():
        values[name] = group.params[param]
    if design.sigma_index is not None:
        values["idx_sigma"] = np.asarray(design.sigma_index, dtype=np.int64)
    return values


#: Names of the (at most two) ``pm.Data`` containers that hold all of a model's data.
PACKED = {"float": "data_float", "int": "data_int"}


def pack_data(values: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Pack named data into one float64 and one int64 vector, and say where each piece lies.

    nutpie's compiled wrapper costs about half a second of compilation per
    ``pm.Data`` container, in every new process; two containers instead of
    eight or more save seconds per structure.

    Returns
    -------
    packed : dict
        ``{"data_float": ..., "data_int": ...}`` (the latter only if there are integers).
    layout : dict
        name -> (container, start, shape).
    """
    parts: dict[str, list[np.ndarray]] = {"float": [], "int": []}
    layout: dict[str, Any] = {}
    offsets = {"float": 0, "int": 0}
    for name, value in values.items():
        kind = "int" if np.issubdtype(value.dtype, np.integer) else "float"
        flat = np.ravel(value).astype(np.int64 if kind == "int" else np.float64)
        layout[name] = (PACKED[kind], offsets[kind], tuple(value.shape))
        parts[kind].append(flat)
        offsets[kind] += flat.size
    packed = {PACKED[k]: np.concatenate(v) for k, v in parts.items() if v}
    return packed, layout


def _glm_data(design: Design) -> dict[str, np.ndarray]:
    """The GLMM-only data: binomial trials and the linear predictor's offset."""
    values: dict[str, np.ndarray] = {}
    if design.trials is not None:
        values["trials"] = np.asarray(design.trials, dtype=float)
    if design.offset is not None:
        values["offset"] = np.asarray(design.offset, dtype=float)
    return values


def data_containers(pm: Any, values: dict[str, np.ndarray]) -> dict[str, Any]:
    """The model's data as named tensors: views into the packed ``pm.Data`` containers.

    Static shapes let shape checks fold away and make the compiled graph (and
    so its key in PyTensor's on-disk numba cache) the same in every process.
    """
    packed, layout = pack_data(values)
    shared = {name: pm.Data(name, value, shape=value.shape) for name, value in packed.items()}
    views = {}
    for name, (container, start, shape) in layout.items():
        size = int(np.prod(shape, dtype=np.int64))
        views[name] = shared[container][start : start + size].reshape(shape)
    return views


def centered_blocks(design: Design, centered: Collection[str] | str | None) -> frozenset[str]:
    """Validate which random-effects blocks take the centred parameterisation.

    Parameters
    ----------
    design : Design
    centered : collection of block labels, ``"all"``, or None (none: every block non-centred)

    Returns
    -------
    frozenset of str
        Block labels.  Empty for ``parameterization="baked_in"``, whose
        coefficients are centred on the fixed effects by construction.

    Raises
    ------
    ValueError
        For a label that names no block of the design.
    """
    labels = [b.label for b in design.blocks]
    if centered is None:
        return frozenset()
    if isinstance(centered, str):
        centered = labels if centered == "all" else [centered]
    unknown = sorted(set(centered) - set(labels))
    if unknown:
        raise ValueError(f"centered names no random-effects block {unknown}; blocks are {labels}")
    if design.spec.parameterization == "baked_in":
        return frozenset()
    return frozenset(centered)


def structure(
    design: Design, priors: ResolvedPriors, centered: Collection[str] = ()
) -> dict[str, str]:
    """What fixes the model's graph (data values excluded), item by item.

    ``centered`` (block labels) enters each block's entry: the centred and
    non-centred forms are different graphs, so they compile separately.
    """
    centered = centered_blocks(design, centered)
    parts = {
        "graph version": GRAPH_VERSION,
        "formula": design.spec.formula,
        "sigma_by": str(design.spec.sigma_by),
        "parameterization": design.spec.parameterization,
        "rows": str(design.n),
        "fixed terms": ",".join(design.fixed_terms),
        "fixed-effect priors": ";".join(g.signature() for g in _fixed_groups(design, priors)),
        "residual SD prior": _sigma_group(design, priors).signature(),
        "lkj_eta": repr(float(priors.lkj_eta)),
        "residual SD levels": str(len(design.sigma_levels or [])),
    }
    if not design.family.has_scale:  # gaussian structures' keys stay as they were
        parts["family"] = design.family.key
        parts["offset"] = str(design.offset is not None)
        parts.pop("residual SD prior")
    for block in design.blocks:
        parts[f"block {block.label}"] = (
            f"{block.n_levels} levels; terms {','.join(block.terms)}; "
            f"{'correlated' if block.correlated else 'uncorrelated'}; "
            f"SD prior {_sd_group(block, priors).signature()}; "
            f"{'centred' if block.label in centered else 'non-centred'}"
        )
    return parts


def structure_key(design: Design, priors: ResolvedPriors, centered: Collection[str] = ()) -> str:
    """Identifies a model structure: same key, same compiled model (data may differ)."""
    text = "|".join(f"{k}={v}" for k, v in structure(design, priors, centered).items())
    return hashlib.sha256(text.encode()).hexdigest()[:20]


# --------------------------------------------------------------------------- model

INTERCEPT = "(Intercept)"

# --------------------------------------------------------------------------- fixed effects' basis

#: ``centred``: sample the fixed effects in the centred basis (default); ``direct``: in lme4's.
FixedBasis = Literal["centred", "direct"]


def fixed_means(design: Design) -> np.ndarray:
    """Column means of X with 0 at the intercept: where the centred basis puts its origin."""
    X = design.X.to_numpy(dtype=float)
    means = X.mean(axis=0) if design.n else np.zeros(X.shape[1])
    if INTERCEPT in design.fixed_terms:
        means[design.fixed_terms.index(INTERCEPT)] = 0.0
    return np.ascontiguousarray(means)


def _on_real_line(prior: Prior) -> bool:
    """Whether a prior's support is the real line (PyMC gives it no default transform)."""
    import pymc as pm
    from pymc.distributions.transforms import _default_transform

    rv = getattr(pm, prior.dist).dist(**dict(prior.params))
    return _default_transform(rv.owner.op, rv) is None


def centring_intercept(design: Design, priors: ResolvedPriors) -> int | None:
    """Position of the intercept when the fixed effects are sampled centred, else None.

    Centring needs an intercept (it takes up the shift) and at least one other
    column, and priors whose support is the real line: a bounded prior keeps
    PyMC's own transform onto its support instead.
    """
    if INTERCEPT not in design.fixed_terms or len(design.fixed_terms) < 2:
        return None
    if not all(_on_real_line(priors.fixed[t]) for t in design.fixed_terms):
        return None
    return design.fixed_terms.index(INTERCEPT)


def centred_transform(means: Any, intercept: int, n_terms: int) -> Any:
    """The value transform ``beta -> beta_c`` of the centred basis (as brms samples).

    With ``m`` the column means of X (0 at the intercept), ``X beta = (X - 1 m') beta_c``
    for ``beta_c = beta + e_0 (m' beta)``: the centred intercept is the linear
    predictor at the predictors' means, the slopes are unchanged.  An uncentred
    predictor (temperatures near 200) otherwise ties the intercept to its slope
    a posteriori so tightly that a diagonal mass matrix crawls.  The map is
    unit triangular (Jacobian 1), so the density of ``beta`` is unchanged: the
    prior stays on lme4's coefficients, and the posterior of ``beta`` is exactly
    that of the direct parameterisation.  ``means`` is data (``X_mean``), so a
    compiled model refitted to new data centres at the new means.

    Parameters
    ----------
    means : tensor
        Column means of X, 0 at the intercept (:func:`fixed_means`).
    intercept : int
        Position of the intercept among the fixed terms.
    n_terms : int
        Number of fixed terms.

    Returns
    -------
    pymc Transform
        Named ``centred``: the sampler's variable is ``beta_centred__``.
    """
    import pytensor.tensor as pt
    from pymc.logprob.transforms import Transform

    unit = np.zeros(n_terms)
    unit[intercept] = 1.0

    class CentredFixed(Transform):
        name = "centred"
        ndim_supp = 1

        def _shift(self, value: Any) -> Any:
            return pt.sum(value * means, axis=-1, keepdims=True) * unit

        def forward(self, value: Any, *inputs: Any) -> Any:
            return value + self._shift(value)

        def backward(self, value: Any, *inputs: Any) -> Any:
            # The slopes are the same in both bases and m is 0 at the intercept,
            # so m' beta_c = m' beta.
            return value - self._shift(value)

        def log_jac_det(self, value: Any, *inputs: Any) -> Any:
            return pt.zeros_like(value[..., 0])

    return CentredFixed()


def build_model(
    design: Design,
    priors: ResolvedPriors | None = None,
    centered: Collection[str] = (),
    fixed_basis: FixedBasis = "centred",
) -> Any:
    """Build the PyMC model for a design.

    Random-effects blocks are non-centred by default (``u = z * sd`` or
    ``u = z L'``, with ``z_<label> ~ Normal(0, 1)``); the blocks named in
    ``centered`` draw ``u_<label>`` itself (``Normal(0, sd)`` or
    ``MvNormal(0, chol=L)``).  Both define the same posterior of every
    quantity the harness compares, under the same names.

    Every data value (response, design columns, group indices and the
    data-scaled prior parameters, named as in :func:`model_data`) lives in
    ``pm.Data`` containers, so the model compiled once serves any data set of
    the same :func:`structure`.

    Parameters
    ----------
    design : Design
        From :func:`harness.model.spec.build_design`.
    priors : ResolvedPriors, optional
        Defaults to ``resolve_priors(design)``.
    centered : collection of str
        Labels of the blocks to centre (see :func:`centered_blocks`).
    fixed_basis : {"centred", "direct"}
        Where the sampler moves the fixed effects: ``centred`` (default) through
        the value transform of :func:`centred_transform` wherever it applies
        (:func:`centring_intercept`), ``direct`` in lme4's basis.  Both define
        the same density of ``beta``; only the sampler's geometry differs.

    Returns
    -------
    pymc.Model
    """
    import pymc as pm
    import pytensor.tensor as pt

    spec = design.spec
    priors = priors if priors is not None else resolve_priors(design)
    centered = centered_blocks(design, centered)
    values = model_data(design, priors)
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
    centres = _centred_on_fixed(design, centered)

    with pm.Model(coords=coords) as model:
        data = data_containers(pm, values)
        beta = _fixed_effects(pm, pt, design, priors, data, fixed_basis)
        keep = [j for j, t in enumerate(design.fixed_terms) if t not in absorbed]
        X = data["X"]
        if len(keep) == len(design.fixed_terms):
            mu = pt.dot(X, beta)
        elif keep:
            mu = pt.dot(X[:, keep], beta[keep])
        else:
            mu = pt.zeros(design.n)
        for block in design.blocks:
            effects = _block_effects(
                pm,
                pt,
                block,
                priors,
                beta,
                design,
                baked,
                data,
                block.label in centered,
                centres.get(block.label, ()),
            )
            index = data[f"idx_{block.label}"]
            # One gathered column per term: its gradient is a length-n scatter-add,
            # several times cheaper in numba than gathering whole rows of `effects`.
            for k, term in enumerate(block.terms):
                column = effects[index, k]
                mu = mu + (column if term == INTERCEPT else data[f"Z_{block.label}"][:, k] * column)
        eta = mu + data["offset"] if "offset" in data else mu
        scale: dict[str, Any] = {}  # the residual SD per row, for a family that has one
        if design.family.has_scale:
            sigma_group = _sigma_group(design, priors)
            sigma_params = {p: data[n] for p, n in sigma_group.data_names("prior_sigma").items()}
            if design.sigma_levels is not None:
                sigma = getattr(pm, sigma_group.dist)("sigma", **sigma_params, dims="sigma_level")
                sigma_obs = sigma[data["idx_sigma"]]
            else:
                scalar = {p: v[0] for p, v in sigma_params.items()}
                sigma_obs = getattr(pm, sigma_group.dist)("sigma", **scalar)
            scale["scale"] = sigma_obs
        # The family's likelihood on the link scale (pm.Normal for the gaussian family).
        design.family.likelihood(pm, pt, "y_obs", eta, data, dims="obs", **scale)
    return model


def _fixed_effects(
    pm: Any,
    pt: Any,
    design: Design,
    priors: ResolvedPriors,
    data: dict[str, Any],
    basis: FixedBasis = "centred",
) -> Any:
    """The fixed effects ``beta`` (dim ``fixed_term``) under their priors, in lme4's basis.

    With an intercept and priors on the real line, the sampler moves in the
    centred basis (:func:`centred_transform`): a value transform of ``beta``,
    so the prior, the posterior and every name stay those of ``beta`` itself.
    """
    groups = _fixed_groups(design, priors)
    stems = _fixed_stems(groups)
    intercept = centring_intercept(design, priors) if basis == "centred" else None
    if intercept is None:
        return _direct_fixed_effects(pm, pt, groups, stems, data)
    transform = centred_transform(data["X_mean"], intercept, len(design.fixed_terms))
    if len(groups) == 1:
        params = {p: data[n] for p, n in groups[0].data_names(stems[0]).items()}
        return getattr(pm, groups[0].dist)("beta", **params, dims="fixed_term", transform=transform)
    # Families differ by term: one vector variable whose entries have their own priors.
    layout = [(group.dist, list(group.params)) for group in groups]
    flat = [
        data[n][0]
        for stem, g in zip(stems, groups, strict=True)
        for n in g.data_names(stem).values()
    ]

    def stacked(*args: Any) -> Any:
        *values, _size = args
        parts, at = [], 0
        for dist, names in layout:
            parts.append(
                getattr(pm, dist).dist(
                    **dict(zip(names, values[at : at + len(names)], strict=True))
                )
            )
            at += len(names)
        return pt.stack(parts)

    return pm.CustomDist("beta", *flat, dist=stacked, dims="fixed_term", transform=transform)


def _direct_fixed_effects(
    pm: Any, pt: Any, groups: list[_PriorGroup], stems: list[str], data: dict[str, Any]
) -> Any:
    """``beta`` sampled in lme4's own basis (no intercept, or a prior with bounded support)."""
    if len(groups) == 1:
        params = {p: data[n] for p, n in groups[0].data_names(stems[0]).items()}
        return getattr(pm, groups[0].dist)("beta", **params, dims="fixed_term")
    parts = []
    for j, (stem, group) in enumerate(zip(stems, groups, strict=True)):
        params = {p: data[n][0] for p, n in group.data_names(stem).items()}
        parts.append(getattr(pm, group.dist)(f"beta_{j}", **params))
    return pm.Deterministic("beta", pt.stack(parts), dims="fixed_term")


def _block_effects(
    pm: Any,
    pt: Any,
    block: RandomBlock,
    priors: ResolvedPriors,
    beta: Any,
    design: Design,
    baked: bool,
    data: dict[str, Any],
    centred: bool = False,
    on_fixed: tuple[str, ...] = (),
) -> Any:
    """Group-level effects of one block, shape (levels, terms): offsets or coefficients.

    Non-centred (default): ``u = z * sd`` (or ``z L'``), ``z ~ Normal(0, 1)``,
    best when the groups' data say little next to the prior.  Centred: the
    group coefficients ``coef_<label> ~ Normal(beta_t, sd)`` (or
    ``MvNormal(beta_t, chol=L)``) for the terms ``on_fixed`` that have a fixed
    effect ``beta_t`` (0 for the others), and ``u = coef - beta_t``; with no
    such term ``u ~ Normal(0, sd)`` itself.  Best when each group's data pin its
    coefficient down (the non-centred form then couples ``z`` and the SD;
    centring on 0 alone would couple ``u`` and ``beta``).
    """
    dims = (level_dim(block), term_dim(block))
    group = _sd_group(block, priors)
    params = {p: data[n] for p, n in group.data_names(f"prior_sd_{block.label}").items()}
    sd_family = getattr(pm, group.dist)
    centre = None
    if baked:
        positions = [
            design.fixed_terms.index(t) if t in design.fixed_terms else -1 for t in block.terms
        ]
        centre = pt.stack([beta[p] if p >= 0 else pt.constant(0.0) for p in positions])
    k = block.n_terms
    if k == 1 or not block.correlated:
        sd = sd_family(sd_var(block), **params, dims=term_dim(block))
        if baked:
            return pm.Normal(coef_var(block), mu=centre, sigma=sd, dims=dims)
        if centred and not on_fixed:
            return pm.Normal(offsets_var(block), mu=0.0, sigma=sd, dims=dims)
        if centred:
            mean = _fixed_centre(pt, block, beta, design, on_fixed)
            coef = pm.Normal(coef_var(block), mu=mean, sigma=sd, dims=dims)
            return pm.Deterministic(offsets_var(block), coef - mean, dims=dims)
        z = pm.Normal(f"z_{block.label}", 0.0, 1.0, dims=dims)
        return pm.Deterministic(offsets_var(block), z * sd, dims=dims)
    # store_in_trace=False: the SDs and correlations are stored once, under harness names.
    chol, corr, stds = pm.LKJCholeskyCov(
        f"chol_{block.label}",
        n=k,
        eta=priors.lkj_eta,
        sd_dist=sd_family.dist(**params, shape=k),
        compute_corr=True,
        store_in_trace=False,
    )
    pm.Deterministic(sd_var(block), stds, dims=term_dim(block))
    pm.Deterministic(corr_var(block), corr, dims=(term_dim(block), term_b_dim(block)))
    if baked:
        return pm.MvNormal(coef_var(block), mu=centre, chol=chol, dims=dims)
    if centred and not on_fixed:
        return pm.MvNormal(offsets_var(block), mu=pt.zeros(k), chol=chol, dims=dims)
    if centred:
        mean = _fixed_centre(pt, block, beta, design, on_fixed)
        coef = pm.MvNormal(coef_var(block), mu=mean, chol=chol, dims=dims)
        return pm.Deterministic(offsets_var(block), coef - mean, dims=dims)
    z = pm.Normal(f"z_{block.label}", 0.0, 1.0, dims=dims)
    return pm.Deterministic(offsets_var(block), pt.dot(z, chol.T), dims=dims)


def _centred_on_fixed(design: Design, centered: Collection[str]) -> dict[str, tuple[str, ...]]:
    """Per centred block, the terms whose group coefficients are centred on their fixed effect.

    A fixed effect centres the centred block with the fewest groups that has
    its term (ties: design order): the fixed effect is then about the mean of
    few well-informed coefficients, as in a one-way design.  Other blocks with
    the same term are centred on 0 (centring two blocks on one fixed effect
    would tie both to it).
    """
    if design.spec.parameterization != "offsets":
        return {}
    taken: set[str] = set()
    centres: dict[str, tuple[str, ...]] = {}
    order = sorted(
        (b for b in design.blocks if b.label in centered),
        key=lambda b: (b.n_levels, design.blocks.index(b)),
    )
    for block in order:
        terms = tuple(t for t in block.terms if t in design.fixed_terms and t not in taken)
        taken.update(terms)
        centres[block.label] = terms
    return centres


def _fixed_centre(
    pt: Any, block: RandomBlock, beta: Any, design: Design, on_fixed: tuple[str, ...]
) -> Any:
    """Vector over the block's terms: ``beta_t`` for the terms in ``on_fixed``, else 0."""
    return pt.stack(
        [
            beta[design.fixed_terms.index(t)] if t in on_fixed else pt.constant(0.0)
            for t in block.terms
        ]
    )


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


# --------------------------------------------------------------------------- fitting


def _posterior_coords(design: Design) -> dict[str, Any]:
    """Labels of the data fitted (a reused compiled model carries the first data's labels)."""
    coords: dict[str, Any] = {"fixed_term": design.fixed_terms}
    for block in design.blocks:
        coords[level_dim(block)] = block.levels
        coords[term_dim(block)] = block.terms
        if block.correlated and block.n_terms > 1:
            coords[term_b_dim(block)] = block.terms
    if design.sigma_levels is not None:
        coords["sigma_level"] = design.sigma_levels
    return coords


def _relabel(idata: Any, design: Design) -> Any:
    posterior = idata.posterior
    coords = {d: v for d, v in _posterior_coords(design).items() if d in posterior.dims}
    # Dataset.assign_coords shares the draws; InferenceData.assign_coords would copy them.
    idata.posterior = posterior.assign_coords(coords)
    return idata


def _offsets_after_sampling(design: Design, centered: Collection[str] = ()) -> list[str]:
    """Offsets computed from the stored draws instead of kept in the sampler's trace.

    ``u = z L'`` (or ``z * sd``) is as large as ``z`` itself; leaving it out of
    nutpie's trace halves the trace of a model with many groups (about 1 GB
    less at the peak for 2,000 groups x 2 terms x 4,000 draws).
    """
    if design.spec.parameterization != "offsets":
        return []
    # A centred block samples u itself: it is in the trace already.
    return [offsets_var(block) for block in design.blocks if block.label not in centered]


def _add_offsets(idata: Any, design: Design, centered: Collection[str] = ()) -> Any:
    """Add ``u_<label>`` to the posterior exactly as the model defines it."""
    import xarray as xr

    posterior = idata.posterior
    for name in _offsets_after_sampling(design, centered):
        if name in posterior:
            continue
        block = next(b for b in design.blocks if offsets_var(b) == name)
        z = posterior[f"z_{block.label}"].values  # (chain, draw, level, term)
        k = block.n_terms
        if k == 1 or not block.correlated:
            u = z * posterior[sd_var(block)].values[:, :, None, :]
        else:
            packed = posterior[f"chol_{block.label}"].values  # (chain, draw, k(k+1)/2)
            L = np.zeros((*packed.shape[:2], k, k))
            rows, cols = np.tril_indices(k)
            L[..., rows, cols] = packed
            u = np.einsum("cdlj,cdkj->cdlk", z, L)  # z @ L.T, draw by draw
        posterior[name] = xr.DataArray(
            u,
            dims=("chain", "draw", level_dim(block), term_dim(block)),
            coords={"chain": posterior["chain"], "draw": posterior["draw"]},
        )
    return idata


@dataclass
class Run:
    """One sampler run of :func:`sample_once`: the draws and how they were made."""

    idata: Any
    compile_seconds: float
    sample_seconds: float
    cached: bool
    key: str
    parts: dict[str, str]
    centered: frozenset[str]
    target_accept: float
    seed: int
    chains: int
    low_rank: bool = False
    # nutpie chains that can go on sampling (:class:`ExtendableChains`), with what
    # turns their raw draws into this run's posterior; None for a run that cannot.
    chains_handle: ExtendableChains | None = None
    finish: Callable[[Any], Any] | None = None

    @property
    def extendable(self) -> bool:
        return self.chains_handle is not None and not self.chains_handle._closed

    @property
    def capacity(self) -> int:
        return self.chains_handle.capacity if self.chains_handle is not None else 0

    def extend(self, length: int) -> Run:
        """This run's chains continued to ``length`` draws each (the same chains, no warm-up)."""
        if self.chains_handle is None or self.finish is None:
            raise ValueError("this run's chains cannot be extended")
        raw, seconds = self.chains_handle.draws_up_to(length)
        return dataclasses.replace(
            self, idata=self.finish(raw), compile_seconds=0.0, sample_seconds=seconds
        )

    def close(self) -> None:
        """Stop the chains' threads (a run whose chains will not be extended)."""
        if self.chains_handle is not None:
            self.chains_handle.close()


def draws_until_divergent(handle: Any, draws: int, check_every: int | None) -> tuple[Any, float]:
    """``handle``'s first ``draws`` per chain, or fewer where a stretch ends with a divergence.

    Stretches of ``check_every`` draws (None: one stretch).  Divergent draws
    are a remedy's cue whatever their number (a smaller step or another
    geometry), so the draws after the first divergent stretch would be thrown
    away: they are not sampled.  Returns ``(idata, seconds)`` as
    :meth:`ExtendableChains.draws_up_to`.
    """
    from harness import progress as progress_lines

    if not check_every or check_every >= draws:
        return handle.draws_up_to(draws)
    seconds, length = 0.0, min(draws, check_every)
    label = (
        f"sampling {handle.chains} chains x {handle.tune}+{draws} draws "
        f"(checked for divergences every {check_every})"
    )
    with progress_lines.stage(label) as stage:
        while True:
            raw, spent = handle.draws_up_to(length, announce=False)
            seconds += spent
            stats = getattr(raw, "sample_stats", None)
            diverged = stats is not None and "diverging" in stats and bool(stats["diverging"].any())
            if length >= draws or diverged:
                rate = handle.chains * (handle.tune + length) / max(seconds, 1e-9)
                stopped = f"stopped after {length} draws: a divergence; " if diverged else ""
                stage.detail = f"{stopped}{rate:.0f} draws/s"
                return raw, seconds
            length = min(draws, length + check_every)


def sample_once(
    design: Design,
    priors: ResolvedPriors,
    *,
    seed: int,
    draws: int,
    tune: int,
    chains: int,
    sampler: str,
    target_accept: float,
    progress: bool = False,
    centered: Collection[str] = (),
    low_rank: bool = False,
    capacity: int | None = None,
    check_every: int | None = None,
) -> Run:
    """Sample the model of ``design`` once (nutpie: compile or reuse, swap data, sample).

    The posterior holds ``u_<label>`` for every block whatever its
    parameterisation, under lme4's labels.  ``low_rank`` (nutpie only) adapts
    a low-rank modified mass matrix instead of the diagonal one.  With
    ``capacity`` (nutpie only) the chains stay open after their ``draws``
    and :meth:`Run.extend` continues them up to ``capacity`` draws each; the
    first ``draws`` are those of a run without it.  Call :meth:`Run.close`
    when they will not be extended.  With ``check_every`` (nutpie only) the
    draws are taken in stretches of that many per chain, and the run stops
    after the first stretch that ends with a divergence: it then holds fewer
    than ``draws`` (the draws it holds are the same run's, whatever the
    stretches).
    """
    if low_rank and sampler != "nutpie":
        raise ValueError(f"low_rank needs sampler 'nutpie', not {sampler!r}")
    centered = centered_blocks(design, centered)
    parts = structure(design, priors, centered)
    key = structure_key(design, priors, centered)
    cached = False
    handle: ExtendableChains | None = None
    finish: Callable[[Any], Any] | None = None
    if sampler == "nutpie":
        compiled, compile_s, cached = compiled_nutpie(
            key,
            lambda: build_model(design, priors, centered),
            pack_data(model_data(design, priors))[0],
            skip=lambda model: set(_offsets_after_sampling(design, centered)),
        )

        def finish(raw: Any) -> Any:
            return _relabel(_add_offsets(raw, design, centered), design)

        checked = check_every is not None and 0 < check_every < draws
        if checked or (capacity is not None and capacity > draws):
            handle = ExtendableChains(
                compiled,
                draws=draws,
                tune=tune,
                chains=chains,
                capacity=max(capacity or draws, draws),
                seed=seed,
                target_accept=target_accept,
                progress=progress,
                low_rank=low_rank,
            )
            try:
                raw, sample_s = draws_until_divergent(
                    handle, draws, check_every if checked else None
                )
            except BaseException:
                handle.close()
                raise
        else:
            raw, sample_s = sample_nutpie(
                compiled,
                draws=draws,
                tune=tune,
                chains=chains,
                seed=seed,
                target_accept=target_accept,
                progress=progress,
                low_rank=low_rank,
            )
        idata = finish(raw)
    else:
        idata, sample_s = sample_pymc(
            build_model(design, priors, centered),
            draws=draws,
            tune=tune,
            chains=chains,
            seed=seed,
            target_accept=target_accept,
            progress=progress,
            nuts_sampler=sampler,
        )
        compile_s = 0.0
    return Run(
        idata,
        compile_s,
        sample_s,
        cached,
        key,
        parts,
        centered,
        target_accept,
        seed,
        chains,
        low_rank,
        handle,
        finish if handle is not None else None,
    )


def fit_pymc(
    spec: ModelSpec,
    data: pd.DataFrame,
    seed: int = 1,
    *,
    draws: int = 1000,
    tune: int = 1000,
    chains: int = 4,
    sampler: str = "nutpie",
    target_accept: float = 0.8,
    progress: bool = False,
    design: Design | None = None,
    adaptive: bool | AdaptiveSettings = True,
    centered: Collection[str] | str | None = None,
    low_rank: bool = False,
) -> BayesFit:
    """Fit ``spec`` to ``data`` with PyMC, sampling until the diagnostics hold.

    With nutpie (the default) the model is compiled once per model structure
    (:func:`structure_key`) and process; later fits of the same structure to
    other data swap the data into the compiled model, without building or
    compiling anything (``compile_seconds`` is then 0).

    With ``adaptive`` (the default) a first run that leaves any compared
    quantity with R-hat > 1.01, bulk or tail ESS < 400 or any divergence is
    followed by more rounds (other parameterisation per block, higher
    ``target_accept``, more chains) within a budget; see
    :mod:`harness.engines.adaptive`.  Every round is recorded in
    ``settings["adaptive"]``.

    Parameters
    ----------
    spec : ModelSpec
    data : DataFrame
    seed : int
        Same seed, same draws (for a given sampler and versions), whether the
        compiled model was reused or not; later adaptive rounds use seeds
        derived from it.
    draws, tune, chains : int
        Per chain, for each run.  Chains beyond the machine's cores run in turn.
    sampler : {"nutpie", "pymc", "numpyro"}
        ``nutpie`` (numba backend, default and fastest here), PyMC's own NUTS,
        or numpyro (imported only when asked for).
    target_accept : float
        Of the first run.  0.8 (nutpie's and PyMC's default) costs about 20%
        fewer gradient evaluations than 0.9 at the same bulk ESS; the adaptive
        loop raises it when a run diverges.
    progress : bool
        Show the sampler's progress bar.
    design : Design, optional
        A design already built from (spec, data).
    adaptive : bool or AdaptiveSettings
        ``True`` (default): adaptive with the default budget; ``False``: one run.
    centered : collection of block labels, "all" or None
        Blocks of the first run to centre (default none: all non-centred).
    low_rank : bool
        nutpie only: adapt a low-rank modified mass matrix in every run
        instead of the diagonal one (see ``benchmarks/README.md``, geometry).

    Returns
    -------
    BayesFit
    """
    from harness.engines.adaptive import AdaptiveSettings, sample_adaptively

    require_sampler(sampler)
    if low_rank and sampler != "nutpie":
        raise ValueError(f"low_rank needs sampler 'nutpie', not {sampler!r}")
    design = design if design is not None else build_design(spec, data)
    priors = resolve_priors(design)
    first_centered = centered_blocks(design, centered)
    log.info(
        "sampling %s with %s: %d chains x %d draws%s",
        spec.name or spec.formula,
        sampler,
        chains,
        draws,
        " (adaptive)" if adaptive else "",
    )
    settings: dict[str, Any]
    if adaptive:
        budget = adaptive if isinstance(adaptive, AdaptiveSettings) else AdaptiveSettings()
        outcome = sample_adaptively(
            design,
            priors,
            seed=seed,
            draws=draws,
            tune=tune,
            chains=chains,
            sampler=sampler,
            target_accept=target_accept,
            progress=progress,
            centered=first_centered,
            settings=budget,
            sample_once=functools.partial(sample_once, low_rank=low_rank),
        )
        final, idata = outcome.final, outcome.idata
        compile_s, sample_s = outcome.compile_seconds, outcome.sample_seconds
        settings = {"adaptive": outcome.record}
    else:
        final = sample_once(
            design,
            priors,
            seed=seed,
            draws=draws,
            tune=tune,
            chains=chains,
            sampler=sampler,
            target_accept=target_accept,
            progress=progress,
            centered=first_centered,
            low_rank=low_rank,
        )
        idata, compile_s, sample_s = final.idata, final.compile_seconds, final.sample_seconds
        settings = {}
    return BayesFit(
        spec=spec,
        design=design,
        idata=idata,
        sampler=sampler,
        seed=seed,
        draws=int(idata.posterior.sizes["draw"]),  # kept per chain (a restart may lengthen them)
        tune=tune,
        chains=int(idata.posterior.sizes["chain"]),
        priors=priors,
        compile_seconds=compile_s,
        sample_seconds=sample_s,
        model_code=model_source(),
        versions=pymc_versions(sampler),
        settings={
            "target_accept": final.target_accept,
            "centered": sorted(final.centered),
            "chains_per_run": final.chains,
            "low_rank_mass_matrix": final.low_rank,
            "structure_key": final.key,
            "structure": final.parts,
            "compiled_model_reused": final.cached,
            **settings,
        },
    )


def refit(
    fit: BayesFit, data: pd.DataFrame, seed: int | None = None, *, design: Design | None = None
) -> BayesFit:
    """Fit ``fit``'s model, with its settings, to new data of the same structure.

    The compiled model is reused (no build, no compile), which is what a
    simulation study wants for its replicates.  The refit is one run (not
    adaptive) with the final settings of ``fit``: its parameterisation per
    block, ``target_accept`` and chains per run.

    Parameters
    ----------
    fit : BayesFit
        A fit whose spec, sampler, draws, tune, chains and target_accept are reused.
    data : DataFrame
        New data: same columns, same number of rows and of levels per grouping factor.
    seed : int, optional
        Defaults to ``fit.seed``.
    design : Design, optional
        A design already built from (fit.spec, data).

    Returns
    -------
    BayesFit

    Raises
    ------
    ValueError
        If the new data change the model's structure, naming what changed.
    """
    design = design if design is not None else build_design(fit.spec, data)
    centered = list(fit.settings.get("centered", []))
    new = structure(design, resolve_priors(design), centered)
    old = fit.settings.get("structure") or structure(fit.design, fit.priors, centered)
    changed = [
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k)
    ]
    if changed:
        raise ValueError(
            "the new data change the model structure, so refit cannot reuse the "
            "compiled model: " + "; ".join(changed)
        )
    return fit_pymc(
        fit.spec,
        data,
        seed=fit.seed if seed is None else seed,
        draws=fit.draws,
        tune=fit.tune,
        chains=int(fit.settings.get("chains_per_run", fit.chains)),
        sampler=fit.sampler,
        target_accept=float(fit.settings.get("target_accept", 0.8)),
        design=design,
        adaptive=False,
        centered=centered,
        low_rank=bool(fit.settings.get("low_rank_mass_matrix", False)),
    )


def clear_compiled() -> None:
    """Forget every compiled model of this process (the next fit of each structure compiles)."""
    COMPILED.clear()


def model_source() -> str:
    """The source of the functions that build the PyMC model (shown in reports)."""
    return "\n\n".join(
        inspect.getsource(f)
        for f in (
            build_model,
            _fixed_effects,
            centred_transform,
            _block_effects,
            data_containers,
            model_data,
        )
    )


def pymc_versions(sampler: str = "nutpie") -> dict[str, str]:
    """Versions of the Python side of a fit."""
    import arviz
    import pymc
    import pytensor

    versions = {
        "pymc": pymc.__version__,
        "pytensor": pytensor.__version__,
        "arviz": arviz.__version__,
    }
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
