"""lme4's grouseticks, shipped as a CSV exported by ``export_grouseticks.R`` (lme4 1.1-31)."""

from __future__ import annotations

from importlib import resources

import pandas as pd


def load_grouseticks() -> pd.DataFrame:
    """Ticks counted on the heads of 403 red grouse chicks (Elston et al., 2001).

    ``TICKS`` counts; ``BROOD`` (118 levels), ``LOCATION`` (63) and ``YEAR``
    ("95", "96", "97") are categoricals in lme4's level order; ``HEIGHT`` is
    the location's altitude (m) and ``cHEIGHT`` the altitude minus its mean.
    """
    with resources.files("harness.datasets").joinpath("grouseticks.csv").open() as handle:
        data = pd.read_csv(handle, dtype={"BROOD": str, "LOCATION": str, "YEAR": str})
    for column in ("BROOD", "LOCATION", "YEAR"):
        levels = sorted(data[column].unique(), key=int)
        data[column] = pd.Categorical(data[column], categories=levels)
    return data
