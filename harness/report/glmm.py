"""Report tables and equations for GLMMs (binomial, Poisson), on the scales readers use.

The gaussian report's per-observation fits and new-group predictions add a
residual SD; a GLMM has none.  Here the linear predictor ``eta`` (link scale)
is mapped through the inverse link: observed and fitted proportions
(binomial) or counts (Poisson), with posterior predictive intervals drawn
from the family itself.  The tables have the gaussian tables' columns, so
the same plotting functions draw them.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from harness.checks.compare import Comparison
from harness.fits import BayesFit
from harness.model.spec import Design
from harness.names import corr_var, sd_var
from harness.report.tables import (
    Z95,
    _block_offsets,
    _lme4_covariance,
    _stack,
    fixed_draws,
    panel_counts,
    panel_factor,
    panel_rows,
    x_column,
)

__all__ = ["glmm_equations", "glmm_new_group_table", "glmm_predictive_table", "glmm_response_label"]


def glmm_response_label(design: Design) -> str:
    """Axis label: the observed proportion (binomial) or count (Poisson)."""
    if design.family.name == "binomial":
        return f"proportion {design.response}" + ("" if np.all(design.trials == 1) else " / trials")
    return f"{design.response} (count)"


def _observed(design: Design) -> np.ndarray:
    return design.y / design.trials if design.trials is not None else design.y


def _to_response(design: Design, eta: np.ndarray) -> np.ndarray:
    """Mean on the plotted scale: probability (binomial) or expected count (Poisson)."""
    return design.family.link.inverse(eta)


def _draw(
    design: Design,
    mean: np.ndarray,
    rng: np.random.Generator,
    params: dict[str, np.ndarray] | None = None,
) -> np.ndarray:
    """One posterior predictive draw per entry of ``mean``, on the plotted scale.

    ``params``: the family's own parameters per draw (shape (draws, 1)), if it has any.
    """
    counts = design.family.draw(rng, mean, design.trials, params or None)
    if design.trials is None:
        return np.asarray(counts, dtype=float)
    return counts / np.maximum(np.broadcast_to(design.trials, mean.shape), 1)


def glmm_predictive_table(
    cmp: Comparison,
    bayes: BayesFit,
    design: Design,
    seed: int = 1,
    max_draws: int = 1000,
    prob: float = 0.95,
    max_groups: int | None = None,
) -> pd.DataFrame:
    """Per observation: observed proportion/count, lme4's and PyMC's fitted mean, predictive interval.

    lme4: inverse link of ``offset + X beta_hat + Z b_hat`` (conditional
    modes).  PyMC: the same per draw, and a draw from the family for the
    predictive interval.  With ``max_groups``, only the rows of the groups the
    panels show (:func:`harness.report.tables.panel_rows`).
    """
    rng = np.random.default_rng(seed)
    beta = fixed_draws(bayes, max_draws)[design.fixed_terms].to_numpy()
    X = design.X.to_numpy(float)
    eta = beta @ X.T
    beta_hat = cmp.fixed.set_index("term").loc[design.fixed_terms, "lme4_estimate"].to_numpy(float)
    eta_hat = X @ beta_hat
    if design.offset is not None:
        eta = eta + design.offset
        eta_hat = eta_hat + design.offset
    modes = cmp.offsets.set_index(["group_factor", "group", "term"])["lme4_mode"]
    offsets = _block_offsets(bayes, max_draws)
    for block in design.blocks:
        u = offsets[block.label][:, block.group_index, :]
        eta = eta + np.einsum("snk,nk->sn", u, block.values)
        hat = np.array(
            [[modes.get((block.factor, lvl, t), 0.0) for t in block.terms] for lvl in block.levels]
        )
        eta_hat = eta_hat + (hat[block.group_index] * block.values).sum(axis=1)
    mean = _to_response(design, eta)
    params = {
        name: _stack(draws, max_draws).reshape(-1, 1)
        for name, draws in design.family.posterior_params(bayes.idata.posterior).items()
    }
    y_rep = _draw(design, mean, rng, params)
    factor = panel_factor(design)
    block = next(b for b in design.blocks if b.factor == factor)
    x = x_column(design)
    table = pd.DataFrame(
        {
            "row": np.arange(design.n),
            "group_factor": factor,
            "group": [block.levels[i] for i in block.group_index],
            # Without a numeric predictor: the row's position within its group.
            "x": design.data[x].to_numpy(float)
            if x
            else pd.Series(block.group_index).groupby(block.group_index).cumcount().to_numpy(float)
            + 1,
            "y": _observed(design),
            "lme4_fit": _to_response(design, eta_hat),
            "pymc_mu": mean.mean(axis=0),
            "pymc_lower": np.quantile(y_rep, (1 - prob) / 2, axis=0),
            "pymc_upper": np.quantile(y_rep, (1 + prob) / 2, axis=0),
        }
    )
    # Rows are picked after the fact: the family's draws take every row's trials.
    table = table.iloc[panel_rows(design, max_groups)].reset_index(drop=True)
    table.attrs.update(panel_counts(design))
    return table


def glmm_new_group_table(
    cmp: Comparison,
    bayes: BayesFit,
    design: Design,
    seed: int = 1,
    max_draws: int = 2000,
    prob: float = 0.95,
) -> pd.DataFrame:
    """A new group's probability (binomial) or rate (Poisson, offset 0) per covariate profile.

    lme4 (plug-in): the inverse link of ``x' beta_hat`` with the interval of a
    new group's effect, ``x' beta_hat +- 1.96 sqrt(z' G_hat z)``, mapped
    through the inverse link (median, not mean).  PyMC: per draw a new group
    effect from that draw's SDs (and correlations), through the inverse link.
    """
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(design.X.to_numpy(float), columns=[f"X:{t}" for t in design.fixed_terms])
    for block in design.blocks:
        for j, term in enumerate(block.terms):
            frame[f"Z:{block.label}:{term}"] = block.values[:, j]
    profiles = frame.drop_duplicates().head(50).reset_index(drop=True)
    X = profiles[[f"X:{t}" for t in design.fixed_terms]].to_numpy(float)
    beta_hat = cmp.fixed.set_index("term").loc[design.fixed_terms, "lme4_estimate"].to_numpy(float)
    lme4_eta = X @ beta_hat
    lme4_var = np.zeros(len(profiles))
    pymc = fixed_draws(bayes, max_draws)[design.fixed_terms].to_numpy() @ X.T
    posterior = bayes.idata.posterior
    for block in design.blocks:
        Zb = profiles[[f"Z:{block.label}:{t}" for t in block.terms]].to_numpy(float)
        G = _lme4_covariance(cmp.variance, block.label, block.terms)
        if G is not None:
            lme4_var += np.einsum("pk,kl,pl->p", Zb, G, Zb)
        sds = _stack(posterior[sd_var(block)], max_draws)
        if block.correlated and block.n_terms > 1:
            corr = _stack(posterior[corr_var(block)], max_draws)
            chol = np.linalg.cholesky(corr + 1e-9 * np.eye(block.n_terms))
            u = sds * np.einsum("skl,sl->sk", chol, rng.standard_normal(sds.shape))
        else:
            u = sds * rng.standard_normal(sds.shape)
        pymc = pymc + u @ Zb.T
    inverse = design.family.link.inverse
    lme4_sd = np.sqrt(lme4_var)
    # Short labels: the non-zero covariates of each profile (dummy codes read "period2").
    labels = []
    for row in X:
        parts = [
            t if v == 1 else f"{t}={v:g}"
            for t, v in zip(design.fixed_terms, row, strict=True)
            if t != "(Intercept)" and v != 0
        ]
        labels.append(", ".join(parts) or "reference")
    return pd.DataFrame(
        {
            "profile": labels,
            "x": np.arange(len(profiles), dtype=float),
            "sigma_level": "",
            "lme4_mean": inverse(lme4_eta),
            "lme4_lower": inverse(lme4_eta - Z95 * lme4_sd),
            "lme4_upper": inverse(lme4_eta + Z95 * lme4_sd),
            "pymc_mean": inverse(pymc).mean(axis=0),
            "pymc_lower": np.quantile(inverse(pymc), (1 - prob) / 2, axis=0),
            "pymc_upper": np.quantile(inverse(pymc), (1 + prob) / 2, axis=0),
        }
    )


def glmm_equations(design: Design, equations: dict[str, list[str]]) -> dict[str, list[str]]:
    """The gaussian model forms rewritten for the family: ``logit(p) = X beta + Z u``, ...

    ``equations`` is :func:`harness.report.page.model_equations`'s output; its
    linear predictor and priors are kept, the likelihood lines replaced.
    """
    family = design.family
    link = {"logit": r"\mathrm{logit}", "probit": r"\Phi^{-1}", "log": r"\log"}[family.link.name]
    mean = family.tex_mean
    response = design.response.replace("_", r"\_")
    offset = r"\mathbf{o} + " if design.offset is not None else ""
    offset_i = r"o_i + " if design.offset is not None else ""
    dist_i = family.tex_distribution(response)
    matrix = list(equations["matrix"])
    matrix[0] = rf"${link}(\mathbf{{{mean}}}) = {offset}X\beta + Z\mathbf{{u}}$"
    matrix[1] = (
        rf"$\mathbf{{u}} \sim \mathrm{{Normal}}(\mathbf{{0}},\ G),\quad {dist_i}$ independently given $\mathbf{{u}}$"
    )
    varying = list(equations["varying"])
    varying[0] = f"${dist_i}$"
    varying[1] = varying[1].replace(r"$\mu_i = ", rf"${link}({mean}_i) = {offset_i}", 1)
    # No residual SD in a binomial or Poisson model.
    varying = [re.sub(r",\\quad \\sigma \\sim [^,$]*(?:\([^)]*\))?", "", line) for line in varying]
    varying = [re.sub(r"\$\\sigma \\sim [^$]*\$", "", line) for line in varying]
    return {"matrix": matrix, "varying": [line for line in varying if line.strip("$ ")]}
