"""Offsets of random effects per draw, read from a Bayesian fit's posterior.

lme4 reports random effects as offsets from the fixed effects (conditional
modes).  PyMC reports whatever its parameterization samples: offsets ``u``
directly, or, in the ``baked_in`` form of the seed posts, per-group
coefficients centred on the fixed effects.  These functions subtract the fixed
effects from the coefficients draw by draw, so every engine describes offsets.
They live with the engines (the adaptive loop reads them while sampling) and
the checks import them from here: checks depend on engines, never the reverse.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import xarray as xr

from harness.names import coef_var, level_dim, offsets_var, term_dim

if TYPE_CHECKING:
    from harness.fits import BayesFit
    from harness.model.spec import RandomBlock

__all__ = ["OFFSET_DIMS", "block_offsets", "informed_counts", "posterior_offsets"]

OFFSET_DIMS = ("chain", "draw", "group", "term")


def block_offsets(posterior: xr.Dataset, block: RandomBlock, parameterization: str) -> xr.DataArray:
    """Offsets of one block, per draw, with dims (chain, draw, group, term).

    For ``offsets`` this is the sampled ``u``; for ``baked_in`` it is the group
    coefficient minus the same draw's fixed effect (terms without a fixed
    effect are already offsets).
    """
    if parameterization == "offsets":
        offsets = posterior[offsets_var(block)]
    elif parameterization == "baked_in":
        coef = posterior[coef_var(block)]
        beta = posterior["beta"]
        fixed_terms = [str(t) for t in beta["fixed_term"].values]
        centre = xr.concat(
            [
                beta.sel(fixed_term=t).drop_vars("fixed_term")
                if t in fixed_terms
                else xr.zeros_like(beta.isel(fixed_term=0).drop_vars("fixed_term"))
                for t in block.terms
            ],
            dim=term_dim(block),
        ).assign_coords({term_dim(block): block.terms})
        offsets = coef - centre
    else:
        raise ValueError(f"unknown parameterization {parameterization!r}")
    offsets = offsets.rename({level_dim(block): "group", term_dim(block): "term"})
    return offsets.transpose(*OFFSET_DIMS)


def posterior_offsets(bayes: BayesFit) -> dict[str, xr.DataArray]:
    """Offsets per grouping factor: ``{factor: DataArray(chain, draw, group, term)}``.

    Blocks sharing a factor (``(1 | g) + (0 + x | g)``) are joined along
    ``term``, as ``lme4::ranef`` joins them.
    """
    posterior = bayes.idata.posterior
    by_factor: dict[str, list[xr.DataArray]] = {}
    for block in bayes.design.blocks:
        by_factor.setdefault(block.factor, []).append(
            block_offsets(posterior, block, bayes.spec.parameterization)
        )
    return {
        factor: parts[0] if len(parts) == 1 else xr.concat(parts, dim="term")
        for factor, parts in by_factor.items()
    }


def informed_counts(bayes_or_design: object) -> pd.DataFrame:
    """Rows whose Z entry is non-zero, per (group_factor, group, term).

    A group with no such row (a control participant under ``(0 + tx | group)``)
    is informed by the prior alone on both sides; agreement metrics skip it.
    """
    design = getattr(bayes_or_design, "design", bayes_or_design)
    rows: list[dict[str, object]] = []
    for block in design.blocks:  # type: ignore[attr-defined]
        for j, term in enumerate(block.terms):
            nonzero = block.values[:, j] != 0
            counts = np.bincount(block.group_index[nonzero], minlength=block.n_levels)
            rows.extend(
                {"group_factor": block.factor, "group": level, "term": term, "n_obs": int(c)}
                for level, c in zip(block.levels, counts, strict=True)
            )
    return pd.DataFrame(rows)
