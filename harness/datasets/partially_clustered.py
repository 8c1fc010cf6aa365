"""A partially clustered trial: treatment arm in groups, control arm unclustered."""

from __future__ import annotations

import numpy as np
import pandas as pd


def simulate_partially_clustered(
    seed: int = 1,
    n_groups: int = 10,
    group_size: int = 10,
    n_control: int | None = None,
    intercept: float = 0.0,
    effect: float = 0.5,
    group_sd: float = 0.5,
    sigma_control: float = 1.0,
    sigma_treatment: float = 1.0,
) -> pd.DataFrame:
    """Simulate ``y = b0 + b1 tx + u_group tx + e``, with one residual SD per arm.

    Parameters
    ----------
    seed : int
        Seed for NumPy's ``default_rng``.
    n_groups, group_size : int
        Treatment arm: ``n_groups`` groups of ``group_size`` (default 10 x 10).
    n_control : int, optional
        Control participants, each their own group of one (default: same as treated).
    intercept, effect : float
        Control mean and treatment effect.
    group_sd : float
        SD of the treatment-group effects ``u``.
    sigma_control, sigma_treatment : float
        Residual SD in each arm.

    Returns
    -------
    pandas.DataFrame
        ``y``, ``tx`` (0/1), ``arm`` ("control"/"treatment"), ``group``
        (categorical: "t01".. for treatment groups, "c001".. for controls).
    """
    for name, value in {
        "group_sd": group_sd,
        "sigma_control": sigma_control,
        "sigma_treatment": sigma_treatment,
    }.items():
        if value < 0:
            raise ValueError(f"{name} must be non-negative, got {value}")
    if n_groups < 2 or group_size < 1:
        raise ValueError(
            f"need at least 2 treatment groups of size >= 1, got {n_groups} x {group_size}"
        )
    rng = np.random.default_rng(seed)
    n_treated = n_groups * group_size
    n_control = n_treated if n_control is None else n_control
    u = rng.normal(0.0, group_sd, size=n_groups)
    treated_group = np.repeat(np.arange(n_groups), group_size)
    y_treated = intercept + effect + u[treated_group] + rng.normal(0, sigma_treatment, n_treated)
    y_control = intercept + rng.normal(0, sigma_control, n_control)
    width_t, width_c = len(str(n_groups)), len(str(n_control))
    groups = [f"t{g + 1:0{width_t}d}" for g in treated_group] + [
        f"c{i + 1:0{width_c}d}" for i in range(n_control)
    ]
    frame = pd.DataFrame(
        {
            "y": np.concatenate([y_treated, y_control]),
            "tx": np.r_[np.ones(n_treated, int), np.zeros(n_control, int)],
            "arm": ["treatment"] * n_treated + ["control"] * n_control,
            "group": groups,
        }
    )
    frame["group"] = pd.Categorical(frame["group"], categories=sorted(set(groups)))
    frame["arm"] = pd.Categorical(frame["arm"], categories=["control", "treatment"])
    return frame
