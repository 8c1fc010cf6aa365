"""The report's figures: each function takes tables and returns a matplotlib Figure.

Figures are built on :class:`matplotlib.figure.Figure` directly (no pyplot
state), so they can be made in any thread and are freed when dropped.
Both engines keep one look everywhere, chosen to survive greyscale printing
and colour-blindness: lme4 is black with circles and solid lines, PyMC is
vermillion with squares and dashed lines, no pooling is light blue with open
triangles.  Group names stay legible from 18 to 100 groups because figure
heights grow with the number of groups.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Ellipse

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from harness.report.tables import Shrinkage

LME4 = {"color": "#000000", "marker": "o", "linestyle": "-", "label": "lme4"}
PYMC = {"color": "#D55E00", "marker": "s", "linestyle": "--", "label": "PyMC"}
UNPOOLED = {"color": "#56B4E9", "marker": "^", "linestyle": ":", "label": "no pooling"}
BAND: dict[str, Any] = {"color": "#D55E00", "alpha": 0.18, "linewidth": 0}
GRID_COLOR = "#dddddd"
TICK_SIZE = 8
LABEL_SIZE = 9
TITLE_SIZE = 10
#: ``set_title(..., y=PINNED)`` keeps a title at the top of its axes.  By default
#: matplotlib re-places every title each time the figure is laid out or drawn, measuring
#: the x axis and the y axis's offset text (say "1e6") in case they reach above the axes:
#: a third of the cost of a grid of panels.  Pinned only where nothing can: x ticks at
#: the bottom and a y axis without an offset (group names, counts from 0, hidden labels).
PINNED = 1.0


def _fig(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained", dpi=100)


def _finish(ax: Axes) -> None:
    ax.grid(True, color=GRID_COLOR, linewidth=0.6)
    ax.set_axisbelow(True)
    ax.tick_params(labelsize=TICK_SIZE)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _legend_handles(
    *styles: Mapping[str, Any], labels: Sequence[str] | None = None
) -> list[Line2D]:
    handles = []
    for i, style in enumerate(styles):
        label = labels[i] if labels else style["label"]
        handles.append(
            Line2D(
                [],
                [],
                color=style["color"],
                marker=style["marker"],
                linestyle=style["linestyle"],
                label=label,
                markerfacecolor="none" if style is UNPOOLED else style["color"],
            )
        )
    return handles


class FigureDataError(ValueError):
    """A figure has nothing it can draw (an empty table, no group with data).

    The report turns it, like any other exception of a figure, into a note in
    the figure's place (:func:`harness.report.page.render_figures`).
    """


def _require(table: Any, what: str) -> None:
    if len(table) == 0:
        raise FigureDataError(f"nothing to draw: {what}")


def _sd_or_nan(values: Any) -> np.ndarray:
    sd = np.asarray(values, dtype=float)
    return np.where(sd >= 0, sd, np.nan)


def intervals(
    ax: Axes,
    pos: Any,
    centre: Any,
    low: Any,
    high: Any,
    style: Mapping[str, Any],
    *,
    vertical: bool = False,
    linewidth: float = 1.5,
    linestyle: str = "-",
    capsize: float = 3.0,
    markersize: float = 5.0,
    mark: bool = True,
) -> np.ndarray:
    """Point estimates with their intervals, safe for any bounds.

    matplotlib's ``errorbar`` takes the widths ``centre - low`` and ``high -
    centre`` and refuses a negative one, which an estimate outside its own
    interval gives (a profile interval of a fit that did not reach its
    optimum, a mean outside a skewed predictive interval).  Here each interval
    is the segment between its bounds, whatever their order, and the point is
    drawn where it is; a NaN draws nothing.

    Parameters
    ----------
    ax : Axes
    pos : array-like
        Position of each row on the other axis (y, or x when ``vertical``).
    centre, low, high : array-like
        The point and its bounds.
    style : mapping
        ``color`` and ``marker``.
    vertical : bool
        Intervals along y (at x = ``pos``) instead of along x.
    mark : bool
        Write a short note beside each row whose interval is undefined (a NaN
        bound) or does not contain its point, or whose point is undefined.

    Returns
    -------
    array of bool
        Which rows were marked so.
    """
    pos, centre, low, high = (
        np.atleast_1d(np.asarray(v, dtype=float))
        for v in np.broadcast_arrays(pos, centre, low, high)
    )
    color = style["color"]
    segments = ax.vlines if vertical else ax.hlines
    both = np.isfinite(low) & np.isfinite(high)
    segments(
        pos[both], low[both], high[both], color=color, linestyle=linestyle, linewidth=linewidth
    )
    cap = "_" if vertical else "|"
    for bound in (low, high):
        ok = np.isfinite(bound)
        if ok.any() and capsize > 0:
            xy = (pos[ok], bound[ok]) if vertical else (bound[ok], pos[ok])
            ax.plot(*xy, linestyle="none", marker=cap, markersize=2 * capsize, color=color)
    defined = np.isfinite(centre)
    xy = (pos[defined], centre[defined]) if vertical else (centre[defined], pos[defined])
    ax.plot(*xy, linestyle="none", marker=style["marker"], markersize=markersize, color=color)
    lo, hi = np.fmin(low, high), np.fmax(low, high)
    outside = defined & both & ((centre < lo) | (centre > hi))
    undefined = ~both | ~defined
    if mark:
        for i in np.flatnonzero(outside | undefined):
            if not defined[i]:
                text, side = "estimate undefined", 0
            elif not both[i]:
                text, side = "interval undefined", 0
            else:  # the note points from the estimate toward its interval, inside the axes
                text, side = "estimate outside its interval", 1 if centre[i] < lo[i] else -1
            where = centre[i] if defined[i] else 0.5
            coords = "data" if defined[i] else "axes fraction"
            align = {1: "left", -1: "right", 0: "center"}[side]
            if vertical:
                ax.annotate(
                    text,
                    (pos[i], where),
                    xytext=(4, 6 * side),
                    textcoords="offset points",
                    fontsize=7,
                    color="#555555",
                    rotation=90,
                    va={1: "bottom", -1: "top", 0: "center"}[side],
                    xycoords=("data", coords),
                )
            else:
                ax.annotate(
                    text,
                    (where, pos[i]),
                    xytext=(6 * side, 6),
                    textcoords="offset points",
                    fontsize=7,
                    color="#555555",
                    ha=align,
                    xycoords=(coords, "data"),
                )
    return outside | undefined


#: Groups drawn one per row (caterpillar, shrinkage) before a figure shows an even
#: selection by rank instead: thousands of labelled rows take minutes to render
#: and cannot be read.  The tables keep every group.
MAX_GROUP_ROWS = 120

#: Groups whose shrinkage arrows the two-term plane draws (points for the rest).
MAX_GROUP_ARROWS = 150


def _thin_rows(
    rows: pd.DataFrame, limit: int = MAX_GROUP_ROWS, reset: bool = True
) -> tuple[pd.DataFrame, str]:
    """At most ``limit`` rows, evenly spaced through ``rows``' order (ends kept), and a note."""
    note = ""
    if len(rows) > limit:
        keep = np.unique(np.linspace(0, len(rows) - 1, limit).round().astype(int))
        note = f" ({len(keep)} of {len(rows)} groups, evenly spaced by rank)"
        rows = rows.iloc[keep]
    return (rows.reset_index(drop=True) if reset else rows), note


def group_rows_height(n_rows: int, per_row: float = 0.22, minimum: float = 3.0) -> float:
    """Figure height (inches) that keeps one text line per group legible."""
    return max(minimum, per_row * n_rows + 1.4)


def _group_fontsize(n_rows: int) -> float:
    return 8.0 if n_rows <= 40 else 7.0


# --------------------------------------------------------------------------- fixed effects


def forest_plot(fixed: pd.DataFrame, units: Mapping[str, str] | None = None) -> Figure:
    """Fixed effects: lme4 estimate with its 95% CI beside the PyMC mean with its 95% HDI.

    Parameters
    ----------
    fixed : DataFrame
        ``Comparison.fixed``: term, lme4_estimate, lme4_lower, lme4_upper,
        pymc_mean, pymc_lower, pymc_upper.
    units : mapping, optional
        Unit of each term's coefficient, for the x-axis labels.

    Returns
    -------
    Figure
        One panel per term (terms have different scales).
    """
    units = units or {}
    _require(fixed, "no fixed effects")
    n = len(fixed)
    fig = _fig(8.0, 0.35 + 1.25 * n)
    axes = np.atleast_1d(fig.subplots(n, 1, squeeze=False)[:, 0])
    for ax, row in zip(axes, fixed.to_dict("records"), strict=True):
        for y, style, est, low, high in (
            (1, LME4, row["lme4_estimate"], row["lme4_lower"], row["lme4_upper"]),
            (0, PYMC, row["pymc_mean"], row["pymc_lower"], row["pymc_upper"]),
        ):
            intervals(
                ax,
                y,
                est,
                low,
                high,
                style,
                linewidth=2,
                linestyle=style["linestyle"],
                capsize=4,
                markersize=7,
            )
        ax.set_yticks(
            [1, 0], ["lme4: estimate, 95% CI", "PyMC: mean, 95% HDI"], fontsize=LABEL_SIZE
        )
        ax.set_ylim(-0.6, 1.6)
        unit = units.get(row["term"], "")
        ax.set_xlabel(f"{row['term']}" + (f" ({unit})" if unit else ""), fontsize=LABEL_SIZE)
        _finish(ax)
    return fig


# --------------------------------------------------------------------------- random effects


def _label_points(
    ax: Axes, x: np.ndarray, y: np.ndarray, names: Sequence[str], picks: Sequence[int]
) -> None:
    for i in picks:
        ax.annotate(
            str(names[i]),
            (x[i], y[i]),
            xytext=(4, 4),
            textcoords="offset points",
            fontsize=7,
            color="#333333",
        )


def ranef_scatter(
    offsets: pd.DataFrame, factor: str, unit_of: Mapping[str, str] | None = None, n_labels: int = 3
) -> Figure:
    """lme4 conditional mode (x) against PyMC's aligned posterior offset (y), per term.

    Error bars are +-1 conditional SD (horizontal) and +-1 posterior SD
    (vertical).  Groups with no data on a term (they follow the prior on both
    sides) are left out.  The groups that disagree most, relative to both
    SDs, and the most extreme groups are labelled.

    Parameters
    ----------
    offsets : DataFrame
        ``Comparison.offsets``.
    factor : str
        Grouping factor to draw.
    unit_of : mapping, optional
        Unit of each term, for axis labels.
    n_labels : int
        How many disagreeing and how many extreme groups to name.
    """
    unit_of = unit_of or {}
    part = offsets[(offsets["group_factor"] == factor) & (offsets["n_obs"] > 0)]
    _require(part, f"no group of {factor} has data")
    terms = list(dict.fromkeys(part["term"]))
    fig = _fig(4.6 * len(terms) + 0.4, 4.8)
    axes = np.atleast_1d(fig.subplots(1, len(terms), squeeze=False)[0])
    for ax, term in zip(axes, terms, strict=True):
        rows = part[part["term"] == term]
        x, y = rows["lme4_mode"].to_numpy(float), rows["pymc_mean"].to_numpy(float)
        # An SD below 0 is no SD: drawn as undefined (NaN), never as a crash.
        condsd = _sd_or_nan(rows["lme4_condsd"])
        post_sd = _sd_or_nan(rows["pymc_sd"])
        ax.errorbar(
            x,
            y,
            xerr=condsd,
            yerr=post_sd,
            fmt="o",
            color="#000000",
            ecolor="#999999",
            elinewidth=0.8,
            markersize=4,
            capsize=0,
        )
        ends = np.r_[x - condsd, y - post_sd, x + condsd, y + post_sd, x, y]
        ends = ends[np.isfinite(ends)]
        if len(ends) == 0:
            raise FigureDataError(f"{factor}: {term}: no defined mode or posterior mean")
        ax.plot(
            [ends.min(), ends.max()],
            [ends.min(), ends.max()],
            color="#D55E00",
            linestyle="--",
            linewidth=1.2,
            label="identity (y = x)",
        )
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.abs(y - x) / np.sqrt(condsd**2 + post_sd**2)
        picks = list(
            dict.fromkeys(
                [
                    *np.argsort(-np.nan_to_num(z, posinf=0.0))[:n_labels],
                    *np.argsort(-np.nan_to_num(np.abs(x)))[:n_labels],
                ]
            )
        )
        _label_points(ax, x, y, list(rows["group"]), picks)
        unit = unit_of.get(term, "")
        suffix = f" ({unit})" if unit else ""
        ax.set_xlabel(f"lme4 conditional mode{suffix}", fontsize=LABEL_SIZE)
        ax.set_ylabel(f"PyMC posterior mean offset{suffix}", fontsize=LABEL_SIZE)
        skipped = int(
            ((offsets["group_factor"] == factor) & (offsets["term"] == term)).sum() - len(rows)
        )
        title = f"{factor}: {term}" + (
            f"  ({len(rows)} groups; {skipped} without data left out)"
            if skipped
            else f"  ({len(rows)} groups)"
        )
        ax.set_title(title, fontsize=TITLE_SIZE)
        ax.set_aspect("equal", adjustable="datalim")
        ax.legend(fontsize=TICK_SIZE, loc="upper left", frameon=False)
        _finish(ax)
    return fig


def caterpillar(
    coefs: pd.DataFrame, factor: str, unit_of: Mapping[str, str] | None = None
) -> Figure:
    """Per-group coefficients (fixed + random effect) from both engines, side by side.

    lme4: ``beta_hat + mode +- 1.96 condsd``; PyMC: posterior mean and 95%
    interval of ``beta + u``.  Groups are sorted by lme4's estimate; the
    vertical line is the fixed effect (the population mean).

    Parameters
    ----------
    coefs : DataFrame
        From :func:`harness.report.tables.group_coefficients`.
    factor : str
    unit_of : mapping, optional
    """
    unit_of = unit_of or {}
    part = coefs[(coefs["group_factor"] == factor) & (coefs["n_obs"] > 0)]
    _require(part, f"no group of {factor} has data")
    terms = list(dict.fromkeys(part["term"]))
    n_groups = min(part["group"].nunique(), MAX_GROUP_ROWS)
    fig = _fig(max(7.0, 3.9 * len(terms)), group_rows_height(n_groups))
    axes = np.atleast_1d(fig.subplots(1, len(terms), squeeze=False)[0])
    size = _group_fontsize(n_groups)
    for ax, term in zip(axes, terms, strict=True):
        rows, thinned = _thin_rows(part[part["term"] == term].sort_values("lme4_coef"))
        pos = np.arange(len(rows))
        for offset, style, est, low, high in (
            (0.17, LME4, rows["lme4_coef"], rows["lme4_lower"], rows["lme4_upper"]),
            (-0.17, PYMC, rows["pymc_mean"], rows["pymc_lower"], rows["pymc_upper"]),
        ):
            ax.hlines(
                pos + offset,
                low,
                high,
                color=style["color"],
                linestyle=style["linestyle"],
                linewidth=1.2,
            )
            ax.plot(
                est,
                pos + offset,
                style["marker"],
                color=style["color"],
                markersize=4,
                linestyle="none",
            )
        ax.axvline(float(rows["fixed"].iloc[0]), color="#777777", linewidth=1, linestyle="-.")
        ax.set_yticks(pos, list(rows["group"]), fontsize=size)
        ax.set_ylim(-0.8, len(rows) - 0.2)
        unit = unit_of.get(term, "")
        ax.set_xlabel(f"{term} coefficient" + (f" ({unit})" if unit else ""), fontsize=LABEL_SIZE)
        ax.set_title(f"{factor}: {term}{thinned}", fontsize=TITLE_SIZE, y=PINNED)
        _finish(ax)
    axes[0].set_ylabel(factor, fontsize=LABEL_SIZE)
    handles = _legend_handles(
        LME4, PYMC, labels=["lme4: β̂ + mode ± 1.96 condsd", "PyMC: mean, 95% interval of β + u"]
    )
    handles.append(Line2D([], [], color="#777777", linestyle="-.", label="fixed effect"))
    fig.legend(
        handles=handles, loc="outside lower center", ncols=3, fontsize=TICK_SIZE, frameon=False
    )
    return fig


# --------------------------------------------------------------------------- variance components


def variance_density(
    draws: pd.DataFrame,
    variance: pd.DataFrame,
    ml: Mapping[str, float] | None = None,
    unit_of: Mapping[str, str] | None = None,
    method: str = "REML",
) -> Figure:
    """Posterior density of each variance component, with lme4's estimates and interval marked.

    Parameters
    ----------
    draws : DataFrame
        (component, value): posterior draws, from
        :func:`harness.report.tables.variance_draws`.
    variance : DataFrame
        ``Comparison.variance`` (lme4 estimate, interval, PyMC median, HDI).
    ml : mapping, optional
        ML estimates by component, drawn dotted beside the REML estimate.
    unit_of : mapping, optional
        Unit per component.
    method : str
        Name of lme4's estimate (``REML`` or ``ML``).
    """
    from scipy.stats import gaussian_kde

    ml, unit_of = ml or {}, unit_of or {}
    _require(variance, "no variance components")
    rows = variance.to_dict("records")
    ncols = 2 if len(rows) > 1 else 1
    nrows = math.ceil(len(rows) / ncols)
    fig = _fig(9.0 if ncols == 2 else 5.5, 2.9 * nrows + 0.5)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False).ravel())
    for ax, row in zip(axes, rows, strict=False):
        values = draws.loc[draws["component"] == row["component"], "value"].to_numpy(float)
        values = values[np.isfinite(values)]
        if len(values) > 1 and np.std(values) > 0:
            low, high = np.quantile(values, [0.001, 0.999])
            pad = 0.1 * (high - low)
            grid = np.linspace(low - pad, high + pad, 300)
            if row["kind"] != "cor":
                grid = grid[grid >= 0]
            else:
                grid = grid[(grid >= -1) & (grid <= 1)]
            density = gaussian_kde(values)(grid)
            ax.fill_between(grid, density, **BAND)
            ax.plot(grid, density, color=PYMC["color"], linewidth=1.4)
            top = float(density.max())
        else:
            top = 1.0
        ax.axvline(row["lme4_estimate"], color=LME4["color"], linewidth=1.6)
        if row["component"] in ml and method != "ML":
            ax.axvline(ml[row["component"]], color=LME4["color"], linewidth=1.2, linestyle=":")
        # No lme4 interval is common (no profile asked for) and said in the tables: not marked.
        has_ci = not (pd.isna(row["lme4_lower"]) or pd.isna(row["lme4_upper"]))
        if has_ci:
            intervals(
                ax, 1.12 * top, row["lme4_estimate"], row["lme4_lower"], row["lme4_upper"], LME4
            )
        intervals(ax, 1.04 * top, row["pymc_median"], row["pymc_lower"], row["pymc_upper"], PYMC)
        ax.set_ylim(0, 1.22 * top)
        unit = unit_of.get(row["component"], "")
        ax.set_xlabel(row["component"] + (f" ({unit})" if unit else ""), fontsize=LABEL_SIZE)
        ax.set_ylabel("posterior density", fontsize=LABEL_SIZE)
        ax.set_yticks([])
        _finish(ax)
    for ax in axes[len(rows) :]:
        ax.set_visible(False)
    ci_name = next(
        (r["lme4_ci_method"] for r in rows if isinstance(r.get("lme4_ci_method"), str)), ""
    )
    handles = [
        Line2D([], [], color=PYMC["color"], label="PyMC posterior density"),
        Line2D(
            [], [], color=PYMC["color"], marker="s", linestyle="-", label="PyMC median, 95% HDI"
        ),
        Line2D([], [], color="black", linewidth=1.6, label=f"lme4 {method} estimate"),
    ]
    if ml and method != "ML":
        handles.append(Line2D([], [], color="black", linestyle=":", label="lme4 ML estimate"))
    if ci_name:
        handles.append(Line2D([], [], color="black", marker="o", label=f"lme4 {ci_name} interval"))
    fig.legend(
        handles=handles, loc="outside lower center", ncols=3, fontsize=TICK_SIZE, frameon=False
    )
    return fig


# --------------------------------------------------------------------------- shrinkage


def _ellipse(ax: Axes, centre: Sequence[float], cov: np.ndarray, level: float) -> None:
    from scipy.stats import chi2

    values, vectors = np.linalg.eigh(cov)
    values = np.clip(values, 0, None)
    angle = math.degrees(math.atan2(vectors[1, 1], vectors[0, 1]))
    scale = math.sqrt(chi2.ppf(level, 2))
    ax.add_patch(
        Ellipse(
            (float(centre[0]), float(centre[1])),
            2 * scale * math.sqrt(values[1]),
            2 * scale * math.sqrt(values[0]),
            angle=angle,
            fill=False,
            color="#999999",
            linewidth=0.8,
            linestyle="-",
        )
    )


def shrinkage_plot(shrink: Shrinkage, unit_of: Mapping[str, str] | None = None) -> Figure:
    """No pooling, lme4 and PyMC partial pooling on one plot, arrows from the unpooled estimate.

    Two terms: a plane (intercept against slope) with lme4's population
    distribution as 50/80/95% ellipses.  One term: one row per group.

    Parameters
    ----------
    shrink : Shrinkage
        From :func:`harness.report.tables.shrinkage`.
    unit_of : mapping, optional
    """
    unit_of = unit_of or {}
    table = shrink.table.dropna(subset=["unpooled"])
    wide = table.pivot(index="group", columns="term", values=["unpooled", "lme4", "pymc"])
    terms = [t for t in shrink.terms if ("unpooled", t) in wide.columns]

    def label(term: str) -> str:
        unit = unit_of.get(term, "")
        return f"{term} coefficient" + (f" ({unit})" if unit else "")

    arrow = {"arrowstyle": "-|>", "mutation_scale": 8, "linewidth": 0.8, "shrinkA": 0, "shrinkB": 2}
    if len(terms) >= 2:
        a, b = terms[:2]
        fig = _fig(7.5, 6.6)
        ax = fig.subplots()
        arrows, _ = _thin_rows(wide.sort_values(("unpooled", a)), MAX_GROUP_ARROWS, reset=False)
        if len(arrows) < len(wide):
            ax.set_title(
                f"arrows and labels for {len(arrows)} of {len(wide)} groups (evenly spaced "
                f"by rank); points for all",
                fontsize=TITLE_SIZE,
            )
        for group, row in arrows.iterrows():
            start = (row[("unpooled", a)], row[("unpooled", b)])
            for style in (LME4, PYMC):
                key = "lme4" if style is LME4 else "pymc"
                ax.annotate(
                    "",
                    xy=(row[(key, a)], row[(key, b)]),
                    xytext=start,
                    arrowprops={**arrow, "color": style["color"], "linestyle": style["linestyle"]},
                )
            ax.annotate(
                str(group),
                start,
                xytext=(-3, 4),
                textcoords="offset points",
                fontsize=7,
                color="#555555",
                ha="right",
            )
        ax.plot(
            wide[("unpooled", a)],
            wide[("unpooled", b)],
            linestyle="none",
            marker="^",
            markerfacecolor="none",
            color=UNPOOLED["color"],
            markersize=7,
            markeredgewidth=1.4,
        )
        ax.plot(
            wide[("lme4", a)],
            wide[("lme4", b)],
            linestyle="none",
            marker="o",
            color="black",
            markersize=4,
        )
        ax.plot(
            wide[("pymc", a)],
            wide[("pymc", b)],
            linestyle="none",
            marker="s",
            color=PYMC["color"],
            markersize=3.5,
        )
        centre = (shrink.population.get(a, 0.0), shrink.population.get(b, 0.0))
        ax.plot(*centre, marker="*", color="black", markersize=13, linestyle="none")
        if (
            shrink.covariance is not None
            and shrink.covariance.shape[0] >= 2
            and np.all(np.isfinite(shrink.covariance[:2, :2]))
        ):
            for level in (0.5, 0.8, 0.95):
                _ellipse(ax, centre, shrink.covariance[:2, :2], level)
        ax.set_xlabel(label(a), fontsize=LABEL_SIZE)
        ax.set_ylabel(label(b), fontsize=LABEL_SIZE)
        _finish(ax)
        extra = [
            Line2D(
                [],
                [],
                marker="*",
                color="black",
                linestyle="none",
                markersize=10,
                label="fixed effects (population mean)",
            )
        ]
        if shrink.covariance is not None:
            extra.append(
                Line2D([], [], color="#999999", label="lme4 population 50/80/95% contours")
            )
    else:
        (a,) = terms
        rows, thinned = _thin_rows(table[table["term"] == a].sort_values("unpooled"))
        fig = _fig(7.5, group_rows_height(len(rows)))
        ax = fig.subplots()
        if thinned:
            ax.set_title(f"{shrink.factor}{thinned}", fontsize=TITLE_SIZE, y=PINNED)
        pos = np.arange(len(rows))
        for i, row in rows.iterrows():
            for style, key, dy in ((LME4, "lme4", 0.15), (PYMC, "pymc", -0.15)):
                ax.annotate(
                    "",
                    xy=(row[key], i + dy),
                    xytext=(row["unpooled"], i),
                    arrowprops={**arrow, "color": style["color"], "linestyle": style["linestyle"]},
                )
        ax.plot(
            rows["unpooled"],
            pos,
            linestyle="none",
            marker="^",
            markerfacecolor="none",
            color=UNPOOLED["color"],
            markersize=7,
            markeredgewidth=1.4,
        )
        ax.plot(rows["lme4"], pos + 0.15, linestyle="none", marker="o", color="black", markersize=4)
        ax.plot(
            rows["pymc"],
            pos - 0.15,
            linestyle="none",
            marker="s",
            color=PYMC["color"],
            markersize=3.5,
        )
        ax.axvline(shrink.population.get(a, 0.0), color="#777777", linestyle="-.", linewidth=1)
        ax.set_yticks(pos, list(rows["group"]), fontsize=_group_fontsize(len(rows)))
        ax.set_ylabel(shrink.factor, fontsize=LABEL_SIZE)
        ax.set_xlabel(label(a), fontsize=LABEL_SIZE)
        _finish(ax)
        extra = [
            Line2D([], [], color="#777777", linestyle="-.", label="fixed effect (population mean)")
        ]
    handles = _legend_handles(
        UNPOOLED,
        LME4,
        PYMC,
        labels=[
            "no pooling (group's own least squares)",
            "lme4 partial pooling",
            "PyMC partial pooling",
        ],
    )
    fig.legend(
        handles=handles + extra,
        loc="outside lower center",
        ncols=2,
        fontsize=TICK_SIZE,
        frameon=False,
    )
    return fig


# --------------------------------------------------------------------------- teaching


def z_matrix(Z: Any, column_names: Sequence[str], max_rows: int = 400) -> Figure:
    """A picture of the random-effects design matrix Z (rows: observations, columns: group x term).

    Parameters
    ----------
    Z : array or scipy sparse matrix
        ``Design.Z()``.
    column_names : sequence of str
        ``Design.Z_column_names()`` ("factor:level:term").
    max_rows : int
        Taller matrices show their first ``max_rows`` rows.
    """
    # Only the rows shown are made dense: all of InstEval's Z would take 2.4 GB.
    n_rows, n_cols = Z.shape
    if n_rows == 0 or n_cols == 0:
        raise FigureDataError(f"Z has shape {n_rows} x {n_cols}")
    shown = Z[:max_rows]
    shown = shown.toarray() if hasattr(shown, "toarray") else np.asarray(shown)
    fig = _fig(9.0, 6.2)
    ax = fig.subplots()
    masked = np.ma.masked_equal(shown, 0.0)
    low, high = float(np.nanmin(shown)), float(np.nanmax(shown))
    if low < 0:
        bound = max(abs(low), abs(high), 1e-12)
        image = ax.imshow(
            masked, aspect="auto", interpolation="nearest", cmap="PuOr", vmin=-bound, vmax=bound
        )
    else:
        # A grey ramp that starts at light grey, so the smallest entries (1 for an
        # intercept) stay visible next to the blank zeros.
        from matplotlib import colormaps
        from matplotlib.colors import ListedColormap

        greys = ListedColormap(colormaps["Greys"](np.linspace(0.3, 1.0, 256)))
        image = ax.imshow(
            masked,
            aspect="auto",
            interpolation="nearest",
            cmap=greys,
            vmin=0.0,
            vmax=max(high, 1e-12),
        )
    ax.set_facecolor("white")
    parts = [str(c).split(":") for c in column_names]
    groups = [
        ":".join(p[1:-1]) if len(p) >= 3 else str(c)
        for p, c in zip(parts, column_names, strict=True)
    ]
    starts = [i for i in range(n_cols) if i == 0 or groups[i] != groups[i - 1]]
    if len(starts) <= 200:  # beyond that the separators are a grey wash that costs seconds
        for s in starts[1:]:
            ax.axvline(s - 0.5, color="#cccccc", linewidth=0.4)
    step = max(1, math.ceil(len(starts) / 40))
    ticks = starts[::step]
    ax.set_xticks(ticks, [groups[i] for i in ticks], rotation=90, fontsize=7)
    factor = parts[0][0] if parts and len(parts[0]) >= 3 else "group"
    terms = list(dict.fromkeys(p[-1] for p in parts))
    ax.set_xlabel(
        f"columns: one per {factor} level x term ({', '.join(terms)}); {n_cols} columns",
        fontsize=LABEL_SIZE,
    )
    ax.set_ylabel(
        "observation (row of the data)"
        + (f"; first {max_rows} of {n_rows}" if n_rows > max_rows else ""),
        fontsize=LABEL_SIZE,
    )
    ax.tick_params(labelsize=TICK_SIZE)
    bar = fig.colorbar(image, ax=ax, shrink=0.8)
    bar.set_label("entry of Z (blank = 0)", fontsize=LABEL_SIZE)
    bar.ax.tick_params(labelsize=TICK_SIZE)
    return fig


def equations(lines: Sequence[str], fontsize: float = 13.0) -> Figure:
    """Render lines of matplotlib mathtext (``$...$``) as a figure, one line under another.

    Parameters
    ----------
    lines : sequence of str
        Each a mathtext string (or plain text).
    fontsize : float
    """
    height = 0.42 * len(lines) * fontsize / 13 + 0.2
    fig = Figure(figsize=(9.0, height), dpi=100)
    for i, line in enumerate(lines):
        fig.text(
            0.01,
            1 - (i + 0.7) / len(lines) * (height - 0.1) / height,
            line,
            fontsize=fontsize,
            ha="left",
            va="baseline",
        )
    return fig


# --------------------------------------------------------------------------- predictions


def _same_limits(axes: Sequence[Axes], one_x: float | None = None) -> None:
    """One pair of limits for panels drawn apart, as ``sharex``/``sharey`` would give them.

    The limits are the union of every panel's data with matplotlib's own
    margins; with ``one_x`` (a panel whose group has a single covariate value)
    the x range is that value +-0.4 with one tick there.  Only the outer
    panels keep tick labels.  Shared axes would do the same, but each of them
    consults all the others whenever its limits are read, which for a grid of
    20-30 panels costs more than drawing them.
    """
    first = axes[0]
    for ax in axes[1:]:
        first.update_datalim(ax.dataLim.get_points())
    first.autoscale_view()
    xlim = (one_x - 0.4, one_x + 0.4) if one_x is not None else first.get_xlim()
    ylim = first.get_ylim()
    for ax in axes:
        ax.set_xlim(xlim)
        ax.set_ylim(ylim)
        if one_x is not None:
            ax.set_xticks([one_x])
        ax.label_outer()


#: Most per-group panels one figure draws.
MAX_PANELS = 30


def predictive_panels(
    pred: pd.DataFrame, x_label: str, y_label: str, max_panels: int = MAX_PANELS
) -> Figure:
    """Per group: observed points, both engines' fitted lines, PyMC's 95% predictive band.

    Groups with a single observation (groups of one) are left out; the title
    says how many groups are shown.

    Parameters
    ----------
    pred : DataFrame
        From :func:`harness.report.tables.predictive_table`.
    x_label, y_label : str
        Axis labels with units.
    max_panels : int
    """
    _require(pred, "no observations to show")
    sizes = pred.groupby("group", sort=False, observed=True).size()
    groups = list(sizes[sizes > 1].index)
    shown = groups[:max_panels]
    ncols = min(6, max(1, len(shown)))
    nrows = max(1, math.ceil(len(shown) / ncols))
    fig = _fig(min(2.0 * ncols + 1.0, 13.0), 1.85 * nrows + 1.0)
    grid = fig.add_gridspec(nrows, ncols)
    rows_of = dict(list(pred.groupby("group", sort=False, observed=True)))
    # Per group and covariate value: what the lines and the band join, in one pass.
    means = pred.groupby(["group", "x"], observed=True).agg(
        lme4=("lme4_fit", "mean"),
        mu=("pymc_mu", "mean"),
        lower=("pymc_lower", "mean"),
        upper=("pymc_upper", "mean"),
    )
    axes = []
    one_x = None  # the covariate value of a group that has only one
    for i, group in enumerate(shown):
        ax = fig.add_subplot(grid[i // ncols, i % ncols])
        axes.append(ax)
        rows = rows_of[group]
        by_x = means.loc[group].reset_index()
        if len(by_x) > 1:
            ax.fill_between(by_x["x"], by_x["lower"], by_x["upper"], **BAND)
            ax.plot(by_x["x"], by_x["lme4"], color=LME4["color"], linewidth=1.3)
            ax.plot(by_x["x"], by_x["mu"], color=PYMC["color"], linestyle="--", linewidth=1.3)
        else:  # one covariate value in this group: points with the predictive interval
            x0 = float(by_x["x"].iloc[0])
            intervals(
                ax,
                x0 + 0.12,
                by_x["mu"],
                by_x["lower"],
                by_x["upper"],
                PYMC,
                vertical=True,
                markersize=4,
                linewidth=1.2,
            )
            ax.plot(x0 - 0.12, by_x["lme4"], "o", color=LME4["color"], markersize=5)
            one_x = x0
        ax.plot(
            rows["x"],
            rows["y"],
            "o",
            markerfacecolor="none",
            color="#444444",
            markersize=3.2,
            markeredgewidth=0.8,
        )
        # The first column keeps the y tick labels, and with them a possible offset text.
        ax.set_title(str(group), fontsize=TICK_SIZE, pad=2, y=PINNED if i % ncols else None)
        _finish(ax)
    if axes:
        _same_limits(axes, one_x)
    # The x label goes under the lowest panel of each column (the legend takes the figure's foot).
    for column in range(ncols):
        visible = [i for i in range(column, len(shown), ncols)]
        if visible:
            axes[visible[-1]].set_xlabel(x_label, fontsize=LABEL_SIZE)
            axes[visible[-1]].tick_params(labelbottom=True)
    fig.supylabel(y_label, fontsize=LABEL_SIZE)
    # A table of the shown groups only carries the counts of all of them in its attrs.
    total = int(pred.attrs.get("groups", len(sizes)))
    skipped = int(pred.attrs.get("single_observation_groups", len(sizes) - len(groups)))
    note = f"{len(shown)} of {total} groups of {pred['group_factor'].iloc[0]}"
    if skipped:
        note += f" ({skipped} with one observation left out)"
    if total - skipped > len(shown):
        note += f" (first {max_panels} shown)"
    fig.suptitle(note, fontsize=TITLE_SIZE)
    handles = [
        Line2D(
            [],
            [],
            marker="o",
            markerfacecolor="none",
            color="#444444",
            linestyle="none",
            label="observed",
        ),
        Line2D([], [], color=LME4["color"], marker="o", label="lme4 fitted (β̂ + conditional mode)"),
        Line2D(
            [],
            [],
            color=PYMC["color"],
            marker="s",
            linestyle="--",
            label="PyMC posterior mean of μ",
        ),
        Line2D(
            [],
            [],
            color=PYMC["color"],
            alpha=0.35,
            linewidth=6,
            label="PyMC 95% predictive interval",
        ),
    ]
    fig.legend(
        handles=handles, loc="outside lower center", ncols=2, fontsize=TICK_SIZE, frameon=False
    )
    return fig


def new_group_plot(table: pd.DataFrame, y_label: str, engine: str = "lme4") -> Figure:
    """Prediction for one observation in a new group: the plug-in interval beside PyMC's.

    Parameters
    ----------
    table : DataFrame
        From :func:`harness.report.tables.new_group_table`.
    y_label : str
    engine : str
        Name of the frequentist engine for the legend.
    """
    _require(table, "no covariate profile")
    n = len(table)
    fig = _fig(max(5.0, 0.75 * n + 2.5), 4.2)
    ax = fig.subplots()
    pos = np.arange(n)
    for dx, style, prefix in ((-0.12, LME4, "lme4"), (0.12, PYMC, "pymc")):
        mean = table[f"{prefix}_mean"].to_numpy(float)
        intervals(
            ax,
            pos + dx,
            mean,
            table[f"{prefix}_lower"],
            table[f"{prefix}_upper"],
            style,
            vertical=True,
            capsize=4,
            markersize=6,
        )
        if n > 2:  # a trend over an ordered covariate; two profiles are categories
            ax.plot(pos + dx, mean, color=style["color"], linestyle=style["linestyle"], linewidth=1)
    ax.set_xticks(
        pos,
        list(table["profile"]),
        rotation=30 if n > 4 else 0,
        ha="right" if n > 4 else "center",
        fontsize=TICK_SIZE,
    )
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_ylabel(y_label, fontsize=LABEL_SIZE)
    ax.set_xlabel("covariate profile of the new observation", fontsize=LABEL_SIZE)
    _finish(ax)
    handles = _legend_handles(
        LME4,
        PYMC,
        labels=[
            f"{engine} plug-in: x'β̂ ± 1.96·sqrt(z'Ĝz + σ̂²)",
            "PyMC: posterior predictive mean, 95% interval",
        ],
    )
    fig.legend(
        handles=handles, loc="outside lower center", ncols=2, fontsize=TICK_SIZE, frameon=False
    )
    return fig


# --------------------------------------------------------------------------- diagnostics


def rank_plot(draws: pd.DataFrame, bins: int = 20) -> Figure:
    """Rank histograms per chain: flat and overlapping when the chains mix well.

    Parameters
    ----------
    draws : DataFrame
        (parameter, chain, draw, value), from :func:`harness.report.tables.rank_draws`.
    bins : int
    """
    from scipy.stats import rankdata

    _require(draws, "no draws")
    parameters = list(dict.fromkeys(draws["parameter"]))
    ncols = 3 if len(parameters) > 2 else len(parameters)
    nrows = math.ceil(len(parameters) / ncols)
    fig = _fig(3.2 * ncols + 0.5, 2.3 * nrows + 0.6)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False).ravel())
    styles = ["-", "--", ":", "-."]
    shades = ["#000000", "#D55E00", "#0072B2", "#777777"]
    for ax, name in zip(axes, parameters, strict=False):
        part = draws[draws["parameter"] == name]
        ranks = rankdata(part["value"].to_numpy(float))
        edges = np.linspace(0, len(ranks), bins + 1)
        chains = sorted(part["chain"].unique())
        for k, chain in enumerate(chains):
            counts, _ = np.histogram(ranks[part["chain"].to_numpy() == chain], bins=edges)
            ax.stairs(
                counts,
                edges,
                color=shades[k % 4],
                linestyle=styles[k % 4],
                linewidth=1.2,
                label=f"chain {chain}",
            )
        expected = len(ranks) / len(chains) / bins
        ax.axhline(expected, color="#999999", linewidth=0.8)
        ax.set_title(name, fontsize=TICK_SIZE, y=PINNED)  # counts from 0: no offset text
        ax.set_xlabel("rank of draw (all chains)", fontsize=TICK_SIZE)
        ax.set_ylabel("draws per bin", fontsize=TICK_SIZE)
        ax.set_ylim(0, None)
        _finish(ax)
    for ax in axes[len(parameters) :]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(
        handles,
        labels,
        loc="outside lower center",
        ncols=len(labels),
        fontsize=TICK_SIZE,
        frameon=False,
    )
    return fig
