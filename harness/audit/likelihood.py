"""Check (a): the user's pointwise log-likelihood equals the harness's at the same parameters.

Where it does not, the diagnosis says which rows differ, described by the
formula's own columns and levels ("rows with tx=0"), which mapped parameter
moves the difference across points, and, for a Gaussian model, whether the
difference is exactly one of the usual scale mix-ups of the residual SD.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pandas as pd
import xarray as xr
from scipy import stats

from harness.audit.draws import harness_loglik
from harness.audit.mapping import Row, harness_rows
from harness.audit.verdicts import CheckResult
from harness.model.spec import Design

__all__ = ["MIN_POINTS", "RELATIVE_TOLERANCE", "likelihood_check"]

RELATIVE_TOLERANCE = 1e-8
MIN_POINTS = 20
#: |Spearman correlation| above which a parameter is said to move the difference.
MOVES = 0.5

#: Residual-scale mix-ups a Gaussian likelihood can hide: what the user's `sigma=` received.
SCALE_MIXUPS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "the variance sigma**2 (a variance used as an SD)": lambda s: s**2,
    "the precision 1/sigma**2 (PyMC 2's tau used as an SD)": lambda s: 1.0 / s**2,
    "sqrt(sigma) (an SD used as a variance)": np.sqrt,
}


def _close(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    # Equal infinities (a prior draw where both densities vanish) agree.
    with np.errstate(invalid="ignore"):
        near = np.abs(a - b) <= RELATIVE_TOLERANCE * np.maximum(1.0, np.abs(b))
    return np.asarray(near | (a == b), dtype=bool)


def formula_columns(design: Design) -> list[str]:
    """Data columns the formula reads besides the response (predictors, factors, sigma_by)."""
    columns = [c for c in design.data.columns if c != design.response]
    return [c for c in columns if design.data[c].nunique() <= 50]


def describe_rows(design: Design, differ: np.ndarray) -> tuple[str, pd.DataFrame]:
    """Words and a table for a set of rows, by the formula's columns and levels."""
    n = differ.size
    k = int(differ.sum())
    records = []
    for column in formula_columns(design):
        values = design.data[column].astype(str).to_numpy()
        for level in pd.unique(values):
            members = values == level
            both = int((members & differ).sum())
            union = int((members | differ).sum())
            records.append(
                {
                    "column": column,
                    "level": level,
                    "rows": int(members.sum()),
                    "rows_differing": both,
                    "jaccard": both / union if union else 0.0,
                }
            )
    table = pd.DataFrame(records, columns=["column", "level", "rows", "rows_differing", "jaccard"])
    if k == n:
        return f"every row ({n}) differs", table
    if table.empty:
        return f"{k} of {n} rows differ", table
    best = table.sort_values(["jaccard", "rows"], ascending=[False, True]).iloc[0]
    if best["jaccard"] == 1.0:
        return f"exactly the rows with {best['column']}={best['level']} ({k} of {n}) differ", table
    return (
        f"{k} of {n} rows differ, most of them rows with {best['column']}={best['level']} "
        f"({best['rows_differing']} of its {best['rows']})",
        table,
    )


def _scalar_parameters(design: Design, hdraws: xr.Dataset) -> dict[str, np.ndarray]:
    from harness.audit.mapping import harness_rows as _rows

    points = hdraws.sizes["chain"] * hdraws.sizes["draw"]
    out: dict[str, np.ndarray] = {}
    for row in _rows(design):
        value = _row_values(row, hdraws)
        if value is not None:
            out[row.name] = value.reshape(points)
    return out


def _row_values(row: Row, hdraws: xr.Dataset) -> np.ndarray | None:
    from harness.names import corr_var, sd_var, term_b_dim, term_dim

    if row.kind == "fixed":
        return hdraws["beta"].sel(fixed_term=row.term).values
    if row.kind == "sd" and row.block is not None:
        return hdraws[sd_var(row.block)].sel({term_dim(row.block): row.term}).values
    if row.kind == "cor" and row.block is not None:
        return (
            hdraws[corr_var(row.block)]
            .sel({term_dim(row.block): row.term, term_b_dim(row.block): row.term_b})
            .values
        )
    if row.kind == "sigma":
        sigma = hdraws["sigma"]
        return sigma.sel(sigma_level=row.level).values if row.level is not None else sigma.values
    return None


def moving_parameter(design: Design, hdraws: xr.Dataset, gap: np.ndarray) -> pd.DataFrame:
    """Spearman correlation across points of each mapped parameter with the size of the gap."""
    records = []
    for name, values in _scalar_parameters(design, hdraws).items():
        if np.ptp(values) == 0 or np.ptp(gap) == 0:
            rho = 0.0
        else:
            rho = float(stats.spearmanr(values, gap).statistic)
        records.append({"parameter": name, "spearman": rho})
    table = pd.DataFrame(records, columns=["parameter", "spearman"])
    order = table["spearman"].abs().sort_values(ascending=False).index
    return table.loc[order].reset_index(drop=True)


def _scale_mixup(design: Design, hdraws: xr.Dataset, user: np.ndarray) -> str | None:
    if not design.family.has_scale or "sigma" not in hdraws:
        return None
    harness = harness_loglik(design, hdraws)
    for words, change in SCALE_MIXUPS.items():
        changed = hdraws.copy()
        changed["sigma"] = xr.apply_ufunc(change, hdraws["sigma"])
        if _explains(user, harness, harness_loglik(design, changed)):
            return words
    return None


def factor_columns(design: Design) -> dict[str, tuple[list[str], list[str]]]:
    """Per factor of the fixed effects: its levels (reference first) and its X columns.

    A factor is a data column whose treatment-coded columns (R's default,
    named column + level) are in X: one level has no column, the reference.
    """
    out: dict[str, tuple[list[str], list[str]]] = {}
    columns = [str(c) for c in design.X.columns]
    for column in design.data.columns:
        if column == design.response:
            continue
        levels = [str(v) for v in pd.unique(design.data[column].astype(str))]
        if not 2 <= len(levels) <= 50:
            continue
        named = [f"{column}{lev}" for lev in levels]
        present = [c for c in columns if c in named]
        if len(present) != len(levels) - 1:
            continue
        coded = [c[len(str(column)) :] for c in present]
        reference = next(lev for lev in levels if lev not in coded)
        out[str(column)] = ([reference, *coded], present)
    return out


def contrast_alternatives(design: Design) -> dict[str, Design]:
    """The fixed effects of each factor coded with other contrasts, columns mapped in order.

    A port that codes a factor otherwise (another reference level, levels in
    string order as ``pandas.get_dummies`` sorts them, R's ``contr.sum``) and
    maps its coefficients to lme4's columns in order computes the formula's
    likelihood with these columns instead.
    """
    out: dict[str, Design] = {}
    for column, (levels, present) in factor_columns(design).items():
        values = design.data[column].astype(str).to_numpy()
        indicator = {lev: (values == lev).astype(float) for lev in levels}
        codings: dict[str, list[np.ndarray]] = {}
        for reference in levels[1:]:
            others = [lev for lev in levels if lev != reference]
            codings[f"treatment contrasts with reference level {reference!r}"] = [
                indicator[lev] for lev in others
            ]
        ordered = sorted(levels)
        if ordered != levels:
            codings[
                f"treatment contrasts over the levels in string order ({', '.join(ordered[:4])}, "
                "...: pandas.get_dummies's order)"
            ] = [indicator[lev] for lev in ordered[1:]]
        last = levels[-1]
        codings["sum-to-zero contrasts (R's contr.sum: each level minus the last)"] = [
            indicator[lev] - indicator[last] for lev in levels[:-1]
        ]
        for name, cols in codings.items():
            X = design.X.copy()
            for target, values_ in zip(present, cols, strict=True):
                X[target] = values_
            if np.allclose(X.to_numpy(float), design.X.to_numpy(float)):
                continue
            words = (
                f"the fixed-effect columns of {column!r} coded with {name}, where lme4 uses "
                f"treatment contrasts with reference level {levels[0]!r} (a fixed-effect column "
                "coded with other contrasts)"
            )
            out[words] = replace(design, X=X)
    return out


def structural_alternatives(design: Design) -> dict[str, Design]:
    """Designs that each make one usual porting mistake in the formula's structure.

    Keys are the words naming the mistake; the user's likelihood matching one
    of them exactly names it.
    """
    out: dict[str, Design] = {}
    for b, block in enumerate(design.blocks):
        for k, term in enumerate(block.terms):
            if term != "(Intercept)":
                values = block.values.copy()
                values[:, k] = 1.0
                blocks = list(design.blocks)
                blocks[b] = replace(block, values=values)
                out[
                    f"the {block.factor} effect on {term} is not multiplied by {term}: rows where "
                    f"{term} is 0 get a {block.factor} effect the formula does not give them"
                ] = replace(design, blocks=blocks)
            values = block.values.copy()
            values[:, k] = 0.0
            blocks = list(design.blocks)
            blocks[b] = replace(block, values=values)
            out[f"the random effect {block.label}: {term} is missing"] = replace(
                design, blocks=blocks
            )
    for term in design.fixed_terms:
        X = design.X.copy()
        X[term] = 0.0
        out[f"the fixed effect {term!r} is missing"] = replace(design, X=X)
    family = design.family
    for link in getattr(family, "links", ()):
        if link != family.link.name:
            other = replace(design, spec=design.spec.with_(link=link))
            out[f"the {link} link where the formula's family has the {family.link.name} link"] = (
                other
            )
    if design.offset is not None:
        out["the formula's offset() term is missing"] = replace(design, offset=None)
    out |= contrast_alternatives(design)
    # Rows sorted by a predictor on one side only.  Sorting by a grouping factor only
    # relabels groups, which the whole-groups diagnosis names instead.
    factors = {c for b in design.blocks for c in b.factor.split(":")}
    for column in formula_columns(design):
        if column in factors:
            continue
        values = design.data[column].to_numpy()
        seen: list[np.ndarray] = []
        # pandas' sort_values sorts one column with numpy's quicksort, several stably.
        for kind in ("stable", "quicksort"):
            order = np.argsort(values, kind=kind)
            if np.array_equal(order, np.arange(design.n)) or any(
                np.array_equal(order, o) for o in seen
            ):
                continue
            seen.append(order)
            out[
                f"the predictors in the order of the data sorted by {column!r} ({kind}) and the "
                "response in the data's own order (the response in another row order than the "
                "predictors)"
            ] = _predictors_in_order(design, order)
    return out


def _predictors_in_order(design: Design, order: np.ndarray) -> Design:
    """The design whose predictor rows (X, Z, group and residual-SD indices) follow ``order``."""
    blocks = [
        replace(b, values=b.values[order], group_index=b.group_index[order]) for b in design.blocks
    ]
    sigma_index = design.sigma_index[order] if design.sigma_index is not None else None
    offset = design.offset[order] if design.offset is not None else None
    return replace(
        design,
        X=design.X.iloc[order].reset_index(drop=True),
        blocks=blocks,
        sigma_index=sigma_index,
        offset=offset,
    )


#: An alternative explains the gap when it leaves at most this fraction of it, row by row
#: (numerically different but equal formulas, e.g. two probit implementations in the tails).
EXPLAINED_FRACTION = 1e-3


def _explains(user: np.ndarray, harness: np.ndarray, alternative: np.ndarray) -> bool:
    with np.errstate(invalid="ignore"):
        left = np.abs(user - alternative)
        return bool(
            np.all(
                _close(user, alternative) | (left <= EXPLAINED_FRACTION * np.abs(user - harness))
            )
        )


def _structural(design: Design, hdraws: xr.Dataset, user: np.ndarray) -> str | None:
    harness = harness_loglik(design, hdraws)
    for words, changed in structural_alternatives(design).items():
        if _explains(user, harness, harness_loglik(changed, hdraws)):
            return words
    return None


def _response_words(design: Design, observed: np.ndarray | None) -> str:
    """Words when the observed values are not the response column in the rows' order."""
    if observed is None or design.family.discrete:
        return ""
    values = np.asarray(observed, dtype=float).ravel()
    if values.shape != design.y.shape or np.allclose(values, design.y, rtol=1e-12, atol=0):
        return ""
    if np.allclose(np.sort(values), np.sort(design.y), rtol=1e-12, atol=0):
        return (
            "the observed values are the response in another row order than the predictors "
            "(sorted or re-indexed on one side only)"
        )
    return "the observed values are not the response column (transformed, or other rows)"


def _whole_groups(design: Design, differ: np.ndarray) -> str:
    """Words when the differing rows are whole groups of a grouping factor (labels vs indices)."""
    if differ.all():
        return ""
    for block in design.blocks:
        index = block.group_index
        counts = np.bincount(index, minlength=block.n_levels)
        hits = np.bincount(index, weights=differ.astype(float), minlength=block.n_levels)
        used = counts > 0
        whole = np.all((hits[used] == 0) | (hits[used] == counts[used]))
        n_groups = int((hits > 0).sum())
        if whole and 1 < n_groups < int(used.sum()):
            return (
                f"the differing rows are {n_groups} whole groups of {block.factor!r}: their "
                "offsets may sit under other groups' labels (group indices in another order "
                "than the coordinates)"
            )
    return ""


def tied_rows(hdraws: xr.Dataset, design: Design) -> list[tuple[str, str]]:
    """Pairs of the harness's SD/sigma rows that the user's model ties (equal at every draw)."""
    values = {
        name: v
        for name, v in _scalar_parameters(design, hdraws).items()
        if any(r.name == name and r.kind in ("sd", "sigma") for r in harness_rows(design))
    }
    names = list(values)
    return [
        (a, b)
        for i, a in enumerate(names)
        for b in names[i + 1 :]
        if np.array_equal(values[a], values[b]) and np.ptp(values[a]) > 0
    ]


def likelihood_check(
    design: Design,
    hdraws: xr.Dataset,
    user: np.ndarray,
    sources: list[str],
    pointwise: bool = True,
    observed: np.ndarray | None = None,
) -> CheckResult:
    """Compare the user's log-likelihood with the harness's at each parameter point.

    Parameters
    ----------
    design : Design
        The harness's design for the formula and data.
    hdraws : xarray.Dataset
        The parameter points under the harness's names (:func:`harness_draws`).
    user : ndarray
        The user's pointwise log-likelihood, shape (points, rows).
    sources : list of str
        Where each point came from ("prior" or "posterior").
    pointwise : bool
        False when the user's model has several observed variables: totals only.
    observed : ndarray, optional
        The values the user's model observes, to name a response in another row order.

    Returns
    -------
    CheckResult
        ``points`` (per point: totals and whether they agree), ``rows`` (per row:
        largest difference, points where it differs), ``where`` (rows differing
        by column level) and ``moves`` (parameters against the gap).
    """
    harness = harness_loglik(design, hdraws)
    n_points = harness.shape[0]
    user_total, harness_total = user.sum(axis=1), harness.sum(axis=1)
    points = pd.DataFrame(
        {
            "point": np.arange(n_points),
            "source": sources,
            "user_loglik": user_total,
            "harness_loglik": harness_total,
            "difference": user_total - harness_total,
            "agree": _close(user_total, harness_total),
        }
    )
    tables = {"points": points}
    if n_points < MIN_POINTS:
        return CheckResult(
            "likelihood",
            "incomplete",
            f"only {n_points} parameter points; the check needs at least {MIN_POINTS}",
            tables,
        )
    if np.any(~np.isfinite(user_total) & np.isfinite(harness_total)):
        bad = int((~np.isfinite(user_total) & np.isfinite(harness_total)).sum())
        return CheckResult(
            "likelihood",
            "fail",
            f"the user's log-likelihood is not finite at {bad} of {n_points} points "
            "where the harness's is",
            tables,
        )
    if not pointwise:
        ok = bool(points["agree"].all())
        text = (
            f"totals agree at all {n_points} points (several observed variables: rows not compared)"
            if ok
            else f"totals differ at {int((~points['agree']).sum())} of {n_points} points"
        )
        return CheckResult("likelihood", "pass" if ok else "fail", text, tables)
    close = _close(user, harness)
    differ = np.asarray(~close.all(axis=0), dtype=bool)
    gap = np.abs(user - harness)
    rows = design.data[formula_columns(design)].reset_index(drop=True).copy()
    rows.insert(0, "row", np.arange(design.n))
    rows["max_abs_difference"] = gap.max(axis=0)
    rows["points_differing"] = (~close).sum(axis=0)
    tables["rows"] = rows
    tied = tied_rows(hdraws, design)
    if not differ.any() and tied:
        pairs = "; ".join(f"{a!r} and {b!r}" for a, b in tied)
        return CheckResult(
            "likelihood",
            "fail",
            f"the log-likelihood agrees at {n_points} points, but the model ties {pairs} "
            "(one parameter where the formula has two: e.g. one residual SD where --sigma-by "
            "asks for one per level)",
            tables,
        )
    if not differ.any():
        return CheckResult(
            "likelihood",
            "pass",
            f"the pointwise log-likelihood agrees on all {design.n} rows at {n_points} "
            f"parameter points ({sources.count('prior')} prior, {sources.count('posterior')} "
            f"posterior) to {RELATIVE_TOLERANCE:g} relative",
            tables,
        )
    where, levels = describe_rows(design, differ)
    tables["where"] = levels
    response = _response_words(design, observed)
    if response:
        return CheckResult(
            "likelihood", "fail", f"the log-likelihoods differ: {where}; {response}", tables
        )
    whole = _whole_groups(design, differ)
    moves = moving_parameter(design, hdraws, gap[:, differ].sum(axis=1))
    tables["moves"] = moves
    words = [f"the log-likelihoods differ: {where}"]
    mixup = _scale_mixup(design, hdraws, user)
    structural = None if mixup else _structural(design, hdraws, user)
    if mixup:
        words.append(f"the user's residual scale is exactly {mixup}")
    elif structural:
        words.append(f"the user's likelihood is exactly the formula's with {structural}")
    elif len(moves) and abs(moves["spearman"].iloc[0]) >= MOVES:
        top = moves.iloc[0]
        words.append(
            f"the difference moves with {top['parameter']!r} (Spearman {top['spearman']:+.2f} "
            "across points)"
        )
        effect = next(
            (
                r
                for r in harness_rows(design)
                if r.name == top["parameter"] and r.kind in ("sd", "cor")
            ),
            None,
        )
        if effect is not None and differ.sum() < design.n:
            words.append(
                f"those rows get a {effect.block.factor if effect.block else ''} effect the formula "
                "does not give them (or lose one it does)"
            )
    else:
        words.append(
            "no single mapped parameter moves the difference (data, indices or the "
            "density's form differ)"
        )
    if whole and not structural and not mixup:
        words.append(whole)
    return CheckResult("likelihood", "fail", "; ".join(words), tables)
