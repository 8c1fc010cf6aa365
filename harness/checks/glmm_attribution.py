"""A GLMM's gaps in two named pieces: glmer's Laplace approximation and the posterior summary.

glmer (``nAGQ = 1``) maximises the Laplace approximation of the marginal
likelihood; PyMC samples the exact posterior.  Where the approximation is
poor (binary data, few observations per group) glmer's estimates sit away
from the exact maximum-likelihood estimates, and a posterior under a wide
prior centres near the latter.  Two sources of a row's gap are measured
here (:mod:`harness.checks.attribution` adds them up with the others):

``laplace``
    the exact ML estimate minus glmer's (the row's own units).  The exact
    marginal likelihood is computed by 25-point adaptive Gauss-Hermite
    quadrature when the design has one scalar random-effects term (one block,
    one term: each group's integral is one-dimensional), and otherwise by
    importance sampling of the random effects: a multivariate Student-t
    proposal (4 degrees of freedom) centred at the conditional modes with the
    Laplace curvature as its scale, one integral per group level when there is
    one grouping factor (the groups are independent), one joint integral
    otherwise.  The proposal's draws are fixed (common random numbers), so
    the estimate is a smooth function of the parameters and can be
    maximised.
``summary`` (fixed effects)
    integrating over the variance components, as for a Gaussian model: under
    a flat prior on ``beta`` the conditional posterior of ``beta`` given the
    covariance parameters ``theta`` has its mode at ``beta_hat(theta)``, the
    maximiser of the exact likelihood at ``theta``; the posterior mean is
    ``E_theta[E[beta | theta, y]]``.  The share is the wide-prior-weighted
    mean of ``beta_hat(theta)`` over the posterior draws of ``theta`` minus
    ``beta_hat`` at the exact ML ``theta`` (the exact ML ``beta``).  For a
    scalar ``theta`` ``beta_hat`` is computed on a grid of
    :data:`THETA_GRID` points spanning the draws and interpolated (cubic
    spline); otherwise at :data:`SUMMARY_DRAWS` evenly spaced draws, each
    solve starting from the nearest one solved.  ``beta_hat(theta)`` is found
    by L-BFGS-B with the fixed effects scaled by their Laplace information
    (:func:`harness.checks.laplace.beta_scale`) and, for the importance
    sampler with one grouping factor, the estimate's exact gradient in beta
    (:meth:`ImportanceLikelihood.value_and_beta_gradient`).  What is
    left (``E[beta | theta, y] - beta_hat(theta)``: the skew of the
    conditional posterior, O(1/n)) stays in the remainder, which therefore
    also catches draws that do not come from the model's posterior.

Variance components keep the mode-based summary of
:func:`harness.checks.attribution.attribute_row`; for a GLMM the joint mode
is taken with the fixed effects and other components that move with the
component held at their exact ML values (glmer's and the exact ML estimates
are joint modes over ``beta`` and ``theta``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import optimize, special
from scipy.sparse import csgraph

from harness.checks.laplace import (
    _pirls,
    beta_scale,
    lambda_matrix,
    one_blas_thread,
    theta_size,
)
from harness.model.spec import Design

if TYPE_CHECKING:
    from harness.checks.attribution import WidePrior
    from harness.fits import BayesFit

log = logging.getLogger("harness")

#: The name of the source this module measures, as rows carry it in ``attribution``.
LAPLACE_SOURCE = "laplace"

__all__ = [
    "LAPLACE_SOURCE",
    "ExactML",
    "GlmmAttribution",
    "ImportanceLikelihood",
    "ScalarQuadrature",
    "components_from_theta",
    "exact_ml",
    "glmm_attribution",
    "integrate_theta",
]

#: Quadrature points of the exact likelihood for one scalar random-effects term.
AGQ_POINTS = 25
#: Importance-sampling draws (per group level when the levels are independent) and the
#: Student-t proposal's degrees of freedom (heavier tails than the target's, so the weights
#: have a finite variance).
IS_DRAWS = 1000
IS_DF = 4.0
IS_SEED = 20240520
#: Below this effective sample size of the weights (per integral, the worst one) the
#: importance-sampled likelihood is not trusted and no Laplace share is given.
IS_MIN_ESS = 100.0
#: When the weights' ESS at glmer's estimates falls short, the draws grow (the ESS of
#: importance weights grows in proportion to the draws) up to this many per integral.
IS_MAX_DRAWS = 16000
#: Random effects above which the dense curvature matrix is too large to factor per evaluation.
MAX_RANDOM_EFFECTS = 3000
#: Grid points of beta_hat(theta) for a scalar theta (15 agree with 25 to 1e-5 on a simulated
#: binary design); draws for a vector theta (each costs an optimisation of sampled likelihoods).
THETA_GRID = 15
SUMMARY_DRAWS = 20
#: A step that may run longer than this many seconds says every so often that it is working.
PROGRESS_SECONDS = 30.0
#: Relative step of the finite-difference Hessian in beta.
HESSIAN_STEP = 1e-3
#: Weighted quantiles of theta that the grid spans (draws beyond are clamped to its ends).
GRID_QUANTILES = (0.0005, 0.9995)


# --------------------------------------------------------------------------- exact likelihood


class ImportanceLikelihood:
    """The marginal log-likelihood of a GLMM at (theta, beta) by importance sampling.

    With spherical random effects ``u ~ N(0, I)``, ``b = Lambda(theta) u``,
    the integrand ``g(u) = prod_i p(y_i | u) phi(u)`` is sampled from a
    multivariate t (``IS_DF`` degrees of freedom) centred at the conditional
    mode ``u_hat`` with scale ``H^-1``, ``H = M' W M + I`` the Laplace
    curvature.  With one grouping factor the integral factorises over the
    levels and each level gets its own ``n_draws`` draws; otherwise one joint
    integral over all random effects.  The standard draws are fixed at
    construction (common random numbers).

    Parameters
    ----------
    design : Design
        A non-gaussian design.
    n_draws : int
    seed : int
    """

    def __init__(self, design: Design, n_draws: int = IS_DRAWS, seed: int = IS_SEED) -> None:
        self.design = design
        self.Z = design.Z().tocsc()
        q = self.Z.shape[1]
        if q > MAX_RANDOM_EFFECTS:
            raise ValueError(f"{q} random effects: too many for the dense importance sampler")
        rng = np.random.default_rng(seed)
        self.components: list[np.ndarray] = []
        if len(design.blocks) == 1:
            block = design.blocks[0]
            self.k, self.n_groups = block.n_terms, block.n_levels
            self.row_group = np.asarray(block.group_index, dtype=int)
        else:
            self.k, self.n_groups = q, 1
            self.row_group = np.zeros(design.n, dtype=int)
            count, col_component = csgraph.connected_components(
                (abs(self.Z).T @ abs(self.Z)).tocsr(), directed=False
            )
            if count > 1:
                # Nested factors: random effects that share no row are independent given
                # (theta, beta), so the integral factorises over the connected components of
                # Z'Z (a top-level group with everything nested in it), each a small integral.
                self.components = [np.flatnonzero(col_component == c) for c in range(count)]
                self.column_component = sp.csr_matrix(
                    (np.ones(q), (np.arange(q), col_component)), shape=(q, count)
                )
                first_col = np.asarray(abs(self.Z).argmax(axis=1)).ravel()
                self.row_group = col_component[first_col].astype(int)
                self.n_groups = count
        self.n_draws = n_draws
        self.indicator = sp.csr_matrix(
            (np.ones(design.n), (np.arange(design.n), self.row_group)),
            shape=(design.n, self.n_groups),
        )
        self.last_ess = float("nan")
        self._u: np.ndarray | None = None
        if self.components:
            self._component_draws(rng)
            return
        # Standard t draws z = e / sqrt(chi2 / nu), one chi2 per (draw, integral).
        e = rng.standard_normal((n_draws, self.n_groups, self.k))
        chi = rng.chisquare(IS_DF, size=(n_draws, self.n_groups))
        self.z = e / np.sqrt(chi / IS_DF)[:, :, None]
        nu, k = IS_DF, self.k
        log_t = (
            special.gammaln((nu + k) / 2)
            - special.gammaln(nu / 2)
            - 0.5 * k * np.log(nu * np.pi)
            - 0.5 * (nu + k) * np.log1p(np.sum(self.z**2, axis=2) / nu)
        )
        # log g(u) - log q(u) = loglik - |u|^2/2 - k/2 log 2pi - log t(z) + log det C_g
        self.constant = -0.5 * k * np.log(2 * np.pi) - log_t  # (n_draws, n_groups)

    def _component_draws(self, rng: np.random.Generator) -> None:
        """Standard t draws per component (its own dimension) and their log densities."""
        nu = IS_DF
        self.component_z: list[np.ndarray] = []
        constant = np.zeros((self.n_draws, self.n_groups))
        for c, cols in enumerate(self.components):
            d = cols.size
            e = rng.standard_normal((self.n_draws, d))
            chi = rng.chisquare(nu, size=self.n_draws)
            z = e / np.sqrt(chi / nu)[:, None]
            log_t = (
                special.gammaln((nu + d) / 2)
                - special.gammaln(nu / 2)
                - 0.5 * d * np.log(nu * np.pi)
                - 0.5 * (nu + d) * np.log1p(np.sum(z**2, axis=1) / nu)
            )
            self.component_z.append(z)
            constant[:, c] = -0.5 * d * np.log(2 * np.pi) - log_t
        self.constant = constant

    def _component_proposal(
        self, M: sp.csc_matrix, fixed_eta: np.ndarray, u0: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Draws' ``M u`` and log weights less the data's, one integral per component."""
        design = self.design
        family = design.family
        u_hat, _ = _pirls(design, M, fixed_eta, u0, 1e-10, 200)
        self._u = u_hat
        weight = family.newton_weights(design.y, fixed_eta + M @ u_hat, design.trials)
        H = (M.T @ sp.diags(weight) @ M + sp.identity(M.shape[1], format="csc")).tocsc()
        draws = np.repeat(u_hat[None, :], self.n_draws, axis=0)
        log_det_c = np.zeros(self.n_groups)
        for c, cols in enumerate(self.components):
            C = np.linalg.cholesky(H[cols][:, cols].toarray())
            log_det_c[c] = np.sum(np.log(np.diag(C)))
            # u = u_hat + C^-T z: solve C' x = z for every draw at once.
            draws[:, cols] += np.linalg.solve(C.T, self.component_z[c].T).T
        squares = np.asarray(self.column_component.T @ (draws**2).T).T  # (K, components)
        return (M @ draws.T).T, -0.5 * squares + self.constant - log_det_c[None, :]

    def _curvature(self, M: sp.csc_matrix, fixed_eta: np.ndarray, u: np.ndarray) -> np.ndarray:
        """``H = M' W M + I`` at ``u``, as its diagonal blocks (one per integral): (g, k, k)."""
        design, g, k = self.design, self.n_groups, self.k
        weight = design.family.newton_weights(design.y, fixed_eta + M @ u, design.trials)
        if g == 1:
            return ((M.T @ M.multiply(weight[:, None])).toarray() + np.eye(k))[None]
        # Row i touches only its level's k columns: W-weighted outer products summed per level.
        rows = self._row_columns(M)  # (n, k)
        outer = weight[:, None, None] * rows[:, :, None] * rows[:, None, :]
        H = np.zeros((g, k, k))
        np.add.at(H, self.row_group, outer)
        return H + np.eye(k)[None]

    def _row_columns(self, M: sp.csc_matrix) -> np.ndarray:
        """Each row's entries of ``M`` in its own level's k columns (one grouping factor)."""
        k = self.k
        dense = np.zeros((self.design.n, k))
        coo = M.tocoo()
        dense[coo.row, coo.col - k * self.row_group[coo.row]] = coo.data
        return dense

    def _modes_by_level(
        self, M: sp.csc_matrix, fixed_eta: np.ndarray, u0: np.ndarray
    ) -> np.ndarray:
        """Conditional modes level by level: batched k x k Newton (Fisher scoring) steps.

        With one grouping factor the penalised IRLS problem separates by level;
        small batched solves avoid factoring the whole (q x q) matrix each step.
        """
        design, g, k = self.design, self.n_groups, self.k
        family = design.family
        rows = self._row_columns(M)

        def objective(u: np.ndarray) -> np.ndarray:
            eta = fixed_eta + np.sum(rows * u.reshape(g, k)[self.row_group], axis=1)
            pointwise = family.loglik(design.y, family.link.inverse(eta), design.trials)
            per = np.bincount(self.row_group, weights=pointwise, minlength=g)
            return per - 0.5 * np.sum(u.reshape(g, k) ** 2, axis=1)

        u = u0.copy()
        current = objective(u)
        for _ in range(100):
            eta = fixed_eta + M @ u
            score, _ = family.score_weights(design.y, eta, design.trials)
            gradient = np.zeros((g, k))
            np.add.at(gradient, self.row_group, score[:, None] * rows)
            gradient -= u.reshape(g, k)
            H = self._curvature(M, fixed_eta, u)
            step = np.linalg.solve(H, gradient[..., None])[..., 0].ravel()
            scale = np.ones(g)
            for _ in range(30):  # step halving, level by level
                candidate = u + np.repeat(scale, k) * step
                value = objective(candidate)
                worse = value < current - 1e-12 * np.abs(current)
                if not worse.any():
                    break
                scale = np.where(worse, scale / 2, scale)
            u, current = candidate, value
            if np.max(np.abs(np.repeat(scale, k) * step)) < 1e-10:
                break
        return u

    def _proposal(
        self, theta: np.ndarray, beta: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The proposal centred at the conditional modes at (theta, beta).

        Returns the fixed part of the linear predictor (n,), each draw's random
        part ``M u`` (K, n) and each draw's log weight less the data's log
        density, ``-|u|^2 / 2 - log q(u)`` per integral (K, g).
        """
        M = (self.Z @ lambda_matrix(self.design, theta)).tocsc()
        fixed_eta = self._fixed_eta(beta)
        u0 = np.zeros(M.shape[1]) if self._u is None else self._u
        if self.components:
            return (fixed_eta, *self._component_proposal(M, fixed_eta, u0))
        if self.n_groups > 1:
            level = self._level_proposal(M, fixed_eta, u0)
            return fixed_eta, level.random_eta, level.base
        u_hat, _ = _pirls(self.design, M, fixed_eta, u0, 1e-10, 200)
        self._u = u_hat
        return (fixed_eta, *self._draws(M, fixed_eta, u_hat)[-2:])

    def _draws(
        self, M: sp.csc_matrix, fixed_eta: np.ndarray, u_hat: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Draws around ``u_hat``: (H, C, u, M u, base) with C C' = H per integral."""
        g, k = self.n_groups, self.k
        H = self._curvature(M, fixed_eta, u_hat)
        # Per integral: C C' = H_g, u = u_hat + C^-T z (H is block diagonal over the levels of
        # a single grouping factor, so each level's block is its own integral).
        C = np.linalg.cholesky(H)  # (g, k, k)
        log_det_c = np.sum(np.log(np.diagonal(C, axis1=1, axis2=2)), axis=1)  # (g,)
        # C^-T z for every draw and group: one small inverse per group, then one product.
        inv_ct = np.linalg.inv(np.swapaxes(C, 1, 2))  # (g, k, k)
        shift = np.einsum("gab,ngb->nga", inv_ct, self.z)  # (K, g, k)
        u = u_hat.reshape(g, k)[None] + shift
        random_eta = (M @ u.reshape(self.n_draws, g * k).T).T
        base = -0.5 * np.sum(u**2, axis=2) + self.constant - log_det_c[None, :]
        return H, C, u, random_eta, base

    def _level_proposal(
        self, M: sp.csc_matrix, fixed_eta: np.ndarray, u0: np.ndarray
    ) -> _LevelProposal:
        u_hat = self._modes_by_level(M, fixed_eta, u0)
        self._u = u_hat
        H, C, u, random_eta, base = self._draws(M, fixed_eta, u_hat)
        return _LevelProposal(u_hat, H, C, u, random_eta, base)

    def _fixed_eta(self, beta: np.ndarray) -> np.ndarray:
        design = self.design
        fixed_eta = design.X.to_numpy(dtype=float) @ np.asarray(beta, dtype=float)
        if design.offset is not None:
            fixed_eta = fixed_eta + design.offset
        return fixed_eta

    def _estimate(
        self, fixed_eta: np.ndarray, random_eta: np.ndarray, base: np.ndarray
    ) -> tuple[float, np.ndarray, np.ndarray]:
        """sum over integrals of log mean_k w_k; the normalised weights (K, g) and the etas."""
        design = self.design
        family = design.family
        etas = fixed_eta[None, :] + random_eta
        pointwise = family.loglik(design.y, family.link.inverse(etas), design.trials)
        log_w = np.asarray(self.indicator.T @ pointwise.T).T + base  # (K, g)
        top = log_w.max(axis=0)
        with np.errstate(invalid="ignore"):  # every draw underflows: nan, read as no value
            w = np.exp(log_w - top)
        total = w.sum(axis=0)
        self.last_ess = float(np.min(total**2 / np.sum(w**2, axis=0)))
        return float(np.sum(top + np.log(total / w.shape[0]))), w / total, etas

    def __call__(self, theta: np.ndarray, beta: np.ndarray) -> float:
        """The log-likelihood at (theta, beta); ``last_ess`` the smallest weights' ESS."""
        return self._estimate(*self._proposal(theta, beta))[0]

    @property
    def has_beta_gradient(self) -> bool:
        """Whether :meth:`value_and_beta_gradient` applies (one grouping factor, several levels)."""
        return not self.components and self.n_groups > 1

    def value_and_beta_gradient(
        self, theta: np.ndarray, beta: np.ndarray
    ) -> tuple[float, np.ndarray]:
        """The estimate of :meth:`__call__` at (theta, beta) and its exact gradient in beta.

        The estimate is ``sum_g log mean_k w_gk`` with ``w = g(u) / q(u)`` at
        ``u_k = u_hat + C^-T z_k``: the standard draws ``z_k`` are fixed, while
        the proposal's centre ``u_hat(beta)`` and scale ``C(beta)`` (``C C' = H``,
        the Fisher curvature at the modes) move with beta.  Its gradient is the
        normalised-weight average of ``d log w_k / d beta``::

            X' s_k + r_k' (du_hat/dbeta + dC^-T/dbeta z_k) - tr(H^-1 dH/dbeta) / 2,

        ``s_k`` the data's score at draw k's linear predictor and ``r_k`` the
        gradient of ``log g`` in u there; ``du_hat/dbeta`` by implicit
        differentiation of the mode equation, ``dC`` by the Cholesky factor's
        derivative.  The families' score and weight are differentiated in eta
        pointwise by central differences (scalar functions: accurate to about
        1e-9), which is all this needs of them.  One grouping factor only
        (:attr:`has_beta_gradient`).
        """
        if not self.has_beta_gradient:
            raise ValueError("the beta gradient needs one grouping factor with several levels")
        design, family = self.design, self.design.family
        X = design.X.to_numpy(dtype=float)
        g, k, p = self.n_groups, self.k, X.shape[1]
        M = (self.Z @ lambda_matrix(design, theta)).tocsc()
        fixed_eta = self._fixed_eta(beta)
        u0 = np.zeros(M.shape[1]) if self._u is None else self._u
        level = self._level_proposal(M, fixed_eta, u0)
        value, wn, etas = self._estimate(fixed_eta, level.random_eta, level.base)
        rows = self._row_columns(M)  # (n, k): row i's entries in its level's columns
        per_level = self.indicator.T  # (g, n): sums rows by level

        # Every draw's score; r_k = M_g' s_k - u_k, and the weighted sums the chain rule needs.
        score, _ = family.score_weights(design.y, etas, design.trials)  # (K, n)
        gradient = X.T @ np.sum(wn[:, self.row_group] * score, axis=0)
        r = np.stack([np.asarray(per_level @ (score * rows[:, a]).T).T for a in range(k)], 2)
        r -= level.u  # (K, g, k)
        rho = np.einsum("ng,nga->ga", wn, r)
        P = np.einsum("ng,nga,ngb->gab", wn, r, self.z)

        # d u_hat / d beta from M' s(eta_hat) - u_hat = 0 (observed weights), then d H.
        eta_hat = fixed_eta + M @ level.u_hat
        step = 1e-5 * (1.0 + np.abs(eta_hat))
        s_up, w_up = family.score_weights(design.y, eta_hat + step, design.trials)
        s_down, w_down = family.score_weights(design.y, eta_hat - step, design.trials)
        observed = -(s_up - s_down) / (2 * step)
        w_slope = (w_up - w_down) / (2 * step)
        outer = rows[:, :, None] * rows[:, None, :]  # (n, k, k)
        H_obs = np.asarray(per_level @ (observed[:, None, None] * outer).reshape(-1, k * k))
        H_obs = H_obs.reshape(g, k, k) + np.eye(k)[None]
        B = np.asarray(
            per_level
            @ (observed[:, None, None] * rows[:, :, None] * X[:, None, :]).reshape(-1, k * p)
        )
        D = -np.linalg.solve(H_obs, B.reshape(g, k, p))  # (g, k, p)
        E = X + np.einsum("na,nap->np", rows, D[self.row_group])  # d eta_hat / d beta
        dH = np.asarray(
            per_level
            @ ((w_slope[:, None] * E)[:, :, None, None] * outer[:, None]).reshape(-1, p * k * k)
        ).reshape(g, p, k, k)

        gradient += np.einsum("ga,gap->p", rho, D)
        gradient -= 0.5 * np.einsum("gab,gpba->p", np.linalg.inv(level.H), dH)
        # dC = C Phi(C^-1 dH C^-T) (Phi: lower triangle, diagonal halved); d C^-T = -A dC' A.
        C = level.C
        C_inv = np.linalg.inv(C)
        inner = C_inv[:, None] @ dH @ np.swapaxes(C_inv, 1, 2)[:, None]  # (g, p, k, k)
        dC = C[:, None] @ (inner * (np.tril(np.ones((k, k))) - 0.5 * np.eye(k)))
        A = np.swapaxes(C_inv, 1, 2)[:, None]  # C^-T
        dA = -A @ np.swapaxes(dC, 2, 3) @ A
        gradient += np.einsum("gpab,gab->p", dA, P)
        return value, gradient


@dataclass
class _LevelProposal:
    """The proposal of one grouping factor's levels at (theta, beta), with what the gradient
    needs: modes, Fisher curvature blocks H (g, k, k), their Cholesky factors, the draws u."""

    u_hat: np.ndarray
    H: np.ndarray
    C: np.ndarray
    u: np.ndarray
    random_eta: np.ndarray
    base: np.ndarray


class ScalarQuadrature:
    """The exact log-likelihood of a design with one scalar random-effects term, by AGQ.

    The same value as :func:`harness.checks.laplace.laplace_loglik` with
    ``n_agq = AGQ_POINTS`` (a test holds them together), with the conditional
    modes found group by group: with one scalar term each group's mode is a
    one-dimensional Newton (Fisher scoring) problem, solved for all groups at
    once, where the general penalised IRLS factors a dense matrix per step.
    The optimisers call this hundreds of times.
    """

    def __init__(self, design: Design, n_agq: int = AGQ_POINTS) -> None:
        block = design.blocks[0]
        self.design, self.n_agq = design, n_agq
        self.group = np.asarray(block.group_index, dtype=int)
        self.n_groups = block.n_levels
        self.z = np.asarray(design.Z().sum(axis=1)).ravel()  # each row's one entry of Z
        self.X = design.X.to_numpy(dtype=float)
        self._u = np.zeros(self.n_groups)

    def _objective(self, fixed_eta: np.ndarray, m: np.ndarray, u: np.ndarray) -> np.ndarray:
        family, design = self.design.family, self.design
        eta = fixed_eta + m * u[self.group]
        pointwise = family.loglik(design.y, family.link.inverse(eta), design.trials)
        return np.bincount(self.group, weights=pointwise, minlength=self.n_groups) - 0.5 * u**2

    def __call__(self, theta: np.ndarray, beta: np.ndarray) -> float:
        from harness.checks.laplace import _agq

        design, family = self.design, self.design.family
        m = self.z * float(np.asarray(theta, dtype=float).ravel()[0])
        fixed_eta = self.X @ np.asarray(beta, dtype=float)
        if design.offset is not None:
            fixed_eta = fixed_eta + design.offset
        u = self._u.copy()
        current = self._objective(fixed_eta, m, u)
        for _ in range(100):
            eta = fixed_eta + m * u[self.group]
            score, _ = family.score_weights(design.y, eta, design.trials)
            weight = family.newton_weights(design.y, eta, design.trials)
            gradient = np.bincount(self.group, weights=m * score, minlength=self.n_groups) - u
            h = np.bincount(self.group, weights=m**2 * weight, minlength=self.n_groups) + 1.0
            step = gradient / h
            scale = np.ones(self.n_groups)
            for _ in range(30):  # step halving, group by group
                candidate = u + scale * step
                value = self._objective(fixed_eta, m, candidate)
                worse = value < current - 1e-12 * np.abs(current)
                if not worse.any():
                    break
                scale = np.where(worse, scale / 2, scale)
            u, current = candidate, value
            if np.max(np.abs(scale * step)) < 1e-10:
                break
        self._u = u
        weight = family.newton_weights(design.y, fixed_eta + m * u[self.group], design.trials)
        h = np.bincount(self.group, weights=m**2 * weight, minlength=self.n_groups) + 1.0
        M = sp.csc_matrix((m, (np.arange(design.n), self.group)), shape=(design.n, self.n_groups))
        return _agq(design, M, fixed_eta, u, h, self.n_agq)


def _lower_bounds(design: Design) -> list[float]:
    lower: list[float] = []
    for block in design.blocks:
        cols, rows = np.triu_indices(block.n_terms)
        lower.extend(0.0 if r == c else -np.inf for r, c in zip(rows, cols, strict=True))
    return lower


def _maximise(
    loglik: Callable[[np.ndarray, np.ndarray], float],
    design: Design,
    theta0: np.ndarray,
    beta0: np.ndarray,
    *,
    polish: bool = True,
) -> tuple[np.ndarray, np.ndarray, float]:
    """L-BFGS-B, then a Nelder-Mead polish, over (theta, beta); diagonals of theta >= 0.

    beta moves in the scaled coordinates of :func:`beta_scale`.  The polish
    (finite differences leave L-BFGS-B about 1e-5 short) costs a few hundred
    evaluations; without it the importance-sampled likelihood, whose
    evaluations are a hundred times dearer than quadrature's, stays affordable.
    """
    t = theta0.size
    lower = _lower_bounds(design)
    R = beta_scale(design, theta0, beta0)

    def beta_of(z: np.ndarray) -> np.ndarray:
        return beta0 + np.linalg.solve(R, z)

    calls, best_value = 0, -np.inf
    started = last = time.perf_counter()

    def negative(params: np.ndarray) -> float:
        nonlocal calls, best_value, last
        value = loglik(params[:t], beta_of(params[t:]))
        calls += 1
        best_value = max(best_value, value) if np.isfinite(value) else best_value
        now = time.perf_counter()
        if now - last > PROGRESS_SECONDS:
            log.info(
                "exact marginal likelihood: %d evaluations, best %.6f (%.0f s)",
                calls,
                best_value,
                now - started,
            )
            last = now
        return -value if np.isfinite(value) else 1e300

    bounds = [(lo if np.isfinite(lo) else None, None) for lo in lower] + [(None, None)] * len(beta0)
    start = np.concatenate([theta0, np.zeros(len(beta0))])
    best = optimize.minimize(
        negative, start, method="L-BFGS-B", bounds=bounds, options={"ftol": 1e-13, "gtol": 1e-8}
    )
    if polish:
        best = optimize.minimize(
            negative,
            best.x,
            method="Nelder-Mead",
            options={"xatol": 1e-8, "fatol": 1e-11, "maxiter": 20000, "adaptive": True},
        )
    theta = np.array(best.x[:t])
    if polish:
        for i, lo in enumerate(lower):
            if lo == 0.0:
                theta[i] = abs(theta[i])  # the likelihood is even in a diagonal entry's sign
    return theta, beta_of(best.x[t:]), -float(best.fun)


def conditional_beta(
    loglik: Callable[[np.ndarray, np.ndarray], float],
    theta: np.ndarray,
    beta0: np.ndarray,
    scale: np.ndarray | None = None,
) -> np.ndarray:
    """``beta_hat(theta)``: the maximiser of the exact likelihood over beta at fixed theta.

    L-BFGS-B in the coordinates ``z = scale (beta - beta0)`` (``scale`` from
    :func:`beta_scale`, computed here when not given); with the importance
    sampler's exact gradient where it has one
    (:meth:`ImportanceLikelihood.value_and_beta_gradient`: one evaluation per
    step instead of one plus one per fixed effect), else finite differences.
    """
    beta0 = np.asarray(beta0, dtype=float)
    if scale is None:
        design = getattr(loglik, "design", None)
        scale = np.eye(beta0.size) if design is None else beta_scale(design, theta, beta0)
    R = scale

    def beta_of(z: np.ndarray) -> np.ndarray:
        return beta0 + np.linalg.solve(R, z)

    options = {"ftol": 1e-12, "gtol": 1e-7, "maxiter": 500}
    start = np.zeros(beta0.size)
    if isinstance(loglik, ImportanceLikelihood) and loglik.has_beta_gradient:
        sampler = loglik

        def negative(z: np.ndarray) -> tuple[float, np.ndarray]:
            value, gradient = sampler.value_and_beta_gradient(theta, beta_of(z))
            if not np.isfinite(value):
                return 1e300, np.zeros_like(z)
            return -value, -np.linalg.solve(R.T, gradient)  # d/dz = R^-T d/dbeta

        best = optimize.minimize(negative, start, jac=True, method="L-BFGS-B", options=options)
        return beta_of(best.x)

    def negative_value(z: np.ndarray) -> float:
        value = loglik(theta, beta_of(z))
        return -value if np.isfinite(value) else 1e300

    best = optimize.minimize(negative_value, start, method="L-BFGS-B", options=options)
    return beta_of(best.x)


def beta_hessian(
    loglik: Callable[[np.ndarray, np.ndarray], float],
    theta: np.ndarray,
    beta: np.ndarray,
    step: float = HESSIAN_STEP,
) -> np.ndarray:
    """``-d2 loglik / d beta2`` at (theta, beta) by central differences."""
    p = beta.size
    h = step * np.maximum(1.0, np.abs(beta))
    f0 = loglik(theta, beta)
    H = np.empty((p, p))
    for i in range(p):
        ei = np.zeros(p)
        ei[i] = h[i]
        H[i, i] = -(loglik(theta, beta + ei) - 2 * f0 + loglik(theta, beta - ei)) / h[i] ** 2
        for j in range(i):
            ej = np.zeros(p)
            ej[j] = h[j]
            value = (
                loglik(theta, beta + ei + ej)
                - loglik(theta, beta + ei - ej)
                - loglik(theta, beta - ei + ej)
                + loglik(theta, beta - ei - ej)
            ) / (4 * h[i] * h[j])
            H[i, j] = H[j, i] = -value
    return H


# --------------------------------------------------------------------------- exact ML


@dataclass
class ExactML:
    """The maximum of the exact marginal likelihood and how it was computed."""

    method: str  # "agq" or "importance"
    description: str
    theta: np.ndarray
    beta: pd.Series
    loglik: float
    values: dict[str, float]  # variance components by lme4 name, from theta
    loglik_fn: Callable[[np.ndarray, np.ndarray], float] = field(repr=False)
    ess: float = float("nan")


def components_from_theta(design: Design, theta: np.ndarray) -> dict[str, float]:
    """SDs and correlations (lme4's component names) of a GLMM's ``theta``.

    Without a residual SD the block covariance is ``T T'`` with ``T`` lme4's
    relative factor filled from theta (column-major lower triangle).  Both
    orders of a correlation's terms are given, so callers need not know which
    one lme4 printed.
    """
    from harness.checks.laplace import _block_factor

    values: dict[str, float] = {}
    start = 0
    for block in design.blocks:
        k = block.n_terms
        m = k * (k + 1) // 2
        T = _block_factor(np.asarray(theta[start : start + m], dtype=float), k)
        start += m
        cov = T @ T.T
        sd = np.sqrt(np.diag(cov))
        for i, term in enumerate(block.terms):
            values[f"{block.label}: sd({term})"] = float(sd[i])
        for i in range(k):
            for j in range(i + 1, k):
                r = cov[i, j] / (sd[i] * sd[j]) if sd[i] > 0 and sd[j] > 0 else float("nan")
                a, b = block.terms[i], block.terms[j]
                values[f"{block.label}: cor({a},{b})"] = float(r)
                values[f"{block.label}: cor({b},{a})"] = float(r)
    return values


def exact_ml(freq: Any) -> ExactML | None:
    """Maximise the exact marginal likelihood, starting from glmer's estimates.

    Returns None for Gaussian models and when importance sampling is not
    trusted (weights' ESS below :data:`IS_MIN_ESS` at the optimum; logged).
    """
    with one_blas_thread():  # small dense solves, thousands of them
        return _exact_ml(freq)


def _exact_ml(freq: Any) -> ExactML | None:
    design: Design = freq.design
    if not design.family.laplace or not design.blocks:
        return None
    ml = freq.ml_estimates
    theta0 = np.array(list(ml["theta"].values()), dtype=float)
    beta0 = np.array([ml["beta"][t] for t in design.fixed_terms], dtype=float)
    if theta0.size != theta_size(design):
        return None
    scalar = len(design.blocks) == 1 and design.blocks[0].n_terms == 1
    ess = float("nan")
    loglik: Callable[[np.ndarray, np.ndarray], float]
    if scalar:
        loglik = ScalarQuadrature(design)
        method = "agq"
        description = f"{AGQ_POINTS}-point adaptive Gauss-Hermite quadrature"
    else:
        sampler = ImportanceLikelihood(design)
        loglik = sampler
        method = "importance"
        per = (
            f"per independent set of random effects ({sampler.n_groups} sets)"
            if sampler.components
            else "per group level"
            if sampler.n_groups > 1
            else "joint over all random effects"
        )
    if not scalar:
        # The weights degrade with the integral's dimension (one joint integral over every
        # random effect when factors cross): test them at glmer's estimates before
        # spending hundreds of evaluations on a maximum that could not be trusted.
        sampler = _enough_draws(design, sampler, theta0, beta0)
        loglik = sampler
        if not sampler.last_ess >= IS_MIN_ESS:
            log.warning(
                "importance-sampled likelihood at glmer's estimates: weights' ESS %.0f < %.0f "
                "with %d draws (%s); no Laplace share",
                sampler.last_ess,
                IS_MIN_ESS,
                sampler.n_draws,
                "one integral per level or nested set"
                if sampler.n_groups > 1
                else "one joint integral",
            )
            return None
    log.info(
        "exact marginal likelihood (%s): maximising over %d parameters from glmer's estimates",
        method,
        theta0.size + beta0.size,
    )
    theta, beta, value = _maximise(loglik, design, theta0, beta0, polish=scalar)
    if not scalar:
        grown = _enough_draws(design, sampler, theta, beta)
        if grown is not sampler:
            # Fewer draws than the optimum needs: maximise again (from there) with enough.
            sampler = loglik = grown
            theta, beta, value = _maximise(loglik, design, theta, beta, polish=False)
            loglik(theta, beta)
        ess = sampler.last_ess
        description = (
            f"importance sampling ({sampler.n_draws} t({IS_DF:g}) draws {per}, "
            "centred at the conditional modes)"
        )
        description += f"; least weights' ESS {ess:.0f}"
        if not ess >= IS_MIN_ESS:
            log.warning(
                "importance-sampled likelihood: weights' ESS %.0f < %.0f; no Laplace share",
                ess,
                IS_MIN_ESS,
            )
            return None
    return ExactML(
        method=method,
        description=description,
        theta=theta,
        beta=pd.Series(beta, index=design.fixed_terms),
        loglik=value,
        values=components_from_theta(design, theta),
        loglik_fn=loglik,
        ess=ess,
    )


def _enough_draws(
    design: Design, sampler: ImportanceLikelihood, theta: np.ndarray, beta: np.ndarray
) -> ImportanceLikelihood:
    """The importance sampler with draws enough for a weights' ESS of :data:`IS_MIN_ESS`.

    Evaluated at (theta, beta); when the least ESS falls short, the draws grow
    to what that ESS says is needed (ESS grows in proportion to the draws), with
    a quarter to spare, when that is at most :data:`IS_MAX_DRAWS`; the sampler returned has
    been evaluated at (theta, beta) and its ``last_ess`` says whether it is enough.
    """
    sampler(theta, beta)
    while not sampler.last_ess >= IS_MIN_ESS and sampler.n_draws < IS_MAX_DRAWS:
        ess = sampler.last_ess if np.isfinite(sampler.last_ess) else 0.0
        wanted = sampler.n_draws * 1.25 * IS_MIN_ESS / max(ess, 1.0)
        if wanted > IS_MAX_DRAWS:
            # A proposal this far from the integrand (a high-dimensional joint integral) is
            # not rescued by draws within reach: leave it to the caller to say so.
            break
        n_draws = int(min(IS_MAX_DRAWS, max(2 * sampler.n_draws, np.ceil(wanted / 100) * 100)))
        log.info(
            "importance-sampled likelihood: weights' ESS %.0f < %.0f with %d draws; %d draws",
            ess,
            IS_MIN_ESS,
            sampler.n_draws,
            n_draws,
        )
        sampler = ImportanceLikelihood(design, n_draws=n_draws)
        sampler(theta, beta)
    return sampler


# --------------------------------------------------------------------------- summary


def theta_draws(bayes: BayesFit) -> np.ndarray:
    """lme4's theta of every posterior draw (flattened, chain-major) of a GLMM."""
    from harness.checks.marginal import psd_cholesky
    from harness.names import corr_var, sd_var

    posterior = bayes.idata.posterior
    n = posterior.sizes["chain"] * posterior.sizes["draw"]
    pieces = []
    for block in bayes.design.blocks:
        k = block.n_terms
        sds = posterior[sd_var(block)].values.reshape(n, k)
        if k == 1:
            pieces.append(sds)
            continue
        cols, rows = np.triu_indices(k)
        if block.correlated and corr_var(block) in posterior:
            corr = posterior[corr_var(block)].values.reshape(n, k, k)
            cov = corr * sds[:, :, None] * sds[:, None, :]
            factors = np.stack([psd_cholesky(0.5 * (c + c.T)) for c in cov])
        else:
            factors = np.stack([np.diag(s) for s in sds])
        pieces.append(factors[:, rows, cols])
    return np.concatenate(pieces, axis=1)


@dataclass
class ThetaIntegration:
    """The fixed effects' share of integrating beta_hat(theta) over theta's posterior."""

    shares: dict[str, float]
    at_exact: dict[str, float]
    n_points: int
    how: str
    #: Scalar theta: the median of its wide-prior marginal posterior from the exact likelihood.
    theta_median: float | None = None
    grid: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    log_density: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))


def integrate_theta(exact: ExactML, bayes: BayesFit, wide: WidePrior) -> ThetaIntegration:
    """Wide-prior-weighted mean of ``beta_hat(theta)`` minus ``beta_hat(theta_exact)``.

    Parameters
    ----------
    exact : ExactML
        Its likelihood gives ``beta_hat``.
    bayes : BayesFit
    wide : WidePrior
        Weights on ``wide.source(bayes)``'s draws.

    Returns
    -------
    ThetaIntegration
    """
    with one_blas_thread():  # small dense solves, thousands of them
        return _integrate_theta(exact, bayes, wide)


def _integrate_theta(exact: ExactML, bayes: BayesFit, wide: WidePrior) -> ThetaIntegration:
    from scipy.interpolate import CubicSpline

    from harness.checks.attribution import weighted_quantile

    source = wide.source(bayes)
    thetas = theta_draws(source)
    weights = np.asarray(wide.weights, dtype=float)
    weights = weights / weights.sum()
    beta_exact = exact.beta.to_numpy(float)
    design = getattr(exact.loglik_fn, "design", None)
    scale = (
        beta_scale(design, exact.theta, beta_exact)
        if design is not None
        else np.eye(beta_exact.size)
    )
    at_exact = conditional_beta(exact.loglik_fn, exact.theta, beta_exact, scale)
    median: float | None = None
    grid = log_density = np.zeros(0)
    if thetas.shape[1] == 1:
        values = thetas[:, 0]
        lo, hi = (weighted_quantile(values, weights, q) for q in GRID_QUANTILES)
        grid = np.unique(np.linspace(max(lo, 0.0), hi, THETA_GRID))
        # From the exact optimum outwards, so each solve starts next to its answer.
        order = np.argsort(np.abs(grid - exact.theta[0]))
        solved: dict[int, np.ndarray] = {}
        for i in order:
            at = grid[i]
            nearest = min(solved, key=lambda j: abs(grid[j] - at), default=None)
            start = at_exact if nearest is None else solved[nearest]
            solved[i] = conditional_beta(exact.loglik_fn, np.array([at]), start, scale)
        betas = np.array([solved[i] for i in range(grid.size)])
        spline = CubicSpline(grid, betas, axis=0)
        at_draws = spline(np.clip(values, grid[0], grid[-1]))
        mean = weights @ at_draws
        n_points, how = grid.size, f"a {grid.size}-point grid of theta (cubic spline)"
        log_density = np.array(
            [
                log_marginal_theta(exact.loglik_fn, np.array([g]), b)
                for g, b in zip(grid, betas, strict=True)
            ]
        )
        median = marginal_median(grid, log_density)
    else:
        n = thetas.shape[0]
        index = np.unique(np.linspace(0, n - 1, min(SUMMARY_DRAWS, n)).round().astype(int))
        w = weights[index] / weights[index].sum()
        at_draws = _beta_at_draws(exact, thetas[index], at_exact, scale)
        mean = w @ at_draws
        n_points, how = index.size, f"{index.size} evenly spaced posterior draws"
    terms = list(exact.beta.index)
    return ThetaIntegration(
        shares={t: float(mean[j] - at_exact[j]) for j, t in enumerate(terms)},
        at_exact={t: float(at_exact[j]) for j, t in enumerate(terms)},
        n_points=n_points,
        how=how,
        theta_median=median,
        grid=grid,
        log_density=log_density,
    )


def _beta_at_draws(
    exact: ExactML, thetas: np.ndarray, at_exact: np.ndarray, scale: np.ndarray
) -> np.ndarray:
    """``beta_hat`` at each row of ``thetas``, nearest to the exact ML theta first.

    Each solve starts from the solved draw nearest in theta (the answers move
    smoothly with theta), and says every :data:`PROGRESS_SECONDS` how far it is.
    """
    order = np.argsort(np.linalg.norm(thetas - exact.theta[None, :], axis=1))
    solved: dict[int, np.ndarray] = {}
    started = last = time.perf_counter()
    log.info(
        "summary source: the exact-likelihood beta_hat(theta) at %d posterior draws of theta (%s)",
        len(thetas),
        exact.method,
    )
    for done, i in enumerate(order):
        nearest = min(
            solved, key=lambda j: float(np.linalg.norm(thetas[j] - thetas[i])), default=None
        )
        start = at_exact if nearest is None else solved[nearest]
        solved[int(i)] = conditional_beta(exact.loglik_fn, thetas[i], start, scale)
        now = time.perf_counter()
        if now - last > PROGRESS_SECONDS:
            log.info(
                "summary source: %d of %d draws of theta done (%.0f s)",
                done + 1,
                len(thetas),
                now - started,
            )
            last = now
    return np.array([solved[i] for i in range(len(thetas))])


def log_marginal_theta(
    loglik: Callable[[np.ndarray, np.ndarray], float], theta: np.ndarray, beta_hat: np.ndarray
) -> float:
    """``log p(theta | y)`` up to a constant under flat priors: beta integrated out by Laplace.

    ``log L(theta, beta_hat(theta)) - log det(-H_beta) / 2``; the random effects
    are integrated exactly (by ``loglik``), only the few fixed effects by Laplace.
    """
    H = beta_hessian(loglik, theta, beta_hat)
    sign, log_det = np.linalg.slogdet(H)
    if sign <= 0:
        return float("-inf")
    return float(loglik(theta, beta_hat) - 0.5 * log_det)


def marginal_median(grid: np.ndarray, log_density: np.ndarray, fine: int = 4001) -> float:
    """Median of a density known on a grid (cubic spline of its log, trapezoid rule)."""
    from scipy.interpolate import CubicSpline

    ok = np.isfinite(log_density)
    if ok.sum() < 4:
        return float("nan")
    xs = np.linspace(grid[ok][0], grid[ok][-1], fine)
    log_f = CubicSpline(grid[ok], log_density[ok])(xs)
    f = np.exp(log_f - log_f.max())
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (f[1:] + f[:-1]) * np.diff(xs))])
    return float(np.interp(0.5, cdf / cdf[-1], xs))


# --------------------------------------------------------------------------- both


@dataclass
class GlmmAttribution:
    """What a GLMM's rows add to their attribution: Laplace shares and the summary's."""

    exact: ExactML
    laplace: dict[str, float]  # row (fixed term or component) -> exact ML - glmer
    integration: ThetaIntegration | None
    notes: list[str] = field(default_factory=list)

    def laplace_text(self, row: str) -> str:
        value = self.exact.beta.get(row, self.exact.values.get(row, float("nan")))
        return f"exact ML by {self.exact.description}: {value:.4g}"

    def integration_text(self) -> str:
        how = self.integration.how if self.integration is not None else ""
        return (
            "the posterior mean averages the exact-likelihood estimate of beta at each value of "
            f"the variance components over their posterior ({how}); the exact ML estimate is it "
            "at the exact ML variance components"
        )

    def summary_at(self, component: str) -> float | None:
        """The computed wide-prior posterior median of a scalar theta's SD (else None)."""
        integration = self.integration
        if integration is None or integration.theta_median is None:
            return None
        names = [k for k in self.exact.values if ": sd(" in k]
        if names != [component]:
            return None
        return integration.theta_median

    def median_text(self) -> str:
        n = self.integration.n_points if self.integration is not None else 0
        return (
            f"exact likelihood on a {n}-point grid of the SD, the fixed effects integrated "
            "out by Laplace"
        )

    def fixed_values(self) -> dict[str, float]:
        return {str(k): float(v) for k, v in self.exact.beta.items()}


def glmm_attribution(freq: Any, bayes: BayesFit, wide: WidePrior) -> GlmmAttribution | None:
    """Laplace and summary shares for a GLMM's fixed-effect and variance rows.

    Returns None for Gaussian models or when the exact likelihood cannot be
    computed (logged); the rows then keep the sources without them.
    """
    design: Design = freq.design
    if not design.family.laplace:
        return None
    exact = exact_ml(freq)
    if exact is None:
        return None
    laplace: dict[str, float] = {}
    for record in freq.fixed.to_dict("records"):
        term = str(record["term"])
        if term in exact.beta.index:
            laplace[term] = float(exact.beta[term] - record["estimate"])
    for record in freq.variance.to_dict("records"):
        component = str(record["component"])
        value = exact.values.get(component)
        if value is not None and np.isfinite(value) and np.isfinite(record["estimate"]):
            laplace[component] = float(value - record["estimate"])
    notes = [
        f"exact marginal likelihood ({exact.description}): maximum {exact.loglik:.6g}; the "
        "'laplace' source of each row is that maximum's estimate minus glmer's"
    ]
    integration = None
    try:
        integration = integrate_theta(exact, bayes, wide)
    except (ValueError, np.linalg.LinAlgError, KeyError) as err:
        log.warning("integrating beta_hat(theta) over the posterior: %s", err)
        notes.append(f"the fixed effects' summary share could not be computed ({err})")
    return GlmmAttribution(exact=exact, laplace=laplace, integration=integration, notes=notes)
