"""Compose the stages for one design: fit both engines, compare, check, report.

Every expensive product is cached on disk under a hash of what produced it,
so re-rendering a report never refits:

========== ===================================================================
lme4       data hash, spec key, lme4 settings, R/lme4/nlme versions, R + bridge code
pymc       data hash, spec key, sampler settings, seed, PyMC/PyTensor/nutpie versions, model code
same_model the lme4 key, the PyMC versions, ``harness/same_model.py``
compare    the lme4 and PyMC keys, ``compare.py`` and ``align.py``
figures    the compare and same-model keys, ``plots.py``, ``report_tables.py``, ``report.py``
========== ===================================================================

A changed seed therefore refits only PyMC; a changed spec or data refits
both.  On a cache hit nothing imports rpy2, starts R, or compiles a model:
the R versions in the lme4 key come from one ``Rscript`` call (or, without
R, from the newest cached fit of the same data, spec and settings).

The cache (:mod:`harness.cache`) lives in ``$HARNESS_CACHE_DIR``, else the
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
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from harness import progress
from harness.cache import (
    CACHE_FORMAT,
    FitCache,
    check_shape,
    resolve_cache_dir,
)
from harness.cache import digest as _digest
from harness.cache import load_idata as _load_idata
from harness.spec import Design, ModelSpec, build_design
from harness.versions import PY_PACKAGES as _PY_PACKAGES
from harness.versions import python_versions, r_versions_cheap

if TYPE_CHECKING:
    import argparse

    from harness.compare import Comparison
    from harness.engines.lme4 import FreqFit
    from harness.engines.pymc import BayesFit

log = logging.getLogger("harness")

#: The designs ``harness report all`` writes, in index order.
REPORT_DESIGNS = ("cafe", "sleepstudy", "partially_clustered", "partially_clustered_hetero", "cbpp")

_PACKAGE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class FitSettings:
    """Engine settings that enter the cache keys.

    Parameters
    ----------
    draws, tune, chains : int
        PyMC draws and tuning steps per chain, and the number of chains.
    sampler : str
        ``"nutpie"``, ``"pymc"`` or ``"numpyro"``.
    target_accept : float
    profile : bool
        Profile-likelihood intervals for lme4's variance components.
    n_sims : int
        ``merTools::REsim`` draws (0 skips them).
    lme4_seed : int
        Seed of REsim; fixed so that a new PyMC seed leaves the lme4 fit cached.
    adaptive : bool
        Sample in rounds until the diagnostics hold (:mod:`harness.engines.adaptive`).
    max_rounds, max_draws, max_seconds
        The adaptive budget (:class:`harness.engines.adaptive.AdaptiveSettings`):
        sampler runs, post-warm-up draws over all runs (None: four times the
        first run's), wall seconds.
    """

    draws: int = 1000
    tune: int = 1000
    chains: int = 4
    sampler: str = "nutpie"
    target_accept: float = 0.9
    profile: bool = True
    n_sims: int = 1000
    lme4_seed: int = 1
    adaptive: bool = True
    max_rounds: int = 4
    max_draws: int | None = None
    max_seconds: float = 300.0

    def adaptive_settings(self) -> Any:
        """``AdaptiveSettings`` for :func:`harness.engines.pymc.fit_pymc`, or False."""
        if not self.adaptive:
            return False
        from harness.engines.adaptive import AdaptiveSettings

        return AdaptiveSettings(
            max_rounds=self.max_rounds, max_draws=self.max_draws, max_seconds=self.max_seconds
        )

    def lme4_part(self) -> dict[str, Any]:
        return {"profile": self.profile, "n_sims": self.n_sims, "lme4_seed": self.lme4_seed}

    def pymc_part(self) -> dict[str, Any]:
        return {
            "draws": self.draws,
            "tune": self.tune,
            "chains": self.chains,
            "sampler": self.sampler,
            "target_accept": self.target_accept,
            "adaptive": self.adaptive,
            "max_rounds": self.max_rounds,
            "max_draws": self.max_draws,
            "max_seconds": self.max_seconds,
        }


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
        """Worst verdict of the comparison, or ``fail`` when the same-model check failed."""
        verdict = self.comparison.verdict
        if self.same_model is not None and not bool(getattr(self.same_model, "ok", True)):
            return "fail"
        return verdict


# --------------------------------------------------------------------------- keys and versions


@cache
def _source_hash(*relative: str) -> str:
    """Hash of harness source files (a change in the code that produced a result invalidates it)."""
    h = hashlib.sha256()
    for rel in relative:
        path = _PACKAGE / rel
        if not path.is_file():
            path = _PACKAGE.parent / rel
        h.update(rel.encode())
        h.update(path.read_bytes() if path.is_file() else b"<missing>")
    return h.hexdigest()[:16]


def _lme4_key_parts(design: Design, spec: ModelSpec, settings: FitSettings) -> dict[str, Any]:
    return {
        "format": CACHE_FORMAT,
        "kind": "lme4",
        "data": design.data_hash(),
        "spec": spec.key(),
        "settings": settings.lme4_part(),
        "code": _source_hash(
            "engines/lme4.py", "spec.py", "r_scripts/fit.R", "r_scripts/glmm.R", "family.py"
        ),
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
            "engines/pymc.py", "engines/adaptive.py", "priors.py", "spec.py", "family.py"
        ),
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
    source = _PACKAGE / "same_model.py"
    if not source.is_file():
        return (
            None,
            "same-model check not available (harness.same_model is not installed)",
            None,
            False,
            0.0,
        )
    py = python_versions()
    parts = {
        "format": CACHE_FORMAT,
        "kind": "same_model",
        "lme4": lme4_key,
        "versions": {k: py[k] for k in _PY_PACKAGES},
        "code": _source_hash(
            "same_model.py",
            "marginal.py",
            "engines/pymc.py",
            "priors.py",
            "spec.py",
            "same_model_glmm.py",
            "laplace.py",
            "family.py",
        ),
    }
    key = _digest(parts)
    if not refit:
        from harness.same_model import SameModel

        shape = {"result": SameModel, "status": str, "seconds": (float, int)}
        hit = store.load("same_model", key, parts, shape=shape)
        if hit is not None:
            value = hit[0]
            return value["result"], value["status"], key, True, value["seconds"]
    try:
        from harness.same_model import same_model
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


def _compare_cached(
    store: FitCache,
    freq: FreqFit,
    bayes_loader: Callable[[], BayesFit],
    bayes_info: BayesFit,
    lme4_key: str,
    pymc_key: str,
    refit: bool,
) -> tuple[Comparison, str, bool, float]:
    parts = {
        "format": CACHE_FORMAT,
        "kind": "compare",
        "lme4": lme4_key,
        "pymc": pymc_key,
        "code": _source_hash(
            "compare.py", "align.py", "attribution.py", "compare_glmm.py", "laplace.py"
        ),
    }
    key = _digest(parts)
    # The fits are the runner's own: the entry refers to them instead of storing them again.
    context = {"freq": freq, "bayes": bayes_info}
    if not refit:
        from harness.compare import Comparison

        shape = {"comparison": Comparison, "seconds": (float, int)}
        hit = store.load("compare", key, parts, shape=shape, context=context)
        if hit is not None:
            return hit[0]["comparison"], key, True, hit[0]["seconds"]
    from harness.compare import compare

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


def figures_key_parts(result: DesignResult) -> dict[str, Any]:
    """What a design's rendered figures depend on."""
    return {
        "format": CACHE_FORMAT,
        "kind": "figures",
        "compare": result.keys.get("compare"),
        "same_model": result.keys.get("same_model"),
        "name": result.name,
        "code": _source_hash("plots.py", "report_tables.py", "report.py", "report_glmm.py"),
    }


def figures_key(result: DesignResult) -> str:
    """Cache key of a design's rendered figures."""
    return _digest(figures_key_parts(result))


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


def fit_design(
    name_or_pair: str | tuple[ModelSpec, pd.DataFrame],
    *,
    seed: int = 1,
    cache_dir: str | os.PathLike[str] | None = None,
    refit: bool = False,
    settings: FitSettings | None = None,
    figures: bool = True,
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
    refit : bool
        Ignore cached entries (and overwrite them).
    settings : FitSettings, optional
        Sampler and lme4 settings; default :class:`FitSettings()`.
    figures : bool
        Also render (or load) the report's figures, cached like the fits.

    Returns
    -------
    DesignResult
    """
    settings = settings or FitSettings()
    store = FitCache(resolve_cache_dir(cache_dir))
    name, description, spec, data = _resolve(name_or_pair)
    design = build_design(spec, data)
    timings: dict[str, float] = {}
    cached: dict[str, bool] = {}
    keys: dict[str, str] = {}

    progress.set_design(name)
    with progress.stage("R fit (lme4)") as stage:
        (freq, keys["lme4"], cached["lme4"], _), timings["lme4_load"] = _timed(
            lambda: _fit_lme4_cached(store, design, spec, data, settings, refit)
        )
        stage.detail = "cached" if cached["lme4"] else ""
    timings["lme4_fit"] = float(freq.fit_seconds)
    with progress.stage("PyMC fit") as stage:  # compile and sampling report inside
        (bayes, nc_path, keys["pymc"], cached["pymc"]), timings["pymc_load"] = _timed(
            lambda: _fit_pymc_cached(store, design, spec, data, settings, seed, refit)
        )
        stage.detail = "cached" if cached["pymc"] else ""
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
    with progress.stage("compare"):
        comparison, keys["compare"], cached["compare"], timings["compare"] = _compare_cached(
            store, freq, lambda: result.bayes, bayes, keys["lme4"], keys["pymc"], refit
        )
    result.comparison = comparison
    with progress.stage("same-model check"):
        sm, status, sm_key, cached["same_model"], timings["same_model"] = _same_model_cached(
            store, spec, data, freq, keys["lme4"], refit
        )
    result.same_model, result.same_model_status = sm, status
    if sm_key:
        keys["same_model"] = sm_key
    if figures:
        fparts = figures_key_parts(result)
        fkey = _digest(fparts)
        keys["figures"] = fkey
        fshape = {"figures": _check_figures, "seconds": (float, int)}
        hit = None if refit else store.load("figures", fkey, fparts, shape=fshape)
        if hit is not None:
            result.figures, cached["figures"], timings["figures"] = (
                hit[0]["figures"],
                True,
                hit[0]["seconds"],
            )
        else:
            from harness.report import render_figures

            with progress.stage("figures"):
                result.figures, timings["figures"] = _timed(lambda: render_figures(result))
            cached["figures"] = False
            store.store(
                "figures",
                fkey,
                {"figures": result.figures, "seconds": timings["figures"]},
                fparts,
                {"seconds": timings["figures"]},
            )
    return result


# --------------------------------------------------------------------------- command line


def settings_from_args(args: argparse.Namespace, base: FitSettings | None = None) -> FitSettings:
    """``base`` (default: :func:`harness.user_data.settings_from_env`) with the CLI's budget."""
    from harness.user_data import settings_from_env

    settings = base if base is not None else settings_from_env()
    changes: dict[str, Any] = {}
    for name in ("max_rounds", "max_draws", "max_seconds"):
        value = getattr(args, name, None)
        if value is None:
            continue
        if value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, not {value}")
        changes[name] = value
    if getattr(args, "no_adaptive", False):
        changes["adaptive"] = False
    return dataclasses.replace(settings, **changes) if changes else settings


def run_report_command(args: argparse.Namespace) -> int:
    """``harness report DESIGN|all``: fit (or load), write the report(s) and, for ``all``, the index.

    Returns
    -------
    int
        0 when every report was written, 1 when any design failed (the
        others are still written, and the index says which failed).
    """
    from harness import datasets
    from harness.report import write_index, write_report

    started = time.perf_counter()
    if args.design == "all":
        if args.out is not None:
            raise ValueError("--out names one file; with 'all' use --out-dir")
        names = list(REPORT_DESIGNS)
    elif args.design in datasets.DATASETS:
        names = [args.design]
    else:
        raise ValueError(
            f"unknown design {args.design!r}; choose one of {sorted(datasets.DATASETS)} or 'all'"
        )
    out_dir = Path(args.out_dir)
    from harness._io import check_outputs

    # Before any fit: every page's path is writable and not a special file.
    pages = {
        name: Path(args.out) if args.out is not None else out_dir / f"{name}.html" for name in names
    }
    if args.design == "all":
        pages["index"] = out_dir / "index.html"
    check_outputs({"--out" if args.out else f"report {n}": p for n, p in pages.items()})
    results: list[DesignResult] = []
    failures: dict[str, str] = {}
    parallel = len(names) > 1 and _report_workers(len(names)) > 1
    if parallel:
        failures.update(_fit_in_parallel(names, out_dir, args))
    for name in names:
        path = Path(args.out) if args.out is not None else out_dir / f"{name}.html"
        if name in failures:
            print(f"{name}: FAILED: {failures[name]}", file=sys.stderr)
            continue
        try:
            result = fit_design(
                name,
                seed=args.seed,
                refit=args.refit and not parallel,  # parallel workers refitted already
                settings=settings_from_args(args),
            )
            write_report(result, path)
        except Exception as err:
            if getattr(args, "debug", False):
                raise
            failures[name] = f"{type(err).__name__}: {err}"
            log.error("%s: %s", name, err)
            print(f"{name}: FAILED: {failures[name]}", file=sys.stderr)
            continue
        fits = "cached" if result.cached["lme4"] and result.cached["pymc"] else "fitted"
        print(f"{name}: {result.verdict} ({fits}) -> {path}")
        results.append(result)
    if args.design == "all":
        index = write_index(results, out_dir / "index.html", failures)
        print(f"index -> {index}")
    print(f"done in {time.perf_counter() - started:.1f} s")
    return 1 if failures else 0


def _report_workers(n_designs: int) -> int:
    """Processes for ``report all``: ``HARNESS_WORKERS`` (``0``: one per core), default 1.

    Serial is the default because it measured faster on a 2-core machine
    (benchmarks/bench_scale.py: cold 66 s serial against 80 s in two processes,
    warm 1.7 s against 3.0 s): one process compiles each model structure and
    warms numba once, while every spawned worker pays imports and compiles again.
    """
    text = os.environ.get("HARNESS_WORKERS", "").strip()
    if not text.isdigit():
        return 1
    wanted = int(text) or (os.cpu_count() or 1)
    return max(1, min(n_designs, wanted, os.cpu_count() or 1))


def _fit_one(name: str, seed: int, refit: bool, settings: FitSettings) -> str | None:
    """Worker: fit (or load) one design into the shared cache; its error text, or None."""
    try:
        fit_design(name, seed=seed, refit=refit, settings=settings)
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return None


def _fit_in_parallel(names: list[str], out_dir: Path, args: argparse.Namespace) -> dict[str, str]:
    """Fit designs in spawned processes (R and a compiler in each), filling the fit cache.

    The parent then loads each design from the cache (no R, no compile) and
    writes the reports in index order, so output order and failure handling
    stay those of the serial loop.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    workers = _report_workers(len(names))
    progress.message(f"fitting {len(names)} designs in {workers} processes")
    failures: dict[str, str] = {}
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = {
            name: pool.submit(_fit_one, name, args.seed, args.refit, settings_from_args(args))
            for name in names
        }
        for name, future in futures.items():
            try:
                error = future.result()
            except Exception as err:  # the worker process itself died
                error = f"{type(err).__name__}: {err}"
            if error is not None:
                if getattr(args, "debug", False):
                    raise RuntimeError(f"{name}: {error}")
                failures[name] = error
                log.error("%s: %s", name, error)
    return failures
