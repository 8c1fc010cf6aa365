"""Hanging rootogram: observed count frequencies against both engines' expectations.

Takes :func:`harness.checks.dispersion.rootogram_table` and returns a
Figure, one panel per engine.  On the square-root scale (Tukey's rootogram)
equal deviations read alike for rare and common counts; each bar of the
observed frequency hangs from the engine's expected frequency, so where a
bar's foot falls below zero the engine expects too few of that count, and
where it stops above zero, too many.  The other engine's expectation is
drawn thin in each panel, for the comparison between engines.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from harness.report.plots import (
    LABEL_SIZE,
    LME4,
    PYMC,
    TITLE_SIZE,
    FigureDataError,
    _fig,
    _finish,
)

__all__ = ["rootogram_figure"]

#: At most this many tick labels on the count axis.
MAX_TICKS = 16
COLUMNS = ("label", "observed", "expected_lme4", "expected_pymc")


def rootogram_figure(table: pd.DataFrame, response: str = "count", engine: str = "lme4") -> Figure:
    """Two hanging rootograms (lme4, PyMC) of one table of frequencies.

    Parameters
    ----------
    table : DataFrame
        ``label``, ``observed``, ``expected_lme4``, ``expected_pymc`` per bin
        of counts, in order.
    response : str
        The response's name, for the axis label.
    engine : str
        What fitted the reference side (``lme4``, or ``nlme`` standing in).

    Raises
    ------
    FigureDataError
        When the table is empty or misses a column (the report shows a note).
    """
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise FigureDataError(f"the frequency table has no column {missing}")
    if len(table) == 0:
        raise FigureDataError("nothing to draw: no bins of counts")
    observed = np.sqrt(np.maximum(table["observed"].to_numpy(float), 0.0))
    expected = {
        "lme4": np.sqrt(np.maximum(table["expected_lme4"].to_numpy(float), 0.0)),
        "PyMC": np.sqrt(np.maximum(table["expected_pymc"].to_numpy(float), 0.0)),
    }
    x = np.arange(len(table))
    labels = [str(v) for v in table["label"]]
    step = max(1, int(np.ceil(len(x) / MAX_TICKS)))
    fig = _fig(min(max(8.0, 4.0 + 0.3 * len(x)), 12.0), 3.4)
    axes = fig.subplots(1, 2, sharey=True)
    titles = {
        "lme4": f"{engine}: at its conditional modes",
        "PyMC": "PyMC: posterior predictive",
    }
    for ax, name in zip(axes, ("lme4", "PyMC"), strict=True):
        style, other_style = (LME4, PYMC) if name == "lme4" else (PYMC, LME4)
        other = "PyMC" if name == "lme4" else "lme4"
        hang = expected[name]
        if np.all(np.isfinite(hang)):
            ax.bar(
                x,
                observed,
                width=0.8,
                bottom=hang - observed,
                color="#bbbbbb",
                edgecolor="#777777",
                linewidth=0.5,
                label="observed (hanging)",
            )
        ax.plot(
            x,
            hang,
            color=style["color"],
            marker=style["marker"],
            markersize=3.5,
            linewidth=1.4,
            label=f"{engine if name == 'lme4' else name} expected",
        )
        ax.plot(
            x,
            expected[other],
            color=other_style["color"],
            linestyle=":",
            linewidth=1.0,
            label=f"{engine if other == 'lme4' else other} expected",
        )
        ax.axhline(0.0, color="#333333", linewidth=0.8)
        ax.set_xticks(x[::step], labels[::step], rotation=45 if step > 1 or len(x) > 12 else 0)
        ax.set_xlabel(response, fontsize=LABEL_SIZE)
        ax.set_title(titles[name], fontsize=TITLE_SIZE)
        _finish(ax)
    # Bars stick to their feet, so autoscaling would cut the lowest foot at the frame.
    ends = np.concatenate([*expected.values(), *(h - observed for h in expected.values()), [0.0]])
    ends = ends[np.isfinite(ends)]
    pad = 0.05 * max(float(ends.max() - ends.min()), 1.0)
    axes[0].set_ylim(float(ends.min()) - pad, float(ends.max()) + pad)
    axes[0].set_ylabel("√frequency", fontsize=LABEL_SIZE)
    axes[1].legend(fontsize=7, loc="upper right", frameon=False)
    return fig
