"""The engines a design can be fitted with, by name: what each is, how it fits, what keys it.

An :class:`Engine` names its kind (frequentist or Bayesian), the function
that fits it, the settings and versions that change its fit and the source
code whose hash enters its cache key.  The runner
(:mod:`harness.pipeline.runner`) holds a design's fits as a mapping from
these names to fits and computes every engine's cache key the same way.
Adding an engine touches this module (one entry in :data:`ENGINES`) and the
engine's own module; the fit functions import their engine lazily, so reading
the registry never imports PyMC or starts R.

Comparisons are pairs: every other engine against the reference
(:data:`REFERENCE`, lme4), then every Bayesian engine against every other
(:func:`comparison_pairs`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from harness.fits import BAYESIAN, FREQUENTIST, Kind
from harness.versions import PY_PACKAGES, python_versions, r_versions_cheap

if TYPE_CHECKING:
    import pandas as pd

    from harness.fits import Fit
    from harness.model.spec import Design, ModelSpec
    from harness.pipeline.settings import FitSettings

__all__ = [
    "DEFAULT_ENGINES",
    "ENGINES",
    "REFERENCE",
    "Engine",
    "EngineUnavailableError",
    "FitRequest",
    "UnknownEngineError",
    "check_installed",
    "comparison_pairs",
    "get_engine",
    "parse_engines",
    "register",
    "resolve_engines",
]

#: The engine every other one is compared against.
REFERENCE = "lme4"
#: The engines a design is fitted with unless asked otherwise.
DEFAULT_ENGINES = ("lme4", "pymc")


class UnknownEngineError(ValueError):
    """An engine name that is not in the registry."""


class EngineUnavailableError(RuntimeError):
    """An engine that is registered but cannot run here (its software is not installed)."""


@dataclass(frozen=True)
class FitRequest:
    """Everything an engine's fit function gets: one design, its settings and the seed."""

    spec: ModelSpec
    data: pd.DataFrame
    design: Design
    settings: FitSettings
    seed: int


@dataclass(frozen=True)
class Engine:
    """One engine of the registry.

    Parameters
    ----------
    name : str
        Registry name (``"lme4"``): the key of its fit in a result, its cache
        folder and its name on the command line.
    kind : {"frequentist", "bayesian"}
        Which fits it returns (:class:`~harness.fits.FreqFit` or
        :class:`~harness.fits.BayesFit`); Bayesian fits keep their draws in a
        side file of the cache entry.
    label : str
        How reports name it (``"PyMC"``).
    fit : callable
        ``fit(request: FitRequest) -> Fit``; imports the engine itself.
    settings_part : callable
        ``settings_part(settings, seed) -> dict``: the settings (and seed, for
        an engine whose fit depends on it) that enter its cache key.
    versions : callable
        The software versions that enter its cache key, or None when they cannot
        be told without the software (R missing): the runner then falls back to
        the newest cached fit of the same key without versions.
    code : tuple of str
        Files and folders under the package whose source enters its cache key.
    missing : callable, optional
        Why it cannot run here, or None when it can; asked only before a fit
        (a cached fit loads without the engine).  None: the engine raises its
        own error.
    progress : str
        Its stage's name in the progress lines (default ``"<label> fit"``).
    """

    name: str
    kind: Kind
    label: str
    fit: Callable[[FitRequest], Fit]
    settings_part: Callable[[FitSettings, int], dict[str, Any]]
    versions: Callable[[], Mapping[str, str] | None]
    code: tuple[str, ...]
    missing: Callable[[], str | None] | None = None
    progress: str = ""

    @property
    def stage_name(self) -> str:
        """The name of its stage in the progress lines."""
        return self.progress or f"{self.label} fit"


# --------------------------------------------------------------------------- lme4


def _fit_lme4(request: FitRequest) -> Fit:
    from harness.engines.lme4 import fit_lme4

    settings = request.settings
    return fit_lme4(
        request.spec,
        request.data,
        profile=settings.profile,
        n_sims=settings.n_sims,
        seed=settings.lme4_seed,
        design=request.design,
    )


def _lme4_settings(settings: FitSettings, seed: int) -> dict[str, Any]:
    # No seed: REsim's own (lme4_seed) is a setting, so a new PyMC seed keeps lme4 cached.
    return {"settings": settings.lme4_part()}


# --------------------------------------------------------------------------- PyMC


def _fit_pymc(request: FitRequest) -> Fit:
    from harness.engines.pymc import fit_pymc

    settings = request.settings
    return fit_pymc(
        request.spec,
        request.data,
        seed=request.seed,
        draws=settings.draws,
        tune=settings.tune,
        chains=settings.chains,
        sampler=settings.sampler,
        target_accept=settings.target_accept,
        design=request.design,
        adaptive=settings.adaptive_settings(),
    )


def _pymc_settings(settings: FitSettings, seed: int) -> dict[str, Any]:
    return {"settings": settings.pymc_part(), "seed": int(seed)}


def _pymc_versions() -> dict[str, str]:
    py = python_versions()
    return {k: py[k] for k in PY_PACKAGES}


def _pymc_missing() -> str | None:
    from importlib.util import find_spec

    absent = [name for name in ("pymc", "pytensor", "arviz") if find_spec(name) is None]
    return f"Python package(s) {absent} not installed" if absent else None


# --------------------------------------------------------------------------- brms


def _fit_brms(request: FitRequest) -> Fit:
    from harness.engines.brms import fit_brms

    settings = request.settings
    return fit_brms(
        request.spec,
        request.data,
        seed=request.seed,
        draws=settings.draws,
        tune=settings.tune,
        chains=settings.chains,
        design=request.design,
        adapt_delta=settings.target_accept,
    )


def _brms_settings(settings: FitSettings, seed: int) -> dict[str, Any]:
    part = {k: getattr(settings, k) for k in ("draws", "tune", "chains", "target_accept")}
    return {"settings": part, "seed": int(seed)}


def _brms_versions() -> dict[str, str] | None:
    versions = r_versions_cheap()
    if versions is None:
        return None
    from harness.engines.brms import brms_available, brms_versions

    return {**versions, **brms_versions()} if brms_available() else versions


def _brms_missing() -> str | None:
    from harness.engines.brms import brms_available

    if brms_available():
        return None
    return (
        "R packages brms and rstan are not installed: run "
        "`bash r_scripts/install_r.sh --with-brms` (Debian: apt-get install r-cran-brms)"
    )


# --------------------------------------------------------------------------- the registry

#: Registry name -> engine, in the order results list them.
ENGINES: dict[str, Engine] = {
    "lme4": Engine(
        name="lme4",
        kind=FREQUENTIST,
        label="lme4",
        fit=_fit_lme4,
        settings_part=_lme4_settings,
        versions=r_versions_cheap,
        code=("model", "fits.py", "engines/lme4.py", "r_scripts"),
        progress="R fit (lme4)",
    ),
    "pymc": Engine(
        name="pymc",
        kind=BAYESIAN,
        label="PyMC",
        fit=_fit_pymc,
        settings_part=_pymc_settings,
        versions=_pymc_versions,
        code=(
            "model",
            "fits.py",
            "engines/pymc.py",
            "engines/adaptive.py",
            "engines/samplers.py",
            "engines/offsets.py",
        ),
        missing=_pymc_missing,
    ),
    "brms": Engine(
        name="brms",
        kind=BAYESIAN,
        label="brms",
        fit=_fit_brms,
        settings_part=_brms_settings,
        versions=_brms_versions,
        code=("model", "fits.py", "engines/brms.py", "r_scripts/brms.R"),
        missing=_brms_missing,
        progress="Stan fit (brms; the first fit of a model structure compiles, ~2 min)",
    ),
}


def register(engine: Engine, *, replace: bool = False) -> Engine:
    """Add an engine to :data:`ENGINES` (a name already there only with ``replace``)."""
    if engine.kind not in (FREQUENTIST, BAYESIAN):
        raise ValueError(f"engine {engine.name!r}: kind must be {FREQUENTIST!r} or {BAYESIAN!r}")
    if not engine.name.isidentifier() or engine.name in _STAGE_NAMES:
        raise ValueError(f"{engine.name!r} cannot name an engine")
    if engine.name in ENGINES and not replace:
        raise ValueError(f"an engine named {engine.name!r} is already registered")
    ENGINES[engine.name] = engine
    return engine


#: The runner's stages that are not engines; no engine may take their names (cache folders).
_STAGE_NAMES = frozenset({"compare", "same_model", "figures"})


def get_engine(name: str) -> Engine:
    """The registered engine of this name; an unknown name lists the known ones."""
    try:
        return ENGINES[name]
    except KeyError:
        raise UnknownEngineError(
            f"unknown engine {name!r}; known engines: {', '.join(ENGINES)}"
        ) from None


def parse_engines(text: str) -> tuple[str, ...]:
    """``"lme4,pymc"`` as engine names, each checked against the registry."""
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if not names:
        raise UnknownEngineError(
            f"no engine named in {text!r}; known engines: {', '.join(ENGINES)}"
        )
    return resolve_engines(names)


def resolve_engines(names: Iterable[str] | None = None) -> tuple[str, ...]:
    """Engine names, checked: known, none twice, and the reference among them (first).

    Parameters
    ----------
    names : iterable of str, optional
        Default :data:`DEFAULT_ENGINES`.

    Returns
    -------
    tuple of str
        The names with the reference first, the others in the order given.
    """
    names = tuple(DEFAULT_ENGINES if names is None else names)
    for name in names:
        get_engine(name)
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"engine(s) {repeated} named more than once")
    if REFERENCE not in names:
        raise ValueError(
            f"the reference engine {REFERENCE!r} must be among the engines (got {list(names)}): "
            "every comparison is made against it"
        )
    if len(names) < 2:
        raise ValueError(f"at least two engines are needed to compare, got {list(names)}")
    return (REFERENCE, *(n for n in names if n != REFERENCE))


def check_installed(names: Iterable[str]) -> None:
    """Raise :class:`EngineUnavailableError` naming every engine that cannot run here, and why.

    Only engines that can tell without starting their software are asked
    (:attr:`Engine.missing`); lme4 says what to install when R starts.
    """
    problems = []
    for name in names:
        engine = get_engine(name)
        why_not = engine.missing() if engine.missing is not None else None
        if why_not:
            problems.append(f"{name}: {why_not}")
    if problems:
        raise EngineUnavailableError(f"engine(s) not installed here: {'; '.join(problems)}")


def comparison_pairs(names: Iterable[str]) -> list[tuple[str, str]]:
    """The pairs a design's fits are compared in.

    Every other engine against the reference, in order; then every Bayesian
    engine against each later one (PyMC against brms), as a gap between two
    posteriors says something a gap to an (RE)ML estimate cannot.
    """
    names = resolve_engines(names)
    pairs = [(REFERENCE, n) for n in names[1:]]
    bayesian = [n for n in names if get_engine(n).kind == BAYESIAN]
    pairs += [(a, b) for i, a in enumerate(bayesian) for b in bayesian[i + 1 :]]
    return pairs
