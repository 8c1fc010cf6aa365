"""Response families for generalised linear mixed models (glmer's ``family =``).

A :class:`Family` says everything the rest of the harness asks about a
response distribution: its links, how the response is read from the
formula's left-hand side (``cbind(successes, failures)``, a 0/1 column, a
count), which values are valid, the PyMC likelihood given the linear
predictor ``eta``, the log-likelihood and IRLS weights the Laplace
approximation needs (:mod:`harness.checks.laplace`), and what the report calls the
scale.  A later family (negative binomial, Gamma) is one more subclass
registered in :data:`FAMILIES`.

Gaussian models keep their own, older path (``pm.Normal`` with a residual
SD, ``lmer``); :func:`get_family` still returns a :class:`Gaussian` so that
callers can ask ``family.has_scale``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pandas as pd
from scipy import special, stats

__all__ = [
    "FAMILIES",
    "Binomial",
    "Family",
    "GlmResponse",
    "Link",
    "Poisson",
    "fit_glm",
    "get_family",
    "glm_response",
]

_NAME = r"[A-Za-z.][A-Za-z0-9._]*"
_NAME_RE = re.compile(rf"^{_NAME}$")


# --------------------------------------------------------------------------- links


@dataclass(frozen=True)
class Link:
    """A link function: ``eta = link(mu)``, ``mu = inverse(eta)`` and ``dmu/deta``."""

    name: str
    link: Callable[[np.ndarray], np.ndarray]
    inverse: Callable[[np.ndarray], np.ndarray]
    mu_eta: Callable[[np.ndarray], np.ndarray]
    formula: str  # how the teaching section writes it, e.g. "logit(p)"


def _probit_mu_eta(eta: np.ndarray) -> np.ndarray:
    return np.maximum(stats.norm.pdf(eta), np.finfo(float).eps)


LINKS: dict[str, Link] = {
    "logit": Link(
        "logit",
        special.logit,
        special.expit,
        lambda e: special.expit(e) * special.expit(-e),
        "logit(p)",
    ),
    "probit": Link("probit", special.ndtri, special.ndtr, _probit_mu_eta, "probit(p)"),
    "log": Link("log", np.log, np.exp, np.exp, "log(lambda)"),
    "identity": Link("identity", lambda m: m, lambda e: e, np.ones_like, "mu"),
}


# --------------------------------------------------------------------------- response


@dataclass(frozen=True)
class GlmResponse:
    """How a GLMM formula's left-hand side and offset are read from the data.

    ``formula`` is the formula with a placeholder response (the first data
    column the left-hand side reads) and without the offset term, so the
    gaussian formula parser builds X and Z from it unchanged.
    """

    family: Family
    lhs: str
    successes: str
    failures: str | None  # a column name, or None
    trials: str | None  # cbind(s, n - s): the column n
    offset: str | None
    offset_log: bool
    formula: str

    @property
    def extra_columns(self) -> list[str]:
        """Data columns read besides those of the gaussian-style formula."""
        cols = [c for c in (self.failures, self.trials, self.offset) if c]
        return list(dict.fromkeys(c for c in cols if c != self.successes))

    def evaluate(
        self, frame: pd.DataFrame
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Validated (y, trials, offset) from complete rows; ``trials`` None for Poisson."""
        y, trials = self.family.read_response(self, frame)
        offset = None
        if self.offset is not None:
            values = _numeric(frame, self.offset, "offset column")
            if self.offset_log:
                if np.any(values <= 0):
                    bad = frame.loc[values <= 0, self.offset].iloc[0]
                    raise ValueError(
                        f"offset column {self.offset!r} must be positive for log(); it has "
                        f"the value {bad!r}"
                    )
                values = np.log(values)
            offset = values
        return y, trials, offset


def _numeric(frame: pd.DataFrame, column: str, what: str) -> np.ndarray:
    values = frame[column]
    if not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
        raise ValueError(f"{what} {column!r} must be numeric; it has dtype {values.dtype}")
    out = values.to_numpy(dtype=float)
    if not np.all(np.isfinite(out)):
        raise ValueError(f"{what} {column!r} has infinite values")
    return out


def _first_bad(frame: pd.DataFrame, column: str, mask: np.ndarray) -> str:
    return repr(frame[column].to_numpy()[np.flatnonzero(mask)[0]])


_CBIND = re.compile(r"^cbind\s*\((?P<a>[^,()]+),(?P<b>[^,()]+)\)$")
_OFFSET = re.compile(r"^offset\s*\((?P<inner>.*)\)$")
_LOG = re.compile(rf"^log\s*\(\s*(?P<col>{_NAME})\s*\)$")


def _split_plus(text: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "+" and depth == 0:
            parts.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    parts.append("".join(current).strip())
    return parts


def glm_response(formula: str, family: str, link: str | None = None) -> GlmResponse | None:
    """Read a GLMM formula's response and offset; ``None`` for the gaussian family.

    Accepted left-hand sides: a column (0/1, logical or two-level factor for
    a binomial; counts for Poisson) and, for binomial, ``cbind(s, f)`` or
    ``cbind(s, n - s)`` with column names.  Accepted offsets:
    ``offset(col)`` and ``offset(log(col))``.

    Raises
    ------
    ValueError
        For an unknown family or link, or a left-hand side / offset that is
        not one of the forms above.
    """
    fam = get_family(family, link)
    if not fam.glm:
        return None
    if not isinstance(formula, str) or "~" not in formula:
        raise ValueError(f"formula {formula!r} is not an lme4 formula: it needs 'response ~ terms'")
    lhs, _, rhs = formula.partition("~")
    lhs = lhs.strip()
    failures = trials = None
    match = _CBIND.match(lhs)
    if match:
        if not fam.allows_cbind:
            raise ValueError(
                f"formula {formula!r}: cbind(successes, failures) is a binomial response; "
                f"family {fam.name!r} needs a single count column"
            )
        successes = match["a"].strip()
        second = re.sub(r"\s+", "", match["b"])
        if _NAME_RE.match(second):
            failures = second
        else:
            diff = re.fullmatch(rf"(?P<n>{_NAME})-(?P<s>{_NAME})", second)
            if diff is None or diff["s"] != successes:
                raise ValueError(
                    f"formula {formula!r}: the second argument of cbind() must be a failures "
                    f"column or 'trials - {successes}', not {match['b'].strip()!r}"
                )
            trials = diff["n"]
        if not _NAME_RE.match(successes):
            raise ValueError(
                f"formula {formula!r}: the first argument of cbind() must be a column name, "
                f"not {successes!r}"
            )
    elif _NAME_RE.match(lhs):
        successes = lhs
    else:
        raise ValueError(
            f"formula {formula!r}: the response of a {fam.name} model must be a column name"
            + (" or cbind(successes, failures)" if fam.allows_cbind else "")
            + f", not {lhs!r}"
        )
    offset = None
    offset_log = False
    kept = []
    for part in _split_plus(rhs):
        found = _OFFSET.match(part)
        if found is None:
            kept.append(part)
            continue
        if offset is not None:
            raise ValueError(f"formula {formula!r} has more than one offset() term")
        inner = found["inner"].strip()
        log_match = _LOG.match(inner)
        if log_match:
            offset, offset_log = log_match["col"], True
        elif _NAME_RE.match(inner):
            offset = inner
        else:
            raise ValueError(
                f"formula {formula!r}: offset({inner}) must be offset(column) or "
                "offset(log(column))"
            )
    if not kept:
        raise ValueError(f"formula {formula!r} has nothing on the right of '~' but an offset")
    return GlmResponse(
        family=fam,
        lhs=lhs,
        successes=successes,
        failures=failures,
        trials=trials,
        offset=offset,
        offset_log=offset_log,
        formula=f"{successes} ~ {' + '.join(kept)}",
    )


# --------------------------------------------------------------------------- families


class Family:
    """A response distribution with a link (see the module docstring)."""

    name: ClassVar[str] = ""
    links: ClassVar[tuple[str, ...]] = ()
    default_link: ClassVar[str] = ""
    #: Whether a residual scale (sigma) is estimated.
    has_scale: ClassVar[bool] = False
    #: Whether the harness fits it with glmer (False: the gaussian lmer path).
    glm: ClassVar[bool] = True
    allows_cbind: ClassVar[bool] = False
    #: Whether the response is a count without an upper bound, checked by a rootogram and
    #: a dispersion statistic (:mod:`harness.checks.dispersion`); such a family supplies
    #: :meth:`cdf`, :meth:`draw` and :meth:`response_variance`.
    unbounded_counts: ClassVar[bool] = False
    #: The response distribution's parameters besides its mean (a negative binomial's
    #: dispersion): each is a PyMC posterior variable of that name and a row of that
    #: ``component`` in the comparison's variance table (lme4's estimate).  They reach
    #: :meth:`cdf`, :meth:`draw` and :meth:`response_variance` as ``params``.
    response_parameters: ClassVar[tuple[str, ...]] = ()

    def __init__(self, link: str | None = None) -> None:
        link = link or self.default_link
        if link not in self.links:
            raise ValueError(
                f"link {link!r} is not available for family {self.name!r}; choose one of "
                f"{list(self.links)}"
            )
        self.link: Link = LINKS[link]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(link={self.link.name!r})"

    @property
    def scale_name(self) -> str:
        names = {"logit": "log-odds", "probit": "probit units", "log": "log rate"}
        return names.get(self.link.name, "link scale")

    @property
    def key(self) -> str:
        return f"{self.name}({self.link.name})"

    def r_family(self) -> tuple[str, str]:
        """R's family and link names, for ``glmer(family = <name>(link = <link>))``."""
        return self.name, self.link.name

    # -- data
    def read_response(
        self, spec: GlmResponse, frame: pd.DataFrame
    ) -> tuple[np.ndarray, np.ndarray | None]:
        raise NotImplementedError

    # -- likelihood (NumPy, for the Laplace approximation)
    def loglik(self, y: np.ndarray, mu: np.ndarray, trials: np.ndarray | None) -> np.ndarray:
        """Pointwise log p(y | mu), with every constant (as R's ``family$aic``)."""
        raise NotImplementedError

    def saturated_mu(self, y: np.ndarray, trials: np.ndarray | None) -> np.ndarray:
        """The saturated model's mean (deviance residuals are 2 (loglik(sat) - loglik))."""
        raise NotImplementedError

    def variance(self, mu: np.ndarray, trials: np.ndarray | None) -> np.ndarray:
        """Var(y | mu) of the response as :meth:`loglik` reads it."""
        raise NotImplementedError

    def mean(self, eta: np.ndarray, trials: np.ndarray | None) -> np.ndarray:
        """E(y | eta) on the response's own scale (counts of successes for binomial)."""
        raise NotImplementedError

    def score_weights(
        self, y: np.ndarray, eta: np.ndarray, trials: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """d log p / d eta and the Fisher (IRLS) weight -E d2 log p / d eta2, pointwise."""
        raise NotImplementedError

    # -- predictive distribution (count checks; ``params`` broadcast against ``mu``)
    def cdf(
        self,
        k: np.ndarray,
        mu: np.ndarray,
        trials: np.ndarray | None,
        params: Mapping[str, np.ndarray] | None = None,
    ) -> np.ndarray:
        """P(y <= k | mu, params), elementwise; k may be negative (probability 0)."""
        raise NotImplementedError

    def draw(
        self,
        rng: np.random.Generator,
        mu: np.ndarray,
        trials: np.ndarray | None,
        params: Mapping[str, np.ndarray] | None = None,
    ) -> np.ndarray:
        """One replicated response per entry of ``mu`` (the scale :meth:`loglik` reads)."""
        raise NotImplementedError

    def response_variance(
        self,
        mu: np.ndarray,
        trials: np.ndarray | None,
        params: Mapping[str, np.ndarray] | None = None,
    ) -> np.ndarray:
        """Var(y | mu, params): the denominator of Pearson residuals."""
        return self.variance(mu, trials)

    # -- PyMC
    def likelihood(
        self, pm: Any, pt: Any, name: str, eta: Any, data: dict[str, Any], **kw: Any
    ) -> Any:
        """The observed node of the PyMC model given the linear predictor ``eta``."""
        raise NotImplementedError

    def prior_centre_scale(self, y: np.ndarray, trials: np.ndarray | None) -> tuple[float, float]:
        """(centre of the intercept prior, unit scale) on the link scale, for weak priors."""
        raise NotImplementedError


class Gaussian(Family):
    """The identity-link gaussian model: the harness's original lmer path."""

    name = "gaussian"
    links = ("identity",)
    default_link = "identity"
    has_scale = True
    glm = False


class Binomial(Family):
    """Binomial counts of successes out of trials (Bernoulli when trials are 1)."""

    name = "binomial"
    links = ("logit", "probit")
    default_link = "logit"
    allows_cbind = True

    def read_response(
        self, spec: GlmResponse, frame: pd.DataFrame
    ) -> tuple[np.ndarray, np.ndarray | None]:
        column = spec.successes
        if spec.failures is None and spec.trials is None:
            return _binary(frame, column), np.ones(len(frame))
        successes = _counts(frame, column, "successes column")
        if spec.failures is not None:
            failures = _counts(frame, spec.failures, "failures column")
            trials = successes + failures
        else:
            assert spec.trials is not None  # binary (neither given) returned above
            trials = _counts(frame, spec.trials, "trials column")
            over = successes > trials
            if over.any():
                i = np.flatnonzero(over)[0]
                raise ValueError(
                    f"successes column {column!r} is larger than trials column {spec.trials!r} "
                    f"in {int(over.sum())} row(s), e.g. row {i}: {successes[i]:g} > {trials[i]:g}"
                )
        return successes, trials

    def loglik(self, y, mu, trials):
        # scipy.stats.binom.logpmf's own formula without its argument checks (the exact
        # likelihood calls this on millions of importance draws per evaluation).
        k, n = np.round(y), np.round(trials)
        combinations = special.gammaln(n + 1) - special.gammaln(k + 1) - special.gammaln(n - k + 1)
        return combinations + special.xlogy(k, mu) + special.xlog1py(n - k, -mu)

    def saturated_mu(self, y, trials):
        return y / trials

    def variance(self, mu, trials):
        return trials * mu * (1 - mu)

    def mean(self, eta, trials):
        return trials * self.link.inverse(eta)

    def score_weights(self, y, eta, trials):
        p = np.clip(self.link.inverse(eta), 1e-300, 1 - 1e-16)
        dp = self.link.mu_eta(eta)
        var = p * (1 - p)
        score = (y - trials * p) * dp / var
        weight = trials * dp**2 / var
        return score, weight

    def likelihood(self, pm, pt, name, eta, data, **kw):
        if self.link.name == "logit":
            return pm.Binomial(name, n=data["trials"], logit_p=eta, observed=data["y"], **kw)
        p = 0.5 * pt.erfc(-eta / math.sqrt(2.0))
        return pm.Binomial(name, n=data["trials"], p=p, observed=data["y"], **kw)

    def prior_centre_scale(self, y, trials):
        p = float(np.clip(np.sum(y) / np.sum(trials), 0.01, 0.99))
        return float(self.link.link(np.array(p))), 1.0


class Poisson(Family):
    """Poisson counts, optionally with an exposure offset."""

    name = "poisson"
    links = ("log",)
    default_link = "log"
    unbounded_counts = True

    def read_response(self, spec, frame):
        return _counts(frame, spec.successes, "count response"), None

    def loglik(self, y, mu, trials):
        k = np.round(y)  # scipy.stats.poisson.logpmf's formula, without its argument checks
        return special.xlogy(k, mu) - special.gammaln(k + 1) - mu

    def saturated_mu(self, y, trials):
        return y

    def variance(self, mu, trials):
        return mu

    def mean(self, eta, trials):
        return np.exp(eta)

    def score_weights(self, y, eta, trials):
        mu = np.exp(eta)
        return y - mu, mu

    def cdf(self, k, mu, trials, params=None):
        return stats.poisson.cdf(k, mu)

    def draw(self, rng, mu, trials, params=None):
        return rng.poisson(mu).astype(float)

    def likelihood(self, pm, pt, name, eta, data, **kw):
        return pm.Poisson(name, mu=pt.exp(eta), observed=data["y"], **kw)

    def prior_centre_scale(self, y, trials):
        return float(np.log(max(float(np.mean(y)), 0.01))), 1.0


def _counts(frame: pd.DataFrame, column: str, what: str) -> np.ndarray:
    values = _numeric(frame, column, what)
    negative = values < 0
    if negative.any():
        raise ValueError(
            f"{what} {column!r} must be a non-negative count; it has {int(negative.sum())} "
            f"negative value(s), e.g. {_first_bad(frame, column, negative)}"
        )
    fractional = values != np.round(values)
    if fractional.any():
        hint = (
            " (proportions need their trials: write cbind(successes, trials - successes))"
            if np.all((values >= 0) & (values <= 1))
            else ""
        )
        raise ValueError(
            f"{what} {column!r} must hold whole numbers; it has {int(fractional.sum())} "
            f"non-integer value(s), e.g. {_first_bad(frame, column, fractional)}{hint}"
        )
    return values


def _binary(frame: pd.DataFrame, column: str) -> np.ndarray:
    """A Bernoulli response as 0/1: numbers 0/1, logicals, or a two-level factor (glm's rule)."""
    values = frame[column]
    if pd.api.types.is_bool_dtype(values):
        return values.to_numpy(dtype=float)
    if isinstance(values.dtype, pd.CategoricalDtype) or not pd.api.types.is_numeric_dtype(values):
        categories = (
            list(values.cat.categories)
            if isinstance(values.dtype, pd.CategoricalDtype)
            else sorted(values.dropna().astype(str).unique())
        )
        if len(categories) != 2:
            raise ValueError(
                f"binary response {column!r} must have two levels; it has {len(categories)} "
                f"({[str(c) for c in categories[:5]]})"
            )
        # As glm: the first level is failure, every other level success.
        return (values.astype(str).to_numpy() != str(categories[0])).astype(float)
    out = _numeric(frame, column, "binary response")
    bad = (out != 0) & (out != 1)
    if bad.any():
        within = np.all((out >= 0) & (out <= 1))
        raise ValueError(
            f"binary response {column!r} must be 0 or 1; it has {int(bad.sum())} other "
            f"value(s), e.g. {_first_bad(frame, column, bad)}"
            + (
                ". Proportions need their trials: write cbind(successes, trials - successes)"
                if within
                else ". Counts out of trials need cbind(successes, failures)"
            )
        )
    return out


FAMILIES: dict[str, type[Family]] = {
    "gaussian": Gaussian,
    "binomial": Binomial,
    "poisson": Poisson,
}


def get_family(name: str | Family, link: str | None = None) -> Family:
    """The family called ``name`` with ``link`` (its default link when None).

    Raises
    ------
    ValueError
        Naming the unknown family or link.
    """
    if isinstance(name, Family):
        return name
    if not isinstance(name, str) or name not in FAMILIES:
        raise ValueError(f"unknown family {name!r}; choose one of {sorted(FAMILIES)}")
    return FAMILIES[name](link)


def fit_glm(
    family: Family,
    y: np.ndarray,
    X: np.ndarray,
    trials: np.ndarray | None = None,
    offset: np.ndarray | float = 0.0,
) -> np.ndarray:
    """Maximum-likelihood GLM coefficients by Fisher scoring (NaN where none is finite).

    Used for the no-pooling fits of the shrinkage plot: one group's own data,
    with the fixed part kept at lme4's estimates passed as ``offset``.  Data
    that separate (all successes, no events) have no finite estimate: NaN.
    """
    coef = np.zeros(X.shape[1])
    for _ in range(100):
        eta = offset + X @ coef
        score, weight = family.score_weights(y, eta, trials)
        info = X.T @ (weight[:, None] * X)
        try:
            step = np.linalg.solve(info, X.T @ score)
        except np.linalg.LinAlgError:
            return np.full(X.shape[1], np.nan)
        coef = coef + step
        if not np.all(np.isfinite(coef)) or np.max(np.abs(coef)) > 30:
            return np.full(X.shape[1], np.nan)  # separation: the estimate runs off to infinity
        if np.max(np.abs(step)) < 1e-10:
            return coef
    return np.full(X.shape[1], np.nan)
