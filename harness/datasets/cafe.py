"""Statistical Rethinking's cafe simulation (m14.1), seedable.

``method="numpy"`` draws with NumPy's generator.  ``method="rethinking"``
reproduces the book's draws exactly, with R's RNG through the R bridge
(``set.seed(5)`` for ``MASS::mvrnorm``, ``set.seed(22)`` for the visits).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd

#: m14.1's generating values.
TRUTH = {
    "a": 3.5,
    "b": -1.0,
    "sigma_a": 1.0,
    "sigma_b": 0.5,
    "rho": -0.7,
    "sigma": 0.5,
}


def simulate_cafe(
    seed: int = 1,
    n_cafes: int = 20,
    n_visits: int = 10,
    method: Literal["numpy", "rethinking"] = "numpy",
    **truth: float,
) -> pd.DataFrame:
    """Simulate the cafe data.

    Parameters
    ----------
    seed : int
        Seed for NumPy's ``default_rng`` (ignored by ``method="rethinking"``).
    n_cafes, n_visits : int
        Cafes and visits per cafe (visits alternate morning/afternoon).
    method : {"numpy", "rethinking"}
        ``"rethinking"`` uses R's RNG exactly as the book does (needs R).
    **truth : float
        Overrides of :data:`TRUTH` (``a``, ``b``, ``sigma_a``, ``sigma_b``, ``rho``, ``sigma``).

    Returns
    -------
    pandas.DataFrame
        Columns ``cafe`` (categorical, "1".."n_cafes"), ``afternoon`` (0/1), ``wait``.
    """
    unknown = set(truth) - set(TRUTH)
    if unknown:
        raise ValueError(f"unknown cafe parameter(s) {sorted(unknown)}; known: {sorted(TRUTH)}")
    if n_visits % 2:
        raise ValueError(f"n_visits must be even (morning/afternoon pairs), got {n_visits}")
    values = {**TRUTH, **truth}
    if method == "rethinking":
        from harness.engines.lme4 import simulate_cafe_in_r

        frame = simulate_cafe_in_r(n_cafes=n_cafes, n_visits=n_visits, **values)
    elif method == "numpy":
        rng = np.random.default_rng(seed)
        mean = np.array([values["a"], values["b"]])
        sds = np.array([values["sigma_a"], values["sigma_b"]])
        corr = np.array([[1.0, values["rho"]], [values["rho"], 1.0]])
        cov = np.outer(sds, sds) * corr
        effects = rng.multivariate_normal(mean, cov, size=n_cafes)
        cafe_id = np.repeat(np.arange(n_cafes), n_visits)
        afternoon = np.tile([0, 1], n_cafes * n_visits // 2)
        mu = effects[cafe_id, 0] + effects[cafe_id, 1] * afternoon
        wait = rng.normal(mu, values["sigma"])
        frame = pd.DataFrame({"cafe": cafe_id + 1, "afternoon": afternoon, "wait": wait})
    else:
        raise ValueError(f"method must be 'numpy' or 'rethinking', not {method!r}")
    labels = [str(i) for i in range(1, n_cafes + 1)]
    frame["cafe"] = pd.Categorical(frame["cafe"].astype(int).astype(str), categories=labels)
    frame["afternoon"] = frame["afternoon"].astype(int)
    return frame
