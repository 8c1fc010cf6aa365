"""Jupyter views: ``_repr_html_`` of the results shows the verdict table with its pictures,
self-contained; plain ``repr`` stays one short line; a failing view becomes a note."""

from __future__ import annotations

import re

import pytest

from harness import views
from harness.pipeline.runner import DesignResult, fit_design
from harness.report.page import render_figures
from tests.test_report import REPORT_SETTINGS, shared_cache


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> DesignResult:
    return fit_design(
        "sleepstudy",
        seed=1,
        cache_dir=shared_cache(tmp_path_factory),
        settings=REPORT_SETTINGS,
        render=render_figures,
    )


def _self_contained(snippet: str) -> None:
    assert "http://" not in snippet and "https://" not in snippet
    assert not re.search(r"<(link|script|iframe|object|embed|img)\b", snippet, flags=re.I)


@pytest.mark.r
@pytest.mark.sampling
def test_results_show_their_verdict_table_in_jupyter(result: DesignResult) -> None:
    cmp = result.comparison
    pictured = sum(
        isinstance(a, dict) and a.get("remainder") is not None
        for table in (cmp.fixed, cmp.variance, cmp.agreement)
        for a in table["attribution"]
    )
    assert pictured >= 4
    for obj in (result, cmp):
        snippet = obj._repr_html_()
        assert snippet is not None and 'class="harness-view"' in snippet
        assert snippet.count('<svg class="attribution"') == pictured
        assert "<details>" in snippet and "could not be shown" not in snippet
        _self_contained(snippet)
    assert "log-likelihood at lme4" in result._repr_html_()  # the same-model row
    same = result.same_model._repr_html_()
    assert "PyMC marginal" in same
    _self_contained(same)
    for obj in (result, cmp, result.same_model):
        text = repr(obj)
        assert "\n" not in text and len(text) < 120, text


def test_a_type_without_a_view_gets_none_and_a_failing_view_a_note() -> None:
    class Plain:
        pass

    class Broken:
        def __repr__(self) -> str:
            return "Broken<1>"

    def fails(obj: object) -> str:
        raise ValueError("no table <here>")

    assert views.html(Plain()) is None
    views.register(Broken, fails)
    note = views.html(Broken())
    assert note is not None
    assert "no table &lt;here&gt;" in note and "ValueError" in note and "Broken&lt;1&gt;" in note
