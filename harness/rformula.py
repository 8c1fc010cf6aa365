"""R's formula algebra and ``model.matrix``, for the right-hand sides lme4 sees.

lme4 builds its fixed-effects matrix with ``model.matrix(nobars(formula))`` and
each random-effects block with ``model.matrix(~ expr)``.  Matching those
matrices column for column needs R's rules, which differ from the full-rank
coding of ``formulae``/patsy when an interaction appears without its margins
(``f:h``, ``x:f`` without ``x``).  So this module re-implements the parts of
R's ``terms.formula`` (``+ - * / : ^ %in%``, ``0``/``1``/``-1``, term ordering
by degree) and ``model.matrix`` (treatment contrasts, the margin rule that
picks contrasts or indicator coding per factor, column order and names) that
gaussian lme4 formulas use.  Everything is checked against ``lme4::lFormula``
in ``tests/test_formula_features.py``.
"""

from __future__ import annotations

import ast
import itertools
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import numpy as np
import pandas as pd

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

_TOKEN = re.compile(
    r"\s*(?:(?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)(?![A-Za-z_.])"
    r"|(?P<name>[A-Za-z.][A-Za-z0-9._]*)"
    r"|(?P<tick>`[^`]*`)"
    r"|(?P<op>%in%|%[^%\s]*%|\*\*|==|!=|<=|>=|&&|\|\||[-+*/:^(),<>!&|~=$@\[\]{}]))"
)


@dataclass(frozen=True)
class _Token:
    kind: str  # "num", "name", "op", "call"
    text: str
    pos: int
    inner: str = ""  # the argument text of a call


def _tokenize(text: str, context: str) -> list[_Token]:
    tokens: list[_Token] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        match = _TOKEN.match(text, pos)
        if match is None:
            bad = text[pos:].lstrip()[:1]
            raise ValueError(f"{context}: unexpected character {bad!r} in {text!r}")
        kind = match.lastgroup or "op"
        value = match.group(kind)
        start = match.start(kind)
        pos = match.end()
        if kind == "tick":
            raise ValueError(
                f"{context}: back-quoted name {value} is not supported; rename the column to a "
                "syntactic R name (letters, digits, '.' and '_')"
            )
        if kind == "name" and text[pos:].lstrip().startswith("("):
            open_at = text.index("(", pos)
            close_at = _matching_paren(text, open_at, context)
            tokens.append(_Token("call", value, start, inner=text[open_at + 1 : close_at]))
            pos = close_at + 1
            continue
        tokens.append(_Token(kind, value, start))
    return tokens


def _matching_paren(text: str, open_at: int, context: str) -> int:
    depth = 0
    for i in range(open_at, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return i
    raise ValueError(f"{context}: unbalanced '(' in {text!r}")


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


_SPACED = {"+", "-", "*", "==", "!=", "<", ">", "<=", ">=", "&", "|", "&&", "||"}


def _deparse(tokens: list[_Token]) -> str:
    """Re-emit tokens with R's ``deparse`` spacing (``x * 2``, ``x/2``, ``x^2``, ``-x``)."""
    out: list[str] = []
    previous: _Token | None = None
    for token in tokens:
        if token.kind == "num":
            out.append(r_number(float(token.text)))
        elif token.kind == "name":
            out.append(token.text)
        elif token.kind == "call":
            inner = _deparse(_tokenize(token.inner, "formula")) if token.inner.strip() else ""
            out.append(f"{token.text}({inner})")
        else:
            op = "^" if token.text == "**" else token.text
            unary = op in ("-", "+") and (
                previous is None or (previous.kind == "op" and previous.text not in (")",))
            )
            if op == ",":
                out.append(", ")
            elif op in _SPACED and not unary:
                out.append(f" {op} ")
            else:
                out.append(op)
        previous = token
    return "".join(out)


# --------------------------------------------------------------------------- variables


@dataclass(frozen=True)
class Variable:
    """One variable of a formula: a data column or a call on numeric columns.

    ``name`` is R's deparsed name (``x``, ``I(x^2)``, ``log(x)``), which is how
    R names model-matrix columns; ``expression`` is the Python expression
    evaluating a call (``None`` for a plain column).
    """

    name: str
    columns: tuple[str, ...]
    expression: str | None = None


def _call_variable(token: _Token, context: str) -> Variable:
    fn = token.text
    if fn in UNSUPPORTED_CALLS:
        raise ValueError(f"{context}: {UNSUPPORTED_CALLS[fn]}")
    if fn != "I" and fn not in FORMULA_FUNCTIONS:
        raise ValueError(
            f"{context}: function {fn}() is not supported in formulas; supported are I() and "
            f"{', '.join(f'{f}()' for f in FORMULA_FUNCTIONS)} on numeric columns"
        )
    inner_tokens = _tokenize(token.inner, context)
    if not inner_tokens:
        raise ValueError(f"{context}: {fn}() has no argument")
    name = f"{fn}({_deparse(inner_tokens)})"
    python = _python_expression(inner_tokens, context, name)
    expression = python if fn == "I" else f"{fn}({python})"
    tree = ast.parse(expression, mode="eval")
    columns = tuple(
        dict.fromkeys(
            node.id.replace("__dot__", ".")
            for node in ast.walk(tree)
            if isinstance(node, ast.Name) and node.id not in FORMULA_FUNCTIONS
        )
    )
    _check_ast(tree, name)
    return Variable(name=name, columns=columns, expression=expression)


def _python_expression(tokens: list[_Token], context: str, name: str) -> str:
    parts = []
    for token in tokens:
        if token.kind == "call":
            inner = _call_variable(token, context)
            parts.append(f"({inner.expression})")
        elif token.kind == "op":
            if token.text in ("^", "**"):
                parts.append("**")
            elif token.text in ("+", "-", "*", "/", "(", ")"):
                parts.append(token.text)
            else:
                raise ValueError(
                    f"{context}: operator {token.text!r} inside {name} is not supported; "
                    "only arithmetic (+ - * / ^) on numeric columns"
                )
        elif token.kind == "name" and "." in token.text:
            # R names may contain dots; Python identifiers may not, so map them.
            parts.append(_py_name(token.text))
        else:
            parts.append(token.text)
    return " ".join(parts)


def _py_name(name: str) -> str:
    return "__dot__".join(name.split(".")) if "." in name else name


def _check_ast(tree: ast.AST, name: str) -> None:
    allowed = (
        ast.Expression,
        ast.BinOp,
        ast.UnaryOp,
        ast.Name,
        ast.Constant,
        ast.Call,
        ast.Load,
        ast.Add,
        ast.Sub,
        ast.Mult,
        ast.Div,
        ast.Pow,
        ast.USub,
        ast.UAdd,
    )
    for node in ast.walk(tree):
        if not isinstance(node, allowed):
            raise ValueError(f"cannot evaluate {name}: {type(node).__name__} is not supported")
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in FORMULA_FUNCTIONS:
                raise ValueError(f"cannot evaluate {name}: only {sorted(FORMULA_FUNCTIONS)} calls")
            if len(node.args) != 1 or node.keywords:
                raise ValueError(f"cannot evaluate {name}: functions take one argument here")


def evaluate_variable(variable: Variable, frame: pd.DataFrame) -> pd.Series:
    """Values of one variable on ``frame`` (a column, or a call evaluated element-wise)."""
    if variable.expression is None:
        values = frame[variable.name]
        numeric = pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
        if numeric or isinstance(values.dtype, pd.CategoricalDtype):
            return values
        # Text and logical columns are factors in R's model.matrix.
        labels, as_text = r_level_labels(values)
        return pd.Series(pd.Categorical(as_text, categories=labels), index=frame.index)
    names: dict[str, Any] = dict(FORMULA_FUNCTIONS)
    for column in variable.columns:
        values = frame[column]
        if not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
            raise ValueError(
                f"{variable.name} uses column {column!r}, which is not numeric; "
                "arithmetic in a formula needs numeric columns"
            )
        names[_py_name(column)] = values.to_numpy(dtype=float)
    tree = ast.parse(variable.expression, mode="eval")
    with np.errstate(all="ignore"):
        result = eval(
            compile(tree, variable.name, "eval"), {"__builtins__": {}}, names
        )  # the AST was checked above
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


class _Parser:
    """Recursive descent over R's formula operators, evaluated with R's term algebra."""

    def __init__(self, tokens: list[_Token], context: str, text: str) -> None:
        self.tokens = tokens
        self.i = 0
        self.context = context
        self.text = text
        self.variables: list[Variable] = []
        self.intercept = True

    # R's term algebra on lists of frozensets of variable indices.
    @staticmethod
    def _trim(terms: list[frozenset[int]]) -> list[frozenset[int]]:
        return list(dict.fromkeys(t for t in terms if t))

    def _peek(self) -> _Token | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def _fail(self, what: str) -> ValueError:
        return ValueError(f"{self.context}: {what} in {self.text!r}")

    def parse(self) -> list[frozenset[int]]:
        terms = self._sum()
        if self._peek() is not None:
            raise self._fail(f"unexpected {self._peek().text!r}")  # type: ignore[union-attr]
        return terms

    def _sum(self) -> list[frozenset[int]]:
        terms: list[frozenset[int]] = []
        sign = "+"
        token = self._peek()
        if token is not None and token.kind == "op" and token.text in ("+", "-"):
            sign = token.text
            self.i += 1
        while True:
            token = self._peek()
            if token is not None and token.kind == "num":
                self.i += 1
                if token.text not in ("0", "1"):
                    raise self._fail(f"number {token.text} cannot be a term (only 0, 1 and -1)")
                # R's global intercept flag: +1/-0 keep it, +0/-1 remove it.
                self.intercept = (token.text == "1") == (sign == "+")
            else:
                part = self._product()
                if sign == "+":
                    terms = self._trim(terms + part)
                else:
                    terms = [t for t in terms if t not in set(part)]
            token = self._peek()
            if token is None or token.kind != "op" or token.text not in ("+", "-"):
                return terms
            sign = token.text
            self.i += 1

    def _product(self) -> list[frozenset[int]]:
        left = self._in()
        while (
            (token := self._peek()) is not None and token.kind == "op" and token.text in ("*", "/")
        ):
            self.i += 1
            right = self._in()
            if token.text == "*":
                left = self._trim(left + right + [a | b for a in left for b in right])
            else:
                # a/b is a + (all variables of a):b
                whole = frozenset().union(*left) if left else frozenset()
                left = self._trim(left + [whole | b for b in right])
        return left

    def _in(self) -> list[frozenset[int]]:
        left = self._interaction()
        while (
            (token := self._peek()) is not None
            and token.kind == "op"
            and token.text.startswith("%")
        ):
            if token.text != "%in%":
                raise self._fail(f"operator {token.text} is not supported")
            self.i += 1
            right = self._interaction()
            whole = frozenset().union(*right) if right else frozenset()
            left = self._trim([a | whole for a in left])
        return left

    def _interaction(self) -> list[frozenset[int]]:
        left = self._power()
        while (token := self._peek()) is not None and token.kind == "op" and token.text == ":":
            self.i += 1
            right = self._power()
            left = self._trim([a | b for a in left for b in right])
        return left

    def _power(self) -> list[frozenset[int]]:
        base = self._atom()
        token = self._peek()
        if token is not None and token.kind == "op" and token.text in ("^", "**"):
            self.i += 1
            exponent = self._peek()
            if exponent is None or exponent.kind != "num" or not float(exponent.text).is_integer():
                raise self._fail("'^' in a formula needs a whole number, as in (a + b)^2")
            self.i += 1
            result = base
            for _ in range(int(float(exponent.text)) - 1):
                result = self._trim([a | b for a in base for b in result])
            return result
        return base

    def _install(self, variable: Variable) -> int:
        for j, known in enumerate(self.variables):
            if known.name == variable.name:
                return j
        self.variables.append(variable)
        return len(self.variables) - 1

    def _atom(self) -> list[frozenset[int]]:
        token = self._peek()
        if token is None:
            raise self._fail("a term is missing")
        self.i += 1
        if token.kind == "name":
            if token.text == ".":
                raise self._fail("'.' (all other columns) is not supported; name the columns")
            return [frozenset({self._install(Variable(token.text, (token.text,)))})]
        if token.kind == "call":
            return [frozenset({self._install(_call_variable(token, self.context))})]
        if token.kind == "op" and token.text == "(":
            inner = self._sum()
            closing = self._peek()
            if closing is None or closing.text != ")":
                raise self._fail("unbalanced '('")
            self.i += 1
            return inner
        if token.kind == "num":
            raise self._fail(f"number {token.text} inside an interaction or power")
        if token.text == "|":
            raise self._fail("'|' outside a random-effect term '(expr | factor)'")
        raise self._fail(f"unexpected {token.text!r}")


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
    parser = _Parser(_tokenize(rhs, context), context, rhs)
    if not parser.tokens:
        raise ValueError(f"{context}: empty right-hand side")
    found = parser.parse()
    # Variables in a term follow their order of first appearance; terms sort by degree.
    ordered = [tuple(sorted(term)) for term in found]
    ordered.sort(key=len)
    return Terms(
        intercept=parser.intercept, variables=tuple(parser.variables), terms=tuple(ordered)
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
