"""Compose the stages for one design: fit both engines, compare, check, report.

Every expensive product is cached on disk under a hash of what produced it,
so re-rendering a report never refits:

========== ===================================================================
lme4       data hash, spec key, lme4 settings, R/lme4/nlme versions, R + bridge code
pymc       data hash, spec key, sampler settings, seed, PyMC/PyTensor/nutpie versions, model code
same_model the lme4 key, the PyMC versions, ``harness/checks/same_model.py``
compare    the lme4 and PyMC keys, ``compare.py`` and ``align.py``
figures    the compare and same-model keys, ``plots.py``, ``report_tables.py``, ``report.py``
========== ===================================================================

A changed seed therefore refits only PyMC; a changed spec or data refits
both.  On a cache hit nothing imports rpy2, starts R, or compiles a model:
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
import hashlib
import logging
import os
import time
import warnings
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from harness import progress
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
from harness.versions import python_versions, r_ready_cheap, r_versions_cheap

if TYPE_CHECKING:
    from harness.checks.compare import Comparison
    from harness.engines.lme4 import FreqFit
    from harness.engines.pymc import BayesFit

log = logging.getLogger("harness")

#: The designs ``harness report all`` writes, in index order.
REPORT_DESIGNS = ("cafe", "sleepstudy", "partially_clustered", "partially_clustered_hetero", "cbpp")

_PACKAGE = Path(__file__).resolve().parents[1]  # the harness package folder


@dataclass
class DesignResult:
    """Everything a report shows about one design.

    ``bayes.idata`` is read from the cache on first access of :attr:`bayes`
    (reports built from cached figures never need it, which keeps warm runs
    fast).  ``comparison.bayes`` is the same object.
    """

    name: str
    description: str
    spec: ModelSpec
    data: pd.DataFrame
    design: Design
    freq: FreqFit
    comparison: Comparison
    same_model: Any | None
    same_model_status: str
    seed: int
    settings: FitSettings
    timings: dict[str, float]
    cached: dict[str, bool]
    keys: dict[str, str]
    versions: dict[str, str]
    figures: dict[str, Any] | None = None
    _bayes: BayesFit | None = field(default=None, repr=False)
    _idata_path: Path | None = field(default=None, repr=False)

    @property
    def bayes(self) -> BayesFit:
        """The PyMC fit, with its InferenceData loaded."""
        fit = self._bayes
        if fit is None:
            raise ValueError(f"design {self.name!r} has no PyMC fit")
        if fit.idata is None and self._idata_path is not None:
            fit.idata = _load_idata(self._idata_path)
        return fit

    @property
    def bayes_info(self) -> BayesFit:
        """The PyMC fit without forcing its InferenceData to load (settings, code, versions)."""
        if self._bayes is None:
            raise ValueError(f"design {self.name!r} has no PyMC fit")
        return self._bayes

    @property
    def verdict(self) -> str:
        """Worst verdict of the comparison; ``fail`` when the same-model check failed.

        A same-model check that crashed or is unavailable gives ``incomplete``
        (unless the comparison already fails or is unreliable): a check the
        verdict needs did not run, so the verdict cannot be "pass".
        """
        verdict = self.comparison.verdict
        if self.same_model is None:
            return verdict if verdict in ("fail", "unreliable") else "incomplete"
        if not bool(getattr(self.same_model, "ok", True)):
            return "fail"
        return verdict


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


def _lme4_key_parts(design: Design, spec: ModelSpec, settings: FitSettings) -> dict[str, Any]:
    return {
        "format": CACHE_FORMAT,
        "kind": "lme4",
        "data": design.data_hash(),
        "spec": spec.key(),
        "settings": settings.lme4_part(),
        "code": _source_hash("model", "engines/lme4.py", "r_scripts"),
    }


def _pymc_key_parts(
    design: Design, spec: ModelSpec, settings: FitSettings, seed: int
) -> dict[str, Any]:
    py = python_versions()
    return {
        "format": CACHE_FORMAT,
        "kind": "pymc",
        "data": design.data_hash(),
        "spec": spec.key(),
        "settings": settings.pymc_part(),
        "seed": int(seed),
        "versions": {k: py[k] for k in _PY_PACKAGES},
        "code": _source_hash(
            "model", "engines/pymc.py", "engines/adaptive.py", "engines/samplers.py"
        ),
    }


def _same_model_key_parts(lme4_key: str) -> dict[str, Any]:
    py = python_versions()
    return {
        "format": CACHE_FORMAT,
        "kind": "same_model",
        "lme4": lme4_key,
        "versions": {k: py[k] for k in _PY_PACKAGES},
        "code": _source_hash("model", "engines", "checks", "r_scripts"),
    }


def _compare_key_parts(lme4_key: str, pymc_key: str) -> dict[str, Any]:
    return {
        "format": CACHE_FORMAT,
        "kind": "compare",
        "lme4": lme4_key,
        "pymc": pymc_key,
        "code": _source_hash("model", "engines", "checks"),
    }


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


def _fit_lme4_cached(
    store: FitCache,
    design: Design,
    spec: ModelSpec,
    data: pd.DataFrame,
    settings: FitSettings,
    refit: bool,
) -> tuple[FreqFit, str, bool, dict[str, str]]:
    parts = _lme4_key_parts(design, spec, settings)
    partial = _digest(parts)
    context = {"spec": spec, "design": design}
    r_versions = r_versions_cheap()
    if r_versions is None:
        key = None if refit else store.latest_for("lme4", partial)
        if key is not None:
            log.warning("R is not available; using the cached lme4 fit %s", key)
            # Checked against every key part but the R versions, which only R could tell.
            hit = store.load("lme4", key, parts, shape=_freq_class(), context=context)
            if hit is not None:
                freq = hit[0]
                return freq, key, True, dict(freq.versions)
        # No R and nothing cached: let the engine raise its own clear error.
        r_versions = {"R": "unavailable"}
    full_parts = {**parts, "versions": r_versions}
    key = _digest(full_parts)
    if not refit:
        hit = store.load("lme4", key, full_parts, shape=_freq_class(), context=context)
        if hit is not None:
            log.info("%s: lme4 fit loaded from cache (%s)", spec.name or spec.formula, key)
            return hit[0], key, True, r_versions
    from harness.engines.lme4 import fit_lme4

    freq = fit_lme4(
        spec,
        data,
        profile=settings.profile,
        n_sims=settings.n_sims,
        seed=settings.lme4_seed,
        design=design,
    )
    if store.store(
        "lme4", key, freq, full_parts, {"fit_seconds": freq.fit_seconds}, context=context
    ):
        store.set_latest("lme4", partial, key)
    return freq, key, False, r_versions


def _fit_pymc_cached(
    store: FitCache,
    design: Design,
    spec: ModelSpec,
    data: pd.DataFrame,
    settings: FitSettings,
    seed: int,
    refit: bool,
) -> tuple[BayesFit, Path, str, bool]:
    parts = _pymc_key_parts(design, spec, settings, seed)
    key = _digest(parts)
    nc_path = store.path("pymc", key, ".nc")
    context = {"spec": spec, "design": design}
    if not refit:
        hit = store.load("pymc", key, parts, shape=_bayes_class(), context=context, files=(".nc",))
        if hit is not None:
            log.info("%s: PyMC fit loaded from cache (%s)", spec.name or spec.formula, key)
            return hit[0], nc_path, key, True
    from harness.engines.pymc import fit_pymc

    bayes = fit_pymc(
        spec,
        data,
        seed=seed,
        draws=settings.draws,
        tune=settings.tune,
        chains=settings.chains,
        sampler=settings.sampler,
        target_accept=settings.target_accept,
        design=design,
        adaptive=settings.adaptive_settings(),
    )
    store.store(
        "pymc",
        key,
        dataclasses.replace(bayes, idata=None),
        parts,
        {"compile_seconds": bayes.compile_seconds, "sample_seconds": bayes.sample_seconds},
        context=context,
        files={".nc": lambda tmp: bayes.idata.to_netcdf(str(tmp))},
    )
    return bayes, nc_path, key, False


def _same_model_cached(
    store: FitCache,
    spec: ModelSpec,
    data: pd.DataFrame,
    freq: FreqFit,
    lme4_key: str,
    refit: bool,
) -> tuple[Any | None, str, str | None, bool, float]:
    """(result, status line, key, cached, seconds); never a fake pass."""
    parts = _same_model_key_parts(lme4_key)
    key = _digest(parts)
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
    freq: FreqFit,
    bayes_loader: Callable[[], BayesFit],
    bayes_info: BayesFit,
    lme4_key: str,
    pymc_key: str,
    refit: bool,
) -> tuple[Comparison, str, bool, float]:
    parts = _compare_key_parts(lme4_key, pymc_key)
    key = _digest(parts)
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
        comparison, seconds = _timed(lambda: compare(freq, bayes_loader()))
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


def figures_key_parts(
    result: DesignResult, render: Callable[[DesignResult], Any] | None = None
) -> dict[str, Any]:
    """What a design's rendered figures depend on: the fits, the renderer and its package."""
    return _figures_key_parts(result.name, result.keys, render)


def _figures_key_parts(
    name: str, keys: dict[str, str], render: Callable[..., Any] | None
) -> dict[str, Any]:
    renderer = f"{render.__module__}.{render.__qualname__}" if render is not None else None
    return {
        "format": CACHE_FORMAT,
        "kind": "figures",
        "compare": keys.get("compare"),
        "same_model": keys.get("same_model"),
        "name": name,
        "renderer": renderer,
        "code": _source_hash("report"),
    }


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


def _freq_class() -> type:
    from harness.engines.lme4 import FreqFit

    return FreqFit


def _bayes_class() -> type:
    from harness.engines.pymc import BayesFit

    return BayesFit


#: The cached stages of one design, in the order :func:`fit_design` runs them.
STAGES = ("lme4", "pymc", "compare", "same_model", "figures")


def _refit_set(refit: bool | Collection[str]) -> frozenset[str]:
    """``refit`` as the set of stages to recompute (True: all, False: none)."""
    if isinstance(refit, bool):
        return frozenset(STAGES) if refit else frozenset()
    unknown = sorted(set(refit) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown stages to refit {unknown}; choose from {list(STAGES)}")
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

    ``"lme4"`` fits lme4 (R); ``"same_model"`` also needs only the lme4 fit;
    ``"pymc"`` compiles and samples without starting R.  A later
    :func:`fit_design` with the same arguments loads what these stored.

    Parameters
    ----------
    name_or_pair : str or (ModelSpec, DataFrame)
        As for :func:`fit_design`.
    stages : collection of str
        Some of ``"lme4"``, ``"same_model"``, ``"pymc"``.
    seed, cache_dir, refit, settings
        As for :func:`fit_design`.

    Returns
    -------
    dict
        Seconds per stage run (0 for a cache hit is not reported: a hit's own
        recorded seconds are).
    """
    unknown = sorted(set(stages) - {"lme4", "same_model", "pymc"})
    if unknown:
        raise ValueError(f"fit_stages runs lme4, same_model and pymc, not {unknown}")
    settings = settings or FitSettings()
    store = FitCache(resolve_cache_dir(cache_dir))
    name, _, spec, data = _resolve(name_or_pair)
    design = build_design(spec, data)
    progress.set_design(name)
    seconds: dict[str, float] = {}
    if "lme4" in stages or "same_model" in stages:
        with progress.stage("R fit (lme4)") as stage:
            (freq, lme4_key, hit, _), seconds["lme4"] = _timed(
                lambda: _fit_lme4_cached(store, design, spec, data, settings, refit)
            )
            stage.detail = "cached" if hit else ""
        if "same_model" in stages:
            with progress.stage("same-model check"):
                *_, seconds["same_model"] = _same_model_cached(
                    store, spec, data, freq, lme4_key, refit
                )
    if "pymc" in stages:
        with progress.stage("PyMC fit") as stage:
            (*_, hit), seconds["pymc"] = _timed(
                lambda: _fit_pymc_cached(store, design, spec, data, settings, seed, refit)
            )
            stage.detail = "cached" if hit else ""
    return seconds


def missing_stages(
    name_or_pair: str | tuple[ModelSpec, pd.DataFrame],
    *,
    seed: int = 1,
    cache_dir: str | os.PathLike[str] | None = None,
    settings: FitSettings | None = None,
    render: Callable[[DesignResult], Any] | None = None,
) -> list[str]:
    """The stages of :func:`fit_design` that have no cache entry yet (nothing is fitted).

    Keys are computed as :func:`fit_design` computes them; an entry that is
    present but damaged counts as present (the run that loads it refits it).
    Without R the lme4 key cannot be known and every stage counts as missing.
    """
    settings = settings or FitSettings()
    store = FitCache(resolve_cache_dir(cache_dir))
    name, _, spec, data = _resolve(name_or_pair)
    design = build_design(spec, data)
    r_versions = r_versions_cheap()
    if r_versions is None:
        return list(STAGES)
    keys = {
        "lme4": _digest({**_lme4_key_parts(design, spec, settings), "versions": r_versions}),
        "pymc": _digest(_pymc_key_parts(design, spec, settings, seed)),
    }
    keys["compare"] = _digest(_compare_key_parts(keys["lme4"], keys["pymc"]))
    keys["same_model"] = _digest(_same_model_key_parts(keys["lme4"]))
    missing = [
        stage for stage in STAGES[:-1] if not store.path(stage, keys[stage], ".json").is_file()
    ]
    if render is not None:
        figures = _digest(_figures_key_parts(name, keys, render))
        if not store.path("figures", figures, ".json").is_file():
            missing.append("figures")
    return missing


def _lme4_side_wanted(
    store: FitCache, design: Design, spec: ModelSpec, settings: FitSettings, redo: frozenset[str]
) -> bool:
    """Whether a side process should fit lme4: it is not cached, R is there, a core is free."""
    from harness.engines.samplers import available_cores

    if available_cores() < 2 or not r_ready_cheap():
        return False  # the serial path raises the clear error
    r_versions = r_versions_cheap()  # read (and cached) by r_ready_cheap already
    if r_versions is None:
        return False
    if redo & {"lme4", "same_model"}:
        return True
    key = _digest({**_lme4_key_parts(design, spec, settings), "versions": r_versions})
    return not store.path("lme4", key, ".json").is_file()


def fit_design(
    name_or_pair: str | tuple[ModelSpec, pd.DataFrame],
    *,
    seed: int = 1,
    cache_dir: str | os.PathLike[str] | None = None,
    refit: bool | Collection[str] = False,
    settings: FitSettings | None = None,
    render: Callable[[DesignResult], dict[str, Any]] | None = None,
    side_process: bool = False,
) -> DesignResult:
    """Fit a design with both engines (or load the fits from the cache) and compare them.

    Parameters
    ----------
    name_or_pair : str or (ModelSpec, DataFrame)
        A shipped design name (see ``harness.datasets.DATASETS``) or your own
        spec and data.
    seed : int
        PyMC seed.  A new seed refits PyMC only.
    cache_dir : path, optional
        Cache folder; default ``$HARNESS_CACHE_DIR``, else the user's cache folder
        (``platformdirs.user_cache_dir("harness")``).
    refit : bool or collection of str
        Ignore cached entries (and overwrite them): all of them, or those of
        the named :data:`STAGES` (a worker that refitted both engines asks
        for ``{"compare", "same_model", "figures"}`` next).
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
        and samples the PyMC model; the command line does this.  Errors of
        that side are raised here as in the serial order.

    Returns
    -------
    DesignResult
    """
    settings = settings or FitSettings()
    redo = _refit_set(refit)
    store = FitCache(resolve_cache_dir(cache_dir))
    name, description, spec, data = _resolve(name_or_pair)
    design = build_design(spec, data)
    timings: dict[str, float] = {}
    cached: dict[str, bool] = {}
    keys: dict[str, str] = {}

    progress.set_design(name)
    side = None
    if side_process and _lme4_side_wanted(store, design, spec, settings, redo):
        from harness.pipeline import side_process as side_module

        side = side_module.start(
            fit_stages,
            name_or_pair,
            ("lme4", "same_model"),
            seed=seed,
            cache_dir=store.root,
            refit=bool(redo & {"lme4", "same_model"}),
            settings=settings,
        )
        redo = redo - {"lme4", "same_model"}  # refitted over there

    def pymc_stage() -> tuple[BayesFit, Path]:
        with progress.stage("PyMC fit") as stage:  # compile and sampling report inside
            (fit, path, keys["pymc"], cached["pymc"]), timings["pymc_load"] = _timed(
                lambda: _fit_pymc_cached(store, design, spec, data, settings, seed, "pymc" in redo)
            )
            stage.detail = "cached" if cached["pymc"] else ""
        return fit, path

    if side is not None:
        try:
            bayes, nc_path = pymc_stage()
        except BaseException:
            side.abandon()
            raise
        with progress.stage("waiting for the R fit"):
            side_seconds = side.result()
    with progress.stage("R fit (lme4)") as stage:
        (freq, keys["lme4"], cached["lme4"], _), timings["lme4_load"] = _timed(
            lambda: _fit_lme4_cached(store, design, spec, data, settings, "lme4" in redo)
        )
        stage.detail = "cached" if cached["lme4"] else ""
        if side is not None:
            cached["lme4"] = False  # fitted just now, in the side process
            timings["lme4_load"] = side_seconds.get("lme4", timings["lme4_load"])
            stage.detail = "fitted in a second process"
    timings["lme4_fit"] = float(freq.fit_seconds)
    if side is None:
        bayes, nc_path = pymc_stage()
    timings["pymc_compile"] = float(bayes.compile_seconds)
    timings["pymc_sample"] = float(bayes.sample_seconds)

    result = DesignResult(
        name=name,
        description=description,
        spec=spec,
        data=data,
        design=design,
        freq=freq,
        comparison=None,  # type: ignore[arg-type]  # filled in just below
        same_model=None,
        same_model_status="",
        seed=seed,
        settings=settings,
        timings=timings,
        cached=cached,
        keys=keys,
        versions={**python_versions(), **freq.versions},
        _bayes=bayes,
        _idata_path=nc_path,
    )
    # The same-model check first: when lme4 stopped short of its maximum, the refits it made
    # (one from the harness's own optimum) give the comparison its lme4_optimizer source.
    with progress.stage("same-model check"):
        sm, status, sm_key, cached["same_model"], timings["same_model"] = _same_model_cached(
            store, spec, data, freq, keys["lme4"], "same_model" in redo
        )
    result.same_model, result.same_model_status = sm, status
    if sm_key:
        keys["same_model"] = sm_key
    result.freq = freq = _with_refits(freq, sm)
    with progress.stage("compare"):
        comparison, keys["compare"], cached["compare"], timings["compare"] = _compare_cached(
            store,
            freq,
            lambda: result.bayes,
            bayes,
            keys["lme4"],
            keys["pymc"],
            "compare" in redo,
        )
    result.comparison = comparison
    if render is not None:
        fparts = figures_key_parts(result, render)
        fkey = _digest(fparts)
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
