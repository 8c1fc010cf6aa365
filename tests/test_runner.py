"""The runner's disk cache: a warm run refits nothing; a new seed refits PyMC only."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from importlib import import_module
from pathlib import Path

import pytest

import harness.pipeline.runner as runner
from harness.pipeline.runner import fit_design
from harness.pipeline.settings import FitSettings
from harness.report.page import render_figures

#: The default test run's one small fit (shared with test_report/test_plots/test_browser
#: through the runner's disk cache in the session's temp folder).
REPORT_SETTINGS = FitSettings(draws=500, tune=500, chains=2, n_sims=200, max_rounds=1)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.getbasetemp() / "harness-cache"
    # cold, or already warm; the report's renderer is the pipeline's render hook
    fit_design(
        "sleepstudy", seed=1, cache_dir=path, settings=REPORT_SETTINGS, render=render_figures
    )
    return path


def _forbid(monkeypatch: pytest.MonkeyPatch, *targets: tuple[object, str]) -> None:
    """Make fitting functions fail loudly if anything calls them."""
    for module, name in targets:

        def refuse(*args: object, _name: str = name, **kwargs: object) -> None:
            raise AssertionError(f"{_name} was called on a warm cache")

        monkeypatch.setattr(module, name, refuse)


@pytest.mark.r
@pytest.mark.sampling
def test_warm_run_refits_nothing(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # By module object: the package re-exports functions under the submodules' names.
    targets = [
        (import_module("harness.engines.lme4"), "fit_lme4"),
        (import_module("harness.engines.pymc"), "fit_pymc"),
        (import_module("harness.checks.compare"), "compare"),
        (import_module("harness.report.page"), "render_figures"),
    ]
    targets.append((import_module("harness.checks.same_model"), "same_model"))
    _forbid(monkeypatch, *targets)
    result = fit_design(
        "sleepstudy", seed=1, cache_dir=cache, settings=REPORT_SETTINGS, render=render_figures
    )
    assert all(result.cached.values()), result.cached
    assert result.figures is not None
    # The draws are read back intact.
    assert result.bayes.idata.posterior.sizes["draw"] == 500
    assert result.bayes.idata.posterior.sizes["chain"] == 2


@pytest.mark.r
@pytest.mark.sampling
def test_new_seed_refits_pymc_only(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _forbid(monkeypatch, (import_module("harness.engines.lme4"), "fit_lme4"))
    first = fit_design("sleepstudy", seed=1, cache_dir=cache, settings=REPORT_SETTINGS)
    second = fit_design("sleepstudy", seed=2, cache_dir=cache, settings=REPORT_SETTINGS)
    assert second.cached["lme4"] and not second.cached["pymc"] and not second.cached["compare"]
    assert second.keys["lme4"] == first.keys["lme4"] and second.keys["pymc"] != first.keys["pymc"]
    if "same_model" in first.keys:  # it checks the lme4 fit's likelihood: the seed does not enter
        assert second.cached["same_model"] and second.keys["same_model"] == first.keys["same_model"]
    draws = [r.bayes.idata.posterior["beta"].values for r in (first, second)]
    assert not (draws[0] == draws[1]).all()


@pytest.mark.r
@pytest.mark.sampling
def test_missing_stages_reads_the_cache_without_fitting(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _forbid(
        monkeypatch,
        (import_module("harness.engines.lme4"), "fit_lme4"),
        (import_module("harness.engines.pymc"), "fit_pymc"),
    )
    kwargs = {"cache_dir": cache, "settings": REPORT_SETTINGS, "render": render_figures}
    assert runner.missing_stages("sleepstudy", seed=1, **kwargs) == []
    # A new seed needs PyMC and what builds on it; the lme4 side is shared.
    assert runner.missing_stages("sleepstudy", seed=99, **kwargs) == ["pymc", "compare", "figures"]
    # Without a renderer the figures are not asked for.
    assert runner.missing_stages(
        "sleepstudy", seed=99, cache_dir=cache, settings=REPORT_SETTINGS
    ) == [
        "pymc",
        "compare",
    ]


@pytest.mark.r
def test_fit_stages_fills_the_cache_for_a_later_fit_design(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker's R task (lme4 and the same-model check) is what fit_design loads later."""
    kwargs = {"cache_dir": tmp_path, "settings": REPORT_SETTINGS}
    assert runner.missing_stages("partially_clustered", **kwargs) == [
        "lme4",
        "pymc",
        "compare",
        "same_model",
    ]
    seconds = runner.fit_stages("partially_clustered", ("lme4", "same_model"), **kwargs)
    assert set(seconds) == {"lme4", "same_model"}
    assert runner.missing_stages("partially_clustered", **kwargs) == ["pymc", "compare"]
    with pytest.raises(ValueError, match="not \\['figures'\\]"):
        runner.fit_stages("partially_clustered", ("figures",), **kwargs)


@pytest.mark.r
@pytest.mark.sampling
def test_refit_by_stage_redraws_only_the_figures(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _forbid(
        monkeypatch,
        (import_module("harness.engines.lme4"), "fit_lme4"),
        (import_module("harness.engines.pymc"), "fit_pymc"),
        (import_module("harness.checks.compare"), "compare"),
    )
    result = fit_design(
        "sleepstudy",
        seed=1,
        cache_dir=cache,
        settings=REPORT_SETTINGS,
        render=render_figures,
        refit={"figures"},
    )
    assert not result.cached["figures"] and result.figures is not None
    assert result.cached["lme4"] and result.cached["pymc"] and result.cached["compare"]
    with pytest.raises(ValueError, match="unknown stages"):
        fit_design("sleepstudy", cache_dir=cache, refit={"everything"})


def _key_parts(engine: str, design: object, spec: object, settings: FitSettings, seed: int = 1):
    from harness.engines.registry import get_engine

    return runner.engine_key(get_engine(engine), design, spec, settings, seed).parts


def test_keys_follow_what_changed() -> None:
    import harness as hz
    from harness.model.spec import build_design

    data, spec = hz.datasets.load("sleepstudy")
    design = build_design(spec, data)
    settings = FitSettings()
    lme4 = _key_parts("lme4", design, spec, settings)
    pymc = _key_parts("pymc", design, spec, settings, seed=1)
    assert _key_parts("pymc", design, spec, settings, seed=2) != pymc
    # seed and sampler settings never enter the lme4 key
    assert "seed" not in lme4 and "draws" not in json.dumps(lme4)
    assert _key_parts("lme4", design, spec, settings, seed=2) == lme4
    assert _key_parts("lme4", design, spec, FitSettings(draws=10, chains=1)) == lme4
    ml_spec = spec.with_(reml=False)
    assert _key_parts("lme4", design, ml_spec, settings) != lme4
    assert _key_parts("pymc", design, ml_spec, settings, seed=1) != pymc
    changed = data.copy()
    changed.loc[0, "Reaction"] += 1.0
    other = build_design(spec, changed)
    assert _key_parts("lme4", other, spec, settings)["data"] != lme4["data"]
    assert _key_parts("pymc", other, spec, settings, seed=1)["data"] != pymc["data"]


def test_cache_folder_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "c"))
    assert runner.resolve_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("HARNESS_CACHE_DIR")
    monkeypatch.chdir(tmp_path)
    # The user's cache folder, never the current one (see test_cache_safety).
    assert tmp_path not in runner.resolve_cache_dir().parents
    assert runner.resolve_cache_dir(tmp_path / "x") == tmp_path / "x"


def test_unknown_design_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        fit_design("nope")
    with pytest.raises(ValueError, match="design name or a \\(ModelSpec, DataFrame\\) pair"):
        fit_design(42)  # type: ignore[arg-type]


@pytest.mark.r
@pytest.mark.sampling
def test_warm_report_starts_no_r_and_no_compiler(cache: Path, tmp_path: Path) -> None:
    """In a fresh process, a cached design renders without rpy2, PyMC, PyTensor or nutpie."""
    script = textwrap.dedent(f"""
        import sys, time
        started = time.perf_counter()
        from harness.pipeline.runner import fit_design
        from harness.pipeline.settings import FitSettings
        from harness.report.page import render_figures, write_report
        result = fit_design("sleepstudy", seed=1, cache_dir={str(cache)!r}, render=render_figures,
                            settings=FitSettings(draws=500, tune=500, chains=2, n_sims=200, max_rounds=1))
        write_report(result, {str(tmp_path / "warm.html")!r})
        loaded = sorted(m for m in ("rpy2", "pymc", "pytensor", "nutpie", "numba") if m in sys.modules)
        print(loaded, all(result.cached.values()), round(time.perf_counter() - started, 2))
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    loaded, all_cached, _seconds = out.stdout.strip().splitlines()[-1].rsplit(" ", 2)
    assert loaded == "[]" and all_cached == "True", out.stdout
    assert (tmp_path / "warm.html").stat().st_size > 100_000


@pytest.mark.r
@pytest.mark.sampling
def test_cached_lme4_fit_serves_a_machine_without_r(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without Rscript the lme4 key cannot name R's versions: the newest matching fit is used."""
    _forbid(monkeypatch, (import_module("harness.engines.lme4"), "fit_lme4"))
    from harness.engines import registry

    no_r = dataclasses.replace(registry.ENGINES["lme4"], versions=lambda: None)
    monkeypatch.setitem(registry.ENGINES, "lme4", no_r)
    result = fit_design("sleepstudy", seed=1, cache_dir=cache, settings=REPORT_SETTINGS)
    assert result.cached["lme4"] and result.cached["pymc"]
    assert result.freq.versions["lme4"]  # the versions recorded when it was fitted


@pytest.mark.r
def test_side_process_fits_lme4_and_is_stopped_when_pymc_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import multiprocessing

    from harness.engines.samplers import available_cores

    if available_cores() < 2:
        pytest.skip("the side process needs a second core")

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the PyMC stage broke")

    from harness.engines import registry

    broken_pymc = dataclasses.replace(registry.ENGINES["pymc"], fit=broken)
    monkeypatch.setitem(registry.ENGINES, "pymc", broken_pymc)
    from harness.pipeline import side_process

    workers: list[multiprocessing.process.BaseProcess] = []
    start = side_process.start

    def recording_start(*args: object, **kwargs: object) -> object:
        side = start(*args, **kwargs)  # type: ignore[arg-type]
        workers.extend(side._pool._processes.values())
        return side

    monkeypatch.setattr(side_process, "start", recording_start)
    with pytest.raises(RuntimeError, match="PyMC stage broke"):
        fit_design(
            "partially_clustered",
            cache_dir=tmp_path,
            settings=REPORT_SETTINGS,
            side_process=True,
        )
    assert workers, "no side process was started"
    # This test's own R worker was ended by abandon, not left to finish its fit (it needs
    # over 5 s just to start R). Only its own: an earlier test's worker may still be exiting.
    deadline = time.monotonic() + 2.0
    while any(side_process.running(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [(w.pid, _process_state(w.pid)) for w in workers if side_process.running(w)]
    assert not left, f"side worker(s) still running after abandon: {left}"
    # Where this process could still read its exit code: a signal, not 0 after a finished fit.
    codes = {w.exitcode for w in workers} - {None}
    assert codes <= {-signal.SIGTERM, -signal.SIGKILL}, codes


def _process_state(pid: int | None) -> str:
    """The kernel's view of a process (state and threads), for a failure message."""
    try:
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return "no such process"
    return "; ".join(line for line in status if line.startswith(("State", "Threads", "PPid")))


def test_running_reads_the_kernel_not_only_is_alive() -> None:
    """A child reaped behind multiprocessing's back reads "alive" from is_alive(), not running()."""
    import multiprocessing

    from harness.pipeline import side_process

    child = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(30,))
    child.start()
    assert side_process.running(child)
    os.kill(child.pid, signal.SIGKILL)
    os.waitpid(child.pid, 0)  # reaped here, not through the Process object
    assert child.is_alive()  # what the Process object believes
    assert not side_process.running(child)


def test_abandon_kills_a_worker_that_ignores_sigterm() -> None:
    """A worker that does not end on SIGTERM (R starting up) is killed, not left running."""
    from harness.pipeline import side_process

    side = side_process.start(signal.signal, signal.SIGTERM, signal.SIG_IGN)
    side._future.result(timeout=120)  # the worker now ignores SIGTERM
    side._future = side._pool.submit(time.sleep, 120)
    workers = list(side._pool._processes.values())
    assert workers and all(w.is_alive() for w in workers)
    started = time.perf_counter()
    side.abandon()
    assert not [w for w in workers if w.is_alive()]
    assert time.perf_counter() - started < 4 * side_process.STOP_SECONDS
