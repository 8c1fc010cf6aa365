"""The attribution of each verdict row as a picture: where the gap comes from, at a glance.

A row's gap (PyMC's summary minus lme4's estimate) is the sum of its named
sources and a remainder (:mod:`harness.checks.attribution`).  The picture
starts at lme4's estimate (0), walks through the sources one segment each, and
ends at PyMC's value; the remainder is the last step.  Around the point the
sources reach stands the tolerance band (what the remainder may be,
``max(3 MCSE, the row's tolerance)``), and around PyMC's value its +/- 2 MCSE
band: the row is explained when PyMC's value lies inside the tolerance band.

Computing and drawing are apart: :func:`attribution_segments` turns the verdict
table (:func:`harness.report.tables.verdict_table`) into a tidy table of
segments and bands; :func:`bar_svg` draws one row of it as inline SVG (pages stay
self-contained), :func:`legend_svg` the key, and :func:`overview_figure` all rows
as one matplotlib Figure.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from harness.checks.attribution import OPTIMIZER_SOURCE, REMAINDER_MCSE, SOURCES
from harness.checks.glmm_attribution import LAPLACE_SOURCE
from harness.checks.noise import noise_floor

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "SOURCE_COLOURS",
    "attribution_segments",
    "bar_svg",
    "denoise",
    "legend_svg",
    "noise_floor",
    "overview_figure",
    "source_order",
]


REMAINDER = "remainder"
#: Agreement rows (1 - r): Monte Carlo noise lowers a correlation, so it is one of the steps.
MCSE_SOURCE = "mcse"

#: Colour-blind-safe colours (Okabe-Ito) of the sources the checks name; any other source
#: gets :data:`FALLBACK_COLOUR`, so a new source is drawn before it is given its own.
SOURCE_COLOURS: dict[str, str] = {
    OPTIMIZER_SOURCE: "#0072B2",
    LAPLACE_SOURCE: "#CC79A7",
    **dict(
        zip(
            [s for s in SOURCES if s != REMAINDER],
            ["#E69F00", "#56B4E9", "#009E73"],
            strict=False,
        )
    ),
    MCSE_SOURCE: "#999999",
    REMAINDER: "#333333",
}
FALLBACK_COLOUR = "#8C6D31"
LME4_COLOUR = "#000000"
PYMC_COLOUR = "#D55E00"
BAND_EXPLAINED = "#DCEFDC"
BAND_UNEXPLAINED = "#F6D5D5"

#: Readable names of the sources (others show their key with spaces).
SOURCE_NAMES = {
    OPTIMIZER_SOURCE: "lme4 optimizer",
    LAPLACE_SOURCE: "Laplace",
    MCSE_SOURCE: "Monte Carlo",
    REMAINDER: "rest",
}

#: Short names of the row scales for the picture's label.
SCALE_SHORT = {"lme4 SE": "SE", "posterior SD": "SD", "1 - r": "1−r"}


def denoise(value: Any, floor: float) -> float | None:
    """``value`` as a float, 0 when below ``floor``; None when it is missing or undefined."""
    if value is None or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    number = float(value)
    if not np.isfinite(number):
        return None
    return 0.0 if abs(number) < floor else number


def source_order(keys: Sequence[str]) -> list[str]:
    """The named sources among ``keys`` in drawing order: lme4's own corrections first, the
    other known sources in the checks' order, new ones after them (``remainder`` and ``mcse``
    are not among them: the remainder is always the last step, ``mcse`` a band or, for the
    agreement rows, a step of its own)."""
    known = [OPTIMIZER_SOURCE, LAPLACE_SOURCE, *[s for s in SOURCES if s != REMAINDER]]
    present = [k for k in known if k in keys]
    present += [k for k in keys if k not in known and k not in (MCSE_SOURCE, REMAINDER)]
    return present


def source_colour(source: str) -> str:
    """The source's fixed colour; :data:`FALLBACK_COLOUR` for one the checks added later."""
    return SOURCE_COLOURS.get(source, FALLBACK_COLOUR)


def source_name(source: str) -> str:
    """The source as the key and tooltips name it."""
    return SOURCE_NAMES.get(source, str(source).replace("_", " "))


# --------------------------------------------------------------------------- computing


def attribution_segments(verdict: pd.DataFrame) -> pd.DataFrame:
    """The picture of every row as a tidy table: one row per step and band.

    Parameters
    ----------
    verdict : DataFrame
        :func:`harness.report.tables.verdict_table`; rows need ``quantity``,
        ``section``, ``verdict``, ``parts`` (the attribution mapping), ``scale``,
        ``scale_name``, ``mcse``, ``limit`` and ``mcse_is_step``.  Rows without
        a finite share (no lme4 value, the same-model row) are left out.

    Returns
    -------
    DataFrame
        row (position in ``verdict``), quantity, section, verdict, part (a source, ``remainder``, ``tolerance`` or
        ``mcse``), kind (``step`` or ``band``), start, end, value (row units), scale,
        scale_name, half_width (the picture's half-width, row units), gap, explained.
        Steps walk from 0 (lme4) to the gap; the tolerance band is centred where the
        sources end, the MCSE band (+/- 2 MCSE) on the gap.  Shares below the row's
        noise (:func:`noise_floor`) are 0.
    """
    columns = [
        "row",
        "quantity",
        "section",
        "verdict",
        "part",
        "kind",
        "start",
        "end",
        "value",
        "scale",
        "scale_name",
        "half_width",
        "gap",
        "explained",
    ]
    out: list[dict[str, Any]] = []
    for position, row in enumerate(verdict.to_dict("records")):
        parts = row.get("parts")
        if not isinstance(parts, Mapping):
            continue
        scale = float(row.get("scale", float("nan")))
        mcse = float(row.get("mcse", float("nan")))
        floor = noise_floor(scale, mcse)
        keys = source_order(list(parts))
        if row.get("mcse_is_step"):
            keys.append(MCSE_SOURCE)
        shares = [(k, denoise(parts.get(k), floor)) for k in keys]
        rest = denoise(parts.get(REMAINDER), floor)
        if rest is None or all(v is None for _, v in shares):
            continue
        steps: list[tuple[str, float]] = [(k, v) for k, v in shares if v]
        steps.append((REMAINDER, rest))
        gap = float(sum(v for _, v in steps))
        reached = gap - rest
        limit = float(row.get("limit", float("nan")))
        band = mcse if not row.get("mcse_is_step") else float("nan")
        points = [0.0, gap, *np.cumsum([v for _, v in steps])]
        if np.isfinite(limit):
            points += [reached - limit, reached + limit]
        if np.isfinite(band):
            points += [gap - 2 * band, gap + 2 * band]
        half = 1.08 * max(abs(p) for p in points)
        if not half > 0:
            half = limit if np.isfinite(limit) and limit > 0 else 1.0
        explained = bool(abs(rest) <= limit) if np.isfinite(limit) else False
        common = {
            "row": position,
            "quantity": row["quantity"],
            "section": row.get("section", ""),
            "verdict": row.get("verdict", ""),
            "scale": scale,
            "scale_name": row.get("scale_name", ""),
            "half_width": half,
            "gap": gap,
            "explained": explained,
        }
        start = 0.0
        for key, value in steps:
            out.append(
                {
                    **common,
                    "part": key,
                    "kind": "step",
                    "start": start,
                    "end": start + value,
                    "value": value,
                }
            )
            start += value
        if np.isfinite(limit):
            out.append(
                {
                    **common,
                    "part": "tolerance",
                    "kind": "band",
                    "start": reached - limit,
                    "end": reached + limit,
                    "value": limit,
                }
            )
        if np.isfinite(band):
            out.append(
                {
                    **common,
                    "part": "mcse",
                    "kind": "band",
                    "start": gap - 2 * band,
                    "end": gap + 2 * band,
                    "value": band,
                }
            )
    return pd.DataFrame(out, columns=columns)


def remainder_limit(scale: float, mcse: float, tolerance: float) -> float:
    """What a row's remainder may be: ``max(3 MCSE, tolerance)`` (the checks' rule)."""
    values = [v for v in (REMAINDER_MCSE * mcse, tolerance) if np.isfinite(v)]
    return max(values) if values else float("nan")


# --------------------------------------------------------------------------- drawing

BAR_WIDTH = 180
LABEL_WIDTH = 72
BAR_HEIGHT = 18


def _number(value: float) -> str:
    return f"{value:+.3g}" if value != 0 else "0"


def bar_svg(segments: pd.DataFrame) -> str:
    """One row's picture as an inline ``<svg>`` (empty string when the row has none).

    Inline SVG in an HTML page needs no namespace declaration, so the markup names no
    other origin (the reports' self-containment test looks for any ``http``).

    Parameters
    ----------
    segments : DataFrame
        The rows of :func:`attribution_segments` for one quantity.
    """
    if len(segments) == 0:
        return ""
    first = segments.iloc[0]
    half = float(first["half_width"])
    scale = float(first["scale"])
    unit = SCALE_SHORT.get(str(first["scale_name"]), str(first["scale_name"]))

    def x(value: float) -> float:
        return round(BAR_WIDTH / 2 + (BAR_WIDTH / 2 - 2) * value / half, 1)

    shapes = []
    tooltip = [f"gap {_number(float(first['gap']))}"]
    bands = segments[segments["kind"] == "band"]
    steps = segments[segments["kind"] == "step"]
    for band in bands.itertuples():
        if band.part == "tolerance":
            fill = BAND_EXPLAINED if first["explained"] else BAND_UNEXPLAINED
            shapes.append(
                f'<rect class="tolerance" x="{x(band.start)}" y="0" '
                f'width="{max(x(band.end) - x(band.start), 1)}" height="{BAR_HEIGHT}" '
                f'fill="{fill}"/>'
            )
            tooltip.append(f"tolerance of the rest ±{band.value:.3g}")
    shapes.append(
        f'<line x1="{x(0)}" x2="{x(0)}" y1="0" y2="{BAR_HEIGHT}" stroke="{LME4_COLOUR}" '
        'stroke-width="1"/>'
    )
    for step in steps.itertuples():
        left, right = sorted((x(step.start), x(step.end)))
        if step.part == REMAINDER:
            y, height = BAR_HEIGHT / 2 - 2, 4
        else:
            y, height = 4, BAR_HEIGHT - 8
        shapes.append(
            f'<rect class="step" data-source="{html.escape(str(step.part))}" x="{left}" '
            f'y="{y}" width="{max(right - left, 0.8)}" height="{height}" '
            f'fill="{source_colour(str(step.part))}"/>'
        )
        tooltip.append(f"{source_name(str(step.part))} {_number(float(step.value))}")
    for band in bands.itertuples():
        if band.part == "mcse":
            mid = BAR_HEIGHT / 2
            shapes.append(
                f'<path class="mcse" d="M{x(band.start)} {mid}H{x(band.end)}'
                f'M{x(band.start)} {mid - 3}v6M{x(band.end)} {mid - 3}v6" '
                f'stroke="{PYMC_COLOUR}" stroke-width="1.2" fill="none"/>'
            )
            tooltip.append(f"MCSE {band.value:.2g}")
    gap = float(first["gap"])
    shapes.append(
        f'<line class="pymc" x1="{x(gap)}" x2="{x(gap)}" y1="1" y2="{BAR_HEIGHT - 1}" '
        f'stroke="{PYMC_COLOUR}" stroke-width="2"/>'
    )
    in_scale = half / scale if scale > 0 and np.isfinite(scale) else half
    label = f"±{in_scale:.2g} {unit}".strip()
    verdict = "explained" if first["explained"] else "not explained"
    title = f"{first['quantity']}: " + ", ".join(tooltip) + f" ({verdict})"
    width = BAR_WIDTH + LABEL_WIDTH
    return (
        f'<svg class="attribution" width="{width}" '
        f'height="{BAR_HEIGHT}" viewBox="0 0 {width} {BAR_HEIGHT}" role="img" '
        f'aria-label="{html.escape(title)}"><title>{html.escape(title)}</title>'
        + "".join(shapes)
        + f'<text x="{BAR_WIDTH + 4}" y="{BAR_HEIGHT - 5}" font-size="10" fill="#5c5c5c">'
        f"{html.escape(label)}</text></svg>"
    )


def legend_svg(sources: Sequence[str]) -> str:
    """The key of the pictures: the sources present, the rest, lme4, PyMC and the bands."""
    swatch = '<rect x="{x0}" y="{y}" width="14" height="{h}" fill="{colour}"/>'
    entries = [
        (
            swatch.format(
                x0="{x0}",
                y=5 if s == REMAINDER else 3,
                h=4 if s == REMAINDER else 8,
                colour=source_colour(s),
            ),
            source_name(s),
        )
        for s in [*sources, REMAINDER]
    ]
    entries += [
        (f'<line x1="{{x}}" x2="{{x}}" y1="0" y2="14" stroke="{LME4_COLOUR}"/>', "lme4"),
        (
            f'<line x1="{{x}}" x2="{{x}}" y1="0" y2="14" stroke="{PYMC_COLOUR}" stroke-width="2"/>',
            "PyMC",
        ),
        (
            f'<path d="M{{x0}} 7H{{x1}}M{{x0}} 4v6M{{x1}} 4v6" stroke="{PYMC_COLOUR}" '
            'fill="none"/>',
            "±2 MCSE",
        ),
        (f'<rect x="{{x0}}" y="0" width="14" height="14" fill="{BAND_EXPLAINED}"/>', "tolerance"),
    ]
    body = []
    cursor = 0.0
    for shape, name in entries:
        body.append(shape.format(x=cursor + 7, x0=cursor, x1=cursor + 14))
        body.append(f'<text x="{cursor + 18}" y="11" font-size="11">{html.escape(name)}</text>')
        cursor += 18 + 6.5 * len(name) + 14
    width = math.ceil(cursor)
    return (
        f'<svg class="attribution-legend" width="{width}" '
        f'height="14" viewBox="0 0 {width} 14" role="img" aria-label="key of the pictures">'
        + "".join(body)
        + "</svg>"
    )


def overview_figure(segments: pd.DataFrame) -> Figure:
    """Every row's picture in one Figure (each row to its own scale, like the table's).

    Parameters
    ----------
    segments : DataFrame
        :func:`attribution_segments`.

    Raises
    ------
    harness.report.plots.FigureDataError
        When no row has a picture.
    """
    from matplotlib.patches import Patch

    from harness.report.plots import FigureDataError, _fig

    if len(segments) == 0:
        raise FigureDataError("no row of the verdict table has a split of its gap to draw")
    positions = list(dict.fromkeys(segments["row"]))
    quantities = [str(segments.loc[segments["row"] == p, "quantity"].iloc[0]) for p in positions]
    fig = _fig(8.0, 1.6 + 0.38 * len(quantities))
    ax = fig.add_subplot(1, 1, 1)
    seen: list[str] = []
    for i, position in enumerate(positions):
        rows = segments[segments["row"] == position]
        first = rows.iloc[0]
        half = float(first["half_width"])
        y = len(quantities) - 1 - i

        def x(value: float, half: float = half) -> float:
            return value / half

        for band in rows[(rows["kind"] == "band") & (rows["part"] == "tolerance")].itertuples():
            colour = BAND_EXPLAINED if first["explained"] else BAND_UNEXPLAINED
            ax.barh(y, x(band.end) - x(band.start), left=x(band.start), height=0.8, color=colour)
        for step in rows[rows["kind"] == "step"].itertuples():
            thin = step.part == REMAINDER
            ax.barh(
                y,
                x(step.end) - x(step.start),
                left=x(step.start),
                height=0.2 if thin else 0.5,
                color=source_colour(str(step.part)),
            )
            if step.part not in seen:
                seen.append(str(step.part))
        bands = rows[rows["kind"] == "band"]
        for band in bands[bands["part"] == "mcse"].itertuples():
            ax.errorbar(
                x(float(first["gap"])),
                y,
                xerr=x(band.end - band.start) / 2,
                fmt="none",
                ecolor=PYMC_COLOUR,
                capsize=3,
                lw=1,
            )
        ax.plot([x(float(first["gap"]))] * 2, [y - 0.4, y + 0.4], color=PYMC_COLOUR, lw=2)
        scale = float(first["scale"])
        unit = SCALE_SHORT.get(str(first["scale_name"]), str(first["scale_name"]))
        in_scale = half / scale if scale > 0 and np.isfinite(scale) else half
        ax.text(
            1.01,
            y,
            f"±{in_scale:.2g} {unit}",
            va="center",
            fontsize=8,
            color="#5c5c5c",
            transform=ax.get_yaxis_transform(),
        )
    ax.axvline(0.0, color=LME4_COLOUR, lw=1)
    ax.set_yticks(range(len(quantities)), list(reversed(quantities)), fontsize=8)
    ax.set_xlim(-1.0, 1.0)
    ax.set_xticks([-1.0, 0.0, 1.0], ["−", "lme4", "+"], fontsize=8)
    ax.set_xlabel("PyMC − lme4, each row to its own scale (label: half-width)", fontsize=9)
    ordered = [s for s in source_order(seen) if s != REMAINDER]
    if MCSE_SOURCE in seen:
        ordered.append(MCSE_SOURCE)
    handles = [Patch(color=source_colour(s), label=source_name(s)) for s in [*ordered, REMAINDER]]
    handles.append(Patch(color=BAND_EXPLAINED, label="tolerance (explained)"))
    handles.append(Patch(color=BAND_UNEXPLAINED, label="tolerance (not explained)"))
    ax.legend(
        handles=handles,
        fontsize=7,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.12 - 0.25 / max(len(quantities), 1)),
        ncol=4,
        frameon=False,
    )
    ax.set_title("Where each gap comes from", fontsize=10)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return fig
