"""lme4's cbpp, shipped as a CSV exported by ``export_cbpp.R`` (lme4 1.1-31)."""

from __future__ import annotations

from importlib import resources

import pandas as pd


def load_cbpp() -> pd.DataFrame:
    """Contagious bovine pleuropneumonia: 15 herds, up to 4 periods, 56 rows.

    ``incidence`` new cases out of ``size`` animals; ``herd`` and ``period``
    are categoricals with lme4's level order ("1" ... "15", "1" ... "4").
    """
    with resources.files("harness.datasets").joinpath("cbpp.csv").open() as handle:
        data = pd.read_csv(handle, dtype={"herd": str, "period": str})
    for column in ("herd", "period"):
        levels = sorted(data[column].unique(), key=int)
        data[column] = pd.Categorical(data[column], categories=levels)
    return data
