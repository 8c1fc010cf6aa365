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
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harness import _resources
from harness.fits import FreqFit
from harness.model.family import GlmResponse, glm_response
from harness.model.rformula import FORMULA_FUNCTIONS, _scan, model_matrix, parse_terms
from harness.model.spec import (
    BarTerm,
    Design,
    ModelSpec,
    ParsedFormula,
    build_design,
    make_names,
    parse_formula,
)

log = logging.getLogger("harness")

INSTALL_HINT = (
    "run `bash r_scripts/install_r.sh` (Debian/Ubuntu: apt-get install --no-install-recommends "
    "r-base-core r-cran-lme4 r-cran-nlme r-cran-mertools r-cran-lmertest r-cran-pbkrtest "
    "r-cran-mass; elsewhere install R >= 4.2 and, in R, install.packages(c('lme4', 'nlme', "
    "'merTools', 'lmerTest', 'pbkrtest', 'MASS'))) and `pip install 'rpy2>=3.5,<3.6'`"
)


class RUnavailableError(RuntimeError):
    """R, rpy2 or an R package the fit needs is missing."""


# --------------------------------------------------------------------------- R session


def r_scripts_dir() -> Path:
    """Where ``fit.R`` lives (see :mod:`harness._resources`)."""
    try:
        return _resources.r_scripts_dir()
    except _resources.RScriptsMissingError as err:
        raise RUnavailableError(str(err)) from None


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
    env = ro.r("new.env()")
    scripts = r_scripts_dir()
    with _quiet_console():
        ro.r["source"](str(scripts / "versions.R"), local=env)
    wanted = ["lme4", "nlme", "merTools", "lmerTest", "MASS"]
    found = _from_r(env["harness_versions"](ro.StrVector(wanted), check_load=True))
    missing = [p for p, v in zip(found["package"], found["version"], strict=True) if pd.isna(v)]
    if "lme4" in missing or "nlme" in missing:
        raise RUnavailableError(f"R package(s) {missing} not installed; {INSTALL_HINT}")
    if missing:
        log.warning("optional R package(s) %s missing; %s", missing, INSTALL_HINT)
    with _quiet_console():
        ro.r["source"](str(scripts / "fit.R"), local=env)
        ro.r["source"](str(scripts / "glmm.R"), local=env)  # GLMM (issue 12)
        ro.r["source"](str(scripts / "refit.R"), local=env)  # lme4's other optimizers (issue 20)
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


@contextlib.contextmanager
def _interruptible() -> Iterator[list[int]]:
    """Let Ctrl-C (SIGINT) stop R: the signal sets R's own interrupt flag.

    rpy2 leaves Python's handler in place, which raises KeyboardInterrupt
    inside the cffi callback R calls to process events; the exception is
    then printed and dropped ("Exception ignored from cffi callback
    _processevents") and R runs on.  Here the handler only sets
    ``R_interrupts_pending``, so R stops at its next interrupt check with an
    error, and :func:`_call` raises KeyboardInterrupt once R has returned.
    A second Ctrl-C restores the default action and ends the process.
    """
    import signal
    import threading

    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    from rpy2.rinterface_lib import openrlib

    def on_sigint(signum: int, frame: Any) -> None:
        received.append(signum)
        if len(received) > 1:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        openrlib.rlib.R_interrupts_pending = 1

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield received
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            openrlib.rlib.R_interrupts_pending = 0


def _call(function: str, *args: Any, **kwargs: Any) -> Any:
    from rpy2.rinterface_lib.embedded import RRuntimeError

    env = _r_env()
    with _quiet_console() as console, _interruptible() as interrupted:
        try:
            value = env[function](*args, **kwargs)
        except RRuntimeError as err:
            if interrupted:
                raise KeyboardInterrupt from None
            text = "".join(console).strip() or str(err)
            raise RuntimeError(f"R {function}() failed: {text}") from None
        if interrupted:
            raise KeyboardInterrupt
        return value


# --------------------------------------------------------------------------- names R sees

# Internal column names: syntactic in R and in formulae, and ending in "_" so that a
# factor level pasted after one ("v3_B") still shows where the name ends.
_INTERNAL = re.compile(r"(?<![A-Za-z0-9_])v([0-9]+)_")
# Operators a rebuilt formula may contain (R's names for them in all.names()).
_R_OPERATORS = ("~", "+", "-", "*", "/", ":", "^", "%in%", "(", "|")
#: Calls a GLMM formula may hold besides FORMULA_FUNCTIONS (issue 12).
_GLM_CALLS = ("cbind", "offset", "log")


@dataclass
class RNames:
    """The one place where user names become R data: columns renamed, formulas rebuilt.

    R sees only internal column names ``v1_``, ``v2_``, ... and formulas rebuilt
    from the harness's own parse (:func:`harness.model.spec.parse_formula`) out of
    those names, numbers, operators and the allowed functions; R checks the
    formula's symbols against :attr:`symbols` before evaluating it.  Every name
    R returns is mapped back with :meth:`user`, so tables spell terms, factors
    and components exactly as lme4 would with the user's names.
    """

    columns: dict[str, str]  # user column -> internal
    formula: str  # lme4 formula on internal names
    sigma_by: str | None
    back: dict[str, str]  # internal spelling -> user spelling (exact names)
    parsed: ParsedFormula  # the internal formula's parse

    @property
    def symbols(self) -> list[str]:
        """Every name the internal formula may use (for R's own check)."""
        return [*self.columns.values(), "I", *FORMULA_FUNCTIONS, *_R_OPERATORS, *_GLM_CALLS]

    def user(self, text: Any) -> Any:
        """An R name (term, factor, block label, theta name, message) in the user's names."""
        if not isinstance(text, str):
            return text
        if text in self.back:
            return self.back[text]
        inverse = {v: k for k, v in self.columns.items()}
        return _INTERNAL.sub(lambda m: inverse.get(m[0], m[0]), text)


def _rename_expression(text: str, columns: Mapping[str, str], context: str) -> str:
    """An R expression rebuilt token by token with internal column names.

    Only tokens the harness's scanner accepts survive (names, numbers,
    arithmetic and formula operators, parentheses); a name is a column or,
    before '(', one of the allowed functions.  Anything else is refused.
    """
    tokens = [t for t in _scan(text, context) if t.kind != "EOF"]
    out: list[str] = []
    for i, token in enumerate(tokens):
        if token.kind == "IDENTIFIER":
            calls = i + 1 < len(tokens) and tokens[i + 1].kind == "LEFT_PAREN"
            if calls:
                if token.lexeme != "I" and token.lexeme not in FORMULA_FUNCTIONS:
                    raise ValueError(f"{context}: function {token.lexeme}() is not supported")
                out.append(token.lexeme)
            elif token.lexeme in columns:
                out.append(columns[token.lexeme])
            else:
                raise ValueError(f"{context}: {token.lexeme!r} is not a column of the data")
        elif token.kind == "NUMBER":
            if not re.fullmatch(r"[0-9]+(\.[0-9]*)?|\.[0-9]+", token.lexeme):
                raise ValueError(f"{context}: cannot read number {token.lexeme!r}")
            out.append(token.lexeme)
        elif token.kind == "STAR_STAR":
            out.append("^")
        else:
            out.append(token.lexeme)
    return " ".join(out)


def _rename_factor(factor: str, columns: Mapping[str, str]) -> str:
    # parse_formula has checked the factor: column names joined by ':', '/' and parentheses.
    return re.sub(r"[A-Za-z.][A-Za-z0-9._]*", lambda m: columns[m[0]], factor)


def _glm_pieces(glm: GlmResponse, columns: Mapping[str, str], context: str) -> tuple[str, str]:
    """A GLMM's left-hand side and offset term, as lme4 writes them, on internal names."""

    def name(column: str) -> str:
        if column not in columns:
            raise ValueError(f"{context}: {column!r} is not a column of the data")
        return columns[column]

    if glm.failures is not None:
        response = f"cbind({name(glm.successes)}, {name(glm.failures)})"
    elif glm.trials is not None:
        response = f"cbind({name(glm.successes)}, {name(glm.trials)} - {name(glm.successes)})"
    else:
        response = name(glm.successes)
    offset = ""
    if glm.offset is not None:
        inner = f"log({name(glm.offset)})" if glm.offset_log else name(glm.offset)
        offset = f" + offset({inner})"
    return response, offset


def r_names(design: Design) -> RNames:
    """Internal names for ``design``: columns, the rebuilt formula and the way back.

    Raises
    ------
    ValueError
        If the formula holds anything but the data's columns, numbers,
        operators and the allowed functions (the parse refuses more before).
    """
    spec = design.spec
    user_columns = [str(c) for c in design.data.columns]
    columns = {name: f"v{i}_" for i, name in enumerate(user_columns, start=1)}
    glm = glm_response(spec.formula, spec.family, spec.link)  # None for gaussian
    parsed = parse_formula(glm.formula if glm else spec.formula)
    context = f"formula {spec.formula!r}"
    response = _rename_expression(parsed.response, columns, context)
    offset = ""
    if glm is not None:
        response, offset = _glm_pieces(glm, columns, context)
    fixed_rhs = _rename_expression(parsed.fixed_rhs, columns, context)
    bars = [
        (b, _rename_expression(b.expr, columns, context), _rename_factor(b.factor, columns))
        for b in parsed.bars
    ]
    random = " + ".join(f"({expr} | {factor})" for _, expr, factor in bars)
    formula = f"{response} ~ {fixed_rhs} + {random}{offset}"
    internal = ParsedFormula(
        response=response,
        fixed_rhs=fixed_rhs,
        bars=tuple(BarTerm(expr, factor, b.correlated) for b, expr, factor in bars),
    )

    # Names R will return, computed both ways on the design's (empty) frame: the model
    # matrix names only need the columns' kinds and factor levels.
    empty = design.data.iloc[:0]
    empty_r = empty.rename(columns=columns)
    back: dict[str, str] = {v: k for k, v in columns.items()}

    def pair(user_rhs: str, r_rhs: str) -> None:
        names_u = model_matrix(parse_terms(user_rhs, context), empty, context).columns
        names_r = model_matrix(parse_terms(r_rhs, context), empty_r, context).columns
        back.update(zip(map(str, names_r), map(str, names_u), strict=True))

    pair(parsed.fixed_rhs, fixed_rhs)
    factor_r = {}
    for b, expr, factor in bars:
        pair(b.expr, expr)
        factor_r[b.factor] = factor
        back[factor] = b.factor
    factors_u = [block.factor for block in design.blocks]
    factors_r = [factor_r[f] for f in factors_u]
    if len(set(factors_r)) < len(factors_r):
        back.update(zip(make_names(factors_r), make_names(factors_u), strict=True))
    sigma_by = columns[spec.sigma_by] if spec.sigma_by else None
    return RNames(columns=columns, formula=formula, sigma_by=sigma_by, back=back, parsed=internal)


# --------------------------------------------------------------------------- conversion


def to_r_frame(data: pd.DataFrame, names: Mapping[str, str] | None = None) -> Any:
    """A pandas DataFrame as an R data.frame, categoricals as factors with their levels.

    ``names`` maps column names to the names R sees (see :func:`r_names`); a
    fit passes it so that no user name reaches R.
    """
    _r_env()  # R starts there (clear error if it cannot, environment kept clean)
    import rpy2.robjects as ro

    columns: dict[str, Any] = {}
    for name in data.columns:
        values = data[name]
        name = names[str(name)] if names is not None else name
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
        # R's logical NA (an optimizer that did not report convergence) has no bool.
        values = [None if v is ro.NA_Logical else bool(v) for v in column]
        if any(v is None for v in values):
            return np.asarray(values, dtype=object)
        return np.asarray(values, dtype=bool)
    if isinstance(column, ro.vectors.IntVector):
        return np.asarray([np.nan if v == ro.NA_Integer else v for v in column], dtype=float)
    return np.asarray(column, dtype=float)


# --------------------------------------------------------------------------- fits


def _lme_pieces(parsed: ParsedFormula, spec: ModelSpec) -> dict[str, Any]:
    """Translate a parsed lme4 formula to nlme's fixed / random / group arguments."""
    factors = {b.factor for b in parsed.bars}
    if len(factors) != 1 or ":" in next(iter(factors)):
        raise ValueError(
            f"sigma_by={spec.sigma_by!r} needs nlme, which the harness drives for a single "
            f"grouping factor only; formula {spec.formula!r} has "
            f"{sorted(b.factor for b in parse_formula(spec.formula).bars)}"
        )
    group = next(iter(factors))
    exprs = [b.expr for b in parsed.bars]
    correlated = len(parsed.bars) == 1 and parsed.bars[0].correlated
    if len(parsed.bars) > 1 and any(b.correlated for b in parsed.bars):
        raise ValueError(
            f"formula {spec.formula!r}: with sigma_by the random part must be one "
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


def _r_call_text(
    design: Design,
    reml: bool,
    pieces: dict[str, Any] | None,
    control: Mapping[str, Any] | None = None,
) -> str:
    # What the reader would type, in their own names (R ran the same call on v1_, v2_, ...).
    if pieces is not None:
        pieces = _lme_pieces(parse_formula(design.spec.formula), design.spec)
    if pieces is None:
        extra = _control_text(control or {})
        return (
            f"lmerTest::lmer({design.spec.formula}, data = data, REML = {str(reml).upper()}{extra})"
        )
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
    control: Mapping[str, Any] | None = None,
    refit_on_warning: bool = True,
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
    control : mapping, optional
        lmer's control, as a user's own call may set it: ``optimizer`` (one of
        :data:`OPTIMIZERS`), ``maxfun`` (an evaluation cap) and ``start``
        (theta, lme4's order).  lmer fits; glmer fits take ``optimizer`` and
        ``maxfun`` (for both of glmer's stages; ``maxfun`` alone: bobyqa).
    refit_on_warning : bool
        When lme4 warns about convergence, refit with its other optimizers
        (:func:`refit_lme4`) and keep what they find in ``optimizer_refits``
        and ``best_fit``.

    Returns
    -------
    FreqFit
    """
    design = design if design is not None else build_design(spec, data)
    control = _check_control(control)
    if control and spec.sigma_by:
        raise ValueError("control applies to lme4 fits (one residual SD) only")
    if "start" in control and design.family.laplace:
        raise ValueError("control: a glmer start is not supported (optimizer and maxfun are)")
    if "maxfun" in control and "optimizer" not in control and design.family.laplace:
        control["optimizer"] = "bobyqa"  # glmer's default for both stages' cap
    reml = spec.reml if reml is None else reml
    started = time.perf_counter()
    names = r_names(design)
    frame = to_r_frame(design.data, names.columns)
    pieces = None
    if design.family.laplace:  # glmer, see r_scripts/glmm.R
        result = _fit_glmer(design, frame, names, profile=profile, control=control)
        ml = {
            "beta": _user_keys(result["ml_beta"], names),
            "theta": _user_keys(result["ml_theta"], names),
            "sigma": 1.0,
            "lp0": np.asarray(result["lp0"], dtype=float),
            "tol_pwrss": float(result["tol_pwrss"]),
        }
        design = _with_family_params(design, result, ml, names)
    elif spec.sigma_by:
        pieces = _lme_pieces(names.parsed, spec)
        result = _from_r(
            _call(
                "harness_fit_lme",
                frame,
                pieces["fixed"],
                pieces["random_rhs"],
                pieces["group"],
                names.sigma_by,
                _symbols(names),
                REML=reml,
                correlated=pieces["correlated"],
            )
        )
        ml = {
            "beta": _user_keys(result["ml_beta"], names),
            "G": np.atleast_2d(np.asarray(result["ml_G"], dtype=float)),
            "sigma": result["ml_sigma"],
        }
    else:
        result = _from_r(
            _call(
                "harness_fit_lmer",
                frame,
                names.formula,
                _symbols(names),
                REML=reml,
                profile=profile,
                n_sims=int(n_sims),
                seed=int(seed),
                **_control_args(control),
            )
        )
        ml = {
            "beta": _user_keys(result["ml_beta"], names),
            "theta": _user_keys(result["ml_theta"], names),
            "sigma": result["ml_sigma"],
        }
    _user_tables(result, names, spec)
    elapsed = time.perf_counter() - started
    info = result["info"]
    notes = result["notes"]
    messages = [] if notes is None else [names.user(str(n)) for n in np.atleast_1d(notes)]
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
        r_call=_glmer_call_text(design, control)
        if design.family.laplace
        else _r_call_text(design, reml, pieces, control),
        fit_seconds=elapsed,
        ml_estimates=ml,
        df_method=str(info["df_method"]),
        optimizer=str(info.get("optimizer") or ""),
        control=dict(control),
    )
    for message in messages[len(design.notes) :]:  # the design's notes are its caller's to show
        log.info("%s: %s", fit.engine, message)
    if refit_on_warning and not fit.converged and refits_apply(fit):
        try:
            fit = refit_lme4(fit)
        except RuntimeError as err:  # the fit stands; the report says the refits failed
            log.warning("refitting with lme4's other optimizers failed: %s", err)
            fit.messages.append(f"refits with lme4's other optimizers failed: {err}")
    return fit


# --------------------------------------------------------------------------- other optimizers

#: lme4's optimizers as ``allFit`` names them, that lme4 1.1 runs without extra packages
#: (``r_scripts/refit.R``); ``nloptwrap.NLOPT_LN_BOBYQA`` is lmer's default.
OPTIMIZERS = (
    "bobyqa",
    "Nelder_Mead",
    "nlminbwrap",
    "nloptwrap.NLOPT_LN_NELDERMEAD",
    "nloptwrap.NLOPT_LN_BOBYQA",
)
#: A refit must raise the log-likelihood (or lower half the REML criterion) by more than
#: this to count as lme4 not having reached its maximum (its optimizers stop at ~1e-8).
IMPROVEMENT_TOLERANCE = 1e-4


def _check_control(control: Mapping[str, Any] | None) -> dict[str, Any]:
    """A validated copy of ``control``: known keys, a known optimizer, numbers only."""
    if not control:
        return {}
    unknown = sorted(set(control) - {"optimizer", "maxfun", "start"})
    if unknown:
        raise ValueError(f"control: unknown key(s) {unknown}; use optimizer, maxfun, start")
    out: dict[str, Any] = {}
    if control.get("optimizer") is not None:
        if control["optimizer"] not in OPTIMIZERS:
            raise ValueError(f"control: optimizer must be one of {OPTIMIZERS}")
        out["optimizer"] = str(control["optimizer"])
    if control.get("maxfun") is not None:
        maxfun = int(control["maxfun"])
        if maxfun < 1 or maxfun != control["maxfun"]:
            raise ValueError("control: maxfun must be a positive integer")
        out["maxfun"] = maxfun
    if control.get("start") is not None:
        start = np.atleast_1d(np.asarray(control["start"], dtype=float))
        if not np.all(np.isfinite(start)):
            raise ValueError("control: start must be finite numbers (theta)")
        out["start"] = start.tolist()
    return out


def _control_text(control: Mapping[str, Any]) -> str:
    """The control arguments of the lmer call, as R code a reader could run."""
    if not control:
        return ""
    name = control.get("optimizer", "nloptwrap.NLOPT_LN_BOBYQA")
    optimizer, _, algorithm = name.partition(".")
    settings = [f'algorithm = "{algorithm}"'] if algorithm else []
    if "maxfun" in control:
        key = {"nloptwrap": "maxeval", "nlminbwrap": "eval.max"}.get(optimizer, "maxfun")
        settings.append(f"{key} = {int(control['maxfun'])}")
    text = f',\n    control = lmerControl(optimizer = "{optimizer}"'
    text += f", optCtrl = list({', '.join(settings)}))" if settings else ")"
    if "start" in control:
        text += f",\n    start = c({', '.join(f'{v:.10g}' for v in control['start'])})"
    return text


def _control_args(control: Mapping[str, Any]) -> dict[str, Any]:
    import rpy2.robjects as ro

    args: dict[str, Any] = {}
    if "maxfun" in control and "optimizer" not in control:
        args["optimizer"] = "nloptwrap.NLOPT_LN_BOBYQA"  # lmer's default, with the cap
    if "optimizer" in control:
        args["optimizer"] = control["optimizer"]
    if "maxfun" in control:
        args["maxfun"] = int(control["maxfun"])
    if "start" in control:
        args["start"] = ro.FloatVector(control["start"])
    return args


def refits_apply(freq: FreqFit) -> bool:
    """Whether :func:`refit_lme4` can refit ``freq`` (lmer and glmer fits; not nlme)."""
    return freq.engine == "lme4"


def refit_lme4(freq: FreqFit, start: Any = None, beta: Any = None) -> FreqFit:
    """``freq`` with lme4's other optimizers tried, as ``allFit`` tries them, and the best named.

    Every optimizer of :data:`OPTIMIZERS` refits the model from lme4's default
    start; with ``start`` (theta, e.g. the harness's own ML optimum) lmer's
    default optimizer and bobyqa refit it from there too.  A REML fit is
    refitted by REML (the criterion of the estimates the comparison tables
    hold) and by ML (the likelihood of the same-model check); the best fit of
    each is the one with the lowest criterion (REML criterion; deviance for ML).

    A glmer fit (nAGQ = 1) is refitted by its Laplace likelihood, each
    optimizer running both of glmer's stages; from ``start`` and ``beta``
    (theta and the fixed effects of the harness's Laplace optimum) bobyqa and
    Nelder_Mead (glmer's default pair) refit it from there, without the
    nAGQ = 0 stage that would replace that theta.

    Parameters
    ----------
    freq : FreqFit
        An lmer or glmer fit (see :func:`refits_apply`).
    start : array or mapping, optional
        Theta in lme4's order.
    beta : array or mapping, optional
        glmer only: the fixed effects of that start, in lme4's order (a glmer
        start needs both).

    Returns
    -------
    FreqFit
        A copy with ``optimizer_refits`` (optimizer, start, method, criterion,
        loglik, converged, singular, messages, best; the original fit first)
        and ``best_fit`` (:func:`best_fit_summary`).
    """
    import dataclasses

    import rpy2.robjects as ro

    if not refits_apply(freq):
        raise ValueError(f"lme4's optimizers refit lme4 fits only, not {freq.engine} ones")
    design = freq.design
    names = r_names(design)
    frame = to_r_frame(design.data, names.columns)
    kwargs: dict[str, Any] = {}
    if design.family.laplace:
        if (start is None) != (beta is None):
            raise ValueError("a glmer start needs both theta and the fixed effects")
        if start is not None:
            kwargs["theta"] = ro.FloatVector(_start_vector(start))
            kwargs["fixef"] = ro.FloatVector(_start_vector(beta))
        family, link = design.family.r_family()
        result = _from_r(
            _call(
                "harness_glmer_refits",
                frame,
                names.formula,
                _symbols(names),
                family,
                link,
                **design.family.r_args(),
                **kwargs,
            )
        )
    else:
        if start is not None:
            kwargs["start"] = ro.FloatVector(_start_vector(start))
        reml = freq.method == "REML"
        result = _from_r(
            _call("harness_lmer_refits", frame, names.formula, _symbols(names), REML=reml, **kwargs)
        )
    table = result["table"]
    table["messages"] = [names.user(str(m)) if m else "" for m in table["messages"]]
    table["optimizer"] = table["optimizer"].astype(object)
    original = _original_rows(freq)
    table = pd.concat([original, table], ignore_index=True)
    best = {
        method: _best_estimates(result[key], names, freq.spec)
        for method, key in (("REML", "best_reml"), ("ML", "best_ml"))
        if result.get(key) is not None
    }
    summary = best_fit_summary(freq, best, result.get("missing"))
    table["best"] = False
    for method, chosen in summary["by_method"].items():
        if chosen.get("improved"):
            hit = (
                (table["method"] == method)
                & (table["optimizer"] == chosen["optimizer"])
                & (table["start"] == chosen["start"])
            )
        else:
            hit = (table["method"] == method) & (table["start"] == "as fitted")
        table.loc[hit[hit].index[:1], "best"] = True
    log.info("lme4 refits: %s", summary["sentence"])
    return dataclasses.replace(freq, optimizer_refits=table, best_fit=summary)


def _start_vector(values: Any) -> list[float]:
    """A start (array or mapping, lme4's order) as finite floats R reads as numbers only."""
    values = list(values.values()) if isinstance(values, Mapping) else values
    vector = np.atleast_1d(np.asarray(values, dtype=float))
    if not np.all(np.isfinite(vector)):
        raise ValueError("a start must be finite numbers")
    return [float(v) for v in np.clip(vector, -1e6, 1e6)]


def _original_rows(freq: FreqFit) -> pd.DataFrame:
    """The fit as lme4 returned it, as rows of the refits table (its ML refit too, for REML)."""
    start = "as fitted"
    messages = "; ".join(m.removeprefix("convergence: ") for m in freq.messages if "converg" in m)
    rows = []
    if freq.method == "REML":
        rows.append(
            {
                "optimizer": freq.optimizer or "lmer's default",
                "start": start,
                "method": "REML",
                "criterion": float(freq.reml_criterion)
                if freq.reml_criterion is not None
                else np.nan,
                "loglik": float(freq.loglik),
                "converged": bool(freq.converged),
                "singular": bool(freq.singular),
                "messages": messages,
            }
        )
        rows.append(
            {
                "optimizer": "bobyqa (refitML from the REML estimates)",
                "start": start,
                "method": "ML",
                "criterion": -2.0 * float(freq.loglik_ml),
                "loglik": float(freq.loglik_ml),
                "converged": None,
                "singular": None,
                "messages": "",
            }
        )
    else:
        default = "glmer's default (bobyqa, Nelder_Mead)" if freq.design.family.laplace else None
        rows.append(
            {
                "optimizer": freq.optimizer or default or "lmer's default",
                "start": start,
                "method": "ML",
                "criterion": -2.0 * float(freq.loglik_ml),
                "loglik": float(freq.loglik_ml),
                "converged": bool(freq.converged),
                "singular": bool(freq.singular),
                "messages": messages,
            }
        )
    return pd.DataFrame(rows)


def _best_estimates(raw: dict[str, Any], names: RNames, spec: ModelSpec) -> dict[str, Any]:
    """One best refit from R, in the user's names: tables of estimates and the ML parameters."""
    tables = {"fixed": raw["fixed"], "variance": raw["variance"]}
    _user_tables(tables, names, spec)
    fixed = tables["fixed"]
    variance = tables["variance"]
    return {
        "optimizer": str(raw["optimizer"]),
        "start": str(raw["start"]),
        "criterion": float(raw["criterion"]),
        "loglik": float(raw["loglik"]),
        "fixed": dict(zip(fixed["term"].astype(str), fixed["estimate"].astype(float), strict=True)),
        "variance": {
            str(c): float(v)
            for c, v in zip(variance["component"], variance["estimate"], strict=True)
        },
        "beta": _user_keys(raw["beta"], names),
        "theta": _user_keys(raw["theta"], names),
        "sigma": float(raw["sigma"]),
        # glmer: where its penalised IRLS restarts (the Laplace identity at this fit).
        "lp0": np.asarray(raw["lp0"], dtype=float) if raw.get("lp0") is not None else None,
        "tol_pwrss": float(raw["tol_pwrss"]) if raw.get("tol_pwrss") is not None else None,
    }


def best_fit_summary(
    freq: FreqFit, best: Mapping[str, dict[str, Any]], missing: Any = None
) -> dict[str, Any]:
    """What the refits found against ``freq``: per method the best fit and whether it is better.

    Returns
    -------
    dict
        ``method`` (the fit's own, whose estimates the comparison tables hold),
        ``by_method`` (``"REML"``/``"ML"`` -> the best refit's ``optimizer``,
        ``start``, ``criterion``, ``loglik``, ``loglik_original``,
        ``improved`` (higher by more than :data:`IMPROVEMENT_TOLERANCE`),
        ``fixed`` and ``variance`` estimates by term and component, and
        ``beta``, ``theta``, ``sigma``), ``improved`` (for the fit's own
        method), ``sentence`` and ``missing`` (optimizers that need absent packages).
    """
    original = {"ML": float(freq.loglik_ml)}
    # A glmer fit's method reads "ML (Laplace)"; its refits are keyed "ML" like lmer's.
    own_method = "REML" if freq.method == "REML" else "ML"
    if own_method == "REML":
        original["REML"] = float(freq.loglik)
    by_method: dict[str, dict[str, Any]] = {}
    for method, chosen in best.items():
        entry = dict(chosen)
        entry["loglik_original"] = original[method]
        entry["improved"] = bool(chosen["loglik"] > original[method] + IMPROVEMENT_TOLERANCE)
        by_method[method] = entry
    own = by_method.get(own_method, {})
    missing_list = [str(m) for m in np.atleast_1d(missing)] if missing is not None else []
    return {
        "method": own_method,
        "by_method": by_method,
        "improved": bool(own.get("improved", False)),
        "sentence": optimizer_sentence(by_method, own_method, laplace=freq.design.family.laplace),
        "missing": missing_list,
        "laplace": bool(freq.design.family.laplace),
    }


def optimizer_sentence(
    by_method: Mapping[str, Mapping[str, Any]], method: str, *, laplace: bool = False
) -> str:
    """``lme4 did not reach its maximum (log-likelihood X at lme4's estimates, Y at the best fit)``.

    Or, when no refit beat lme4's own estimates, that they stand.  ``laplace``
    (glmer fits) names the likelihood: glmer's Laplace approximation.
    """
    chosen = by_method.get(method)
    if not chosen:
        return "no refit with lme4's other optimizers succeeded"
    what = (
        "REML log-likelihood"
        if method == "REML"
        else "Laplace log-likelihood"
        if laplace
        else "log-likelihood"
    )
    where = f"{chosen['optimizer']} from {chosen['start']}"
    if chosen["improved"]:
        return (
            f"lme4 did not reach its maximum ({what} {chosen['loglik_original']:.6f} at lme4's "
            f"estimates, {chosen['loglik']:.6f} at the best fit: {where})"
        )
    return (
        f"lme4's other optimizers find no higher {what} than its own estimates' "
        f"({chosen['loglik_original']:.6f}; best refit {chosen['loglik']:.6f}, {where}): "
        "its estimates stand"
    )


def _symbols(names: RNames) -> Any:
    import rpy2.robjects as ro

    return ro.StrVector(names.symbols)


def _user_keys(values: Any, names: RNames) -> Any:
    if isinstance(values, dict):
        return {names.user(k): v for k, v in values.items()}
    return values


def _user_tables(result: dict[str, Any], names: RNames, spec: ModelSpec) -> None:
    """Put the user's names back into every table R returned (in place)."""
    for key, columns in {
        "fixed": ("term",),
        "variance": ("group_factor", "term", "term2"),
        "ranef": ("group_factor", "term"),
        "sims": ("group_factor", "term"),
    }.items():
        frame = result.get(key)
        if frame is None:
            continue
        for column in columns:
            if column not in frame:
                continue
            if key == "variance" and column == "term":
                # nlme's per-level residual SDs hold levels (data) in "term", not names.
                keep = frame["kind"] == "sigma"
                mapped = [
                    t if k else names.user(t) for t, k in zip(frame[column], keep, strict=True)
                ]
                frame[column] = pd.Series(mapped, index=frame.index, dtype=object)
            else:
                frame[column] = frame[column].map(names.user).astype(object)
    variance = result.get("variance")
    if variance is not None and len(variance):
        # A family's own parameter (kind "dispersion") keeps the name its family gave it.
        given = variance["component"] if "component" in variance else [None] * len(variance)
        variance["component"] = [
            name if kind == "dispersion" else _component(kind, gf, term, term2, spec.sigma_by)
            for kind, gf, term, term2, name in zip(
                variance["kind"],
                variance["group_factor"],
                variance["term"],
                variance["term2"],
                given,
                strict=True,
            )
        ]


def _component(kind: str, group: Any, term: Any, term2: Any, sigma_by: str | None) -> str:
    """The component's name as fit.R spells it (lme4's VarCorr names), in user names."""
    if kind == "sigma":
        return f"sigma: {sigma_by}={term}" if sigma_by else "sigma"
    if kind == "cor":
        return f"{group}: cor({term},{term2})"
    return f"{group}: sd({term})"


def _with_family_params(
    design: Design, result: dict[str, Any], ml: dict[str, Any], names: RNames
) -> Design:
    """The design with the family's own parameters fixed at lme4's estimates (glmer.nb's theta).

    They join the variance table (compared with their posteriors) and ``ml_estimates``;
    the design lme4's fit carries then computes glmer's likelihood with them fixed.
    """
    import dataclasses

    params = result.get("family_params")
    if not params:
        return design
    values = {str(k): float(v) for k, v in params.items()}
    design = dataclasses.replace(design, family_params=values)
    ml["family_params"] = values
    rows = pd.DataFrame(design.family.component_rows())
    result["variance"] = pd.concat([result["variance"], rows], ignore_index=True)
    own = result.get("glmer_nb")  # the fit that estimated them (r_scripts/glmm.R)
    if own:
        ml["glmer_nb"] = {
            "loglik": float(own["loglik"]),
            "beta": _user_keys(own["beta"], names),
            "theta": _user_keys(own["theta"], names),
        }
    return design


def _fit_glmer(
    design: Design,
    frame: Any,
    names: RNames,
    n_agq: int = 1,
    profile: bool = False,
    control: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``lme4::glmer`` on the design's data (internal names, see :class:`RNames`).

    Family and link are names R looks up in a fixed table; the formula is the
    rebuilt one, checked symbol by symbol in R before it is evaluated.
    ``control`` (checked by :func:`_check_control`): ``optimizer`` and ``maxfun``.
    """
    family, link = design.family.r_family()
    args = _control_args({k: v for k, v in (control or {}).items() if k != "start"})
    return _from_r(
        _call(
            design.family.r_function,
            frame,
            names.formula,
            _symbols(names),
            family,
            link,
            nAGQ=int(n_agq),
            profile=profile,
            **args,
        )
    )


def _glmer_call_text(design: Design, control: Mapping[str, Any] | None = None) -> str:
    text = _control_text(control or {}).replace("lmerControl(", "glmerControl(")
    return str(design.family.r_call(design.spec.formula, text))


def fit_glmer_agq(spec: ModelSpec, data: pd.DataFrame, n_agq: int) -> dict[str, Any]:
    """glmer with ``nAGQ = n_agq`` adaptive Gauss-Hermite points (one scalar random effect).

    Returns the raw tables (``fixed``, ``variance``, ``info`` with ``loglik``,
    ``ml_beta``, ``ml_theta``) for the quadrature check of :mod:`harness.checks.laplace`.
    """
    design = build_design(spec, data)
    if not design.family.laplace:
        raise ValueError(f"nAGQ applies to glmer families, not {spec.family!r}")
    names = r_names(design)
    result = _fit_glmer(design, to_r_frame(design.data, names.columns), names, n_agq)
    _user_tables(result, names, spec)
    for key in ("ml_beta", "ml_theta"):
        result[key] = _user_keys(result[key], names)
    return result


def lformula(spec: ModelSpec, data: pd.DataFrame) -> dict[str, Any]:
    """lme4's own X and Z (``lme4::lFormula``) for the design-equality tests."""
    design = build_design(spec, data)
    names = r_names(design)
    result = _from_r(
        _call(
            "harness_lformula",
            to_r_frame(design.data, names.columns),
            names.formula,
            _symbols(names),
        )
    )
    result["X_names"] = [names.user(str(n)) for n in np.atleast_1d(result["X_names"])]
    result["cnms"] = {
        names.user(k): [names.user(str(t)) for t in np.atleast_1d(v)]
        for k, v in result["cnms"].items()
    }
    result["flist_names"] = [names.user(str(n)) for n in np.atleast_1d(result["flist_names"])]
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
