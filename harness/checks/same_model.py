"""Same model, exactly: the PyMC model and the lme4 (or nlme) model have one likelihood.

Posterior summaries cannot prove two programs fit the same model: priors and
Monte Carlo error blur any gap.  A deterministic check can:

1. **Likelihood identity.**  The PyMC model's marginal log-likelihood
   (:mod:`harness.checks.marginal`, random effects integrated out) at lme4's ML
   estimates equals ``logLik(refitML(m))`` (nlme's ML ``logLik`` when
   ``sigma_by`` is set), and its REML criterion at the REML estimates equals
   ``REMLcrit(m)``.
2. **Same optimum.**  Maximising that marginal likelihood from a neutral start
   reproduces lme4's ML estimates.  Above
   :data:`harness.checks.marginal.SPARSE_THRESHOLD` random-effect columns over
   crossed or nested factors, the likelihood is factorised sparsely and the
   maximisation starts from lme4's estimates (a neutral start costs dozens
   of sparse factorisations more and proves no more: the optimiser must
   still find no higher point nearby).
3. **Same parameters.**  Both sides have the same fixed terms, the same SDs and
   correlations per grouping factor, and the same residual SD(s).
4. **The PyMC model is that likelihood.**  The log density of the model
   :func:`harness.engines.pymc.build_model` builds, with its standardised
   offsets at their conditional mode, recovers the same number
   (:func:`harness.checks.marginal.pymc_model_loglik`).

Parameters are named as lme4 names them, by grouping factor (not by how ``||``
splits a term): ``(Intercept)``, ``Subject: sd(Days)``,
``Subject: cor((Intercept),Days)``, ``sigma`` or ``sigma: arm=control``.
"""

from __future__ import annotations

import itertools
import logging
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from harness.checks.marginal import (
    MarginalLikelihood,
    MLEstimate,
    choose_method,
    psd_cholesky,
    pymc_model_loglik,
)
from harness.engines.lme4 import optimizer_sentence
from harness.model.spec import Design, ModelSpec, RandomBlock, build_design

log = logging.getLogger("harness")

#: |log-likelihood difference| (and REML criterion difference) that counts as equal.
LOGLIK_TOLERANCE = 1e-6
#: How far the harness maximum may rise above lme4's before lme4's optimum is called short
#: (lme4's optimisers stop at ~1e-8 on the deviance; a model difference moves it far more).
OPTIMUM_LOGLIK_TOLERANCE = 1e-4
#: Relative tolerance for fixed effects at the optimum.
FIXED_RTOL = 1e-4
#: Relative tolerance for SDs, correlations and residual SDs at the optimum.
VARIANCE_RTOL = 1e-3
#: An SD below this fraction of the residual SD is zero (lme4's isSingular uses 1e-4 on theta).
SINGULAR_RATIO = 1e-4
#: Absolute tolerance for a zero SD, as a fraction of the residual SD.
SINGULAR_ATOL = 1e-3
#: Absolute floor for correlations near zero, where relative differences are meaningless.
CORRELATION_ATOL = 1e-5


@dataclass
class BlockValue:
    """One random-effects block with a value: factor, terms and a square-root factor."""

    factor: str
    terms: tuple[str, ...]
    correlated: bool
    F: np.ndarray  # F F' is the block's covariance matrix (absolute scale)

    @property
    def cov(self) -> np.ndarray:
        return self.F @ self.F.T


@dataclass
class ParameterValues:
    """A full parameter set of a linear mixed model, engine-neutral."""

    fixed: dict[str, float]
    blocks: list[BlockValue]
    sigma: dict[str, float]  # "" for one residual SD, else level -> SD
    sigma_by: str | None = None
    sigma_counts: dict[str, int] = field(default_factory=dict)  # rows per level

    def named(self) -> dict[str, float]:
        """Values by lme4-style parameter name (SDs and correlations per grouping factor)."""
        out = dict(self.fixed)
        for block in self.blocks:
            cov = block.cov
            sds = np.sqrt(np.clip(np.diag(cov), 0.0, None))
            for i, term in enumerate(block.terms):
                out[sd_name(block.factor, term)] = float(sds[i])
            if block.correlated:
                for i in range(len(block.terms)):
                    for j in range(i + 1, len(block.terms)):
                        denom = sds[i] * sds[j]
                        value = float(cov[i, j] / denom) if denom > 0 else float("nan")
                        out[cor_name(block.factor, block.terms[i], block.terms[j])] = value
        for level, value in self.sigma.items():
            out[sigma_name(self.sigma_by, level)] = float(value)
        return out


@dataclass
class SameModel:
    """Result of :func:`same_model`: is the PyMC model the lme4 model?

    Attributes
    ----------
    engine : str
        ``"lme4"`` or ``"nlme"`` (with ``sigma_by``).
    loglik_lme4 : float
        ``logLik(refitML(m))`` (nlme: ML ``logLik``).
    loglik_pymc : float
        The PyMC model's marginal log-likelihood at lme4's ML estimates.
    difference : float
        ``loglik_pymc - loglik_lme4``.
    ok : bool
        Same parameters, ``|difference| < 1e-6``, same REML criterion, same
        optimum, and the PyMC model's own density recovers the likelihood.
    reasons : list of str
        Empty when ``ok``; otherwise each names the quantity that differs.
    estimates : DataFrame
        parameter, kind, lme4, harness, abs_diff, rel_diff, tolerance, ok:
        lme4's ML estimates against the maximiser of the PyMC marginal likelihood.
    reml_criterion_lme4, reml_criterion_pymc : float or None
        REML criterion (``-2 x`` REML log-likelihood) at the REML estimates.
    loglik_pymc_max : float
        The maximised PyMC marginal log-likelihood.
    loglik_pymc_model : float or None
        The marginal recovered from the PyMC model's own log density at lme4's
        ML estimates (None when not checked).
    """

    engine: str
    formula_lme4: str
    formula_pymc: str
    sigma_by_lme4: str | None
    sigma_by_pymc: str | None
    loglik_lme4: float
    loglik_pymc: float
    difference: float
    ok: bool
    reasons: list[str]
    estimates: pd.DataFrame
    reml_criterion_lme4: float | None
    reml_criterion_pymc: float | None
    loglik_pymc_max: float
    loglik_pymc_model: float | None = None
    model_probe_gap: float | None = None
    optimizer: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = float("nan")
    #: Refits with lme4's other optimizers and from the harness's optimum (None: not tried).
    lme4_refits: pd.DataFrame | None = None
    #: What they found (``FreqFit.best_fit``: per method the best fit and whether it is better).
    lme4_best: dict[str, Any] = field(default_factory=dict)
    #: lme4 stopped short of its ML maximum; its best refit reached ``loglik_lme4_best``.
    lme4_short: bool = False
    loglik_lme4_best: float | None = None
    #: The PyMC marginal at the best refit's ML estimates (the identity there).
    loglik_pymc_at_best: float | None = None

    @property
    def reml_difference(self) -> float | None:
        """``reml_criterion_pymc - reml_criterion_lme4`` (None without a REML fit)."""
        if self.reml_criterion_lme4 is None or self.reml_criterion_pymc is None:
            return None
        return self.reml_criterion_pymc - self.reml_criterion_lme4

    @property
    def verdict(self) -> str:
        if not self.ok:
            return "different models"
        return "same model; lme4 did not reach its maximum" if self.lme4_short else "same model"

    def __repr__(self) -> str:
        return (
            f"SameModel({self.verdict!r}, difference={self.difference:.3g}, engine={self.engine!r})"
        )

    def _repr_html_(self) -> str | None:
        """Jupyter: the log-likelihoods side by side (registered by the report package)."""
        from harness.views import html

        return html(self)

    @property
    def lme4_optimum(self) -> str:
        """What lme4's refits found, in one sentence ("" when none were tried)."""
        by_method = self.lme4_best.get("by_method", {}) if self.lme4_best else {}
        laplace = bool(self.lme4_best.get("laplace")) if self.lme4_best else False
        # The fit that stopped short: its ML refit (the identity) and/or its REML fit (the
        # estimates the tables hold); when neither did, that lme4's estimates stand.
        short = [m for m in ("ML", "REML") if by_method.get(m, {}).get("improved")]
        if self.lme4_short and not short:
            # No refit climbed as high as the harness's maximiser of the same likelihood.
            what = "Laplace log-likelihood" if laplace else "log-likelihood"
            return (
                f"lme4 did not reach its maximum ({what} {self.loglik_lme4:.6f} at lme4's "
                f"estimates, {self.loglik_pymc_max:.6f} at the best fit: the harness's maximiser)"
            )
        if not by_method:
            return ""
        shown = short or [m for m in ("ML", "REML") if m in by_method][:1]
        return "; ".join(
            optimizer_sentence(by_method, m, laplace=laplace).replace(
                "lme4 did not", "lme4's REML fit did not" if m == "REML" else "lme4 did not"
            )
            for m in shown
        )

    def likelihood_table(self) -> pd.DataFrame:
        """quantity, lme4, pymc, difference: the numbers the identity compares."""
        rows = [
            ("ML log-likelihood at lme4's ML estimates", self.loglik_lme4, self.loglik_pymc),
        ]
        if self.reml_criterion_lme4 is not None and self.reml_criterion_pymc is not None:
            rows.append(
                (
                    "REML criterion at lme4's REML estimates",
                    self.reml_criterion_lme4,
                    self.reml_criterion_pymc,
                )
            )
        best = self.loglik_lme4
        if self.lme4_short and self.loglik_lme4_best is not None:
            best = self.loglik_lme4_best
            rows.append(
                (
                    "ML log-likelihood at lme4's best refit",
                    self.loglik_lme4_best,
                    self.loglik_pymc_at_best
                    if self.loglik_pymc_at_best is not None
                    else float("nan"),
                )
            )
        rows.append(("maximised ML log-likelihood", best, self.loglik_pymc_max))
        if self.loglik_pymc_model is not None:
            rows.append(
                (
                    "ML log-likelihood from the PyMC model's own density",
                    self.loglik_lme4,
                    self.loglik_pymc_model,
                )
            )
        frame = pd.DataFrame(rows, columns=["quantity", "lme4", "pymc"])
        frame["difference"] = frame["pymc"] - frame["lme4"]
        return frame

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (NaN becomes None)."""

        def clean(value: Any) -> Any:
            if isinstance(value, (float, np.floating)):
                return None if not math.isfinite(float(value)) else float(value)
            if isinstance(value, (np.integer,)):
                return int(value)
            if isinstance(value, (np.bool_,)):
                return bool(value)
            if isinstance(value, dict):
                return {str(k): clean(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return [clean(v) for v in value]
            return value

        estimates = [
            {k: clean(v) for k, v in row.items()} for row in self.estimates.to_dict("records")
        ]
        return clean(
            {
                "engine": self.engine,
                "formula_lme4": self.formula_lme4,
                "formula_pymc": self.formula_pymc,
                "sigma_by_lme4": self.sigma_by_lme4,
                "sigma_by_pymc": self.sigma_by_pymc,
                "loglik_lme4": self.loglik_lme4,
                "loglik_pymc": self.loglik_pymc,
                "difference": self.difference,
                "ok": self.ok,
                "verdict": self.verdict,
                "reasons": list(self.reasons),
                "reml_criterion_lme4": self.reml_criterion_lme4,
                "reml_criterion_pymc": self.reml_criterion_pymc,
                "reml_difference": self.reml_difference,
                "loglik_pymc_max": self.loglik_pymc_max,
                "loglik_pymc_model": self.loglik_pymc_model,
                "model_probe_gap": self.model_probe_gap,
                "optimizer": dict(self.optimizer),
                "notes": list(self.notes),
                "lme4_short": self.lme4_short,
                "lme4_optimum": self.lme4_optimum,
                "loglik_lme4_best": self.loglik_lme4_best,
                "loglik_pymc_at_best": self.loglik_pymc_at_best,
                "lme4_refits": []
                if self.lme4_refits is None
                else self.lme4_refits.to_dict("records"),
                "seconds": self.seconds,
                "tolerances": {
                    "loglik": LOGLIK_TOLERANCE,
                    "fixed_relative": FIXED_RTOL,
                    "variance_relative": VARIANCE_RTOL,
                },
            }
        ) | {"estimates": estimates}


# --------------------------------------------------------------------------- names


def sd_name(factor: str, term: str) -> str:
    return f"{factor}: sd({term})"


def cor_name(factor: str, term1: str, term2: str) -> str:
    return f"{factor}: cor({term1},{term2})"


def sigma_name(sigma_by: str | None, level: str) -> str:
    return "sigma" if not level else f"sigma: {sigma_by}={level}"


def parameter_names(design: Design) -> list[str]:
    """The parameters of the model a design describes, lme4-style, in a stable order.

    Raises
    ------
    ValueError
        If one grouping factor carries the same term in two blocks (the names,
        and the model, would be ambiguous).
    """
    names = list(design.fixed_terms)
    seen: set[tuple[str, str]] = set()
    for block in design.blocks:
        for term in block.terms:
            if (block.factor, term) in seen:
                raise ValueError(
                    f"formula {design.spec.formula!r}: term {term!r} varies by {block.factor!r} "
                    "in two random-effect terms; the model is not identified"
                )
            seen.add((block.factor, term))
            names.append(sd_name(block.factor, term))
        if block.correlated:
            for i in range(block.n_terms):
                for j in range(i + 1, block.n_terms):
                    names.append(cor_name(block.factor, block.terms[i], block.terms[j]))
    if design.sigma_levels is None:
        names.append("sigma")
    else:
        names.extend(sigma_name(design.spec.sigma_by, lvl) for lvl in design.sigma_levels)
    return names


# --------------------------------------------------------------------------- lme4 side


def lme4_block_order(blocks: list[RandomBlock]) -> list[RandomBlock]:
    """Blocks in the order lme4's ``mkReTrms`` puts them.

    lme4 reorders only when some later term has more levels than an earlier
    one, and then by ``rev(order(nl))``: decreasing levels, ties in *reverse*
    formula order.
    """
    nl = [b.n_levels for b in blocks]
    if not any(b > a for a, b in itertools.pairwise(nl)):
        return list(blocks)
    ascending = sorted(range(len(blocks)), key=lambda i: (nl[i], i))
    return [blocks[i] for i in reversed(ascending)]


def _theta_names(block: RandomBlock) -> list[str]:
    """lme4's names of a block's theta entries (column-major lower triangle)."""
    k = block.n_terms
    names = []
    for j in range(k):
        for i in range(j, k):
            if i == j:
                names.append(f"{block.factor}.{block.terms[i]}")
            else:
                names.append(f"{block.factor}.{block.terms[i]}.{block.terms[j]}")
    return names


def _blocks_from_theta(
    design: Design, theta: dict[str, float] | Any, sigma: float
) -> list[BlockValue]:
    """lme4's ``theta`` (relative Cholesky factors) -> one absolute-scale factor per block."""
    if isinstance(theta, dict):
        names, values = list(theta), np.asarray(list(theta.values()), dtype=float)
    else:
        values = np.atleast_1d(np.asarray(theta, dtype=float))
        names = None
    ordered = lme4_block_order(design.blocks)
    expected = [n for b in ordered for n in _theta_names(b)]
    if len(values) != len(expected):
        raise ValueError(
            f"lme4 returned {len(values)} theta values; formula {design.spec.formula!r} implies "
            f"{len(expected)} ({expected})"
        )
    if names is not None and names != expected:
        raise ValueError(
            f"lme4's theta is named {names}; the harness expected {expected} for formula "
            f"{design.spec.formula!r} (block order or term names differ)"
        )
    by_block: dict[int, BlockValue] = {}
    pos = 0
    for block in ordered:
        k = block.n_terms
        lam = np.zeros((k, k))
        for j in range(k):
            for i in range(j, k):
                lam[i, j] = values[pos]
                pos += 1
        by_block[id(block)] = BlockValue(
            block.factor, tuple(block.terms), block.correlated or k == 1, sigma * lam
        )
    return [by_block[id(b)] for b in design.blocks]


def _strip_suffix(label: str, factors: set[str]) -> str:
    """VarCorr names a repeated factor ``g``, ``g.1``, ...; map back to ``g``."""
    if label in factors:
        return label
    match = re.fullmatch(r"(.*)\.\d+", label)
    if match and match.group(1) in factors:
        return match.group(1)
    raise ValueError(
        f"variance component group {label!r} matches no grouping factor {sorted(factors)}"
    )


def _blocks_from_table(design: Design, variance: pd.DataFrame) -> list[BlockValue]:
    """SDs and correlations of a FreqFit variance table -> one factor per design block."""
    factors = {b.factor for b in design.blocks}
    sd: dict[tuple[str, str], float] = {}
    cor: dict[tuple[str, str, str], float] = {}
    for row in variance.itertuples(index=False):
        if row.kind == "sd":
            sd[(_strip_suffix(str(row.group_factor), factors), str(row.term))] = float(row.estimate)
        elif row.kind == "cor":
            factor = _strip_suffix(str(row.group_factor), factors)
            cor[(factor, str(row.term), str(row.term2))] = float(row.estimate)
            cor[(factor, str(row.term2), str(row.term))] = float(row.estimate)
    out = []
    for block in design.blocks:
        missing = [t for t in block.terms if (block.factor, t) not in sd]
        if missing:
            raise ValueError(
                f"the variance table has no SD for {[sd_name(block.factor, t) for t in missing]}"
            )
        out.append(_block_value(block, sd, cor))
    return out


def _block_value(
    block: RandomBlock, sd: dict[tuple[str, str], float], cor: dict[tuple[str, str, str], float]
) -> BlockValue:
    """A block's factor from named SDs and correlations (absent SD or correlation: zero)."""
    k = block.n_terms
    sds = np.array([sd.get((block.factor, t), 0.0) for t in block.terms])
    corr = np.eye(k)
    if block.correlated:
        for i in range(k):
            for j in range(k):
                if i != j:
                    value = cor.get((block.factor, block.terms[i], block.terms[j]), 0.0)
                    corr[i, j] = 0.0 if not np.isfinite(value) else value
    cov = corr * np.outer(sds, sds)
    return BlockValue(
        block.factor, tuple(block.terms), block.correlated or k == 1, psd_cholesky(cov)
    )


def _sigma_from_table(design: Design, variance: pd.DataFrame) -> dict[str, float]:
    rows = variance[variance["kind"] == "sigma"]
    if design.sigma_levels is None:
        return {"": float(rows["estimate"].iloc[0])}
    by_level = dict(zip(rows["term"].astype(str), rows["estimate"].astype(float), strict=True))
    return {lvl: by_level[lvl] for lvl in design.sigma_levels}


def _nlme_terms(design: Design, variance: pd.DataFrame) -> list[str]:
    terms = [str(t) for t in variance.loc[variance["kind"] == "sd", "term"]]
    design_terms = [t for b in design.blocks for t in b.terms]
    if sorted(terms) != sorted(design_terms):
        raise ValueError(f"nlme's random terms {terms} differ from the design's {design_terms}")
    return terms


def lme4_ml_values(freq: Any) -> ParameterValues:
    """lme4's (or nlme's) ML estimates as :class:`ParameterValues` on its own design."""
    design: Design = freq.design
    ml = freq.ml_estimates
    fixed = {str(k): float(v) for k, v in _as_dict(ml["beta"], design.fixed_terms).items()}
    if freq.engine == "nlme":
        G = np.atleast_2d(np.asarray(ml["G"], dtype=float))
        terms = _nlme_terms(design, freq.variance)
        blocks = []
        for block in design.blocks:
            idx = [terms.index(t) for t in block.terms]
            blocks.append(
                BlockValue(
                    block.factor,
                    tuple(block.terms),
                    block.correlated or block.n_terms == 1,
                    psd_cholesky(G[np.ix_(idx, idx)]),
                )
            )
        sig = _as_dict(ml["sigma"], design.sigma_levels or [""])
        sigma = {str(k): float(v) for k, v in sig.items()}
        return ParameterValues(fixed, blocks, sigma, design.spec.sigma_by, _level_counts(design))
    sigma_value = float(ml["sigma"])
    blocks = _blocks_from_theta(design, ml["theta"], sigma_value)
    return ParameterValues(fixed, blocks, {"": sigma_value}, None)


def lme4_reml_values(freq: Any) -> ParameterValues | None:
    """The REML estimates of a REML FreqFit (None for an ML fit)."""
    if freq.method != "REML":
        return None
    design: Design = freq.design
    fixed = dict(
        zip(freq.fixed["term"].astype(str), freq.fixed["estimate"].astype(float), strict=True)
    )
    return ParameterValues(
        fixed,
        _blocks_from_table(design, freq.variance),
        _sigma_from_table(design, freq.variance),
        design.spec.sigma_by,
        _level_counts(design),
    )


def _as_dict(values: Any, names: list[str]) -> dict[str, float]:
    if isinstance(values, dict):
        return values
    values = np.atleast_1d(np.asarray(values, dtype=float))
    if len(values) != len(names):
        raise ValueError(f"{len(values)} values for {len(names)} names {names}")
    return dict(zip(names, values.tolist(), strict=True))


# --------------------------------------------------------------------------- projection


def project(
    values: ParameterValues, design: Design
) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """Put a parameter set on a (possibly different) design's parameters.

    Parameters the design lacks are dropped; parameters it has that ``values``
    lacks are zero (fixed effects, SDs, correlations).  A block with the same
    factor and terms keeps its exact factor; otherwise its covariance is
    rebuilt from the named SDs and correlations.  One residual SD is copied to
    every level; per-level SDs on a design with one get their pooled
    (row-weighted root mean square) value.
    """
    beta = np.array([values.fixed.get(t, 0.0) for t in design.fixed_terms], dtype=float)
    exact = {(b.factor, b.terms, b.correlated): b.F for b in values.blocks}
    sd: dict[tuple[str, str], float] = {}
    cor: dict[tuple[str, str, str], float] = {}
    for b in values.blocks:
        cov = b.cov
        sds = np.sqrt(np.clip(np.diag(cov), 0.0, None))
        for i, t in enumerate(b.terms):
            sd[(b.factor, t)] = float(sds[i])
            for j, t2 in enumerate(b.terms):
                if i != j and sds[i] > 0 and sds[j] > 0:
                    cor[(b.factor, t, t2)] = float(cov[i, j] / (sds[i] * sds[j]))
    factors = []
    for block in design.blocks:
        key = (block.factor, tuple(block.terms), block.correlated or block.n_terms == 1)
        if key in exact:
            factors.append(np.array(exact[key], dtype=float))
        else:
            factors.append(_block_value(block, sd, cor).F)
    if design.sigma_levels is None:
        if "" in values.sigma:
            sigma = np.array([values.sigma[""]])
        else:
            counts = values.sigma_counts
            total = sum(counts.get(k, 0) for k in values.sigma)
            pooled = sum(counts.get(k, 0) * v**2 for k, v in values.sigma.items()) / max(total, 1)
            sigma = np.array([math.sqrt(pooled)])
    elif "" in values.sigma:
        sigma = np.full(len(design.sigma_levels), values.sigma[""])
    else:
        sigma = np.array([values.sigma.get(lvl, np.nan) for lvl in design.sigma_levels])
        if np.any(~np.isfinite(sigma)):
            known = np.array(list(values.sigma.values()))
            sigma = np.where(np.isfinite(sigma), sigma, math.sqrt(float(np.mean(known**2))))
    return beta, factors, sigma


def _level_counts(design: Design) -> dict[str, int]:
    if design.sigma_levels is None or design.sigma_index is None:
        return {}
    counts = np.bincount(design.sigma_index, minlength=len(design.sigma_levels))
    return dict(zip(design.sigma_levels, counts.tolist(), strict=True))


def values_from_theta(design: Design, beta: Any, theta: Any, sigma: float) -> ParameterValues:
    """lmer's parameters (fixed effects, theta, residual SD) as :class:`ParameterValues`."""
    fixed = {str(k): float(v) for k, v in _as_dict(beta, design.fixed_terms).items()}
    blocks = _blocks_from_theta(design, theta, float(sigma))
    return ParameterValues(fixed, blocks, {"": float(sigma)}, None)


def theta_from_values(design: Design, values: ParameterValues) -> np.ndarray:
    """lme4's theta (relative Cholesky factors, lme4's block order) of a parameter set.

    The inverse of :func:`values_from_theta` for one residual SD; a block the
    values lack gets zeros.  Diagonal entries are kept at or above 0 (lme4's bounds).
    """
    _, factors, sigma = project(values, design)
    scale = float(np.atleast_1d(sigma)[0])
    by_block = {id(b): F for b, F in zip(design.blocks, factors, strict=True)}
    theta = []
    for block in lme4_block_order(design.blocks):
        F = np.asarray(by_block[id(block)], dtype=float)
        lam = psd_cholesky(F @ F.T) / scale  # lower triangular, diagonal >= 0
        k = block.n_terms
        for j in range(k):
            for i in range(j, k):
                theta.append(max(lam[i, j], 0.0) if i == j else lam[i, j])
    return np.asarray(theta, dtype=float)


def harness_values(design: Design, estimate: MLEstimate) -> ParameterValues:
    """The optimiser's result as :class:`ParameterValues`."""
    fixed = dict(zip(design.fixed_terms, estimate.beta.tolist(), strict=True))
    blocks = [
        BlockValue(b.factor, tuple(b.terms), b.correlated or b.n_terms == 1, F)
        for b, F in zip(design.blocks, estimate.factors, strict=True)
    ]
    if design.sigma_levels is None:
        sigma = {"": float(estimate.sigma[0])}
    else:
        sigma = dict(zip(design.sigma_levels, estimate.sigma.tolist(), strict=True))
    return ParameterValues(fixed, blocks, sigma, design.spec.sigma_by)


# --------------------------------------------------------------------------- comparison


def _residual_scale(values: ParameterValues) -> float:
    return max(values.sigma.values())


def compare_estimates(
    lme4: ParameterValues,
    harness: ParameterValues,
    lme4_names: list[str],
    harness_names: list[str],
) -> pd.DataFrame:
    """lme4's ML estimates against the harness optimum, one row per parameter.

    Tolerances: fixed effects ``1e-4`` relative; SDs, correlations and
    residual SDs ``1e-3`` relative.  Where lme4's SD is zero (a singular fit,
    SD below ``1e-4`` x the residual SD) a relative difference means nothing:
    the SD gets an absolute tolerance of ``1e-3`` x the residual SD and its
    correlations are not compared.  Correlations within ``1e-2`` of zero get
    an absolute floor of ``1e-5``.  The ``tolerance`` column says which rule
    applied.
    """
    left, right = lme4.named(), harness.named()
    scale = _residual_scale(lme4)
    singular_sds = {n for n, v in left.items() if ": sd(" in n and v < SINGULAR_RATIO * scale}
    names = list(dict.fromkeys([*lme4_names, *harness_names]))
    rows = []
    for name in names:
        a, b = left.get(name, np.nan), right.get(name, np.nan)
        kind = (
            "sigma"
            if name.startswith("sigma")
            else ("sd" if ": sd(" in name else "cor" if ": cor(" in name else "fixed")
        )
        diff = abs(b - a) if np.isfinite(a) and np.isfinite(b) else np.nan
        rel = diff / abs(a) if np.isfinite(diff) and a != 0 else np.nan
        if name not in lme4_names:
            tolerance, ok = "only in the PyMC model", False
        elif name not in harness_names:
            tolerance, ok = "only in lme4", False
        elif kind == "fixed":
            tolerance, ok = f"{FIXED_RTOL:g} relative", bool(diff <= FIXED_RTOL * abs(a))
        elif kind == "sd" and name in singular_sds:
            tolerance = (
                f"{SINGULAR_ATOL:g} x sigma absolute (singular fit: SD ~ 0, "
                "relative difference meaningless)"
            )
            ok = bool(diff <= SINGULAR_ATOL * scale)
        elif kind == "cor" and _cor_sds(name) & singular_sds:
            tolerance = "not compared (an SD is ~0: the correlation is not identified)"
            ok = True
        elif kind == "cor" and abs(a) < 1e-2:
            tolerance = f"{CORRELATION_ATOL:g} absolute (correlation ~ 0)"
            ok = bool(diff <= CORRELATION_ATOL)
        else:
            tolerance, ok = f"{VARIANCE_RTOL:g} relative", bool(diff <= VARIANCE_RTOL * abs(a))
        rows.append(
            {
                "parameter": name,
                "kind": kind,
                "lme4": a,
                "harness": b,
                "abs_diff": diff,
                "rel_diff": rel,
                "tolerance": tolerance,
                "ok": ok,
            }
        )
    return pd.DataFrame(
        rows,
        columns=["parameter", "kind", "lme4", "harness", "abs_diff", "rel_diff", "tolerance", "ok"],
    )


def display_names(*designs: Design) -> dict[str, str]:
    """Parameter name (keyed by grouping factor) -> lme4's ``VarCorr`` spelling.

    Parameters are identified by (factor, term) so that two designs of the same
    data line up (``(x | g)`` against ``(x || g)``); users read them as lme4
    prints them, where the second block of a repeated factor is ``g.1``
    (``as.data.frame(VarCorr(fit))$grp``), as in the variance table.  The first
    design's spelling wins.
    """
    names: dict[str, str] = {}
    for design in designs:
        for block in design.blocks:
            label = block.label or block.factor
            for term in block.terms:
                names.setdefault(sd_name(block.factor, term), sd_name(label, term))
            if block.correlated:
                for i, a in enumerate(block.terms):
                    for b in block.terms[i + 1 :]:
                        names.setdefault(cor_name(block.factor, a, b), cor_name(label, a, b))
    return names


def _cor_sds(name: str) -> set[str]:
    factor, _, rest = name.partition(": cor(")
    terms = _split_terms(rest[:-1])
    return {sd_name(factor, t) for t in terms}


def _split_terms(text: str) -> list[str]:
    """Split ``a,b`` where terms may themselves contain commas inside parentheses."""
    depth = 0
    parts: list[str] = []
    current: list[str] = []
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def _structure_reasons(lme4_design: Design, pymc_design: Design, engine: str) -> list[str]:
    reasons = []
    left, right = parameter_names(lme4_design), parameter_names(pymc_design)
    if lme4_design.response != pymc_design.response:
        reasons.append(
            f"response: {engine} models {lme4_design.response!r}, the PyMC model "
            f"{pymc_design.response!r}"
        )
    if lme4_design.n != pymc_design.n:
        reasons.append(
            f"observations: {engine} uses {lme4_design.n} rows, the PyMC model {pymc_design.n} "
            "(different rows dropped for missing values)"
        )
    lme4_sigma = [n for n in left if n.startswith("sigma")]
    pymc_sigma = [n for n in right if n.startswith("sigma")]
    if lme4_sigma != pymc_sigma:
        describe = {
            True: lambda d: f"one residual SD per level of {d.spec.sigma_by!r}",
            False: lambda d: "one residual SD",
        }
        reasons.append(
            f"residual SD: {engine} has {describe[lme4_design.sigma_levels is not None](lme4_design)}"
            f"; the PyMC model has "
            f"{describe[pymc_design.sigma_levels is not None](pymc_design)}"
        )
    for name in left:
        if name not in right and not name.startswith("sigma"):
            reasons.append(f"{engine} has {name}; the PyMC model has no such parameter")
    for name in right:
        if name not in left and not name.startswith("sigma"):
            reasons.append(f"the PyMC model has {name}; {engine} has no such parameter")
    return reasons


# --------------------------------------------------------------------------- entry point


def same_model(
    spec: ModelSpec,
    data: pd.DataFrame,
    *,
    freq: Any = None,
    pymc_spec: ModelSpec | None = None,
    check_pymc_model: bool = True,
) -> SameModel:
    """Check that the PyMC model and the lme4 (or nlme) model have the same likelihood.

    Parameters
    ----------
    spec : ModelSpec
        The model lme4 fits (nlme when ``spec.sigma_by`` is set).
    data : DataFrame
    freq : FreqFit, optional
        An lme4/nlme fit of ``spec`` already made (``hz.fit_lme4``); fitted
        here (without profiles or simulations) when absent.
    pymc_spec : ModelSpec, optional
        The PyMC side's model, when it is not ``spec`` (to catch a
        misspecified pair, e.g. a missing random slope or uncorrelated terms).
    check_pymc_model : bool
        Also recover the likelihood from the log density of the model that
        :func:`harness.engines.pymc.build_model` builds (offsets form only).

    Returns
    -------
    SameModel

    Raises
    ------
    ValueError
        If ``freq`` was fitted to another formula or residual structure than ``spec``.
    """
    started = time.perf_counter()
    if freq is None:
        from harness.engines.lme4 import fit_lme4

        freq = fit_lme4(spec, data, n_sims=0)
    elif (freq.spec.formula, freq.spec.sigma_by) != (spec.formula, spec.sigma_by):
        raise ValueError(
            f"freq was fitted to {freq.spec.formula!r} (sigma_by={freq.spec.sigma_by!r}), "
            f"not to spec {spec.formula!r} (sigma_by={spec.sigma_by!r})"
        )
    engine = str(freq.engine)
    lme4_design: Design = freq.design
    pymc_spec = spec if pymc_spec is None else pymc_spec
    pymc_design = lme4_design if pymc_spec is spec else build_design(pymc_spec, data)

    reasons = _structure_reasons(lme4_design, pymc_design, engine)
    notes: list[str] = []
    if freq.singular:
        notes.append(f"{engine} reports a singular fit: zero SDs are compared on an absolute scale")
    if not freq.converged:
        # Not a reason by itself: whether lme4's optimum is the optimum is what the
        # estimates comparison below decides.
        notes.append(f"{engine} warned about convergence: {'; '.join(freq.messages)}")

    if lme4_design.family.laplace:  # the Laplace identity, not lmer's exact marginal one
        return _glmm_same_model(freq, pymc_design, engine, reasons, notes, started)

    method = choose_method(pymc_design)
    marginal = MarginalLikelihood(pymc_design, method=method)
    ml = lme4_ml_values(freq)
    beta, factors, sigma = project(ml, pymc_design)
    at_ml = marginal.evaluate(beta, factors, sigma)
    loglik_lme4 = float(freq.loglik_ml)
    loglik_pymc = at_ml["loglik"]
    difference = loglik_pymc - loglik_lme4
    if not abs(difference) < LOGLIK_TOLERANCE:
        reasons.append(
            f"log-likelihood at {engine}'s ML estimates: {engine} {loglik_lme4:.8f}, PyMC marginal "
            f"{loglik_pymc:.8f}, difference {difference:.3g} (tolerance {LOGLIK_TOLERANCE:g})"
        )

    reml_lme4 = reml_pymc = None
    reml_values = lme4_reml_values(freq)
    if reml_values is not None and freq.reml_criterion is not None:
        _, reml_factors, reml_sigma = project(reml_values, pymc_design)
        reml_lme4 = float(freq.reml_criterion)
        reml_pymc = marginal.reml_criterion(reml_factors, reml_sigma)
        if not abs(reml_pymc - reml_lme4) < LOGLIK_TOLERANCE:
            reasons.append(
                f"REML criterion at {engine}'s REML estimates: {engine} {reml_lme4:.8f}, PyMC "
                f"marginal {reml_pymc:.8f}, difference {reml_pymc - reml_lme4:.3g} "
                f"(tolerance {LOGLIK_TOLERANCE:g})"
            )

    start = None
    if method == "sparse":
        start = marginal.pack(factors, sigma)
        notes.append(
            f"{marginal.stats.n_columns} random-effect columns over crossed or nested factors: "
            f"sparse factorisation (SuperLU), maximisation started at {engine}'s ML estimates"
        )
    optimum = marginal.maximise(start=start)
    if not optimum.converged:
        notes.append(f"optimiser: {optimum.message}")
    harness_optimum = harness_values(pymc_design, optimum)

    # lme4's optimum is the reference unless lme4 stopped short of it: when lme4 warned, or
    # the harness climbs higher, its other optimizers (and a start at the harness's optimum)
    # say whether a higher point exists; the same-model test is then against the best fit.
    refits = _lme4_refits(
        freq,
        harness_optimum if pymc_design is lme4_design else None,
        higher=optimum.loglik > loglik_lme4 + OPTIMUM_LOGLIK_TOLERANCE,
        notes=notes,
    )
    best_ml = refits.best_fit["by_method"].get("ML") if refits is not None else None
    short = bool(best_ml and best_ml["improved"])
    reference, reference_loglik, who = ml, loglik_lme4, engine
    at_best = None
    if refits is not None and best_ml is not None:
        notes.append(optimizer_sentence(refits.best_fit["by_method"], "ML"))
        if freq.method == "REML" and "REML" in refits.best_fit["by_method"]:
            notes.append(optimizer_sentence(refits.best_fit["by_method"], "REML"))
        if refits.best_fit.get("missing"):
            notes.append(
                "allFit's optimizers not tried (R packages missing): "
                + ", ".join(refits.best_fit["missing"])
            )
    if short and best_ml is not None:
        reference = values_from_theta(
            lme4_design, best_ml["beta"], best_ml["theta"], float(best_ml["sigma"])
        )
        reference_loglik = float(best_ml["loglik"])
        who = f"lme4's best refit ({best_ml['optimizer']} from {best_ml['start']})"
        b_best, f_best, s_best = project(reference, pymc_design)
        at_best = marginal.evaluate(b_best, f_best, s_best)["loglik"]
        if not abs(at_best - reference_loglik) < LOGLIK_TOLERANCE:
            reasons.append(
                f"log-likelihood at {who}'s ML estimates: lme4 {reference_loglik:.8f}, PyMC "
                f"marginal {at_best:.8f}, difference {at_best - reference_loglik:.3g} "
                f"(tolerance {LOGLIK_TOLERANCE:g})"
            )
    estimates = compare_estimates(
        reference,
        harness_optimum,
        parameter_names(lme4_design),
        parameter_names(pymc_design),
    )
    if short:
        original = ml.named()
        estimates.insert(
            2, "lme4_original", [original.get(n, np.nan) for n in estimates["parameter"]]
        )
    shown = display_names(lme4_design, pymc_design)
    estimates["parameter"] = [shown.get(n, n) for n in estimates["parameter"]]
    for row in estimates.itertuples(index=False):
        if not row.ok and row.tolerance not in ("only in lme4", "only in the PyMC model"):
            reasons.append(
                f"ML estimate of {row.parameter}: {who} {row.lme4:.8g}, maximiser of the PyMC "
                f"marginal {row.harness:.8g} (relative difference {row.rel_diff:.2g}; "
                f"tolerance {row.tolerance})"
            )
    if optimum.loglik > reference_loglik + OPTIMUM_LOGLIK_TOLERANCE:
        reasons.append(
            f"maximised log-likelihood: the PyMC marginal reaches {optimum.loglik:.8f}, above "
            f"{who}'s {reference_loglik:.8f} (difference {optimum.loglik - reference_loglik:.3g})"
        )

    model_loglik = probe_gap = None
    if check_pymc_model and pymc_design.spec.parameterization == "offsets":
        tie = pymc_model_loglik(pymc_design, beta, factors, sigma, marginal=marginal)
        model_loglik, probe_gap = tie["at_mode"], tie["max_probe_gap"]
        gap = model_loglik - loglik_pymc
        if not (abs(gap) < LOGLIK_TOLERANCE and probe_gap < LOGLIK_TOLERANCE):
            reasons.append(
                f"PyMC model density: the model build_model makes recovers {model_loglik:.8f} "
                f"(spread over probes {probe_gap:.3g}), the marginal likelihood {loglik_pymc:.8f}"
            )
    elif check_pymc_model:
        notes.append(
            "the PyMC model's own density was not checked: parameterization 'baked_in' "
            "draws group coefficients, not standardised offsets"
        )

    result = SameModel(
        engine=engine,
        formula_lme4=lme4_design.spec.formula,
        formula_pymc=pymc_design.spec.formula,
        sigma_by_lme4=lme4_design.spec.sigma_by,
        sigma_by_pymc=pymc_design.spec.sigma_by,
        loglik_lme4=loglik_lme4,
        loglik_pymc=loglik_pymc,
        difference=difference,
        ok=not reasons,
        reasons=reasons,
        estimates=estimates,
        reml_criterion_lme4=reml_lme4,
        reml_criterion_pymc=reml_pymc,
        loglik_pymc_max=optimum.loglik,
        loglik_pymc_model=model_loglik,
        model_probe_gap=probe_gap,
        optimizer={
            "method": (
                "L-BFGS-B (scipy), beta profiled, "
                + ("central-difference gradient" if method == "sparse" else "PyTensor gradient")
            ),
            "linear_algebra": method,
            "start": f"{engine}'s ML estimates" if start is not None else "neutral",
            "converged": optimum.converged,
            "message": optimum.message,
            "evaluations": optimum.n_evaluations,
            "max_abs_gradient": optimum.gradient_norm,
        },
        notes=notes,
        seconds=time.perf_counter() - started,
        lme4_refits=refits.optimizer_refits if refits is not None else None,
        lme4_best=refits.best_fit if refits is not None else {},
        lme4_short=short or bool(refits is not None and refits.best_fit.get("improved")),
        loglik_lme4_best=reference_loglik if short else None,
        loglik_pymc_at_best=at_best,
    )
    log.info("same model? %s (difference %.3g)", result.verdict, difference)
    for reason in reasons:
        log.info("same model: %s", reason)
    return result


def _lme4_refits(
    freq: Any, optimum: ParameterValues | None, *, higher: bool, notes: list[str]
) -> Any:
    """``freq`` refitted with lme4's other optimizers when lme4 warned or the harness is higher.

    ``optimum`` (the harness's ML optimum on lme4's design) is one more start.
    None when no refit applies (nlme, glmer) or none was needed; a failure is a note.
    """
    from harness.engines.lme4 import refit_lme4, refits_apply

    if not (higher or not freq.converged) or not refits_apply(freq):
        return None
    start = theta_from_values(freq.design, optimum) if optimum is not None else None
    try:
        return refit_lme4(freq, start=start)
    except (RuntimeError, ValueError) as err:
        log.warning("refits with lme4's other optimizers failed: %s", err)
        notes.append(f"refits with lme4's other optimizers failed: {err}")
        return None


def with_lme4_refits(freq: Any, result: SameModel | None) -> Any:
    """``freq`` carrying the refits the same-model check made (they include its optimum's start).

    The comparison tables then name the shift from lme4's estimate to its best
    refit as the ``lme4_optimizer`` source.  ``freq`` itself when none were made.
    """
    import dataclasses

    if result is None or result.lme4_refits is None or not result.lme4_best:
        return freq
    return dataclasses.replace(
        freq, optimizer_refits=result.lme4_refits, best_fit=dict(result.lme4_best)
    )


def _glmm_same_model(
    freq: Any,
    pymc_design: Design,
    engine: str,
    reasons: list[str],
    notes: list[str],
    started: float,
) -> SameModel:
    """``same_model`` for glmer fits: see :mod:`harness.checks.same_model_glmm`."""
    from harness.checks.same_model_glmm import glmm_same_model

    checks = glmm_same_model(freq, pymc_design, engine, reasons, notes)
    loglik_lme4 = float(freq.loglik)
    result = SameModel(
        engine=engine,
        formula_lme4=freq.design.spec.formula,
        formula_pymc=pymc_design.spec.formula,
        sigma_by_lme4=None,
        sigma_by_pymc=None,
        loglik_lme4=loglik_lme4,
        loglik_pymc=checks["loglik_pymc"],
        difference=checks["loglik_pymc"] - loglik_lme4,
        ok=not reasons,
        reasons=reasons,
        estimates=checks["estimates"],
        reml_criterion_lme4=None,
        reml_criterion_pymc=None,
        loglik_pymc_max=checks["loglik_pymc_max"],
        loglik_pymc_model=checks["loglik_pymc_model"],
        optimizer=checks.get("optimizer", {}),
        notes=notes,
        seconds=time.perf_counter() - started,
        lme4_refits=checks.get("lme4_refits"),
        lme4_best=checks.get("lme4_best") or {},
        lme4_short=bool(checks.get("lme4_short")),
        loglik_lme4_best=checks.get("loglik_lme4_best"),
        loglik_pymc_at_best=checks.get("loglik_pymc_at_best"),
    )
    log.info("same model (GLMM, Laplace)? %s", result.verdict)
    return result
