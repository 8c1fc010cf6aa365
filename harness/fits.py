"""The fit types every engine returns: one frequentist, one Bayesian.

A fit carries the name of the engine that made it (a key of
:data:`harness.engines.registry.ENGINES`) and its kind, ``"frequentist"``
or ``"bayesian"``; the runner holds a design's fits as a mapping from engine
name to fit, and comparisons pair them by kind.  This module depends on the
model only, so checks, pipeline and report can name the types without
importing an engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import pandas as pd

from harness.model.priors import ResolvedPriors
from harness.model.spec import Design, ModelSpec

Kind = Literal["frequentist", "bayesian"]
FREQUENTIST: Kind = "frequentist"
BAYESIAN: Kind = "bayesian"

__all__ = ["BAYESIAN", "FREQUENTIST", "BayesFit", "Fit", "FreqFit", "Kind"]


@dataclass
class FreqFit:
    """A frequentist fit as tidy tables.

    Attributes
    ----------
    fixed : DataFrame
        term, estimate, se, df, statistic, p_value, lower, upper, ci_method.
    variance : DataFrame
        component, group_factor, kind ("sd"/"cor"/"sigma"), term, term2,
        estimate, lower, upper, ci_method.
    ranef : DataFrame
        group_factor, group, term, mode, condsd (conditional on the estimates).
    ranef_sims : DataFrame or None
        merTools::REsim summary: group_factor, group, term, sim_mean, sim_median, sim_sd.
    """

    kind: ClassVar[Kind] = FREQUENTIST

    spec: ModelSpec
    design: Design
    #: The R package that fitted: ``"lme4"``, or ``"nlme"`` standing in for lme4 (whose
    #: registry name it keeps).
    engine: str
    method: str
    fixed: pd.DataFrame
    variance: pd.DataFrame
    ranef: pd.DataFrame
    ranef_sims: pd.DataFrame | None
    loglik: float
    loglik_ml: float
    reml_criterion: float | None
    singular: bool
    converged: bool
    messages: list[str]
    versions: dict[str, str]
    r_call: str
    fit_seconds: float
    ml_estimates: dict[str, Any] = field(default_factory=dict)
    df_method: str = ""
    #: The optimizer lme4 used (allFit's name, e.g. ``nloptwrap.NLOPT_LN_BOBYQA``).
    optimizer: str = ""
    #: The control the fit was asked for (``optimizer``, ``maxfun``, ``start``); empty: lmer's own.
    control: dict[str, Any] = field(default_factory=dict)
    #: One row per refit with another optimizer or start (:func:`~harness.engines.lme4.refit_lme4`), else None.
    optimizer_refits: pd.DataFrame | None = None
    #: The best refit against this fit (:func:`~harness.engines.lme4.refit_lme4`); empty when none was tried.
    best_fit: dict[str, Any] = field(default_factory=dict)

    @property
    def stand_in(self) -> str | None:
        """Why another engine stood in for lme4, if one did."""
        if self.engine == "nlme":
            return (
                f"lme4 cannot fit one residual SD per level of {self.spec.sigma_by!r}; "
                f"nlme::lme with weights = varIdent(form = ~ 1 | {self.spec.sigma_by}) stood in"
            )
        return None


@dataclass
class BayesFit:
    """A Bayesian fit: the InferenceData plus what produced it.

    ``idata.posterior`` holds ``beta`` (dim ``fixed_term``), ``sigma`` (or one
    per ``sigma_level``), and per random-effects block ``u_<label>``
    (offsets parameterization) or ``coef_<label>`` (baked_in), with
    ``sd_<label>`` and, for correlated blocks, ``corr_<label>``.  Coordinates
    carry lme4's group levels and term names.
    """

    kind: ClassVar[Kind] = BAYESIAN

    spec: ModelSpec
    design: Design
    idata: Any
    sampler: str
    seed: int
    draws: int
    tune: int
    chains: int
    priors: ResolvedPriors
    compile_seconds: float
    sample_seconds: float
    model_code: str
    versions: dict[str, str] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    #: The registry name of the engine that sampled (``"pymc"``, ``"brms"``, ``"audit"``).
    engine: str = "pymc"

    @property
    def n_divergent(self) -> int:
        stats = self.idata.sample_stats
        name = "diverging" if "diverging" in stats else None
        return int(stats[name].sum()) if name else 0


#: Any engine's fit.
Fit = FreqFit | BayesFit
