"""Check (d), second half: the user's posterior against the harness's own, row by row.

Both are posteriors of the same likelihood (check a), so a gap between them is
Monte Carlo error, the priors, or a fault.  Rows are compared with
:func:`harness.checks.compare_bayes.compare_bayes` (difference in combined
MCSE).  The prior share comes from :mod:`harness.audit.prior_share`: the user's
draws re-weighted to the harness's priors estimate the harness's posterior;
``share`` = user mean - re-weighted mean, ``remainder`` = re-weighted mean -
harness mean, measured in its own MCSE.  A row fails when the remainder is
more than :data:`~harness.checks.compare_bayes.Z_MAX` MCSEs; prior
differences alone never fail.  Without a reliable share (k-hat above 0.7, or
no density), a row whose raw gap fails reads "look" when the priors differ
(the gap may be theirs) and "fail" when they do not.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from harness.audit.prior_share import K_HAT_MAX, PriorShare
from harness.audit.verdicts import CheckResult, worst
from harness.checks.compare_bayes import Z_MAX, BayesComparison

__all__ = ["harness_check", "reweighted_rows"]


def reweighted_rows(user: Any, comparison: BayesComparison, share: PriorShare) -> pd.DataFrame:
    """Per compared row: the re-weighted mean, its MCSE, the share and the remainder."""
    from harness.checks.compare_bayes import _draws

    a, b = comparison.engines
    records = []
    for rec in comparison.table.to_dict("records"):
        out: dict[str, Any] = {"row": rec["row"]}
        if share.weights is not None:
            x = np.asarray(_draws(user, rec["table"], rec["row"]).values, float).reshape(-1)
            w = share.weights
            mean = float(np.sum(w * x))
            sd = float(np.sqrt(np.sum(w * (x - mean) ** 2)))
            # Effective draws: importance ESS scaled by the chain's own autocorrelation.
            ess = max(rec[f"{a}_ess_bulk"] * (1.0 / np.sum(w**2)) / x.size, 1.0)
            mcse = sd / np.sqrt(ess)
            remainder = mean - rec[f"{b}_mean"]
            rmcse = float(np.hypot(mcse, rec[f"{b}_mcse"]))
            out |= {
                "reweighted_mean": mean,
                "reweighted_mcse": mcse,
                "share": rec[f"{a}_mean"] - mean,
                "remainder": remainder,
                "remainder_z": remainder / rmcse if rmcse > 0 else float("inf"),
            }
        records.append(out)
    return pd.DataFrame(records)


def _row_verdict(rec: dict[str, Any], share: PriorShare, priors_differ: bool) -> tuple[str, str]:
    if rec["verdict"] == "unreliable":
        return "unreliable", str(rec["note"])
    if share.reliable and np.isfinite(rec.get("remainder_z", np.nan)):
        z = float(rec["remainder_z"])
        if abs(z) > Z_MAX:
            return "fail", (
                f"after the prior share ({rec['share']:.3g}) the posteriors still differ by "
                f"{z:.2f} MCSE"
            )
        return "pass", f"gap {rec['diff']:.3g} = prior share {rec['share']:.3g} + Monte Carlo error"
    if rec["verdict"] == "fail" and priors_differ:
        return "look", f"{rec['note']}; the priors differ and their share is not known"
    return str(rec["verdict"]), str(rec["note"])


def harness_check(
    user: Any, harness: Any, share: PriorShare, priors_differ: bool
) -> tuple[CheckResult, BayesComparison]:
    """The user's posterior against the harness's, with the prior share per row.

    Parameters
    ----------
    user : BayesFit
        The user's fit (engine ``audit``), posterior under the harness's names.
    harness : BayesFit
        The harness's own fit of the same design, data, priors profile and seed.
    share : PriorShare
        Importance weights from the user's priors to the harness's.
    priors_differ : bool
        Whether the priors check found the two priors different.
    """
    from harness.checks.compare_bayes import compare_bayes

    comparison = compare_bayes(user, harness, engines=("audit", "harness"))
    extra = reweighted_rows(user, comparison, share)
    table = comparison.table.merge(extra, on="row", how="left")
    verdicts = [_row_verdict(rec, share, priors_differ) for rec in table.to_dict("records")]
    table["verdict"] = [v for v, _ in verdicts]
    table["note"] = [n for _, n in verdicts]
    verdict = worst(list(table["verdict"])) if len(table) else "incomplete"
    bad = [
        f"{r} ({n})"
        for r, v, n in zip(table["row"], table["verdict"], table["note"], strict=True)
        if v != "pass"
    ]
    if share.weights is None:
        share_text = f"prior share not computed: {share.why}"
    elif share.reliable:
        share_text = f"prior share by importance re-weighting, Pareto k-hat {share.k_hat:.2f}"
    else:
        share_text = (
            f"Pareto k-hat {share.k_hat:.2f} > {K_HAT_MAX}: the prior share is not reliable "
            "(the priors are too far apart for re-weighting)"
        )
    text = f"against the harness's own posterior: {verdict}; {share_text}; " + (
        f"rows not passing: {'; '.join(bad[:6])}" if bad else "every row within its stated error"
    )
    summary = pd.DataFrame([{"k_hat": share.k_hat, "reliable": share.reliable, "why": share.why}])
    return CheckResult(
        "posterior_harness", verdict, text, {"rows": table, "prior_share": summary}
    ), comparison
