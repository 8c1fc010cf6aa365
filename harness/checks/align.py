"""Put both engines' answers on the same names and the same quantities.

lme4 reports random effects as offsets from the fixed effects (conditional
modes).  PyMC reports whatever its parameterization samples: offsets ``u``
directly, or, in the ``baked_in`` form of the seed posts, per-group
coefficients centred on the fixed effects.  Alignment subtracts the fixed
effects from the coefficients draw by draw, so both sides describe offsets.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

# Re-exported: they read a Bayesian fit's posterior, so they live with the engines.
from harness.engines.offsets import (
    OFFSET_DIMS,
    block_offsets,
    informed_counts,
    posterior_offsets,
)

if TYPE_CHECKING:
    from harness.fits import BayesFit, FreqFit

__all__ = [
    "OFFSET_DIMS",
    "AlignmentError",
    "block_offsets",
    "check_alignment",
    "informed_counts",
    "posterior_offsets",
]


class AlignmentError(ValueError):
    """The two fits do not name the same terms or groups."""


def check_alignment(freq: FreqFit, bayes: BayesFit) -> None:
    """Raise :class:`AlignmentError` naming every term or group present on one side only."""
    problems = []
    lme4_fixed = set(freq.fixed["term"])
    pymc_fixed = set(bayes.design.fixed_terms)
    if lme4_fixed != pymc_fixed:
        problems.append(
            f"fixed terms differ: only in lme4 {sorted(lme4_fixed - pymc_fixed)}, "
            f"only in PyMC {sorted(pymc_fixed - lme4_fixed)}"
        )
    offsets = posterior_offsets(bayes)
    lme4_factors = set(freq.ranef["group_factor"])
    if lme4_factors != set(offsets):
        problems.append(
            f"grouping factors differ: lme4 {sorted(lme4_factors)}, PyMC {sorted(offsets)}"
        )
    for factor, draws in offsets.items():
        rows = freq.ranef[freq.ranef["group_factor"] == factor]
        if rows.empty:
            continue
        for what, lme4_names, pymc_names in (
            ("terms", set(rows["term"]), {str(t) for t in draws["term"].values}),
            ("groups", set(rows["group"]), {str(g) for g in draws["group"].values}),
        ):
            if lme4_names != pymc_names:
                only_l = sorted(lme4_names - pymc_names)[:10]
                only_p = sorted(pymc_names - lme4_names)[:10]
                problems.append(
                    f"{factor!r} {what} differ: only in lme4 {only_l}, only in PyMC {only_p}"
                )
    if problems:
        raise AlignmentError("lme4 and PyMC fits do not line up: " + "; ".join(problems))
