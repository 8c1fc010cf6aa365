"""Settings for designs at lme4's scale (thousands of groups, tens of thousands of rows).

lme4 fits InstEval (73,421 rows, 4,100 random-effect columns) in seconds, but
its profile-likelihood intervals take many minutes and ``merTools::REsim``
with 1,000 draws over 4,100 groups more than a minute.  Above
:data:`LARGE_DESIGN_COLUMNS` the lme4 side keeps its estimates, Wald standard
errors and conditional SDs and leaves those two out, and says so.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from harness.model.spec import Design

#: Random-effect columns above which profile intervals and REsim are skipped.
LARGE_DESIGN_COLUMNS = 1000


def random_effect_columns(design: Design) -> int:
    return sum(b.n_levels * b.n_terms for b in design.blocks)


def settings_for_scale(design: Design, settings: Any) -> tuple[Any, str | None]:
    """``settings`` without profiles and REsim for a large design, and the note saying so.

    Parameters
    ----------
    design : Design
    settings : FitSettings

    Returns
    -------
    (FitSettings, str or None)
        Unchanged settings and ``None`` for a design at or below the threshold.
    """
    q = random_effect_columns(design)
    if q <= LARGE_DESIGN_COLUMNS or not (settings.profile or settings.n_sims):
        return settings, None
    note = (
        f"{q} random-effect columns (above {LARGE_DESIGN_COLUMNS}): lme4's profile-likelihood "
        "intervals and merTools::REsim draws were skipped (minutes at this size); lme4's "
        "side shows Wald intervals and conditional SDs"
    )
    return dataclasses.replace(settings, profile=False, n_sims=0), note
