"""A third engine: Stan through brms, with the harness's priors and design (issue 22).

brms receives the harness's own design, never the user's formula: the columns of
X (the intercept among them), each random-effects block's columns and a grouping
column per block, all under internal names (``xf1``, ``zb1t2``, ``gb1``), and the
formula ``yy ~ 0 + xf1 + xf2 + (0 + zb1t1 + zb1t2 | gb1)`` written from them.  So
brms fits exactly the fixed and random design the PyMC model and lme4 use, and
no user string reaches R's parser (the group levels become ``L001``, ``L002``, ...).

The priors are the harness's resolved priors (:func:`harness.model.priors.resolve_priors`),
one ``set_prior`` per coefficient, SD, correlation matrix and residual SD, with their
parameters passed as data (the vector ``hp``).  The Stan program therefore depends
only on the model's structure; it is compiled once per program and kept in the
cache folder (:func:`compiled_model`).

R runs through the R session of :mod:`harness.engines.lme4` (the one module that
starts R); the R code is ``r_scripts/brms.R``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harness.engines import lme4 as _r
from harness.fits import BayesFit
from harness.model.priors import ResolvedPriors, resolve_priors
from harness.model.spec import Design, ModelSpec, Prior, build_design
from harness.names import coef_var, corr_var, level_dim, offsets_var, sd_var, term_b_dim, term_dim

log = logging.getLogger("harness")

__all__ = [
    "BRMS_INSTALL_HINT",
    "BrmsModel",
    "brms_available",
    "compiled_model",
    "fit_brms",
    "log_prob",
    "prepare",
    "stan_priors",
]

BRMS_INSTALL_HINT = (
    "run `bash r_scripts/install_r.sh --with-brms` (Debian/Ubuntu: apt-get install "
    "--no-install-recommends r-cran-brms; elsewhere, in R, install.packages('brms'))"
)

#: PyMC prior -> (Stan density, its arguments in order: a PyMC parameter name or "0").
STAN_PRIORS: dict[str, tuple[str, tuple[str, ...]]] = {
    "Normal": ("normal", ("mu", "sigma")),
    "HalfNormal": ("normal", ("0", "sigma")),
    "Exponential": ("exponential", ("lam",)),
    "StudentT": ("student_t", ("nu", "mu", "sigma")),
    "HalfStudentT": ("student_t", ("nu", "0", "sigma")),
    "Cauchy": ("cauchy", ("alpha", "beta")),
    "HalfCauchy": ("cauchy", ("0", "beta")),
    "Gamma": ("gamma", ("alpha", "beta")),
    "InverseGamma": ("inv_gamma", ("alpha", "beta")),
    "LogNormal": ("lognormal", ("mu", "sigma")),
}
#: Priors whose support is the real line (the only ones a fixed effect may have here).
REAL_LINE = ("Normal", "StudentT", "Cauchy")


@cache
def _env() -> Any:
    """The harness's R environment with ``brms.R`` sourced (brms and rstan checked once)."""
    env = _r._r_env()
    found = _r._from_r(env["harness_versions"](_ro().StrVector(["brms", "rstan"]), check_load=True))
    missing = [p for p, v in zip(found["package"], found["version"], strict=True) if pd.isna(v)]
    if missing:
        raise _r.RUnavailableError(f"R package(s) {missing} not installed; {BRMS_INSTALL_HINT}")
    with _r._quiet_console():
        _ro().r["source"](str(_r.r_scripts_dir() / "brms.R"), local=env)
    _r._call("harness_brms_setup")
    return env


def _ro() -> Any:
    import rpy2.robjects as ro

    return ro


def brms_available() -> bool:
    """Whether R, rpy2, brms and rstan can be used in this process."""
    try:
        _env()
    except _r.RUnavailableError:
        return False
    return True


def brms_versions() -> dict[str, str]:
    """Versions of R, brms and rstan (for the fit's record)."""
    env = _env()
    found = _r._from_r(env["harness_versions"](_ro().StrVector(["brms", "rstan", "StanHeaders"])))
    return {str(p): str(v) for p, v in zip(found["package"], found["version"], strict=True)}


# --------------------------------------------------------------------------- names and data


def _fixed_names(design: Design) -> list[str]:
    return [f"xf{k}" for k in range(1, len(design.fixed_terms) + 1)]


def _block_names(design: Design) -> list[tuple[str, list[str]]]:
    """Per block: (grouping column, term columns)."""
    return [
        (f"gb{i}", [f"zb{i}t{j}" for j in range(1, block.n_terms + 1)])
        for i, block in enumerate(design.blocks, start=1)
    ]


def _sigma_names(design: Design) -> list[str]:
    levels = design.sigma_levels or []
    return [f"sa{k}" for k in range(1, len(levels) + 1)]


def brms_frame(design: Design) -> pd.DataFrame:
    """The data brms sees: the harness's design columns under internal names.

    The response ``yy`` (integer counts for binomial and Poisson), trials ``tn``,
    the offset ``off``, X's columns, each block's columns and its grouping column
    (a categorical whose levels ``L001``, ... follow the block's level order), and
    one 0/1 indicator per residual-SD level.
    """
    columns: dict[str, Any] = {}
    if design.family.discrete:
        columns["yy"] = np.rint(design.y).astype(np.int64)
    else:
        columns["yy"] = np.asarray(design.y, dtype=float)
    if design.trials is not None:
        columns["tn"] = np.rint(design.trials).astype(np.int64)
    if design.offset is not None:
        columns["off"] = np.asarray(design.offset, dtype=float)
    X = design.X.to_numpy(dtype=float)
    for k, name in enumerate(_fixed_names(design)):
        columns[name] = X[:, k]
    for block, (group, terms) in zip(design.blocks, _block_names(design), strict=True):
        for j, name in enumerate(terms):
            columns[name] = np.asarray(block.values[:, j], dtype=float)
        width = len(str(block.n_levels))
        labels = [f"L{i + 1:0{width}d}" for i in range(block.n_levels)]
        codes = np.asarray(block.group_index, dtype=np.int64)
        columns[group] = pd.Categorical.from_codes(codes, categories=labels)
    if design.sigma_index is not None:
        for k, name in enumerate(_sigma_names(design)):
            columns[name] = (np.asarray(design.sigma_index) == k).astype(float)
    return pd.DataFrame(columns)


# --------------------------------------------------------------------------- priors


def _stan_prior(prior: Prior, hp: list[float], what: str) -> str:
    """``prior`` as a brms prior string on the data vector ``hp`` (its parameters appended)."""
    if prior.dist not in STAN_PRIORS:
        raise ValueError(
            f"brms engine: no Stan counterpart for the prior {prior.describe()} of {what}; "
            f"supported: {sorted(STAN_PRIORS)}"
        )
    stan, args = STAN_PRIORS[prior.dist]
    wanted = {a for a in args if a != "0"}
    if set(prior.params) != wanted:
        raise ValueError(
            f"brms engine: prior {prior.describe()} of {what} must be given by "
            f"{sorted(wanted)} (PyMC's names)"
        )
    parts = []
    for arg in args:
        if arg == "0":
            parts.append("0")
        else:
            hp.append(float(prior.params[arg]))
            parts.append(f"hp[{len(hp)}]")
    return f"{stan}({', '.join(parts)})"


def stan_priors(design: Design, priors: ResolvedPriors) -> tuple[pd.DataFrame, np.ndarray]:
    """brms's prior table for the resolved priors, and their parameters (the data ``hp``).

    Returns
    -------
    table : DataFrame
        prior, class, coef, group, dpar, lb (NaN: none): one row per ``set_prior``.
    hp : ndarray
        The prior parameters the strings index (``hp[1]``, ... in Stan).

    Raises
    ------
    ValueError
        For a prior with no Stan counterpart here, or a fixed-effect prior whose
        support is not the real line.
    """
    hp: list[float] = []
    rows: list[dict[str, Any]] = []

    def row(prior: str, cls: str, coef: str = "", group: str = "", dpar: str = "", lb: Any = None):
        rows.append(
            {
                "prior": prior,
                "class": cls,
                "coef": coef,
                "group": group,
                "dpar": dpar,
                "lb": np.nan if lb is None else float(lb),
            }
        )

    for term, name in zip(design.fixed_terms, _fixed_names(design), strict=True):
        prior = priors.fixed[term]
        if prior.dist not in REAL_LINE:
            raise ValueError(
                f"brms engine: the prior {prior.describe()} of fixed effect {term!r} must have "
                f"the real line as support ({', '.join(REAL_LINE)})"
            )
        row(_stan_prior(prior, hp, f"fixed effect {term!r}"), "b", coef=name)
    for block, (group, terms) in zip(design.blocks, _block_names(design), strict=True):
        for term, name in zip(block.terms, terms, strict=True):
            what = f"the SD of {block.label}: {term}"
            row(_stan_prior(priors.sd[(block.label, term)], hp, what), "sd", coef=name, group=group)
        if block.correlated and block.n_terms > 1:
            hp.append(float(priors.lkj_eta))
            row(f"lkj_corr_cholesky(hp[{len(hp)}])", "L", group=group)
    if priors.has_sigma and design.family.has_scale:
        if design.sigma_levels is None:
            row(_stan_prior(priors.sigma, hp, "the residual SD"), "sigma")
        else:
            # sigma ~ 0 + indicators with an identity link: b_sigma[k] is level k's residual
            # SD.  brms bounds a class only as a whole (no coef), so one prior serves all
            # levels, as the harness's one residual-SD prior does.
            row(_stan_prior(priors.sigma, hp, "the residual SD"), "b", dpar="sigma", lb=0.0)
    return pd.DataFrame(rows), np.asarray(hp, dtype=float)


# --------------------------------------------------------------------------- the Stan model


@dataclass
class BrmsModel:
    """One design as brms writes it: Stan code, Stan data and how names map back."""

    design: Design
    priors: ResolvedPriors
    code: str
    data: Any  # R list: the Stan data
    key: str  # identifies the Stan program (the compiled model's cache key)
    b_names: list[str]  # X's columns in Stan's b order (internal names)
    groups: dict[str, tuple[int, list[int]]]  # grouping column -> (brms gn, cn per term)
    formula: str  # the brms call, in the user's names, for the report


def _spec_in_r(design: Design, priors: ResolvedPriors) -> Any:
    ro = _ro()
    table, hp = stan_priors(design, priors)
    blocks = ro.vectors.ListVector.from_length(len(design.blocks))
    for i, (block, (group, terms)) in enumerate(
        zip(design.blocks, _block_names(design), strict=True)
    ):
        blocks[i] = ro.vectors.ListVector(
            {
                "terms": ro.StrVector(terms),
                "group": ro.StrVector([group]),
                "correlated": ro.BoolVector([bool(block.correlated)]),
            }
        )
    prior_frame = ro.DataFrame(
        {
            "prior": ro.StrVector(table["prior"].tolist()),
            "class": ro.StrVector(table["class"].tolist()),
            "coef": ro.StrVector(table["coef"].tolist()),
            "group": ro.StrVector(table["group"].tolist()),
            "dpar": ro.StrVector(table["dpar"].tolist()),
            "lb": ro.FloatVector(table["lb"].tolist()),
        }
    )
    family, link = design.family.r_family()  # R's names; brms.R refuses any other family
    return _r._call(
        "harness_brms_spec",
        ro.StrVector(_fixed_names(design)),
        blocks,
        ro.StrVector(_sigma_names(design)),
        family,
        link,
        design.trials is not None,
        design.offset is not None,
        prior_frame,
        ro.FloatVector(hp.tolist()),
    )


def _user_formula(design: Design) -> str:
    """What brms was asked, spelled with the user's terms (R ran it on internal names)."""
    spec = design.spec
    fixed = " + ".join(f"`{t}`" for t in design.fixed_terms)
    bars = " + ".join(
        f"(0 + {' + '.join(f'`{t}`' for t in b.terms)} {'|' if b.correlated else '||'} {b.factor})"
        for b in design.blocks
    )
    rhs = " + ".join(p for p in (f"0 + {fixed}", bars) if p)
    lhs = design.response + (" | trials(...)" if design.trials is not None else "")
    text = f"brms::brm(bf({lhs} ~ {rhs}"
    if spec.sigma_by:
        text += f", sigma ~ 0 + {spec.sigma_by}), family = gaussian(link_sigma = 'identity')"
    else:
        text += f"), family = {design.family.r_family()[0]}()"
    return text + ", prior = <the harness's resolved priors>, data = data)"


def prepare(design: Design, priors: ResolvedPriors | None = None) -> BrmsModel:
    """Stan code and data for ``design`` as brms writes them.

    Parameters
    ----------
    design : Design
    priors : ResolvedPriors, optional
        Defaults to ``resolve_priors(design)``.

    Returns
    -------
    BrmsModel
    """
    _env()
    priors = priors if priors is not None else resolve_priors(design)
    frame = _r.to_r_frame(brms_frame(design))
    spec = _spec_in_r(design, priors)
    code = str(_r._call("harness_brms_code", spec, frame)[0])
    prepared = _r._call("harness_brms_data", spec, frame)
    ranef = _r._from_r(prepared.rx2("ranef"))
    groups: dict[str, tuple[int, list[int]]] = {}
    for group, terms in _block_names(design):
        rows = ranef[ranef["group"] == group].set_index("coef")
        gn = {int(v) for v in rows["gn"]}
        if len(gn) != 1 or list(rows.index) != terms:
            raise RuntimeError(f"brms grouped {group} differently from the harness: {ranef}")
        groups[group] = (gn.pop(), [int(c) for c in rows["cn"]])
    b_names = [str(n) for n in prepared.rx2("b")]
    if b_names != _fixed_names(design):
        raise RuntimeError(f"brms reordered the fixed effects: {b_names}")
    versions = brms_versions()
    text = f"{code}\n{versions.get('rstan')}\n{versions.get('brms')}"
    key = hashlib.sha256(text.encode()).hexdigest()[:20]
    return BrmsModel(
        design=design,
        priors=priors,
        code=code,
        data=prepared.rx2("data"),
        key=key,
        b_names=b_names,
        groups=groups,
        formula=_user_formula(design),
    )


def _cache_folder(cache_dir: str | Path | None) -> Path | None:
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("HARNESS_CACHE_DIR")
    return Path(env) if env else None


#: Compiled programs of this process, by key (the R objects hold the loaded library).
_COMPILED: dict[str, Any] = {}


def compiled_model(
    model: BrmsModel, cache_dir: str | Path | None = None
) -> tuple[Any, bool, float]:
    """The compiled Stan program of ``model``: (R stanmodel, from a cache?, seconds).

    One compile per Stan program: kept in this process and saved as
    ``<cache folder>/brms/<key>.rds`` (``cache_dir``, else ``$HARNESS_CACHE_DIR``;
    neither: this process only).  The key hashes the Stan code with the brms and
    rstan versions; prior values and data are not in the code, so every data set
    of one model structure shares it.
    """
    if model.key in _COMPILED:
        return _COMPILED[model.key], True, 0.0
    folder = _cache_folder(cache_dir)
    path = ""
    if folder is not None:
        (folder / "brms").mkdir(parents=True, exist_ok=True)
        path = str(folder / "brms" / f"{model.key}.rds")
    started = time.perf_counter()
    result = _r._call("harness_brms_model", model.code, path)
    seconds = time.perf_counter() - started
    _COMPILED[model.key] = result.rx2("model")
    return _COMPILED[model.key], bool(result.rx2("cached")[0]), seconds


# --------------------------------------------------------------------------- fitting


def _stan_pars(model: BrmsModel) -> list[str]:
    design = model.design
    pars = ["b"]
    if design.family.has_scale:
        pars.append("b_sigma" if design.sigma_levels is not None else "sigma")
    for block, (group, _) in zip(design.blocks, _block_names(design), strict=True):
        gn, cns = model.groups[group]
        pars.append(f"sd_{gn}")
        pars += [f"r_{gn}_{cn}" for cn in cns]
        if block.correlated and block.n_terms > 1:
            pars.append(f"Cor_{gn}")
    return pars


def _posterior(model: BrmsModel, draws: np.ndarray, names: list[str]) -> Any:
    """The draws (chain, draw, parameter) as the harness's posterior Dataset."""
    import xarray as xr

    design = model.design
    at = {name: i for i, name in enumerate(names)}

    def take(stan_names: list[str]) -> np.ndarray:
        return draws[:, :, [at[n] for n in stan_names]]

    K = len(design.fixed_terms)
    variables: dict[str, Any] = {
        "beta": (("chain", "draw", "fixed_term"), take([f"b[{k}]" for k in range(1, K + 1)]))
    }
    coords: dict[str, Any] = {"fixed_term": design.fixed_terms}
    if design.family.has_scale:
        if design.sigma_levels is None:
            variables["sigma"] = (("chain", "draw"), take(["sigma"])[:, :, 0])
        else:
            n = len(design.sigma_levels)
            names_s = [f"b_sigma[{k}]" for k in range(1, n + 1)]
            variables["sigma"] = (("chain", "draw", "sigma_level"), take(names_s))
            coords["sigma_level"] = design.sigma_levels
    for block, (group, _) in zip(design.blocks, _block_names(design), strict=True):
        gn, cns = model.groups[group]
        coords[level_dim(block)] = block.levels
        coords[term_dim(block)] = block.terms
        sd = take([f"sd_{gn}[{cn}]" for cn in cns])
        variables[sd_var(block)] = (("chain", "draw", term_dim(block)), sd)
        u = np.stack(
            [take([f"r_{gn}_{cn}[{lv}]" for lv in range(1, block.n_levels + 1)]) for cn in cns],
            axis=-1,
        )  # (chain, draw, level, term)
        dims = ("chain", "draw", level_dim(block), term_dim(block))
        variables[offsets_var(block)] = (dims, u)
        if design.spec.parameterization == "baked_in":
            centre = np.stack(
                [
                    variables["beta"][1][:, :, design.fixed_terms.index(t)]
                    if t in design.fixed_terms
                    else np.zeros(u.shape[:2])
                    for t in block.terms
                ],
                axis=-1,
            )
            variables[coef_var(block)] = (dims, u + centre[:, :, None, :])
        if block.correlated and block.n_terms > 1:
            k = block.n_terms
            cor = take([f"Cor_{gn}[{a},{b}]" for a in cns for b in cns]).reshape(
                (*draws.shape[:2], k, k)
            )
            coords[term_b_dim(block)] = block.terms
            dims_c = ("chain", "draw", term_dim(block), term_b_dim(block))
            variables[corr_var(block)] = (dims_c, cor)
    return xr.Dataset(
        variables,
        coords={
            "chain": np.arange(draws.shape[0]),
            "draw": np.arange(draws.shape[1]),
            **coords,
        },
    )


def fit_brms(
    spec: ModelSpec,
    data: pd.DataFrame,
    priors: ResolvedPriors | None = None,
    *,
    draws: int = 1000,
    tune: int = 1000,
    chains: int = 4,
    seed: int = 1,
    design: Design | None = None,
    adapt_delta: float = 0.8,
    max_treedepth: int = 10,
    cache_dir: str | Path | None = None,
) -> BayesFit:
    """Fit ``spec`` with brms (Stan's NUTS) under the harness's priors.

    Parameters
    ----------
    spec : ModelSpec
    data : DataFrame
    priors : ResolvedPriors, optional
        Defaults to ``resolve_priors(design)``: the priors the PyMC fit uses.
    draws, tune, chains, seed : int
        Stan's post-warmup draws per chain, warmup, chains and seed.
    design : Design, optional
        A design already built from (spec, data).
    adapt_delta, max_treedepth : float, int
        Stan's NUTS controls.
    cache_dir : str or Path, optional
        Where the compiled model is kept (see :func:`compiled_model`).

    Returns
    -------
    BayesFit
        ``sampler="brms"``; the posterior carries the PyMC fit's variable names and
        coordinates (``beta``, ``sigma``, ``sd_<label>``, ``corr_<label>``, ``u_<label>``).

    Raises
    ------
    harness.engines.lme4.RUnavailableError
        When R, rpy2, brms or rstan is missing.
    """
    import arviz as az

    design = design if design is not None else build_design(spec, data)
    model = prepare(design, priors)
    stan, cached, compile_seconds = compiled_model(model, cache_dir)
    log.info(
        "brms: model %s %s in %.1f s",
        model.key,
        "read from the cache" if cached else "compiled",
        compile_seconds,
    )
    ro = _ro()
    started = time.perf_counter()
    result = _r._call(
        "harness_brms_sample",
        stan,
        model.data,
        int(chains),
        int(tune + draws),
        int(tune),
        int(seed),
        float(adapt_delta),
        int(max_treedepth),
        ro.StrVector(_stan_pars(model)),
    )
    sample_seconds = time.perf_counter() - started
    messages = [str(m).strip() for m in result.rx2("messages")]
    for message in messages:
        log.warning("brms (rstan): %s", message.splitlines()[0])
    dim = [int(d) for d in result.rx2("dim")]
    values = np.asarray(result.rx2("draws"), dtype=float).reshape(dim, order="F")
    values = np.transpose(values, (1, 0, 2))  # (chain, draw, parameter)
    names = [str(n) for n in result.rx2("names")]
    posterior = _posterior(model, values, names)

    def stat(name: str) -> np.ndarray:
        arr = np.asarray(result.rx2(name), dtype=float).reshape((dim[0], dim[1]), order="F")
        return arr.T

    import xarray as xr

    sample_stats = xr.Dataset(
        {
            "diverging": (("chain", "draw"), stat("divergent") > 0),
            "tree_depth": (("chain", "draw"), stat("treedepth")),
            "step_size": (("chain", "draw"), stat("stepsize")),
            "energy": (("chain", "draw"), stat("energy")),
            "lp": (("chain", "draw"), values[:, :, names.index("lp__")]),
        },
        coords={"chain": posterior["chain"], "draw": posterior["draw"]},
    )
    idata = az.InferenceData(posterior=posterior, sample_stats=sample_stats)
    versions = brms_versions()
    return BayesFit(
        spec=spec,
        design=design,
        idata=idata,
        sampler="brms",
        engine="brms",
        seed=seed,
        draws=draws,
        tune=tune,
        chains=chains,
        priors=model.priors,
        compile_seconds=0.0 if cached else compile_seconds,
        sample_seconds=sample_seconds,
        model_code=f"# {model.formula}\n{model.code}",
        versions=versions,
        settings={
            "engine": "brms",
            "structure_key": model.key,
            "compiled_cached": cached,
            "adapt_delta": adapt_delta,
            "max_treedepth": max_treedepth,
            "messages": messages,
        },
    )


# --------------------------------------------------------------------------- log density


def log_prob(model: BrmsModel, points: list[dict[str, Any]], cache_dir: str | Path | None = None):
    """Stan's log density at parameter points given on brms's constrained scale.

    Parameters
    ----------
    model : BrmsModel
    points : list of dict
        Every Stan parameter of the program by name (``b``, ``sd_1``, ``z_1``
        (terms x levels), ``L_1``, ``sigma`` or ``b_sigma``) -> array.

    Returns
    -------
    DataFrame
        One row per point: ``constrained`` (``log_prob`` without the Jacobian of
        Stan's transforms, a density on the parameters themselves) and
        ``unconstrained`` (with it).
    """
    ro = _ro()
    stan, _, _ = compiled_model(model, cache_dir)
    r_points = ro.vectors.ListVector.from_length(len(points))
    for i, point in enumerate(points):
        entries = {}
        for name, value in point.items():
            arr = np.asarray(value, dtype=float)
            vec = ro.FloatVector(arr.ravel(order="F").tolist())
            if arr.ndim >= 1:
                vec = ro.r["array"](vec, dim=ro.IntVector(list(arr.shape)))
            entries[name] = vec
        r_points[i] = ro.vectors.ListVector(entries)
    out = _r._call("harness_brms_log_prob", stan, model.data, r_points)
    flat = np.asarray(list(out), dtype=float)  # an R matrix: column-major
    table = flat.reshape((len(points), 2), order="F")
    return pd.DataFrame(table, columns=["constrained", "unconstrained"])
