"""Jupyter views of the results: compact, self-contained HTML snippets.

A :class:`~harness.checks.compare.Comparison` or
:class:`~harness.pipeline.runner.DesignResult` shows its verdict table with the
pictures of where each gap comes from (:mod:`harness.report.verdict`); a
:class:`~harness.checks.same_model.SameModel` its log-likelihoods side by side.
No link, script or image file: a scoped style sheet and inline SVG only.
Importing this module registers the views (:mod:`harness.views`).
"""

from __future__ import annotations

from typing import Any

from harness import views
from harness.checks.compare import Comparison
from harness.checks.same_model import SameModel
from harness.pipeline.runner import DesignResult
from harness.report.html import render_page
from harness.report.tables import verdict_table
from harness.report.verdict import verdict_view

__all__ = ["comparison_html", "design_result_html", "same_model_html"]


def _priors(bayes: Any) -> list[dict[str, str]]:
    from harness.report.page import _priors_rows

    return _priors_rows(bayes)


def comparison_html(cmp: Comparison, same_model: Any | None = None, title: str = "") -> str:
    """The verdict table of ``cmp`` (with ``same_model``'s row when given) as an HTML snippet."""
    engine = getattr(cmp.freq, "engine", "lme4")
    table = verdict_table(cmp, same_model, engine=engine, priors=_priors(cmp.bayes))
    view = verdict_view(table)
    counts: dict[str, int] = {}
    for row in view["rows"]:
        counts[row["verdict"]] = counts.get(row["verdict"], 0) + 1
    verdict = cmp.verdict
    if same_model is not None and not bool(getattr(same_model, "ok", True)):
        verdict = "fail"
    return render_page(
        "notebook.html.j2",
        {
            "title": title or f"{getattr(cmp.freq.spec, 'formula', '')}",
            "verdict": verdict,
            "counts": counts,
            "engine": engine,
            "rows": view["rows"],
            "legend": view["legend"],
        },
    )


def design_result_html(result: DesignResult) -> str:
    """A design's verdict table (the report's first section) as an HTML snippet."""
    return comparison_html(
        result.comparison, result.same_model, title=f"{result.name}: {result.spec.formula}"
    )


def same_model_html(same: SameModel) -> str:
    """The same-model check: both log-likelihoods, their difference and the reasons."""
    return render_page("notebook_same_model.html.j2", {"same": same})


views.register(Comparison, comparison_html)
views.register(DesignResult, design_result_html)
views.register(SameModel, same_model_html)
