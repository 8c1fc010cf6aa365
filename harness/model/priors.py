"""Priors for the PyMC side: named profiles resolved against a design.

``weak`` scales to the data the way rstanarm and brms do: the intercept is
centred on the mean response, slopes and group SDs are scaled by
``sd(y) / sd(x)``, the residual SD by ``sd(y)``.  ``m14.1`` is Statistical
Rethinking's cafe model.  ``flat`` puts improper flat priors on the fixed
effects and half-flat priors on the SDs (for MAP = ML checks).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from harness.model.spec import Design, Prior


@dataclass(frozen=True)
class ResolvedPriors:
    """Concrete priors for every parameter of one design."""

    fixed: dict[str, Prior]
    sd: dict[tuple[str, str], Prior]
    sigma: Prior
    lkj_eta: float = 1.0
    profile: str = "weak"
    notes: list[str] = field(default_factory=list)
    #: False for binomial / Poisson models (issue 12): no residual SD.
    has_sigma: bool = True
    #: Priors of the family's own parameters (negative binomial: theta), fixed by the family.
    family_rows: list[dict[str, str]] = field(default_factory=list)

    def structure(self) -> str:
        """Families only (parameter values enter the model as data)."""
        fams = [p.dist for p in self.fixed.values()] + [p.dist for p in self.sd.values()]
        return f"{self.profile}:{','.join(fams)}:{self.sigma.describe()}:{self.lkj_eta}"

    def table(self) -> list[dict[str, str]]:
        """Rows (parameter, prior) for reports."""
        rows = [{"parameter": f"beta[{t}]", "prior": p.describe()} for t, p in self.fixed.items()]
        rows += [
            {"parameter": f"sd[{label}: {t}]", "prior": p.describe()}
            for (label, t), p in self.sd.items()
        ]
        if self.has_sigma:
            rows.append({"parameter": "sigma", "prior": self.sigma.describe()})
        rows.append({"parameter": "correlations", "prior": f"LKJ(eta={self.lkj_eta:g})"})
        return rows + list(self.family_rows)


def _column_scale(values: np.ndarray) -> float:
    """SD of a predictor column; 1 for constant columns such as the intercept."""
    sd = float(np.std(values))
    return sd if sd > 0 else 1.0


def resolve_priors(design: Design) -> ResolvedPriors:
    """Resolve ``design.spec.priors`` into a prior for every parameter.

    Raises
    ------
    ValueError
        If a named profile does not fit the design or an override names an
        unknown parameter.
    """
    spec_priors = design.spec.priors
    profile = spec_priors if isinstance(spec_priors, str) else "weak"
    overrides: Mapping[str, Any] = {} if isinstance(spec_priors, str) else spec_priors
    y = design.y
    # The family's centre and unit scale: the response's mean and SD (gaussian), or a
    # centred intercept and unit scale on the link.
    ybar, sy = design.family.prior_centre_scale(y, design.trials)
    fixed: dict[str, Prior] = {}
    sd: dict[tuple[str, str], Prior] = {}
    if profile == "weak":
        for term in design.fixed_terms:
            column = design.X[term].to_numpy()
            if term == "(Intercept)":
                fixed[term] = Prior("Normal", {"mu": ybar, "sigma": 5.0 * sy})
            else:
                fixed[term] = Prior(
                    "Normal", {"mu": 0.0, "sigma": 2.5 * sy / _column_scale(column)}
                )
        for block in design.blocks:
            for j, term in enumerate(block.terms):
                scale = 2.5 * sy / _column_scale(block.values[:, j])
                sd[(block.label, term)] = Prior("HalfNormal", {"sigma": scale})
        sigma = Prior("Exponential", {"lam": 1.0 / sy})
        eta = 1.0
    elif profile == "m14.1":
        terms = design.fixed_terms
        if len(terms) != 2 or terms[0] != "(Intercept)":
            raise ValueError(
                f"prior profile 'm14.1' is for an intercept and one slope; the fixed terms are {terms}"
            )
        fixed = {
            terms[0]: Prior("Normal", {"mu": 5.0, "sigma": 2.0}),
            terms[1]: Prior("Normal", {"mu": -1.0, "sigma": 0.5}),
        }
        for block in design.blocks:
            for term in block.terms:
                sd[(block.label, term)] = Prior("Exponential", {"lam": 1.0})
        sigma = Prior("Exponential", {"lam": 1.0})
        eta = 2.0
    elif profile == "flat":
        # Wide enough to be flat in the likelihood's support, proper so samplers start.
        for term in design.fixed_terms:
            fixed[term] = Prior("Normal", {"mu": 0.0, "sigma": 1e3 * (sy + abs(ybar))})
        for block in design.blocks:
            for j, term in enumerate(block.terms):
                scale = 1e3 * sy / _column_scale(block.values[:, j])
                sd[(block.label, term)] = Prior("HalfNormal", {"sigma": scale})
        sigma = Prior("HalfNormal", {"sigma": 1e3 * sy})
        eta = 1.0
    else:  # pragma: no cover - ModelSpec validates profile names
        raise ValueError(f"unknown prior profile {profile!r}")

    for key, value in overrides.items():
        if key == "lkj_eta":
            eta = float(value)
            continue
        if not isinstance(value, Prior):
            raise ValueError(
                f"prior for {key!r} must be a harness.Prior, not {type(value).__name__}"
            )
        if key in fixed:
            fixed[key] = value
        elif key == "sigma":
            sigma = value
        elif key == "sd":
            sd = {k: value for k in sd}
        elif key.startswith("sd:"):
            _, label, term = key.split(":", 2)
            if (label, term) not in sd:
                raise ValueError(
                    f"prior {key!r}: no random-effect term {term!r} for {label!r}; "
                    f"known: {[f'sd:{a}:{b}' for a, b in sd]}"
                )
            sd[(label, term)] = value
        else:
            raise ValueError(
                f"prior override {key!r} names no parameter; known: {list(fixed)} + "
                "['sd', 'sd:<factor>:<term>', 'sigma', 'lkj_eta']"
            )
    return ResolvedPriors(
        fixed=fixed,
        sd=sd,
        sigma=sigma,
        lkj_eta=eta,
        profile=profile,
        has_sigma=design.family.has_scale,
        family_rows=design.family.prior_rows(),
    )
