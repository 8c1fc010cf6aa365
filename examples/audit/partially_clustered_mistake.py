"""The same matrix-form model with a porting mistake a reader of PROC MCMC code makes.

SAS parameterises the cluster effect by its variance; here that variance is
passed to PyMC as the SD (``sigma=var_u``), while the mapping reports
``sqrt(var_u)`` as the SD.  ``harness audit`` fails the random-effects check and
names "a variance used as an SD".
"""

import numpy as np
import pandas as pd
import pymc as pm
import xarray as xr


def build(data: pd.DataFrame) -> pm.Model:
    X = np.column_stack([np.ones(len(data)), data["tx"].to_numpy(float)])
    treated = data["tx"].to_numpy() == 1
    clusters = sorted(data.loc[treated, "group"].astype(str).unique())
    Z = np.zeros((len(data), len(clusters)))
    for j, cluster in enumerate(clusters):
        Z[:, j] = (data["group"].astype(str).to_numpy() == cluster) & treated
    arm = pd.Categorical(data["arm"], categories=["control", "treatment"]).codes
    with pm.Model(coords={"cluster": clusters}) as model:
        B = pm.Normal("B", mu=0.0, sigma=10.0, shape=2)
        var_u = pm.InverseGamma("var_u", alpha=2.0, beta=1.0)
        U = pm.Normal("U", mu=0.0, sigma=var_u, dims="cluster")  # the mistake: a variance as SD
        sigma_e = pm.HalfNormal("sigma_e", sigma=2.0, shape=2)
        mu = pm.math.dot(X, B) + pm.math.dot(Z, U)
        pm.Normal("y", mu=mu, sigma=sigma_e[arm], observed=data["y"].to_numpy())
    return model


MAPPING = {
    "(Intercept)": "B[0]",
    "tx": "B[1]",
    "group: sd(tx)": lambda post: np.sqrt(post["var_u"]),
    "sigma: arm=control": "sigma_e[0]",
    "sigma: arm=treatment": "sigma_e[1]",
    "group: tx": "U",
}
_ = xr  # callables receive and return xarray objects
