"""Seed 002's sleepstudy model: per-subject coefficients with an LKJ prior ("baked-in" form).

    alpha[subject] ~ MvNormal(mu, chol),  chol from LKJCholeskyCov(eta=1)
    Reaction ~ Normal(alpha[s, 0] + alpha[s, 1] * Days, sigma)

The coefficients are centred on ``mu``, so the offsets lme4 reports are
``alpha - mu`` (a callable in MAPPING).

    harness audit examples/audit/sleepstudy_lkj.py --data sleepstudy.csv \
        --formula "Reaction ~ Days + (Days | Subject)"
"""

import numpy as np
import pandas as pd
import pymc as pm


def build(data: pd.DataFrame) -> pm.Model:
    subjects = pd.Categorical(data["Subject"].astype(str))
    X_v = np.column_stack([np.ones(len(data)), data["Days"].to_numpy(float)])
    coords = {"subj_id": list(subjects.categories), "cols": ["(Intercept)", "Days"]}
    with pm.Model(coords=coords) as model:
        mu = pm.Normal("mu", mu=250.0, sigma=100.0, dims="cols")
        sd_dist = pm.HalfNormal.dist(sigma=50.0, size=2)
        chol, _corr, _sig = pm.LKJCholeskyCov("sig", n=2, eta=1.0, sd_dist=sd_dist)
        sigma = pm.HalfNormal("sigma", sigma=50.0)
        alpha = pm.MvNormal("alpha", mu=mu, chol=chol, dims=("subj_id", "cols"))
        tau = (alpha[subjects.codes] * X_v).sum(axis=1)
        pm.Normal("yhat", mu=tau, sigma=sigma, observed=data["Reaction"].to_numpy())
    return model


def _offsets(term: str):
    return lambda post: (post["alpha"] - post["mu"]).sel(cols=term)


MAPPING = {
    "(Intercept)": "mu[0]",
    "Days": "mu[1]",
    "Subject: sd((Intercept))": "sig_stds[0]",
    "Subject: sd(Days)": "sig_stds[1]",
    "Subject: cor((Intercept),Days)": "sig_corr[0, 1]",
    "sigma": "sigma",
    "Subject: (Intercept)": _offsets("(Intercept)"),
    "Subject: Days": _offsets("Days"),
}
