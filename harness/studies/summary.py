"""Performance measures of a simulation study, each with its Monte Carlo SE.

Formulas follow Morris, White & Crowther (2019), "Using simulation studies to
evaluate statistical methods", Statistics in Medicine 38:2074, Table 6.  With
``n`` successful replicates, estimates ``t_i`` and true value ``theta``:

- bias = mean(t) - theta, MCSE = sd(t) / sqrt(n)
- empirical SE = sd(t), MCSE = sd(t) / sqrt(2 (n - 1))
- RMSE = sqrt(mean((t - theta)^2)), MCSE = MCSE(MSE) / (2 RMSE) (delta method),
  MCSE(MSE) = sd((t - theta)^2) / sqrt(n)
- coverage and rejection rate p: MCSE = sqrt(p (1 - p) / n)

A rate "holds the nominal level" when it lies within 1.96 Monte Carlo SEs of
it, the SE being computed at the nominal rate (``sqrt(a (1 - a) / n)``): a
two-sided 5% test of "the method's true rate is nominal".
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from harness.studies.core import KEY_COLUMNS, RESULT_DTYPES

Z = 1.959963984540054


def _rate(values: pd.Series) -> tuple[float, float]:
    x = values.dropna().astype(float)
    if len(x) == 0:
        return math.nan, math.nan
    p = float(x.mean())
    return p, math.sqrt(p * (1 - p) / len(x))


def performance(group: pd.DataFrame) -> dict[str, float]:
    """Measures for one (condition, fitter, parameter) group of successful rows."""
    est = group["estimate"].to_numpy(dtype=float)
    truth = group["truth"].to_numpy(dtype=float)
    n = len(est)
    out: dict[str, float] = {"n": n}
    if n == 0:
        return out
    err = est - truth
    sd = float(np.std(est, ddof=1)) if n > 1 else math.nan
    out["bias"] = float(err.mean())
    out["bias_mcse"] = sd / math.sqrt(n) if n > 1 else math.nan
    out["emp_se"] = sd
    out["emp_se_mcse"] = sd / math.sqrt(2 * (n - 1)) if n > 1 else math.nan
    out["mean_se"] = float(np.nanmean(group["se_or_sd"].to_numpy(dtype=float)))
    sq = err**2
    mse = float(sq.mean())
    out["rmse"] = math.sqrt(mse)
    mse_mcse = float(np.std(sq, ddof=1)) / math.sqrt(n) if n > 1 else math.nan
    out["rmse_mcse"] = mse_mcse / (2 * out["rmse"]) if out["rmse"] > 0 else math.nan
    out["coverage"], out["coverage_mcse"] = _rate(group["covered"])
    out["rejection"], out["rejection_mcse"] = _rate(group["rejected"])
    return out


def summarise(results: pd.DataFrame, alpha: float = 0.05) -> pd.DataFrame:
    """Coverage, bias, RMSE, Type I error and power per condition, fitter and parameter.

    Parameters
    ----------
    results : DataFrame
        Tidy replicate rows (see :func:`harness.studies.core.run_task`).
    alpha : float
        Nominal Type I error; intervals are taken to be ``1 - alpha`` intervals.

    Returns
    -------
    DataFrame
        condition, the condition's parameters, fitter, parameter, truth,
        n, n_failed, bias(_mcse), emp_se(_mcse), mean_se, rmse(_mcse),
        coverage(_mcse), rejection(_mcse), rejection_kind ("Type I error"
        where the truth is 0, else "power"), diagnostics.
    """
    required = {
        "condition",
        "fitter",
        "parameter",
        "truth",
        "estimate",
        "se_or_sd",
        "covered",
        "rejected",
        "error",
    }
    missing = required - set(results.columns)
    if missing:
        raise ValueError(f"results lack column(s) {sorted(missing)}")
    param_cols = [c for c in results.columns if c not in KEY_COLUMNS and c not in RESULT_DTYPES]
    rows = []
    keys = ["condition", "fitter", "parameter"]
    for (condition, fitter, parameter), group in results.groupby(keys, sort=False):
        failed = group["error"].notna() | group["estimate"].isna()
        ok = group[~failed]
        truths = group["truth"].dropna().unique()
        truth = float(truths[0]) if len(truths) == 1 else math.nan
        row = {
            "condition": condition,
            **{c: group[c].iloc[0] for c in param_cols},
            "fitter": fitter,
            "parameter": parameter,
            "truth": truth,
            "n_failed": int(failed.sum()),
        }
        row.update(performance(ok))
        row["rejection_kind"] = "Type I error" if truth == 0 else "power"
        row["share_not_converged"] = _share(ok["converged"], False)
        row["share_singular"] = _share(ok["singular"], True)
        row["max_rhat"] = float(ok["rhat"].max()) if ok["rhat"].notna().any() else math.nan
        row["divergences"] = (
            int(ok["divergences"].fillna(0).sum()) if ok["divergences"].notna().any() else math.nan
        )
        row["median_fit_seconds"] = float(ok["fit_seconds"].median()) if len(ok) else math.nan
        rows.append(row)
    out = pd.DataFrame(rows)
    if "condition_index" in results:
        order = results.drop_duplicates("condition").set_index("condition")["condition_index"]
        out = out.assign(_o=out["condition"].map(order)).sort_values("_o", kind="stable")
        out = out.drop(columns="_o").reset_index(drop=True)
    return out


def _share(values: pd.Series, target: bool) -> float:
    known = values.dropna()
    return float((known == target).mean()) if len(known) else math.nan


def nominal_check(rate: float, n: int, nominal: float) -> tuple[str, float]:
    """Whether ``rate`` over ``n`` replicates is consistent with ``nominal``.

    Returns
    -------
    verdict : {"holds", "above", "below", "unknown"}
    z : float
        ``(rate - nominal) / sqrt(nominal (1 - nominal) / n)``.
    """
    if not n or math.isnan(rate):
        return "unknown", math.nan
    z = (rate - nominal) / math.sqrt(nominal * (1 - nominal) / n)
    if abs(z) <= Z:
        return "holds", z
    return ("above" if z > 0 else "below"), z


def verdicts(summary: pd.DataFrame, alpha: float = 0.05) -> pd.DataFrame:
    """One sentence per fitter on its Type I error and its coverage.

    Returns
    -------
    DataFrame
        fitter, measure ("Type I error"/"coverage"), nominal, n_cells,
        n_holds, n_above, n_below, lowest, highest, sentence.
    """
    rows = []
    level = 1 - alpha
    for fitter, group in summary.groupby("fitter", sort=False):
        null = group[group["rejection_kind"] == "Type I error"]
        specs = [
            ("Type I error", null, "rejection", "rejection_mcse", alpha),
            ("coverage", group, "coverage", "coverage_mcse", level),
        ]
        for measure, cells, column, mcse_col, nominal in specs:
            cells = cells[cells[column].notna()]
            if cells.empty:
                continue
            checks = [
                nominal_check(r, int(n), nominal)
                for r, n in zip(cells[column], cells["n"], strict=True)
            ]
            counts = {k: sum(1 for v, _ in checks if v == k) for k in ("holds", "above", "below")}
            rows.append(
                {
                    "fitter": fitter,
                    "measure": measure,
                    "nominal": nominal,
                    "n_cells": len(cells),
                    "n_holds": counts["holds"],
                    "n_above": counts["above"],
                    "n_below": counts["below"],
                    "lowest": float(cells[column].min()),
                    "highest": float(cells[column].max()),
                    "sentence": _sentence(
                        fitter, measure, nominal, cells, column, mcse_col, checks
                    ),
                }
            )
    return pd.DataFrame(rows)


def _sentence(
    fitter: str,
    measure: str,
    nominal: float,
    cells: pd.DataFrame,
    column: str,
    mcse_col: str,
    checks: list[tuple[str, float]],
) -> str:
    if len(cells) == 1:
        rate, mcse, n = (
            float(cells[column].iloc[0]),
            float(cells[mcse_col].iloc[0]),
            int(cells["n"].iloc[0]),
        )
        verdict, z = checks[0]
        where = {
            "holds": f"within Monte Carlo error of the nominal {nominal:g}",
            "above": f"above the nominal {nominal:g} beyond Monte Carlo error",
            "below": f"below the nominal {nominal:g} beyond Monte Carlo error",
        }[verdict]
        return (
            f"{fitter}: {measure} {rate:.3f} (MC SE {mcse:.3f}, {n} replicates) is {where} "
            f"(z = {z:+.1f})."
        )
    noun = "conditions" if cells["parameter"].nunique() == 1 else "condition x parameter cells"
    held = sum(1 for v, _ in checks if v == "holds")
    above = sum(1 for v, _ in checks if v == "above")
    below = sum(1 for v, _ in checks if v == "below")
    lo, hi = float(cells[column].min()), float(cells[column].max())
    if held == len(cells):
        head = f"holds the nominal {nominal:g} in all {len(cells)} {noun}"
    else:
        parts = []
        if above:
            parts.append(f"above it in {above}")
        if below:
            parts.append(f"below it in {below}")
        head = f"holds the nominal {nominal:g} in {held} of {len(cells)} {noun}, " + " and ".join(
            parts
        )
    return f"{fitter}: {measure} {head} (range {lo:.3f} to {hi:.3f}; within = 1.96 MC SEs)."
