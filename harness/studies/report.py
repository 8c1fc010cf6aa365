"""The study report: one self-contained HTML file (figures inline, no CDN)."""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from harness.report.html import figure_to_data_uri, template_env
from harness.studies import figures
from harness.studies.core import Study
from harness.studies.sbc import sbc_summary
from harness.studies.summary import nominal_check, summarise, verdicts

log = logging.getLogger("harness")


@dataclass
class StudyTables:
    """Everything the report shows, as tables."""

    summary: pd.DataFrame
    verdicts: pd.DataFrame
    sbc: pd.DataFrame | None = None
    sbc_sentences: list[str] = field(default_factory=list)


def study_tables(study: Study, results: pd.DataFrame, sbc_alpha: float = 0.01) -> StudyTables:
    """Summaries and verdicts of a study's results."""
    summary = summarise(results, alpha=study.alpha)
    verdict = verdicts(summary, alpha=study.alpha)
    sbc = None
    sentences: list[str] = []
    if study.kind == "sbc":
        sbc = sbc_summary(results, alpha=sbc_alpha)
        sentences = sbc_sentences(sbc, sbc_alpha)
    return StudyTables(summary, verdict, sbc, sentences)


def sbc_sentences(table: pd.DataFrame, alpha: float = 0.01) -> list[str]:
    """One sentence per fitter on rank uniformity."""
    out = []
    for fitter, group in table.groupby("fitter", sort=False):
        bad = group[~group["uniform"]]
        n = int(group["n"].max())
        ps = ", ".join(
            f"{r.parameter} p = {r.chi2_p:.3f}"
            if r.chi2_p == r.chi2_p
            else f"{r.parameter} p = n/a"
            for r in group.itertuples()
        )
        if group["chi2_p"].isna().all():
            ps = "too few replicates for the chi-square test"
        if bad.empty:
            out.append(
                f"{fitter}: no rank non-uniformity at the {alpha:g} level over {n} "
                f"replicates for any of {len(group)} parameters (chi-square on binned "
                f"ranks: {ps}; every ECDF inside its simultaneous band)."
            )
        else:
            names = ", ".join(bad["parameter"].astype(str))
            out.append(
                f"{fitter}: ranks of {names} depart from uniformity at the {alpha:g} "
                f"level over {n} replicates (chi-square: {ps}); see the ECDF plot."
            )
    return out


def _png(fig: Any) -> str:
    return str(figure_to_data_uri(fig)["uri"])


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _rate_rows(summary: pd.DataFrame, column: str, nominal: float) -> list[dict[str, str]]:
    rows = []
    for r in summary.to_dict("records"):
        if pd.isna(r.get(column)):
            continue
        verdict, z = nominal_check(r[column], int(r["n"]), nominal)
        rows.append(
            {
                "condition": r["condition"],
                "fitter": r["fitter"],
                "parameter": r["parameter"],
                "n": str(int(r["n"])),
                "rate": _fmt(r[column]),
                "mcse": _fmt(r[f"{column}_mcse"]),
                "z": f"{z:+.1f}" if not pd.isna(z) else "",
                "verdict": verdict,
            }
        )
    return rows


def _table(frame: pd.DataFrame, columns: list[str]) -> dict[str, Any]:
    present = [c for c in columns if c in frame]
    return {
        "columns": present,
        "rows": [[_fmt(r[c]) for c in present] for r in frame.to_dict("records")],
    }


def versions() -> dict[str, str]:
    """Versions of Python, the harness and (when available) R and its packages."""
    import numpy
    import pandas

    import harness

    out = {
        "python": platform.python_version(),
        "harness": harness.__version__,
        "numpy": numpy.__version__,
        "pandas": pandas.__version__,
    }
    try:
        from harness.engines.pymc import pymc_versions

        out.update(pymc_versions("nutpie"))
    except ImportError:  # pragma: no cover - pymc is a dependency
        pass
    try:
        from harness.engines.lme4 import r_available, r_versions

        if r_available():
            out.update({f"R {k}" if k != "R" else "R": v for k, v in r_versions().items()})
    except Exception as err:  # versions are informative; their absence must not stop a report
        log.info("R versions unavailable: %s", err)
    return out


def render_study_report(
    study: Study,
    results: pd.DataFrame,
    *,
    run_info: dict[str, Any],
    tables: StudyTables | None = None,
    runs: pd.DataFrame | None = None,
) -> str:
    """The report's HTML."""
    tables = tables or study_tables(study, results)
    summary = tables.summary
    figs: list[dict[str, str]] = []
    null = summary[summary["rejection_kind"] == "Type I error"]
    alt = summary[summary["rejection_kind"] == "power"]
    if study.kind != "sbc":
        if not null.empty:
            figs.append(
                {
                    "title": "Type I error",
                    "src": _png(
                        figures.rate_figure(
                            null, "rejection", study.alpha, "Type I error (effect = 0)"
                        )
                    ),
                }
            )
        figs.append(
            {
                "title": "Coverage",
                "src": _png(
                    figures.rate_figure(
                        summary,
                        "coverage",
                        1 - study.alpha,
                        f"Coverage of {1 - study.alpha:.0%} intervals",
                    )
                ),
            }
        )
        if not alt.empty:
            figs.append(
                {
                    "title": "Power",
                    "src": _png(
                        figures.rate_figure(
                            alt, "rejection", study.alpha, "Power (effect ≠ 0; line: alpha)"
                        )
                    ),
                }
            )
        figs.append({"title": "Bias", "src": _png(figures.bias_figure(summary))})
    else:
        figs.append(
            {"title": "SBC: ECDF difference", "src": _png(figures.sbc_ecdf_figure(results))}
        )
        figs.append(
            {"title": "SBC: rank histograms", "src": _png(figures.sbc_histogram_figure(results))}
        )
    measures = [
        "condition",
        "fitter",
        "parameter",
        "truth",
        "n",
        "n_failed",
        "bias",
        "bias_mcse",
        "emp_se",
        "emp_se_mcse",
        "mean_se",
        "rmse",
        "rmse_mcse",
        "coverage",
        "coverage_mcse",
        "rejection",
        "rejection_mcse",
        "rejection_kind",
        "share_not_converged",
        "share_singular",
        "max_rhat",
        "divergences",
        "median_fit_seconds",
    ]
    conditions = pd.DataFrame([{"condition": c.id, **dict(c.params)} for c in study.conditions])
    template = template_env().get_template("study.html.j2")
    failures = results[results["error"].notna()]
    return template.render(
        study=study,
        run=run_info,
        generated=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        conditions=_table(conditions, list(conditions.columns)),
        fitters=[
            {
                "name": f.name,
                "description": f.description,
                "reps": "all" if f.max_reps is None else f"first {f.max_reps}",
            }
            for f in study.fitters
        ],
        verdicts=list(tables.verdicts["sentence"]) if not tables.verdicts.empty else [],
        type1=_rate_rows(null, "rejection", study.alpha),
        power=_rate_rows(alt, "rejection", study.alpha) if study.kind != "sbc" else [],
        coverage=_rate_rows(summary, "coverage", 1 - study.alpha),
        measures=_table(summary, measures),
        sbc=None
        if tables.sbc is None
        else _table(
            tables.sbc,
            [
                "fitter",
                "parameter",
                "n",
                "bins",
                "chi2",
                "chi2_df",
                "chi2_p",
                "max_ecdf_diff",
                "outside_band",
                "uniform",
                "coverage",
                "coverage_mcse",
                "share_divergent",
                "max_rhat",
                "min_ess_bulk",
            ],
        ),
        sbc_sentences=tables.sbc_sentences,
        figures=figs,
        failures=_table(failures.head(50), ["condition", "rep", "fitter", "error"]),
        n_failures=len(failures),
        versions=versions(),
        runs=_table(runs, list(runs.columns)) if runs is not None and not runs.empty else None,
    )


def write_study_report(
    study: Study,
    results: pd.DataFrame,
    path: Path | str,
    *,
    run_info: dict[str, Any],
    tables: StudyTables | None = None,
    runs: pd.DataFrame | None = None,
) -> Path:
    """Render and write the report atomically (temporary file, then rename)."""
    from harness._io import atomic_write_text

    html = render_study_report(study, results, run_info=run_info, tables=tables, runs=runs)
    return atomic_write_text(path, html)
