"""Check (b): given the mapped SDs and correlations, the user's offsets follow N(0, Sigma).

Read from prior draws of the user's model, where the offsets given their
hyperparameters follow exactly the user's random-effects law.  Two tests per
grouping factor:

* whitened offsets ``w = chol(R)^-1 (u / sd)`` over all draws and levels are
  standard normal (a chi-square test of ``sum w**2``, two-sided);
* the log density of all offsets under the harness's ``Sigma = D R D`` against
  the same under the usual porting mistakes built from the same mapped values
  (a variance used as an SD, a dropped correlation, a transposed Cholesky
  factor, ...).  A mistake that explains the offsets better by more than
  :data:`DECISIVE` nats is named.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import xarray as xr
from scipy import stats

from harness.audit.verdicts import CheckResult, worst
from harness.model.spec import Design, RandomBlock
from harness.names import corr_var, offsets_var, sd_var

__all__ = ["DECISIVE", "P_FAIL", "effects_check"]

#: Log-likelihood margin (nats) by which an alternative law must beat the harness's to be named.
DECISIVE = 10.0
#: Two-sided p-value of the whitened chi-square test below which the law is refused.
P_FAIL = 1e-6

Law = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _dsd(sd: np.ndarray, corr: np.ndarray) -> np.ndarray:
    return sd[:, :, None] * corr * sd[:, None, :]


def _transposed(sd: np.ndarray, corr: np.ndarray) -> np.ndarray:
    chol = np.linalg.cholesky(_dsd(sd, corr))
    return np.swapaxes(chol, 1, 2) @ chol


def laws(k: int, correlated: bool) -> dict[str, Law]:
    """Covariance of the offsets per draw, (points, k, k): the harness's and the mistakes'."""
    out: dict[str, Law] = {
        "as the formula says": _dsd,
        "a variance used as an SD (sd**2 where sd belongs)": lambda s, c: _dsd(s**2, c),
        "an SD used as a variance (sqrt(sd) where sd belongs)": lambda s, c: _dsd(np.sqrt(s), c),
        "a precision used as an SD (1/sd**2, PyMC 2's tau)": lambda s, c: _dsd(1.0 / s**2, c),
    }
    if k > 1 and correlated:
        eye = np.broadcast_to(np.eye(k), (1, k, k))
        out["a dropped correlation (independent terms)"] = lambda s, c: _dsd(
            s, eye * np.ones_like(c)
        )
        out["a transposed Cholesky factor (L'L instead of LL')"] = _transposed
        out["a correlation matrix used as the covariance"] = lambda s, c: c.copy()
    return out


def _logdensity(u: np.ndarray, cov: np.ndarray) -> float:
    """Sum over points and levels of log N(u; 0, cov); u (points, levels, k), cov (points, k, k)."""
    with np.errstate(all="ignore"):
        try:
            chol = np.linalg.cholesky(cov)
        except np.linalg.LinAlgError:
            return -np.inf
        # Solve L w = u for every level of every point.
        w = np.linalg.solve(chol[:, None, :, :], u[..., None])[..., 0]
        logdet = 2.0 * np.log(np.diagonal(chol, axis1=1, axis2=2)).sum(axis=1)
        k = u.shape[-1]
        per = -0.5 * (w**2).sum(axis=-1) - 0.5 * logdet[:, None] - 0.5 * k * np.log(2 * np.pi)
    total = float(per.sum())
    return total if np.isfinite(total) else -np.inf


def _whitened(u: np.ndarray, sd: np.ndarray, corr: np.ndarray) -> np.ndarray:
    chol = np.linalg.cholesky(corr)
    v = u / sd[:, None, :]
    return np.linalg.solve(chol[:, None, :, :], v[..., None])[..., 0]


def _block_arrays(
    hdraws: xr.Dataset, block: RandomBlock, supplied: list[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    points = hdraws.sizes["chain"] * hdraws.sizes["draw"]
    k = block.n_terms
    u = hdraws[offsets_var(block)].sel({f"{block.label}__level": supplied}).values
    u = u.reshape(points, len(supplied), k)
    sd = hdraws[sd_var(block)].values.reshape(points, k)
    if block.correlated and k > 1:
        corr = hdraws[corr_var(block)].values.reshape(points, k, k)
    else:
        corr = np.broadcast_to(np.eye(k), (points, k, k)).copy()
    return u, sd, corr


def block_check(
    block: RandomBlock, u: np.ndarray, sd: np.ndarray, corr: np.ndarray
) -> tuple[str, str, pd.DataFrame, pd.DataFrame]:
    """Verdict, words, the laws' table and the whitened moments of one block."""
    keep = (
        np.all(np.isfinite(sd), axis=1)
        & np.all(sd > 0, axis=1)
        & np.all(np.isfinite(u), axis=(1, 2))
    )
    u, sd, corr = u[keep], sd[keep], corr[keep]
    absent = [t for k, t in enumerate(block.terms) if np.all(u[..., k] == 0)]
    if absent and len(u):
        words = (
            f"{block.label}: the offsets of {', '.join(absent)} are 0 in every prior draw while "
            "their SD is not: the model has no such random effect (a missing random "
            f"{'intercept' if '(Intercept)' in absent else 'effect'})"
        )
        return "fail", words, pd.DataFrame(), pd.DataFrame()
    if len(u) < 20:
        return (
            "incomplete",
            f"{block.label}: fewer than 20 usable prior draws",
            pd.DataFrame(),
            pd.DataFrame(),
        )
    w = _whitened(u, sd, corr)
    k = block.n_terms
    moments = []
    for i, a in enumerate(block.terms):
        moments.append(
            {
                "factor": block.label,
                "term": a,
                "statistic": "mean(w)",
                "value": float(w[..., i].mean()),
                "expected": 0.0,
            }
        )
        moments.append(
            {
                "factor": block.label,
                "term": a,
                "statistic": "mean(w**2)",
                "value": float((w[..., i] ** 2).mean()),
                "expected": 1.0,
            }
        )
        for j in range(i + 1, k):
            moments.append(
                {
                    "factor": block.label,
                    "term": f"{a} x {block.terms[j]}",
                    "statistic": "mean(w w)",
                    "value": float((w[..., i] * w[..., j]).mean()),
                    "expected": 0.0,
                }
            )
    df = w.size
    chi2 = float((w**2).sum())
    p = float(2 * min(stats.chi2.sf(chi2, df), stats.chi2.cdf(chi2, df)))
    fits = [
        {"factor": block.label, "law": name, "log_density": _logdensity(u, law(sd, corr))}
        for name, law in laws(k, block.correlated).items()
    ]
    table = pd.DataFrame(fits)
    own = float(table["log_density"].iloc[0])
    table["vs_formula"] = table["log_density"] - own
    rival = table.iloc[1:].sort_values("log_density", ascending=False).head(1)
    margin = float(rival["vs_formula"].iloc[0]) if len(rival) else -np.inf
    named = margin > DECISIVE
    refused = p < P_FAIL or named
    stats_words = f"whitened chi-square {chi2:.0f} on {df} values (p = {p:.2g})"
    if not refused:
        return (
            "pass",
            f"{block.label}: offsets follow N(0, Sigma) ({stats_words})",
            table,
            pd.DataFrame(moments),
        )
    if named:
        words = (
            f"{block.label}: the offsets follow {rival['law'].iloc[0]}, not N(0, Sigma) as the "
            f"formula says (better by {margin:.0f} nats; {stats_words})"
        )
    else:
        words = f"{block.label}: the offsets do not follow N(0, Sigma) ({stats_words}); no usual mistake explains it"
    return "fail", words, table, pd.DataFrame(moments)


def effects_check(
    design: Design, hdraws: xr.Dataset, supplied: dict[str, list[str]]
) -> CheckResult:
    """Check (b) over every grouping factor.

    Parameters
    ----------
    design : Design
    hdraws : xarray.Dataset
        Prior draws of the user's model under the harness's names.
    supplied : dict
        Per block label, the levels whose offsets the user's model has.

    Returns
    -------
    CheckResult
        ``laws`` (log density of all offsets per candidate law) and ``whitened``
        (moments of the whitened offsets).
    """
    verdicts, words, laws_, moments = [], [], [], []
    for block in design.blocks:
        levels = supplied.get(block.label, [])
        if not levels:
            verdicts.append("incomplete")
            words.append(f"{block.label}: no offsets mapped")
            continue
        u, sd, corr = _block_arrays(hdraws, block, levels)
        verdict, text, table, moment = block_check(block, u, sd, corr)
        verdicts.append(verdict)
        words.append(text)
        laws_.append(table)
        moments.append(moment)
    tables = {}
    if laws_:
        tables["laws"] = pd.concat(laws_, ignore_index=True)
        tables["whitened"] = pd.concat(moments, ignore_index=True)
    if not design.blocks:
        return CheckResult("random_effects", "pass", "the formula has no random effects", tables)
    return CheckResult("random_effects", worst(verdicts), "; ".join(words), tables)
