"""The PyMC model's likelihood with the random effects integrated out.

The PyMC model (:func:`harness.engines.pymc.build_model`, offsets form) says

    y | u ~ Normal(X beta + Z u, R),   u_j = F_b z_j,   z_j ~ Normal(0, I)

for every block ``b`` and group ``j``, with ``R`` diagonal (``sigma^2``, or
``sigma_level^2`` per row when ``sigma_by`` is set) and ``F_b`` the block's
Cholesky factor (``diag(sd)`` for uncorrelated terms, the ``LKJCholeskyCov``
factor for correlated ones).  Integrating ``z`` out gives

    y ~ MvNormal(X beta, V),   V = Z Lambda Lambda' Z' + R,   Lambda = blockdiag(I_J (x) F_b).

``V`` is never formed.  With ``M = I + Lambda' Z' R^-1 Z Lambda`` the
determinant lemma gives ``log|V| = log|R| + log|M|`` and Woodbury gives
``V^-1 = R^-1 - R^-1 Z Lambda M^-1 Lambda' Z' R^-1``.  ``M >= I`` stays well
conditioned when an SD is zero (a singular fit), which is why lme4 uses the
same ``Lambda`` form.  The data enter only through sufficient statistics per
residual-SD level, so one evaluation costs ``O(groups x terms^2)`` whatever
the number of rows: when all blocks share one grouping factor, ``M`` is block
diagonal with one small ``K x K`` block per group and its Cholesky factor is
unrolled element-wise across groups; otherwise (crossed or nested factors)
``M`` is one ``q x q`` matrix: dense (a PyTensor graph) up to
:data:`SPARSE_THRESHOLD` columns, above it sparse, factorised with SciPy's
SuperLU under a fill-reducing ordering (the role CHOLMOD plays in lme4) and
evaluated in NumPy (:mod:`harness.checks.marginal_sparse`).

Everything is a PyTensor graph built from the same :class:`~harness.model.spec.Design`
the PyMC model reads, compiled once per design structure; PyTensor supplies the
gradient the optimiser (:meth:`MarginalLikelihood.maximise`) uses.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from harness.model.spec import Design, RandomBlock

log = logging.getLogger("harness")

LOG_2PI = math.log(2.0 * math.pi)

#: Largest number of random-effect columns per group for the unrolled, grouped form.
MAX_UNROLLED_TERMS = 6

#: A dense ``q x q`` system above this size is slow without an optimised BLAS.
DENSE_WARNING_SIZE = 2000

#: Above this many random-effect columns (crossed or nested factors), ``method="auto"``
#: factorises ``M`` sparsely instead of forming the dense ``q x q`` system.
SPARSE_THRESHOLD = 400

#: How :class:`MarginalLikelihood` may evaluate; "auto" picks with :func:`choose_method`.
METHODS = ("auto", "grouped", "dense", "sparse")

#: Compiled functions kept per design structure (shapes and blocks, not data values).
COMPILED_CACHE_SIZE = 16


def compile_mode() -> Any:
    """PyTensor mode for these small graphs: light rewrites, Python (NumPy) thunks.

    Compiling dominates the cost of a check: FAST_RUN's full rewrite pass and
    loading one cached C module per node take seconds, while the ~25
    evaluations an optimisation needs cost milliseconds in NumPy either way.
    """
    from pytensor.compile.mode import Mode

    return Mode(linker="py", optimizer="fast_compile")


def evaluation_mode() -> Any:
    """PyTensor mode for a log density evaluated a few times: FAST_RUN's rewrites, NumPy thunks.

    The rewrites keep FAST_RUN's numerically stable forms (``log1p``, ``softplus``, ...),
    which :func:`compile_mode`'s light pass skips; Python thunks skip the C compile of
    every node, which costs seconds for a handful of calls.  Unfused: a fused loop would
    run element by element in Python.
    """
    from pytensor.compile.mode import Mode

    return Mode(linker="py", optimizer="fast_run").excluding("fusion")


@dataclass
class MLEstimate:
    """The maximiser of the marginal likelihood, in the PyMC model's parameters.

    Attributes
    ----------
    beta : ndarray
        Fixed effects, in ``design.fixed_terms`` order.
    factors : list of ndarray
        One lower-triangular ``F_b`` per design block (formula order), with
        ``F_b F_b'`` the block's covariance matrix.
    sigma : ndarray
        Residual SD, one per ``design.sigma_levels`` (or a single one).
    loglik : float
        Maximised log-likelihood.
    converged : bool
    message : str
        The optimiser's own message.
    n_evaluations : int
    """

    beta: np.ndarray
    factors: list[np.ndarray]
    sigma: np.ndarray
    loglik: float
    converged: bool
    message: str
    n_evaluations: int
    gradient_norm: float = float("nan")


@dataclass
class _Statistics:
    """Sufficient statistics of the data, one slice per residual-SD level."""

    mode: str  # "grouped", "dense" or "sparse"
    n_groups: int  # J (1 in dense mode)
    n_columns: int  # K per group (q in dense mode)
    C: np.ndarray  # (L, J, K, K): sum of z z' per level and group
    E: np.ndarray  # (L, J, K, m): sum of z d' with d = [y - X beta0, X]
    D: np.ndarray  # (L, m, m): sum of d d'
    counts: np.ndarray  # (L,): rows per level
    beta0: np.ndarray  # OLS estimate the response was centred on (for precision)
    block_order: list[int] = field(default_factory=list)  # design blocks in column order
    C_sparse: list[Any] = field(default_factory=list)  # sparse mode: Z_l' Z_l per level (CSC)
    sparse_ordering: Any = None  # sparse mode: M's fill-reducing ordering, found once


@dataclass
class _Compiled:
    """Compiled functions for one design structure; the data live in shared variables."""

    data: dict[str, Any]
    function: Any = None
    owner: int = -1  # token of the MarginalLikelihood whose data the shared variables hold


_COMPILED: OrderedDict[tuple, _Compiled] = OrderedDict()
_TOKENS = itertools.count()


def _block_columns(block: RandomBlock) -> np.ndarray:
    return np.asarray(block.values, dtype=float).reshape(len(block.group_index), -1)


def choose_method(design: Design) -> str:
    """How to evaluate a design's marginal likelihood: "grouped", "dense" or "sparse".

    One grouping factor with few columns per group: "grouped" (``M`` is block
    diagonal).  Otherwise "dense" up to :data:`SPARSE_THRESHOLD` random-effect
    columns and "sparse" above, where a dense ``q x q`` system costs
    ``O(q^3)`` time and ``O(q^2)`` memory (InstEval's 4,100 columns: minutes).
    """
    factors = {b.factor for b in design.blocks}
    total_terms = sum(b.n_terms for b in design.blocks)
    if len(factors) == 1 and total_terms <= MAX_UNROLLED_TERMS:
        return "grouped"
    q = sum(b.n_levels * b.n_terms for b in design.blocks)
    return "sparse" if q > SPARSE_THRESHOLD else "dense"


def _statistics(design: Design, method: str = "auto") -> _Statistics:
    n, p = design.n, design.X.shape[1]
    X = design.X.to_numpy(dtype=float)
    y = np.asarray(design.y, dtype=float)
    beta0 = np.linalg.lstsq(X, y, rcond=None)[0] if p else np.zeros(0)
    # Centring on the OLS fit keeps y'y from swamping the quadratic form in floating point.
    d = np.column_stack([y - X @ beta0, X]) if p else y[:, None]
    level = design.sigma_index if design.sigma_index is not None else np.zeros(n, dtype=np.int64)
    n_levels = len(design.sigma_levels) if design.sigma_levels is not None else 1
    counts = np.bincount(level, minlength=n_levels).astype(float)
    D = np.stack([d[level == lv].T @ d[level == lv] for lv in range(n_levels)])

    factors = {b.factor for b in design.blocks}
    method = choose_method(design) if method == "auto" else method
    if method == "grouped" and len(factors) != 1:
        raise ValueError(
            f"method 'grouped' needs one grouping factor; formula {design.spec.formula!r} has "
            f"{sorted(factors)}"
        )
    if method == "grouped":
        group = design.blocks[0].group_index
        J = design.blocks[0].n_levels
        Zg = np.column_stack([_block_columns(b) for b in design.blocks])
        K = Zg.shape[1]
        C = np.zeros((n_levels, J, K, K))
        E = np.zeros((n_levels, J, K, d.shape[1]))
        np.add.at(C, (level, group), Zg[:, :, None] * Zg[:, None, :])
        np.add.at(E, (level, group), Zg[:, :, None] * d[:, None, :])
        return _Statistics("grouped", J, K, C, E, D, counts, beta0, list(range(len(design.blocks))))

    Z = design.Z()
    q = Z.shape[1]
    order = [design.blocks.index(b) for b in design.lme4_block_order()]
    if method == "sparse":
        C_sparse = []
        E = np.zeros((n_levels, 1, q, d.shape[1]))
        for lv in range(n_levels):
            rows = np.flatnonzero(level == lv)
            Zl = Z[rows]
            C_sparse.append((Zl.T @ Zl).tocsc())
            E[lv, 0] = Zl.T @ d[rows]
        C = np.zeros((n_levels, 1, 0, 0))
        return _Statistics("sparse", 1, q, C, E, D, counts, beta0, order, C_sparse)
    if q > DENSE_WARNING_SIZE:
        log.warning(
            "marginal likelihood: %d random-effect columns over %d grouping factors need a "
            "dense %d x %d system; evaluations will be slow",
            q,
            len(factors),
            q,
            q,
        )
    C = np.zeros((n_levels, 1, q, q))
    E = np.zeros((n_levels, 1, q, d.shape[1]))
    for lv in range(n_levels):
        rows = np.flatnonzero(level == lv)
        Zl = Z[rows]
        C[lv, 0] = (Zl.T @ Zl).toarray()
        E[lv, 0] = Zl.T @ d[rows]
    return _Statistics("dense", 1, q, C, E, D, counts, beta0, order)


def _unrolled_cholesky(pt: Any, M: Any, K: int) -> dict[tuple[int, int], Any]:
    """Cholesky factors of a stack ``M`` (J, K, K), entry by entry: ``L[a, b]`` has shape (J,).

    Written element-wise across the stack because PyTensor's batched
    (Blockwise) Cholesky loops over the stack in Python (~1000x slower here),
    and LAPACK calls on tiny matrices pay OpenBLAS's thread start-up each time.
    """
    L: dict[tuple[int, int], Any] = {}
    for a in range(K):
        for b in range(a + 1):
            s = M[:, a, b]
            for c in range(b):
                s = s - L[a, c] * L[b, c]
            L[a, b] = pt.sqrt(s) if a == b else s / L[b, b]
    return L


def _forward(L: dict[tuple[int, int], Any], B: Any, K: int) -> list[Any]:
    """Rows of ``L^-1 B`` for a stack ``B`` (J, K, m): row ``a`` has shape (J, m)."""
    rows: list[Any] = []
    for a in range(K):
        r = B[:, a, :]
        for c in range(a):
            r = r - L[a, c][:, None] * rows[c]
        rows.append(r / L[a, a][:, None])
    return rows


def _backward(L: dict[tuple[int, int], Any], Y: list[Any], K: int) -> list[Any]:
    """Rows of ``L'^-1 Y`` (Y as returned by :func:`_forward`)."""
    rows: list[Any] = [None] * K
    for a in reversed(range(K)):
        r = Y[a]
        for c in range(a + 1, K):
            r = r - L[c, a][:, None] * rows[c]
        rows[a] = r / L[a, a][:, None]
    return rows


def _logdet(pt: Any, L: dict[tuple[int, int], Any], K: int) -> Any:
    total = pt.log(L[0, 0]).sum()
    for a in range(1, K):
        total = total + pt.log(L[a, a]).sum()
    return 2.0 * total


def _unrolled_cholesky_solve(pt: Any, M: Any, B: Any, K: int) -> tuple[Any, Any]:
    """``sum_j log|M_j|`` and ``sum_j B_j' M_j^-1 B_j`` for a stack of small matrices."""
    L = _unrolled_cholesky(pt, M, K)
    solved = _forward(L, B, K)
    quad = solved[0].T @ solved[0]
    for a in range(1, K):
        quad = quad + solved[a].T @ solved[a]
    return _logdet(pt, L, K), quad


class MarginalLikelihood:
    """The marginal likelihood and REML criterion of the PyMC model for one design.

    Parameters
    ----------
    design : Design
        From :func:`harness.model.spec.build_design`; the same object the PyMC model reads.
    method : {"auto", "grouped", "dense", "sparse"}
        How to hold ``M`` (see :func:`choose_method`, which "auto" calls).

    Notes
    -----
    Parameters are the PyMC model's: ``beta`` (``design.fixed_terms`` order),
    one square-root factor ``F_b`` per block in ``design.blocks`` order (any
    ``F`` with ``F F'`` equal to the block covariance; the PyMC model's is
    lower triangular) and ``sigma`` (one per ``design.sigma_levels``, or one).
    """

    def __init__(self, design: Design, method: str = "auto") -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, not {method!r}")
        if not design.blocks:
            raise ValueError(
                f"formula {design.spec.formula!r} has no random-effect term; the marginal "
                "likelihood of a mixed model needs at least one (expr | factor)"
            )
        self.design = design
        self.stats = _statistics(design, method)
        self.method = self.stats.mode
        self.n = design.n
        self.p = design.X.shape[1]
        self.n_sigma = len(design.sigma_levels) if design.sigma_levels is not None else 1
        self._token = next(_TOKENS)
        # The sparse form is NumPy/SciPy: nothing to compile.
        self._entry = self._cache_entry() if self.method != "sparse" else None

    # ------------------------------------------------------------------ graph

    def _factor_matrix(self, pt: Any, factors: list[Any]) -> Any:
        """The ``K x K`` factor acting on one group's columns (grouped) or ``Lambda`` (dense).

        Built by one indexed assignment per block rather than PyTensor's
        ``block_diag``/``kron``, which are OpFromGraph ops that compile an
        inner function (with the full FAST_RUN pipeline) on first use.
        """
        stats = self.stats
        blocks = [self.design.blocks[i] for i in stats.block_order]
        ordered = [factors[i] for i in stats.block_order]
        if len(ordered) == 1 and stats.mode == "grouped":
            return ordered[0]
        size = stats.n_columns
        matrix = pt.zeros((size, size))
        start = 0
        for block, F in zip(blocks, ordered, strict=True):
            k = block.n_terms
            copies = block.n_levels if stats.mode == "dense" else 1
            local_rows, local_cols = np.indices((k, k))
            offsets = start + k * np.arange(copies)
            rows = (offsets[:, None] + local_rows.ravel()[None, :]).ravel()
            cols = (offsets[:, None] + local_cols.ravel()[None, :]).ravel()
            matrix = pt.set_subtensor(matrix[rows, cols], pt.tile(F.ravel(), copies))
            start += k * copies
        return matrix

    def _core(self, pt: Any, factors: list[Any], sigma: Any) -> tuple[Any, Any, Any]:
        """``log|R|``, ``log|M|`` and ``G = D' V^-1 D`` for ``D = [y - X beta0, X]``."""
        stats = self.stats
        F = self._factor_matrix(pt, factors)
        w = 1.0 / sigma**2
        data = self._shared()
        logdet_R = pt.sum(data["counts"] * 2.0 * pt.log(sigma))
        S = pt.tensordot(w, data["C"], axes=1)  # (J, K, K)
        Ew = pt.tensordot(w, data["E"], axes=1)  # (J, K, m)
        Dw = pt.tensordot(w, data["D"], axes=1)  # (m, m)
        # M_j = I + F' S_j F and B_j = F' Ew_j, written as tensordots over the term axis.
        SF = pt.tensordot(S, F, axes=[[2], [0]])  # (J, K, K): S_j F
        M = pt.tensordot(SF, F, axes=[[1], [0]]).dimshuffle(0, 2, 1) + pt.eye(stats.n_columns)
        B = pt.tensordot(Ew, F, axes=[[1], [0]]).dimshuffle(0, 2, 1)  # (J, K, m)
        if stats.mode == "grouped":
            logdet_M, quad = _unrolled_cholesky_solve(pt, M, B, stats.n_columns)
        else:
            chol = pt.linalg.cholesky(M[0])
            solved = pt.linalg.solve_triangular(chol, B[0], lower=True)
            logdet_M = 2.0 * pt.sum(pt.log(pt.diagonal(chol)))
            quad = solved.T @ solved
        return logdet_R, logdet_M, Dw - quad

    def _structure_key(self) -> tuple:
        stats = self.stats
        blocks = tuple((b.n_terms, b.n_levels, b.correlated) for b in self.design.blocks)
        return (
            stats.mode,
            stats.C.shape,
            stats.E.shape,
            self.n,
            self.p,
            self.n_sigma,
            blocks,
            tuple(stats.block_order),
        )

    def _cache_entry(self) -> _Compiled:
        """Compiled functions shared by every design of the same structure (e.g. replicates)."""
        key = self._structure_key()
        entry = _COMPILED.get(key)
        if entry is None:
            import pytensor

            data = {}
            for name in ("C", "E", "D", "counts", "beta0"):
                value = np.asarray(getattr(self.stats, name), dtype=float)
                # Static shapes let PyTensor fold the shape arithmetic of tensordot away.
                data[name] = pytensor.shared(value, name=name, shape=value.shape)
            entry = _Compiled(data=data, owner=self._token)
            _COMPILED[key] = entry
            while len(_COMPILED) > COMPILED_CACHE_SIZE:
                _COMPILED.popitem(last=False)
        _COMPILED.move_to_end(key)
        return entry

    def _bind(self) -> _Compiled:
        """Put this design's statistics into the shared variables before a call."""
        entry = self._entry
        assert entry is not None, "the sparse form has no compiled functions to bind"
        if entry.owner != self._token:
            for name in ("C", "E", "D", "counts", "beta0"):
                entry.data[name].set_value(np.asarray(getattr(self.stats, name), dtype=float))
            entry.owner = self._token
        return entry

    def _shared(self) -> dict[str, Any]:
        assert self._entry is not None, "the sparse form has no shared variables"
        return self._entry.data

    def _profiled(self, pt: Any, G: Any) -> tuple[Any, Any, Any]:
        """GLS ``beta``, the residual quadratic form at it, and ``log|X' V^-1 X|``."""
        if self.p == 0:
            return pt.zeros(0), G[0, 0], pt.as_tensor(0.0)
        Gxx, Gxy = G[1:, 1:], G[1:, 0]
        if self.p <= MAX_UNROLLED_TERMS:
            L = _unrolled_cholesky(pt, Gxx[None, :, :], self.p)
            half_rows = _forward(L, Gxy[None, :, None], self.p)
            delta_rows = _backward(L, half_rows, self.p)
            delta = pt.stack([row[0, 0] for row in delta_rows])
            quad = G[0, 0] - sum(row[0, 0] ** 2 for row in half_rows)
            beta_gls = self._shared()["beta0"] + delta
            return beta_gls, quad, _logdet(pt, L, self.p)
        chol = pt.linalg.cholesky(Gxx)
        half = pt.linalg.solve_triangular(chol, Gxy, lower=True)
        delta = pt.linalg.solve_triangular(chol.T, half, lower=False)
        quad = G[0, 0] - pt.sum(half**2)
        logdet_xx = 2.0 * pt.sum(pt.log(pt.diagonal(chol)))
        return self._shared()["beta0"] + delta, quad, logdet_xx

    def _inputs(self, pt: Any) -> tuple[Any, list[Any], Any]:
        beta = pt.tensor("beta", shape=(self.p,))
        factors = [
            pt.tensor(f"F_{b.label}", shape=(b.n_terms, b.n_terms)) for b in self.design.blocks
        ]
        sigma = pt.tensor("sigma", shape=(self.n_sigma,))
        return beta, factors, sigma

    def _compile(self) -> Any:
        """One function: log-likelihood, REML criterion, GLS beta, profiled log-likelihood,
        and the gradient of the profiled deviance with respect to the factors and sigma.

        One compiled function serves both evaluation and optimisation (compiling
        costs more than all the evaluations an optimisation needs); the chain
        rule to the optimiser's unconstrained parameters is done in NumPy
        (:meth:`_theta_gradient`).
        """
        import pytensor
        import pytensor.tensor as pt

        beta, factors, sigma = self._inputs(pt)
        logdet_R, logdet_M, G = self._core(pt, factors, sigma)
        v = pt.concatenate([pt.ones(1), -(beta - self._shared()["beta0"])])
        loglik = -0.5 * (self.n * LOG_2PI + logdet_R + logdet_M + v @ G @ v)
        beta_gls, quad, logdet_xx = self._profiled(pt, G)
        reml = (self.n - self.p) * LOG_2PI + logdet_R + logdet_M + logdet_xx + quad
        deviance = self.n * LOG_2PI + logdet_R + logdet_M + quad
        gradients: Any = pytensor.grad(deviance, [*factors, sigma])
        return pytensor.function(
            [beta, *factors, sigma],
            [loglik, reml, beta_gls, -0.5 * deviance, *gradients],
            on_unused_input="ignore",
            mode=compile_mode(),
        )

    def _call(self, beta: np.ndarray, factors: list[np.ndarray], sigma: np.ndarray) -> list[Any]:
        if self.method == "sparse":
            from harness.checks import marginal_sparse

            return marginal_sparse.outputs(
                self.stats, self.design.blocks, self.n, beta, factors, sigma
            )
        entry = self._bind()
        if entry.function is None:
            entry.function = self._compile()
        return entry.function(beta, *factors, sigma)

    # ------------------------------------------------------------------ evaluation

    def evaluate(
        self, beta: np.ndarray, factors: list[np.ndarray], sigma: np.ndarray | float
    ) -> dict[str, Any]:
        """Log-likelihood at ``beta``, REML criterion, GLS ``beta`` and profiled log-likelihood.

        Parameters
        ----------
        beta : array
            Fixed effects in ``design.fixed_terms`` order.
        factors : list of arrays
            One ``k_b x k_b`` square-root factor per block, ``design.blocks`` order.
        sigma : array or float
            Residual SD(s).

        Returns
        -------
        dict
            ``loglik`` (ML log-likelihood at ``beta``), ``reml_criterion``
            (-2 x REML log-likelihood, lme4's ``REMLcrit`` convention),
            ``beta_gls`` and ``loglik_profiled`` (at ``beta_gls``).
        """
        beta = np.asarray(beta, dtype=float).reshape(-1)
        if beta.shape[0] != self.p:
            raise ValueError(
                f"beta has {beta.shape[0]} values; the design has {self.p} fixed terms "
                f"{self.design.fixed_terms}"
            )
        factors = self._check_factors(factors)
        sigma = self._check_sigma(sigma)
        loglik, reml, beta_gls, profiled = self._call(beta, factors, sigma)[:4]
        return {
            "loglik": float(loglik),
            "reml_criterion": float(reml),
            "beta_gls": np.asarray(beta_gls, dtype=float),
            "loglik_profiled": float(profiled),
        }

    def loglik(
        self, beta: np.ndarray, factors: list[np.ndarray], sigma: np.ndarray | float
    ) -> float:
        """Marginal log-likelihood ``log N(y | X beta, V)``."""
        return self.evaluate(beta, factors, sigma)["loglik"]

    def reml_criterion(self, factors: list[np.ndarray], sigma: np.ndarray | float) -> float:
        """``-2 x`` REML log-likelihood, as lme4's ``REMLcrit``.

        ``(n - p) log(2 pi) + log|V| + log|X' V^-1 X| + r' V^-1 r`` with ``r``
        the GLS residual; it does not depend on ``beta``.
        """
        return self.evaluate(np.zeros(self.p), factors, sigma)["reml_criterion"]

    def gls_beta_many(self, factors: list[np.ndarray], sigma: np.ndarray) -> np.ndarray:
        """GLS fixed effects (``evaluate(...)["beta_gls"]``) at many variance components at once.

        Parameters
        ----------
        factors : list of arrays (S, k_b, k_b)
            One stack of square-root factors per block, ``design.blocks`` order.
        sigma : array (S, n_sigma)
            Residual SD(s) of each of the S draws.

        Returns
        -------
        array (S, p)

        Notes
        -----
        The grouped form is computed in NumPy over the whole stack (the same
        algebra as :meth:`_core` and :meth:`_profiled`: ``G = D_w - B' M^-1 B``,
        ``beta = beta0 + G_xx^-1 G_xy``), which for hundreds of draws is two
        orders of magnitude faster than one compiled call per draw; the dense
        and sparse forms call :meth:`evaluate` draw by draw.
        """
        sigma = np.asarray(sigma, dtype=float).reshape(len(sigma), -1)
        if sigma.shape[1] == 1 and self.n_sigma > 1:
            sigma = np.repeat(sigma, self.n_sigma, axis=1)
        stacks = [np.asarray(F, dtype=float) for F in factors]
        if self.method != "grouped" or self.p == 0:
            zero = np.zeros(self.p)
            return np.stack(
                [
                    self.evaluate(zero, [F[d] for F in stacks], sigma[d])["beta_gls"]
                    for d in range(len(sigma))
                ]
            ).reshape(len(sigma), self.p)
        for d in (0, len(sigma) - 1):  # shapes and values, checked as evaluate checks them
            self._check_factors([F[d] for F in stacks])
            self._check_sigma(sigma[d])
        if np.any(sigma <= 0):
            raise ValueError("residual SDs must be positive")
        stats = self.stats
        K, J, m = stats.n_columns, stats.n_groups, stats.E.shape[-1]
        out = np.empty((len(sigma), self.p))
        # Draws in chunks of about a million numbers per (draw, group, K, K|m) array.
        chunk = max(1, 2**20 // max(1, J * K * max(K, m)))
        for start in range(0, len(sigma), chunk):
            rows = slice(start, start + chunk)
            w = 1.0 / sigma[rows] ** 2  # (s, L)
            F = np.zeros((w.shape[0], K, K))
            offset = 0
            for i in stats.block_order:
                k = self.design.blocks[i].n_terms
                F[:, offset : offset + k, offset : offset + k] = stacks[i][rows]
                offset += k
            S = np.einsum("sl,ljab->sjab", w, stats.C)
            Ew = np.einsum("sl,ljam->sjam", w, stats.E)
            Dw = np.einsum("sl,lab->sab", w, stats.D)
            Ft = np.swapaxes(F, 1, 2)[:, None]
            M = Ft @ S @ F[:, None] + np.eye(K)
            B = Ft @ Ew  # (s, J, K, m)
            G = Dw - np.einsum("sjka,sjkb->sab", B, np.linalg.solve(M, B))
            delta = np.linalg.solve(G[:, 1:, 1:], G[:, 1:, :1])[..., 0]
            out[rows] = stats.beta0 + delta
        return out

    def _check_factors(self, factors: list[np.ndarray]) -> list[np.ndarray]:
        if len(factors) != len(self.design.blocks):
            raise ValueError(
                f"{len(factors)} covariance factors given; the design has "
                f"{len(self.design.blocks)} random-effect blocks "
                f"{[b.label for b in self.design.blocks]}"
            )
        out = []
        for block, F in zip(self.design.blocks, factors, strict=True):
            F = np.atleast_2d(np.asarray(F, dtype=float))
            if F.shape != (block.n_terms, block.n_terms):
                raise ValueError(
                    f"block {block.label!r} has terms {block.terms}: its factor must be "
                    f"{block.n_terms} x {block.n_terms}, not {F.shape}"
                )
            out.append(F)
        return out

    def _check_sigma(self, sigma: np.ndarray | float) -> np.ndarray:
        sigma = np.atleast_1d(np.asarray(sigma, dtype=float))
        if sigma.shape[0] == 1 and self.n_sigma > 1:
            sigma = np.repeat(sigma, self.n_sigma)
        if sigma.shape[0] != self.n_sigma:
            raise ValueError(
                f"{sigma.shape[0]} residual SDs given; the design has {self.n_sigma} "
                f"(sigma_by={self.design.spec.sigma_by!r}, levels {self.design.sigma_levels})"
            )
        if np.any(sigma <= 0):
            raise ValueError(f"residual SDs must be positive, got {sigma.tolist()}")
        return sigma

    # ------------------------------------------------------------------ maximisation

    def n_free(self) -> int:
        """Number of variance parameters in :meth:`unpack` (the optimiser profiles ``beta`` out)."""
        count = self.n_sigma
        for block in self.design.blocks:
            k = block.n_terms
            count += k + (k * (k - 1) // 2 if block.correlated and k > 1 else 0)
        return count

    def _theta_gradient(
        self, theta: np.ndarray, grad_factors: list[np.ndarray], grad_sigma: np.ndarray
    ) -> np.ndarray:
        """Chain rule from (factors, sigma) to the unconstrained vector of :meth:`unpack`."""
        out, pos = [], 0
        for block, dF in zip(self.design.blocks, grad_factors, strict=True):
            k = block.n_terms
            sd = np.exp(theta[pos : pos + k])
            pos += k
            if block.correlated and k > 1:
                chol = np.zeros((k, k))
                corr_grads = []
                for i in range(k):
                    raw = np.append(theta[pos : pos + i], 1.0)
                    pos += i
                    norm = np.sqrt(np.sum(raw**2))
                    row = raw / norm
                    chol[i, : i + 1] = row
                    # d(raw / |raw|) / d raw = (I - row row') / |raw|; F[i, :i+1] = sd_i * row.
                    g_row = sd[i] * dF[i, : i + 1]
                    corr_grads.extend(((g_row - row * (row @ g_row)) / norm)[:i].tolist())
                out.extend((sd * np.sum(dF * chol, axis=1)).tolist())
                out.extend(corr_grads)
            else:
                out.extend((sd * np.diag(dF)).tolist())
        sigma = np.exp(theta[pos : pos + self.n_sigma])
        out.extend((sigma * grad_sigma).tolist())
        return np.asarray(out)

    def deviance_and_gradient(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        """Profiled ML deviance (``-2 log L`` at the GLS beta) and its gradient in ``theta``."""
        *factors, sigma = self.unpack(theta)
        outputs = self._call(np.zeros(self.p), factors, sigma)
        deviance = -2.0 * float(outputs[3])
        if self.method == "sparse":
            return deviance, self._central_difference(theta)
        grads = [np.asarray(g, dtype=float) for g in outputs[4:]]
        return deviance, self._theta_gradient(theta, grads[:-1], grads[-1])

    def _central_difference(self, theta: np.ndarray, step: float = 1e-5) -> np.ndarray:
        """Gradient of the profiled deviance by central differences (sparse form).

        The sparse form has no PyTensor graph to differentiate; with a handful
        of variance parameters, ``2 x n_free`` factorisations per gradient
        cost less than the selected inverse an analytic gradient needs.
        """
        grad = np.zeros_like(theta)
        for i in range(len(theta)):
            up, down = theta.copy(), theta.copy()
            up[i] += step
            down[i] -= step
            values = []
            for point in (up, down):
                *factors, sigma = self.unpack(point)
                values.append(-2.0 * float(self._call(np.zeros(self.p), factors, sigma)[3]))
            grad[i] = (values[0] - values[1]) / (2.0 * step)
        return grad

    def pack(self, factors: list[np.ndarray], sigma: np.ndarray | float) -> np.ndarray:
        """Inverse of :meth:`unpack`: factors and residual SDs -> unconstrained vector.

        A zero SD maps to ``log(1e-10 x sigma)`` (the optimiser's floor is lower),
        so a singular fit can still serve as a start.
        """
        factors = self._check_factors(factors)
        sigma = self._check_sigma(sigma)
        tiny = 1e-10 * float(np.max(sigma))
        theta: list[float] = []
        for block, F in zip(self.design.blocks, factors, strict=True):
            k = block.n_terms
            if block.correlated and k > 1:
                L = psd_cholesky(F @ F.T)
                sd = np.sqrt(np.sum(L**2, axis=1))
                theta.extend(np.log(np.maximum(sd, tiny)).tolist())
                for i in range(1, k):
                    diagonal = max(L[i, i], tiny)
                    theta.extend((L[i, :i] / diagonal).tolist())
            else:
                sd = np.sqrt(np.sum(F**2, axis=1))
                theta.extend(np.log(np.maximum(sd, tiny)).tolist())
        theta.extend(np.log(sigma).tolist())
        return np.asarray(theta)

    def _start(self) -> np.ndarray:
        """Neutral start: SDs at half the OLS residual SD (per unit of each column), no correlation."""
        resid = self.design.y - self.design.X.to_numpy(float) @ self.stats.beta0
        s0 = max(float(np.std(resid)), 1e-8 * max(float(np.std(self.design.y)), 1.0))
        theta = []
        for block in self.design.blocks:
            scale = np.sqrt(np.mean(np.asarray(block.values, float) ** 2, axis=0))
            scale = np.where(scale > 0, scale, 1.0)
            theta.extend(np.log(0.5 * s0 / scale).tolist())
            k = block.n_terms
            if block.correlated and k > 1:
                theta.extend([0.0] * (k * (k - 1) // 2))
        theta.extend([math.log(s0)] * self.n_sigma)
        return np.asarray(theta)

    def maximise(self, start: np.ndarray | None = None, gtol: float = 1e-9) -> MLEstimate:
        """Maximise the marginal likelihood (ML) with scipy, PyTensor supplying the gradient.

        ``beta`` is profiled out (its GLS value given the variance parameters),
        which is exact for a Gaussian model; SDs are optimised on the log scale
        and correlations through the rows of their Cholesky factor.

        Parameters
        ----------
        start : array, optional
            Unconstrained start (default: a neutral one, not lme4's estimates);
            :meth:`pack` makes one from factors and residual SDs.
        gtol : float
            Gradient tolerance on the deviance.  The sparse form, whose
            gradient comes from central differences, uses at least
            ``1e-7 x |deviance|`` and one L-BFGS pass.

        Returns
        -------
        MLEstimate
        """
        from scipy.optimize import minimize

        x0 = self._start() if start is None else np.asarray(start, float)
        count = 0

        def fun(x: np.ndarray) -> tuple[float, np.ndarray]:
            nonlocal count
            count += 1
            value, grad = self.deviance_and_gradient(x)
            if not np.isfinite(value):
                return 1e300, np.zeros_like(x)
            return float(value), np.asarray(grad, dtype=float)

        # A vanishing SD drifts to -inf on the log scale; a floor (SD ~ 1e-13 x the
        # residual SD) keeps the search finite.  Correlations and sigma are free.
        floor = float(x0[-self.n_sigma :].min()) - 30.0
        bounds: list[tuple[float | None, float | None]] = [(floor, None)] * len(x0)
        for position in self._correlation_positions():
            bounds[position] = (None, None)
        for position in range(len(x0) - self.n_sigma, len(x0)):
            bounds[position] = (None, None)
        options = {"maxiter": 5000, "ftol": 1e-16, "gtol": gtol, "maxcor": 30}
        if self.method == "sparse":
            # Finite-difference gradients carry ~1e-10 relative noise: ask for less.
            *factors0, sigma0 = self.unpack(x0)
            scale = abs(2.0 * float(self._call(np.zeros(self.p), factors0, sigma0)[3]))
            options.update(gtol=max(gtol, 1e-7 * max(1.0, scale)), ftol=1e-14, maxiter=200)
        first = minimize(fun, x0, jac=True, method="L-BFGS-B", bounds=bounds, options=options)
        result = first
        if self.method != "sparse":
            # A second pass from the first's end polishes what L-BFGS's stopping rule leaves;
            # it may end "ABNORMAL" when there is nothing left to gain.
            result = minimize(
                fun, first.x, jac=True, method="L-BFGS-B", bounds=bounds, options=options
            )
            if result.fun > first.fun:
                result = first
        *factors, sigma = self.unpack(result.x)
        values = self.evaluate(np.zeros(self.p), factors, sigma)
        grad = np.asarray(result.jac, float)
        # Gradient of the deviance, ignoring SDs parked at the floor (a zero SD).
        free = np.array(
            [lo is None or x > lo + 1e-6 for (lo, _), x in zip(bounds, result.x, strict=True)]
        )
        grad_norm = float(np.max(np.abs(grad[free]))) if free.any() else 0.0
        converged = bool(
            first.success or result.success or grad_norm < 1e-6 * max(1.0, abs(float(result.fun)))
        )
        return MLEstimate(
            beta=values["beta_gls"],
            factors=[np.asarray(F, float) for F in factors],
            sigma=np.asarray(sigma, float),
            loglik=values["loglik_profiled"],
            converged=converged,
            message=str(result.message),
            n_evaluations=count,
            gradient_norm=grad_norm,
        )

    def unpack(self, theta: np.ndarray) -> list[np.ndarray]:
        """Unconstrained vector -> [factor per block..., sigma].

        Per block: log SDs, then for correlated blocks the free entries of each
        row of the correlation's Cholesky factor, row ``i`` being
        ``(x_i1, ..., x_i,i-1, 1) / norm`` (unit rows give a unit diagonal).
        Then log residual SDs.
        """
        out, pos = [], 0
        for block in self.design.blocks:
            k = block.n_terms
            sd = np.exp(theta[pos : pos + k])
            pos += k
            if block.correlated and k > 1:
                chol = np.zeros((k, k))
                for i in range(k):
                    raw = np.append(theta[pos : pos + i], 1.0)
                    pos += i
                    chol[i, : i + 1] = raw / np.sqrt(np.sum(raw**2))
                out.append(sd[:, None] * chol)
            else:
                out.append(np.diag(sd))
        out.append(np.exp(theta[pos : pos + self.n_sigma]))
        return out

    def _correlation_positions(self) -> list[int]:
        positions: list[int] = []
        pos = 0
        for block in self.design.blocks:
            k = block.n_terms
            pos += k
            if block.correlated and k > 1:
                n_corr = k * (k - 1) // 2
                positions.extend(range(pos, pos + n_corr))
                pos += n_corr
        return positions

    # ------------------------------------------------------------------ conditional modes

    def conditional_modes(
        self, beta: np.ndarray, factors: list[np.ndarray], sigma: np.ndarray | float
    ) -> tuple[list[np.ndarray], float, Any]:
        """Mode of the standardised effects ``z`` given ``y`` (the PyMC model's ``z_<label>``).

        Returns
        -------
        modes : list of arrays
            One ``levels x terms`` array per block, ``design.blocks`` order.
        logdet_M : float
            ``log|M|``; ``M`` is the posterior precision of ``z`` given ``y``.
        quadratic : callable
            ``delta -> delta' M delta`` for a list of per-block arrays shaped like ``modes``.
        """
        beta = np.asarray(beta, float).reshape(-1)
        factors = self._check_factors(factors)
        sigma = self._check_sigma(sigma)
        stats, blocks = self.stats, self.design.blocks
        if stats.mode == "sparse":
            return self._sparse_conditional_modes(beta, factors, sigma)
        w = 1.0 / sigma**2
        S = np.tensordot(w, stats.C, axes=1)
        Ew = np.tensordot(w, stats.E, axes=1)
        v = np.concatenate([[1.0], -(beta - stats.beta0)])
        ordered = [factors[i] for i in stats.block_order]
        if stats.mode == "grouped":
            from scipy.linalg import block_diag

            F = block_diag(*ordered)
        else:
            from scipy.linalg import block_diag

            F = block_diag(
                *[np.kron(np.eye(blocks[i].n_levels), factors[i]) for i in stats.block_order]
            )
        M = np.einsum("ab,jbc,cd->jad", F.T, S, F) + np.eye(stats.n_columns)
        rhs = np.einsum("ab,jbm,m->ja", F.T, Ew, v)
        z = np.linalg.solve(M, rhs[..., None])[..., 0]  # (J, K)
        logdet_M = float(np.sum(np.linalg.slogdet(M)[1]))
        modes: list[np.ndarray] = [np.empty(0)] * len(blocks)
        start = 0
        for i in stats.block_order:
            b = blocks[i]
            if stats.mode == "grouped":
                modes[i] = z[:, start : start + b.n_terms]
                start += b.n_terms
            else:
                width = b.n_levels * b.n_terms
                modes[i] = z[0, start : start + width].reshape(b.n_levels, b.n_terms)
                start += width

        def quadratic(delta: list[np.ndarray]) -> float:
            if stats.mode == "grouped":
                d = np.concatenate([delta[i] for i in stats.block_order], axis=1)
            else:
                d = np.concatenate([delta[i].ravel() for i in stats.block_order])[None, :]
            return float(np.einsum("ja,jab,jb->", d, M, d))

        return modes, logdet_M, quadratic

    def _sparse_conditional_modes(
        self, beta: np.ndarray, factors: list[np.ndarray], sigma: np.ndarray
    ) -> tuple[list[np.ndarray], float, Any]:
        from harness.checks import marginal_sparse

        stats, blocks = self.stats, self.design.blocks
        z, logdet_M, M = marginal_sparse.conditional_system(stats, blocks, beta, factors, sigma)
        modes: list[np.ndarray] = [np.empty(0)] * len(blocks)
        start = 0
        for i in stats.block_order:
            width = blocks[i].n_levels * blocks[i].n_terms
            modes[i] = z[start : start + width].reshape(blocks[i].n_levels, blocks[i].n_terms)
            start += width

        def quadratic(delta: list[np.ndarray]) -> float:
            d = np.concatenate([delta[i].ravel() for i in stats.block_order])
            return float(d @ (M @ d))

        return modes, logdet_M, quadratic


def psd_cholesky(cov: np.ndarray, tol: float = 1e-12) -> np.ndarray:
    """Lower-triangular ``L`` with ``L L' = cov``, also for a singular covariance.

    A zero pivot (an SD of zero, a correlation of +/-1) gives a zero column:
    in a positive semi-definite matrix the rest of that column's Schur
    complement is zero too, so the factor stays exact.

    Raises
    ------
    ValueError
        If ``cov`` is not symmetric positive semi-definite.
    """
    cov = np.atleast_2d(np.asarray(cov, dtype=float))
    k = cov.shape[0]
    if cov.shape != (k, k) or not np.allclose(cov, cov.T, rtol=1e-10, atol=0.0):
        raise ValueError(f"covariance matrix must be square and symmetric, got {cov.tolist()}")
    scale = max(float(np.max(np.abs(np.diag(cov)))), np.finfo(float).tiny)
    L = np.zeros((k, k))
    for j in range(k):
        pivot = cov[j, j] - L[j, :j] @ L[j, :j]
        if pivot < -tol * scale:
            raise ValueError(f"covariance matrix is not positive semi-definite: {cov.tolist()}")
        if pivot <= tol * scale:
            continue
        L[j, j] = np.sqrt(pivot)
        L[j + 1 :, j] = (cov[j + 1 :, j] - L[j + 1 :, :j] @ L[j, :j]) / L[j, j]
    # A zero pivot with a non-zero rest of its column means cov was not PSD after all.
    if not np.allclose(L @ L.T, cov, rtol=1e-8, atol=1e-10 * scale):
        raise ValueError(f"covariance matrix is not positive semi-definite: {cov.tolist()}")
    return L


_PYMC_LOGP: OrderedDict[str, tuple[Any, Any]] = OrderedDict()


def _pymc_logp(design: Design) -> tuple[Any, Any]:
    """The PyMC model of a design and its compiled ``y_obs`` + ``z`` log density (cached).

    Models of the same structure share one compiled function; the design's
    data are swapped in with ``pm.set_data``, as nutpie's ``with_data`` does.
    """
    import pymc as pm
    from pymc.model.transform.conditioning import remove_value_transforms

    from harness.engines.pymc import build_model, model_data, pack_data, structure_key
    from harness.model.priors import resolve_priors

    priors = resolve_priors(design)
    key = structure_key(design, priors)
    cached = _PYMC_LOGP.get(key)
    if cached is not None:
        model, logp = cached
        packed, _ = pack_data(model_data(design, priors))
        pm.set_data(packed, model=model)
        _PYMC_LOGP.move_to_end(key)
        return model, logp
    # Without value transforms the model takes SDs, sigma and the packed Cholesky
    # factor as they are (no log scale), so a zero SD of a singular fit is allowed.
    model = remove_value_transforms(build_model(design, priors))
    z_rvs = [model[f"z_{block.label}"] for block in design.blocks]
    logp = model.compile_logp(vars=[model["y_obs"], *z_rvs], sum=True, mode=compile_mode())
    _PYMC_LOGP[key] = (model, logp)
    while len(_PYMC_LOGP) > COMPILED_CACHE_SIZE:
        _PYMC_LOGP.popitem(last=False)
    return model, logp


def pymc_model_loglik(
    design: Design,
    beta: np.ndarray,
    factors: list[np.ndarray],
    sigma: np.ndarray | float,
    marginal: MarginalLikelihood | None = None,
    n_probes: int = 2,
    seed: int = 0,
) -> dict[str, float]:
    """The marginal log-likelihood recovered from the PyMC model's own log density.

    For a Gaussian model, ``log p(y) = log p(y, z) - log p(z | y)`` for every
    ``z``, and ``z | y ~ Normal(z*, M^-1)``.  So the log density of the model
    that :func:`harness.engines.pymc.build_model` builds (only its ``y_obs``
    and ``z_<label>`` terms; priors on ``beta``, SDs and ``sigma`` are not part
    of the likelihood), plus ``q/2 log(2 pi) - 1/2 log|M| + 1/2 (z - z*)' M (z - z*)``,
    must equal the marginal likelihood at ``z*`` and at any other ``z``.  A wrong
    index, design column or scale inside the PyMC model breaks the equality.

    Parameters
    ----------
    design : Design
        With ``spec.parameterization == "offsets"`` (the ``baked_in`` form
        draws group coefficients, not standardised offsets).
    beta, factors, sigma
        Where to evaluate.  Factors of correlated blocks must be lower
        triangular with a non-negative diagonal (the ``LKJCholeskyCov`` factor).
    marginal : MarginalLikelihood, optional
        Reused when given.
    n_probes : int
        Random ``z`` points besides the mode.
    seed : int

    Returns
    -------
    dict
        ``at_mode`` (the recovered log-likelihood at ``z*``), ``max_probe_gap``
        (largest difference between the recoveries at ``z*`` and at the probes).
    """
    from harness.names import sd_var

    if design.spec.parameterization != "offsets":
        raise ValueError(
            "pymc_model_loglik needs parameterization='offsets' (standardised offsets z); "
            f"the spec has {design.spec.parameterization!r}"
        )
    marginal = marginal if marginal is not None else MarginalLikelihood(design)
    factors = marginal._check_factors(factors)
    sigma = marginal._check_sigma(sigma)
    beta = np.asarray(beta, float).reshape(-1)
    modes, logdet_M, quadratic = marginal.conditional_modes(beta, factors, sigma)
    model, logp = _pymc_logp(design)
    point: dict[str, np.ndarray] = {}

    def set_value(name: str, value: np.ndarray) -> None:
        point[model.rvs_to_values[model[name]].name] = np.asarray(value, dtype=float)

    names = {rv.name for rv in model.free_RVs}
    if "beta" in names:
        set_value("beta", beta)
    else:
        for j, value in enumerate(beta):
            set_value(f"beta_{j}", np.asarray(value))
    set_value("sigma", sigma if design.sigma_levels is not None else np.asarray(sigma[0]))
    for block, F in zip(design.blocks, factors, strict=True):
        k = block.n_terms
        if k == 1 or not block.correlated:
            set_value(sd_var(block), np.diag(F).copy())
        else:
            if not np.allclose(F, np.tril(F)) or np.any(np.diag(F) < 0):
                raise ValueError(
                    f"block {block.label!r}: the PyMC model needs a lower-triangular Cholesky "
                    "factor with a non-negative diagonal (see psd_cholesky)"
                )
            set_value(f"chol_{block.label}", F[np.tril_indices(k)])
    q = sum(m.size for m in modes)
    constant = 0.5 * q * LOG_2PI - 0.5 * logdet_M

    def recovered(z_blocks: list[np.ndarray], delta: list[np.ndarray] | None) -> float:
        values = dict(point)
        for block, z in zip(design.blocks, z_blocks, strict=True):
            values[f"z_{block.label}"] = z
        correction = 0.0 if delta is None else 0.5 * quadratic(delta)
        return float(logp(values)) + constant + correction

    at_mode = recovered(modes, None)
    rng = np.random.default_rng(seed)
    gap = 0.0
    for _ in range(n_probes):
        delta = [rng.normal(0.0, 0.3, size=m.shape) for m in modes]
        probe = recovered([m + d for m, d in zip(modes, delta, strict=True)], delta)
        gap = max(gap, abs(probe - at_mode))
    return {"at_mode": at_mode, "max_probe_gap": gap}
