"""Two posteriors side by side: PyMC against brms (or any two Bayesian fits of one design).

Two samplers of the same posterior differ only by Monte Carlo error, so each
compared quantity's gap is measured in the two Monte Carlo standard errors
combined: ``z = (mean_a - mean_b) / sqrt(mcse_a**2 + mcse_b**2)``.  A row
passes when ``|z| <= 3`` (issue 22).  A row whose draws miss the sampler's own
rules on either side (R-hat, bulk and tail ESS, divergences; the rules of
:mod:`harness.checks.compare`) is ``unreliable``: its MCSE cannot be trusted,
so neither can ``z``.

The rows are the ones the lme4-vs-PyMC comparison names: each fixed effect
(``"Days"``), each SD and correlation of a random-effects block
(``"Subject: sd(Days)"``, ``"Subject: cor((Intercept),Days)"``) and the residual
SD (``"sigma"``, or ``"sigma: arm=control"`` per level).  With the reference
comparison beside it, :func:`three_way_table` and :func:`gap_side` say on which
side a gap to lme4 sits: when the two posteriors agree, a gap to lme4 is the
gap between a posterior and an (RE)ML estimate; when they do not, one of the
Bayesian fits is wrong.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from harness.checks.compare import (
    _posterior_component,
    _row_reliable,
    _summary,
    _unreliable_reason,
)

if TYPE_CHECKING:
    import xarray as xr

    from harness.checks.compare import Comparison
    from harness.fits import BayesFit

log = logging.getLogger("harness")

__all__ = [
    "Z_MAX",
    "BayesComparison",
    "bayes_rows",
    "compare_bayes",
    "gap_side",
    "three_way_table",
]

#: Largest |difference| in combined MCSEs for a row to pass.
Z_MAX = 3.0
#: Worst last: an unreliable row outranks a failing one, as in :class:`~harness.checks.compare.Comparison`.
_ORDER = ("pass", "fail", "unreliable")


@dataclass
class BayesComparison:
    """What :func:`compare_bayes` returns: one row per compared quantity.

    Attributes
    ----------
    table : DataFrame
        table (``"fixed"`` or ``"variance"``), row (the term or component name),
        ``<a>_mean``, ``<a>_sd``, ``<a>_mcse``, ``<a>_r_hat``, ``<a>_ess_bulk``,
        ``<a>_ess_tail`` and the same for ``<b>`` (``a``, ``b``: the engines'
        names), diff (``<a>_mean - <b>_mean``), mcse (the two combined), z,
        verdict (``pass`` / ``fail`` / ``unreliable``) and note.
    engines : (str, str)
        The pair by registry name, e.g. ``("pymc", "brms")``.
    z_max : float
        The |z| a passing row keeps.
    notes : list of str
    """

    table: pd.DataFrame
    engines: tuple[str, str]
    z_max: float = Z_MAX
    notes: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        """Worst row verdict (``unreliable`` worst); ``pass`` for an empty table."""
        verdicts = [v for v in self.table["verdict"] if v in _ORDER] if len(self.table) else []
        return max(verdicts, key=_ORDER.index, default="pass")

    @property
    def max_abs_z(self) -> float:
        """Largest |z| over the rows (NaN when no row has one)."""
        z = np.abs(self.table["z"].to_numpy(dtype=float)) if len(self.table) else np.array([])
        return float(np.nanmax(z)) if np.isfinite(z).any() else float("nan")

    def tables(self) -> dict[str, pd.DataFrame]:
        return {"bayes": self.table}


def bayes_rows(bayes: BayesFit) -> list[tuple[str, str]]:
    """The (table, row name) pairs compared, in the order lme4 reports them.

    Fixed effects from the posterior's ``fixed_term`` coordinate, then per
    random-effects block its SDs and (correlated blocks) its correlations, then
    the residual SD(s) when the family has one.
    """
    design = bayes.design
    posterior = bayes.idata.posterior
    rows = [("fixed", str(t)) for t in posterior["beta"].coords["fixed_term"].values]
    for block in design.blocks:
        rows += [("variance", f"{block.label}: sd({t})") for t in block.terms]
        if block.correlated:
            terms = block.terms
            rows += [
                ("variance", f"{block.label}: cor({a},{b})")
                for i, a in enumerate(terms)
                for b in terms[i + 1 :]
            ]
    if "sigma" in posterior:
        if design.sigma_levels is not None:
            column = design.spec.sigma_by
            rows += [("variance", f"sigma: {column}={level}") for level in design.sigma_levels]
        else:
            rows.append(("variance", "sigma"))
    return rows


def _draws(bayes: BayesFit, table: str, row: str) -> xr.DataArray:
    if table == "fixed":
        return bayes.idata.posterior["beta"].sel(fixed_term=row)
    draws = _posterior_component(bayes, row)
    if draws is None:
        raise ValueError(f"the {bayes.engine} posterior has no parameter for {row!r}")
    return draws


def compare_bayes(
    first: BayesFit,
    second: BayesFit,
    *,
    engines: tuple[str, str] | None = None,
    z_max: float = Z_MAX,
    prob: float = 0.95,
) -> BayesComparison:
    """Compare two Bayesian fits of one design, row by row, in combined Monte Carlo error.

    Parameters
    ----------
    first, second : BayesFit
        Two posteriors of the same design (e.g. PyMC and brms), whose posteriors
        carry the harness's variable names (:mod:`harness.names`).
    engines : (str, str), optional
        The pair's names; default the fits' ``engine`` attributes.
    z_max : float
        A row passes when ``|diff| <= z_max`` combined MCSEs.
    prob : float
        Interval mass of the summaries (the table keeps only means, SDs and MCSEs).

    Returns
    -------
    BayesComparison

    Raises
    ------
    ValueError
        When the two fits do not name the same rows (different designs).
    """
    a, b = engines if engines is not None else (first.engine, second.engine)
    if a == b:
        a, b = f"{a}_1", f"{b}_2"
    rows_first, rows_second = bayes_rows(first), bayes_rows(second)
    if rows_first != rows_second:
        only = sorted(set(rows_first) ^ set(rows_second))
        raise ValueError(f"the two fits compare different quantities: {only}")
    records = []
    for table, row in rows_first:
        stats = {a: _summary(_draws(first, table, row), prob)}
        stats[b] = _summary(_draws(second, table, row), prob)
        diff = stats[a]["mean"] - stats[b]["mean"]
        mcse = float(np.hypot(stats[a]["mcse"], stats[b]["mcse"]))
        z = diff / mcse if mcse > 0 else (0.0 if diff == 0 else float("inf"))
        unreliable = [
            f"{name}: {_unreliable_reason(stats[name], fit)}"
            for name, fit in ((a, first), (b, second))
            if not _row_reliable(stats[name], fit)
        ]
        if unreliable:
            verdict, note = "unreliable", "; ".join(unreliable)
        elif not np.isfinite(z) or abs(z) > z_max:
            verdict = "fail"
            note = f"the posterior means differ by {z:.2f} combined MCSE (more than {z_max:g})"
        else:
            verdict = "pass"
            note = f"within {z_max:g} combined MCSE"
        record: dict[str, Any] = {"table": table, "row": row}
        for name in (a, b):
            s = stats[name]
            record |= {
                f"{name}_mean": s["mean"],
                f"{name}_sd": s["sd"],
                f"{name}_mcse": s["mcse"],
                f"{name}_r_hat": s["r_hat"],
                f"{name}_ess_bulk": s["ess_bulk"],
                f"{name}_ess_tail": s["ess_tail"],
            }
        record |= {"diff": diff, "mcse": mcse, "z": z, "verdict": verdict, "note": note}
        records.append(record)
    result = BayesComparison(table=pd.DataFrame(records), engines=(a, b), z_max=z_max)
    log.info(
        "%s vs %s: %s (max |z| %.2f over %d rows)",
        a,
        b,
        result.verdict,
        result.max_abs_z,
        len(records),
    )
    return result


def _reference_rows(reference: Comparison | None) -> dict[str, dict[str, Any]]:
    """lme4's estimate and the lme4-vs-PyMC verdict per row name."""
    if reference is None:
        return {}
    out: dict[str, dict[str, Any]] = {}
    for frame, key in ((reference.fixed, "term"), (reference.variance, "component")):
        for record in frame.to_dict("records"):
            out[str(record[key])] = {
                "estimate": record.get("lme4_estimate", float("nan")),
                "verdict": record.get("verdict", ""),
            }
    return out


def _row_side(reference_verdict: str, bayes_verdict: str) -> str:
    """Where one row's gap sits, from its two verdicts."""
    if bayes_verdict == "unreliable":
        return "cannot tell (a posterior is unreliable)"
    if bayes_verdict == "fail":
        return "between the Bayesian fits"
    if reference_verdict in ("", "pass"):
        return "no gap" if reference_verdict == "pass" else "no reference"
    if reference_verdict == "unreliable":
        return "cannot tell (a posterior is unreliable)"
    return "Bayes vs (RE)ML"


def three_way_table(bayes: BayesComparison, reference: Comparison | None) -> pd.DataFrame:
    """lme4 | first | second side by side per row, both verdicts and where a gap sits.

    Parameters
    ----------
    bayes : BayesComparison
        The two posteriors' comparison (e.g. PyMC vs brms).
    reference : Comparison or None
        The reference against the first Bayesian engine (lme4 vs PyMC), whose
        ``lme4_estimate`` and ``verdict`` each row takes; None leaves them empty.

    Returns
    -------
    DataFrame
        table, row, lme4, ``<a>``, ``<b>`` (posterior means), diff, mcse, z,
        reference_verdict, verdict (the two posteriors'), side.
    """
    a, b = bayes.engines
    ref = _reference_rows(reference)
    records = []
    for record in bayes.table.to_dict("records"):
        r = ref.get(record["row"], {"estimate": float("nan"), "verdict": ""})
        records.append(
            {
                "table": record["table"],
                "row": record["row"],
                "lme4": r["estimate"],
                a: record[f"{a}_mean"],
                b: record[f"{b}_mean"],
                "diff": record["diff"],
                "mcse": record["mcse"],
                "z": record["z"],
                "reference_verdict": r["verdict"],
                "verdict": record["verdict"],
                "side": _row_side(str(r["verdict"]), str(record["verdict"])),
            }
        )
    return pd.DataFrame(records)


def gap_side(bayes: BayesComparison, reference: Comparison | None, labels: dict[str, str]) -> str:
    """One sentence: on which side the gaps to lme4 sit.

    Parameters
    ----------
    bayes : BayesComparison
    reference : Comparison or None
        lme4 against the first Bayesian engine.
    labels : dict
        Display names by engine name (``{"pymc": "PyMC", "brms": "brms"}``).
    """
    a, b = (labels.get(n, n) for n in bayes.engines)
    table = bayes.table
    z_text = f"{bayes.z_max:g} combined MCSE"
    if bayes.verdict == "unreliable":
        rows = ", ".join(table.loc[table["verdict"] == "unreliable", "row"])
        return (
            f"Cannot tell on which side a gap sits: the {a} or {b} draws of {rows} miss "
            "R-hat/ESS, so their Monte Carlo error is not known."
        )
    if bayes.verdict == "fail":
        rows = ", ".join(table.loc[table["verdict"] == "fail", "row"])
        return (
            f"{a} and {b} differ by more than {z_text} on {rows}: two samplers of the same "
            "posterior cannot, so one of the Bayesian fits is wrong (its model, priors or "
            "sampler); a gap to lme4 on these rows says nothing about Bayes vs (RE)ML."
        )
    gaps = []
    if reference is not None:
        for frame, key in ((reference.fixed, "term"), (reference.variance, "component")):
            gaps += [
                str(r) for r, v in zip(frame[key], frame["verdict"], strict=True) if v != "pass"
            ]
    if gaps:
        return (
            f"{a} and {b} agree within {z_text} on every row, so the gaps to lme4 "
            f"({', '.join(gaps)}) are the difference between a posterior and an (RE)ML "
            f"estimate, not a fault of {a}."
        )
    return (
        f"{a} and {b} agree within {z_text} on every row, and {a} passes against lme4 on "
        "every row: there is no gap to place."
    )
