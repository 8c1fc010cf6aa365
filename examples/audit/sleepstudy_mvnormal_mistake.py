"""Sleepstudy as sleepstudy_mvnormal.py with a mistake: ``MvNormal(0, cov=chol)``.

A second hand-written style (a newcomer's try, issue 21): fixed effects ``b``,
subject offsets drawn directly (centred) from ``MvNormal(0, chol=chol)``, and
the linear predictor by indexing.

    harness audit examples/audit/sleepstudy_mvnormal.py --data sleepstudy.csv \\
        --formula "Reaction ~ Days + (Days | Subject)"
"""

import numpy as np
import pandas as pd
import pymc as pm


def build(data: pd.DataFrame) -> pm.Model:
    subject = pd.Categorical(data["Subject"].astype(str))
    days = data["Days"].to_numpy(float)
    coords = {"subject": list(subject.categories), "effect": ["intercept", "slope"]}
    with pm.Model(coords=coords) as model:
        b = pm.Normal("b", mu=[250.0, 10.0], sigma=[50.0, 10.0], dims="effect")
        chol, _corr, _stds = pm.LKJCholeskyCov(
            "chol", n=2, eta=2.0, sd_dist=pm.Exponential.dist(1 / 20.0, size=2)
        )
        # The mistake: the Cholesky factor passed as the covariance (cov= where chol= is meant).
        u = pm.MvNormal("u", mu=np.zeros(2), cov=chol, dims=("subject", "effect"))
        mu = b[0] + u[subject.codes, 0] + (b[1] + u[subject.codes, 1]) * days
        sigma = pm.Exponential("sigma", 1 / 30.0)
        pm.Normal("reaction", mu=mu, sigma=sigma, observed=data["Reaction"].to_numpy(float))
    return model


MAPPING = {
    "(Intercept)": "b[0]",
    "Days": "b[1]",
    "Subject: sd((Intercept))": "chol_stds[0]",
    "Subject: sd(Days)": "chol_stds[1]",
    "Subject: cor((Intercept),Days)": "chol_corr[0, 1]",
    "sigma": "sigma",
    "Subject: (Intercept)": lambda post: post["u"].sel(effect="intercept"),
    "Subject: Days": lambda post: post["u"].sel(effect="slope"),
}
