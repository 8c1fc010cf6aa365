"""lme4's sleepstudy, shipped as a CSV exported from lme4 1.1-31 (``write.csv(sleepstudy)``)."""

from __future__ import annotations

from importlib import resources

import pandas as pd


def load_sleepstudy() -> pd.DataFrame:
    """The full sleepstudy data: 18 subjects x 10 days, 180 rows.

    ``Subject`` is a categorical with lme4's level order ("308" ... "372").
    """
    with resources.files("harness.datasets").joinpath("sleepstudy.csv").open() as handle:
        data = pd.read_csv(handle, dtype={"Subject": str})
    levels = sorted(data["Subject"].unique(), key=int)
    data["Subject"] = pd.Categorical(data["Subject"], categories=levels)
    return data
