"""R's formula terms and ``model.matrix``, for the right-hand sides lme4 sees.

lme4 builds its fixed-effects matrix with ``model.matrix(nobars(formula))`` and
each random-effects block with ``model.matrix(~ expr)``.  ``formulae``
(Bambi's parser) scans and parses the text and evaluates calls such as
``I(x^2)``; this module keeps only what formulae does not do R's way:

* spellings formulae's scanner lacks or misreads are translated or refused
  first: R's ``^`` (formulae's ``**``), exponents in numbers (``1e5``),
  ``%in%`` (formulae's parser stops silently at ``%``), ``.``, back-quotes;
* R's term algebra (``terms.formula``), because formulae's expansion gives
  other terms for some formulas (see :class:`_Expander`);
* call names as R's ``deparse`` writes them (``I(x * 2.5)``, ``I(x^2)``);
* ``model.matrix``'s coding, which differs from formulae's full-rank coding
  when an interaction appears without its margins (``f:h``, ``x:f`` without
  ``x``): treatment contrasts, the margin rule and R's column names;
* factor levels sorted and printed as R sorts and prints them.

Everything is checked against ``lme4::lFormula`` in ``tests/test_formula_features.py``.
"""

from __future__ import annotations

import itertools
import re
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import numpy as np
import pandas as pd
from formulae import expr as fx
from formulae.environment import Environment
from formulae.parser import ParseError, Parser
from formulae.scanner import ScanError, Scanner
from formulae.terms.call_resolver import (
    CallResolver,
    CallResolverError,
    LazyCall,
    LazyVariable,
)
from formulae.token import Token

#: Element-wise functions a formula may call on numeric columns (R name -> numpy).
FORMULA_FUNCTIONS: dict[str, Callable[[Any], Any]] = {
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
    "poly": "poly() is not supported; add explicit polynomial columns (I(x^2))",
    "weights": "prior weights are not supported",
    "scale": "scale() inside the formula is not supported; standardise the column first",
    "cbind": "cbind() responses mean a binomial model; only gaussian models are supported",
    "Surv": "survival responses are not supported; only gaussian models are supported",
    "factor": "factor() inside the formula is not supported; make the column text (or "
    "categorical) in the data instead",
    "as.factor": "as.factor() inside the formula is not supported; make the column text (or "
    "categorical) in the data instead",
    "C": "C() contrasts are not supported; the harness uses R's default treatment contrasts",
    "dummy": "lme4's dummy() is not supported",
}

# The namespace formulae evaluates calls in: nothing but I() and the functions above.
_CALL_ENV = Environment([{"I": lambda value: value, **FORMULA_FUNCTIONS}])


# --------------------------------------------------------------------------- numbers and names


def r_number(value: float) -> str:
    """A number as R's ``deparse``/``as.character`` write it (15 significant digits)."""
    value = float(value)
    if not np.isfinite(value):
        return {True: "Inf", False: "-Inf"}[value > 0] if not np.isnan(value) else "NaN"
    if value == 0:
        return "0"
    d = Decimal(f"{abs(value):.15g}").normalize()
    _, digits, exponent = d.as_tuple()
    assert isinstance(exponent, int)
    e10 = len(digits) - 1 + exponent
    mantissa = str(digits[0]) + ("." + "".join(map(str, digits[1:])) if len(digits) > 1 else "")
    sci = f"{mantissa}e{'+' if e10 >= 0 else '-'}{abs(e10):02d}"
    fixed = format(d, "f")
    # R prefers fixed notation unless it is wider than scientific (scipen = 0).
    text = fixed if len(fixed) <= len(sci) else sci
    return ("-" if value < 0 else "") + text


def _r_deparse(node: Any) -> str:
    """A call as R's ``deparse`` writes it (``I(x * 2.5)``, ``I(x/2 - z)``, ``I(x^2)``, ``-x``).

    Works on formulae's parse tree, which still holds the parentheses as
    written (R keeps them in the name too).
    """
    if isinstance(node, fx.Call):
        return f"{node.callee.name.lexeme}({', '.join(map(_r_deparse, node.args))})"
    if isinstance(node, fx.Grouping):
        return f"({_r_deparse(node.expression)})"
    if isinstance(node, fx.Binary):
        op = "^" if node.operator.kind == "STAR_STAR" else node.operator.lexeme
        op = f" {op} " if op in ("+", "-", "*") else op
        return f"{_r_deparse(node.left)}{op}{_r_deparse(node.right)}"
    if isinstance(node, fx.Unary):
        return node.operator.lexeme + _r_deparse(node.right)
    if isinstance(node, fx.Literal):
        return r_number(node.value)
    return str(node.name.lexeme)


# --------------------------------------------------------------------------- variables


@dataclass(frozen=True)
class Variable:
    """One variable of a formula: a data column or a call on numeric columns.

    ``name`` is R's deparsed name (``x``, ``I(x^2)``, ``log(x)``), which is how
    R names model-matrix columns; ``call`` is formulae's lazy call that
    evaluates it (``None`` for a plain column).
    """

    name: str
    columns: tuple[str, ...]
    call: LazyCall | None = field(default=None, compare=False, repr=False)


def _lazy_nodes(node: Any) -> Iterator[Any]:
    yield node
    for child in getattr(node, "args", ()):
        yield from _lazy_nodes(child)


def _call_variable(node: fx.Call, context: str) -> Variable:
    name = _r_deparse(node)
    call = CallResolver(node).resolve()
    for part in _lazy_nodes(call):
        if not isinstance(part, LazyCall):
            continue
        fn = part.callee
        if fn in UNSUPPORTED_CALLS:
            raise ValueError(f"{context}: {UNSUPPORTED_CALLS[fn]}")
        if fn != "I" and fn not in FORMULA_FUNCTIONS:
            raise ValueError(
                f"{context}: function {fn}() is not supported in formulas; supported are I() "
                f"and {', '.join(f'{f}()' for f in FORMULA_FUNCTIONS)} on numeric columns"
            )
        if len(part.args) != 1 or part.kwargs:
            raise ValueError(f"{context}: {fn}() takes exactly one argument here, in {name}")
    columns = [p.name for p in _lazy_nodes(call) if isinstance(p, LazyVariable)]
    return Variable(name=name, columns=tuple(dict.fromkeys(columns)), call=call)


def evaluate_variable(variable: Variable, frame: pd.DataFrame) -> pd.Series:
    """Values of one variable on ``frame`` (a column, or a call evaluated element-wise)."""
    if variable.call is None:
        values = frame[variable.name]
        numeric = pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
        if numeric or isinstance(values.dtype, pd.CategoricalDtype):
            return values
        # Text and logical columns are factors in R's model.matrix.
        labels, as_text = r_level_labels(values)
        return pd.Series(pd.Categorical(as_text, categories=labels), index=frame.index)
    for column in variable.columns:
        values = frame[column]
        if not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
            raise ValueError(
                f"{variable.name} uses column {column!r}, which is not numeric; "
                "arithmetic in a formula needs numeric columns"
            )
    numbers = frame.loc[:, list(variable.columns)].astype(float)
    with np.errstate(all="ignore"):
        result = variable.call.eval(numbers, _CALL_ENV)
    result = np.broadcast_to(np.asarray(result, dtype=float), (len(frame),)).copy()
    if not np.all(np.isfinite(result)):
        bad = int((~np.isfinite(result)).sum())
        raise ValueError(
            f"{variable.name} is not finite in {bad} row(s) (e.g. log of a value <= 0)"
        )
    return pd.Series(result, index=frame.index, name=variable.name)


# --------------------------------------------------------------------------- terms


@dataclass(frozen=True)
class Terms:
    """The terms of a right-hand side, as R's ``terms.formula`` orders them.

    ``terms`` holds variable indices per term, sorted by degree (stable), each
    term's variables in order of first appearance; ``intercept`` says whether
    ``(Intercept)`` is in the model.
    """

    intercept: bool
    variables: tuple[Variable, ...]
    terms: tuple[tuple[int, ...], ...]

    def labels(self) -> list[str]:
        """R's ``attr(terms, "term.labels")``."""
        return [":".join(self.variables[i].name for i in term) for term in self.terms]

    @property
    def columns(self) -> list[str]:
        """Data columns the terms read, in order of appearance."""
        names: list[str] = []
        for variable in self.variables:
            names.extend(c for c in variable.columns if c not in names)
        return names


#: Longest number a formula may spell, and most terms a right-hand side may expand to
#: (R's own limit is 2^32; beyond a few hundred terms no mixed model is fitted anyway,
#: and the expansion's cost grows with the square of the count).
MAX_NUMBER_CHARS = 40
MAX_TERMS = 500

# formulae's scanner has no exponent in numbers: 1e5 would be 1 followed by a name e5.
_EXPONENT = re.compile(r"(?<![\w.])(?:\d+\.?\d*|\.\d+)[eE][+-]?\d+")
_KINDS = {"IDENTIFIER", "NUMBER", "PLUS", "MINUS", "STAR", "STAR_STAR", "SLASH", "COLON"}
_KINDS |= {"LEFT_PAREN", "RIGHT_PAREN", "COMMA", "EOF"}


def _scan(rhs: str, context: str) -> list[Token]:
    """formulae's tokens for an R right-hand side, R's spellings translated or refused."""
    if "`" in rhs:  # formulae would read `a b` as a column; its scanner loops on a lone `
        raise ValueError(
            f"{context}: back-quoted names are not supported in {rhs!r}; rename the column to "
            "a syntactic R name (letters, digits, '.' and '_')"
        )
    for number in re.findall(r"[0-9][0-9.]*(?:[eE][+-]?[0-9]+)?", rhs):
        if len(number) > MAX_NUMBER_CHARS:
            raise ValueError(
                f"{context}: number {number[:20]}... has {len(number)} characters; "
                f"the harness reads numbers of up to {MAX_NUMBER_CHARS}"
            )
    text = _EXPONENT.sub(lambda m: format(Decimal(m[0]), "f"), rhs.replace("^", "**"))
    try:
        scanned = Scanner(text).scan(add_intercept=False)
    except ScanError as err:
        raise ValueError(f"{context}: {err} in {rhs!r}") from None
    tokens: list[Token] = []
    while scanned:
        token = scanned.pop(0)
        if token.kind == "MODULO":  # formulae scans %in% as three tokens and parses none
            op = "%" + "".join(t.lexeme for t in scanned[:2])
            if op != "%in%":
                raise ValueError(f"{context}: operator {op} is not supported in {rhs!r}")
            token = Token("IN", op)
            del scanned[:2]
        elif token.kind == "PERIOD":
            raise ValueError(f"{context}: '.' (all other columns) is not supported; name them")
        elif token.kind == "PIPE":
            raise ValueError(f"{context}: '|' outside a random-effect term '(expr | factor)'")
        elif token.kind not in _KINDS:
            raise ValueError(f"{context}: {token.lexeme!r} is not supported in {rhs!r}")
        tokens.append(token)
    return tokens


class _RParser(Parser):
    """formulae's parser plus R's ``%in%``, which binds between ``*`` and ``:``."""

    def multiplication(self) -> Any:
        expr = self._nesting()
        while self.match(["STAR", "SLASH"]):
            operator = self.previous()
            expr = fx.Binary(expr, operator, self._nesting())
        return expr

    def _nesting(self) -> Any:
        expr = self.interaction()
        while self.match("IN"):
            operator = self.previous()
            expr = fx.Binary(expr, operator, self.interaction())
        return expr


def _trim(terms: list[frozenset[int]]) -> list[frozenset[int]]:
    return list(dict.fromkeys(t for t in terms if t))


class _Expander:
    """R's term algebra (``TermCode`` in R's ``model.c``) over formulae's parse tree.

    formulae's own expansion (its ``Resolver``) gives other models than R for
    some formulas, so it is not used: its terms are ordered lists (``x*z -
    z:x`` keeps ``x:z``; ``((a + b:c)^2)^2`` has both ``a:b:c`` and
    ``b:c:a``), ``(x + z)*(x + z)`` lacks ``x:z``, ``0``/``1`` inside
    parentheses are ignored (``(x + z + 0)`` keeps the intercept) or fail
    (``x - 0``, ``(1 + x):z``), and calls with numbers fail in ``*``
    (``(I(x*2) + z)*(I(x*2) + z)``).  Here a term is a set of variable
    indices and the intercept is R's single flag, set by the last ``0``/``1``
    read (flipped on the right of ``-``).
    """

    def __init__(self, context: str, rhs: str) -> None:
        self.context, self.rhs = context, rhs
        self.variables: dict[str, Variable] = {}  # by R name, in order of appearance
        self.intercept = True
        self.parity = True

    def _too_many(self, count: int) -> None:
        raise ValueError(
            f"{self.context}: {self.rhs!r} expands to more than {MAX_TERMS} terms "
            f"({count} or more); the harness fits at most {MAX_TERMS}"
        )

    def _variable(self, variable: Variable) -> list[frozenset[int]]:
        self.variables.setdefault(variable.name, variable)
        return [frozenset({list(self.variables).index(variable.name)})]

    def _deleted(self, node: Any) -> list[frozenset[int]]:
        self.parity = not self.parity
        try:
            return self.expand(node)
        finally:
            self.parity = not self.parity

    def expand(self, node: Any) -> list[frozenset[int]]:
        if isinstance(node, fx.Grouping):
            return self.expand(node.expression)
        if isinstance(node, fx.Variable):
            return self._variable(Variable(node.name.lexeme, (node.name.lexeme,)))
        if isinstance(node, fx.Call):
            return self._variable(_call_variable(node, self.context))
        if isinstance(node, fx.Literal):
            if node.value not in (0, 1):
                raise ValueError(
                    f"{self.context}: number {node.lexeme or node.value} cannot be a term "
                    f"(only 0, 1 and -1) in {self.rhs!r}"
                )
            self.intercept = (node.value == 1) == self.parity
            return []
        if isinstance(node, fx.Unary):
            if node.operator.kind == "MINUS":
                self._deleted(node.right)
                return []
            return self.expand(node.right)
        op = node.operator.kind
        if op == "MINUS":
            left = self.expand(node.left)
            removed = set(self._deleted(node.right))
            return [t for t in left if t not in removed]
        if op == "STAR_STAR":
            power = node.right.value if isinstance(node.right, fx.Literal) else None
            if not isinstance(power, int) or power < 1:
                raise ValueError(
                    f"{self.context}: '^' in a formula needs a whole number, as in (a + b)^2"
                )
            base = result = self.expand(node.left)
            for _ in range(power - 1):
                if len(base) * len(result) > MAX_TERMS and len(base) > 1:
                    # The next product may still collapse, but bound the work: up to
                    # len(base) choose k terms follow, which only small bases keep small.
                    if (
                        sum(1 for _ in itertools.islice(_subsets_upto(base, power), MAX_TERMS + 1))
                        > MAX_TERMS
                    ):
                        self._too_many(MAX_TERMS + 1)
                result, previous = _trim([a | b for a in base for b in result]), result
                if result == previous:  # all interactions reached; ends (a + b)^1e50 too
                    break
            return result
        left, right = self.expand(node.left), self.expand(node.right)
        if op in ("STAR", "COLON") and len(left) * len(right) > MAX_TERMS:
            self._too_many(len(left) * len(right))
        if op in ("STAR", "SLASH") and not left:
            return []  # R's CrossTerms/NestTerms drop the right side too (model.c)
        crossed = [a | b for a in left for b in right]
        if op == "PLUS":
            return _trim(left + right)
        if op == "COLON":
            return _trim(crossed)
        if op == "STAR":
            return _trim(left + right + crossed)
        if op == "SLASH":  # a/b is a + (all variables of a):b
            return _trim(left + [frozenset().union(*left) | b for b in right])
        if op == "IN":  # a %in% b is a:(all variables of b)
            return _trim([a | frozenset().union(*right) for a in left])
        raise ValueError(
            f"{self.context}: {node.operator.lexeme!r} is not supported in {self.rhs!r}"
        )


def _subsets_upto(base: list[frozenset[int]], power: int) -> Iterator[frozenset[int]]:
    """The distinct unions of up to ``power`` of ``base``'s terms (lazily, for counting)."""
    seen: set[frozenset[int]] = set()
    frontier = list(dict.fromkeys(base))
    for _ in range(power):
        grown: list[frozenset[int]] = []
        for term in frontier:
            if term not in seen:
                seen.add(term)
                yield term
            grown.extend(term | b for b in base if not b <= term)
        frontier = list(dict.fromkeys(grown))
        if not frontier:
            return


def parse_terms(rhs: str, context: str = "formula") -> Terms:
    """Parse a right-hand side the way R's ``terms.formula`` does.

    Parameters
    ----------
    rhs : str
        E.g. ``"x * f"``, ``"0 + x"``, ``"(a + b + c)^2 - a:b"``, ``"I(x^2)"``.
    context : str
        Where the text comes from, for error messages.

    Returns
    -------
    Terms

    Raises
    ------
    ValueError
        On syntax R would reject or features the harness does not fit.
    """
    if not rhs.strip():
        raise ValueError(f"{context}: empty right-hand side")
    parser = _RParser(_scan(rhs, context))
    expander = _Expander(context, rhs)
    try:
        tree = parser.parse()
        if not parser.at_end():  # formulae's parser stops quietly at what it cannot read
            raise ParseError(f"unexpected {parser.peek().lexeme!r}")
        found = expander.expand(tree)
    except (ParseError, CallResolverError, AttributeError) as err:
        raise ValueError(f"{context}: cannot read {rhs!r} as an R formula ({err})") from None
    return Terms(
        intercept=expander.intercept,
        variables=tuple(expander.variables.values()),
        # A term's variables in order of appearance; terms sorted by degree, stably.
        terms=tuple(sorted((tuple(sorted(t)) for t in found), key=len)),
    )


def uncorrelated_exprs(expr: str, context: str = "formula") -> list[str]:
    """lme4's ``expandDoubleVerts``: ``(x * z || g)`` is ``(1|g) + (0+x|g) + (0+z|g) + (0+x:z|g)``."""
    terms = parse_terms(expr, context)
    out = ["1"] if terms.intercept else []
    out.extend(f"0 + {label}" for label in terms.labels())
    return out


# --------------------------------------------------------------------------- model matrix


def model_matrix(terms: Terms, frame: pd.DataFrame, context: str = "formula") -> pd.DataFrame:
    """R's ``model.matrix`` with default treatment contrasts.

    ``frame`` must hold factors as ``pandas.Categorical`` whose categories are
    the levels in R's order (first level = reference) and numeric columns as
    numbers.

    Returns
    -------
    DataFrame
        One column per model-matrix column, named as R names them
        (``(Intercept)``, ``x``, ``fB``, ``x:fB``, ``I(x^2)``).
    """
    values: list[pd.Series] = [evaluate_variable(v, frame) for v in terms.variables]
    is_factor = [isinstance(v.dtype, pd.CategoricalDtype) for v in values]
    for variable, series, factor in zip(terms.variables, values, is_factor, strict=True):
        if factor and len(series.cat.categories) < 2:
            only = list(series.cat.categories)
            raise ValueError(
                f"{context}: column {variable.name!r} is a factor with only one level {only}; "
                "contrasts need at least two levels (R refuses this too)"
            )
    coding = _factor_coding(terms, is_factor)
    columns: dict[str, np.ndarray] = {}
    if terms.intercept:
        columns["(Intercept)"] = np.ones(len(frame))
    for t, term in enumerate(terms.terms):
        pieces: list[list[tuple[str, np.ndarray]]] = []
        for j in term:
            name = terms.variables[j].name
            series = values[j]
            if not is_factor[j]:
                pieces.append([(name, series.to_numpy(dtype=float))])
                continue
            codes = series.cat.codes.to_numpy()
            levels = list(series.cat.categories)
            start = 0 if coding[t][j] == "indicator" else 1
            pieces.append(
                [
                    (f"{name}{levels[k]}", (codes == k).astype(float))
                    for k in range(start, len(levels))
                ]
            )
        # R's first variable varies fastest across an interaction's columns.
        for combo in itertools.product(*reversed(pieces)):
            parts = list(reversed(combo))
            label = ":".join(p[0] for p in parts)
            column = np.ones(len(frame))
            for _, v in parts:
                column = column * v
            columns[label] = column
    return pd.DataFrame(columns, index=frame.index)


def _factor_coding(terms: Terms, is_factor: list[bool]) -> list[dict[int, str]]:
    """Per term and factor: "contrasts" or "indicator", by R's margin rule (``TermCode``)."""
    coding: list[dict[int, str]] = []
    as_sets = [frozenset(t) for t in terms.terms]
    for t, term in enumerate(terms.terms):
        codes: dict[int, str] = {}
        for j in term:
            if not is_factor[j]:
                continue
            margin = as_sets[t] - {j}
            # Contrasts when the term without this factor is empty or inside an earlier term.
            contrasts = not margin or any(margin <= earlier for earlier in as_sets[:t])
            codes[j] = "contrasts" if contrasts else "indicator"
        coding.append(codes)
    if not terms.intercept:
        # Without an intercept, R codes the first factor it meets by indicators.
        for t, term in enumerate(terms.terms):
            factors = [j for j in term if is_factor[j]]
            if factors:
                coding[t][factors[0]] = "indicator"
                break
    return coding


def collinear_columns(X: pd.DataFrame, tol: float = 1e-7) -> list[str]:
    """Columns lme4 drops from a rank-deficient X (``chkRank.drop.cols``).

    lme4 keeps the first ``rank`` pivots of LINPACK's QR (``qr(X, tol = 1e-7,
    LAPACK = FALSE)``), which moves a column to the end when its norm, after
    removing the earlier columns, falls below ``tol`` times its original norm.
    Walking the columns in order with the same test gives the same set.
    """
    kept: list[np.ndarray] = []
    dropped: list[str] = []
    for name in X.columns:
        column = X[name].to_numpy(dtype=float)
        norm = float(np.linalg.norm(column)) or 1.0
        residual = column.copy()
        for _ in range(2):  # twice for numerical orthogonality
            for q in kept:
                residual -= q * (q @ residual)
        remaining = float(np.linalg.norm(residual))
        if remaining < tol * norm:
            dropped.append(str(name))
        else:
            kept.append(residual / remaining)
    return dropped


# --------------------------------------------------------------------------- factor levels

# ICU root collation order of ASCII punctuation and symbols (R sorts strings with ICU).
_ICU_PUNCT = " _-,;:!?.'\"()[]{}@*/\\&#%`^+<=>|~$"


def r_sort_key(text: str) -> tuple[Any, ...]:
    """Sort key approximating R's ``sort()`` of strings (ICU root collation).

    Primary: punctuation < digits < letters, letters case- and accent-blind;
    secondary: unaccented before accented; tertiary: lower case before upper.
    Exact for ASCII letters, digits and common punctuation.
    """
    primary: list[tuple[int, Any]] = []
    secondary: list[int] = []
    tertiary: list[int] = []
    for ch in text:
        base = unicodedata.normalize("NFD", ch)[0]
        if ch in _ICU_PUNCT:
            primary.append((0, _ICU_PUNCT.index(ch)))
        elif base.isdigit():
            primary.append((1, base))
        elif base.isalpha():
            primary.append((2, base.lower()))
        else:
            primary.append((3, ord(ch)))
        secondary.append(0 if base == ch else 1)
        tertiary.append(1 if ch.isupper() else 0)
    return tuple(primary), tuple(secondary), tuple(tertiary), text


def r_level_labels(values: pd.Series) -> tuple[list[str], pd.Series]:
    """Levels as R's ``factor()`` makes them: sorted, printed as R prints them.

    Returns the levels present (after missing rows are gone) and the values as
    strings.  Categorical input keeps its category order, as an R factor keeps
    its levels.
    """
    if isinstance(values.dtype, pd.CategoricalDtype):
        present_set = set(values.dropna())
        present = [c for c in values.cat.categories if c in present_set]
        labels = [r_label(c) for c in present]
        mapping = dict(zip(present, labels, strict=True))
        return labels, values.map(mapping).astype(str)
    if pd.api.types.is_bool_dtype(values):
        mapping = {False: "FALSE", True: "TRUE"}
        labels = [mapping[bool(v)] for v in sorted(values.unique())]
        return labels, values.map(lambda v: mapping[bool(v)])
    if pd.api.types.is_numeric_dtype(values):
        uniq = np.sort(values.unique())
        labels = [r_label(v) for v in uniq]
        mapping = dict(zip(uniq, labels, strict=True))
        return labels, values.map(mapping)
    as_text = values.astype(str)
    labels = sorted(as_text.unique(), key=r_sort_key)
    return labels, as_text


def r_label(value: Any) -> str:
    """One value as R's ``as.character`` prints it (``1``, ``0.5``, ``1e+05``, ``TRUE``)."""
    if isinstance(value, (bool, np.bool_)):
        return "TRUE" if value else "FALSE"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return r_number(float(value))
    return str(value)
