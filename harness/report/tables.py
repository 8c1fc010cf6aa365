"""Tidy tables behind the report's figures (computation only; plots.py draws them).

Each function takes fits (``FreqFit``, ``BayesFit``, ``Comparison``, ``Design``)
and returns a DataFrame with one row per plotted thing, so the figures can be
tested and redrawn without the fits.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from harness.checks.compare import Comparison
    from harness.fits import BayesFit, FreqFit
    from harness.model.spec import Design, RandomBlock

log = logging.getLogger("harness")

#: Units of the shipped designs' columns (axis labels); unknown columns get none.
COLUMN_UNITS = {"Reaction": "ms", "Days": "day", "wait": "min"}
#: Quantile of the normal distribution for 95% intervals.
Z95 = 1.959963984540054


# --------------------------------------------------------------------------- labels and units


def is_binary(values: pd.Series) -> bool:
    """A 0/1 column (its coefficient is a difference in the response's units)."""
    if not pd.api.types.is_numeric_dtype(values):
        return False
    return set(pd.unique(values.dropna())) <= {0, 1}


def response_unit(design: Design) -> str:
    """The response's unit, or an empty string."""
    return COLUMN_UNITS.get(design.response, "")


def response_label(design: Design) -> str:
    """Axis label of the response: ``Reaction (ms)``."""
    unit = response_unit(design)
    return f"{design.response} ({unit})" if unit else design.response


def coefficient_unit(term: str, design: Design) -> str:
    """Unit of a coefficient: the response's unit, per unit of the predictor for a slope."""
    y_unit = response_unit(design) or "response units"
    if term == "(Intercept)" or term not in design.data.columns:
        return y_unit
    column = design.data[term]
    if is_binary(column):
        return y_unit
    x_unit = COLUMN_UNITS.get(term)
    return f"{y_unit} per {x_unit}" if x_unit else f"{y_unit} per unit of {term}"


def column_label(column: str) -> str:
    """Axis label of a predictor column (``Days (day)``)."""
    unit = COLUMN_UNITS.get(column)
    return f"{column} ({unit}s)" if unit else column


# --------------------------------------------------------------------------- draws


def _stack(array: Any, max_draws: int | None, seed: int = 0) -> np.ndarray:
    """(chain, draw, ...) -> (sample, ...), evenly thinned to at most ``max_draws``."""
    values = np.asarray(array.values)
    values = values.reshape(-1, *values.shape[2:])
    if max_draws is not None and values.shape[0] > max_draws:
        keep = np.linspace(0, values.shape[0] - 1, max_draws).round().astype(int)
        values = values[keep]
    return values


def fixed_draws(bayes: BayesFit, max_draws: int | None = None) -> pd.DataFrame:
    """Posterior draws of the fixed effects: columns are lme4's term names."""
    beta = bayes.idata.posterior["beta"]
    terms = [str(t) for t in beta["fixed_term"].values]
    return pd.DataFrame(_stack(beta, max_draws), columns=terms)


_SD = re.compile(r"^(?P<grp>.+): sd\((?P<term>.+)\)$")
_COR = re.compile(r"^(?P<grp>.+): cor\((?P<a>.+),(?P<b>[^,]+)\)$")
_SIGMA_LEVEL = re.compile(r"^sigma: (?P<col>[^=]+)=(?P<level>.+)$")


def component_draws(
    bayes: BayesFit, component: str, max_draws: int | None = None
) -> np.ndarray | None:
    """Posterior draws of one lme4-named variance component (None if PyMC has no such parameter)."""
    from harness.names import corr_var, sd_var, term_b_dim, term_dim

    posterior = bayes.idata.posterior
    own = bayes.design.family.components.get(component)  # the family's own parameters
    if own is not None:
        array = posterior[own]
    elif component == "sigma":
        array = posterior["sigma"]
    elif (match := _SIGMA_LEVEL.match(component)) is not None:
        array = posterior["sigma"].sel(sigma_level=match["level"])
    else:
        blocks = {b.label: b for b in bayes.design.blocks}
        sd_match, cor_match = _SD.match(component), _COR.match(component)
        if sd_match and sd_match["grp"] in blocks:
            block = blocks[sd_match["grp"]]
            array = posterior[sd_var(block)].sel({term_dim(block): sd_match["term"]})
        elif cor_match and cor_match["grp"] in blocks:
            block = blocks[cor_match["grp"]]
            array = posterior[corr_var(block)].sel(
                {term_dim(block): cor_match["a"], term_b_dim(block): cor_match["b"]}
            )
        else:
            return None
    return _stack(array, max_draws).ravel()


def variance_draws(bayes: BayesFit, variance: pd.DataFrame, max_draws: int = 4000) -> pd.DataFrame:
    """Long table (component, value) of posterior draws for every compared component."""
    pieces = []
    for component in variance["component"]:
        draws = component_draws(bayes, component, max_draws)
        if draws is not None:
            pieces.append(pd.DataFrame({"component": component, "value": draws}))
    return (
        pd.concat(pieces, ignore_index=True)
        if pieces
        else pd.DataFrame(columns=["component", "value"])
    )


def rank_draws(bayes: BayesFit, max_params: int = 12) -> pd.DataFrame:
    """Long table (parameter, chain, draw, value) of the main scalar parameters, for rank plots.

    Fixed effects, residual SD(s), group SDs and the lower triangle of each
    correlation matrix (its diagonal is constant), at most ``max_params``.
    """
    posterior = bayes.idata.posterior
    names = (
        ["beta"]
        + (["sigma"] if "sigma" in posterior else [])
        + [
            str(v)
            for v in posterior.data_vars
            if str(v).startswith(("sd_", "corr_")) and not str(v).endswith("_log__")
        ]
    )
    rows: list[pd.DataFrame] = []
    for name in names:
        array = posterior[name]
        extra = [d for d in array.dims if d not in ("chain", "draw")]
        index = [()] if not extra else list(np.ndindex(*[array.sizes[d] for d in extra]))
        for position in index:
            if name.startswith("corr_") and (len(position) != 2 or position[0] <= position[1]):
                continue
            labels = [str(array[d].values[i]) for d, i in zip(extra, position, strict=True)]
            values = np.asarray(array.isel(dict(zip(extra, position, strict=True))).values)
            rows.append(
                pd.DataFrame(
                    {
                        "parameter": f"{name}[{','.join(labels)}]" if labels else name,
                        "chain": np.repeat(np.arange(values.shape[0]), values.shape[1]),
                        "draw": np.tile(np.arange(values.shape[1]), values.shape[0]),
                        "value": values.ravel(),
                    }
                )
            )
            if len(rows) >= max_params:
                return pd.concat(rows, ignore_index=True)
    return pd.concat(rows, ignore_index=True)


# --------------------------------------------------------------------------- group coefficients


def group_coefficients(cmp: Comparison, bayes: BayesFit, prob: float = 0.95) -> pd.DataFrame:
    """Per group and term: fixed effect + random effect, from both engines.

    lme4: ``beta_hat + mode`` with ``+- 1.96 condsd`` (conditional on the
    estimates, fixed-effect uncertainty left out, as ``coef()`` shows it).
    PyMC: the same sum per draw, mean and central ``prob`` interval.
    """
    from harness.checks.align import posterior_offsets

    beta_hat = dict(zip(cmp.fixed["term"], cmp.fixed["lme4_estimate"], strict=True))
    beta = bayes.idata.posterior["beta"]
    fixed_terms = [str(t) for t in beta["fixed_term"].values]
    pieces = []
    for factor, offsets in posterior_offsets(bayes).items():
        for term in [str(t) for t in offsets["term"].values]:
            draws = offsets.sel(term=term)
            if term in fixed_terms:
                draws = draws + beta.sel(fixed_term=term).drop_vars("fixed_term")
            stacked = draws.stack(sample=("chain", "draw"))
            frame = pd.DataFrame(
                {
                    "group": [str(g) for g in stacked["group"].values],
                    "pymc_mean": stacked.mean("sample").values,
                    "pymc_lower": stacked.quantile((1 - prob) / 2, dim="sample").values,
                    "pymc_upper": stacked.quantile((1 + prob) / 2, dim="sample").values,
                }
            )
            frame["group_factor"], frame["term"] = factor, term
            pieces.append(frame)
    pymc = pd.concat(pieces, ignore_index=True)
    lme4 = cmp.offsets[
        ["group_factor", "group", "term", "lme4_mode", "lme4_condsd", "n_obs"]
    ].copy()
    lme4["fixed"] = lme4["term"].map(beta_hat).fillna(0.0)
    lme4["lme4_coef"] = lme4["fixed"] + lme4["lme4_mode"]
    lme4["lme4_lower"] = lme4["lme4_coef"] - Z95 * lme4["lme4_condsd"]
    lme4["lme4_upper"] = lme4["lme4_coef"] + Z95 * lme4["lme4_condsd"]
    table = lme4.merge(pymc, on=["group_factor", "group", "term"], how="left")
    return table[
        [
            "group_factor",
            "group",
            "term",
            "n_obs",
            "fixed",
            "lme4_coef",
            "lme4_lower",
            "lme4_upper",
            "pymc_mean",
            "pymc_lower",
            "pymc_upper",
        ]
    ]


# --------------------------------------------------------------------------- shrinkage


def _factor_columns(
    design: Design, factor: str
) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
    blocks = [b for b in design.blocks if b.factor == factor]
    terms = [t for b in blocks for t in b.terms]
    values = np.hstack([b.values for b in blocks])
    return terms, values, blocks[0].group_index, blocks[0].levels


@dataclass
class Shrinkage:
    """No-pooling vs partial-pooling estimates of one grouping factor."""

    factor: str
    terms: list[str]
    table: pd.DataFrame  # group, term, n_obs, unpooled, lme4, pymc
    population: dict[str, float]  # the fixed effects (the centre partial pooling pulls toward)
    covariance: np.ndarray | None  # lme4's G for the factor's terms (for the population ellipse)
    note: str


def _lme4_covariance(variance: pd.DataFrame, label: str, terms: list[str]) -> np.ndarray | None:
    sds = {}
    for term in terms:
        row = variance[variance["component"] == f"{label}: sd({term})"]
        if row.empty:
            return None
        sds[term] = float(row["lme4_estimate"].iloc[0])
    cov = np.diag([sds[t] ** 2 for t in terms])
    for i, a in enumerate(terms):
        for j, b in enumerate(terms):
            row = variance[variance["component"] == f"{label}: cor({a},{b})"]
            if not row.empty:
                cov[i, j] = cov[j, i] = float(row["lme4_estimate"].iloc[0]) * sds[a] * sds[b]
    return cov


def shrinkage(cmp: Comparison, coefs: pd.DataFrame, design: Design) -> list[Shrinkage]:
    """Per grouping factor: per-group least squares against both engines' partial pooling.

    The no-pooling estimate of a group regresses its own rows of the
    response on the factor's random-effect columns.  Fixed effects without
    a random counterpart (the intercept under ``(0 + tx | g)``) are held at
    lme4's estimate.  A group with too few rows, or whose columns do not
    vary (a control participant with tx = 0), has no such estimate; the
    note says how many.
    """
    beta_hat = dict(zip(cmp.fixed["term"], cmp.fixed["lme4_estimate"], strict=True))
    out = []
    for factor in dict.fromkeys(b.factor for b in design.blocks):
        terms, values, index, levels = _factor_columns(design, factor)
        rest = [t for t in design.fixed_terms if t not in terms]
        fixed_rest = (
            design.X[rest].to_numpy(float) @ np.array([beta_hat[t] for t in rest])
            if rest
            else np.zeros(design.n)
        )
        rows: list[dict[str, Any]] = []
        skipped = 0
        for g, level in enumerate(levels):
            mask = index == g
            Zg = values[mask]
            ok = mask.sum() > len(terms) and np.linalg.matrix_rank(Zg) == len(terms)
            if ok:  # the family's own fit: least squares, or a GLM on the link scale
                trials = design.trials[mask] if design.trials is not None else None
                offset = fixed_rest[mask] + (
                    design.offset[mask] if design.offset is not None else 0.0
                )
                # lme4's family: its own parameters (if any) held at lme4's estimates.
                family = cmp.freq.design.family
                estimate = family.fit_unpooled(design.y[mask], Zg, trials, offset)
                skipped += int(not np.all(np.isfinite(estimate)))
            else:
                skipped += 1
                estimate = np.full(len(terms), np.nan)
            rows.extend(
                {"group": str(level), "term": t, "unpooled": float(e)}
                for t, e in zip(terms, estimate, strict=True)
            )
        table = pd.DataFrame(rows).merge(
            coefs[coefs["group_factor"] == factor][
                ["group", "term", "n_obs", "lme4_coef", "pymc_mean"]
            ].rename(columns={"lme4_coef": "lme4", "pymc_mean": "pymc"}),
            on=["group", "term"],
            how="left",
        )
        notes = []
        if rest:
            notes.append(f"no-pooling fits hold {', '.join(rest)} at lme4's estimate")
        if skipped:
            notes.append(
                f"{skipped} of {len(levels)} groups cannot be fitted on their own (at most "
                f"{len(terms)} row(s), or {', '.join(terms)} constant within the group) and are left out"
            )
        label = next(b.label for b in design.blocks if b.factor == factor)
        out.append(
            Shrinkage(
                factor=factor,
                terms=terms,
                table=table,
                population={t: beta_hat.get(t, 0.0) for t in terms},
                covariance=_lme4_covariance(cmp.variance, label, terms),
                note="; ".join(notes),
            )
        )
    return out


# --------------------------------------------------------------------------- variance, ML estimates


def ml_variance(freq: FreqFit, design: Design) -> dict[str, float]:
    """lme4's (or nlme's) ML estimates of the variance components, by component name.

    lme4 returns ``theta`` (the relative Cholesky factor, column-wise lower
    triangle per random-effects term, terms in lme4's order); SDs are
    ``sigma * |row of Lambda|``.  Empty when the shapes do not match.
    """
    ml = freq.ml_estimates or {}
    out: dict[str, float] = {}
    sigma = ml.get("sigma")
    if isinstance(sigma, dict):
        for level, value in sigma.items():
            out[f"sigma: {design.spec.sigma_by}={level}"] = float(value)
    elif sigma is not None:
        out["sigma"] = float(sigma)
    blocks = design.lme4_block_order()
    if "theta" in ml:
        from harness.checks.same_model import _blocks_from_theta

        if sigma is None or isinstance(sigma, dict):
            return out
        try:
            values = _blocks_from_theta(design, ml["theta"], float(sigma))
        except ValueError as err:
            log.debug("ML marks skipped: %s", err)
            return out
        for block, value in zip(design.blocks, values, strict=True):
            out.update(_cov_components(block, value.cov))
    elif "G" in ml and len(blocks) == 1:
        G = np.atleast_2d(np.asarray(ml["G"], dtype=float))
        if G.shape == (blocks[0].n_terms, blocks[0].n_terms):
            out.update(_cov_components(blocks[0], G))
    return out


def _cov_components(block: RandomBlock, cov: np.ndarray) -> dict[str, float]:
    sds = np.sqrt(np.clip(np.diag(cov), 0, None))
    out = {f"{block.label}: sd({t})": float(s) for t, s in zip(block.terms, sds, strict=True)}
    for j, a in enumerate(block.terms):
        for i in range(j + 1, len(block.terms)):
            denom = sds[i] * sds[j]
            out[f"{block.label}: cor({a},{block.terms[i]})"] = (
                float(cov[i, j] / denom) if denom > 0 else float("nan")
            )
    return out


# --------------------------------------------------------------------------- predictions


def panel_factor(design: Design) -> str:
    """The grouping factor the per-group panels use (the one with the most groups)."""
    return design.lme4_block_order()[0].factor


def x_column(design: Design) -> str | None:
    """The predictor on the x-axis of per-group panels: the first varying slope, else the first slope."""
    candidates = [t for b in design.blocks for t in b.terms] + design.fixed_terms
    for term in candidates:
        if (
            term != "(Intercept)"
            and term in design.data.columns
            and pd.api.types.is_numeric_dtype(design.data[term])
        ):
            return term
    return None


def _block_offsets(bayes: BayesFit, max_draws: int) -> dict[str, np.ndarray]:
    """Per block label: offsets (sample, level, term)."""
    from harness.checks.align import block_offsets

    posterior = bayes.idata.posterior
    return {
        block.label: _stack(block_offsets(posterior, block, bayes.spec.parameterization), max_draws)
        for block in bayes.design.blocks
    }


def _sigma_per_row(bayes: BayesFit, design: Design, max_draws: int) -> np.ndarray:
    sigma = _stack(bayes.idata.posterior["sigma"], max_draws)
    if sigma.ndim == 1:
        return np.repeat(sigma[:, None], design.n, axis=1)
    return sigma[:, design.sigma_index]


def _lme4_sigma_per_row(cmp: Comparison, design: Design) -> np.ndarray:
    variance = cmp.variance.set_index("component")["lme4_estimate"]
    if design.sigma_levels is None:
        return np.full(design.n, float(variance["sigma"]))
    by_level = np.array(
        [float(variance[f"sigma: {design.spec.sigma_by}={lvl}"]) for lvl in design.sigma_levels]
    )
    return by_level[design.sigma_index]


def panel_rows(design: Design, max_groups: int | None = None) -> np.ndarray:
    """Rows of the groups per-group panels can show, in row order.

    The panels (:func:`harness.report.plots.predictive_panels`) draw groups of
    :func:`panel_factor` with more than one observation, in order of first
    appearance, at most ``max_groups`` of them; with ``max_groups=None`` every
    row.  InstEval's 73,421 rows made the full table 8 s of its figures.
    """
    if max_groups is None:
        return np.arange(design.n)
    factor = panel_factor(design)
    index = next(b for b in design.blocks if b.factor == factor).group_index
    sizes = np.bincount(index)
    _, first = np.unique(index, return_index=True)
    order = np.argsort(first, kind="stable")  # groups by first appearance
    eligible = [g for g in order if sizes[g] > 1][:max_groups]
    return np.flatnonzero(np.isin(index, eligible))


def panel_counts(design: Design) -> dict[str, int]:
    """How many groups the panel factor has, and how many of them have one observation.

    Kept in a predictive table's ``attrs`` (``groups``, ``single_observation_groups``), so
    the panels' title counts every group when the table holds only the shown ones.
    """
    factor = panel_factor(design)
    index = next(b for b in design.blocks if b.factor == factor).group_index
    sizes = np.bincount(index)
    return {"groups": int(np.sum(sizes > 0)), "single_observation_groups": int(np.sum(sizes == 1))}


def predictive_table(
    cmp: Comparison,
    bayes: BayesFit,
    design: Design,
    seed: int = 1,
    max_draws: int = 1000,
    prob: float = 0.95,
    max_groups: int | None = None,
) -> pd.DataFrame:
    """Per observation: observed y, lme4's fitted value, PyMC's fitted mean and predictive interval.

    On the family's plotted scale (:meth:`~harness.model.family.Family.observed`:
    the response, a proportion, a count).  lme4: the inverse link of
    ``offset + X beta_hat + Z u_hat`` (conditional modes).  PyMC: the same per
    draw, and one draw from the family (:meth:`~harness.model.family.Family.draw`,
    with the draw's residual SD where the family has one) for the predictive
    interval.  With ``max_groups``, only the rows of the groups the panels
    show (:func:`panel_rows`).  Without a numeric predictor, ``x`` is the row's
    position within its group.
    """
    rng = np.random.default_rng(seed)
    family = design.family
    rows = panel_rows(design, max_groups)
    X = design.X.to_numpy(float)[rows]
    beta = fixed_draws(bayes, max_draws)[design.fixed_terms].to_numpy()
    eta = beta @ X.T
    beta_hat = cmp.fixed.set_index("term").loc[design.fixed_terms, "lme4_estimate"].to_numpy(float)
    eta_hat = X @ beta_hat
    if design.offset is not None:
        eta = eta + design.offset[rows]
        eta_hat = eta_hat + design.offset[rows]
    modes = cmp.offsets.set_index(["group_factor", "group", "term"])["lme4_mode"]
    offsets = _block_offsets(bayes, max_draws)
    for block in design.blocks:
        index, values = block.group_index[rows], block.values[rows]
        u = offsets[block.label][:, index, :]  # (sample, rows, k)
        eta = eta + np.einsum("snk,nk->sn", u, values)
        hat = np.array(
            [[modes.get((block.factor, lvl, t), 0.0) for t in block.terms] for lvl in block.levels]
        )
        eta_hat = eta_hat + (hat[index] * values).sum(axis=1)
    # The family's own parameters per draw (shape (draws, 1)), and the residual SD per row.
    params = {
        name: _stack(draws, max_draws).reshape(-1, 1)
        for name, draws in family.posterior_params(bayes.idata.posterior).items()
    }
    if family.has_scale:
        params["sigma"] = _sigma_per_row(bayes, design, max_draws)[:, rows]
    trials = design.trials[rows] if design.trials is not None else None
    mean = family.link.inverse(eta)
    y_rep = family.observed(
        family.draw(rng, mean, trials, params or None),
        None if trials is None else np.maximum(trials, 1),  # no trials: plotted as 0, not NaN
    )
    factor = panel_factor(design)
    block = next(b for b in design.blocks if b.factor == factor)
    index = block.group_index[rows]
    x = x_column(design)
    table = pd.DataFrame(
        {
            "row": rows,
            "group_factor": factor,
            "group": [block.levels[i] for i in index],
            # Without a numeric predictor: the row's position within its group (the panels
            # show whole groups, so positions count every row of the group).
            "x": design.data[x].to_numpy(float)[rows]
            if x
            else pd.Series(index).groupby(index).cumcount().to_numpy(float) + 1,
            "y": family.observed(np.asarray(design.y), design.trials)[rows],
            "lme4_fit": family.link.inverse(eta_hat),
            "pymc_mu": mean.mean(axis=0),
            "pymc_lower": np.quantile(y_rep, (1 - prob) / 2, axis=0),
            "pymc_upper": np.quantile(y_rep, (1 + prob) / 2, axis=0),
        }
    )
    table.attrs.update(panel_counts(design))
    return table


def new_group_table(
    cmp: Comparison,
    bayes: BayesFit,
    design: Design,
    seed: int = 1,
    max_draws: int = 2000,
    prob: float = 0.95,
) -> pd.DataFrame:
    """Prediction in a new, unseen group, for each distinct covariate profile (at most 50).

    For a family with a residual scale (gaussian): one new observation, lme4's
    plug-in ``x' beta_hat`` with variance ``z' G_hat z + sigma_hat^2``, PyMC's
    per-draw new group effect plus residual noise.  For the others: the new
    group's mean on the response scale (a probability, a rate at offset 0),
    whose observations' spread depends on trials or exposure: lme4's inverse
    link of ``x' beta_hat +- 1.96 sqrt(z' G_hat z)`` for the interval and, for
    the mean, the inverse link averaged over the new group effect ``N(0, z' G_hat z)``
    (Gauss-Hermite; through a non-linear link the mean is not the inverse link
    of ``x' beta_hat``, which is the median), PyMC's per-draw new group effect
    through the inverse link.  The estimates' own uncertainty is left out of
    lme4's interval.
    """
    from harness.names import corr_var, sd_var

    rng = np.random.default_rng(seed)
    family = design.family
    x = x_column(design)
    frame = pd.DataFrame(design.X.to_numpy(float), columns=[f"X:{t}" for t in design.fixed_terms])
    for block in design.blocks:
        for j, term in enumerate(block.terms):
            frame[f"Z:{block.label}:{term}"] = block.values[:, j]
    frame["sigma_row"] = design.sigma_index if design.sigma_index is not None else 0
    frame["x"] = design.data[x].to_numpy(float) if x else np.zeros(design.n)
    profiles = (
        frame.drop_duplicates().sort_values(["sigma_row", "x"]).head(50).reset_index(drop=True)
    )
    n_profiles = len(profiles)
    X = profiles[[f"X:{t}" for t in design.fixed_terms]].to_numpy(float)
    beta_hat = cmp.fixed.set_index("term").loc[design.fixed_terms, "lme4_estimate"].to_numpy(float)
    lme4_eta = X @ beta_hat
    lme4_var = np.zeros(n_profiles)
    beta = fixed_draws(bayes, max_draws)[design.fixed_terms].to_numpy()
    pymc = beta @ X.T
    posterior = bayes.idata.posterior
    for block in design.blocks:
        Zb = profiles[[f"Z:{block.label}:{t}" for t in block.terms]].to_numpy(float)
        G = _lme4_covariance(cmp.variance, block.label, block.terms)
        if G is not None:
            lme4_var += np.einsum("pk,kl,pl->p", Zb, G, Zb)
        sds = _stack(posterior[sd_var(block)], max_draws)  # (s, k)
        if block.correlated and block.n_terms > 1:
            corr = _stack(posterior[corr_var(block)], max_draws)  # (s, k, k)
            chol = np.linalg.cholesky(corr + 1e-9 * np.eye(block.n_terms))
            z = rng.standard_normal((sds.shape[0], block.n_terms))
            u = sds * np.einsum("skl,sl->sk", chol, z)
        else:
            u = sds * rng.standard_normal(sds.shape)
        pymc = pymc + u @ Zb.T
    sigma_rows = profiles["sigma_row"].to_numpy(int)
    new = family.link.inverse(pymc)
    if family.has_scale:
        sigma_hat = _lme4_sigma_per_row(cmp, design)
        lme4_sigma = np.array(
            [sigma_hat[np.flatnonzero(frame["sigma_row"].to_numpy() == r)[0]] for r in sigma_rows]
        )
        lme4_var = lme4_var + lme4_sigma**2
        sigma = _stack(posterior["sigma"], max_draws)
        sigma = sigma[:, None] if sigma.ndim == 1 else sigma[:, sigma_rows]
        new = family.draw(rng, new, None, {"sigma": sigma})
    lme4_sd = np.sqrt(lme4_var)
    inverse = family.link.inverse
    lme4_mean = new_group_mean(inverse, lme4_eta, lme4_sd)
    return pd.DataFrame(
        {
            "profile": _profile_labels(design, X, profiles["x"].to_numpy(float), sigma_rows, x),
            "x": profiles["x"].to_numpy(float) if x else np.arange(n_profiles, dtype=float),
            "sigma_level": [
                design.sigma_levels[r] if design.sigma_levels else "" for r in sigma_rows
            ],
            "lme4_mean": lme4_mean,
            "lme4_lower": inverse(lme4_eta - Z95 * lme4_sd),
            "lme4_upper": inverse(lme4_eta + Z95 * lme4_sd),
            "pymc_mean": new.mean(axis=0),
            "pymc_lower": np.quantile(new, (1 - prob) / 2, axis=0),
            "pymc_upper": np.quantile(new, (1 + prob) / 2, axis=0),
        }
    )


def new_group_mean(
    inverse: Callable[[np.ndarray], np.ndarray], eta: np.ndarray, sd: np.ndarray
) -> np.ndarray:
    """``E[inverse(eta + sd Z)]``, ``Z ~ N(0, 1)``, by 40-point Gauss-Hermite quadrature.

    The mean of a new group's response-scale mean under lme4's plug-in law of its
    effect; equal to ``inverse(eta)`` only for the identity link (or ``sd = 0``).
    """
    nodes, weights = np.polynomial.hermite.hermgauss(40)
    points = np.asarray(eta, float)[:, None] + np.sqrt(2.0) * np.asarray(sd, float)[:, None] * nodes
    return np.asarray(inverse(points) @ weights / np.sqrt(np.pi), dtype=float)


def _profile_labels(
    design: Design, X: np.ndarray, xs: np.ndarray, sigma_rows: np.ndarray, x: str | None
) -> list[str]:
    """``Days = 3`` where the plotted predictor tells the profiles apart, else their covariates."""
    if len(X) == 1:
        labels = ["new group"]
    elif x and len(set(zip(sigma_rows, xs, strict=True))) == len(xs):
        labels = [f"{x} = {v:g}" for v in xs]
    else:
        # The non-zero covariates of each profile (dummy codes read "period2").
        labels = []
        for row in X:
            parts = [
                t if v == 1 else f"{t}={v:g}"
                for t, v in zip(design.fixed_terms, row, strict=True)
                if t != "(Intercept)" and v != 0
            ]
            labels.append(", ".join(parts) or "reference")
    if design.sigma_levels is not None:
        labels = [
            f"{design.spec.sigma_by} = {design.sigma_levels[r]}, {label}"
            for r, label in zip(sigma_rows, labels, strict=True)
        ]
    return labels


# --------------------------------------------------------------------------- verdicts


#: Readable labels of attribution sources; any other source shows its key with spaces.
SOURCE_LABELS = {
    "lme4_optimizer": "lme4 optimizer",
    "prior": "prior",
    "laplace": "Laplace (glmer vs exact ML)",
    "summary": "summary",
    "boundary": "boundary",
    "remainder": "rest",
}


def attribution_text(attribution: Any, floor: float | None = None) -> str:
    """``prior +0.012 · summary -0.41 · rest -0.15 (MCSE 0.029)``: the sources of a gap.

    Every source in the mapping is shown (known ones by :data:`SOURCE_LABELS`,
    others by their key) in the order of the row's picture, the remainder last, zeros left out except the remainder's.
    A share below ``floor`` (the row's numerical noise,
    :func:`harness.report.bars.noise_floor`; by default from the row's MCSE alone) is 0.
    """
    from harness.report.bars import denoise, noise_floor, source_order

    if not isinstance(attribution, Mapping):
        return ""
    if floor is None:
        floor = noise_floor(None, attribution.get("mcse"))
    keys = source_order(list(attribution))  # the picture's order: lme4's own corrections first
    if "remainder" in attribution:
        keys.append("remainder")
    parts = []
    for key in keys:
        label = SOURCE_LABELS.get(key, str(key).replace("_", " "))
        value = denoise(attribution.get(key), floor)
        if value is None:
            continue
        if value != 0 or key == "remainder":
            parts.append(f"{label} {value:+.3g}" if value != 0 else f"{label} 0")
    mcse = attribution.get("mcse")
    text = " · ".join(parts)
    if mcse is not None and np.isfinite(mcse):
        text += f" (MCSE {mcse:.2g})"
    return text


def _picture(
    attribution: Any, scale: float, scale_name: str, tolerance: float, step: bool = False
) -> dict[str, Any]:
    """What the row's picture needs (:func:`harness.report.bars.attribution_segments`)."""
    from harness.report.bars import noise_floor, remainder_limit

    parts = attribution if isinstance(attribution, Mapping) else None
    mcse = (parts or {}).get("mcse")
    mcse = float(mcse) if mcse is not None else float("nan")
    return {
        "parts": parts,
        "scale": scale,
        "scale_name": scale_name,
        "mcse": mcse,
        # The agreement rows' Monte Carlo noise is one of the shares, not a band to stay in.
        "limit": tolerance if step else remainder_limit(scale, mcse, tolerance),
        "mcse_is_step": step,
        "attribution": attribution_text(attribution, noise_floor(scale, mcse)),
    }


def _diagnostics_note(row: Mapping[str, Any]) -> str:
    from harness.report.html import fmt

    return f"sampler diagnostics: R-hat {fmt(row['r_hat'], 4)}, bulk ESS {fmt(row['ess_bulk'], 0)}"


def _undefined_note(value: Any, engine: str, notes: Sequence[str]) -> list[str]:
    """Why a row's frequentist value is blank, unless a note already says why."""
    if not pd.isna(value) or any(notes):
        return []
    return [f"{engine} gives no value for this quantity (undefined)"]


def verdict_table(
    cmp: Comparison,
    same_model: Any | None = None,
    engine: str = "lme4",
    priors: Sequence[Mapping[str, str]] | None = None,
) -> pd.DataFrame:
    """Every compared quantity in one table: both estimates, distances, tolerance, verdict, note.

    Columns: section, quantity, lme4, pymc, diff_in_se, diff_in_mcse,
    tolerance, verdict, note, explanation, attribution (the sources in words), and
    what the row's picture needs (:func:`harness.report.bars.attribution_segments`):
    parts (the sources' mapping), scale, scale_name, mcse, limit (what the remainder
    may be) and mcse_is_step.  Variance components have no lme4 SE; their
    ``diff_in_se`` uses the interval's half-width / 1.96 when lme4 has an
    interval (flagged in ``se_from_interval``).  ``engine`` names the
    frequentist engine (``nlme`` when it stood in).  ``priors`` (rows of
    ``ResolvedPriors.table()``) puts each SD's prior next to its row.
    """
    from harness.checks.attribution import REMAINDER_CORRELATION, REMAINDER_VARIANCE_SD
    from harness.checks.compare import TOLERANCES

    prior_of = {p["parameter"]: p["prior"] for p in priors or []}
    rows = []
    for r in cmp.fixed.to_dict("records"):
        # The scale the check measured the row in: lme4's SE, the posterior SD without one.
        fixed_se = r["lme4_se"] if r["lme4_se"] > 0 else r["pymc_sd"]
        fixed_scale = "lme4 SE" if r["lme4_se"] > 0 else "posterior SD"
        # The sampler's diagnostics do not say why lme4's value is blank: that note comes first.
        notes = _undefined_note(r["lme4_estimate"], engine, [])
        if r["verdict"] == "unreliable":
            notes.append(_diagnostics_note(r))
        rows.append(
            {
                "section": "fixed effect",
                "quantity": r["term"],
                "lme4": r["lme4_estimate"],
                "pymc": r["pymc_mean"],
                "pymc_stat": "mean",
                "diff_in_se": r["diff_in_se"],
                "diff_in_mcse": r["diff_in_mcse"],
                "se_from_interval": False,
                "tolerance": r["tolerance"],
                "verdict": r["verdict"],
                "note": "; ".join(notes),
                "explanation": r.get("explanation", ""),
                **_picture(
                    r.get("attribution"),
                    fixed_se,
                    fixed_scale,
                    TOLERANCES["fixed_pass_se"] * fixed_se,
                ),
            }
        )
    for r in cmp.variance.to_dict("records"):
        has_ci = not (pd.isna(r["lme4_lower"]) or pd.isna(r["lme4_upper"]))
        se = (r["lme4_upper"] - r["lme4_lower"]) / (2 * Z95) if has_ci else float("nan")
        diff = r["pymc_median"] - r["lme4_estimate"]
        notes = [r["note"]] if isinstance(r.get("note"), str) and r["note"] else []
        notes += _undefined_note(r["lme4_estimate"], engine, notes)
        sd = _SD.match(r["component"])
        prior = prior_of.get(f"sd[{sd['grp']}: {sd['term']}]" if sd else r["component"])
        if prior is None and r["kind"] == "sigma":
            prior = prior_of.get("sigma")
        if prior:
            notes.append(f"PyMC prior {prior}")
        if r["kind"] == "sigma" and engine != "lme4":
            notes.append(f"{engine} stands in: lme4 cannot fit one residual SD per level")
        if not has_ci:
            notes.append(f"{engine} gave no interval for this component")
        if r["verdict"] == "unreliable":
            notes.append(_diagnostics_note(r))
        rows.append(
            {
                "section": "variance component",
                "quantity": r["component"],
                "lme4": r["lme4_estimate"],
                "pymc": r["pymc_median"],
                "pymc_stat": "median",
                "diff_in_se": diff / se if se > 0 else float("nan"),
                "diff_in_mcse": diff / r["mcse"] if r["mcse"] > 0 else float("nan"),
                "se_from_interval": has_ci,
                "tolerance": r.get("tolerance")
                or "lme4 estimate in the PyMC 95% HDI"
                + ("; PyMC median in the lme4 interval" if has_ci else ""),
                "verdict": r["verdict"],
                "note": "; ".join(notes),
                "explanation": r.get("explanation", ""),
                **_picture(
                    r.get("attribution"),
                    r["pymc_sd"],
                    "posterior SD",
                    REMAINDER_VARIANCE_SD * r["pymc_sd"],
                ),
            }
        )
    for r in cmp.agreement.to_dict("records"):
        notes = [f"{r['n_informed']} of {r['n_groups']} groups informed by data"]
        if r["n_informed"] < r["n_groups"]:
            notes.append(
                "groups without data on this term follow the prior on both sides and are skipped"
            )
        metrics = [("RMSE", r["rmse"]), ("slope", r["slope"])]
        metrics.append(("mean posterior SD / condsd", r["sd_ratio"]))
        shown = [f"{name} {value:.3g}" for name, value in metrics if np.isfinite(value)]
        if shown:
            notes.append(", ".join(shown))
        if r.get("reason"):
            notes.append(str(r["reason"]))
        rows.append(
            {
                "section": "random effects",
                "quantity": f"{r['group_factor']}: {r['term']} (correlation)",
                "lme4": float("nan"),
                "pymc": r["correlation"],
                "pymc_stat": "correlation",
                "diff_in_se": float("nan"),
                "diff_in_mcse": float("nan"),
                "se_from_interval": False,
                "tolerance": r["tolerance"],
                "verdict": r["verdict"],
                "note": "; ".join(notes),
                "explanation": r.get("explanation", ""),
                **_picture(r.get("attribution"), 1.0, "1 - r", REMAINDER_CORRELATION, step=True),
            }
        )
    if same_model is not None:
        ok = bool(getattr(same_model, "ok", False))
        reasons = getattr(same_model, "reasons", None) or []
        rows.append(
            {
                "section": "same model",
                "quantity": f"log-likelihood at {engine}'s ML estimates",
                "lme4": float(getattr(same_model, "loglik_lme4", float("nan"))),
                "pymc": float(getattr(same_model, "loglik_pymc", float("nan"))),
                "pymc_stat": "log-lik",
                "diff_in_se": float("nan"),
                "diff_in_mcse": float("nan"),
                "se_from_interval": False,
                "tolerance": "|difference| < 1e-6",
                "verdict": "pass" if ok else "fail",
                "note": "; ".join(
                    [str(x) for x in reasons] + [str(getattr(same_model, "lme4_optimum", "") or "")]
                ).strip("; "),
                "explanation": "",
                **_picture(None, float("nan"), "", float("nan")),
            }
        )
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- adaptive sampling


def adaptive_rounds_table(record: Mapping[str, Any] | None) -> pd.DataFrame:
    """One row per round of adaptive sampling (``BayesFit.settings["adaptive"]``).

    Columns: round, action, target_accept, parameterization (per block),
    chains (kept after the round), tune (warm-up of the round's run), draws
    (per chain), max_r_hat, min_ess_bulk,
    min_ess_tail (each with the quantity that reached it), divergences, kept,
    seconds (sampling) and why.  Empty when the fit was not adaptive.
    """
    columns = [
        "round",
        "action",
        "target_accept",
        "parameterization",
        "chains",
        "tune",
        "draws",
        "max_r_hat",
        "min_ess_bulk",
        "min_ess_tail",
        "divergences",
        "kept",
        "seconds",
        "why",
    ]
    if not record:
        return pd.DataFrame(columns=columns)
    rows = []
    for entry in record.get("rounds", []):
        after = entry.get("after") or {}

        def with_name(value: Any, name: Any, spec: str = ".0f") -> str:
            return "—" if value is None or pd.isna(value) else f"{value:{spec}} ({name})"

        rows.append(
            {
                "round": entry["round"],
                "action": entry["action"],
                "target_accept": entry["target_accept"],
                "parameterization": ", ".join(
                    f"{label}: {form}" for label, form in entry["parameterization"].items()
                ),
                "chains": after.get("chains"),
                "tune": entry.get("tune"),
                "draws": entry["draws"],
                "max_r_hat": with_name(
                    after.get("max_r_hat"), after.get("max_r_hat_quantity"), ".3f"
                ),
                "min_ess_bulk": with_name(
                    after.get("min_ess_bulk"), after.get("min_ess_bulk_quantity")
                ),
                "min_ess_tail": with_name(
                    after.get("min_ess_tail"), after.get("min_ess_tail_quantity")
                ),
                "divergences": after.get("divergences"),
                "kept": "yes" if entry.get("kept", True) else "no (earlier run kept)",
                "seconds": entry.get("sample_seconds"),
                "why": entry.get("why", ""),
            }
        )
    return pd.DataFrame(rows, columns=columns)
