"""``audit``: check a user's own PyMC model against the harness's and against lme4."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from harness.audit.draws import observed_name, user_loglik, user_prior_draws
from harness.audit.effects import effects_check
from harness.audit.likelihood import MIN_POINTS, likelihood_check
from harness.audit.loading import AuditError
from harness.audit.mapping import check_keys, harness_draws
from harness.audit.priors import priors_check
from harness.audit.verdicts import CheckResult, worst
from harness.model.priors import resolve_priors
from harness.model.spec import Design, ModelSpec, build_design

log = logging.getLogger("harness")

__all__ = ["ADVISORY", "AuditResult", "audit"]

#: Checks that advise without judging the model: their verdict is shown, never the overall one.
ADVISORY = frozenset({"efficiency"})


@dataclass
class AuditResult:
    """Every check's result and the overall verdict (the worst of them)."""

    spec: ModelSpec
    design: Design
    checks: dict[str, CheckResult]
    comparison: Any = None
    notes: list[str] = field(default_factory=list)
    source: str = ""
    model_path: str = ""

    @property
    def verdict(self) -> str:
        """The worst verdict of the checks that judge the model (efficiency only advises)."""
        return worst([c.verdict for k, c in self.checks.items() if k not in ADVISORY])

    def summary(self) -> pd.DataFrame:
        """One row per check: name, verdict, diagnosis."""
        return pd.DataFrame(
            [
                {"check": c.name, "verdict": c.verdict, "diagnosis": c.diagnosis}
                for c in self.checks.values()
            ]
        )

    def to_json(self, path: str | Path | None = None) -> str:
        """The result as JSON text (written to ``path`` when given)."""
        record = {
            "formula": self.spec.formula,
            "sigma_by": self.spec.sigma_by,
            "family": self.spec.family,
            "verdict": self.verdict,
            "notes": self.notes,
            "checks": {k: c.record() for k, c in self.checks.items()},
        }
        text = json.dumps(record, indent=2, default=_jsonable)
        if path is not None:
            from harness._io import atomic_write

            atomic_write({Path(path): text}, what="audit JSON")
        return text


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def _points(draws: xr.Dataset, n: int) -> xr.Dataset:
    """``n`` draws spread evenly over all chains, as one chain."""
    stacked = draws.stack(sample=("chain", "draw"))
    total = stacked.sizes["sample"]
    pick = np.unique(np.linspace(0, total - 1, min(n, total)).round().astype(int))
    out = stacked.isel(sample=pick).drop_vars(["sample", "chain", "draw"], errors="ignore")
    out = out.rename({"sample": "draw"}).expand_dims("chain")
    return out.assign_coords(chain=[0], draw=np.arange(out.sizes["draw"])).transpose(
        "chain", "draw", ...
    )


def _harness_prior_draws(design: Design, priors: Any, draws: int, seed: int) -> xr.Dataset:
    import pymc as pm

    from harness.engines.pymc import build_model

    model = build_model(design, priors)
    latent = [v.name for v in (*model.free_RVs, *model.deterministics)]
    with model:
        idata = pm.sample_prior_predictive(draws=draws, random_seed=seed, var_names=latent)
    return idata.prior


def _posterior_check(
    design: Design, priors: Any, bayes: Any, freq: Any, priors_differ: bool
) -> tuple[CheckResult, Any]:
    from harness.checks.compare import compare

    cmp = compare(freq, bayes, refit_wide=False)
    tables = cmp.tables()
    bad = []
    for name in ("fixed", "variance", "agreement"):
        frame = getattr(cmp, name)
        label = {"fixed": "term", "variance": "component", "agreement": "term"}[name]
        for _, row in frame[frame["verdict"] != "pass"].iterrows():
            why = str(row.get("explanation", ""))
            why = why if why.startswith(row["verdict"]) else f"{row['verdict']}: {why}"
            bad.append(f"{row.get(label, '?')} ({why})")
    text = f"against lme4: {cmp.verdict}" + (
        f"; rows not passing: {'; '.join(bad[:6])}"
        if bad
        else "; every row within its stated error"
    )
    if priors_differ:
        text += (
            "; the prior share of each gap is computed with the harness's priors, which differ "
            "from the model's (see the priors check)"
        )
    return CheckResult("posterior", cmp.verdict, text, tables), cmp


def _ordered(checks: dict[str, CheckResult]) -> dict[str, CheckResult]:
    order = [
        "likelihood",
        "random_effects",
        "priors",
        "posterior",
        "posterior_harness",
        "efficiency",
    ]
    return {k: checks[k] for k in order if k in checks}


def _posterior_stage(
    model: Any,
    mapping: Mapping[str, Any],
    design: Design,
    spec: ModelSpec,
    data: pd.DataFrame,
    resolved: Any,
    checks: dict[str, CheckResult],
    point_sets: list[xr.Dataset],
    sources: list[str],
    *,
    seed: int,
    draws: int,
    tune: int,
    chains: int,
    points: int,
    freq: Any,
    source: str,
    harness_fit: Any = None,
) -> Any:
    """Sample the model, add posterior points, compare with lme4 and the harness (checks d, e)."""
    from harness.audit.fit_adapter import as_bayes_fit, sample_user_model

    try:
        idata, compile_s, sample_s = sample_user_model(
            model, draws=draws, tune=tune, chains=chains, seed=seed
        )
    except Exception as err:  # the model could not be sampled: the check did not run
        log.warning("audit: sampling the model failed: %s", err)
        why = f"sampling the model failed: {type(err).__name__}: {err}"
        for name in ("posterior", "posterior_harness", "efficiency"):
            checks[name] = CheckResult(name, "incomplete", why)
        return None
    hpost = harness_draws(mapping, idata.posterior, design)
    post_points = _points(idata.posterior, points)
    point_sets.append(post_points)
    sources += ["posterior"] * post_points.sizes["draw"]
    bayes = as_bayes_fit(
        design,
        resolved,
        idata,
        hpost,
        seed=seed,
        draws=draws,
        tune=tune,
        chains=chains,
        compile_seconds=compile_s,
        sample_seconds=sample_s,
        source=source,
    )
    try:
        if freq is None:
            from harness.engines.lme4 import fit_lme4

            freq = fit_lme4(spec, data)
        table = checks["priors"].tables.get("priors") if "priors" in checks else None
        differ = bool(table is not None and "differs" in table and table["differs"].any())
        checks["posterior"], comparison = _posterior_check(design, resolved, bayes, freq, differ)
    except Exception as err:  # lme4 missing or failed: the check did not run, it did not pass
        log.warning("audit: the posterior comparison did not run: %s", err)
        checks["posterior"] = CheckResult(
            "posterior", "incomplete", f"the comparison with lme4 did not run: {err}"
        )
        comparison = None
    _harness_stage(
        model,
        mapping,
        design,
        data,
        resolved,
        checks,
        idata,
        hpost,
        bayes,
        seed=seed,
        draws=draws,
        tune=tune,
        chains=chains,
        harness_fit=harness_fit,
    )
    return comparison


def _harness_stage(
    model: Any,
    mapping: Mapping[str, Any],
    design: Design,
    data: pd.DataFrame,
    resolved: Any,
    checks: dict[str, CheckResult],
    idata: Any,
    hpost: xr.Dataset,
    bayes: Any,
    *,
    seed: int,
    draws: int,
    tune: int,
    chains: int,
    harness_fit: Any,
) -> None:
    """Checks (d, second half) and (e): the harness's own fit of the same data beside the model's."""
    from harness.audit.against_harness import harness_check
    from harness.audit.efficiency import efficiency_check
    from harness.audit.prior_share import prior_share

    try:
        if harness_fit is None:
            from harness.engines.pymc import fit_pymc

            harness_fit = fit_pymc(
                design.spec,
                data,
                seed,
                draws=draws,
                tune=tune,
                chains=chains,
                design=design,
                # Like for like with the model's single run: same draws, tune and chains.
                adaptive=False,
            )
        share = prior_share(model, dict(mapping), design, resolved, idata.posterior, hpost)
        table = checks["priors"].tables.get("priors") if "priors" in checks else None
        differ = bool(table is not None and "differs" in table and table["differs"].any())
        checks["posterior_harness"], pair = harness_check(bayes, harness_fit, share, differ)
    except Exception as err:  # the harness's fit or the comparison failed: not run, not passed
        log.warning("audit: the comparison with the harness's posterior did not run: %s", err)
        why = f"the harness's own fit or the comparison did not run: {type(err).__name__}: {err}"
        checks["posterior_harness"] = CheckResult("posterior_harness", "incomplete", why)
        checks["efficiency"] = CheckResult("efficiency", "incomplete", why)
        return
    checks["efficiency"] = efficiency_check(model, dict(mapping), design, bayes, harness_fit, pair)


def audit(
    build: Callable[[pd.DataFrame], Any],
    data: pd.DataFrame,
    formula: str,
    mapping: Mapping[str, Any],
    *,
    sigma_by: str | None = None,
    family: str = "gaussian",
    link: str | None = None,
    priors: str | Mapping[str, Any] = "weak",
    seed: int = 1,
    prior_draws: int = 200,
    points: int = MIN_POINTS,
    posterior: bool = True,
    draws: int = 1000,
    tune: int = 1000,
    chains: int = 4,
    freq: Any = None,
    source: str = "",
    model_path: str = "",
    harness_fit: Any = None,
) -> AuditResult:
    """Audit a user's own PyMC model against the harness's model for a formula, and lme4.

    Parameters
    ----------
    build : callable
        ``build(data) -> pymc.Model``; it receives the rows lme4 fits.
    data : pandas.DataFrame
    formula : str
        The lme4 formula the model is meant to be.
    mapping : mapping
        Harness row name -> the model's variable name or a callable on the
        draws (see :mod:`harness.audit.mapping`).
    sigma_by, family, link, priors
        As :class:`harness.model.spec.ModelSpec`; ``priors`` only affects the
        priors check and the harness's side of the comparison.
    seed : int
        Seeds the prior draws and the sampler.
    prior_draws : int
        Prior draws for the random-effects check (and the priors check).
    points : int
        Parameter points taken from the prior, and again from the posterior,
        for the likelihood check (at least 20).
    posterior : bool
        Sample the model and compare it with lme4 (check d); without it that
        check reads "incomplete".
    draws, tune, chains : int
        The sampler's settings (nutpie, as the harness's own fits).
    freq : FreqFit, optional
        An lme4 fit of the same spec to reuse.
    harness_fit : BayesFit, optional
        The harness's own PyMC fit of the same spec and data to reuse (checks d
        and e); by default fitted here with the same seed, draws and chains.
    source : str
        The model's source text, for the report.
    model_path : str
        Where the model came from, for the report.

    Returns
    -------
    AuditResult
    """
    import pymc as pm

    spec = ModelSpec(formula=formula, sigma_by=sigma_by, priors=priors, family=family, link=link)
    design = build_design(spec, data)
    check_keys(mapping, design)
    rows = design.data.reset_index(drop=True).copy()
    model = build(rows)
    if not isinstance(model, pm.Model):
        raise AuditError(f"build(data) returned {type(model).__name__}, not a pymc.Model")
    single = observed_name(model, design.n) is not None
    resolved = resolve_priors(design)
    checks: dict[str, CheckResult] = {}
    notes: list[str] = []

    point_sets: list[xr.Dataset] = []
    sources: list[str] = []
    try:
        prior = user_prior_draws(model, max(prior_draws, points), seed)
    except Exception as err:  # e.g. improper priors (pm.Flat) cannot be drawn from
        # PyTensor appends its whole Apply-node dump to the message: keep the first line.
        message = str(err).strip().splitlines()[0] if str(err).strip() else ""
        log.warning("audit: no prior draws of the model: %s", message)
        why = f"the model's prior cannot be drawn from ({type(err).__name__}: {message})"
        for name in ("random_effects", "priors"):
            checks[name] = CheckResult(name, "incomplete", why)
        if isinstance(err, np.linalg.LinAlgError):
            # Not an improper prior: a covariance the model builds is not one.
            checks["random_effects"] = CheckResult(
                "random_effects",
                "fail",
                f"{why}: a covariance of the model is not positive definite at its prior "
                "draws (a Cholesky factor or correlation factor passed as cov=, or a "
                "non-symmetric matrix)",
            )
        notes.append(f"{why}; the likelihood is checked at posterior draws only")
    else:
        hprior = harness_draws(mapping, prior, design)
        checks["random_effects"] = effects_check(design, hprior, hprior.attrs["supplied_levels"])
        harness_prior = _harness_prior_draws(design, resolved, max(prior_draws, points), seed)
        checks["priors"] = priors_check(
            design, resolved, dict(mapping), model, hprior, harness_prior
        )
        point_sets.append(_points(prior, points))
        sources += ["prior"] * point_sets[0].sizes["draw"]
    comparison = None
    if posterior:
        comparison = _posterior_stage(
            model,
            mapping,
            design,
            spec,
            data,
            resolved,
            checks,
            point_sets,
            sources,
            seed=seed,
            draws=draws,
            tune=tune,
            chains=chains,
            points=points,
            freq=freq,
            source=source,
            harness_fit=harness_fit,
        )
    else:
        for name in ("posterior", "posterior_harness", "efficiency"):
            checks[name] = CheckResult(name, "incomplete", "not run (no sampling asked for)")
    if not point_sets:
        checks["likelihood"] = CheckResult(
            "likelihood", "incomplete", "no parameter points (no prior draws and no posterior)"
        )
        return AuditResult(
            spec=spec,
            design=design,
            checks=_ordered(checks),
            comparison=comparison,
            notes=notes,
            source=source,
            model_path=model_path,
        )
    free = [v.name for v in model.free_RVs]
    merged = xr.concat(
        [p[free + [v.name for v in model.deterministics if v.name in p]] for p in point_sets],
        dim="draw",
    )
    merged = merged.assign_coords(draw=np.arange(merged.sizes["draw"]))
    hpoints = harness_draws(mapping, merged, design)
    user = user_loglik(model, merged)
    observed = None
    if single:
        value = model.rvs_to_values[model.observed_RVs[0]]
        observed = np.asarray(value.data if hasattr(value, "data") else value.eval())
    checks["likelihood"] = likelihood_check(
        design, hpoints, user, sources, pointwise=single, observed=observed
    )
    return AuditResult(
        spec=spec,
        design=design,
        checks=_ordered(checks),
        comparison=comparison,
        notes=notes,
        source=source,
        model_path=model_path,
    )
