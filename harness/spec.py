"""Model specification: one lme4 formula, turned into the design both engines use.

The formula string is the single source of truth.  lme4 receives it verbatim;
the PyMC side receives the design built here, whose fixed-effects matrix is
parsed by ``formulae`` (Bambi's parser) and whose random-effects blocks follow
lme4's own rules (``findbars``, ``||`` splitting, ``a/b`` nesting).  Column
names and group levels are spelled the way lme4 spells them so that the two
engines' tables join on plain strings.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

log = logging.getLogger("harness")

Parameterization = Literal["offsets", "baked_in"]

#: Functions a formula may call on numeric columns (formulae needs them in its env).
FORMULA_FUNCTIONS: dict[str, Any] = {
    "log": np.log,
    "exp": np.exp,
    "sqrt": np.sqrt,
    "abs": np.abs,
    "log1p": np.log1p,
    "log2": np.log2,
    "log10": np.log10,
}

#: Formula features that lme4 accepts but this harness does not fit (refused up front).
UNSUPPORTED_CALLS = {
    "offset": "offset() terms are not supported; subtract the offset from the response instead",
    "bs": "spline bases (bs) are not supported",
    "ns": "spline bases (ns) are not supported",
    "s": "smooth terms (s) are not supported; use mgcv/brms for GAMMs",
    "poly": "poly() is not supported; add explicit polynomial columns",
    "weights": "prior weights are not supported",
    "scale": "scale() inside the formula is not supported; standardise the column first",
}


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
    """

    formula: str
    sigma_by: str | None = None
    priors: str | Mapping[str, Any] = "weak"
    parameterization: Parameterization = "offsets"
    reml: bool = True
    name: str | None = None

    def __post_init__(self) -> None:
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
        return "|".join(
            [self.formula, str(self.sigma_by), priors, self.parameterization, str(self.reml)]
        )


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
    response: str
    fixed_rhs: str
    bars: tuple[BarTerm, ...]


def _split_top_level(text: str, sep: str = "+") -> list[str]:
    parts, depth, current = [], 0, []
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


_BAR = re.compile(r"^\((?P<expr>[^|]*?)(?P<bar>\|\|?)(?P<factor>[^|]+)\)$")


def _expand_factor(factor: str) -> list[str]:
    """lme4's ``expandSlash``: ``a/b`` means ``b:a`` and ``a``, in that order."""
    factor = re.sub(r"\s+", "", factor)
    if "/" not in factor:
        return [factor]
    pieces = factor.split("/")
    # lme4 spells the nested factor innermost first: (1 | a/b) is (1 | b:a) + (1 | a).
    return [":".join(reversed(pieces[:i])) for i in range(len(pieces), 0, -1)]


def _split_uncorrelated(expr: str) -> list[str]:
    """``(1 + x || g)`` is ``(1 | g) + (0 + x | g)`` in lme4."""
    terms = [t for t in _split_top_level(expr) if t]
    has_zero = any(t in ("0", "-1") for t in terms)
    slopes = [t for t in terms if t not in ("0", "1", "-1")]
    out = [] if has_zero else ["1"]
    out.extend(f"0 + {t}" for t in slopes)
    return out


def parse_formula(formula: str) -> ParsedFormula:
    """Split an lme4 formula into response, fixed part and random-effect bars.

    Raises
    ------
    ValueError
        If the formula has no ``~``, unbalanced parentheses, or an unsupported term.
    """
    if not isinstance(formula, str) or "~" not in formula:
        raise ValueError(f"formula {formula!r} is not an lme4 formula: it needs 'response ~ terms'")
    lhs, _, rhs = formula.partition("~")
    response = lhs.strip()
    if not response:
        raise ValueError(f"formula {formula!r} has no response on the left of '~'")
    if not re.fullmatch(r"[A-Za-z_.][A-Za-z0-9_.]*", response):
        raise ValueError(
            f"response {response!r} in formula {formula!r} must be a plain column name "
            "(transform the column before fitting)"
        )
    for call, why in UNSUPPORTED_CALLS.items():
        if re.search(rf"(?<![A-Za-z0-9_.]){call}\s*\(", rhs):
            raise ValueError(f"formula {formula!r}: {why}")
    rhs = rhs.strip()
    if not rhs:
        raise ValueError(f"formula {formula!r} has nothing on the right of '~'")
    try:
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
        correlated = match["bar"] == "|"
        for factor in _expand_factor(match["factor"]):
            if not factor:
                raise ValueError(f"formula {formula!r}: random-effect term {part!r} has no factor")
            exprs = [expr] if correlated else _split_uncorrelated(expr)
            bars.extend(BarTerm(e, factor, correlated) for e in exprs)
    fixed_rhs = " + ".join(fixed) if fixed else "1"
    return ParsedFormula(response=response, fixed_rhs=fixed_rhs, bars=tuple(bars))


# --------------------------------------------------------------------------- design


@dataclass
class RandomBlock:
    """One random-effects term: a grouping factor and the columns varying by it."""

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
    """Everything both engines need, built once from (spec, data)."""

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

    @property
    def n(self) -> int:
        return int(self.y.shape[0])

    @property
    def fixed_terms(self) -> list[str]:
        return list(self.X.columns)

    def lme4_block_order(self) -> list[RandomBlock]:
        """Blocks in lme4's order (decreasing number of levels, ties keep formula order)."""
        return sorted(self.blocks, key=lambda b: -b.n_levels)

    def Z(self) -> sp.csc_matrix:
        """Random-effects model matrix with lme4's column order (``t(reTrms$Zt)``)."""
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
        names = []
        for block in self.lme4_block_order():
            names.extend(f"{block.factor}:{lvl}:{t}" for lvl in block.levels for t in block.terms)
        return names

    def data_hash(self) -> str:
        h = hashlib.sha256()
        h.update(pd.util.hash_pandas_object(self.data, index=False).values.tobytes())
        h.update(",".join(map(str, self.data.columns)).encode())
        return h.hexdigest()[:16]


def _r_level_labels(values: pd.Series) -> tuple[list[str], pd.Series]:
    """Levels as R's ``factor()`` would make them: sorted, printed as R prints them."""
    if isinstance(values.dtype, pd.CategoricalDtype):
        present = [c for c in values.cat.categories if c in set(values.dropna())]
        labels = [_r_label(c) for c in present]
        mapping = dict(zip(present, labels, strict=True))
        return labels, values.map(mapping).astype(str)
    if pd.api.types.is_bool_dtype(values):
        mapping = {False: "FALSE", True: "TRUE"}
        labels = [mapping[v] for v in sorted(values.unique())]
        return labels, values.map(mapping)
    if pd.api.types.is_numeric_dtype(values):
        uniq = np.sort(values.unique())
        labels = [_r_label(v) for v in uniq]
        mapping = dict(zip(uniq, labels, strict=True))
        return labels, values.map(mapping)
    as_text = values.astype(str)
    labels = sorted(as_text.unique())
    return labels, as_text


def _r_label(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        if float(value).is_integer():
            return str(int(value))
        return repr(float(value))
    return str(value)


def _formulae_name_to_lme4(name: str) -> str:
    if name == "Intercept":
        return "(Intercept)"
    # formulae writes a treatment-coded level as f[b]; R writes fb.
    name = re.sub(r"([A-Za-z0-9_.]+)\[(.*?)\]", r"\1\2", name)
    name = name.replace(" ** ", "^").replace("**", "^")
    return name


def _model_matrix(rhs: str, data: pd.DataFrame, response: str, context: str) -> pd.DataFrame:
    import formulae
    from formulae.environment import Environment

    env = Environment([FORMULA_FUNCTIONS])
    try:
        dm = formulae.design_matrices(f"{response} ~ {rhs}", data, na_action="error", env=env)
    except KeyError as err:
        raise ValueError(
            f"{context}: column {err.args[0]!r} is not in the data; "
            f"columns are {sorted(map(str, data.columns))}"
        ) from None
    except Exception as err:
        raise ValueError(f"could not parse {context} {rhs!r}: {err}") from None
    if dm.common is None:
        return pd.DataFrame(index=data.index)
    frame = dm.common.as_dataframe()
    frame.columns = [_formulae_name_to_lme4(c) for c in frame.columns]
    frame.index = data.index
    return frame.astype(float)


_IDENT = re.compile(r"[A-Za-z_.][A-Za-z0-9_.]*")


def _referenced_columns(parsed: ParsedFormula) -> list[str]:
    """Names used in the formula that must be data columns (calls and keywords excluded)."""
    text = " + ".join([parsed.fixed_rhs] + [f"{b.expr} + {b.factor}" for b in parsed.bars])
    names = []
    for match in _IDENT.finditer(text):
        token = match.group(0)
        following = text[match.end() :].lstrip()[:1]
        if following == "(" or token in ("I", "C"):
            continue
        if token not in names:
            names.append(token)
    return [parsed.response, *names]


def build_design(spec: ModelSpec, data: pd.DataFrame) -> Design:
    """Validate ``data`` against ``spec`` and build the design both engines use.

    Rows with a missing value in any used column are dropped, as lme4's
    default ``na.action = na.omit`` does, and the count is reported.

    Raises
    ------
    ValueError
        Naming the column, level or setting at fault, before any fit starts.
    """
    if not isinstance(data, pd.DataFrame):
        raise ValueError(f"data must be a pandas DataFrame, not {type(data).__name__}")
    if data.empty:
        raise ValueError("data has no rows")
    parsed = parse_formula(spec.formula)
    used = _referenced_columns(parsed)
    if spec.sigma_by is not None:
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
    if not pd.api.types.is_numeric_dtype(frame[response]) or pd.api.types.is_bool_dtype(
        frame[response]
    ):
        raise ValueError(
            f"response {response!r} must be numeric; it has dtype {frame[response].dtype} "
            "(a gaussian model needs a numeric response)"
        )
    complete = frame.notna().all(axis=1)
    n_dropped = int((~complete).sum())
    notes = []
    if n_dropped:
        per_column = {c: int(frame[c].isna().sum()) for c in frame.columns if frame[c].isna().any()}
        note = f"{n_dropped} row(s) with missing values dropped (na.omit), by column: {per_column}"
        log.warning(note)
        notes.append(note)
        frame = frame.loc[complete].copy()
    frame = frame.reset_index(drop=True)
    if not np.all(np.isfinite(frame[response].to_numpy(float))):
        raise ValueError(f"response {response!r} has infinite values")

    # Grouping factors and categorical predictors become R-style factors.
    factor_columns = set()
    for bar in parsed.bars:
        factor_columns.update(bar.factor.split(":"))
    if spec.sigma_by:
        factor_columns.add(spec.sigma_by)
    factor_levels: dict[str, list[str]] = {}
    for column in factor_columns:
        labels, as_text = _r_level_labels(frame[column])
        factor_levels[column] = labels
        frame[column] = pd.Categorical(as_text, categories=labels)
    for column in frame.columns:
        if column in factor_columns or column == response:
            continue
        values = frame[column]
        if not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
            labels, as_text = _r_level_labels(values)
            factor_levels[column] = labels
            frame[column] = pd.Categorical(as_text, categories=labels)

    X = _model_matrix(parsed.fixed_rhs, frame, response, "fixed part of the formula")
    _check_rank(X)
    y = frame[response].to_numpy(dtype=float)

    blocks: list[RandomBlock] = []
    seen: dict[str, int] = {}
    for bar in parsed.bars:
        parts = bar.factor.split(":")
        if len(parts) == 1:
            labels = factor_levels[parts[0]]
            codes = frame[parts[0]].cat.codes.to_numpy()
        else:
            combined = frame[parts].astype(str).agg(":".join, axis=1)
            # lme4 builds a:b with interaction(drop = TRUE); level order does not
            # matter for alignment (we join on names) but we keep it sorted.
            labels = sorted(combined.unique())
            codes = pd.Categorical(combined, categories=labels).codes
        if len(labels) < 2:
            raise ValueError(
                f"grouping factor {bar.factor!r} has only one level ({labels[0]!r}); "
                "a random effect needs at least two groups"
            )
        Zb = _model_matrix(bar.expr, frame, response, f"random-effect term ({bar.expr} | {bar.factor})")
        if Zb.shape[1] == 0:
            raise ValueError(f"random-effect term ({bar.expr} | {bar.factor}) has no columns")
        count = seen.get(bar.factor, 0)
        seen[bar.factor] = count + 1
        label = bar.factor if count == 0 else f"{bar.factor}.{count}"
        blocks.append(
            RandomBlock(
                factor=bar.factor,
                terms=list(Zb.columns),
                levels=list(labels),
                group_index=np.asarray(codes, dtype=np.int64),
                values=Zb.to_numpy(dtype=float),
                correlated=bar.correlated,
                label=label,
            )
        )
    n_re = sum(b.n_levels * b.n_terms for b in blocks)
    for block in blocks:
        if block.n_levels * block.n_terms >= len(y):
            raise ValueError(
                f"grouping factor {block.factor!r}: {block.n_levels} levels x {block.n_terms} "
                f"term(s) is not fewer than the {len(y)} observations; the random effects "
                "and the residual are unidentifiable (lme4 refuses this too)"
            )
    log.debug("design: n=%d, p=%d, random effects=%d", len(y), X.shape[1], n_re)

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
    )


def _check_rank(X: pd.DataFrame) -> None:
    if X.shape[1] == 0:
        return
    rank = np.linalg.matrix_rank(X.to_numpy())
    if rank < X.shape[1]:
        # Find the columns lme4 would drop (it keeps the first linearly independent set).
        keep: list[int] = []
        for j in range(X.shape[1]):
            trial = keep + [j]
            if np.linalg.matrix_rank(X.iloc[:, trial].to_numpy()) == len(trial):
                keep.append(j)
        dropped = [c for j, c in enumerate(X.columns) if j not in keep]
        raise ValueError(
            f"fixed-effect model matrix is rank deficient: column(s) {dropped} are linear "
            "combinations of the others (lme4 would drop them silently); remove them from "
            "the formula"
        )
