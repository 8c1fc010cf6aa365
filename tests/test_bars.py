"""The attribution pictures: the segments table from a verdict table, its SVG and overview.

Pure tables (no fit): what each row's picture must show follows from the row's
numbers, so the tests state those numbers and check the geometry and the words.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

import numpy as np
import pandas as pd
import pytest

from harness.checks.attribution import OPTIMIZER_SOURCE, SOURCES
from harness.checks.glmm_attribution import LAPLACE_SOURCE
from harness.report.bars import (
    FALLBACK_COLOUR,
    SOURCE_COLOURS,
    attribution_segments,
    bar_svg,
    denoise,
    legend_svg,
    noise_floor,
    overview_figure,
)
from harness.report.plots import FigureDataError
from harness.report.tables import attribution_text
from harness.report.verdict import verdict_view


def _row(quantity: str, parts: dict, scale: float = 1.0, limit: float = 0.25, **kw) -> dict:
    return {
        "section": kw.pop("section", "fixed effect"),
        "quantity": quantity,
        "verdict": kw.pop("verdict", "look"),
        "parts": parts,
        "scale": scale,
        "scale_name": kw.pop("scale_name", "lme4 SE"),
        "mcse": parts.get("mcse", float("nan")),
        "limit": limit,
        "mcse_is_step": kw.pop("mcse_is_step", False),
        **kw,
    }


def test_every_source_the_checks_name_has_its_own_colour() -> None:
    known = [s for s in SOURCES if s != "remainder"] + [OPTIMIZER_SOURCE, LAPLACE_SOURCE]
    colours = [SOURCE_COLOURS[s] for s in known]
    assert len(set(colours)) == len(colours)
    assert FALLBACK_COLOUR not in colours


def test_noise_prints_as_zero() -> None:
    floor = noise_floor(6.8, 0.04)
    assert 0 < floor < 1e-4
    assert denoise(1.78e-15, floor) == 0.0
    assert denoise(0.012, floor) == 0.012
    assert denoise(None, floor) is None and denoise(float("nan"), floor) is None
    text = attribution_text(
        {"mcse": 0.04, "prior": 0.012, "summary": 1.78e-15, "remainder": 0.3}, floor
    )
    assert "e-15" not in text and "summary" not in text
    assert text.startswith("prior +0.012") and "rest +0.3" in text


def test_steps_walk_from_zero_to_the_gap_and_the_band_decides() -> None:
    explained = _row("a", {"mcse": 0.01, "prior": 0.3, "summary": -0.1, "remainder": 0.05})
    unexplained = _row("b", {"mcse": 0.01, "prior": 0.1, "boundary": 0.0, "remainder": 0.9})
    seg = attribution_segments(pd.DataFrame([explained, unexplained]))
    a = seg[seg["quantity"] == "a"]
    steps = a[a["kind"] == "step"]
    assert list(steps["part"]) == ["prior", "summary", "remainder"]
    assert steps["start"].iloc[0] == 0.0
    assert np.allclose(steps["start"].iloc[1:].to_numpy(), steps["end"].iloc[:-1].to_numpy())
    assert math.isclose(steps["end"].iloc[-1], 0.25)
    band = a[a["part"] == "tolerance"].iloc[0]
    assert math.isclose(band["start"], 0.2 - 0.25) and math.isclose(band["end"], 0.2 + 0.25)
    mcse = a[a["part"] == "mcse"].iloc[0]
    assert math.isclose(mcse["start"], 0.25 - 0.02)
    assert bool(a["explained"].iloc[0]) and not bool(
        seg[seg["quantity"] == "b"]["explained"].iloc[0]
    )
    # the boundary share is 0: no segment of its own
    assert "boundary" not in set(seg.loc[seg["quantity"] == "b", "part"])
    # everything drawn lies inside the picture
    for _, group in seg.groupby("row"):
        half = group["half_width"].iloc[0]
        assert group[["start", "end"]].abs().to_numpy().max() <= half


def test_a_new_source_is_drawn_in_the_fallback_colour_and_a_row_without_parts_is_left_out() -> None:
    rows = [
        _row("new", {"mcse": 0.01, "prior": 0.1, "brand_new": 0.2, "remainder": 0.0}),
        _row("none", {"mcse": 0.01, "prior": None, "summary": None, "remainder": None}),
        {**_row("same model", {}), "parts": None},
    ]
    view = verdict_view(pd.DataFrame(rows))
    assert set(view["segments"]["quantity"]) == {"new"}
    svg = view["rows"][0]["bar"]
    root = ET.fromstring(svg)
    fills = {r.get("data-source"): r.get("fill") for r in root.iter("rect") if r.get("data-source")}
    assert fills["brand_new"] == FALLBACK_COLOUR and fills["prior"] == SOURCE_COLOURS["prior"]
    assert view["rows"][1]["bar"] == "" and view["rows"][2]["bar"] == ""
    assert "brand new" in view["legend"]
    ET.fromstring(view["legend"])  # well-formed


def test_agreement_rows_step_through_monte_carlo_noise() -> None:
    row = _row(
        "g: x (correlation)",
        {"mcse": 0.001, "prior": 0.002, "summary": 0.003, "boundary": 0.0, "remainder": 0.0005},
        limit=0.02,
        mcse_is_step=True,
        scale_name="1 - r",
        section="random effects",
    )
    seg = attribution_segments(pd.DataFrame([row]))
    assert "mcse" in set(seg.loc[seg["kind"] == "step", "part"])
    assert math.isclose(seg["gap"].iloc[0], 0.0065)
    assert not (seg["kind"].eq("band") & seg["part"].eq("mcse")).any()


def test_the_svg_escapes_names_and_is_well_formed() -> None:
    row = _row("<b>x</b> & y", {"mcse": 0.01, "prior": 0.3, "remainder": 0.05})
    svg = bar_svg(attribution_segments(pd.DataFrame([row])))
    assert "<b>" not in svg
    root = ET.fromstring(svg)
    assert root.find("title").text.startswith("<b>x</b> & y")
    ET.fromstring(legend_svg(["prior"]))


def test_overview_figure_draws_every_row_or_says_why_not() -> None:
    rows = [
        _row("a", {"mcse": 0.01, "prior": 0.3, "remainder": 0.05}),
        _row(
            "b",
            {"mcse": 0.2, "laplace": -0.4, "remainder": 0.9},
            scale=2.0,
            scale_name="posterior SD",
        ),
    ]
    fig = overview_figure(attribution_segments(pd.DataFrame(rows)))
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels == ["b", "a"]
    with pytest.raises(FigureDataError):
        overview_figure(attribution_segments(pd.DataFrame([{**rows[0], "parts": None}])))


def test_the_overview_draws_an_mcse_band_only_where_the_row_has_one() -> None:
    rows = [
        _row("fixed", {"mcse": 0.01, "prior": 0.3, "remainder": 0.05}),
        _row(
            "offsets",
            {"mcse": 0.001, "prior": 0.002, "summary": 0.01, "remainder": 0.001},
            limit=0.02,
            mcse_is_step=True,
            scale_name="1 - r",
        ),
    ]
    fig = overview_figure(attribution_segments(pd.DataFrame(rows)))
    # one error bar (the fixed row's +/- 2 MCSE); the offsets row steps through its MCSE
    assert (
        len(fig.axes[0].containers)
        - sum(1 for c in fig.axes[0].containers if c.__class__.__name__ == "BarContainer")
        == 1
    )
