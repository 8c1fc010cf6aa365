"""Response families for generalised linear mixed models (glmer's ``family =``).

A :class:`Family` says everything the rest of the harness asks about a
response distribution: its links, how the response is read from the
formula's left-hand side (``cbind(successes, failures)``, a 0/1 column, a
count), which values are valid, the PyMC likelihood given the linear
predictor ``eta``, the R call that fits it, the log-likelihood and IRLS
weights the Laplace approximation needs (:mod:`harness.checks.laplace`), the
predictive draw and the equations the report shows, and what the report calls
the scale.  Gaussian is one family like the others (``lmer``, a residual SD);
a later family (negative binomial, Gamma) is one more subclass registered in
:data:`FAMILIES`.  Callers ask the family, never its name: an unknown family
is an error (:func:`get_family`), never drawn or fitted as another one.
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
    "NegativeBinomial",
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
    tex: str = ""  # the link in the report's equations, e.g. r"\mathrm{logit}"


def _probit_mu_eta(eta: np.ndarray) -> np.ndarray:
    return np.maximum(stats.norm.pdf(eta), np.finfo(float).eps)


LINKS: dict[str, Link] = {
    "logit": Link(
        "logit",
        special.logit,
        special.expit,
        lambda e: special.expit(e) * special.expit(-e),
        "logit(p)",
        r"\mathrm{logit}",
    ),
    "probit": Link(
        "probit", special.ndtri, special.ndtr, _probit_mu_eta, "probit(p)", r"\Phi^{-1}"
    ),
    "log": Link("log", np.log, np.exp, np.exp, "log(lambda)", r"\log"),
    "identity": Link("identity", lambda m: m, lambda e: e, np.ones_like, "mu", ""),
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
    if not fam.discrete:
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
    """A response distribution with a link: everything the harness asks of a family.

    A new family is one subclass registered in :data:`FAMILIES`; callers ask
    it, never switch on its name (``tests/test_family_stub.py`` takes a family
    defined in a test through fit, comparison and report).  It defines:

    - ``name``, ``links``, ``default_link``: what ``--family`` / ``--link`` accept;
    - ``has_scale``: a residual SD (``sigma``) is estimated (the gaussian family);
    - ``laplace``: lme4 maximises glmer's Laplace approximation (True), or
      lmer's exact marginal likelihood (False); this picks the same-model
      identity (:mod:`harness.checks.same_model`), the Laplace attribution and
      lme4's fit (glmer rather than lmer);
    - :meth:`r_family`: R's family, ``glmer(family = binomial(link = "logit"))``;
    - ``discrete``: the response is whole numbers read by :func:`glm_response`
      (never a transformed column); ``allows_cbind``: ``cbind(s, f)`` is accepted;
    - :meth:`read_response`: the response checks (valid values, trials);
    - :meth:`loglik`, :meth:`saturated_mu`, :meth:`variance`, :meth:`mean`,
      :meth:`score_weights`: what the Laplace approximation, the exact
      likelihood and the audit need (``loglik`` and ``mean`` only when
      ``laplace`` is False); :meth:`fit_unpooled` (one group's own fit, for
      the shrinkage plot) follows from ``score_weights``;
    - :meth:`likelihood`: the observed node of the PyMC model;
    - :meth:`prior_centre_scale`: the centre and unit scale of the weak priors;
    - :meth:`draw` (and :meth:`posterior_params` when the family has parameters
      of its own): the predictive draw;
    - :meth:`observed`, :meth:`response_label`: the report's plotted scale;
    - ``tex_mean`` and :meth:`tex_distribution` (or :meth:`equations`): the
      report's model equations.
    """

    name: ClassVar[str] = ""
    links: ClassVar[tuple[str, ...]] = ()
    default_link: ClassVar[str] = ""
    #: Whether a residual scale (sigma) is estimated.
    has_scale: ClassVar[bool] = False
    #: Whether lme4's likelihood is glmer's Laplace approximation (False: lmer's exact one).
    laplace: ClassVar[bool] = True
    #: Whether the response is whole numbers (counts, successes) read by :func:`glm_response`.
    discrete: ClassVar[bool] = True
    allows_cbind: ClassVar[bool] = False
    #: The report's symbol for the mean parameter (TeX) and the distribution of y_i given it.
    tex_mean: ClassVar[str] = r"\mu"

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
        """What the report calls the linear predictor's scale (``log-odds``)."""
        names = {"logit": "log-odds", "probit": "probit units", "log": "log rate"}
        return names.get(self.link.name, "link scale")

    @property
    def link_scale(self) -> bool:
        """Whether coefficients are on a link scale rather than the response's units."""
        return self.link.name != "identity"

    @property
    def key(self) -> str:
        return f"{self.name}({self.link.name})"

    def r_family(self) -> tuple[str, str]:
        """R's family and link names, for ``glmer(family = <name>(link = <link>))``."""
        return self.name, self.link.name

    # -- parameters of the response distribution besides its mean
    #: The response distribution's parameters besides its mean (a negative binomial's
    #: shape): each is a PyMC posterior variable of that name and a row of that
    #: ``component`` (kind "dispersion") in the variance table, lme4's estimate against
    #: the posterior.  They reach :meth:`loglik` & co. fixed (:meth:`with_params`), and
    #: :meth:`draw` / :meth:`cdf` / :meth:`response_variance` as ``params`` per draw.
    response_parameters: ClassVar[tuple[str, ...]] = ()
    #: Whether the response is a count without an upper bound (rootogram, dispersion check).
    unbounded_counts: ClassVar[bool] = False

    def with_params(self, **values: float) -> Family:
        """This family with its own parameters fixed (lme4's estimates); itself when it has none.

        Raises
        ------
        ValueError
            For a parameter the family does not have.
        """
        unknown = sorted(set(values) - set(self.response_parameters))
        if unknown:
            raise ValueError(f"family {self.name!r} has no parameter(s) {unknown}")
        return self

    def fixed_params(self) -> dict[str, float]:
        """The family's own parameters as fixed by :meth:`with_params` (empty: none)."""
        return {}

    def at_posterior_median(self, posterior: Any) -> Family:
        """This family with its own parameters at their posterior medians (itself if none)."""
        values = {
            name: float(np.median(np.asarray(draws.values, dtype=float)))
            for name, draws in self.posterior_params(posterior).items()
        }
        return self.with_params(**values) if values else self

    def model_point(self) -> dict[str, float]:
        """Values of the PyMC model's value variables that hold the fixed parameters."""
        return {}

    def prior_rows(self) -> list[dict[str, str]]:
        """Rows (parameter, prior) for the priors of the family's own parameters."""
        return []

    #: The R function (r_scripts/glmm.R) that fits the family: glmer, or glmer.nb then glmer.
    r_function: ClassVar[str] = "harness_fit_glmer"

    def r_args(self) -> dict[str, float]:
        """Keyword arguments R's ``harness_glm_family`` needs besides family and link."""
        return {}

    def r_call(self, formula: str, control: str = "") -> str:
        """The R call a reader can run to reproduce lme4's fit (``control``: ``, control = ...``)."""
        family, link = self.r_family()
        return (
            f'lme4::glmer({formula}, data = data, family = {family}(link = "{link}"), '
            f"nAGQ = 1{control})"
        )

    #: Variance-table components of the family's own parameters -> PyMC posterior variables.
    components: ClassVar[dict[str, str]] = {}

    def component_rows(self) -> list[dict[str, Any]]:
        """lme4's variance-table rows for the fixed parameters (compared with the posterior)."""
        return []

    def pmf(self, y: np.ndarray, mu: np.ndarray, trials: np.ndarray | None = None) -> np.ndarray:
        """p(y | mu) pointwise (broadcasting), at the fixed parameters: for predictive checks."""
        return np.exp(self.loglik(np.asarray(y, float), np.asarray(mu, float), trials))

    # -- data
    def read_response(
        self, spec: GlmResponse, frame: pd.DataFrame
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Validated (y, trials) of a :func:`glm_response`; raises ValueError naming bad values."""
        raise NotImplementedError

    # -- likelihood (NumPy, for the Laplace approximation and the audit)
    def loglik(self, y: np.ndarray, mu: np.ndarray, trials: np.ndarray | None) -> np.ndarray:
        """Pointwise log p(y | mu), with every constant (as R's ``family$aic``).

        A family with ``has_scale`` takes the residual SD per row as ``scale=``.
        """
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

    def newton_weights(
        self, y: np.ndarray, eta: np.ndarray, trials: np.ndarray | None
    ) -> np.ndarray:
        """The observed information -d2 log p / d eta2, pointwise: Newton steps for the modes.

        Equal to the Fisher weight of :meth:`score_weights` for a canonical link; a family
        with another link overrides it (Fisher scoring alone converges only linearly there).
        """
        return self.score_weights(y, eta, trials)[1]

    def fit_unpooled(
        self,
        y: np.ndarray,
        X: np.ndarray,
        trials: np.ndarray | None = None,
        offset: np.ndarray | float = 0.0,
    ) -> np.ndarray:
        """One group's own maximum-likelihood coefficients (NaN where none is finite)."""
        return fit_glm(self, y, X, trials, offset)

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
        """The observed node of the PyMC model given the linear predictor ``eta``.

        A family with ``has_scale`` takes the residual SD per row as ``scale=``.
        """
        raise NotImplementedError

    def prior_centre_scale(self, y: np.ndarray, trials: np.ndarray | None) -> tuple[float, float]:
        """(centre of the intercept prior, unit scale) on the link scale, for weak priors."""
        raise NotImplementedError

    # -- report
    def observed(self, y: np.ndarray, trials: np.ndarray | None) -> np.ndarray:
        """The observed response on the plotted scale (proportions for a binomial)."""
        return np.asarray(y, dtype=float)

    def posterior_params(self, posterior: Any) -> dict[str, Any]:
        """The family's own parameters' draws: DataArrays (chain, draw) of a PyMC posterior."""
        return {}

    def draw(
        self,
        rng: np.random.Generator,
        mu: np.ndarray,
        trials: np.ndarray | None = None,
        params: Mapping[str, np.ndarray] | None = None,
    ) -> np.ndarray:
        """Draws of y given its mean parameter ``mu`` (the inverse link of eta).

        ``params`` holds the family's own parameters, each broadcasting against
        ``mu`` (per posterior draw: shape (draws, 1)); the gaussian family's
        ``sigma`` is the residual SD (per draw and row).
        """
        raise NotImplementedError

    def response_label(self, response: str, trials: np.ndarray | None, unit: str = "") -> str:
        """The plotted response's axis label."""
        return f"{response} ({unit})" if unit else response

    def tex_distribution(self, response: str) -> str:
        """``y_i ~ Dist(...)`` in TeX, given the mean parameter :attr:`tex_mean` (subscript i)."""
        raise NotImplementedError

    def equations(
        self, equations: dict[str, list[str]], response: str, offset: bool
    ) -> dict[str, list[str]]:
        """The gaussian model forms rewritten for the family: ``logit(p) = X beta + Z u``, ...

        ``equations`` is :func:`harness.report.page.model_equations`'s output; its
        linear predictor and priors are kept, the likelihood lines replaced and
        the residual SD dropped.
        """
        link, mean = self.link.tex, self.tex_mean
        dist_i = self.tex_distribution(response.replace("_", r"\_"))
        offset_m = r"\mathbf{o} + " if offset else ""
        offset_i = r"o_i + " if offset else ""
        matrix = list(equations["matrix"])
        matrix[0] = rf"${link}(\mathbf{{{mean}}}) = {offset_m}X\beta + Z\mathbf{{u}}$"
        matrix[1] = (
            rf"$\mathbf{{u}} \sim \mathrm{{Normal}}(\mathbf{{0}},\ G),\quad {dist_i}$ independently given $\mathbf{{u}}$"
        )
        varying = list(equations["varying"])
        varying[0] = f"${dist_i}$"
        varying[1] = varying[1].replace(r"$\mu_i = ", rf"${link}({mean}_i) = {offset_i}", 1)
        if not self.has_scale:
            varying = [
                re.sub(r",\\quad \\sigma \\sim [^,$]*(?:\([^)]*\))?", "", line) for line in varying
            ]
            varying = [re.sub(r"\$\\sigma \\sim [^$]*\$", "", line) for line in varying]
        return {"matrix": matrix, "varying": [line for line in varying if line.strip("$ ")]}


class Gaussian(Family):
    """The gaussian linear mixed model: ``lmer``'s exact likelihood, a residual SD."""

    name = "gaussian"
    links = ("identity",)
    default_link = "identity"
    has_scale = True
    laplace = False
    discrete = False

    def loglik(self, y, mu, trials, scale=None):
        if scale is None:
            raise ValueError("the gaussian log-likelihood needs the residual SD")
        return stats.norm.logpdf(y, loc=mu, scale=scale)

    def mean(self, eta, trials):
        return np.asarray(eta, dtype=float)

    def fit_unpooled(self, y, X, trials=None, offset=0.0):
        return np.linalg.lstsq(X, y - offset, rcond=None)[0]

    def likelihood(self, pm, pt, name, eta, data, scale=None, **kw):
        if scale is None:
            raise ValueError("the gaussian likelihood needs the residual SD")
        return pm.Normal(name, mu=eta, sigma=scale, observed=data["y"], **kw)

    def prior_centre_scale(self, y, trials):
        return float(np.mean(y)), float(np.std(y)) or 1.0

    def draw(self, rng, mu, trials=None, params=None):
        if not params or "sigma" not in params:
            raise ValueError("a gaussian predictive draw needs the residual SD (params['sigma'])")
        return mu + params["sigma"] * rng.standard_normal(np.shape(mu))

    def equations(self, equations, response, offset):
        return equations  # the model forms are written for it


class Binomial(Family):
    """Binomial counts of successes out of trials (Bernoulli when trials are 1)."""

    name = "binomial"
    links = ("logit", "probit")
    default_link = "logit"
    allows_cbind = True
    tex_mean = "p"

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

    def observed(self, y, trials):
        assert trials is not None  # a binomial design always carries its trials
        return np.asarray(y, dtype=float) / trials

    def draw(self, rng, mu, trials=None, params=None):
        n = np.broadcast_to(np.ones(1) if trials is None else trials, np.shape(mu))
        return rng.binomial(n.astype(np.int64), np.clip(mu, 0, 1)).astype(float)

    def response_label(self, response, trials, unit=""):
        binary = trials is not None and bool(np.all(trials == 1))
        return f"proportion {response}" + ("" if binary else " / trials")

    def tex_distribution(self, response):
        return rf"{response}_i \sim \mathrm{{Binomial}}(n_i,\ p_i)"


class Poisson(Family):
    """Poisson counts, optionally with an exposure offset."""

    name = "poisson"
    links = ("log",)
    default_link = "log"
    tex_mean = r"\lambda"
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

    def likelihood(self, pm, pt, name, eta, data, **kw):
        return pm.Poisson(name, mu=pt.exp(eta), observed=data["y"], **kw)

    def prior_centre_scale(self, y, trials):
        return float(np.log(max(float(np.mean(y)), 0.01))), 1.0

    def draw(self, rng, mu, trials=None, params=None):
        return rng.poisson(mu).astype(float)

    def cdf(self, k, mu, trials=None, params=None):
        return stats.poisson.cdf(k, mu)

    def response_label(self, response, trials, unit=""):
        return f"{response} (count)"

    def tex_distribution(self, response):
        return rf"{response}_i \sim \mathrm{{Poisson}}(\lambda_i)"


class NegativeBinomial(Family):
    """Negative binomial counts (NB2): ``Var(y) = mu + mu^2 / theta``, glmer.nb's family.

    ``theta`` is the shape (lme4's ``getME(fit, "glmer.nb.theta")``, MASS's
    ``theta``, brms's ``shape``, PyMC's ``alpha``); large theta approaches the
    Poisson.  lme4 estimates it by glmer.nb and fits the other parameters by
    glmer with theta fixed there, so the Laplace pieces take a fixed theta
    (:meth:`with_params`).  The PyMC model samples it, with the prior on
    ``phi = 1 / sqrt(theta)`` (the coefficient of variation of the gamma
    mixing distribution; 0 is the Poisson): ``phi ~ HalfNormal(1)``, the
    Stan prior-choice recommendation for the negative binomial, which is
    weakly informative (theta from about 0.25 up, most mass on moderate
    overdispersion) where brms's default ``shape ~ gamma(0.01, 0.01)`` is
    vague with most of its mass near 0.
    """

    name = "negbin"
    links = ("log",)
    default_link = "log"
    unbounded_counts = True
    #: theta's name as a parameter, a PyMC variable (deterministic) and a variance-table row.
    THETA = "nb_theta"
    response_parameters = (THETA,)
    #: Prior on phi = 1 / sqrt(theta), the PyMC variable sampled.
    PHI_PRIOR_SD = 1.0
    PHI_VAR = "nb_phi"

    def __init__(self, link: str | None = None, theta: float | None = None) -> None:
        super().__init__(link)
        if theta is not None and not (np.isfinite(theta) and theta > 0):
            raise ValueError(f"negative binomial theta must be positive and finite, not {theta!r}")
        self.theta = None if theta is None else float(theta)

    def __repr__(self) -> str:
        return f"NegativeBinomial(link={self.link.name!r}, theta={self.theta!r})"

    def with_params(self, **values: float) -> Family:
        super().with_params(**values)
        return NegativeBinomial(self.link.name, values.get(self.THETA, self.theta))

    def fixed_params(self) -> dict[str, float]:
        return {} if self.theta is None else {self.THETA: self.theta}

    r_function = "harness_fit_glmer_nb"
    components: ClassVar[dict[str, str]] = {THETA: THETA}

    def r_args(self):
        return {"nb_theta": self._theta()}

    def r_call(self, formula, control=""):
        return (
            f"fit <- lme4::glmer.nb({formula}, data = data{control}); "
            f"lme4::glmer({formula}, data = data, family = MASS::negative.binomial(theta = "
            f'lme4::getME(fit, "glmer.nb.theta"), link = "{self.link.name}"), nAGQ = 1{control})'
        )

    def component_rows(self):
        return [
            {
                "component": self.THETA,
                "group_factor": None,
                "kind": "dispersion",
                "term": "theta",
                "term2": None,
                "estimate": self._theta(),
                "lower": np.nan,
                "upper": np.nan,
                "ci_method": None,
            }
        ]

    def _theta(self) -> float:
        if self.theta is None:
            raise ValueError(
                "the negative binomial's shape theta is not fixed: use "
                f"family.with_params({self.THETA}=...) (lme4's estimate) or a posterior draw's"
            )
        return self.theta

    def posterior_params(self, posterior):
        return {self.THETA: posterior[self.THETA]}

    def model_point(self):
        return {f"{self.PHI_VAR}_log__": float(-0.5 * np.log(self._theta()))}

    def prior_rows(self):
        return [
            {
                "parameter": f"{self.THETA} (negative binomial shape theta)",
                "prior": f"{self.PHI_VAR} = 1/sqrt({self.THETA}) ~ "
                f"HalfNormal(sigma={self.PHI_PRIOR_SD:g})",
            }
        ]

    def read_response(self, spec, frame):
        return _counts(frame, spec.successes, "count response"), None

    def loglik(self, y, mu, trials):
        # MASS::negative.binomial's aic() term by term (the log-likelihood glmer.nb's logLik
        # reports), without scipy's argument checks.
        theta = self._theta()
        k = np.round(y)
        return (
            special.gammaln(k + theta)
            - special.gammaln(theta)
            - special.gammaln(k + 1)
            + theta * (np.log(theta) - np.log(theta + mu))
            + special.xlogy(k, mu)
            - k * np.log(theta + mu)
        )

    def saturated_mu(self, y, trials):
        return y

    def variance(self, mu, trials):
        return mu + mu**2 / self._theta()

    def mean(self, eta, trials):
        return np.exp(eta)

    def score_weights(self, y, eta, trials):
        theta = self._theta()
        mu = np.exp(eta)
        shrink = theta / (theta + mu)
        # d log p / d eta, and the Fisher weight mu_eta^2 / Var (glmer's IRLS weight).
        return (y - mu) * shrink, mu * shrink

    def newton_weights(self, y, eta, trials):
        # The log link is not NB's canonical link: -d2 log p / d eta2 depends on y.
        theta = self._theta()
        mu = np.exp(eta)
        return mu * theta * (theta + y) / (theta + mu) ** 2

    def likelihood(self, pm, pt, name, eta, data, **kw):
        phi = pm.HalfNormal(self.PHI_VAR, sigma=self.PHI_PRIOR_SD)
        theta = pm.Deterministic(self.THETA, 1.0 / pt.square(phi))
        return pm.NegativeBinomial(name, mu=pt.exp(eta), alpha=theta, observed=data["y"], **kw)

    def prior_centre_scale(self, y, trials):
        return float(np.log(max(float(np.mean(y)), 0.01))), 1.0

    def response_label(self, response, trials, unit=""):
        return f"{response} (count)"

    def tex_distribution(self, response):
        return rf"{response}_i \sim \mathrm{{NegBinomial}}(\mu_i,\ \theta)"

    def _shape(self, params: Mapping[str, np.ndarray] | None) -> np.ndarray:
        return np.asarray(params[self.THETA] if params else self._theta(), dtype=float)

    def draw(self, rng, mu, trials=None, params=None):
        theta = self._shape(params)
        # numpy's negative_binomial(n, p): failures before n successes, mean n (1 - p) / p.
        return rng.negative_binomial(theta, theta / (theta + mu)).astype(float)

    def cdf(self, k, mu, trials=None, params=None):
        """P(y <= k | mu, theta), elementwise; k may be negative (probability 0)."""
        theta = self._shape(params)
        return stats.nbinom.cdf(k, theta, theta / (theta + mu))

    def response_variance(self, mu, trials=None, params=None):
        """Var(y | mu, theta) = mu + mu^2 / theta: the denominator of Pearson residuals."""
        return mu + mu**2 / self._shape(params)


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
    "negbin": NegativeBinomial,
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
