"""Issue 15: real data sets that showed defects (lme4's and nlme's own data).

Reference values come from lme4 run directly in R on the same CSV files
(``tests/reference/repeated_factor_profile.R``, which also exported
``tests/data/orthodont.csv`` from nlme; date and versions in its JSON).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

import harness as hz
from harness.spec import ModelSpec

ROOT = Path(__file__).resolve().parents[1]
PROFILE = json.loads((ROOT / "tests" / "reference" / "repeated_factor_profile.json").read_text())


def _read(csv: str) -> pd.DataFrame:
    from harness.user_data import read_data

    return read_data(ROOT / csv)


@pytest.mark.r
@pytest.mark.parametrize("name", sorted(PROFILE["models"]))
def test_profile_intervals_of_repeated_factor_equal_r(name):
    """Every variance row of a `||` / repeated-factor model has R's profile interval."""
    ref = PROFILE["models"][name]
    freq = hz.fit_lme4(ModelSpec(ref["formula"]), _read(ref["csv"]), profile=True, n_sims=0)
    assert freq.reml_criterion == pytest.approx(ref["reml_criterion"], rel=1e-9)
    variance = freq.variance.set_index("component")
    assert list(variance.index) == [row["component"] for row in ref["variance"]]
    for row in ref["variance"]:
        ours = variance.loc[row["component"]]
        assert ours["estimate"] == pytest.approx(row["estimate"], rel=1e-6, abs=1e-8)
        assert ours["lower"] == pytest.approx(row["lower"], abs=1e-3), row["component"]
        assert ours["upper"] == pytest.approx(row["upper"], abs=1e-3), row["component"]
        assert ours["ci_method"] == "profile"
