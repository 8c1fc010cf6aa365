"""Compose the stages for one design: fit every engine, compare, check, report.

Every expensive product is cached on disk under a hash of what produced it,
so re-rendering a report never refits:

========== ===================================================================
an engine  data hash, spec key, its settings (and seed), its versions, its code
           (:mod:`harness.engines.registry`: lme4 keys R/lme4/nlme versions and
           the R + bridge code; PyMC the seed, PyMC/PyTensor/nutpie versions)
same_model the lme4 key, the PyMC versions, ``harness/checks/same_model.py``
compare    the keys of the pair's two fits and the checks' code (two Bayesian fits are
           compared by ``compare_bayes.py``, in combined Monte Carlo error)
same_model_bayes  the keys of the PyMC and brms fits, the model, engines and checks code
figures    the compare and same-model keys, ``harness/report`` and ``checks/dispersion.py``
           (the count checks are computed while the figures are drawn)
========== ===================================================================

Every key is made by one function (:func:`stage_key`), and an engine's by
:func:`engine_key` over it.  A changed seed therefore refits only the
Bayesian engines; a changed spec or data refits every engine.  On a cache hit nothing imports rpy2, starts R, or compiles a model:
the R versions in the lme4 key come from one ``Rscript`` call (or, without
R, from the newest cached fit of the same data, spec and settings).

The cache (:mod:`harness.pipeline.cache`) lives in ``$HARNESS_CACHE_DIR``, else the
user's cache folder (``platformdirs.user_cache_dir("harness")``, e.g.
``~/.cache/harness``).  Its contract:

* entries are JSON documents (``<kind>/<key>.json``, the PyMC draws in
  ``<key>.nc``) with a format version; nothing is ever unpickled, and values
  decode only into the harness's own dataclasses;
* each entry stores the full key parts above and is checked against the key
  the run computes (and the ``.nc`` against its recorded SHA-256); a
  mismatched, damaged or wrongly shaped entry is logged as a warning naming
  the file and refitted, and the new entry overwrites it;
* the spec, design and (for comparisons) the fits are not stored twice: the
  entry refers to them and the runner supplies its own on load;
* every file is written to a temporary name and renamed (side files first,
  the JSON last), so an interrupted run never leaves a half-written entry,
  and temp files of killed runs are removed when the cache is opened;
* a cache that cannot be written (read-only) only logs a warning: the run
  still returns its result and writes its report.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import time
import warnings
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pandas as pd

from harness import progress
from harness.engines.registry import (
    DEFAULT_ENGINES,
    ENGINES,
    REFERENCE,
    Engine,
    EngineUnavailableError,
    FitRequest,
    comparison_pairs,
    get_engine,
    resolve_engines,
)
from harness.fits import BAYESIAN, FREQUENTIST, BayesFit, Fit, FreqFit
from harness.model.spec import Design, ModelSpec, build_design
from harness.pipeline.cache import (
    CACHE_FORMAT,
    FitCache,
    check_shape,
    resolve_cache_dir,
)
from harness.pipeline.cache import digest as _digest
from harness.pipeline.cache import load_idata as _load_idata
from harness.pipeline.settings import FitSettings
from harness.versions import PY_PACKAGES as _PY_PACKAGES
from harness.versions import python_versions, r_ready_cheap

if TYPE_CHECKING:
    from harness.checks.compare import Comparison
    from harness.checks.compare_bayes import BayesComparison

log = logging.getLogger("harness")

#: The designs ``harness report all`` writes, in index order.
REPORT_DESIGNS = (
    "cafe",
    "sleepstudy",
    "partially_clustered",
    "partially_clustered_hetero",
    "cbpp",
    "grouseticks",
)

_PACKAGE = Path(__file__).resolve().parents[1]  # the harness package folder


@dataclass
class DesignResult:
    """Everything a report shows about one design.

    ``fits`` holds one fit per engine, by registry name, the reference
    (:data:`~harness.engines.registry.REFERENCE`, lme4) first.  A Bayesian
    fit's ``idata`` is read from the cache on first access through
    :meth:`fit` (reports built from cached figures never need it, which keeps
    warm runs fast).  ``comparisons`` holds one comparison per pair
    (:func:`~harness.engines.registry.comparison_pairs`) that has a comparison
    function; ``freq``, ``bayes`` and ``comparison`` name the reference fit,
    the first Bayesian fit and their comparison.
    """

    name: str
    description: str
    spec: ModelSpec
    data: pd.DataFrame
    design: Design
    fits: dict[str, Fit]
    comparisons: dict[tuple[str, str], Comparison | BayesComparison]
    same_model: Any | None
    same_model_status: str
    seed: int
    settings: FitSettings
    timings: dict[str, float]
    cached: dict[str, bool]
    keys: dict[str, str]
    versions: dict[str, str]
    figures: dict[str, Any] | None = None
    reference: str = REFERENCE
    #: The log-density identity PyMC vs brms (:mod:`harness.checks.same_model_bayes`) when
    #: both engines ran; its status line says why it is missing otherwise.
    same_model_bayes: Any | None = None
    same_model_bayes_status: str = ""
    _idata_paths: dict[str, Path] = field(default_factory=dict, repr=False)

    @property
    def engines(self) -> list[str]:
        """The engines' names, the reference first."""
        return list(self.fits)

    @property
    def bayesian(self) -> list[str]:
        """Names of the Bayesian engines, in order."""
        return [n for n, f in self.fits.items() if f.kind == BAYESIAN]

    def fit_info(self, engine: str) -> Fit:
        """An engine's fit without forcing its InferenceData to load (settings, code, versions)."""
        try:
            return self.fits[engine]
        except KeyError:
            raise ValueError(
                f"design {self.name!r} has no {engine!r} fit (it has {self.engines})"
            ) from None

    def fit(self, engine: str) -> Fit:
        """An engine's fit, a Bayesian one with its InferenceData loaded."""
        fit = self.fit_info(engine)
        path = self._idata_paths.get(engine)
        if isinstance(fit, BayesFit) and fit.idata is None and path is not None:
            fit.idata = _load_idata(path)
        return fit

    @property
    def freq(self) -> FreqFit:
        """The reference fit (lme4)."""
        fit = self.fit_info(self.reference)
        if not isinstance(fit, FreqFit):
            raise TypeError(f"the reference fit {self.reference!r} is not a frequentist fit")
        return fit

    @freq.setter
    def freq(self, fit: FreqFit) -> None:
        self.fits[self.reference] = fit

    def _first_bayesian(self) -> str:
        if not self.bayesian:
            raise ValueError(f"design {self.name!r} has no Bayesian fit")
        return self.bayesian[0]

    @property
    def bayes(self) -> BayesFit:
        """The first Bayesian fit (PyMC), with its InferenceData loaded."""
        return self.fit(self._first_bayesian())  # type: ignore[return-value]

    @property
    def bayes_info(self) -> BayesFit:
        """The first Bayesian fit without forcing its InferenceData to load."""
        return self.fit_info(self._first_bayesian())  # type: ignore[return-value]

    @property
    def pair(self) -> tuple[str, str]:
        """The main pair: the reference and the first Bayesian engine."""
        return (self.reference, self._first_bayesian())

    @property
    def comparison(self) -> Comparison:
        """The comparison of the main pair (:attr:`pair`)."""
        return self.comparisons[self.pair]  # type: ignore[return-value]

    @comparison.setter
    def comparison(self, value: Comparison) -> None:
        self.comparisons[self.pair] = value

    @property
    def bayes_pairs(self) -> dict[tuple[str, str], BayesComparison]:
        """The comparisons of two Bayesian fits (PyMC against brms), by pair."""
        from harness.checks.compare_bayes import BayesComparison

        return {p: c for p, c in self.comparisons.items() if isinstance(c, BayesComparison)}

    @property
    def verdict(self) -> str:
        """Worst verdict of the comparisons; ``fail`` when a same-model check (lme4 or brms) failed.

        A same-model check that crashed or is unavailable gives ``incomplete``
        (unless a comparison already fails or is unreliable): a check the
        verdict needs did not run, so the verdict cannot be "pass".
        """
        order = ["pass", "look", "fail", "unreliable"]
        verdicts = [c.verdict for c in self.comparisons.values()]
        verdict = max(verdicts, key=lambda v: order.index(v) if v in order else 0, default="pass")
        for check in (self.same_model, self.same_model_bayes):
            if check is not None and not bool(getattr(check, "ok", True)):
                return "fail"
        if self.same_model is None:
            return verdict if verdict in ("fail", "unreliable") else "incomplete"
        return verdict

    def __repr__(self) -> str:
        return f"DesignResult({self.name!r}, verdict={self.verdict!r}, seed={self.seed})"

    def _repr_html_(self) -> str | None:
        """Jupyter: the verdict table with its pictures (registered by the report package)."""
        from harness.views import html

        return html(self)


# --------------------------------------------------------------------------- keys and versions


_SOURCE_SUFFIXES = (".py", ".R", ".j2", ".css")


@cache
def _source_hash(*relative: str) -> str:
    """Hash of the code that produced a result: whole subpackages, so no file list can go stale.

    Each entry is a file or a folder under the package (``"model"``,
    ``"engines/lme4.py"``) or beside it (``"r_scripts"``); a folder counts with
    every ``.py``, ``.R``, ``.j2`` and ``.css`` file below it, by relative path.
    """
    h = hashlib.sha256()
    for rel in relative:
        path = _PACKAGE / rel
        if not path.exists():
            path = _PACKAGE.parent / rel
        files = (
            sorted(
                p
                for p in path.rglob("*")
                if p.suffix in _SOURCE_SUFFIXES and "__pycache__" not in p.parts
            )
            if path.is_dir()
            else [path]
        )
        h.update(rel.encode())
        for file in files:
            h.update(str(file.relative_to(path)).encode() if path.is_dir() else b"")
            h.update(file.read_bytes() if file.is_file() else b"<missing>")
    return h.hexdigest()[:16]


def stage_key(kind: str, code: tuple[str, ...], **inputs: Any) -> tuple[dict[str, Any], str]:
    """Key parts and key of a cache entry: the one place a key is made.

    Parameters
    ----------
    kind : str
        The entry's kind: an engine's name, ``"same_model"``, ``"compare"`` or ``"figures"``.
    code : tuple of str
        Files and folders whose source enters the key (:func:`_source_hash`).
    **inputs
        Whatever else the entry depends on (JSON-ready).

    Returns
    -------
    (dict, str)
        The key parts (stored with the entry and checked on load) and their digest.
    """
    parts = {"format": CACHE_FORMAT, "kind": kind, **inputs, "code": _source_hash(*code)}
    return parts, _digest(parts)


@dataclass(frozen=True)
class EngineKey:
    """An engine fit's cache key.

    ``key`` is None when the engine's versions cannot be told here (R missing);
    ``parts`` then lack ``versions`` and ``partial`` (the digest of the parts
    without versions) finds the newest fit written under them.
    """

    parts: dict[str, Any]
    key: str | None
    partial: str


def engine_key(
    engine: Engine, design: Design, spec: ModelSpec, settings: FitSettings, seed: int
) -> EngineKey:
    """The cache key of one engine's fit of one design (:func:`stage_key` plus its versions)."""
    parts, partial = stage_key(
        engine.name,
        engine.code,
        data=design.data_hash(),
        spec=spec.key(),
        **engine.settings_part(settings, seed),
    )
    versions = engine.versions()
    if versions is None:
        return EngineKey(parts, None, partial)
    full = {**parts, "versions": dict(versions)}
    return EngineKey(full, _digest(full), partial)


def _same_model_key(lme4_key: str) -> tuple[dict[str, Any], str]:
    py = python_versions()
    return stage_key(
        "same_model",
        ("model", "fits.py", "engines", "checks", "r_scripts"),
        lme4=lme4_key,
        versions={k: py[k] for k in _PY_PACKAGES},
    )


def _compare_key(fit_keys: dict[str, str]) -> tuple[dict[str, Any], str]:
    """The key of a comparison of two fits, by their engines' names and keys."""
    return stage_key("compare", ("model", "fits.py", "engines", "checks"), fits=fit_keys)


def _compare_stage(pair: tuple[str, str], main: tuple[str, str] | None) -> str:
    """The name a comparison goes by in ``keys``, ``cached`` and ``timings``."""
    return "compare" if pair == main else f"compare:{pair[0]}-{pair[1]}"


# --------------------------------------------------------------------------- stages


def _resolve(
    name_or_pair: str | tuple[ModelSpec, pd.DataFrame],
) -> tuple[str, str, ModelSpec, pd.DataFrame]:
    from harness import datasets

    if isinstance(name_or_pair, str):
        data, spec = datasets.load(name_or_pair)
        return name_or_pair, datasets.describe(name_or_pair), spec, data
    if isinstance(name_or_pair, tuple) and len(name_or_pair) == 2:
        spec, data = name_or_pair
        if not isinstance(spec, ModelSpec):
            raise ValueError(
                f"fit_design expects a design name or a (ModelSpec, DataFrame) pair; "
                f"got ({type(spec).__name__}, {type(data).__name__})"
            )
        name = spec.name or "custom"
        return name, f"User data, formula {spec.formula}", spec, data
    raise ValueError(
        f"fit_design expects a design name or a (ModelSpec, DataFrame) pair, not {name_or_pair!r}"
    )


def _timed(function: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    value = function()
    return value, time.perf_counter() - started


def _fit_engine_cached(
    store: FitCache,
    engine: Engine,
    design: Design,
    spec: ModelSpec,
    data: pd.DataFrame,
    settings: FitSettings,
    seed: int,
    refit: bool,
) -> tuple[Fit, str, bool, Path | None]:
    """(fit, key, cached, path of its draws) of one engine; a Bayesian fit's draws are a side file.

    When the engine's versions cannot be told here (R missing), the newest fit
    cached under the same key without versions is used, checked against every
    key part but the versions; without one the engine raises its own error.
    """
    ekey = engine_key(engine, design, spec, settings, seed)
    context = {"spec": spec, "design": design}
    bayesian = engine.kind == BAYESIAN
    shape: type = BayesFit if bayesian else FreqFit
    files = (".nc",) if bayesian else ()
    full_parts, key = ekey.parts, ekey.key
    if key is None:
        latest = None if refit else store.latest_for(engine.name, ekey.partial)
        if latest is not None:
            log.warning(
                "%s's versions cannot be told here; using the cached %s fit %s",
                engine.label,
                engine.label,
                latest,
            )
            hit = store.load(
                engine.name, latest, ekey.parts, shape=shape, context=context, files=files
            )
            if hit is not None:
                return hit[0], latest, True, _draws_path(store, engine, latest)
        # Nothing cached: the engine raises its own clear error (or fits, if it can after all).
        full_parts = {**ekey.parts, "versions": {"versions": "unavailable"}}
        key = _digest(full_parts)
    if not refit:
        hit = store.load(engine.name, key, full_parts, shape=shape, context=context, files=files)
        if hit is not None:
            log.info(
                "%s: %s fit loaded from cache (%s)", spec.name or spec.formula, engine.label, key
            )
            return hit[0], key, True, _draws_path(store, engine, key)
    why_not = engine.missing() if engine.missing is not None else None
    if why_not:
        raise EngineUnavailableError(f"engine {engine.name!r} cannot run here: {why_not}")
    fit = engine.fit(FitRequest(spec=spec, data=data, design=design, settings=settings, seed=seed))
    if isinstance(fit, BayesFit):
        stored = store.store(
            engine.name,
            key,
            dataclasses.replace(fit, idata=None),
            full_parts,
            {"compile_seconds": fit.compile_seconds, "sample_seconds": fit.sample_seconds},
            context=context,
            files={".nc": lambda tmp: fit.idata.to_netcdf(str(tmp))},
        )
    else:
        stored = store.store(
            engine.name, key, fit, full_parts, {"fit_seconds": fit.fit_seconds}, context=context
        )
    if stored:
        store.set_latest(engine.name, ekey.partial, key)
    return fit, key, False, _draws_path(store, engine, key)


def _draws_path(store: FitCache, engine: Engine, key: str) -> Path | None:
    """Where a Bayesian fit's draws are cached (None for a frequentist fit)."""
    return store.path(engine.name, key, ".nc") if engine.kind == BAYESIAN else None


def _same_model_cached(
    store: FitCache,
    spec: ModelSpec,
    data: pd.DataFrame,
    freq: FreqFit,
    lme4_key: str,
    refit: bool,
) -> tuple[Any | None, str, str | None, bool, float]:
    """(result, status line, key, cached, seconds); never a fake pass."""
    parts, key = _same_model_key(lme4_key)
    if not refit:
        from harness.checks.same_model import SameModel

        shape = {"result": SameModel, "status": str, "seconds": (float, int)}
        hit = store.load("same_model", key, parts, shape=shape)
        if hit is not None:
            value = hit[0]
            return value["result"], value["status"], key, True, value["seconds"]
    try:
        from harness.checks.same_model import same_model
    except ImportError as err:
        return None, f"same-model check not available ({err})", None, False, 0.0
    try:
        result, seconds = _timed(lambda: same_model(spec, data, freq=freq))
    except Exception as err:  # reported in the page, not hidden, and not cached
        log.warning("same-model check failed: %s", err)
        return (
            None,
            f"same-model check failed to run: {type(err).__name__}: {err}",
            None,
            False,
            0.0,
        )
    status = "ok" if bool(getattr(result, "ok", False)) else "the likelihoods differ"
    store.store(
        "same_model",
        key,
        {"result": result, "status": status, "seconds": seconds},
        parts,
        {"seconds": seconds},
    )
    return result, status, key, False, seconds


def _with_refits(freq: FreqFit, same_model: Any | None) -> FreqFit:
    """``freq`` with the same-model check's lme4 refits (itself when there are none)."""
    if same_model is None:
        return freq
    from harness.checks.same_model import with_lme4_refits

    return with_lme4_refits(freq, same_model)  # type: ignore[no-any-return]


def _compare_cached(
    store: FitCache,
    pair: tuple[str, str],
    freq: FreqFit,
    bayes_loader: Callable[[], BayesFit],
    bayes_info: BayesFit,
    fit_keys: dict[str, str],
    refit: bool,
) -> tuple[Comparison, str, bool, float]:
    """A reference fit against a Bayesian one: (comparison, key, cached, seconds)."""
    parts, key = _compare_key(fit_keys)
    # The fits are the runner's own: the entry refers to them instead of storing them again.
    context = {"freq": freq, "bayes": bayes_info}
    if not refit:
        from harness.checks.compare import Comparison

        shape = {"comparison": Comparison, "seconds": (float, int)}
        hit = store.load("compare", key, parts, shape=shape, context=context)
        if hit is not None:
            return hit[0]["comparison"], key, True, hit[0]["seconds"]
    from harness.checks.compare import compare

    with warnings.catch_warnings():
        # R-hat/ESS of the constant diagonal of a correlation matrix divide 0 by 0 inside
        # ArviZ; the report leaves those entries out, so the console need not shout.
        warnings.filterwarnings(
            "ignore", message="invalid value encountered", category=RuntimeWarning
        )
        comparison, seconds = _timed(lambda: compare(freq, bayes_loader(), engines=pair))
    store.store(
        "compare",
        key,
        {
            "comparison": dataclasses.replace(comparison, freq=freq, bayes=bayes_info),
            "seconds": seconds,
        },
        parts,
        {"seconds": seconds},
        context=context,
    )
    return comparison, key, False, seconds


def _compare_bayes_cached(
    store: FitCache,
    pair: tuple[str, str],
    loaders: tuple[Callable[[], BayesFit], Callable[[], BayesFit]],
    fit_keys: dict[str, str],
    refit: bool,
) -> tuple[BayesComparison, str, bool, float]:
    """Two Bayesian fits against each other: (comparison, key, cached, seconds)."""
    parts, key = _compare_key(fit_keys)
    if not refit:
        from harness.checks.compare_bayes import BayesComparison

        shape = {"comparison": BayesComparison, "seconds": (float, int)}
        hit = store.load("compare", key, parts, shape=shape)
        if hit is not None:
            return hit[0]["comparison"], key, True, hit[0]["seconds"]
    from harness.checks.compare_bayes import compare_bayes

    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="invalid value encountered", category=RuntimeWarning
        )
        comparison, seconds = _timed(
            lambda: compare_bayes(loaders[0](), loaders[1](), engines=pair)
        )
    store.store(
        "compare", key, {"comparison": comparison, "seconds": seconds}, parts, {"seconds": seconds}
    )
    return comparison, key, False, seconds


#: The two engines whose log densities :mod:`harness.checks.same_model_bayes` compares.
IDENTITY_PAIR = ("pymc", "brms")


def _identity_wanted(engines: Collection[str]) -> bool:
    """Whether the PyMC-vs-brms log-density identity runs for these engines."""
    return set(IDENTITY_PAIR) <= set(engines)


def _same_model_bayes_key(fit_keys: dict[str, str]) -> tuple[dict[str, Any], str]:
    return stage_key(
        "same_model_bayes", ("model", "fits.py", "engines", "checks", "r_scripts"), fits=fit_keys
    )


def _same_model_bayes_cached(
    store: FitCache, design: Design, fit_keys: dict[str, str], refit: bool
) -> tuple[Any | None, str, str | None, bool, float]:
    """The PyMC-vs-brms identity: (result, status line, key, cached, seconds); never a fake pass."""
    parts, key = _same_model_bayes_key(fit_keys)
    if design.spec.parameterization != "offsets":
        return (
            None,
            "log-density identity with brms not applicable: it is for the offsets "
            f"parameterization, not {design.spec.parameterization!r}",
            None,
            False,
            0.0,
        )
    if not refit:
        from harness.checks.same_model_bayes import SameModelBayes

        shape = {"result": SameModelBayes, "status": str, "seconds": (float, int)}
        hit = store.load("same_model_bayes", key, parts, shape=shape)
        if hit is not None:
            value = hit[0]
            return value["result"], value["status"], key, True, value["seconds"]
    try:
        from harness.checks.same_model_bayes import same_model_bayes

        result, seconds = _timed(lambda: same_model_bayes(design, cache_dir=store.root))
    except Exception as err:  # reported in the page, not hidden, and not cached
        log.warning("log-density identity PyMC vs brms failed to run: %s", err)
        return (
            None,
            f"log-density identity failed to run: {type(err).__name__}: {err}",
            None,
            False,
            0.0,
        )
    status = "ok" if result.ok else "the log densities differ"
    store.store(
        "same_model_bayes",
        key,
        {"result": result, "status": status, "seconds": seconds},
        parts,
        {"seconds": seconds},
    )
    return result, status, key, False, seconds


def _bayes_fit(result: DesignResult, engine: str) -> BayesFit:
    """A Bayesian fit of the result, its draws loaded."""
    return cast(BayesFit, result.fit(engine))


def _comparable(result: DesignResult, pair: tuple[str, str]) -> bool:
    """Whether a comparison function exists for the kinds of this pair's fits.

    A frequentist reference against a Bayesian fit (:mod:`harness.checks.compare`)
    and two Bayesian fits (:mod:`harness.checks.compare_bayes`); any other pair is
    logged, not faked.
    """
    first, second = (result.fit_info(name) for name in pair)
    return isinstance(second, BayesFit) and isinstance(first, (FreqFit, BayesFit))


def figures_key_parts(
    result: DesignResult, render: Callable[[DesignResult], Any] | None = None
) -> dict[str, Any]:
    """What a design's rendered figures depend on: the fits, the renderer and its package."""
    return _figures_key(result.name, result.keys, render)[0]


def _figures_key(
    name: str, keys: dict[str, str], render: Callable[..., Any] | None
) -> tuple[dict[str, Any], str]:
    renderer = f"{render.__module__}.{render.__qualname__}" if render is not None else None
    return stage_key(
        "figures",
        ("report", "checks/dispersion.py"),
        compare={k: v for k, v in keys.items() if k.split(":")[0] == "compare"},
        same_model=keys.get("same_model"),
        name=name,
        renderer=renderer,
    )


def figures_key(result: DesignResult, render: Callable[[DesignResult], Any] | None = None) -> str:
    """Cache key of a design's rendered figures."""
    return _digest(figures_key_parts(result, render))


_IMAGE_URI_PREFIXES = ("data:image/png;base64,", "data:image/svg+xml;base64,")


def _check_figures(figures: Any) -> None:
    """Cached figures are inline images and tables only: every ``uri`` is a data URI of an image."""
    check_shape(figures, dict, "figures")

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            uri = node.get("uri")
            if uri is not None and not (
                uri == "" or (isinstance(uri, str) and uri.startswith(_IMAGE_URI_PREFIXES))
            ):
                raise ValueError("a figure whose uri is not an inline PNG or SVG image")
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(figures)


#: The stages that are not engine fits, in the order :func:`fit_design` runs them.
CHECK_STAGES = ("compare", "same_model", "figures")
#: The cached stages of one design with the default engines, in the order :func:`fit_design`
#: runs them.
STAGES = (*DEFAULT_ENGINES, *CHECK_STAGES)


def _refit_set(refit: bool | Collection[str], engines: tuple[str, ...]) -> frozenset[str]:
    """``refit`` as the set of stages to recompute (True: all, False: none)."""
    stages = (*engines, *CHECK_STAGES)
    if _identity_wanted(engines):
        stages += ("same_model_bayes",)
    if isinstance(refit, bool):
        return frozenset(stages) if refit else frozenset()
    unknown = sorted(set(refit) - set(stages))
    if unknown:
        raise ValueError(f"unknown stages to refit {unknown}; choose from {list(stages)}")
    return frozenset(refit)


def fit_stages(
    name_or_pair: str | tuple[ModelSpec, pd.DataFrame],
    stages: Collection[str],
    *,
    seed: int = 1,
    cache_dir: str | os.PathLike[str] | None = None,
    refit: bool = False,
    settings: FitSettings | None = None,
) -> dict[str, float]:
    """Fit some stages of a design into the cache (for worker processes); their seconds.

    An engine's name fits that engine (``"lme4"`` starts R; ``"pymc"``
    compiles and samples without starting R); ``"same_model"`` needs only the
    reference (lme4) fit.  A later :func:`fit_design` with the same arguments
    loads what these stored.

    Parameters
    ----------
    name_or_pair : str or (ModelSpec, DataFrame)
        As for :func:`fit_design`.
    stages : collection of str
        Registered engine names and ``"same_model"``.
    seed, cache_dir, refit, settings
        As for :func:`fit_design`.

    Returns
    -------
    dict
        Seconds per stage run (0 for a cache hit is not reported: a hit's own
        recorded seconds are).
    """
    unknown = sorted(set(stages) - {*ENGINES, "same_model"})
    if unknown:
        raise ValueError(
            f"fit_stages runs the engines {list(ENGINES)} and same_model, not {unknown}"
        )
    settings = settings or FitSettings()
    store = FitCache(resolve_cache_dir(cache_dir))
    name, _, spec, data = _resolve(name_or_pair)
    design = build_design(spec, data)
    progress.set_design(name)
    seconds: dict[str, float] = {}
    wanted = [n for n in ENGINES if n in stages or (n == REFERENCE and "same_model" in stages)]
    for engine_name in wanted:
        engine = get_engine(engine_name)
        with progress.stage(engine.stage_name) as stage:
            (fit, key, hit, _), seconds[engine_name] = _timed(
                functools.partial(
                    _fit_engine_cached, store, engine, design, spec, data, settings, seed, refit
                )
            )
            stage.detail = "cached" if hit else ""
        if isinstance(fit, FreqFit) and "same_model" in stages:
            with progress.stage("same-model check"):
                *_, seconds["same_model"] = _same_model_cached(store, spec, data, fit, key, refit)
    return seconds


def missing_stages(
    name_or_pair: str | tuple[ModelSpec, pd.DataFrame],
    *,
    seed: int = 1,
    cache_dir: str | os.PathLike[str] | None = None,
    settings: FitSettings | None = None,
    render: Callable[[DesignResult], Any] | None = None,
    engines: Sequence[str] | None = None,
) -> list[str]:
    """The stages of :func:`fit_design` that have no cache entry yet (nothing is fitted).

    Keys are computed as :func:`fit_design` computes them; an entry that is
    present but damaged counts as present (the run that loads it refits it).
    When an engine's versions cannot be told here (R missing), its key cannot
    be known and every stage counts as missing.
    """
    names = resolve_engines(engines)
    settings = settings or FitSettings()
    store = FitCache(resolve_cache_dir(cache_dir))
    name, _, spec, data = _resolve(name_or_pair)
    design = build_design(spec, data)
    all_stages = [*names, *CHECK_STAGES]
    keys: dict[str, str] = {}
    for engine_name in names:
        key = engine_key(get_engine(engine_name), design, spec, settings, seed).key
        if key is None:
            return all_stages
        keys[engine_name] = key
    missing = [n for n in names if not store.path(n, keys[n], ".json").is_file()]
    pairs = [
        p
        for p in comparison_pairs(names)
        if get_engine(p[0]).kind == FREQUENTIST and get_engine(p[1]).kind == BAYESIAN
    ]
    for pair in pairs:
        stage = _compare_stage(pair, pairs[0])
        keys[stage] = _compare_key({n: keys[n] for n in pair})[1]
        if not store.path("compare", keys[stage], ".json").is_file() and "compare" not in missing:
            missing.append("compare")
    for pair in comparison_pairs(names):
        if all(get_engine(n).kind == BAYESIAN for n in pair):
            bkey = _compare_key({n: keys[n] for n in pair})[1]
            if not store.path("compare", bkey, ".json").is_file() and "compare" not in missing:
                missing.append("compare")
    keys["same_model"] = _same_model_key(keys[REFERENCE])[1]
    if not store.path("same_model", keys["same_model"], ".json").is_file():
        missing.append("same_model")
    if _identity_wanted(names) and spec.parameterization == "offsets":
        ikey = _same_model_bayes_key({n: keys[n] for n in IDENTITY_PAIR})[1]
        if not store.path("same_model_bayes", ikey, ".json").is_file():
            missing.append("same_model_bayes")
    if render is not None:
        figures = _figures_key(name, keys, render)[1]
        if not store.path("figures", figures, ".json").is_file():
            missing.append("figures")
    return missing


def _reference_side_wanted(
    store: FitCache,
    design: Design,
    spec: ModelSpec,
    settings: FitSettings,
    seed: int,
    redo: frozenset[str],
) -> bool:
    """Whether a side process should fit lme4: it is not cached, R is there, a core is free."""
    from harness.engines.samplers import available_cores

    if available_cores() < 2 or not r_ready_cheap():
        return False  # the serial path raises the clear error
    key = engine_key(get_engine(REFERENCE), design, spec, settings, seed).key
    if key is None:
        return False
    if redo & {REFERENCE, "same_model"}:
        return True
    return not store.path(REFERENCE, key, ".json").is_file()


def fit_design(
    name_or_pair: str | tuple[ModelSpec, pd.DataFrame],
    *,
    seed: int = 1,
    cache_dir: str | os.PathLike[str] | None = None,
    refit: bool | Collection[str] = False,
    settings: FitSettings | None = None,
    render: Callable[[DesignResult], dict[str, Any]] | None = None,
    side_process: bool = False,
    engines: Sequence[str] | None = None,
) -> DesignResult:
    """Fit a design with every engine (or load the fits from the cache) and compare them.

    Parameters
    ----------
    name_or_pair : str or (ModelSpec, DataFrame)
        A shipped design name (see ``harness.datasets.DATASETS``) or your own
        spec and data.
    seed : int
        Seed of the Bayesian engines.  A new seed refits those only.
    cache_dir : path, optional
        Cache folder; default ``$HARNESS_CACHE_DIR``, else the user's cache folder
        (``platformdirs.user_cache_dir("harness")``).
    refit : bool or collection of str
        Ignore cached entries (and overwrite them): all of them, or those of
        the named stages (engine names and :data:`CHECK_STAGES`; a worker
        that refitted both engines asks for ``{"compare", "same_model",
        "figures"}`` next).
    settings : FitSettings, optional
        Sampler and lme4 settings; default :class:`FitSettings()`.
    render : callable, optional
        Draws the report's figures from the result (the report passes
        :func:`harness.report.page.render_figures`); they are cached like the
        fits.  The pipeline never imports report code: without ``render``,
        ``result.figures`` stays None and a report draws them when it writes.
    side_process : bool
        When lme4 must be fitted and a second core is free, fit it (and run
        the same-model check) in a spawned process while this one compiles
        and samples the Bayesian models; the command line does this.  Errors of
        that side are raised here as in the serial order.
    engines : sequence of str, optional
        Registered engine names (:mod:`harness.engines.registry`); default
        ``("lme4", "pymc")``.  The reference, lme4, must be among them.

    Returns
    -------
    DesignResult
    """
    names = resolve_engines(engines)
    settings = settings or FitSettings()
    redo = _refit_set(refit, names)
    store = FitCache(resolve_cache_dir(cache_dir))
    name, description, spec, data = _resolve(name_or_pair)
    design = build_design(spec, data)
    timings: dict[str, float] = {}
    cached: dict[str, bool] = {}
    keys: dict[str, str] = {}
    fits: dict[str, Fit] = {}
    draws: dict[str, Path] = {}

    progress.set_design(name)
    side = None
    if side_process and _reference_side_wanted(store, design, spec, settings, seed, redo):
        from harness.pipeline import side_process as side_module

        side = side_module.start(
            fit_stages,
            name_or_pair,
            (REFERENCE, "same_model"),
            seed=seed,
            cache_dir=store.root,
            refit=bool(redo & {REFERENCE, "same_model"}),
            settings=settings,
        )
        redo = redo - {REFERENCE, "same_model"}  # refitted over there

    def engine_stage(engine_name: str, aside: dict[str, float] | None = None) -> None:
        """Fit (or load) one engine; ``aside``: the seconds of a side process that fitted it."""
        engine = get_engine(engine_name)
        with progress.stage(engine.stage_name) as stage:  # compile and sampling report inside
            (fit, key, hit, path), seconds = _timed(
                lambda: _fit_engine_cached(
                    store, engine, design, spec, data, settings, seed, engine_name in redo
                )
            )
            stage.detail = "cached" if hit else ""
            if aside is not None:
                hit, seconds = False, aside.get(engine_name, seconds)  # fitted just now, aside
                stage.detail = "fitted in a second process"
        fits[engine_name], keys[engine_name], cached[engine_name] = fit, key, hit
        timings[f"{engine_name}_load"] = seconds
        if path is not None:
            draws[engine_name] = path

    # With a side process the reference is fitted over there while the others run here.
    if side is not None:
        try:
            for engine_name in names[1:]:
                engine_stage(engine_name)
        except BaseException:
            side.abandon()
            raise
        with progress.stage("waiting for the R fit"):
            side_seconds = side.result()
        engine_stage(REFERENCE, side_seconds)
    else:
        for engine_name in names:
            engine_stage(engine_name)
    fits = {n: fits[n] for n in names}  # the reference first, then the order asked
    for engine_name, fit in fits.items():
        if isinstance(fit, FreqFit):
            timings[f"{engine_name}_fit"] = float(fit.fit_seconds)
        else:
            timings[f"{engine_name}_compile"] = float(fit.compile_seconds)
            timings[f"{engine_name}_sample"] = float(fit.sample_seconds)
    freq = fits[REFERENCE]
    if not isinstance(freq, FreqFit):
        raise TypeError(f"the reference engine {REFERENCE!r} returned a {type(freq).__name__}")

    result = DesignResult(
        name=name,
        description=description,
        spec=spec,
        data=data,
        design=design,
        fits=fits,
        comparisons={},
        same_model=None,
        same_model_status="",
        seed=seed,
        settings=settings,
        timings=timings,
        cached=cached,
        keys=keys,
        versions={**python_versions(), **freq.versions},
        _idata_paths=draws,
    )
    # The same-model check first: when lme4 stopped short of its maximum, the refits it made
    # (one from the harness's own optimum) give the comparison its lme4_optimizer source.
    with progress.stage("same-model check"):
        sm, status, sm_key, cached["same_model"], timings["same_model"] = _same_model_cached(
            store, spec, data, freq, keys[REFERENCE], "same_model" in redo
        )
    result.same_model, result.same_model_status = sm, status
    if sm_key:
        keys["same_model"] = sm_key
    result.freq = _with_refits(freq, sm)
    pairs = [p for p in comparison_pairs(names) if _comparable(result, p)]
    for pair in comparison_pairs(names):
        if pair not in pairs:
            log.warning("%s: no comparison of %s with %s yet", name, *pair)
    if _identity_wanted(names):
        with progress.stage("same-model check PyMC / brms"):
            (
                result.same_model_bayes,
                result.same_model_bayes_status,
                ikey,
                cached["same_model_bayes"],
                timings["same_model_bayes"],
            ) = _same_model_bayes_cached(
                store,
                design,
                {n: keys[n] for n in IDENTITY_PAIR},
                "same_model_bayes" in redo,
            )
        if ikey:
            keys["same_model_bayes"] = ikey
    main = pairs[0] if pairs else None  # the reference pairs come first
    for pair in pairs:
        stage = _compare_stage(pair, main)
        first, second = pair
        label = "compare" if stage == "compare" else f"compare {first} / {second}"
        if isinstance(result.fit_info(first), BayesFit):
            with progress.stage(label):
                bayes_cmp, keys[stage], cached[stage], timings[stage] = _compare_bayes_cached(
                    store,
                    pair,
                    (
                        functools.partial(_bayes_fit, result, first),
                        functools.partial(_bayes_fit, result, second),
                    ),
                    {n: keys[n] for n in pair},
                    "compare" in redo,
                )
            result.comparisons[pair] = bayes_cmp
            continue
        with progress.stage(label):
            comparison, keys[stage], cached[stage], timings[stage] = _compare_cached(
                store,
                pair,
                cast(FreqFit, result.fit_info(first)),  # _comparable checked the kinds
                functools.partial(_bayes_fit, result, second),
                cast(BayesFit, result.fit_info(second)),
                {n: keys[n] for n in pair},
                "compare" in redo,
            )
        result.comparisons[pair] = comparison
    if render is not None:
        fparts, fkey = _figures_key(name, keys, render)
        keys["figures"] = fkey
        fshape = {"figures": _check_figures, "seconds": (float, int)}
        hit = None if "figures" in redo else store.load("figures", fkey, fparts, shape=fshape)
        if hit is not None:
            result.figures, cached["figures"], timings["figures"] = (
                hit[0]["figures"],
                True,
                hit[0]["seconds"],
            )
        else:
            with progress.stage("figures"):
                result.figures, timings["figures"] = _timed(lambda: render(result))
            cached["figures"] = False
            store.store(
                "figures",
                fkey,
                {"figures": result.figures, "seconds": timings["figures"]},
                fparts,
                {"seconds": timings["figures"]},
            )
    return result
