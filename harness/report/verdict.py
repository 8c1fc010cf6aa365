"""The verdict table as a page shows it: rows with their pictures, and the pictures' key.

Shared by the design report (:mod:`harness.report.page`) and the Jupyter views
(:mod:`harness.report.notebook`), so both show the same table.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from harness.report.bars import (
    MCSE_SOURCE,
    REMAINDER,
    attribution_segments,
    bar_svg,
    legend_svg,
    source_order,
)

__all__ = ["verdict_view"]


def verdict_view(table: pd.DataFrame) -> dict[str, Any]:
    """Rows of the verdict table with each one's picture (``bar``: SVG text), and the key.

    Parameters
    ----------
    table : DataFrame
        :func:`harness.report.tables.verdict_table`.

    Returns
    -------
    dict
        ``rows`` (records, each with ``bar``: "" when the row has no split of its
        gap), ``legend`` (SVG text of the key, "" without any picture) and
        ``segments`` (:func:`harness.report.bars.attribution_segments`).
    """
    segments = attribution_segments(table)
    rows = table.to_dict("records")
    for position, row in enumerate(rows):
        row["bar"] = bar_svg(segments[segments["row"] == position])
    steps = segments.loc[segments["kind"] == "step", "part"]
    present = list(dict.fromkeys(str(s) for s in steps))
    sources = [s for s in source_order(present) if s != REMAINDER]
    if MCSE_SOURCE in present:
        sources.append(MCSE_SOURCE)
    return {
        "rows": rows,
        "legend": legend_svg(sources) if len(segments) else "",
        "segments": segments,
    }
