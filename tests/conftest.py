"""Shared fixtures: R availability, cache folders, fits reused across tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = Path(__file__).resolve().parent / "reference"

# Persistent compile caches, as the nox sessions set them, when tests run bare.
os.environ.setdefault("PYTENSOR_FLAGS", f"base_compiledir={ROOT / '.cache' / 'pytensor'}")
os.environ.setdefault("NUMBA_CACHE_DIR", str(ROOT / ".cache" / "numba"))
os.environ.setdefault("MPLBACKEND", "Agg")


def _r_status() -> tuple[bool, str]:
    from harness.engines.lme4 import RUnavailableError, _r_env

    try:
        _r_env()
    except RUnavailableError as err:
        return False, str(err)
    return True, ""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    needs_r = [item for item in items if item.get_closest_marker("r") is not None]
    if not needs_r:
        return
    ok, why = _r_status()
    if ok:
        return
    if os.environ.get("CI") == "true" or os.environ.get("HARNESS_REQUIRE_R") == "1":
        # On CI, R is installed by the project's own set-up: its absence is a failure.
        raise pytest.UsageError(f"R is required on CI but unavailable: {why}")
    skip = pytest.mark.skip(reason=f"R/lme4 unavailable: {why}")
    for item in needs_r:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def sleepstudy():
    import harness as hz

    return hz.datasets.load("sleepstudy")


@pytest.fixture(scope="session")
def sleepstudy_freq(sleepstudy):
    import harness as hz

    data, spec = sleepstudy
    return hz.fit_lme4(spec, data, profile=True)


@pytest.fixture(scope="session")
def sleepstudy_bayes(sleepstudy):
    import harness as hz

    data, spec = sleepstudy
    return hz.fit_pymc(spec, data, seed=1)


@pytest.fixture(scope="session")
def grouseticks_result(tmp_path_factory: pytest.TempPathFactory):
    """The shipped negative binomial design through the pipeline, small, figures drawn.

    One fit for the browser's count page and the negative binomial pipeline test.
    Smaller than the report's settings: the page and the engines' agreement are
    checked, not lme4's intervals.
    """
    from harness.pipeline.runner import fit_design
    from harness.pipeline.settings import FitSettings
    from harness.report.page import render_figures

    settings = FitSettings(draws=300, tune=300, chains=2, n_sims=0, profile=False, max_rounds=1)
    return fit_design(
        "grouseticks",
        seed=1,
        cache_dir=tmp_path_factory.getbasetemp() / "harness-cache",
        settings=settings,
        render=render_figures,
    )
