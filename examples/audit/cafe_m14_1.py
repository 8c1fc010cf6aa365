"""Seed 001's cafe model, Statistical Rethinking's m14.1, in its "baked-in" form.

Each cafe's intercept and afternoon slope are drawn around (a_bar, b_bar) with
an LKJ(2) correlation and Exponential(1) SDs; lme4's offsets are the cafe
coefficients minus (a_bar, b_bar), mapped as callables.

    harness audit examples/audit/cafe_m14_1.py --data cafe.csv \
        --formula "wait ~ 1 + afternoon + (1 + afternoon | cafe)" --priors m14.1
"""

import pandas as pd
import pymc as pm
import pytensor.tensor as pt


def build(data: pd.DataFrame) -> pm.Model:
    cafes = pd.Categorical(data["cafe"].astype(str))
    cafe_idx = cafes.codes
    with pm.Model(coords={"cafe": list(cafes.categories), "effect": ["a", "b"]}) as m14_1:
        chol, _, _ = pm.LKJCholeskyCov(
            "chol_cov", n=2, eta=2, sd_dist=pm.Exponential.dist(1.0, size=2), compute_corr=True
        )
        a_bar = pm.Normal("a_bar", mu=5, sigma=2.0)
        b_bar = pm.Normal("b_bar", mu=-1, sigma=0.5)
        ab_cafe = pm.MvNormal(
            "ab_cafe", mu=pt.stack([a_bar, b_bar]), chol=chol, dims=("cafe", "effect")
        )
        mu = ab_cafe[cafe_idx, 0] + ab_cafe[cafe_idx, 1] * data["afternoon"].to_numpy(float)
        sigma_within = pm.Exponential("sigma_within", 1.0)
        pm.Normal("wait", mu=mu, sigma=sigma_within, observed=data["wait"].to_numpy())
    return m14_1


MAPPING = {
    "(Intercept)": "a_bar",
    "afternoon": "b_bar",
    "cafe: sd((Intercept))": "chol_cov_stds[0]",
    "cafe: sd(afternoon)": "chol_cov_stds[1]",
    "cafe: cor((Intercept),afternoon)": "chol_cov_corr[0, 1]",
    "sigma": "sigma_within",
    "cafe: (Intercept)": lambda post: post["ab_cafe"].sel(effect="a") - post["a_bar"],
    "cafe: afternoon": lambda post: post["ab_cafe"].sel(effect="b") - post["b_bar"],
}
