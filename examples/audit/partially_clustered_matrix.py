"""Seed 000's partially clustered trial, written the way its author wrote it: matrix form.

    y = X B + Z U + R

X is n x 2 (intercept, Tx), Z is n x c with one column per treatment cluster
(control participants have a row of zeros: the cluster effect only reaches the
clustered arm), U ~ Normal(0, sigma_u) and one residual SD per condition
(``--sigma-by arm``).

    harness audit examples/audit/partially_clustered_matrix.py --data trial.csv \
        --formula "y ~ 1 + tx + (0 + tx | group)" --sigma-by arm
"""

import numpy as np
import pandas as pd
import pymc as pm


def design_matrices(data: pd.DataFrame):
    """X (n x 2), Z (n x c) and the treatment clusters' labels."""
    X = np.column_stack([np.ones(len(data)), data["tx"].to_numpy(float)])
    treated = data["tx"].to_numpy() == 1
    clusters = sorted(data.loc[treated, "group"].astype(str).unique())
    Z = np.zeros((len(data), len(clusters)))
    for j, cluster in enumerate(clusters):
        Z[:, j] = (data["group"].astype(str).to_numpy() == cluster) & treated
    return X, Z, clusters


def build(data: pd.DataFrame) -> pm.Model:
    X, Z, clusters = design_matrices(data)
    arm = pd.Categorical(data["arm"], categories=["control", "treatment"]).codes
    with pm.Model(coords={"cluster": clusters, "arm": ["control", "treatment"]}) as model:
        B = pm.Normal("B", mu=0.0, sigma=10.0, shape=2)
        sigma_u = pm.HalfNormal("sigma_u", sigma=2.0)
        U = pm.Normal("U", mu=0.0, sigma=sigma_u, dims="cluster")
        sigma_e = pm.HalfNormal("sigma_e", sigma=2.0, dims="arm")
        mu = pm.math.dot(X, B) + pm.math.dot(Z, U)
        pm.Normal("y", mu=mu, sigma=sigma_e[arm], observed=data["y"].to_numpy())
    return model


MAPPING = {
    "(Intercept)": "B[0]",
    "tx": "B[1]",
    "group: sd(tx)": "sigma_u",
    "sigma: arm=control": "sigma_e[0]",
    "sigma: arm=treatment": "sigma_e[1]",
    "group: tx": "U",
}
