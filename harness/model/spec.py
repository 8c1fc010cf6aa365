"""Model specification: one lme4 formula, turned into the design both engines use.

The formula string is the single source of truth.  lme4 receives it verbatim;
the PyMC side receives the design built here.  Its fixed-effects matrix and
each random-effects block come from :mod:`harness.model.rformula` (``formulae``
parses; R's term algebra, ``model.matrix`` coding and column names are kept
there because formulae's differ), and the blocks follow lme4's own rules
(``findbars``, ``||`` splitting, ``a/b`` nesting, ``a:b`` levels, block order
by decreasing number of levels), which formulae's ``(x | g)`` terms do not.
Column names and group levels are spelled the way lme4 spells them so that
the two engines' tables join on plain strings.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from harness.model.family import glm_response
from harness.model.rformula import (
    FORMULA_FUNCTIONS,
    UNSUPPORTED_CALLS,
    Terms,
    collinear_columns,
    evaluate_variable,
    model_matrix,
    parse_terms,
    r_level_labels,
    uncorrelated_exprs,
)

log = logging.getLogger("harness")

__all__ = [
    "FORMULA_FUNCTIONS",
    "UNSUPPORTED_CALLS",
    "BarTerm",
    "Design",
    "ModelSpec",
    "ParsedFormula",
    "Prior",
    "RandomBlock",
    "build_design",
    "parse_formula",
]

Parameterization = Literal["offsets", "baked_in"]


@dataclass(frozen=True)
class Prior:
    """One prior distribution, by PyMC distribution name and keyword arguments."""

    dist: str
    params: Mapping[str, float]

    def describe(self) -> str:
        args = ", ".join(f"{k}={v:.4g}" for k, v in self.params.items())
        return f"{self.dist}({args})"


@dataclass(frozen=True)
class ModelSpec:
    """What to fit: an lme4 formula plus the pieces lme4's formula cannot say.

    Parameters
    ----------
    formula : str
        A gaussian lme4 formula, e.g. ``"Reaction ~ Days + (Days | Subject)"``.
    sigma_by : str, optional
        Column whose levels each get their own residual SD.  lme4 cannot fit
        this; the frequentist side then uses ``nlme::lme`` with ``varIdent``.
    priors : str or mapping
        ``"weak"`` (default, scaled to the data), ``"m14.1"`` (Statistical
        Rethinking's cafe priors) or a mapping of overrides: keys are fixed
        term names (``"(Intercept)"``, ``"Days"``), ``"sd"`` (all group SDs),
        ``"sd:<factor>:<term>"``, ``"sigma"`` and ``"lkj_eta"``; values are
        :class:`Prior` objects (or a float for ``lkj_eta``).
    parameterization : {"offsets", "baked_in"}
        ``offsets``: ``mu = X beta + Z u`` with non-centred ``u``.  ``baked_in``:
        per-group coefficients drawn around the fixed effects, as in the seed
        posts (``ab ~ MVNormal([a_bar, b_bar], S)``).
    reml : bool
        REML (default, as lme4) or ML for the frequentist fit.
    name : str, optional
        Label used in reports.
    family : {"gaussian", "binomial", "poisson"}
        Response family; non-gaussian families are fitted with ``glmer`` and
        allow ``cbind(successes, failures)`` responses and ``offset()`` terms.
    link : str, optional
        The family's link (binomial: ``"logit"`` or ``"probit"``); None for its default.
    """

    formula: str
    sigma_by: str | None = None
    priors: str | Mapping[str, Any] = "weak"
    parameterization: Parameterization = "offsets"
    reml: bool = True
    name: str | None = None
    # GLMM hook (issue 12): see harness/model/family.py.
    family: str = "gaussian"
    link: str | None = None

    def __post_init__(self) -> None:
        from harness.model.family import get_family

        get_family(self.family, self.link)  # unknown family or link: refused here
        if self.parameterization not in ("offsets", "baked_in"):
            raise ValueError(
                f"parameterization must be 'offsets' or 'baked_in', not {self.parameterization!r}"
            )
        if isinstance(self.priors, str) and self.priors not in PRIOR_PROFILES:
            raise ValueError(
                f"unknown prior profile {self.priors!r}; choose one of {sorted(PRIOR_PROFILES)} "
                "or pass a mapping of Prior objects"
            )

    def with_(self, **changes: Any) -> ModelSpec:
        """Return a copy with some fields changed."""
        values = {f: getattr(self, f) for f in self.__dataclass_fields__}
        values.update(changes)
        return ModelSpec(**values)

    def key(self) -> str:
        """A stable string identifying this spec (used in cache keys)."""
        priors = self.priors if isinstance(self.priors, str) else repr(sorted(self.priors.items()))
        parts = [self.formula, str(self.sigma_by), priors, self.parameterization, str(self.reml)]
        if self.family != "gaussian":  # gaussian keys stay as they were
            parts.append(f"{self.family}({self.link or ''})")
        return "|".join(parts)


PRIOR_PROFILES = ("weak", "m14.1", "flat")


# --------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class BarTerm:
    """One ``(expr | factor)`` term after lme4's expansion rules."""

    expr: str
    factor: str
    correlated: bool = True


@dataclass(frozen=True)
class ParsedFormula:
    """A formula's parts.  ``response`` is the left-hand side as R deparses it
    (``Reaction``, ``log(Reaction)``, ``I(y/10)``); ``response_columns`` the
    data columns it reads."""

    response: str
    fixed_rhs: str
    bars: tuple[BarTerm, ...]
    response_columns: tuple[str, ...] = ()

    @property
    def transformed_response(self) -> bool:
        """Whether the response is a call on columns rather than a column."""
        return self.response_columns != (self.response,)


def _split_top_level(text: str, sep: str = "+") -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ')' in formula part {text!r}")
        if ch == sep and depth == 0:
            parts.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    if depth != 0:
        raise ValueError(f"unbalanced '(' in formula part {text!r}")
    parts.append("".join(current).strip())
    return parts


#: Longest formula the harness reads (a guard: parsing cost grows with the length).
MAX_FORMULA_CHARS = 2000

_BAR = re.compile(r"^\((?P<expr>[^|]*?)(?P<bar>\|\|?)(?P<factor>[^|]+)\)$")
_NAME = re.compile(r"[A-Za-z.][A-Za-z0-9._]*")


def _expand_factor(factor: str, formula: str) -> list[str]:
    """lme4's ``expandSlash``: ``a/b`` means ``b:a`` and ``a``, in that order."""
    factor = re.sub(r"\s+", "", factor)
    for piece in re.split(r"[/:]", factor):
        if not _NAME.fullmatch(piece):
            raise ValueError(
                f"formula {formula!r}: grouping factor {factor!r} must be column names joined "
                "by ':' or '/' (e.g. g, a:b, a/b)"
            )
    if "/" not in factor:
        return [factor]
    pieces = factor.split("/")
    # lme4 spells nested factors innermost first, as R deparses them:
    # (1 | a/b) is (1 | b:a) + (1 | a); (1 | a/b/c) adds (1 | c:(b:a)).
    names = [pieces[0]]
    for piece in pieces[1:]:
        inner = names[-1]
        names.append(f"{piece}:({inner})" if ":" in inner else f"{piece}:{inner}")
    return list(reversed(names))


def factor_columns(factor: str) -> list[str]:
    """The data columns of a grouping factor: ``"h:(b:a)"`` -> ``["h", "b", "a"]``."""
    return [p for p in re.split(r"[:()]+", factor) if p]


def make_names(names: list[str]) -> list[str]:
    """R's ``make.names(names, unique = TRUE)`` for the names lme4 gives ``VarCorr`` terms."""
    out: list[str] = []
    for name in names:
        valid = re.sub(r"[^A-Za-z0-9._]", ".", name)
        if not re.match(r"[A-Za-z]|\.(?![0-9])", valid):
            valid = "X" + valid
        out.append(valid)
    # make.unique: later duplicates get .1, .2, ... skipping names already taken.
    seen = set(out)
    counts: dict[str, int] = {}
    unique: list[str] = []
    for name in out:
        if name in counts:
            k = counts[name]
            while f"{name}.{k}" in seen:
                k += 1
            counts[name] = k + 1
            candidate = f"{name}.{k}"
            seen.add(candidate)
            unique.append(candidate)
        else:
            counts[name] = 1
            unique.append(name)
    return unique


def _refuse_unsupported(formula: str, rhs: str) -> None:
    # Before parsing, so that poly(x, degree = 2) is named, not refused for its '='.
    for call, why in UNSUPPORTED_CALLS.items():
        if re.search(rf"(?<![A-Za-z0-9_.]){re.escape(call)}\s*\(", rhs):
            raise ValueError(f"formula {formula!r}: {why}")


def parse_formula(formula: str) -> ParsedFormula:
    """Split an lme4 formula into response, fixed part and random-effect bars.

    ``(1 + x || g)`` becomes lme4's ``(1 | g) + (0 + x | g)`` and ``(1 | a/b)``
    becomes ``(1 | b:a) + (1 | a)``.  Every part is parsed with R's formula
    algebra, so syntax errors and unsupported features are refused here.

    Raises
    ------
    ValueError
        If the formula has no ``~``, unbalanced parentheses, or an unsupported term.
    """
    if not isinstance(formula, str) or "~" not in formula:
        raise ValueError(f"formula {formula!r} is not an lme4 formula: it needs 'response ~ terms'")
    if len(formula) > MAX_FORMULA_CHARS:
        raise ValueError(
            f"formula {formula[:40]!r}... is {len(formula)} characters long; the harness reads "
            f"formulas of up to {MAX_FORMULA_CHARS} characters"
        )
    lhs, _, rhs = formula.partition("~")
    response = lhs.strip()
    if not response:
        raise ValueError(f"formula {formula!r} has no response on the left of '~'")
    if re.match(r"cbind\s*\(", response):
        raise ValueError(
            f"formula {formula!r}: a cbind(successes, failures) response is a binomial model; "
            "fit it with family='binomial' (--family binomial)"
        )
    response, response_columns = _parse_response(response, formula)
    _refuse_unsupported(formula, rhs)
    rhs = rhs.strip()
    if not rhs:
        raise ValueError(f"formula {formula!r} has nothing on the right of '~'")
    if "~" in rhs:
        raise ValueError(f"formula {formula!r} has more than one '~'")
    try:
        if _has_top_level_bar(rhs):
            # '|' binds more loosely than '+' in R: lme4 reads y ~ x + 1 | g as the single
            # term (x + 1 | g) and fits the intercept alone as fixed part (findbars, nobars).
            rhs = f"({rhs})"
        parts = _split_top_level(rhs)
    except ValueError as err:
        raise ValueError(f"could not parse formula {formula!r}: {err}") from None
    fixed: list[str] = []
    bars: list[BarTerm] = []
    for part in parts:
        if not part:
            raise ValueError(f"could not parse formula {formula!r}: an empty term around '+'")
        match = _BAR.match(part)
        if match is None:
            if "|" in part:
                raise ValueError(
                    f"could not parse formula {formula!r}: random-effect term {part!r} "
                    "must be written '(expr | factor)'"
                )
            fixed.append(part)
            continue
        expr = match["expr"].strip()
        if not expr:
            raise ValueError(f"formula {formula!r}: random-effect term {part!r} has no terms")
        context = f"formula {formula!r}, random-effect term {part!r}"
        correlated = match["bar"] == "|"
        exprs = [expr] if correlated else uncorrelated_exprs(expr, context)
        for e in exprs:
            parse_terms(e, context)
        for factor in _expand_factor(match["factor"], formula):
            bars.extend(BarTerm(e, factor, correlated) for e in exprs)
    fixed_rhs = " + ".join(fixed) if fixed else "1"
    parse_terms(fixed_rhs, f"formula {formula!r}, fixed part")
    return ParsedFormula(
        response=response,
        fixed_rhs=fixed_rhs,
        bars=tuple(bars),
        response_columns=response_columns,
    )


def _has_top_level_bar(rhs: str) -> bool:
    depth = 0
    for ch in rhs:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "|" and depth == 0:
            return True
    return False


_RESPONSE_CALL = re.compile(r"^[A-Za-z.][A-Za-z0-9._]*\s*\((?P<inner>.*)\)$", re.DOTALL)


def _parse_response(lhs: str, formula: str) -> tuple[str, tuple[str, ...]]:
    """The response as R deparses it and the columns it reads.

    A plain column name, or one call such as ``log(y)``, ``sqrt(y)`` or
    ``I(y/10)`` (R evaluates the left-hand side as an expression, so only a
    single call, whose arguments are arithmetic, means the same on both sides).
    """
    if _NAME.fullmatch(lhs):
        return lhs, (lhs,)
    match = _RESPONSE_CALL.match(lhs)
    balanced = False
    if match:
        try:
            balanced = _split_top_level(match["inner"], sep=",") is not None
        except ValueError:
            balanced = False
    if not balanced:
        raise ValueError(
            f"response {lhs!r} in formula {formula!r} must be a column name or one call on "
            "numeric columns such as log(y), sqrt(y) or I(y/10)"
        )
    context = f"formula {formula!r}, response {lhs!r}"
    terms = parse_terms(lhs, context)
    if len(terms.variables) != 1 or terms.variables[0].call is None:
        raise ValueError(
            f"response {lhs!r} in formula {formula!r} must be a column name or one call on "
            "numeric columns such as log(y), sqrt(y) or I(y/10)"
        )
    variable = terms.variables[0]
    return variable.name, variable.columns


# --------------------------------------------------------------------------- design


@dataclass
class RandomBlock:
    """One random-effects term: a grouping factor and the columns varying by it.

    ``values`` is the block's own model matrix (n x terms) and ``group_index``
    each row's level; ``label`` is lme4's name for the block in ``VarCorr``
    (the factor, then ``g.1``, ``g.2`` for further blocks of the same factor,
    counted in lme4's block order).
    """

    factor: str
    terms: list[str]
    levels: list[str]
    group_index: np.ndarray
    values: np.ndarray
    correlated: bool = True
    label: str = ""

    @property
    def n_levels(self) -> int:
        return len(self.levels)

    @property
    def n_terms(self) -> int:
        return len(self.terms)


@dataclass
class Design:
    """Everything both engines need, built once from (spec, data).

    ``blocks`` are in lme4's order (``reTrms``): by decreasing number of
    levels, as ``lme4::mkReTrms`` reorders them.  ``notes`` are what the
    reader must be told (rows dropped, columns dropped, thin groups);
    ``n_dropped`` counts rows removed for missing values and
    ``dropped_columns`` the fixed-effect columns removed for collinearity.
    """

    spec: ModelSpec
    data: pd.DataFrame
    response: str
    y: np.ndarray
    X: pd.DataFrame
    blocks: list[RandomBlock]
    n_dropped: int = 0
    sigma_levels: list[str] | None = None
    sigma_index: np.ndarray | None = None
    factor_levels: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    dropped_columns: list[str] = field(default_factory=list)
    # GLMM hook (issue 12): binomial trials and the linear predictor's offset.
    trials: np.ndarray | None = None
    offset: np.ndarray | None = None
    #: The family's own parameters where a fit fixed them (glmer.nb's theta on lme4's design);
    #: None on a design built from a spec (the PyMC model samples them).
    family_params: dict[str, float] | None = None

    @property
    def family(self) -> Any:
        """The response family (:mod:`harness.model.family`), its own parameters fixed if known."""
        from harness.model.family import get_family

        family = get_family(self.spec.family, self.spec.link)
        return family.with_params(**self.family_params) if self.family_params else family

    @property
    def n(self) -> int:
        return int(self.y.shape[0])

    @property
    def fixed_terms(self) -> list[str]:
        return list(self.X.columns)

    def lme4_block_order(self) -> list[RandomBlock]:
        """Blocks in lme4's order (``build_design`` already stores them so)."""
        return list(self.blocks)

    def Z(self) -> sp.csc_matrix:
        """Random-effects model matrix with lme4's column order (``t(reTrms$Zt)``).

        Blocks in lme4's order; within a block, columns are level-major
        (level 1: all terms, level 2: all terms, ...).
        """
        cols = []
        for block in self.lme4_block_order():
            k, j = block.n_terms, block.n_levels
            rows = np.repeat(np.arange(self.n), k)
            columns = (block.group_index[:, None] * k + np.arange(k)[None, :]).ravel()
            cols.append(
                sp.csc_matrix((block.values.ravel(), (rows, columns)), shape=(self.n, j * k))
            )
        if not cols:
            return sp.csc_matrix((self.n, 0))
        return sp.hstack(cols, format="csc")

    def Z_column_names(self) -> list[str]:
        """``"<factor>:<level>:<term>"`` for every column of :meth:`Z`."""
        return [f"{block.factor}:{level}:{term}" for block, level, term in self.Z_columns()]

    def Z_columns(self) -> list[tuple[RandomBlock, str, str]]:
        """(block, level, term) for every column of :meth:`Z`, in order."""
        return [
            (block, level, term)
            for block in self.lme4_block_order()
            for level in block.levels
            for term in block.terms
        ]

    def data_hash(self) -> str:
        h = hashlib.sha256()
        h.update(pd.util.hash_pandas_object(self.data, index=False).values.tobytes())
        h.update(",".join(map(str, self.data.columns)).encode())
        return h.hexdigest()[:16]


def _referenced_columns(parsed: ParsedFormula) -> list[str]:
    """Data columns the formula reads: response, predictors, grouping factors."""
    names = list(parsed.response_columns)
    for terms in [parse_terms(parsed.fixed_rhs)] + [parse_terms(b.expr) for b in parsed.bars]:
        names.extend(c for c in terms.columns if c not in names)
    for bar in parsed.bars:
        names.extend(c for c in factor_columns(bar.factor) if c not in names)
    return names


def _grouping_factor(frame: pd.DataFrame, parts: list[str]) -> tuple[list[str], np.ndarray]:
    """Levels and codes of ``a`` or ``a:b:...`` as lme4's ``%i%`` builds them.

    The interaction keeps only combinations present, ordered by the first
    factor's level, then the second's (``b:a`` is b-major).
    """
    codes = frame[parts[0]].cat.codes.to_numpy().astype(np.int64)
    labels = [str(c) for c in frame[parts[0]].cat.categories]
    for part in parts[1:]:
        other = frame[part].cat.codes.to_numpy().astype(np.int64)
        other_labels = [str(c) for c in frame[part].cat.categories]
        rank = codes * len(other_labels) + other
        present, codes = np.unique(rank, return_inverse=True)
        labels = [
            f"{labels[r // len(other_labels)]}:{other_labels[r % len(other_labels)]}"
            for r in present
        ]
    present, codes = np.unique(codes, return_inverse=True)
    return [labels[i] for i in present], codes.astype(np.int64)


def _lme4_order(blocks: list[RandomBlock]) -> list[RandomBlock]:
    """``mkReTrms``: reorder only if some block has more levels than the one before it;
    then ``rev(order(nl))``, which puts ties in reverse formula order."""
    nl = [b.n_levels for b in blocks]
    if not any(b > a for a, b in itertools.pairwise(nl)):
        return list(blocks)
    ascending = sorted(range(len(blocks)), key=lambda i: nl[i])  # stable, as R's order()
    return [blocks[i] for i in reversed(ascending)]


#: Largest magnitude a numeric column may hold: sums of squares of larger values
#: overflow double precision (1e308) in either engine.
MAX_MAGNITUDE = 1e100

_SEPARATED_NUMBER = re.compile(r"\s*[+-]?\d{1,3}(?:[,'\u00a0\u202f ]\d{3})+(?:\.\d*)?\s*")
_PLAIN_NUMBER = re.compile(r"\s*[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?\s*")


def _check_magnitudes(frame: pd.DataFrame, parsed: ParsedFormula, sigma_by: str | None) -> None:
    """Refuse infinite or huge numbers, and numbers written with thousands separators."""
    grouping = {p for bar in parsed.bars for p in factor_columns(bar.factor)} | {sigma_by}
    for column in frame.columns:
        values = frame[column]
        if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
            numbers = values.to_numpy(dtype=float)
            bad = ~np.isfinite(numbers)
            if column not in grouping and bad.any():
                raise ValueError(
                    f"column {column!r} has {int(bad.sum())} infinite value(s) (e.g. row "
                    f"{int(np.flatnonzero(bad)[0])}); remove or fix them before fitting"
                )
            big = np.abs(numbers[~bad]) > MAX_MAGNITUDE
            if column not in grouping and big.any():
                raise ValueError(
                    f"column {column!r} holds values as large as {np.abs(numbers[~bad]).max():.3g}; "
                    f"beyond {MAX_MAGNITUDE:.0e} sums of squares overflow, so rescale the column"
                )
        elif column not in grouping and (
            values.dtype == object or pd.api.types.is_string_dtype(values)
        ):
            text = values.dropna().astype(str)
            separated = text.str.fullmatch(_SEPARATED_NUMBER.pattern)
            plain = text.str.fullmatch(_PLAIN_NUMBER.pattern)
            if len(text) and separated.any() and (separated | plain).all():
                example = text[separated].iloc[0]
                raise ValueError(
                    f"column {column!r} holds numbers written with thousands separators (e.g. "
                    f"{example!r}); as text it would become a factor with {text.nunique()} levels. "
                    "Remove the separators (pandas: read_csv(..., thousands=','))"
                )


def _response_values(parsed: ParsedFormula, frame: pd.DataFrame, formula: str) -> pd.Series:
    """The response, evaluated once here: a column, or a call such as ``log(y)``.

    lme4 evaluates the same call on the same column of the same rows; R's and
    NumPy's elementary functions agree to the last bit or two, far below any
    tolerance the harness applies.
    """
    if not parsed.transformed_response:
        return frame[parsed.response]
    context = f"formula {formula!r}, response {parsed.response!r}"
    variable = parse_terms(parsed.response, context).variables[0]
    try:
        return evaluate_variable(variable, frame)
    except ValueError as err:
        raise ValueError(f"{context}: {err}") from None


def _check_response(frame: pd.DataFrame, response: str) -> None:
    values = frame[response]
    if isinstance(values.dtype, pd.CategoricalDtype) or pd.api.types.is_bool_dtype(values):
        kind = "logical (TRUE/FALSE)" if pd.api.types.is_bool_dtype(values) else "categorical"
        raise ValueError(
            f"response {response!r} must be numeric; it is {kind}. A binary or categorical "
            "response needs a non-gaussian family: fit it with family='binomial' (glmer)"
        )
    if not pd.api.types.is_numeric_dtype(values):
        examples = [str(v) for v in values.dropna().unique()[:3]]
        raise ValueError(
            f"response {response!r} must be numeric; it has dtype {values.dtype} "
            f"(values such as {examples}). A gaussian model needs a numeric response; a "
            "two-level categorical response needs a non-gaussian family (family='binomial')"
        )


def build_design(spec: ModelSpec, data: pd.DataFrame) -> Design:
    """Validate ``data`` against ``spec`` and build the design both engines use.

    Rows with a missing value in any used column are dropped, as lme4's
    default ``na.action = na.omit`` does, and the count is reported in
    ``Design.notes``.  Fixed-effect columns that are linear combinations of
    earlier ones are dropped as lme4 drops them (and named in the notes).

    Raises
    ------
    ValueError
        Naming the column, level or setting at fault, before any fit starts.
    """
    if not isinstance(data, pd.DataFrame):
        raise ValueError(f"data must be a pandas DataFrame, not {type(data).__name__}")
    if data.empty:
        raise ValueError("data has no rows")
    duplicated = sorted({str(c) for c in data.columns[data.columns.duplicated()]})
    if duplicated:
        raise ValueError(
            f"data has more than one column named {duplicated}; column names must be unique"
        )
    glm = glm_response(spec.formula, spec.family, spec.link)  # None for gaussian
    parsed = parse_formula(glm.formula if glm else spec.formula)
    if not parsed.bars:
        raise ValueError(
            f"formula {spec.formula!r} has no random-effect term such as (1 | g); the harness "
            "compares mixed models (for a plain linear model use lm and a Bayesian regression)"
        )
    used = _referenced_columns(parsed)
    if glm is not None:
        used.extend(c for c in glm.extra_columns if c not in used)
    if spec.sigma_by is not None and spec.sigma_by not in used:
        used.append(spec.sigma_by)
    missing = [c for c in used if c not in data.columns]
    if missing:
        raise ValueError(
            f"column(s) {missing} used by formula {spec.formula!r}"
            + (f" / sigma_by={spec.sigma_by!r}" if spec.sigma_by in missing else "")
            + f" not in the data; columns are {sorted(map(str, data.columns))}"
        )
    frame = data.loc[:, list(dict.fromkeys(used))].copy()
    for column in frame.columns:
        if frame[column].isna().all():
            raise ValueError(f"column {column!r} has no non-missing values")
    response = parsed.response
    if glm is None:
        for column in parsed.response_columns:
            _check_response(frame, column)
    complete = frame.notna().all(axis=1)
    n_dropped = int((~complete).sum())
    notes: list[str] = []
    if n_dropped:
        per_column = {c: int(frame[c].isna().sum()) for c in frame.columns if frame[c].isna().any()}
        note = (
            f"{n_dropped} row(s) with missing values dropped (na.omit, as lme4 does; "
            f"{len(frame) - n_dropped} of {len(frame)} rows remain), by column: {per_column}"
        )
        log.debug(note)  # callers show design.notes once (build_design runs per engine)
        notes.append(note)
        frame = frame.loc[complete].copy()
    if frame.empty:
        raise ValueError(
            f"no complete rows: every row has a missing value in one of the used columns {used}"
        )
    frame = frame.reset_index(drop=True)
    trials = offset = None
    if glm is not None:
        y_glm, trials, offset = glm.evaluate(frame)
        if glm.failures is None and glm.trials is None:
            frame[response] = y_glm  # a logical / factor response as the 0/1 glmer reads
        response_values = pd.Series(y_glm, dtype=float)
    else:
        response_values = _response_values(parsed, frame, spec.formula)
        if not np.all(np.isfinite(response_values.to_numpy(float))):
            raise ValueError(f"response {response!r} has infinite values")
    if response_values.nunique() < 2:
        raise ValueError(
            f"response {response!r} is constant (every used row is {response_values.iloc[0]}); "
            "there is no variation for a model to explain"
        )
    _check_magnitudes(frame, parsed, spec.sigma_by)
    if glm is None and response_values.nunique() == 2:
        notes.append(
            f"response {response!r} takes only two values: a gaussian (linear probability) "
            "model is fitted; family='binomial' fits the binomial (glmer) model instead"
        )

    # Grouping factors, text and logical predictors become R-style factors.
    grouping = {p for bar in parsed.bars for p in factor_columns(bar.factor)}
    if spec.sigma_by:
        grouping.add(spec.sigma_by)
    shared = [c for c in parsed.response_columns if c in grouping]
    if shared:
        raise ValueError(
            f"formula {spec.formula!r}: column(s) {shared} are both in the response "
            f"{response!r} and a grouping factor (or sigma_by)"
        )
    factor_levels: dict[str, list[str]] = {}
    for column in frame.columns:
        if column in parsed.response_columns:
            continue
        values = frame[column]
        numeric = pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
        if column in grouping or not numeric:
            labels, as_text = r_level_labels(values)
            factor_levels[column] = labels
            frame[column] = pd.Categorical(as_text, categories=labels)

    fixed_terms = parse_terms(parsed.fixed_rhs, f"formula {spec.formula!r}, fixed part")
    X = _fixed_matrix(fixed_terms, frame, spec.formula)
    dropped = collinear_columns(X)
    if dropped:
        note = (
            f"fixed-effect model matrix is rank deficient: column(s) {dropped} are linear "
            "combinations of the columns before them and are dropped, as lme4 drops them "
            "(both engines fit the model without them)"
        )
        log.debug(note)  # callers show design.notes once (build_design runs per engine)
        notes.append(note)
        X = X.drop(columns=dropped)
    y = response_values.to_numpy(dtype=float)

    blocks = [_random_block(bar, frame, spec.formula) for bar in parsed.bars]
    blocks = _lme4_order(blocks)
    # VarCorr names blocks by factor; with a repeated factor lme4 applies make.names(unique=TRUE).
    factors = [b.factor for b in blocks]
    labels = make_names(factors) if len(set(factors)) < len(factors) else factors
    for block, label in zip(blocks, labels, strict=True):
        block.label = label
    for block in blocks:
        if block.n_levels * block.n_terms >= len(y) and glm is None:
            raise ValueError(
                f"grouping factor {block.factor!r}: {block.n_levels} levels x {block.n_terms} "
                f"term(s) is not fewer than the {len(y)} observations; the random effects "
                "and the residual are unidentifiable (lme4 refuses this too)"
            )
    notes.extend(_thin_group_notes(blocks))
    log.debug(
        "design: n=%d, p=%d, random effects=%d",
        len(y),
        X.shape[1],
        sum(b.n_levels * b.n_terms for b in blocks),
    )

    sigma_levels = sigma_index = None
    if spec.sigma_by:
        sigma_levels = factor_levels[spec.sigma_by]
        if len(sigma_levels) < 2:
            raise ValueError(
                f"sigma_by column {spec.sigma_by!r} has one level; one residual SD per level "
                "needs at least two"
            )
        sigma_index = frame[spec.sigma_by].cat.codes.to_numpy().astype(np.int64)
    return Design(
        spec=spec,
        data=frame,
        response=response,
        y=y,
        X=X,
        blocks=blocks,
        n_dropped=n_dropped,
        sigma_levels=sigma_levels,
        sigma_index=sigma_index,
        factor_levels=factor_levels,
        notes=notes,
        dropped_columns=dropped,
        trials=trials,
        offset=offset,
    )


def _fixed_matrix(terms: Terms, frame: pd.DataFrame, formula: str) -> pd.DataFrame:
    X = model_matrix(terms, frame, f"formula {formula!r}, fixed part")
    if X.shape[1] == 0:
        raise ValueError(
            f"formula {formula!r} has no fixed effects; the harness needs at least an intercept "
            "or one fixed term"
        )
    return X.astype(float)


def _random_block(bar: BarTerm, frame: pd.DataFrame, formula: str) -> RandomBlock:
    context = f"formula {formula!r}, random-effect term ({bar.expr} | {bar.factor})"
    labels, codes = _grouping_factor(frame, factor_columns(bar.factor))
    if len(labels) < 2:
        raise ValueError(
            f"grouping factor {bar.factor!r} has only one level ({labels[0]!r}); "
            "a random effect needs at least two groups (lme4 refuses this too)"
        )
    Zb = model_matrix(parse_terms(bar.expr, context), frame, context)
    if Zb.shape[1] == 0:
        raise ValueError(f"{context} has no columns")
    return RandomBlock(
        factor=bar.factor,
        terms=list(Zb.columns),
        levels=labels,
        group_index=codes,
        values=Zb.to_numpy(dtype=float),
        correlated=bar.correlated,
    )


def _thin_group_notes(blocks: list[RandomBlock]) -> list[str]:
    """Say when a group cannot inform all of its block's terms (one row, or no variation)."""
    notes = []
    for block in blocks:
        if block.n_terms < 2:
            continue
        counts = np.bincount(block.group_index, minlength=block.n_levels)
        single = [lvl for lvl, c in zip(block.levels, counts, strict=True) if c == 1]
        if single:
            shown = ", ".join(single[:5]) + (", ..." if len(single) > 5 else "")
            notes.append(
                f"{len(single)} group(s) of {block.factor!r} have a single observation "
                f"({shown}) but {block.n_terms} random-effect terms {block.terms}: their "
                "data cannot separate those terms, so both engines shrink them to the "
                "population values (lme4 fits this; so does PyMC)"
            )
    return notes
