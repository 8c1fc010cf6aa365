"""A report is always written: a figure that fails becomes a note, and no text reads ``nan``.

The page-level tests use the default run's one small fit (sleepstudy, shared with
test_report/test_plots through the runner's disk cache) and break it on purpose:
a figure function that raises, and tables with undefined (NaN) values where real
fits have them (lme4 gives no value, no interval, no reason).
"""

from __future__ import annotations

import dataclasses
import html as html_lib
import logging
import re
from pathlib import Path

import numpy as np
import pytest

from harness.pipeline.runner import DesignResult, fit_design
from harness.pipeline.settings import FitSettings
from harness.report.html import cell, defined_text, fmt
from harness.report.page import render_figures

#: The default test run's one small fit (as in test_report.py: shared on disk).
REPORT_SETTINGS = FitSettings(draws=500, tune=500, chains=2, n_sims=200, max_rounds=1)

NAN_WORD = re.compile(r"(?<![\w.])[+-]?nan(?!\w)", flags=re.IGNORECASE)


def page_text(page: str) -> str:
    """What a reader sees: the page without tags, inline images or style sheet."""
    page = re.sub(r"data:[^\"')\s]+", "", page)  # base64 images are no text
    page = re.sub(r"<style.*?</style>", "", page, flags=re.S)
    return html_lib.unescape(re.sub(r"<[^>]+>", " ", page))


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> DesignResult:
    return fit_design(
        "sleepstudy",
        seed=1,
        cache_dir=tmp_path_factory.getbasetemp() / "harness-cache",
        settings=REPORT_SETTINGS,
        render=render_figures,
    )


# --------------------------------------------------------------------------- no fit needed


def test_text_cells_and_sentences_never_read_nan(caplog: pytest.LogCaptureFixture) -> None:
    assert cell(None) == "—" and cell(float("nan")) == "—" and cell(np.float64("nan")) == "—"
    assert cell("profile") == "profile" and cell(3) == "3"
    assert fmt(float("nan")) == "—"
    assert defined_text(float("nan")) == "" and defined_text(None) == ""
    # A NaN that slipped into a sentence reads "undefined", and the log says where.
    with caplog.at_level(logging.WARNING, logger="harness"):
        fixed = defined_text("gap +nan (+nan posterior SD) from -nan", "a test")
    assert fixed == "gap undefined (undefined posterior SD) from undefined"
    assert "a test" in caplog.text
    # Words and numbers that only contain the letters stay as they are.
    for text in ("nanmean of 1.5", "Nancy's banana", "finance", "x.nan"):
        assert defined_text(text) == text


def test_attribution_numbers_that_are_undefined_say_so() -> None:
    from harness.checks.attribution import _fmt

    assert _fmt(float("nan")) == "undefined"
    assert _fmt(float("inf")) == "undefined"
    assert _fmt(None) == "undefined"
    assert _fmt(0.01234) == "+0.0123" and _fmt(2.5, ".4g") == "2.5"


# --------------------------------------------------------------------------- the page


@pytest.mark.r
@pytest.mark.sampling
def test_a_figure_that_raises_becomes_a_note_and_the_report_is_written(
    result: DesignResult,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from harness.report import plots
    from harness.report.page import write_report

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the density estimate blew up")

    monkeypatch.setattr(plots, "variance_density", broken)
    fresh = dataclasses.replace(result, figures=None)  # draw now, with the broken figure
    with caplog.at_level(logging.WARNING, logger="harness"):
        path = write_report(fresh, tmp_path / "report.html")
    page = path.read_text(encoding="utf-8")
    note = "could not be drawn: the density estimate blew up (RuntimeError)"
    assert note in page
    assert "variance components" in page_text(page).split(note)[0][-200:]  # the note names it
    assert "figure not drawn: variance components" in caplog.text
    # The rest is drawn: every other figure of the page is an inline image.
    assert page.count("data:image/png;base64,") >= 6
    assert 'alt="Forest plot of the fixed effects' in page
    assert 'alt="Rank plots of the main parameters' in page


@pytest.mark.r
@pytest.mark.sampling
def test_undefined_values_read_as_dashes_or_words_never_nan(
    result: DesignResult, tmp_path: Path
) -> None:
    from harness.report.page import write_report

    cmp = result.comparison
    nan = float("nan")
    fixed = cmp.fixed.copy()
    fixed.loc[fixed.index[1], ["lme4_estimate", "lme4_lower", "lme4_upper", "diff_in_se"]] = nan
    fixed.loc[fixed.index[1], "explanation"] = nan
    variance = cmp.variance.copy()
    cor = variance.index[variance["kind"] == "cor"][0]
    variance.loc[cor, ["lme4_estimate", "lme4_lower", "lme4_upper", "mcse"]] = nan
    variance.loc[cor, "note"] = nan
    variance.loc[variance.index[0], ["pymc_lower"]] = nan
    offsets = cmp.offsets.copy()
    offsets.loc[offsets.index[:3], "lme4_mode"] = nan
    agreement = cmp.agreement.copy()
    agreement["slope"] = nan
    agreement["reason"] = nan
    changed = dataclasses.replace(
        cmp, fixed=fixed, variance=variance, offsets=offsets, agreement=agreement
    )
    broken = dataclasses.replace(
        result, comparisons={**result.comparisons, result.pair: changed}, figures=None
    )
    page = write_report(broken, tmp_path / "report.html").read_text(encoding="utf-8")
    text = page_text(page)
    hits = [text[max(0, m.start() - 60) : m.end() + 20] for m in NAN_WORD.finditer(text)]
    assert hits == []
    # The blank frequentist values say why (no reason was known: "undefined").
    assert text.count("lme4 gives no value for this quantity (undefined)") >= 2
    assert "could not be drawn" not in page  # NaN inputs are drawn, not refused


@pytest.mark.r
@pytest.mark.sampling
def test_a_failure_shared_by_every_figure_still_writes_the_report(
    result: DesignResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from harness.report import page as page_module

    def broken(result: DesignResult) -> None:
        raise MemoryError("out of memory while loading the draws")

    monkeypatch.setattr(page_module, "_draw_figures", broken)
    figures = render_figures(result)
    assert set(page_module.FIGURES) <= set(figures)
    fresh = dataclasses.replace(result, figures=figures)
    page = page_module.write_report(fresh, tmp_path / "report.html").read_text(encoding="utf-8")
    assert "out of memory while loading the draws (MemoryError)" in page
    assert "<img" not in page and 'id="verdict-table"' in page
