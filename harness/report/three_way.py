"""The report's section for three engines: lme4 | PyMC | brms side by side (issue 22).

Built only when a design has a comparison of two Bayesian fits
(:attr:`~harness.pipeline.runner.DesignResult.bayes_pairs`); the page leaves
the section out otherwise.  Each pair gets its rows with both posterior means,
lme4's estimate, the difference in combined Monte Carlo error and its verdict,
and one sentence on which side a gap to lme4 sits
(:func:`harness.checks.compare_bayes.gap_side`).  The PyMC-vs-brms log-density
identity (:mod:`harness.checks.same_model_bayes`) is shown above the rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pandas as pd

from harness.checks.compare_bayes import gap_side, three_way_table
from harness.engines.registry import ENGINES

if TYPE_CHECKING:
    from harness.pipeline.runner import DesignResult

__all__ = ["three_way_context"]


def _label(name: str) -> str:
    engine = ENGINES.get(name)
    return engine.label if engine is not None else name


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return frame.astype(object).where(frame.notna(), None).to_dict("records")


def _identity_context(result: DesignResult) -> dict[str, Any] | None:
    """The PyMC-vs-brms identity as plain values; None when it was not asked for."""
    check = result.same_model_bayes
    if check is None:
        status = result.same_model_bayes_status
        return {"available": False, "status": status} if status else None
    return {
        "available": True,
        "ok": bool(check.ok),
        "max_abs_diff": float(check.max_abs_diff),
        "tolerance": float(check.tolerance),
        "points": len(check.table),
        "reasons": list(check.reasons),
        "table": _records(check.table),
    }


def three_way_context(result: DesignResult) -> dict[str, Any] | None:
    """What ``_three_way.html.j2`` renders; None when no two Bayesian fits were compared.

    Parameters
    ----------
    result : DesignResult

    Returns
    -------
    dict or None
        ``pairs`` (per pair: names, labels, verdict, max |z|, the sentence, rows and
        columns) and ``identity`` (the log-density check, or None).
    """
    pairs = result.bayes_pairs
    if not pairs:
        return None
    out = []
    for (a, b), bayes in pairs.items():
        reference = result.comparisons.get((result.reference, a))
        table = three_way_table(bayes, reference)  # type: ignore[arg-type]
        labels = {a: _label(a), b: _label(b)}
        out.append(
            {
                "engines": [a, b],
                "labels": [labels[a], labels[b]],
                "verdict": bayes.verdict,
                "max_abs_z": bayes.max_abs_z,
                "z_max": bayes.z_max,
                "sentence": gap_side(bayes, reference, labels),  # type: ignore[arg-type]
                "rows": _records(table),
                "columns": [
                    ("row", "Quantity"),
                    ("lme4", f"{_label(result.reference)} estimate", "num"),
                    (a, f"{labels[a]} mean", "num"),
                    (b, f"{labels[b]} mean", "num"),
                    ("diff", "difference", "num", 3),
                    ("mcse", "combined MCSE", "num", 3),
                    ("z", "difference / MCSE", "num", 3),
                    ("side", "where a gap to lme4 sits"),
                    ("verdict", f"{labels[a]} vs {labels[b]}"),
                ],
            }
        )
    return {"pairs": out, "identity": _identity_context(result)}
