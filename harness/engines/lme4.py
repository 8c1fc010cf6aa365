"""The frequentist engine: lme4 (or nlme when residual SDs vary), through rpy2.

This is the only module that imports rpy2, and only inside functions, so
``import harness`` works on a machine without R.  R code lives in
``r_scripts/fit.R``, sourced once per process into a private environment;
conversion happens here, with a local converter per call, column by column
(no ``pandas2ri.activate()``, no global state in R's global environment).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harness.spec import Design, ModelSpec, build_design, parse_formula

log = logging.getLogger("harness")

INSTALL_HINT = (
    "run `bash r_scripts/install_r.sh` (Debian/Ubuntu: apt-get install --no-install-recommends "
    "r-base-core r-cran-lme4 r-cran-nlme r-cran-mertools r-cran-lmertest r-cran-pbkrtest "
    "r-cran-mass; elsewhere install R >= 4.2 and, in R, install.packages(c('lme4', 'nlme', "
    "'merTools', 'lmerTest', 'pbkrtest', 'MASS'))) and `pip install 'rpy2>=3.5,<3.6'`"
)


class RUnavailableError(RuntimeError):
    """R, rpy2 or an R package the fit needs is missing."""


@dataclass
class FreqFit:
    """A frequentist fit as tidy tables.

    Attributes
    ----------
    fixed : DataFrame
        term, estimate, se, df, statistic, p_value, lower, upper, ci_method.
    variance : DataFrame
        component, group_factor, kind ("sd"/"cor"/"sigma"), term, term2,
        estimate, lower, upper, ci_method.
    ranef : DataFrame
        group_factor, group, term, mode, condsd (conditional on the estimates).
    ranef_sims : DataFrame or None
        merTools::REsim summary: group_factor, group, term, sim_mean, sim_median, sim_sd.
    """

    spec: ModelSpec
    design: Design
    engine: str
    method: str
    fixed: pd.DataFrame
    variance: pd.DataFrame
    ranef: pd.DataFrame
    ranef_sims: pd.DataFrame | None
    loglik: float
    loglik_ml: float
    reml_criterion: float | None
    singular: bool
    converged: bool
    messages: list[str]
    versions: dict[str, str]
    r_call: str
    fit_seconds: float
    ml_estimates: dict[str, Any] = field(default_factory=dict)
    df_method: str = ""

    @property
    def stand_in(self) -> str | None:
        """Why another engine stood in for lme4, if one did."""
        if self.engine == "nlme":
            return (
                f"lme4 cannot fit one residual SD per level of {self.spec.sigma_by!r}; "
                f"nlme::lme with weights = varIdent(form = ~ 1 | {self.spec.sigma_by}) stood in"
            )
        return None


# --------------------------------------------------------------------------- R session


def r_scripts_dir() -> Path:
    """Where ``fit.R`` lives: ``$HARNESS_R_SCRIPTS`` or the repository's ``r_scripts/``."""
    override = os.environ.get("HARNESS_R_SCRIPTS")
    candidates = [Path(override)] if override else []
    candidates.append(Path(__file__).resolve().parents[2] / "r_scripts")
    for path in candidates:
        if (path / "fit.R").is_file():
            return path
    raise RUnavailableError(
        "r_scripts/fit.R not found; install the harness from its repository with "
        "`pip install -e .` or set HARNESS_R_SCRIPTS"
    )


@cache
def _r_env() -> Any:
    """Import rpy2, start R, and source fit.R into a private environment (once)."""
    # Starting R prepends R's library folders to LD_LIBRARY_PATH in this process's
    # environment; child processes started later (Dask workers, subprocesses) would
    # then load R's copies of system libraries.  R itself needs it only at start-up.
    library_path = os.environ.get("LD_LIBRARY_PATH")
    try:
        import rpy2.robjects as ro
    except Exception as err:  # ImportError, or R shared library missing / wrong
        raise RUnavailableError(f"rpy2 cannot start R ({err}); {INSTALL_HINT}") from None
    finally:
        _restore_library_path(library_path)
    missing = list(
        ro.r(
            'c("lme4", "nlme", "merTools", "lmerTest", "MASS")'
            "[!vapply(c('lme4', 'nlme', 'merTools', 'lmerTest', 'MASS'), "
            "requireNamespace, logical(1), quietly = TRUE)]"
        )
    )
    if "lme4" in missing or "nlme" in missing:
        raise RUnavailableError(f"R package(s) {missing} not installed; {INSTALL_HINT}")
    if missing:
        log.warning("optional R package(s) %s missing; %s", missing, INSTALL_HINT)
    env = ro.r("new.env()")
    with _quiet_console():
        ro.r["source"](str(r_scripts_dir() / "fit.R"), local=env)
        if (r_scripts_dir() / "glmm.R").is_file():  # GLMM hook (issue 12)
            ro.r["source"](str(r_scripts_dir() / "glmm.R"), local=env)
    _restore_library_path(library_path)
    return env


def _restore_library_path(value: str | None) -> None:
    if value is None:
        os.environ.pop("LD_LIBRARY_PATH", None)
    else:
        os.environ["LD_LIBRARY_PATH"] = value


@contextlib.contextmanager
def _quiet_console() -> Iterator[list[str]]:
    """Route R's console output to the harness logger instead of stdout."""
    from rpy2.rinterface_lib import callbacks

    captured: list[str] = []
    old_print, old_warn = callbacks.consolewrite_print, callbacks.consolewrite_warnerror

    def keep(text: str) -> None:
        captured.append(text)
        log.debug("R: %s", text.rstrip())

    callbacks.consolewrite_print = keep
    callbacks.consolewrite_warnerror = keep
    try:
        yield captured
    finally:
        callbacks.consolewrite_print, callbacks.consolewrite_warnerror = old_print, old_warn


def r_available() -> bool:
    """Whether R, rpy2 and lme4 can be used in this process."""
    try:
        _r_env()
    except RUnavailableError:
        return False
    return True


def _call(function: str, *args: Any, **kwargs: Any) -> Any:
    from rpy2.rinterface_lib.embedded import RRuntimeError

    env = _r_env()
    with _quiet_console() as console:
        try:
            return env[function](*args, **kwargs)
        except RRuntimeError as err:
            text = "".join(console).strip() or str(err)
            raise RuntimeError(f"R {function}() failed: {text}") from None


# --------------------------------------------------------------------------- conversion


def to_r_frame(data: pd.DataFrame) -> Any:
    """A pandas DataFrame as an R data.frame, categoricals as factors with their levels."""
    _r_env()  # R starts there (clear error if it cannot, environment kept clean)
    import rpy2.robjects as ro

    columns: dict[str, Any] = {}
    for name in data.columns:
        values = data[name]
        if isinstance(values.dtype, pd.CategoricalDtype):
            levels = ro.StrVector([str(c) for c in values.cat.categories])
            labels = ro.StrVector(
                [ro.NA_Character if pd.isna(v) else str(v) for v in values.astype(object)]
            )
            columns[str(name)] = ro.r["factor"](labels, levels=levels)
        elif pd.api.types.is_bool_dtype(values):
            columns[str(name)] = ro.BoolVector(values.to_numpy().tolist())
        elif pd.api.types.is_integer_dtype(values):
            columns[str(name)] = ro.IntVector(values.to_numpy().tolist())
        elif pd.api.types.is_numeric_dtype(values):
            columns[str(name)] = ro.FloatVector(values.to_numpy(dtype=float).tolist())
        else:
            columns[str(name)] = ro.StrVector([str(v) for v in values])
    return ro.DataFrame(columns)


def _from_r(obj: Any) -> Any:
    """R value -> Python: data.frame -> DataFrame, named list -> dict, vectors -> arrays/scalars."""
    import rpy2.rinterface as ri
    import rpy2.robjects as ro

    if obj is ri.NULL or obj is None:
        return None
    if isinstance(obj, ro.DataFrame):
        out = {}
        for name, column in zip(obj.names, obj, strict=True):
            out[str(name)] = _vector(column)
        return pd.DataFrame(out)
    if isinstance(obj, ro.vectors.ListVector):
        names = list(obj.names) if obj.names is not ri.NULL else [str(i) for i in range(len(obj))]
        return {str(n): _from_r(v) for n, v in zip(names, obj, strict=True)}
    if isinstance(obj, ro.vectors.Matrix):
        arr = np.asarray(obj)
        return arr
    values = _vector(obj)
    names = getattr(obj, "names", ri.NULL)
    if names is not ri.NULL and names is not None and len(values) > 0:
        return dict(zip([str(n) for n in names], values.tolist(), strict=True))
    if len(values) == 1:
        return values[0].item() if hasattr(values[0], "item") else values[0]
    return values


def _vector(column: Any) -> np.ndarray:
    import rpy2.robjects as ro

    if isinstance(column, ro.vectors.FactorVector):
        levels = np.asarray(list(column.levels), dtype=object)
        codes = np.asarray(list(column), dtype=int)
        return np.asarray(np.where(codes > 0, levels[np.clip(codes - 1, 0, None)], None))
    if isinstance(column, ro.vectors.StrVector):
        return np.asarray([None if v is ro.NA_Character else str(v) for v in column], dtype=object)
    if isinstance(column, ro.vectors.BoolVector):
        return np.asarray(list(column), dtype=bool)
    if isinstance(column, ro.vectors.IntVector):
        return np.asarray([np.nan if v == ro.NA_Integer else v for v in column], dtype=float)
    return np.asarray(column, dtype=float)


# --------------------------------------------------------------------------- fits


def _lme_pieces(design: Design) -> dict[str, Any]:
    """Translate the lme4 formula to nlme's fixed / random / group arguments."""
    parsed = parse_formula(design.spec.formula)
    factors = {b.factor for b in parsed.bars}
    if len(factors) != 1 or ":" in next(iter(factors)):
        raise ValueError(
            f"sigma_by={design.spec.sigma_by!r} needs nlme, which the harness drives for a single "
            f"grouping factor only; formula {design.spec.formula!r} has {sorted(factors)}"
        )
    group = next(iter(factors))
    exprs = [b.expr for b in parsed.bars]
    correlated = len(parsed.bars) == 1 and parsed.bars[0].correlated
    if len(parsed.bars) > 1 and any(b.correlated for b in parsed.bars):
        raise ValueError(
            f"formula {design.spec.formula!r}: with sigma_by the random part must be one "
            "(expr | g) or one (expr || g) term"
        )
    random_rhs = (
        exprs[0]
        if len(exprs) == 1
        else " + ".join(e.replace("0 + ", "") if e.startswith("0 + ") else e for e in exprs)
    )
    if not correlated and len(exprs) > 1:
        random_rhs = ("1 + " if "1" in exprs else "0 + ") + " + ".join(
            e[4:] for e in exprs if e.startswith("0 + ")
        )
    return {
        "fixed": f"{parsed.response} ~ {parsed.fixed_rhs}",
        "random_rhs": random_rhs,
        "group": group,
        "correlated": correlated,
    }


def _r_call_text(design: Design, reml: bool, pieces: dict[str, Any] | None) -> str:
    if pieces is None:
        return f"lmerTest::lmer({design.spec.formula}, data = data, REML = {str(reml).upper()})"
    pd_class = "pdLogChol" if pieces["correlated"] else "pdDiag"
    return (
        f"nlme::lme(fixed = {pieces['fixed']},\n"
        f"          random = list({pieces['group']} = {pd_class}(~ {pieces['random_rhs']})),\n"
        f"          weights = varIdent(form = ~ 1 | {design.spec.sigma_by}),\n"
        f'          data = data, method = "{"REML" if reml else "ML"}")'
    )


def fit_lme4(
    spec: ModelSpec,
    data: pd.DataFrame,
    *,
    reml: bool | None = None,
    profile: bool = False,
    n_sims: int = 1000,
    seed: int = 1,
    design: Design | None = None,
) -> FreqFit:
    """Fit ``spec`` with lme4 (nlme stands in when ``spec.sigma_by`` is set).

    Parameters
    ----------
    spec : ModelSpec
    data : DataFrame
    reml : bool, optional
        Overrides ``spec.reml``.
    profile : bool
        Profile-likelihood CIs for variance components (and fixed effects).
    n_sims : int
        Draws for ``merTools::REsim`` (0 to skip).
    seed : int
        Seed for REsim.
    design : Design, optional
        A design already built from (spec, data).

    Returns
    -------
    FreqFit
    """
    design = design if design is not None else build_design(spec, data)
    reml = spec.reml if reml is None else reml
    started = time.perf_counter()
    frame = to_r_frame(design.data)
    pieces = None
    if design.family.glm:  # GLMM hook (issue 12): glmer, see r_scripts/glmm.R
        result = _fit_glmer(design, frame, spec.formula, profile=profile)
        ml = {
            "beta": result["ml_beta"],
            "theta": result["ml_theta"],
            "sigma": 1.0,
            "lp0": np.asarray(result["lp0"], dtype=float),
            "tol_pwrss": float(result["tol_pwrss"]),
        }
    elif spec.sigma_by:
        pieces = _lme_pieces(design)
        result = _from_r(
            _call(
                "harness_fit_lme",
                frame,
                pieces["fixed"],
                pieces["random_rhs"],
                pieces["group"],
                spec.sigma_by,
                REML=reml,
                correlated=pieces["correlated"],
            )
        )
        ml = {
            "beta": result["ml_beta"],
            "G": np.atleast_2d(np.asarray(result["ml_G"], dtype=float)),
            "sigma": result["ml_sigma"],
        }
    else:
        result = _from_r(
            _call(
                "harness_fit_lmer",
                frame,
                spec.formula,
                REML=reml,
                profile=profile,
                n_sims=int(n_sims),
                seed=int(seed),
            )
        )
        ml = {
            "beta": result["ml_beta"],
            "theta": result["ml_theta"],
            "sigma": result["ml_sigma"],
        }
    elapsed = time.perf_counter() - started
    info = result["info"]
    notes = result["notes"]
    messages = [] if notes is None else [str(n) for n in np.atleast_1d(notes)]
    messages = design.notes + messages
    versions = r_versions()
    fixed = result["fixed"]
    variance = result["variance"]
    for frame_ in (fixed, variance):
        for column in ("term", "term2", "group_factor", "component", "kind", "ci_method"):
            if column in frame_:
                frame_[column] = frame_[column].astype(object)
    fit = FreqFit(
        spec=spec,
        design=design,
        engine=str(info["engine"]),
        method=str(info["method"]),
        fixed=fixed,
        variance=variance,
        ranef=result["ranef"],
        ranef_sims=result["sims"],
        loglik=float(info["loglik"]),
        loglik_ml=float(info["loglik_ml"]),
        reml_criterion=None if pd.isna(info["reml_criterion"]) else float(info["reml_criterion"]),
        singular=bool(info["singular"]),
        converged=bool(info["converged"]),
        messages=messages,
        versions=versions,
        r_call=_glmer_call_text(design)
        if design.family.glm
        else _r_call_text(design, reml, pieces),
        fit_seconds=elapsed,
        ml_estimates=ml,
        df_method=str(info["df_method"]),
    )
    for message in messages:
        log.info("%s: %s", fit.engine, message)
    return fit


def _fit_glmer(
    design: Design, frame: Any, formula: str, n_agq: int = 1, profile: bool = False
) -> dict[str, Any]:
    """``lme4::glmer`` on the design's data; family and link are names from a fixed table."""
    family, link = design.family.r_family()
    return _from_r(
        _call("harness_fit_glmer", frame, formula, family, link, nAGQ=int(n_agq), profile=profile)
    )


def _glmer_call_text(design: Design) -> str:
    family, link = design.family.r_family()
    return (
        f"lme4::glmer({design.spec.formula}, data = data, "
        f'family = {family}(link = "{link}"), nAGQ = 1)'
    )


def fit_glmer_agq(spec: ModelSpec, data: pd.DataFrame, n_agq: int) -> dict[str, Any]:
    """glmer with ``nAGQ = n_agq`` adaptive Gauss-Hermite points (one scalar random effect).

    Returns the raw tables (``fixed``, ``variance``, ``info`` with ``loglik``,
    ``ml_beta``, ``ml_theta``) for the quadrature check of :mod:`harness.laplace`.
    """
    design = build_design(spec, data)
    if not design.family.glm:
        raise ValueError(f"nAGQ applies to glmer families, not {spec.family!r}")
    return _fit_glmer(design, to_r_frame(design.data), spec.formula, n_agq)


def lformula(spec: ModelSpec, data: pd.DataFrame) -> dict[str, Any]:
    """lme4's own X and Z (``lme4::lFormula``) for the design-equality tests."""
    design = build_design(spec, data)
    result = _from_r(_call("harness_lformula", to_r_frame(design.data), spec.formula))
    return result


def simulate_cafe_in_r(n_cafes: int, n_visits: int, **values: float) -> pd.DataFrame:
    """The book's cafe data, drawn with R's RNG (``set.seed(5)``, ``set.seed(22)``)."""
    result = _from_r(
        _call("harness_simulate_cafe", n_cafes=int(n_cafes), n_visits=int(n_visits), **values)
    )
    return result


@cache
def r_versions() -> dict[str, str]:
    """Versions of R and the R packages the harness uses (asked once per process)."""
    frame = _from_r(_call("harness_versions"))
    return dict(zip(frame["package"], frame["version"], strict=True))
