"""Render a :class:`~harness.pipeline.runner.DesignResult` to one self-contained HTML page.

Images are inline (PNG, or SVG for the equations, as ``data:`` URIs), the
style sheet is inline, and nothing points outside the file: opening a report
makes no network request.  Pages are written atomically (a temporary file in
the same folder, then ``os.replace``), so an interrupted run leaves the
previous page intact.

The templates live in ``harness/report/templates``: ``base.html.j2`` (blocks
``title``, ``head``, ``header``, ``nav``, ``content``, ``footer``; the
style sheet ``style.css`` inline), ``macros.html.j2`` (tables, verdict
badges, figures) and the pages that extend them.  Other pages (simulation
studies) can reuse them through :func:`template_env`, :func:`render_page`,
:func:`figure_to_data_uri` and :func:`write_html`.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from harness.report.html import (
    figure_to_data_uri,
    fmt,
    heap_frozen,
    render_page,
    write_html,
)
from harness.report.three_way import three_way_context

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from harness.model.spec import Design
    from harness.pipeline.runner import DesignResult

log = logging.getLogger("harness")

VERDICTS = ("pass", "look", "fail", "unreliable")


# --------------------------------------------------------------------------- shared helpers


def _image(fig: Figure, alt: str, caption: str = "", fmt_: str = "png") -> dict[str, Any]:
    # No fig.clear() afterwards: clearing re-initialises every Axes (a tenth of the
    # figures stage); the dropped figure is freed like any other object.
    image = figure_to_data_uri(fig, fmt_)
    return {**image, "alt": alt, "caption": caption, "note": ""}


def _note(text: str) -> dict[str, Any]:
    return {"uri": "", "alt": "", "caption": "", "note": text, "width": 0, "height": 0}


# --------------------------------------------------------------------------- equations


def _mt(name: str) -> str:
    """A name inside mathtext's \\mathrm{}, with special characters escaped."""
    out = []
    for ch in str(name):
        if ch in "_^$%#&{}":
            out.append("\\" + ch)
        elif ch == "\\":
            out.append("/")
        elif ch == " ":
            out.append("\\ ")
        else:
            out.append(ch)
    return r"\mathrm{" + "".join(out) + "}"


def _prior_mt(text: str) -> str:
    """``Normal(mu=298.5, sigma=282.1)`` -> mathtext ``\\mathrm{Normal}(298.5,\\ 282.1)``."""
    head, _, rest = text.partition("(")
    args = [a.split("=", 1)[-1].strip() for a in rest.rstrip(")").split(",") if a.strip()]
    return _mt(head) + "(" + r",\ ".join(args) + ")"


def model_equations(design: Design, priors: Any | None = None) -> dict[str, list[str]]:
    """The model in two ways, as mathtext lines.

    ``matrix``: y = X beta + Z u + e with the distributions and dimensions.
    ``varying``: the varying-effects form with the adaptive prior (the group
    coefficients drawn around the fixed effects), plus the PyMC priors.
    """
    n = design.n
    fixed = design.fixed_terms
    beta_index = {t: k for k, t in enumerate(fixed)}
    q = sum(b.n_levels * b.n_terms for b in design.blocks)
    hetero = design.sigma_levels is not None
    sigma_i = rf"\sigma_{{{_mt(design.spec.sigma_by or '')}[i]}}" if hetero else r"\sigma"
    matrix = [
        r"$\mathbf{y} = X\beta + Z\mathbf{u} + \varepsilon$",
        r"$\mathbf{u} \sim \mathrm{Normal}(\mathbf{0},\ G),\quad "
        + (
            rf"\varepsilon_i \sim \mathrm{{Normal}}(0,\ {sigma_i}^2)$ independently"
            if hetero
            else rf"\varepsilon \sim \mathrm{{Normal}}(\mathbf{{0}},\ \sigma^2 I_{{{n}}})$"
        ),
    ]
    g_parts, varying_lines, priors_lines = [], [], []
    mu_terms = []
    letters = "abcdefgh"
    for b_i, block in enumerate(design.blocks):
        letter = letters[b_i % len(letters)]
        j = f"j_{{{b_i + 1}}}" if len(design.blocks) > 1 else "j"
        k = block.n_terms
        if k > 1 and block.correlated:
            g_parts.append(rf"I_{{{block.n_levels}}} \otimes \Sigma_{{{_mt(block.label)}}}")
        else:
            taus = ",".join(rf"\tau_{{{_mt(block.label)},{m}}}^2" for m in range(k))
            g_parts.append(rf"I_{{{block.n_levels}}} \otimes \mathrm{{diag}}({taus})")
        coefs, means = [], []
        for m, term in enumerate(block.terms):
            coef = f"{letter}_{{{m},{j}}}"
            coefs.append(coef)
            means.append(rf"\beta_{{{beta_index[term]}}}" if term in beta_index else "0")
            x = "" if term == "(Intercept)" else rf"\,{_mt(term)}_i"
            mu_terms.append(f"{letter}_{{{m},{j}[i]}}{x}")
        if k > 1 and block.correlated:
            varying_lines.append(
                rf"$({', '.join(coefs)}) \sim \mathrm{{MVNormal}}(({', '.join(means)}),\ S_{{{_mt(block.label)}}})"
                rf",\quad S = \mathrm{{diag}}(\tau)\,R\,\mathrm{{diag}}(\tau)$"
            )
        else:
            for m, (coef, mean) in enumerate(zip(coefs, means, strict=True)):
                varying_lines.append(
                    rf"${coef} \sim \mathrm{{Normal}}({mean},\ \tau_{{{_mt(block.label)},{m}}})$"
                )
    for term in fixed:
        if not any(term in b.terms for b in design.blocks):
            x = "" if term == "(Intercept)" else rf"\,{_mt(term)}_i"
            mu_terms.append(rf"\beta_{{{beta_index[term]}}}{x}")
    matrix.append(r"$G = " + r" \oplus ".join(g_parts) + "$" if g_parts else r"$G = 0$")
    matrix.append(
        rf"$\mathbf{{y}}: {n}\times 1,\quad X: {n}\times {len(fixed)},\quad \beta: {len(fixed)}\times 1,"
        rf"\quad Z: {n}\times {q},\quad \mathbf{{u}}: {q}\times 1$"
    )
    varying = [
        rf"${_mt(design.response)}_i \sim \mathrm{{Normal}}(\mu_i,\ {sigma_i})$",
        r"$\mu_i = " + " + ".join(mu_terms) + "$",
        *varying_lines,
    ]
    if priors is not None:
        for term, prior in priors.fixed.items():
            priors_lines.append(rf"\beta_{{{beta_index[term]}}} \sim {_prior_mt(prior.describe())}")
        for (label, term), prior in priors.sd.items():
            block = next(b for b in design.blocks if b.label == label)
            priors_lines.append(
                rf"\tau_{{{_mt(label)},{block.terms.index(term)}}} \sim {_prior_mt(prior.describe())}"
            )
        if getattr(priors, "has_sigma", True):  # no residual SD in a GLMM (issue 12)
            priors_lines.append(
                rf"{sigma_i.replace('[i]', '')} \sim {_prior_mt(priors.sigma.describe())}"
            )
        if any(b.correlated and b.n_terms > 1 for b in design.blocks):
            priors_lines.append(rf"R \sim \mathrm{{LKJ}}({priors.lkj_eta:g})")
        for start in range(0, len(priors_lines), 3):
            varying.append("$" + r",\quad ".join(priors_lines[start : start + 3]) + "$")
    return {"matrix": matrix, "varying": varying}


def equation_legend(design: Design) -> list[str]:
    """Plain-text key to the symbols of :func:`model_equations`."""
    fixed = ", ".join(f"β{k} = {t}" for k, t in enumerate(design.fixed_terms))
    lines = [f"Fixed effects: {fixed}."]
    for b_i, block in enumerate(design.blocks):
        j = f"j{b_i + 1}" if len(design.blocks) > 1 else "j"
        terms = ", ".join(f"{m} = {t}" for m, t in enumerate(block.terms))
        lines.append(
            f"{j}[i] = the {block.factor} of observation i ({block.n_levels} levels); "
            f"term index {terms}."
        )
    return lines


# --------------------------------------------------------------------------- figures


#: The figures of a report (each a list of images or notes), in page order.
FIGURES = (
    "attribution",
    "forest",
    "ranef",
    "caterpillar",
    "variance",
    "shrinkage",
    "eq_matrix",
    "eq_varying",
    "z",
    "predictive",
    "rootogram",
    "new_group",
    "rank",
)


def render_figures(result: DesignResult) -> dict[str, Any]:
    """Draw every figure of a report and return them as inline images (and the tables they need).

    The runner caches this dict under a hash of the fits and the plotting
    code, so warm re-runs skip plotting (and loading the draws) entirely.
    """
    with heap_frozen():
        try:
            return _draw_figures(result)
        except Exception as err:  # each figure guards itself; this is for what they share
            note = _figure_note("every figure", err)
            return {
                **{key: [note] for key in FIGURES},
                "equation_legend": [],
                "new_group_table": [],
                "dispersion_table": [],
                # Count checks are a section of count families' pages only.
                "rootogram": [note] if _counts(result) else [],
            }


def _figure(
    what: str,
    draw: Callable[[], Figure],
    alt: str,
    caption: str = "",
    fmt_: str = "png",
) -> dict[str, Any]:
    """One figure as an inline image, or a note naming it and why it could not be drawn.

    A figure is never worth a lost report: whatever ``draw`` (or rendering its
    image) raises is logged and shown in the figure's place.
    """
    try:
        return _image(draw(), alt, caption, fmt_)
    except Exception as err:  # any failure of one figure becomes its note
        return _figure_note(what, err)


def _figure_note(what: str, err: BaseException) -> dict[str, Any]:
    why = str(err).strip() or "no message"
    log.warning("figure not drawn: %s (%s: %s)", what, type(err).__name__, why)
    log.debug("figure %s", what, exc_info=err)
    return _note(f"The figure “{what}” could not be drawn: {why} ({type(err).__name__}).")


def _units(result: DesignResult) -> tuple[dict[str, str], dict[str, str]]:
    """Unit of each coefficient and of each variance component, for the axis labels."""
    from harness.report import tables as rt

    cmp, design = result.comparison, result.design
    unit_of = {t: rt.coefficient_unit(t, design) for t in design.fixed_terms}
    for block in design.blocks:
        for term in block.terms:
            unit_of.setdefault(term, rt.coefficient_unit(term, design))
    var_units = {}
    for row in cmp.variance.to_dict("records"):
        if row["kind"] == "sigma":
            var_units[row["component"]] = rt.response_unit(design)
        elif row["kind"] == "sd":
            var_units[row["component"]] = unit_of.get(
                row["term"] if isinstance(row.get("term"), str) else "", ""
            )
    for row in result.freq.variance.to_dict("records"):
        if row["kind"] == "sd" and isinstance(row.get("term"), str):
            var_units[row["component"]] = unit_of.get(row["term"], "")
    if design.family.link_scale:  # coefficients on the link scale (log-odds, log rate)
        unit_of = dict.fromkeys(unit_of, design.family.scale_name)
        var_units = dict.fromkeys(var_units, design.family.scale_name)
    return unit_of, var_units


def _overview(result: DesignResult) -> Figure:
    from harness.report.bars import attribution_segments, overview_figure

    return overview_figure(attribution_segments(_verdict_table(result)))


def _draw_figures(result: DesignResult) -> dict[str, Any]:
    from harness.report import plots
    from harness.report import tables as rt

    cmp, design, bayes = result.comparison, result.design, result.bayes
    try:
        unit_of, var_units = _units(result)
    except Exception as err:  # units only label axes: draw without them
        log.warning("figures drawn without units (%s: %s)", type(err).__name__, err)
        unit_of, var_units = {}, {}
    out: dict[str, Any] = {}
    factors = list(dict.fromkeys(b.factor for b in design.blocks))
    try:  # on the family's plotted scale: the response, a proportion, a count
        y_label = design.family.response_label(
            design.response, design.trials, rt.response_unit(design)
        )
    except Exception as err:  # a label is no reason to lose the figures
        log.warning("figures labelled without units (%s: %s)", type(err).__name__, err)
        y_label = str(design.response)

    out["attribution"] = [
        _figure(
            "where each gap comes from (all rows)",
            lambda: _overview(result),
            "Every verdict row's gap split into its sources, in one figure",
            "Each row to its own scale (the label gives the half-width): the named sources in "
            "colour, the rest thin, PyMC's value as the orange tick with ± 2 MCSE; the shaded "
            "band is what the rest may be.",
        )
    ]
    out["forest"] = [
        _figure(
            "fixed effects (forest plot)",
            lambda: plots.forest_plot(cmp.fixed, unit_of),
            "Forest plot of the fixed effects from lme4 and PyMC",
        )
    ]
    out["ranef"] = [
        _figure(
            f"random effects of {f} (lme4 modes against PyMC offsets)",
            partial(plots.ranef_scatter, cmp.offsets, f, unit_of),
            f"lme4 conditional modes against PyMC posterior offsets for {f}",
            f"{f}: each point is one group; error bars ±1 conditional SD (lme4, "
            "horizontal) and ±1 posterior SD (PyMC, vertical); dashed: y = x.",
        )
        for f in factors
    ]
    coefs: pd.DataFrame | None = None
    try:
        coefs = rt.group_coefficients(cmp, bayes)
    except Exception as err:  # the figures that need it become notes
        out["caterpillar"] = [_figure_note(f"per-group coefficients of {f}", err) for f in factors]
        out["shrinkage"] = [_figure_note("shrinkage", err)]
    else:
        out["caterpillar"] = [
            _figure(
                f"per-group coefficients of {f} (caterpillar plot)",
                partial(plots.caterpillar, coefs, f, unit_of),
                f"Per-group coefficients for {f} from both engines",
                f"{f}: per-group coefficients (fixed + random effect), sorted by lme4.",
            )
            for f in factors
        ]
    out["variance"] = [
        _figure(
            "variance components (posterior densities)",
            lambda: plots.variance_density(
                rt.variance_draws(bayes, cmp.variance),
                cmp.variance,
                rt.ml_variance(result.freq, design),
                var_units,
                result.freq.method,
            ),
            "Posterior densities of the variance components with lme4's estimates",
        )
    ]
    shrinks: list[Any] = []
    if coefs is not None:
        out["shrinkage"] = []
        try:
            shrinks = rt.shrinkage(cmp, coefs, design)
        except Exception as err:
            out["shrinkage"].append(_figure_note("shrinkage", err))
    for shrink in shrinks:
        if shrink.table["unpooled"].notna().any():
            out["shrinkage"].append(
                _figure(
                    f"shrinkage of {shrink.factor}",
                    partial(plots.shrinkage_plot, shrink, unit_of),
                    f"Shrinkage plot for {shrink.factor}",
                    f"{shrink.factor}: " + (shrink.note or "every group fitted on its own"),
                )
            )
        else:
            out["shrinkage"].append(
                _note(
                    f"{shrink.factor}: no shrinkage plot — no group can be fitted on its own "
                    f"({shrink.note})."
                )
            )
    out["z"] = [
        _figure(
            "random-effects design matrix Z",
            lambda: plots.z_matrix(design.Z(), design.Z_column_names()),
            "Picture of the random-effects design matrix Z",
        )
    ]
    try:
        # The gaussian forms, rewritten by the family (link scale, its likelihood).
        equations = design.family.equations(
            model_equations(design, bayes.priors), design.response, design.offset is not None
        )
    except Exception as err:
        out["eq_matrix"] = [_figure_note("model equations", err)]
        out["eq_varying"] = []
    else:
        for name, lines in equations.items():
            try:
                out[f"eq_{name}"] = [_image(plots.equations(lines), " ; ".join(lines), fmt_="svg")]
            except Exception as err:  # a name mathtext cannot typeset: show the source instead
                log.warning(
                    "mathtext could not render the %s equations (%s); showing text", name, err
                )
                out[f"eq_{name}"] = [_note("\n".join(lines))]
    try:
        out["equation_legend"] = equation_legend(design)
    except Exception as err:
        log.warning("no key to the equations' symbols (%s: %s)", type(err).__name__, err)
        out["equation_legend"] = []

    def predictive_panels() -> Figure:
        pred = rt.predictive_table(
            cmp, bayes, design, seed=result.seed, max_groups=plots.MAX_PANELS
        )
        x = rt.x_column(design)
        return plots.predictive_panels(pred, rt.column_label(x) if x else "observation", y_label)

    out["predictive"] = [
        _figure(
            "observed data and fitted values per group",
            predictive_panels,
            "Observed data per group with both engines' fitted values",
        )
    ]
    out["rootogram"], out["dispersion_table"] = _count_checks(result, y_label)
    try:
        new_group = rt.new_group_table(cmp, bayes, design, seed=result.seed)
    except Exception as err:
        out["new_group"] = [_figure_note("prediction for a new group", err)]
        out["new_group_table"] = []
    else:
        out["new_group"] = [
            _figure(
                "prediction for a new group",
                lambda: plots.new_group_plot(new_group, y_label, engine=result.freq.engine),
                "Prediction for a new group from both engines",
            )
        ]
        out["new_group_table"] = new_group.to_dict("records")
    out["rank"] = [
        _figure(
            "rank plots per chain",
            lambda: plots.rank_plot(rt.rank_draws(bayes)),
            "Rank plots of the main parameters per chain",
        )
    ]
    return out


def _counts(result: DesignResult) -> bool:
    """Whether the response is a count family's, checked by a rootogram (issue 23)."""
    family = getattr(getattr(result, "design", None), "family", None)
    return bool(getattr(family, "unbounded_counts", False))


def _count_checks(result: DesignResult, y_label: str) -> tuple[list[Any], list[dict[str, Any]]]:
    """A count family's rootogram and dispersion rows; nothing for other families."""
    if not _counts(result):
        return [], []
    from harness.checks.dispersion import count_check_tables
    from harness.report.rootogram import rootogram_figure

    try:
        checks = count_check_tables(
            result.comparison, result.bayes, result.design, seed=result.seed
        )
    except Exception as err:  # the section says why instead
        return [_figure_note("rootogram and dispersion", err)], []
    figure = _figure(
        "rootogram",
        lambda: rootogram_figure(checks.rootogram, y_label, engine=result.freq.engine),
        "Hanging rootogram of the observed counts against both engines' expected frequencies",
        "Bars: √(observed frequency) of each count, hanging from √(expected frequency); a foot "
        "below zero: more observations of that count than expected, above zero: fewer.",
    )
    return [figure], checks.dispersion.to_dict("records")


# --------------------------------------------------------------------------- pages


def _records(
    frame: pd.DataFrame | None, columns: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    if frame is None or len(frame) == 0:
        return []
    if columns is not None:
        frame = frame[[c for c in columns if c in frame.columns]]
    return frame.to_dict("records")


def _verdict_counts(rows: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    counts = dict.fromkeys(VERDICTS, 0)
    for row in rows:
        if row.get("verdict") in counts:
            counts[row["verdict"]] += 1
    return counts


def _verdict_table(result: DesignResult) -> pd.DataFrame:
    from harness.report.tables import verdict_table

    return verdict_table(
        result.comparison,
        result.same_model,
        engine=result.freq.engine,
        priors=_priors_rows(result.bayes_info),
    )


def _verdict_rows(result: DesignResult) -> list[dict[str, Any]]:
    return _verdict_table(result).to_dict("records")


def _priors_rows(bayes: Any) -> list[dict[str, str]]:
    try:
        return list(bayes.priors.table())
    except Exception:  # an older pickled fit without the table method: show the profile only
        return [{"parameter": "profile", "prior": str(getattr(bayes.priors, "profile", "?"))}]


def _response_note(result: DesignResult) -> str:
    """Say what the likelihood is of when the formula transforms the response."""
    from harness.model.spec import parse_formula

    design = getattr(result, "design", None)
    if design is None or design.family.discrete:  # counts are never transformed
        return ""
    parsed = parse_formula(design.spec.formula)
    if not parsed.transformed_response:
        return ""
    columns = ", ".join(parsed.response_columns)
    return (
        f"The response is {parsed.response}: both engines fit the same transformed values "
        f"(computed once from {columns}; lme4 evaluates the same call on the same rows), so these "
        f"log-likelihoods are of {parsed.response}, not of {columns} (no Jacobian term): "
        f"they cannot be compared with a fit of the untransformed {columns}."
    )


def _same_model_context(result: DesignResult) -> dict[str, Any]:
    sm = result.same_model
    if sm is None:
        return {
            "available": False,
            "status": result.same_model_status or "same-model check not available",
            "response_note": _response_note(result),
        }
    estimates = getattr(sm, "estimates", None)
    reasons = list(getattr(sm, "reasons", None) or [])
    return {
        "available": True,
        "response_note": _response_note(result),
        "ok": bool(getattr(sm, "ok", False)),
        "status": result.same_model_status,
        "loglik_lme4": getattr(sm, "loglik_lme4", float("nan")),
        "loglik_pymc": getattr(sm, "loglik_pymc", float("nan")),
        "difference": getattr(sm, "difference", float("nan")),
        "engine": getattr(sm, "engine", ""),
        "reasons": reasons,
        "notes": list(getattr(sm, "notes", None) or []),
        "likelihoods": _records(sm.likelihood_table()) if hasattr(sm, "likelihood_table") else [],
        "estimates": _records(estimates) if isinstance(estimates, pd.DataFrame) else [],
        "estimate_columns": list(estimates.columns) if isinstance(estimates, pd.DataFrame) else [],
        "verdict": str(getattr(sm, "verdict", "")),
        "lme4_short": bool(getattr(sm, "lme4_short", False)),
        "lme4_optimum": str(getattr(sm, "lme4_optimum", "") or ""),
        "refits": _refit_records(getattr(sm, "lme4_refits", None)),
    }


def _refit_records(refits: Any) -> list[dict[str, Any]]:
    """The lme4 refits table as rows for the page (empty when none were tried)."""
    if not isinstance(refits, pd.DataFrame) or refits.empty:
        return []
    frame = refits.copy()
    frame["converged"] = [
        "—" if v is None or pd.isna(v) else ("yes" if v else "no") for v in frame["converged"]
    ]
    frame["best"] = ["best" if v else "" for v in frame["best"]]
    return _records(frame)


def _split_diagnostics(diagnostics: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """Main parameters row by row; per-group offsets (one row per group and term) summarised."""
    names = diagnostics["parameter"].astype(str)
    per_group = names.str.match(r"^(u|coef)_")
    constant = diagnostics["r_hat"].isna() & names.str.startswith("corr_")  # diagonal of R
    main = diagnostics[~per_group & ~constant]
    groups = diagnostics[per_group]
    summary = ""
    if len(groups):
        summary = (
            f"{len(groups)} per-group offsets (u): smallest bulk ESS "
            f"{fmt(groups['ess_bulk'].min())}, smallest tail ESS {fmt(groups['ess_tail'].min())}, "
            f"largest R-hat {fmt(groups['r_hat'].max())}."
        )
    return main, summary


def _engines_line(result: DesignResult) -> str:
    """Every engine that fitted the design, as the report names it (the reference first)."""
    from harness.engines.registry import ENGINES

    parts = []
    for name in result.engines:
        engine = ENGINES.get(name)
        label = engine.label if engine is not None else name
        parts.append(label if label == name else f"{label} ({name})")
    return ", ".join(parts)


def report_context(result: DesignResult, figures: Mapping[str, Any]) -> dict[str, Any]:
    """Everything ``report.html.j2`` renders, as plain values (templates only render)."""
    from harness.report.verdict import verdict_view

    cmp, freq, bayes = result.comparison, result.freq, result.bayes_info
    view = verdict_view(_verdict_table(result))
    verdict_rows = view["rows"]
    extra_notes = []
    if freq.stand_in:
        extra_notes.append(freq.stand_in)
    priors_profile = getattr(bayes.priors, "profile", "weak")
    extra_notes.append(
        f"PyMC priors: the '{priors_profile}' profile (table in section 6). A posterior mean "
        "moves toward the prior when the data say little — most visibly for group SDs with few groups."
    )
    if freq.method == "REML":
        extra_notes.append(
            "lme4 reports REML estimates of the variance components; PyMC reports posterior "
            "summaries (the verdict table uses the posterior median, closer to the mode-like REML "
            "value than the mean for right-skewed SD posteriors)."
        )
    stats = cmp.sampler_stats
    versions = result.versions
    version_rows = [
        ("R", versions.get("R")),
        ("lme4", versions.get("lme4")),
        ("nlme", versions.get("nlme")),
        ("merTools", versions.get("merTools")),
        ("lmerTest", versions.get("lmerTest")),
        ("Matrix (R)", versions.get("Matrix")),
        ("rpy2", versions.get("rpy2")),
        ("PyMC", bayes.versions.get("pymc", versions.get("pymc"))),
        ("PyTensor", bayes.versions.get("pytensor", versions.get("pytensor"))),
        ("ArviZ", bayes.versions.get("arviz", versions.get("arviz"))),
        (bayes.sampler, bayes.versions.get(bayes.sampler, versions.get(bayes.sampler))),
        ("numba", bayes.versions.get("numba", versions.get("numba"))),
        ("NumPy", versions.get("numpy")),
        ("Python", versions.get("python")),
        ("harness", versions.get("harness")),
    ]
    timing_rows = [
        (f"{freq.engine} fit", result.timings.get("lme4_fit"), result.cached.get("lme4")),
        ("PyMC model compile", result.timings.get("pymc_compile"), result.cached.get("pymc")),
        ("PyMC sampling", result.timings.get("pymc_sample"), result.cached.get("pymc")),
        ("comparison", result.timings.get("compare"), result.cached.get("compare")),
        ("same-model check", result.timings.get("same_model"), result.cached.get("same_model")),
        ("figures", result.timings.get("figures"), result.cached.get("figures")),
    ]
    diagnostics, offsets_summary = _split_diagnostics(cmp.diagnostics)
    adaptive = bayes.settings.get("adaptive")
    from harness.report.tables import adaptive_rounds_table

    return {
        "title": f"{result.name}: lme4 vs PyMC",
        "name": result.name,
        "description": result.description,
        "formula": result.spec.formula,
        "sigma_by": result.spec.sigma_by,
        # glmer's families: the family and the model form the headings name
        "family": result.design.family.key if result.design.family.laplace else "",
        "verdict": result.verdict,
        "counts": _verdict_counts(verdict_rows),
        "verdict_rows": verdict_rows,
        "verdict_legend": view["legend"],
        "general_notes": extra_notes + [n for n in cmp.notes if n not in extra_notes],
        "uncertainty": _records(cmp.uncertainty),
        "fixed": _records(cmp.fixed),
        "variance": _records(cmp.variance),
        "agreement": _records(cmp.agreement),
        "figures": figures,
        "engine": freq.engine,
        "method": freq.method,
        "r_call": freq.r_call,
        "model_code": bayes.model_code,
        "parameterization": result.spec.parameterization,
        "priors": _priors_rows(bayes),
        "new_group": figures.get("new_group_table") or [],
        "diagnostics": _records(diagnostics),
        "offsets_summary": offsets_summary,
        "diagnostic_columns": [
            c
            for c in (
                "parameter",
                "mean",
                "sd",
                "mcse_mean",
                "mcse_sd",
                "ess_bulk",
                "ess_tail",
                "r_hat",
            )
            if c in diagnostics.columns
        ],
        "sampler_stats": stats,
        "adaptive_rounds": _records(adaptive_rounds_table(adaptive)),
        "adaptive_reason": adaptive.get("reason") if adaptive else None,
        "adaptive_budget_spent": bool(adaptive.get("budget_spent")) if adaptive else False,
        "messages": list(freq.messages),
        "converged": freq.converged,
        "singular": freq.singular,
        "same_model": _same_model_context(result),
        "three_way": three_way_context(result),
        "versions": [(k, v) for k, v in version_rows if v],
        "provenance": {
            "data hash": result.design.data_hash(),
            "observations": result.design.n,
            "PyMC seed": result.seed,
            "merTools::REsim seed": result.settings.lme4_seed,
            "sampler": bayes.sampler,
            "chains": bayes.chains,
            "draws per chain": bayes.draws,
            "tuning steps per chain": bayes.tune,
            "target_accept": bayes.settings.get("target_accept", result.settings.target_accept),
            "lme4 profile intervals": result.settings.profile,
            "REsim draws": result.settings.n_sims,
            "lme4 method": freq.method,
            "lme4 df method": freq.df_method or "—",
            "engines": _engines_line(result),
        },
        "timings": timing_rows,
        "keys": result.keys,
        "generated": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def write_report(result: DesignResult, path: str | os.PathLike[str]) -> Path:
    """Write the report of one design to ``path`` (one self-contained HTML file).

    Parameters
    ----------
    result : DesignResult
        From :func:`harness.pipeline.runner.fit_design`.  Its cached figures are used
        when present; otherwise they are drawn now.
    path : path

    Returns
    -------
    Path
        The file written.
    """
    return write_html(render_report(result), path)


def render_report(result: DesignResult) -> str:
    """The report of one design as HTML text (what :func:`write_report` writes)."""
    figures = result.figures if result.figures is not None else render_figures(result)
    return render_page("report.html.j2", report_context(result, figures))


def write_index(
    results: Sequence[DesignResult],
    path: str | os.PathLike[str],
    failures: Mapping[str, str] | None = None,
) -> Path:
    """Write the index page: every report with its verdict at a glance.

    Parameters
    ----------
    results : sequence of DesignResult
        Each report is linked as ``<name>.html`` next to the index.
    path : path
    failures : mapping, optional
        Design name -> error message, for designs whose report could not be made.
    """
    rows = []
    for result in results:
        verdict_rows = _verdict_rows(result)
        rows.append(
            {
                "name": result.name,
                "href": f"{result.name}.html",
                "verdict": result.verdict,
                "counts": _verdict_counts(verdict_rows),
                "formula": result.spec.formula,
                "sigma_by": result.spec.sigma_by,
                "engine": result.freq.engine,
                "same_model": "not available"
                if result.same_model is None
                else ("pass" if getattr(result.same_model, "ok", False) else "fail"),
                "description": result.description,
                "cached": bool(result.cached.get("lme4") and result.cached.get("pymc")),
            }
        )
    context = {
        "title": "lme4 vs PyMC: reports",
        "rows": rows,
        "failures": dict(failures or {}),
        "generated": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
    return write_html(render_page("index.html.j2", context), path)
