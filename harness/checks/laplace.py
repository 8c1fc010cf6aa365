"""The Laplace (and adaptive Gauss-Hermite) approximation of a GLMM's marginal likelihood.

This is the "same model?" check for non-gaussian families: from the harness's
own design (X, Z, offset, trials) and family, and at lme4's estimates
(``theta``, ``beta``), compute the log-likelihood glmer maximises and compare
it with glmer's ``logLik``.  As lme4 (``nAGQ = 1``), with spherical random
effects ``b = Lambda(theta) u``:

    eta = offset + X beta + Z Lambda u
    u_hat = argmax_u  sum_i log p(y_i | eta_i) - |u|^2 / 2      (penalised IRLS)
    L L' = Lambda' Z' W Z Lambda + I                             (W: IRLS weights at u_hat)
    logLik = sum_i log p(y_i | u_hat) - |u_hat|^2 / 2 - log det L

For one scalar random-effects term and ``n_agq > 1`` points, each group's
one-dimensional integral is computed by adaptive Gauss-Hermite quadrature
centred at ``u_hat`` and scaled by the conditional SD, as ``glmer(nAGQ = n)``
does (with beta held at the given value).

Everything is NumPy/SciPy: the same numbers PyMC's model computes for its
likelihood (``Family.loglik`` is checked against the PyMC model's log-density
in the tests), without a compiled graph per evaluation.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any, TypedDict

import numpy as np
import pandas as pd
import scipy.sparse as sp
import scipy.sparse.linalg as spla
from scipy import optimize

from harness.model.spec import Design

log = logging.getLogger("harness")

__all__ = [
    "LaplaceResult",
    "beta_scale",
    "lambda_matrix",
    "laplace_loglik",
    "maximise_laplace",
    "one_blas_thread",
    "theta_size",
]


@dataclass
class LaplaceResult:
    """The approximate log-likelihood at one (theta, beta) and what produced it."""

    loglik: float
    u: np.ndarray  # spherical conditional modes
    b: np.ndarray  # conditional modes on the link scale (Lambda u), Z's column order
    conditional_loglik: float
    penalty: float
    log_det: float
    iterations: int
    n_agq: int = 1
    #: sum_i log p(y_i | saturated mean): glmer's nAGQ > 1 logLik leaves it out.
    saturated_loglik: float = 0.0

    @property
    def loglik_lme4_agq(self) -> float:
        """The value glmer (nAGQ > 1) reports: deviance residuals instead of R's ``aic``."""
        return self.loglik - self.saturated_loglik


class LaplaceOptimum(TypedDict):
    """What :func:`maximise_laplace` returns."""

    theta: np.ndarray
    beta: pd.Series
    loglik: float
    message: str


def theta_size(design: Design) -> int:
    """Number of covariance parameters: k(k+1)/2 per correlated block, 1 per term otherwise."""
    return sum(b.n_terms * (b.n_terms + 1) // 2 for b in design.blocks)


def _block_factor(theta: np.ndarray, k: int) -> np.ndarray:
    """lme4's relative Cholesky factor of one block: theta fills the lower triangle by column."""
    T = np.zeros((k, k))
    cols, rows = np.triu_indices(k)  # column-major lower triangle: (row, col) with row >= col
    T[rows, cols] = theta
    return T


def lambda_matrix(design: Design, theta: Sequence[float] | np.ndarray) -> sp.csc_matrix:
    """``Lambda(theta)`` in the column order of :meth:`Design.Z` (lme4's ``Lambdat`` transposed)."""
    theta_v = np.asarray(theta, dtype=float)
    if theta_v.size != theta_size(design):
        raise ValueError(
            f"theta has {theta_v.size} values; the design's random effects need {theta_size(design)}"
        )
    # Block diagonal with one copy of each block's factor per level, written out as
    # coordinates (the nonzeros of I_J (x) T): the optimisers call this hundreds of times,
    # and scipy's kron and block_diag cost more than everything else in an evaluation.
    rows, cols, data = [], [], []
    start, column = 0, 0
    for block in design.blocks:
        k = block.n_terms
        m = k * (k + 1) // 2
        T = _block_factor(theta_v[start : start + m], k)
        start += m
        r, c = np.nonzero(T)
        offsets = column + k * np.arange(block.n_levels)
        rows.append((offsets[:, None] + r[None, :]).ravel())
        cols.append((offsets[:, None] + c[None, :]).ravel())
        data.append(np.tile(T[r, c], block.n_levels))
        column += k * block.n_levels
    return sp.csc_matrix(
        (np.concatenate(data), (np.concatenate(rows), np.concatenate(cols))), shape=(column, column)
    )


def _as_vector(
    values: Mapping[str, float] | Sequence[float] | np.ndarray, names: list[str], what: str
) -> np.ndarray:
    if isinstance(values, Mapping):
        missing = [n for n in names if n not in values]
        if missing:
            raise ValueError(f"{what}: no value for {missing}; given {list(values)}")
        return np.array([float(values[n]) for n in names])
    out = np.asarray(values, dtype=float).ravel()
    if out.size != len(names):
        raise ValueError(f"{what}: {out.size} values for {len(names)} parameters {names}")
    return out


#: From this many random effects on the penalised system ``M' W M + I`` is factored sparse:
#: crossed or nested factors with hundreds of levels made each dense solve the bottleneck of
#: the Laplace maximisation (a GLMM with 786 random effects spent minutes there).
SPARSE_FROM = 200


def _penalised_system(M: sp.csc_matrix, weight: np.ndarray) -> Any:
    """``M' diag(weight) M + I``: dense below :data:`SPARSE_FROM` columns, else sparse CSC."""
    H = M.T @ sp.diags(weight) @ M + sp.identity(M.shape[1], format="csc")
    return sp.csc_matrix(H) if M.shape[1] >= SPARSE_FROM else H.toarray()


def _solve(H: Any, b: np.ndarray) -> np.ndarray:
    if sp.issparse(H):
        return np.asarray(spla.splu(sp.csc_matrix(H)).solve(np.asarray(b, dtype=float)))
    return np.linalg.solve(H, b)


def _log_det(H: Any) -> float:
    """log det of the positive definite ``H`` (sparse: from the LU factor's diagonal)."""
    if sp.issparse(H):
        lu = spla.splu(sp.csc_matrix(H))
        return float(np.sum(np.log(np.abs(lu.U.diagonal()))))
    _sign, value = np.linalg.slogdet(H)
    return float(value)


def _diagonal(H: Any) -> np.ndarray:
    return np.asarray(H.diagonal() if sp.issparse(H) else np.diag(H), dtype=float)


def _pirls(
    design: Design,
    M: sp.csc_matrix,
    fixed_eta: np.ndarray,
    u0: np.ndarray,
    tol: float,
    max_iter: int,
) -> tuple[np.ndarray, int]:
    """Penalised IRLS (Fisher scoring with step halving) for the conditional modes."""
    family, y, n = design.family, design.y, design.trials
    u = u0.copy()

    def objective(u_: np.ndarray) -> float:
        eta = fixed_eta + M @ u_
        return float(np.sum(family.loglik(y, family.link.inverse(eta), n)) - 0.5 * u_ @ u_)

    current = objective(u)
    for iteration in range(1, max_iter + 1):
        eta = fixed_eta + M @ u
        score, _ = family.score_weights(y, eta, n)
        H = _penalised_system(M, family.newton_weights(y, eta, n))  # Newton: the exact mode
        gradient = M.T @ score - u
        step = _solve(H, gradient)
        scale = 1.0
        while True:
            candidate = u + scale * step
            value = objective(candidate)
            if value >= current - 1e-12 * abs(current) or scale < 1e-8:
                break
            scale /= 2
        u, previous, current = candidate, current, value
        if np.max(np.abs(scale * step)) < tol and abs(current - previous) < tol * (
            1 + abs(current)
        ):
            return u, iteration
    log.warning("penalised IRLS did not converge in %d iterations", max_iter)
    return u, max_iter


def _pirls_lme4(
    design: Design,
    M: sp.csc_matrix,
    fixed_eta: np.ndarray,
    start_eta: np.ndarray,
    tol: float,
    max_iter: int = 30,
) -> tuple[np.ndarray, np.ndarray, int]:
    """lme4's ``pwrssUpdate`` (uOnly): IRLS from ``start_eta`` until the penalised deviance
    changes by less than ``tol`` (relative).  Returns the last u, the weights its factor L was
    built from (those of the iterate before: lme4 stops without refactoring) and iterations."""
    family, y, n = design.family, design.y, design.trials
    saturated = family.loglik(y, family.saturated_mu(y, n), n)

    def pdev(eta: np.ndarray, u: np.ndarray) -> float:
        return float(2 * np.sum(saturated - family.loglik(y, family.link.inverse(eta), n)) + u @ u)

    eta = start_eta
    old = np.inf
    u = np.zeros(M.shape[1])
    for iteration in range(1, max_iter + 1):
        score, weight = family.score_weights(y, eta, n)
        H = _penalised_system(M, weight)
        working = np.where(weight > 0, score / np.where(weight > 0, weight, 1), 0.0)
        u_new = _solve(H, M.T @ (weight * (eta - fixed_eta + working)))
        eta_new = fixed_eta + M @ u_new
        value = pdev(eta_new, u_new)
        halvings = 0
        while value > old and halvings < 10:  # lme4's step halving
            u_new = 0.5 * (u_new + u)
            eta_new = fixed_eta + M @ u_new
            value = pdev(eta_new, u_new)
            halvings += 1
        u, eta = u_new, eta_new
        if abs((old - value) / value) < tol:
            return u, weight, iteration
        old = value
    log.warning("lme4-style penalised IRLS did not converge in %d iterations", max_iter)
    return u, weight, max_iter


def laplace_loglik(
    design: Design,
    theta: Mapping[str, float] | Sequence[float] | np.ndarray,
    beta: Mapping[str, float] | Sequence[float] | np.ndarray,
    *,
    n_agq: int = 1,
    tol: float = 1e-12,
    max_iter: int = 200,
    u_start: np.ndarray | None = None,
    lme4_start: np.ndarray | None = None,
    lme4_tol: float = 1e-7,
    Z: sp.csc_matrix | None = None,
) -> LaplaceResult:
    """The Laplace (``n_agq = 1``) or adaptive Gauss-Hermite log-likelihood at (theta, beta).

    Parameters
    ----------
    design : Design
        A design whose family lme4 fits by glmer's Laplace approximation (``design.family.laplace``).
    theta : mapping or sequence
        lme4's ``getME(fit, "theta")`` (a mapping is read in its own order).
    beta : mapping or sequence
        Fixed effects; a mapping is read by ``design.fixed_terms``.
    n_agq : int
        Quadrature points; above 1 only for a single scalar random-effects term.
    lme4_start : array, optional
        glmer's starting linear predictor (``FreqFit.ml_estimates["lp0"]``).  Given,
        the conditional modes are found as lme4 finds them (IRLS from that start,
        stopping at ``lme4_tol``, log det from the last factorisation), which is
        what glmer's reported ``logLik`` is; otherwise they are solved to ``tol``
        (the exact Laplace approximation, which differs from lme4's by its IRLS
        tolerance, about 1e-4 on cbpp).
    Z : sparse matrix, optional
        ``design.Z()``, when the caller has it already (an optimiser's loop).

    Returns
    -------
    LaplaceResult
    """
    family = design.family
    if not family.laplace:
        raise ValueError(
            "the Laplace check is for non-gaussian families; gaussian models have an exact likelihood"
        )
    theta_v = np.asarray(list(theta.values()) if isinstance(theta, Mapping) else theta, dtype=float)
    beta_v = _as_vector(beta, design.fixed_terms, "beta")
    if n_agq > 1 and not (len(design.blocks) == 1 and design.blocks[0].n_terms == 1):
        raise ValueError(
            f"adaptive quadrature (n_agq={n_agq}) needs a single scalar random-effects term; "
            f"the design has {[(b.label, b.terms) for b in design.blocks]}"
        )
    Lam = lambda_matrix(design, theta_v)
    M = ((design.Z() if Z is None else Z) @ Lam).tocsc()
    fixed_eta = design.X.to_numpy(dtype=float) @ beta_v
    if design.offset is not None:
        fixed_eta = fixed_eta + design.offset
    if lme4_start is not None and n_agq <= 1:
        # lme4's lp0 excludes the formula's offset (its devfun adds it back: updateMu).
        start = np.asarray(lme4_start, dtype=float)
        if design.offset is not None:
            start = start + design.offset
        u, weight, iterations = _pirls_lme4(design, M, fixed_eta, start, lme4_tol)
        eta = fixed_eta + M @ u
    else:
        u0 = np.zeros(M.shape[1]) if u_start is None else u_start
        u, iterations = _pirls(design, M, fixed_eta, u0, tol, max_iter)
        eta = fixed_eta + M @ u
        _, weight = family.score_weights(design.y, eta, design.trials)
    mu = family.link.inverse(eta)
    pointwise = family.loglik(design.y, mu, design.trials)
    H = _penalised_system(M, weight)
    log_det_h = _log_det(H)
    conditional = float(np.sum(pointwise))
    penalty = float(0.5 * u @ u)
    if n_agq <= 1:
        loglik = conditional - penalty - 0.5 * log_det_h
    else:
        loglik = _agq(design, M, fixed_eta, u, _diagonal(H), n_agq)
    return LaplaceResult(
        loglik=float(loglik),
        u=u,
        b=Lam @ u,
        conditional_loglik=conditional,
        penalty=penalty,
        log_det=0.5 * float(log_det_h),
        iterations=iterations,
        n_agq=n_agq,
        saturated_loglik=float(
            np.sum(
                family.loglik(design.y, family.saturated_mu(design.y, design.trials), design.trials)
            )
        ),
    )


@cache
def _hermgauss(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Hermite nodes and weights (the same every call; NumPy recomputes them each time)."""
    nodes, weights = np.polynomial.hermite.hermgauss(n)
    nodes.flags.writeable = weights.flags.writeable = False
    return nodes, weights


def _agq(
    design: Design,
    M: sp.csc_matrix,
    fixed_eta: np.ndarray,
    u_hat: np.ndarray,
    h: np.ndarray,
    n_agq: int,
) -> float:
    """Sum over groups of log  int prod_i p(y_i | u) phi(u) du, by adaptive Gauss-Hermite."""
    family = design.family
    block = design.blocks[0]
    group = block.group_index
    # One scalar block: row i's column of Z Lambda is its group's; M is diagonal per group.
    m = np.asarray(M.sum(axis=1)).ravel()
    nodes, weights = _hermgauss(n_agq)
    s = 1.0 / np.sqrt(h)  # conditional SD of u given y (Fisher information at the mode)
    q = u_hat.size
    # Every node at once: one call of the family's log density (its per-call overhead was
    # most of the cost of a quadrature), row k of each array for node k.
    u = u_hat[None, :] + np.sqrt(2.0) * s[None, :] * nodes[:, None]
    eta = fixed_eta[None, :] + m[None, :] * u[:, group]
    pointwise = family.loglik(design.y, family.link.inverse(eta), design.trials)
    terms = np.empty((n_agq, q))
    for k, (x, w) in enumerate(zip(nodes, weights, strict=True)):
        per_group = np.bincount(group, weights=pointwise[k], minlength=q)
        # log of w e^{x^2} * g(u) with g = prod p * phi(u); the sqrt(2) s Jacobian added below
        terms[k] = np.log(w) + x**2 + per_group - 0.5 * u[k] ** 2 - 0.5 * np.log(2 * np.pi)
    top = terms.max(axis=0)
    per_group = top + np.log(np.exp(terms - top).sum(axis=0)) + np.log(np.sqrt(2.0) * s)
    return float(per_group.sum())


def beta_scale(design: Design, theta: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """An upper triangular R with R'R the Laplace information of beta at (theta, beta).

    ``X'WX - X'WM (M'WM + I)^-1 M'WX`` at the conditional modes (the random
    effects profiled out).  Optimisers work in ``z = R (beta - beta0)``, where
    the log-likelihood's curvature is about the identity and a unit is about
    one standard error: in the raw fixed effects a predictor on a large scale
    (a squared age up to 2000) makes a first step so long that the likelihood
    underflows, and a simplex crawls along the long axes.  The identity where
    the information is not positive definite.
    """
    X = design.X.to_numpy(dtype=float)
    M = (design.Z() @ lambda_matrix(design, theta)).tocsc()
    fixed_eta = X @ np.asarray(beta, dtype=float)
    if design.offset is not None:
        fixed_eta = fixed_eta + design.offset
    u_hat, _ = _pirls(design, M, fixed_eta, np.zeros(M.shape[1]), 1e-8, 200)
    _, weight = design.family.score_weights(design.y, fixed_eta + M @ u_hat, design.trials)
    WX = weight[:, None] * X
    MtWX = np.asarray(M.T @ WX)
    info = X.T @ WX - MtWX.T @ _solve(_penalised_system(M, weight), MtWX)
    try:
        return np.asarray(np.linalg.cholesky(0.5 * (info + info.T)).T)
    except np.linalg.LinAlgError:
        return np.eye(X.shape[1])


def one_blas_thread() -> Any:
    """A context in which BLAS and LAPACK run on one thread (threadpoolctl).

    The maximisers solve small dense systems (below :data:`SPARSE_FROM` random
    effects) thousands of times; a threaded BLAS gains nothing there and, on a
    machine whose cores are busy, loses much: one Laplace evaluation of
    Contraception (120 random effects) took 340 ms with OpenBLAS's threads and
    34 ms on one, on two cores under a load of 8.
    """
    from threadpoolctl import threadpool_limits  # a dependency of PyMC's

    return threadpool_limits(limits=1, user_api="blas")


#: The polish's stop rule (scaled coordinates: the fixed effects in about standard errors):
#: the simplex within POLISH_XATOL and its log-likelihoods within POLISH_FATOL, or
#: POLISH_EVALUATIONS evaluations per parameter.  The same-model check reads the estimates
#: to 1e-3 SE or 1e-4 relative and the maximum to 1e-4.
POLISH_XATOL = 1e-7
POLISH_FATOL = 1e-10
POLISH_EVALUATIONS = 200
#: A maximisation that may run longer than this many seconds says every so often how far it is.
PROGRESS_SECONDS = 30.0


def maximise_laplace(
    design: Design,
    theta0: Sequence[float] | np.ndarray | None = None,
    beta0: Sequence[float] | np.ndarray | None = None,
    *,
    n_agq: int = 1,
    lme4_start: np.ndarray | None = None,
    lme4_tol: float = 1e-7,
) -> LaplaceOptimum:
    """Maximise the approximate log-likelihood over (theta, beta) (level 2 of "same model?").

    Diagonal entries of each block's factor are kept non-negative, as lme4's
    bounds do.  Returns ``theta``, ``beta`` (Series by fixed term), ``loglik``
    and the optimiser's message.  With ``lme4_start`` the objective is lme4's own
    (IRLS from glmer's start, stopped at its tolerance), whose maximiser is what
    glmer reports; without it, the exact Laplace approximation.

    L-BFGS-B (finite differences), then a Nelder-Mead polish with a bounded
    number of evaluations (:data:`POLISH_EVALUATIONS` per parameter), both with
    beta in the scaled coordinates of :func:`beta_scale`.
    """
    p = len(design.fixed_terms)
    t = theta_size(design)
    lower: list[float] = []
    for block in design.blocks:
        k = block.n_terms
        cols, rows = np.triu_indices(k)
        lower.extend(0.0 if r == c else -np.inf for r, c in zip(rows, cols, strict=True))
    theta_start = np.ones(t) if theta0 is None else np.asarray(theta0, dtype=float)
    if beta0 is None:
        centre, _ = design.family.prior_centre_scale(design.y, design.trials)
        beta_start = np.zeros(p)
        if "(Intercept)" in design.fixed_terms:
            beta_start[design.fixed_terms.index("(Intercept)")] = centre
    else:
        beta_start = np.asarray(beta0, dtype=float)
    state: dict[str, Any] = {"u": None, "calls": 0, "best": np.inf}
    Z = design.Z()
    R = beta_scale(design, theta_start, beta_start)

    def beta_of(z: np.ndarray) -> np.ndarray:
        return beta_start + np.linalg.solve(R, z)

    started = last = time.perf_counter()

    def negative(params: np.ndarray) -> float:
        nonlocal last
        beta = beta_of(params[t:])
        if lme4_start is not None:
            result = laplace_loglik(
                design,
                params[:t],
                beta,
                n_agq=n_agq,
                lme4_start=lme4_start,
                lme4_tol=lme4_tol,
                Z=Z,
            )
        else:
            result = laplace_loglik(
                design, params[:t], beta, n_agq=n_agq, tol=1e-10, u_start=state["u"], Z=Z
            )
            state["u"] = result.u
        state["calls"] += 1
        state["best"] = min(state["best"], -result.loglik)
        now = time.perf_counter()
        if now - last > PROGRESS_SECONDS:
            log.info(
                "maximising the %s likelihood over %d parameters: %d evaluations, best "
                "log-likelihood %.6f (%.0f s)",
                "Laplace" if n_agq <= 1 else f"{n_agq}-point quadrature",
                t + p,
                state["calls"],
                -state["best"],
                now - started,
            )
            last = now
        return -result.loglik

    bounds = [(lo if np.isfinite(lo) else None, None) for lo in lower] + [(None, None)] * p
    start = np.concatenate([theta_start, np.zeros(p)])
    with one_blas_thread():
        best = optimize.minimize(
            negative,
            start,
            method="L-BFGS-B",
            bounds=bounds,
            options={"ftol": 1e-14, "gtol": 1e-9, "maxiter": 2000},
        )
        # A derivative-free polish: L-BFGS-B's finite differences stop short of 1e-6 in beta.
        best = optimize.minimize(
            negative,
            best.x,
            method="Nelder-Mead",
            options={
                "xatol": POLISH_XATOL,
                "fatol": POLISH_FATOL,
                "maxfev": POLISH_EVALUATIONS * (t + p),
                "adaptive": True,
            },
        )
    if not best.success:
        log.info(
            "maximising the Laplace likelihood: the polish stopped after %d evaluations "
            "(its budget) at %.8f",
            best.nfev,
            -float(best.fun),
        )
    theta = np.array(best.x[:t])
    for i, lo in enumerate(lower):
        if lo == 0.0:
            theta[i] = abs(theta[i])  # the likelihood is even in a scalar block's diagonal
    return {
        "theta": theta,
        "beta": pd.Series(beta_of(best.x[t:]), index=design.fixed_terms),
        "loglik": -float(best.fun),
        "message": str(best.message),
    }
