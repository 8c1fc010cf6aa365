"""Every benchmark script ``nox -s bench`` runs still starts: its imports resolve and its
arguments parse.  mypy checks only the library, so a module moved in ``harness`` once left
``bench_study.py`` importing a name that no longer existed, and the bench session stopped
there without reaching the scale benchmark."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "benchmarks").glob("*.py"))


def test_there_are_benchmark_scripts() -> None:
    assert {script.name for script in SCRIPTS} >= {"bench_scale.py", "bench_study.py", "run.py"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda script: script.name)
def test_benchmark_script_starts(script: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(script), "--help"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout


def test_scale_split_sums_the_rounds_of_a_stage() -> None:
    """Adaptive sampling compiles and samples once per round: the split is their sum, and the
    parent's cache loads in ``report all`` add nothing."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_scale", ROOT / "benchmarks/bench_scale.py")
    assert spec is not None and spec.loader is not None
    bench_scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_scale)
    stderr = "\n".join(
        [
            "ie: PyMC compile (nutpie, numba): done in 12.5 s",
            "ie: sampling 2 chains x 300+300 draws: done in 19.6 s (61 draws/s)",
            "ie: R fit (lme4): done in 37.5 s",
            "ie: PyMC compile (nutpie, numba): done in 12.5 s",
            "ie: sampling 2 chains x 300+300 draws: done in 21.5 s (56 draws/s)",
            "ie: PyMC fit: done in 80.0 s",
            "[3/3 tasks, 90 s] ie: finish done in 9.0 s; about 0 s left",
            "ie: R fit (lme4): done in 0.0 s (cached)",
            "ie: figures: done in 7.7 s",
        ]
    )
    assert bench_scale.split(stderr) == {
        "ie": {
            "compile": 25.0,
            "sampling": 41.1,
            "r_fit": 37.5,
            "pymc_fit": 80.0,
            "figures": 7.7,
        }
    }
