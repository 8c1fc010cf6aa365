"""The Laplace maximiser (the GLMM same-model check's level 2): scaled fixed effects.

The fixed effects move in coordinates scaled by their Laplace information
(:func:`harness.checks.laplace.beta_scale`), so a predictor's units change its
coefficient by exactly those units and nothing else.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from harness.checks.laplace import beta_scale, laplace_loglik, maximise_laplace
from harness.model.spec import ModelSpec, build_design


def _design(scale_x: float):
    rng = np.random.default_rng(11)
    g = np.repeat(np.arange(40), 5)
    x = rng.normal(size=g.size)
    eta = -0.5 + 0.8 * x + rng.normal(scale=1.2, size=40)[g]
    frame = pd.DataFrame(
        {
            "y": (rng.random(g.size) < 1 / (1 + np.exp(-eta))).astype(int),
            "x": x * scale_x,
            "g": [f"g{k:02d}" for k in g],
        }
    )
    return build_design(ModelSpec("y ~ x + (1 | g)", family="binomial"), frame)


def test_beta_scale_is_the_square_root_of_the_laplace_information():
    """R'R is about minus the Hessian of the exact Laplace log-likelihood in beta (central
    differences): in the scaled coordinates the curvature is about the identity."""
    design = _design(1.0)
    theta, beta = np.array([1.1]), np.array([-0.4, 0.7])
    R = beta_scale(design, theta, beta)
    assert np.allclose(R, np.triu(R))
    h = 1e-3
    hessian = np.empty((2, 2))
    for i, ei in enumerate(np.eye(2) * h):
        for j, ej in enumerate(np.eye(2) * h):

            def f(b):
                return laplace_loglik(design, theta, b).loglik

            hessian[i, j] = (
                f(beta + ei + ej) - f(beta + ei - ej) - f(beta - ei + ej) + f(beta - ei - ej)
            ) / (4 * h * h)
    # Expected (Fisher) weights and no log det term: not exact, but close to the identity.
    R_inv = np.linalg.inv(R)
    eigenvalues = np.linalg.eigvalsh(R_inv.T @ -hessian @ R_inv)
    assert eigenvalues.min() > 0.8 and eigenvalues.max() < 1.25
    assert np.linalg.cond(-hessian) > 1.2  # the raw coordinates are not already isotropic


def test_a_predictors_units_change_only_its_coefficient():
    plain = maximise_laplace(_design(1.0))
    scaled = maximise_laplace(_design(1000.0))
    assert scaled["loglik"] == pytest.approx(plain["loglik"], abs=1e-8)
    assert scaled["theta"][0] == pytest.approx(plain["theta"][0], abs=1e-5)
    assert scaled["beta"]["(Intercept)"] == pytest.approx(plain["beta"]["(Intercept)"], abs=1e-5)
    assert 1000.0 * scaled["beta"]["x"] == pytest.approx(plain["beta"]["x"], abs=1e-5)
