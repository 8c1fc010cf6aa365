"""The audit page: one section per check of :mod:`harness.audit` (figures from its tables)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from harness.report.html import render_page, write_html
from harness.report.page import _image, _note

log = logging.getLogger("harness")

__all__ = ["laws_figure", "likelihood_figure", "render_audit", "write_audit"]

ABOUT = {
    "likelihood": "The model's pointwise log-likelihood against the harness's at the same "
    "parameter values (prior and posterior draws, carried across by MAPPING), to 1e-8 relative.",
    "random_effects": "Prior draws of the offsets, given the mapped SDs and correlations, against "
    "N(0, Sigma): whitened chi-square, and the log density under the formula's law beside the "
    "usual porting mistakes built from the same values.",
    "priors": "Prior draws of each mapped quantity, the model's against the harness's "
    "(differences are reported, never failed).",
    "posterior": "The model's posterior against lme4, row by row, with the harness's attribution.",
    "posterior_harness": "The model's posterior against the harness's own posterior (same data, "
    "priors profile, seed, draws), row by row in combined MCSE; the prior share re-weights the "
    "model's draws to the harness's priors (PSIS; not reliable above Pareto k-hat 0.7).",
    "efficiency": "Smallest bulk ESS over the compared rows per second of sampling and per 1000 "
    "gradient evaluations, the model's against the harness's, and what differs in form "
    "(centred or non-centred offsets, Z @ u or indexing). Advice: not part of the overall verdict.",
}
TITLES = {
    "likelihood": "Likelihood at the same parameters",
    "random_effects": "Random-effects distribution",
    "priors": "Priors side by side",
    "posterior": "Posterior against lme4",
    "posterior_harness": "Posterior against the harness's model",
    "efficiency": "Efficiency",
}


def likelihood_figure(rows: pd.DataFrame) -> Figure:
    """Largest |difference| of the log-likelihood per row (log scale), one point per row."""
    fig = Figure(figsize=(7, 2.8))
    ax = fig.add_subplot()
    gap = np.maximum(rows["max_abs_difference"].to_numpy(float), 1e-300)
    ax.scatter(rows["row"], gap, s=8)
    ax.set_yscale("log")
    ax.set_xlabel("row of the data")
    ax.set_ylabel("max |user - harness| (log-lik)")
    return fig


def laws_figure(laws: pd.DataFrame) -> Figure:
    """Log density of the offsets under each candidate law, relative to the formula's."""
    fig = Figure(figsize=(7, 0.5 + 0.4 * len(laws)))
    ax = fig.add_subplot()
    labels = [f"{f}: {law}" for f, law in zip(laws["factor"], laws["law"], strict=True)]
    values = np.clip(laws["vs_formula"].to_numpy(float), -1e3, 1e3)
    ax.barh(labels, values, color=["tab:red" if v > 0 else "tab:gray" for v in values])
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel("log density vs the formula's law (nats, clipped at +/-1000)")
    return fig


def _figures(name: str, tables: dict[str, pd.DataFrame]) -> list[dict[str, Any]]:
    drawers = {
        ("likelihood", "rows"): (likelihood_figure, "per-row log-likelihood difference"),
        ("random_effects", "laws"): (laws_figure, "candidate laws of the offsets"),
    }
    out = []
    for (check, table), (draw, alt) in drawers.items():
        if check != name or table not in tables or tables[table].empty:
            continue
        try:
            out.append(_image(draw(tables[table]), alt, alt))
        except Exception as err:  # a figure that cannot be drawn becomes a note
            log.warning("audit figure %s: %s", alt, err)
            out.append(_note(f"The figure of the {alt} could not be drawn: {err}"))
    return out


def _table(title: str, frame: pd.DataFrame, limit: int = 60) -> dict[str, Any]:
    frame = frame.head(limit)
    columns = []
    for column in frame.columns:
        numeric = pd.api.types.is_numeric_dtype(frame[column]) and not pd.api.types.is_bool_dtype(
            frame[column]
        )
        columns.append((column, column, "num") if numeric else (column, column))
    rows = frame.astype(object).where(frame.notna(), None).to_dict("records")
    return {"title": title, "rows": rows, "columns": columns}


def render_audit(result: Any) -> str:
    """HTML of an :class:`~harness.audit.AuditResult`."""
    sections = []
    for name, check in result.checks.items():
        tables = [
            _table(title, frame)
            for title, frame in check.tables.items()
            if isinstance(frame, pd.DataFrame) and not frame.empty
        ]
        sections.append(
            {
                "id": name,
                "title": TITLES.get(name, name),
                "verdict": check.verdict,
                "diagnosis": check.diagnosis,
                "about": ABOUT.get(name, ""),
                "figures": _figures(name, check.tables),
                "tables": tables,
            }
        )
    design = result.design
    facts = {
        "formula": result.spec.formula,
        "residual SD by": result.spec.sigma_by or "(one)",
        "family": result.spec.family,
        "rows": design.n,
        "harness priors": result.spec.priors if isinstance(result.spec.priors, str) else "custom",
    }
    context = {
        "title": f"Audit of {Path(result.model_path).name if result.model_path else 'a PyMC model'}",
        "verdict": result.verdict,
        "facts": facts,
        "summary": result.summary().to_dict("records"),
        "notes": result.notes,
        "sections": sections,
        "model_path": result.model_path or "(given as a function)",
        "model_source": result.source,
    }
    return render_page("audit.html.j2", context)


def write_audit(result: Any, path: str | os.PathLike[str]) -> Path:
    """Write the audit page to ``path`` (atomically)."""
    return write_html(render_audit(result), path)
