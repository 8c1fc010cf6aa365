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

The cache lives in ``$HARNESS_CACHE_DIR`` (default ``.cache/harness`` in the
working directory).  Every file is written to a temporary name and renamed,
so an interrupted run never leaves a half-written entry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pickle
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from harness import progress
from harness.spec import Design, ModelSpec, build_design

if TYPE_CHECKING:
    import argparse

    from harness.compare import Comparison
    from harness.engines.lme4 import FreqFit
    from harness.engines.pymc import BayesFit

log = logging.getLogger("harness")

#: The designs ``harness report all`` writes, in index order.
REPORT_DESIGNS = ("cafe", "sleepstudy", "partially_clustered", "partially_clustered_hetero")

CACHE_FORMAT = "1"  # bump when the layout of cached entries changes
_PACKAGE = Path(__file__).resolve().parent
_R_PACKAGES = ("lme4", "nlme", "merTools", "lmerTest", "pbkrtest", "Matrix", "MASS")
_PY_PACKAGES = ("pymc", "pytensor", "arviz", "nutpie", "numba", "numpy")


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
    """

    draws: int = 1000
    tune: int = 1000
    chains: int = 4
    sampler: str = "nutpie"
    target_accept: float = 0.9
    profile: bool = True
    n_sims: int = 1000
    lme4_seed: int = 1

    def lme4_part(self) -> dict[str, Any]:
        return {"profile": self.profile, "n_sims": self.n_sims, "lme4_seed": self.lme4_seed}

    def pymc_part(self) -> dict[str, Any]:
        return {
            "draws": self.draws,
            "tune": self.tune,
            "chains": self.chains,
            "sampler": self.sampler,
            "target_accept": self.target_accept,
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


def resolve_cache_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """The fit cache folder: ``path``, else ``$HARNESS_CACHE_DIR``, else ``.cache/harness``."""
    if path is not None:
        return Path(path)
    return Path(os.environ.get("HARNESS_CACHE_DIR") or Path.cwd() / ".cache" / "harness")


def _digest(parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


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


@cache
def r_versions_cheap() -> dict[str, str] | None:
    """R and R package versions from one ``Rscript`` call (no rpy2, no package loading).

    Returns None when ``Rscript`` is not on the PATH or fails.
    """
    rscript = shutil.which("Rscript")
    if rscript is None:
        return None
    packages = ", ".join(f'"{p}"' for p in _R_PACKAGES)
    code = (
        f"p <- c({packages}); v <- vapply(p, function(x) tryCatch(as.character(packageVersion(x)), "
        "error = function(e) 'missing'), ''); "
        "cat(paste0(c('R', p), '=', c(paste(R.version$major, R.version$minor, sep = '.'), v)), "
        "sep = '\\n')"
    )
    try:
        out = subprocess.run(
            [rscript, "--vanilla", "-e", code],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as err:
        log.warning("could not query R versions with Rscript: %s", err)
        return None
    versions = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    # Spell versions the way packageVersion prints in FreqFit.versions ("1.1.31").
    return {k: v.strip() for k, v in versions.items()}


def python_versions() -> dict[str, str]:
    """Versions of the Python packages that shape a fit, without importing them."""
    versions = {"python": platform.python_version()}
    for name in (*_PY_PACKAGES, "rpy2", "harness"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    if versions["harness"] == "not installed":
        from harness import __version__

        versions["harness"] = __version__
    return versions


def _lme4_key_parts(design: Design, spec: ModelSpec, settings: FitSettings) -> dict[str, Any]:
    return {
        "format": CACHE_FORMAT,
        "kind": "lme4",
        "data": design.data_hash(),
        "spec": spec.key(),
        "settings": settings.lme4_part(),
        "code": _source_hash("engines/lme4.py", "spec.py", "r_scripts/fit.R"),
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
        "code": _source_hash("engines/pymc.py", "priors.py", "spec.py"),
    }


# --------------------------------------------------------------------------- the disk cache


def _atomic_write_bytes(path: Path, payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class FitCache:
    """Entries ``<kind>/<key>.pkl`` (+ ``.nc`` for InferenceData, ``.json`` for people)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, kind: str, key: str, suffix: str) -> Path:
        return self.root / kind / f"{key}{suffix}"

    def load(self, kind: str, key: str) -> Any | None:
        path = self.path(kind, key, ".pkl")
        if not path.is_file():
            return None
        try:
            with path.open("rb") as handle:
                return pickle.load(handle)
        except Exception as err:  # a stale class layout or a damaged file: refit
            log.warning("ignoring unreadable cache entry %s (%s)", path, err)
            return None

    def store(self, kind: str, key: str, value: Any, meta: dict[str, Any]) -> None:
        _atomic_write_bytes(
            self.path(kind, key, ".json"),
            json.dumps(meta, indent=2, sort_keys=True, default=str).encode(),
        )
        # The pickle goes last: its presence marks a complete entry.
        _atomic_write_bytes(self.path(kind, key, ".pkl"), pickle.dumps(value, protocol=5))

    def latest_for(self, kind: str, partial_key: str) -> str | None:
        """Key of the newest entry written under a version-less key (for machines without R)."""
        pointer = self.root / kind / f"latest-{partial_key}.txt"
        if pointer.is_file():
            key = pointer.read_text().strip()
            if self.path(kind, key, ".pkl").is_file():
                return key
        return None

    def set_latest(self, kind: str, partial_key: str, key: str) -> None:
        _atomic_write_bytes(self.root / kind / f"latest-{partial_key}.txt", key.encode())


def _load_idata(path: Path) -> Any:
    import arviz as az

    idata = az.from_netcdf(str(path))
    # Read into memory: the file may be replaced by a later refit.
    for group in idata.groups():
        getattr(idata, group).load()
    return idata


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
    r_versions = r_versions_cheap()
    if r_versions is None:
        key = None if refit else store.latest_for("lme4", partial)
        if key is not None:
            log.warning("R is not available; using the cached lme4 fit %s", key)
            freq = store.load("lme4", key)
            if freq is not None:
                return freq, key, True, dict(freq.versions)
        # No R and nothing cached: let the engine raise its own clear error.
        r_versions = {"R": "unavailable"}
    key = _digest({**parts, "versions": r_versions})
    if not refit:
        freq = store.load("lme4", key)
        if freq is not None:
            log.info("%s: lme4 fit loaded from cache (%s)", spec.name or spec.formula, key)
            return freq, key, True, r_versions
    from harness.engines.lme4 import fit_lme4

    freq = fit_lme4(
        spec,
        data,
        profile=settings.profile,
        n_sims=settings.n_sims,
        seed=settings.lme4_seed,
        design=design,
    )
    store.store(
        "lme4", key, freq, {**parts, "versions": r_versions, "fit_seconds": freq.fit_seconds}
    )
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
    if not refit:
        bayes = store.load("pymc", key)
        if bayes is not None and nc_path.is_file():
            log.info("%s: PyMC fit loaded from cache (%s)", spec.name or spec.formula, key)
            return bayes, nc_path, key, True
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
    )
    nc_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=nc_path.parent, prefix=f".{nc_path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        bayes.idata.to_netcdf(tmp)
        os.replace(tmp, nc_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    store.store(
        "pymc",
        key,
        dataclasses.replace(bayes, idata=None),
        {**parts, "compile_seconds": bayes.compile_seconds, "sample_seconds": bayes.sample_seconds},
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
    key = _digest(
        {
            "format": CACHE_FORMAT,
            "kind": "same_model",
            "lme4": lme4_key,
            "versions": {k: py[k] for k in _PY_PACKAGES},
            "code": _source_hash(
                "same_model.py", "marginal.py", "engines/pymc.py", "priors.py", "spec.py"
            ),
        }
    )
    if not refit:
        hit = store.load("same_model", key)
        if hit is not None:
            return hit["result"], hit["status"], key, True, hit["seconds"]
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
        {"lme4": lme4_key, "seconds": seconds},
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
    key = _digest(
        {
            "format": CACHE_FORMAT,
            "kind": "compare",
            "lme4": lme4_key,
            "pymc": pymc_key,
            "code": _source_hash("compare.py", "align.py"),
        }
    )
    if not refit:
        hit = store.load("compare", key)
        if hit is not None:
            return (
                dataclasses.replace(hit["comparison"], freq=freq, bayes=bayes_info),
                key,
                True,
                hit["seconds"],
            )
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
        {"comparison": dataclasses.replace(comparison, freq=None, bayes=None), "seconds": seconds},
        {"lme4": lme4_key, "pymc": pymc_key, "seconds": seconds},
    )
    return comparison, key, False, seconds


def figures_key(result: DesignResult) -> str:
    """Cache key of a design's rendered figures."""
    return _digest(
        {
            "format": CACHE_FORMAT,
            "kind": "figures",
            "compare": result.keys.get("compare"),
            "same_model": result.keys.get("same_model"),
            "name": result.name,
            "code": _source_hash("plots.py", "report_tables.py", "report.py"),
        }
    )


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
        Cache folder; default ``$HARNESS_CACHE_DIR`` or ``.cache/harness``.
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
        fkey = figures_key(result)
        keys["figures"] = fkey
        hit = None if refit else store.load("figures", fkey)
        if hit is not None:
            result.figures, cached["figures"], timings["figures"] = (
                hit["figures"],
                True,
                hit["seconds"],
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
                {"compare": keys["compare"], "seconds": timings["figures"]},
            )
    return result


# --------------------------------------------------------------------------- command line


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
    results: list[DesignResult] = []
    failures: dict[str, str] = {}
    if len(names) > 1 and _report_workers(len(names)) > 1:
        failures.update(_fit_in_parallel(names, out_dir, args))
    for name in names:
        path = Path(args.out) if args.out is not None else out_dir / f"{name}.html"
        if name in failures:
            print(f"{name}: FAILED: {failures[name]}", file=sys.stderr)
            continue
        try:
            result = fit_design(name, seed=args.seed, refit=args.refit and len(names) == 1)
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


def _fit_one(name: str, seed: int, refit: bool) -> str | None:
    """Worker: fit (or load) one design into the shared cache; its error text, or None."""
    try:
        fit_design(name, seed=seed, refit=refit)
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
        futures = {name: pool.submit(_fit_one, name, args.seed, args.refit) for name in names}
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
