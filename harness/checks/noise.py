"""What counts as numerical noise in a row's gap: a share below it prints as 0.

Checks write sentences and reports draw pictures from the same shares; both
use this one rule, so a sentence never names a share that the picture hides.
"""

from __future__ import annotations

import numpy as np

__all__ = ["NOISE_RELATIVE", "noise_floor"]

#: A value smaller than this fraction of the row's scale (or MCSE, whichever is larger) is
#: rounding left over from differences of nearly equal numbers, not a share of the gap.
NOISE_RELATIVE = 1e-6


def noise_floor(scale: float | None, mcse: float | None) -> float:
    """The size below which a share of a row's gap is numerical noise (prints as 0).

    Parameters
    ----------
    scale : float
        The row's scale (lme4 SE, posterior SD, or 1 for ``1 - r``).
    mcse : float
        The Monte Carlo error of the row's summary.

    Returns
    -------
    float
        ``NOISE_RELATIVE * max(|scale|, |mcse|)`` over the finite ones; 0 when neither is.
    """
    sizes = [abs(float(v)) for v in (scale, mcse) if v is not None and np.isfinite(v)]
    return NOISE_RELATIVE * max(sizes, default=0.0)
