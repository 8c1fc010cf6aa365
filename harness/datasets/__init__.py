"""The designs that ship with the harness, each with its default ModelSpec(s).

``load(name)`` returns ``(data, spec)``; ``describe(name)`` a paragraph about it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd

from harness.datasets.cafe import simulate_cafe
from harness.datasets.cbpp import load_cbpp
from harness.datasets.grouseticks import load_grouseticks
from harness.datasets.partially_clustered import simulate_partially_clustered
from harness.datasets.sleepstudy import load_sleepstudy
from harness.model.spec import ModelSpec

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "describe",
    "load",
    "simulate_cafe",
    "simulate_partially_clustered",
]


@dataclass(frozen=True)
class DatasetInfo:
    """A shipped design: how to get its data, its default spec and what it is."""

    name: str
    loader: Callable[..., pd.DataFrame]
    spec: ModelSpec
    description: str


DATASETS: dict[str, DatasetInfo] = {
    "cafe": DatasetInfo(
        name="cafe",
        loader=simulate_cafe,
        spec=ModelSpec("wait ~ 1 + afternoon + (1 + afternoon | cafe)", priors="weak", name="cafe"),
        description=(
            "Statistical Rethinking's robot-in-the-cafes simulation (model m14.1): 20 cafes, "
            "10 visits each alternating morning and afternoon. Each cafe has its own morning "
            "wait (intercept, mean 3.5 min, SD 1) and its own afternoon difference (slope, mean "
            "-1, SD 0.5), correlated at -0.7; visits scatter around them with SD 0.5. It is the "
            "textbook case of correlated varying intercepts and slopes, and the truth is known."
        ),
    ),
    "sleepstudy": DatasetInfo(
        name="sleepstudy",
        loader=load_sleepstudy,
        spec=ModelSpec("Reaction ~ Days + (Days | Subject)", name="sleepstudy"),
        description=(
            "lme4's sleepstudy (Belenky et al., 2003): average reaction time (ms) of 18 truck "
            "drivers on each of 10 days of sleep restriction (day 0 is baseline). Each subject "
            "has their own baseline and their own daily slowdown. Real data, lme4's own "
            "running example, with published REML estimates to check against."
        ),
    ),
    "partially_clustered": DatasetInfo(
        name="partially_clustered",
        loader=simulate_partially_clustered,
        spec=ModelSpec("y ~ 1 + tx + (0 + tx | group)", name="partially_clustered"),
        description=(
            "A partially clustered (partially nested) randomised trial: 200 participants, the "
            "treatment arm delivered in 10 groups of 10, the control arm unclustered (each "
            "control participant is a group of one). The group effect only exists under "
            "treatment, hence (0 + tx | group). Ignoring the clustering, or forcing one "
            "residual variance on both arms, biases the treatment effect's standard error."
        ),
    ),
    "partially_clustered_hetero": DatasetInfo(
        name="partially_clustered_hetero",
        # Seed 3: seed 1 of this design happens to give a singular group SD.
        loader=lambda seed=3, **kw: simulate_partially_clustered(
            seed=seed, **{"sigma_control": 1.0, "sigma_treatment": 2.0, **kw}
        ),
        spec=ModelSpec(
            "y ~ 1 + tx + (0 + tx | group)", sigma_by="arm", name="partially_clustered_hetero"
        ),
        description=(
            "The partially clustered trial with one residual SD per arm (control 1, treatment "
            "2). lme4 cannot fit arm-specific residual variances, so nlme::lme with "
            "weights = varIdent(form = ~ 1 | arm) stands in on the frequentist side."
        ),
    ),
    "cbpp": DatasetInfo(
        name="cbpp",
        loader=load_cbpp,
        spec=ModelSpec(
            "cbind(incidence, size - incidence) ~ period + (1 | herd)",
            family="binomial",
            name="cbpp",
        ),
        description=(
            "lme4's cbpp (Lesnoff et al., 2004): new cases of contagious bovine "
            "pleuropneumonia (incidence) out of the herd's size, in 15 Ethiopian zebu herds "
            "over up to four periods. A binomial (logit) mixed model with a varying intercept "
            "per herd, lme4's own glmer example: the lme4 side is glmer's Laplace fit, and "
            "the same-model check is the Laplace approximation of the PyMC model."
        ),
    ),
    "grouseticks": DatasetInfo(
        name="grouseticks",
        loader=load_grouseticks,
        spec=ModelSpec(
            "TICKS ~ YEAR + cHEIGHT + (1 | BROOD)",
            family="negbin",
            name="grouseticks",
        ),
        description=(
            "lme4's grouseticks (Elston et al., 2001): ticks counted on the heads of 403 red "
            "grouse chicks from 118 broods at 63 locations in Scotland, 1995-97, with the "
            "location's altitude (cHEIGHT: centred, metres). The counts are overdispersed "
            "(variance 27 times the mean) even beyond the broods' own levels, so a negative "
            "binomial (NB2, log link) mixed model with a varying intercept per brood: glmer.nb "
            "on the lme4 side, its shape theta compared with the posterior's. Broods are nested "
            "in locations; a location intercept besides the brood's improves glmer.nb's AIC by "
            "only 0.3 (1791.7 against 1791.9), so the shipped model leaves it out."
        ),
    ),
}


def load(name: str, **kwargs: object) -> tuple[pd.DataFrame, ModelSpec]:
    """Load a shipped design.

    Parameters
    ----------
    name : str
        ``"cafe"``, ``"sleepstudy"``, ``"partially_clustered"``,
        ``"partially_clustered_hetero"``, ``"cbpp"`` (binomial) or ``"grouseticks"``
        (negative binomial).
    **kwargs
        Passed to the simulator (e.g. ``seed=2``); sleepstudy takes none.

    Returns
    -------
    data : pandas.DataFrame
    spec : ModelSpec
        The design's default specification.
    """
    try:
        info = DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}") from None
    return info.loader(**kwargs), info.spec


def describe(name: str) -> str:
    """One paragraph saying what the design is."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    return DATASETS[name].description
