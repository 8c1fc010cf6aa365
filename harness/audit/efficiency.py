"""Check (e): the user's sampling efficiency against the harness's model on the same data.

Efficiency is the smallest bulk ESS over the compared rows, per second of
sampling and (nutpie records ``n_steps``) per gradient evaluation.  What differs
is read from the user's model graph: per random-effects factor, whether the
offsets are drawn directly (centred: ``u ~ Normal(0, sd)``) or are a
deterministic of standard-normal draws (non-centred: ``u = z * sd``); and
whether the effects reach the rows through a matrix product ``Z @ u`` or by
indexing ``u[group]``.  The verdict is "look" when the user's model is more
than :data:`SLOWER` times less efficient per second, otherwise "pass";
efficiency never fails a model.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from harness.audit.mapping import _INDEXED
from harness.audit.verdicts import CheckResult
from harness.checks.compare_bayes import BayesComparison
from harness.model.spec import Design, RandomBlock

__all__ = ["SLOWER", "efficiency_check", "offsets_form", "uses_matrix_product"]

#: Ratio of ESS per second from which the user's model is called less efficient.
SLOWER = 2.0


def _standard_normal(var: Any) -> bool:
    """A free variable drawn as Normal(0, 1) with constant parameters."""
    op = getattr(var.owner, "op", None)
    if type(op).__name__ != "NormalRV":
        return False
    try:
        mu, sigma = (np.asarray(p.eval()) for p in var.owner.inputs[-2:])
    except Exception:  # parameters that depend on other variables
        return False
    return bool(np.all(mu == 0) and np.all(sigma == 1))


def offsets_form(model: Any, value: Any, block: RandomBlock) -> str:
    """ "centred", "non-centred" or "unknown": how the user's model draws a factor's offsets.

    A mapping value naming a free variable is centred unless that variable is a
    standard normal; a deterministic is non-centred when a standard-normal free
    variable with one entry per level is among its ancestors.  A callable is
    judged by the free variables with one entry per level of the factor.
    """
    import pytensor

    n_levels = len(block.levels)

    def per_level(var: Any) -> bool:
        shape = tuple(int(s) for s in model.initial_point()[model.rvs_to_values[var].name].shape)
        return n_levels in shape

    if isinstance(value, str):
        match = _INDEXED.match(value.strip())
        name = match["name"].strip() if match else value.strip()
        var = model.named_vars.get(name)
        if var is None:
            return "unknown"
        if var in model.free_RVs:
            return "non-centred" if _standard_normal(var) else "centred"
        ancestors = set(pytensor.graph.ancestors([var]))
        candidates = [v for v in model.free_RVs if v in ancestors and per_level(v)]
    else:
        candidates = [v for v in model.free_RVs if per_level(v)]
    if not candidates:
        return "unknown"
    if any(_standard_normal(v) for v in candidates):
        return "non-centred"
    return "centred"


def uses_matrix_product(model: Any, design: Design, offsets: list[Any]) -> bool:
    """Whether the likelihood's mean multiplies a constant n x k matrix by offsets (``Z @ u``).

    ``offsets`` are the mapping's values for the offsets rows; ``k`` is the
    length of a variable they name (or a factor's number of levels).
    """
    import pytensor

    point = model.initial_point()
    sizes = {len(b.levels) for b in design.blocks}
    for value in offsets:
        var = (
            model.named_vars.get(str(value).split("[")[0].strip())
            if isinstance(value, str)
            else None
        )
        if var is not None and var in model.rvs_to_values:
            sizes |= set(point[model.rvs_to_values[var].name].shape)
    sizes.discard(1)
    try:
        from pytensor.graph import traversal as graph_walk
    except ImportError:  # older PyTensor
        from pytensor.graph import basic as graph_walk  # type: ignore[no-redef]
    nodes = graph_walk.io_toposort(
        list(pytensor.graph.graph_inputs(model.observed_RVs)), list(model.observed_RVs)
    )
    for node in nodes:
        if not any(k in type(node.op).__name__ for k in ("Dot", "Gemv", "Gemm")):
            continue
        for var in node.inputs:
            shape: tuple[Any, ...] = tuple(getattr(var.type, "shape", ()))
            if len(shape) == 2 and shape[0] == design.n and shape[1] in sizes:
                return True
    return False


def _rate(fit: Any, side: str, comparison: BayesComparison) -> dict[str, float]:
    ess = float(np.nanmin(comparison.table[f"{side}_ess_bulk"].to_numpy(float)))
    seconds = float(fit.sample_seconds or np.nan)
    steps = np.nan
    stats = getattr(fit.idata, "sample_stats", None)
    if stats is not None and "n_steps" in stats:
        steps = float(np.asarray(stats["n_steps"].values, float).sum())
    return {
        "min_ess_bulk": ess,
        "sample_seconds": seconds,
        "gradient_evaluations": steps,
        "ess_per_second": ess / seconds if seconds > 0 else np.nan,
        "ess_per_1000_gradients": 1000 * ess / steps if steps > 0 else np.nan,
    }


def efficiency_check(
    model: Any,
    mapping: dict[str, Any],
    design: Design,
    user: Any,
    harness: Any,
    comparison: BayesComparison,
) -> CheckResult:
    """The user's ESS per second (and per gradient) against the harness's, with what differs.

    Parameters
    ----------
    model : pymc.Model
        The user's model (its graph is read, not run).
    mapping : dict
        Harness row -> the model's quantity.
    design : Design
    user, harness : BayesFit
        The two fits of :func:`harness.audit.against_harness.harness_check`.
    comparison : BayesComparison
        Their row-by-row comparison (engines ``audit`` and ``harness``), for the ESS.
    """
    a, b = comparison.engines
    rates = pd.DataFrame(
        [
            {"model": "user", **_rate(user, a, comparison)},
            {"model": "harness", **_rate(harness, b, comparison)},
        ]
    )
    centred = set(harness.settings.get("centered", []) or []) if harness.settings else set()
    forms = []
    for block in design.blocks:
        value = mapping.get(f"{block.label}: {block.terms[0]}")
        forms.append(
            {
                "factor": block.label,
                "user": offsets_form(model, value, block),
                "harness": "centred" if block.label in centred else "non-centred",
            }
        )
    form_table = pd.DataFrame(forms)
    differences = [
        f"{f['factor']}: the model's offsets are {f['user']}, the harness's {f['harness']}"
        for f in forms
        if f["user"] != "unknown" and f["user"] != f["harness"]
    ]
    offsets = [mapping.get(f"{b.label}: {t}") for b in design.blocks for t in b.terms]
    if design.blocks and uses_matrix_product(model, design, offsets):
        differences.append(
            "the model reaches the rows through a matrix product Z @ u (n x levels), the harness "
            "by indexing u[group]"
        )
    user_rate = float(rates.loc[0, "ess_per_second"])
    harness_rate = float(rates.loc[1, "ess_per_second"])
    ratio = user_rate / harness_rate if harness_rate > 0 else np.nan
    text = (
        f"min bulk ESS per second: the model {user_rate:.3g}, the harness's {harness_rate:.3g} "
        f"(ratio {ratio:.2f})"
    )
    per_grad = rates["ess_per_1000_gradients"].to_numpy(float)
    if np.isfinite(per_grad).all():
        text += f"; per 1000 gradient evaluations {per_grad[0]:.3g} vs {per_grad[1]:.3g}"
    text += "; " + ("; ".join(differences) if differences else "no difference in form found")
    verdict = "look" if np.isfinite(ratio) and ratio < 1 / SLOWER else "pass"
    if not np.isfinite(ratio):
        verdict = "incomplete"
    return CheckResult("efficiency", verdict, text, {"rates": rates, "form": form_table})
