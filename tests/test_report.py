"""The HTML report: one self-contained file, every section, written atomically.

The default run makes ONE small end-to-end fit (sleepstudy, 2 chains x 500
draws) through the runner; the runner's disk cache in the session's temp
folder shares it with test_plots, test_runner and test_browser.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from harness.pipeline.runner import REPORT_DESIGNS, DesignResult, fit_design
from harness.pipeline.settings import FitSettings
from harness.report.page import render_figures

#: Small but real: what the default test run fits (once per session, then cached on disk).
REPORT_SETTINGS = FitSettings(draws=500, tune=500, chains=2, n_sims=200, max_rounds=1)


def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One fit cache per test session, so each design is fitted once across test modules."""
    return tmp_path_factory.getbasetemp() / "harness-cache"


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> DesignResult:
    return fit_design(
        "sleepstudy",
        seed=1,
        cache_dir=shared_cache(tmp_path_factory),
        settings=REPORT_SETTINGS,
        render=render_figures,
    )


@pytest.fixture(scope="module")
def report_pair(result: DesignResult, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from harness.report.page import write_index, write_report

    folder = tmp_path_factory.mktemp("reports")
    report = write_report(result, folder / "sleepstudy.html")
    index = write_index(
        [result], folder / "index.html", failures={"cafe": "RuntimeError: R crashed"}
    )
    return {"report": report, "index": index}


pytestmark = [pytest.mark.r, pytest.mark.sampling]


def _sources(html: str) -> list[str]:
    return re.findall(r"""\b(?:src|href|poster|data)\s*=\s*["']([^"']*)["']""", html, flags=re.I)


def test_report_is_one_self_contained_file(report_pair: dict[str, Path]) -> None:
    html = report_pair["report"].read_text(encoding="utf-8")
    assert "http://" not in html and "https://" not in html
    assert not re.search(r"<(link|script|iframe|object|embed)\b", html, flags=re.I)
    assert "@import" not in html
    for url in re.findall(r"url\(([^)]*)\)", html):
        assert url.strip("'\" ").startswith("data:"), url
    sources = _sources(html)
    images = re.findall(r"<img\b[^>]*\bsrc=\"([^\"]*)\"", html)
    assert len(images) >= 10
    # A figure that fails becomes a note instead of a lost report: here every one is drawn.
    assert "could not be drawn" not in html
    for src in sources:
        # Images inline; the only other references are links to sections of the same page.
        assert src.startswith(("data:image/png;base64,", "data:image/svg+xml;base64,", "#")), src[
            :60
        ]
    assert len(html) < 6_000_000


def test_report_has_every_section(report_pair: dict[str, Path], result: DesignResult) -> None:
    html = report_pair["report"].read_text(encoding="utf-8")
    for heading in (
        "1. Verdict",
        "Same model?",
        "2. Fixed effects",
        "3. Random effects",
        "4. Variance components",
        "5. Shrinkage",
        "6. The model, both ways",
        "7. Posterior predictive",
        "8. Diagnostics",
        "9. Provenance",
    ):
        assert heading in html, heading
    # The verdict table comes first, before any figure.
    assert html.index('id="verdict-table"') < html.index("<img")
    # Teaching: both fits' code and the priors.
    assert "lmerTest::lmer(Reaction ~ Days + (Days | Subject)" in html
    assert "def build_model" in html
    assert "HalfNormal" in html and "LKJ(eta=" in html
    # Provenance: versions, seed, data hash, timings.
    freq, bayes = result.freq, result.bayes_info
    for version in (
        freq.versions["R"],
        freq.versions["lme4"],
        bayes.versions["pymc"],
        bayes.versions["pytensor"],
        bayes.versions["nutpie"],
    ):
        assert f">{version}<" in html
    assert result.design.data_hash() in html
    assert "PyMC seed" in html and "merTools::REsim seed" in html
    assert "lme4 fit" in html and "PyMC sampling" in html


def test_verdict_table_lists_every_compared_quantity(result: DesignResult) -> None:
    from harness.report.tables import verdict_table

    table = verdict_table(result.comparison, result.same_model)
    cmp = result.comparison
    quantities = set(table["quantity"])
    assert set(cmp.fixed["term"]) <= quantities
    assert set(cmp.variance["component"]) <= quantities
    assert len(table[table["section"] == "random effects"]) == len(cmp.agreement)
    assert set(table["verdict"]) <= {"pass", "look", "fail", "unreliable"}
    fixed = table[table["section"] == "fixed effect"].set_index("quantity")
    expected = cmp.fixed.set_index("term")
    assert (fixed["diff_in_se"] - expected["diff_in_se"]).abs().max() < 1e-12
    # With 18 subjects the REML-vs-posterior note is stated next to the SD rows.
    sd_rows = table[table["quantity"].str.contains("sd\\(")]
    assert sd_rows["note"].str.contains("18 groups").all()


def test_same_model_missing_is_said_not_faked(result: DesignResult, tmp_path: Path) -> None:
    from harness.report.page import write_report

    missing = dataclasses.replace(
        result,
        same_model=None,
        same_model_status="same-model check not available (harness.checks.same_model is not installed)",
    )
    html = write_report(missing, tmp_path / "r.html").read_text(encoding="utf-8")
    section = html[html.index('id="same-model"') : html.index('id="fixed"')]
    assert "same-model check not available" in section
    assert "badge" not in section  # no pass, no fail: nothing was checked
    verdict = html[
        html.index('id="verdict-table"') : html.index("</table>", html.index('id="verdict-table"'))
    ]
    assert "same model" not in verdict.lower()


def test_same_model_section_shows_the_likelihoods(
    report_pair: dict[str, Path], result: DesignResult
) -> None:
    if result.same_model is None:
        pytest.skip(f"same-model check unavailable here: {result.same_model_status}")
    html = report_pair["report"].read_text(encoding="utf-8")
    section = html[html.index('id="same-model"') : html.index('id="fixed"')]
    assert f"{result.same_model.loglik_lme4:.7f}"[:9] in section
    assert ("✓ pass" in section) == bool(result.same_model.ok)


def test_interrupted_render_keeps_the_previous_report(
    result: DesignResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import harness.report.page as report

    path = report.write_report(result, tmp_path / "sleepstudy.html")
    before = path.read_bytes()

    def broken_render(*args: object, **kwargs: object) -> str:
        raise RuntimeError("interrupted while rendering")

    monkeypatch.setattr(report, "render_page", broken_render)
    with pytest.raises(RuntimeError, match="interrupted while rendering"):
        report.write_report(result, path)
    assert path.read_bytes() == before
    monkeypatch.undo()

    # A failure after the new page was fully written to its temporary file, just before the rename.
    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(report.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        report.write_report(result, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sleepstudy.html"]  # no temp file left


def test_index_links_every_report_with_its_verdict(
    report_pair: dict[str, Path], result: DesignResult
) -> None:
    html = report_pair["index"].read_text(encoding="utf-8")
    assert 'href="sleepstudy.html"' in html
    assert f"badge {result.verdict}" in html
    assert "cafe" in html and "R crashed" in html  # a failed design is listed, not hidden
    assert "http://" not in html and "https://" not in html


# --------------------------------------------------------------------------- no fit needed


def test_fmt_numbers() -> None:
    from harness.report.page import fmt

    assert fmt(251.40510) == "251.4"
    assert fmt(0.065551) == "0.06555"
    assert fmt(1743.628, 7) == "1743.628"
    assert fmt(12345.6) == "12346"
    assert fmt(2.27e-13, 3) == "2.27e-13"
    assert fmt(float("nan")) == "—" and fmt(None) == "—"
    assert fmt(True) == "yes" and fmt(3) == "3"


@pytest.mark.parametrize("name", REPORT_DESIGNS)
def test_model_equations_typeset_for_every_design(name: str) -> None:
    from matplotlib.mathtext import MathTextParser

    import harness as hz
    from harness.model.priors import resolve_priors
    from harness.model.spec import build_design
    from harness.report.page import model_equations

    data, spec = hz.datasets.load(name)
    design = build_design(spec, data)
    equations = model_equations(design, resolve_priors(design))
    parser = MathTextParser("path")
    for lines in equations.values():
        for line in lines:
            for math in re.findall(r"\$[^$]+\$", line):
                parser.parse(math)  # raises ValueError on anything mathtext cannot typeset
    assert f"I_{{{design.n}}}" in equations["matrix"][1] or design.sigma_levels is not None
    assert any("MVNormal" in line for line in equations["varying"]) == (
        name in ("cafe", "sleepstudy")
    )
    if design.sigma_levels is not None:
        assert r"\sigma_{\mathrm{arm}[i]}" in equations["varying"][0]


# --------------------------------------------------------------------------- every design (slow)


@pytest.mark.slow
@pytest.mark.parametrize("name", REPORT_DESIGNS)
def test_every_design_reports(name: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    from harness.report.page import write_report

    result = fit_design(
        name,
        cache_dir=shared_cache(tmp_path_factory),
        settings=REPORT_SETTINGS,
        render=render_figures,
    )
    html = write_report(result, tmp_path_factory.mktemp(name) / f"{name}.html").read_text("utf-8")
    assert "https://" not in html and 'id="verdict-table"' in html
    if name.startswith("partially_clustered"):
        # 100 control participants are groups of one: said, not plotted.
        assert "cannot be fitted on their own" in html
    if name == "partially_clustered_hetero":
        assert "nlme::lme" in html and "stood in" in html
