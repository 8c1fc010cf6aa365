"""The named studies ``harness study NAME`` runs."""

from __future__ import annotations

from collections.abc import Callable

from harness.studies import partially_clustered, sbc
from harness.studies.core import Study

#: name -> (builder, one line for ``harness study list``).
STUDIES: dict[str, tuple[Callable[[], Study], str]] = {
    "partially_clustered": (
        partially_clustered.study,
        "full grid: ICC 0/0.05/0.1/0.2 x SD ratio 1/2 x effect 0/0.5 x groups of 5/10; six "
        "fitters (PyMC on the first 50 replicates); 200 replicates",
    ),
    "partially_clustered_type1": (
        partially_clustered.type1_study,
        "acceptance cell: ICC 0.1, SD ratio 2, effect 0, groups of 10; all six fitters; 200 "
        "replicates",
    ),
    "cafe_sbc": (
        sbc.study,
        "simulation-based calibration of the PyMC cafe model (m14.1 priors); 200 replicates",
    ),
    "smoke": (
        partially_clustered.smoke_study,
        "two cells, lm / lme4 / nlme, 3 replicates (tests and the benchmark)",
    ),
}


def get_study(name: str) -> Study:
    """Build a named study."""
    try:
        builder, _ = STUDIES[name]
    except KeyError:
        raise ValueError(f"unknown study {name!r}; choose one of {sorted(STUDIES)}") from None
    return builder()


def list_studies() -> list[tuple[str, str]]:
    """(name, description) of every named study."""
    return [(name, text) for name, (_, text) in STUDIES.items()]
