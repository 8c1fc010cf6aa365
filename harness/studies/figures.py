"""Figures of a study: each takes a summary or results table and returns a Figure."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from harness.studies.sbc import ecdf_band, ecdf_difference
from harness.studies.summary import Z

_MARKERS = "osD^vP*X"


def _condition_labels(frame: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(frame["condition"].astype(str)))


def rate_figure(summary: pd.DataFrame, column: str, nominal: float, title: str) -> Figure:
    """Dot plot of a rate per condition and fitter, +/- 1.96 MC SE, against its nominal value.

    Parameters
    ----------
    summary : DataFrame
        From :func:`harness.studies.summary.summarise` (rows already filtered).
    column : {"rejection", "coverage"}
    nominal : float
        Drawn as a line, with the band of rates consistent with it given the
        Monte Carlo error at the median number of replicates.
    """
    frame = summary[summary[column].notna()]
    conditions = _condition_labels(frame)
    fitters = list(dict.fromkeys(frame["fitter"].astype(str)))
    height = 1.2 + 0.32 * len(conditions) * max(1.0, len(fitters) / 3)
    fig = Figure(figsize=(8.5, height), layout="constrained")
    ax = fig.add_subplot()
    if frame.empty:
        ax.text(0.5, 0.5, "no replicates", ha="center", va="center", transform=ax.transAxes)
        return fig
    n = float(frame["n"].median())
    half = Z * math.sqrt(nominal * (1 - nominal) / n)
    ax.axvspan(
        nominal - half,
        nominal + half,
        color="0.88",
        zorder=0,
        label=f"nominal {nominal:g} ± 1.96 MC SE (n = {n:.0f})",
    )
    ax.axvline(nominal, color="0.4", lw=1, zorder=1)
    step = 0.7 / max(len(fitters), 1)
    for j, fitter in enumerate(fitters):
        sub = frame[frame["fitter"].astype(str) == fitter]
        y = np.array([conditions.index(c) for c in sub["condition"].astype(str)], float)
        y = y - 0.35 + step * (j + 0.5)
        ax.errorbar(
            sub[column],
            y,
            xerr=Z * sub[f"{column}_mcse"],
            fmt=_MARKERS[j % len(_MARKERS)],
            ms=5,
            capsize=2,
            lw=1,
            label=fitter,
            zorder=2,
        )
    ax.set_yticks(range(len(conditions)), conditions, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"{column} (bars: ± 1.96 Monte Carlo SE)")
    ax.set_title(title, fontsize=11)
    ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="x", color="0.92")
    return fig


def bias_figure(summary: pd.DataFrame) -> Figure:
    """Bias per condition and fitter, +/- 1.96 MC SE."""
    frame = summary[summary["bias"].notna()]
    conditions = _condition_labels(frame)
    fitters = list(dict.fromkeys(frame["fitter"].astype(str)))
    fig = Figure(
        figsize=(8.5, 1.2 + 0.32 * len(conditions) * max(1.0, len(fitters) / 3)),
        layout="constrained",
    )
    ax = fig.add_subplot()
    ax.axvline(0, color="0.4", lw=1)
    step = 0.7 / max(len(fitters), 1)
    for j, fitter in enumerate(fitters):
        sub = frame[frame["fitter"].astype(str) == fitter]
        y = np.array([conditions.index(c) for c in sub["condition"].astype(str)], float)
        ax.errorbar(
            sub["bias"],
            y - 0.35 + step * (j + 0.5),
            xerr=Z * sub["bias_mcse"],
            fmt=_MARKERS[j % len(_MARKERS)],
            ms=5,
            capsize=2,
            lw=1,
            label=fitter,
        )
    ax.set_yticks(range(len(conditions)), conditions, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("bias of the treatment effect (bars: ± 1.96 Monte Carlo SE)")
    ax.set_title("Bias", fontsize=11)
    ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="x", color="0.92")
    return fig


def sbc_ecdf_figure(results: pd.DataFrame, level: float = 0.99) -> Figure:
    """ECDF of the SBC ranks minus the uniform CDF, with simultaneous ``level`` bands."""
    ok = results[results["rank"].notna() & results["error"].isna()]
    parameters = list(dict.fromkeys(ok["parameter"].astype(str)))
    cols = 3
    rows = max(1, math.ceil(len(parameters) / cols))
    fig = Figure(figsize=(9, 2.6 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharey=True)
    for ax, parameter in zip(axes.flat, parameters, strict=False):
        sub = ok[ok["parameter"].astype(str) == parameter]
        n_draws = int(sub["n_draws"].iloc[0])
        diff = ecdf_difference(sub["rank"].to_numpy(dtype=int), n_draws)
        band = ecdf_band(len(sub), n_draws, level=level)
        ax.fill_between(
            band["z"],
            band["lower"],
            band["upper"],
            step="post",
            color="0.85",
            label=f"{level:.0%} simultaneous band",
        )
        ax.step(diff["z"], diff["diff"], where="post", color="C0", lw=1.2, label="ECDF − uniform")
        ax.axhline(0, color="0.4", lw=0.8)
        ax.set_title(f"{parameter} (n = {len(sub)})", fontsize=10)
        ax.set_xlabel("fractional rank")
    for ax in axes.flat[len(parameters) :]:
        ax.set_visible(False)
    axes[0, 0].set_ylabel("ECDF difference")
    axes[0, 0].legend(fontsize=7, frameon=False, loc="lower left")
    return fig


def sbc_histogram_figure(results: pd.DataFrame, bins: int = 10) -> Figure:
    """Histograms of the SBC ranks with the expected count and its 99% binomial range."""
    from scipy import stats

    ok = results[results["rank"].notna() & results["error"].isna()]
    parameters = list(dict.fromkeys(ok["parameter"].astype(str)))
    cols = 3
    rows = max(1, math.ceil(len(parameters) / cols))
    fig = Figure(figsize=(9, 2.4 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharey=True)
    for ax, parameter in zip(axes.flat, parameters, strict=False):
        sub = ok[ok["parameter"].astype(str) == parameter]
        n_ranks = int(sub["n_draws"].iloc[0]) + 1
        counts = np.bincount(sub["rank"].to_numpy(dtype=int) * bins // n_ranks, minlength=bins)
        n = len(sub)
        lo, hi = stats.binom.ppf([0.005, 0.995], n, 1 / bins)
        ax.axhspan(lo, hi, color="0.88")
        ax.axhline(n / bins, color="0.4", lw=0.8)
        ax.bar(np.arange(bins), counts, width=0.9, color="C0")
        ax.set_title(parameter, fontsize=10)
        ax.set_xticks([])
        ax.set_xlabel("rank bin")
    for ax in axes.flat[len(parameters) :]:
        ax.set_visible(False)
    return fig
