"""Names the posterior and its coordinates use, in one place.

The PyMC model (:mod:`harness.engines.pymc`) creates these variables and
coordinates; alignment, comparison, attribution, the likelihood checks and the
report read them.  lme4's component names (``"Subject: sd(Days)"``) are spelled
by ``r_scripts/fit.R`` and mapped back to the user's names in
:mod:`harness.engines.lme4`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from harness.model.spec import RandomBlock

__all__ = [
    "coef_var",
    "corr_var",
    "level_dim",
    "offsets_var",
    "sd_var",
    "term_b_dim",
    "term_dim",
]


def level_dim(block: RandomBlock) -> str:
    """Name of the coordinate holding a block's group levels."""
    return f"{block.label}__level"


def term_dim(block: RandomBlock) -> str:
    """Name of the coordinate holding a block's term names."""
    return f"{block.label}__term"


def term_b_dim(block: RandomBlock) -> str:
    """Second term coordinate of a block's correlation matrix."""
    return f"{block.label}__term_b"


def offsets_var(block: RandomBlock) -> str:
    """Posterior variable of a block's offsets ``u`` (the aligned quantity)."""
    return f"u_{block.label}"


def coef_var(block: RandomBlock) -> str:
    """Posterior variable of a block's group coefficients (``baked_in`` and centred blocks)."""
    return f"coef_{block.label}"


def sd_var(block: RandomBlock) -> str:
    """Posterior variable of a block's SDs."""
    return f"sd_{block.label}"


def corr_var(block: RandomBlock) -> str:
    """Posterior variable of a correlated block's correlation matrix."""
    return f"corr_{block.label}"
