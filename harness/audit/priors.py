"""Check (c): the user's priors beside the harness's, row by row.

Both sides are read the same way: prior draws of each mapped quantity (the
user's model's prior predictive against the harness's own PyMC model's), with
the distribution and parameters of the user's variable where the mapping names
a free variable.  Differences are reported, never failed: a prior is the
user's choice.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from harness.audit.likelihood import _row_values
from harness.audit.mapping import harness_rows
from harness.audit.verdicts import CheckResult
from harness.model.priors import ResolvedPriors
from harness.model.spec import Design

__all__ = ["describe_variable", "priors_check"]

#: Ratio of central 90% widths (either way) from which two priors are said to differ.
WIDTH_RATIO = 2.0


def describe_variable(model: Any, name: str) -> str:
    """``Normal(mu=0, sigma=10)``-style text for a free variable of a PyMC model."""
    import pytensor

    var = model.named_vars.get(name.split("[")[0].strip())
    if var is None or var not in model.free_RVs:
        return "deterministic" if var is not None else ""
    op = var.owner.op
    dist = type(op).__name__.removesuffix("RV")
    names = getattr(op, "_print_name", None)
    params = var.owner.inputs[2:] if len(var.owner.inputs) > 2 else []
    shown = []
    for p in params:
        try:
            inputs = pytensor.graph.graph_inputs([p])
            if any(i in model.rvs_to_values or i in model.value_vars for i in inputs):
                shown.append("(depends on other variables)")
                continue
            value = np.asarray(p.eval())
            shown.append(f"{value.item():.4g}" if value.size == 1 else f"array{value.shape}")
        except Exception:  # a parameter that cannot be evaluated alone stays unnamed
            shown.append("?")
    label = names[0] if names else dist
    return f"{label}({', '.join(shown)})"


def _harness_prior_text(priors: ResolvedPriors, row: Any) -> str:
    if row.kind == "fixed":
        return priors.fixed[row.term].describe()
    if row.kind == "sd":
        return priors.sd[(row.block.label, row.term)].describe()
    if row.kind == "cor":
        return f"LKJ(eta={priors.lkj_eta:g})"
    if row.kind == "sigma":
        return priors.sigma.describe()
    return ""


def priors_check(
    design: Design,
    priors: ResolvedPriors,
    mapping: dict[str, Any],
    model: Any,
    user: xr.Dataset,
    harness: xr.Dataset,
) -> CheckResult:
    """The user's prior of each mapped row beside the harness's (draws of both, quantiles).

    Returns
    -------
    CheckResult
        Verdict "pass" (differences are reported, not failed); ``priors`` table
        with the 5%, 50% and 95% quantiles of both and a ``differs`` flag.
    """
    records = []
    for row in harness_rows(design):
        if row.kind == "offsets":
            continue
        mine, theirs = _row_values(row, user), _row_values(row, harness)
        if mine is None or theirs is None:
            continue
        q_user = np.nanquantile(mine.ravel(), [0.05, 0.5, 0.95])
        q_h = np.nanquantile(theirs.ravel(), [0.05, 0.5, 0.95])
        width_u, width_h = q_user[2] - q_user[0], q_h[2] - q_h[0]
        ratio = width_u / width_h if width_h > 0 else np.inf
        differs = bool(
            not (q_h[0] <= q_user[1] <= q_h[2]) or not (1 / WIDTH_RATIO <= ratio <= WIDTH_RATIO)
        )
        value = mapping.get(row.name)
        records.append(
            {
                "row": row.name,
                "user_variable": value if isinstance(value, str) else "(callable)",
                "user_prior": describe_variable(model, value) if isinstance(value, str) else "",
                "harness_prior": _harness_prior_text(priors, row),
                "user_q05": q_user[0],
                "user_median": q_user[1],
                "user_q95": q_user[2],
                "harness_q05": q_h[0],
                "harness_median": q_h[1],
                "harness_q95": q_h[2],
                "width_ratio": ratio,
                "differs": differs,
            }
        )
    table = pd.DataFrame(records)
    differ = [r["row"] for r in records if r["differs"]]
    if differ:
        text = (
            f"the user's priors differ from the harness's ({priors.profile}) on {len(differ)} "
            f"row(s): {', '.join(differ)} (reported, not failed; --priors chooses the harness's)"
        )
    else:
        text = f"the user's priors match the harness's ({priors.profile}) in centre and width"
    return CheckResult("priors", "pass", text, {"priors": table})
