"""Progress lines on stderr: a heartbeat during long stages, one plain line per stage off a terminal."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import progress
from harness.engines.samplers import available_cores

ROOT = Path(__file__).resolve().parents[1]


def test_stage_lines_and_heartbeat_off_a_terminal(monkeypatch, capsys):
    monkeypatch.setattr(progress, "HEARTBEAT_SECONDS", 0.05)
    monkeypatch.delenv("HARNESS_QUIET", raising=False)
    monkeypatch.setenv("HARNESS_PROGRESS", "1")
    progress.set_design("demo")
    with progress.stage("sampling") as stage:
        time.sleep(0.3)
        stage.detail = "100 draws/s"
    err = capsys.readouterr().err.splitlines()
    assert any(line.startswith("demo: sampling: still running") for line in err)
    assert err[-1].startswith("demo: sampling: done in ")
    assert err[-1].endswith("(100 draws/s)")
    assert not any("\r" in line for line in err)


def test_only_the_innermost_stage_beats(monkeypatch, capsys):
    monkeypatch.setattr(progress, "HEARTBEAT_SECONDS", 0.05)
    monkeypatch.delenv("HARNESS_QUIET", raising=False)
    monkeypatch.setenv("HARNESS_PROGRESS", "1")
    progress.set_design("demo")
    with progress.stage("PyMC fit"):
        with progress.stage("PyMC compile"):
            time.sleep(0.3)
        time.sleep(0.3)
    err = capsys.readouterr().err.splitlines()
    inner_done = next(
        i for i, line in enumerate(err) if line.startswith("demo: PyMC compile: done")
    )
    before, after = err[:inner_done], err[inner_done + 1 :]
    assert any(line.startswith("demo: PyMC compile: still running") for line in before)
    assert not any(line.startswith("demo: PyMC fit: still running") for line in before)
    # Once the inner stage is over, the outer one beats again.
    assert any(line.startswith("demo: PyMC fit: still running") for line in after)


def test_plain_lines_in_workers_even_on_a_terminal(monkeypatch):
    class Terminal:
        def isatty(self):
            return True

    assert progress._is_terminal(Terminal())
    monkeypatch.setenv("HARNESS_PROGRESS_PLAIN", "1")
    assert not progress._is_terminal(Terminal())


def test_failed_stage_says_so(monkeypatch, capsys):
    monkeypatch.setenv("HARNESS_PROGRESS", "1")
    monkeypatch.delenv("HARNESS_QUIET", raising=False)
    with pytest.raises(RuntimeError), progress.stage("R fit (lme4)"):
        raise RuntimeError("boom")
    assert "R fit (lme4): failed after" in capsys.readouterr().err


def test_quiet_and_library_default_are_silent(monkeypatch, capsys):
    monkeypatch.delenv("HARNESS_QUIET", raising=False)
    monkeypatch.setenv("HARNESS_PROGRESS", "1")
    with progress.stage("figures"):
        time.sleep(0.01)
    assert "figures: done in" in capsys.readouterr().err  # the same stage, switched on, speaks
    monkeypatch.delenv("HARNESS_PROGRESS", raising=False)
    with progress.stage("figures"):
        time.sleep(0.01)
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("HARNESS_PROGRESS", "1")
    monkeypatch.setenv("HARNESS_QUIET", "1")
    with progress.stage("figures"):
        time.sleep(0.01)
    assert capsys.readouterr().err == ""


def _run(args, env):
    return subprocess.run(
        [sys.executable, "-m", "harness.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=900,
    )


@pytest.mark.r
@pytest.mark.sampling
def test_cli_compare_prints_one_line_per_stage(tmp_path):
    env = {
        **os.environ,
        "HARNESS_CACHE_DIR": str(tmp_path / "cache"),
        "HARNESS_DRAWS": "30",
        "HARNESS_TUNE": "30",
        "HARNESS_CHAINS": "1",
    }
    env.pop("HARNESS_QUIET", None)
    csv = ROOT / "tests" / "data" / "dyestuff.csv"
    args = ["compare", str(csv), "--formula", "Yield ~ 1 + (1 | Batch)"]
    done = _run([*args, "--out", str(tmp_path / "a.html")], env)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("dyestuff: ")]
    for stage in ("R fit (lme4)", "PyMC fit", "sampling", "compare", "same-model check", "figures"):
        assert any(
            line.startswith(f"dyestuff: {stage}") and " done in " in line for line in lines
        ), (
            stage,
            done.stderr,
        )
    assert any("draws/s" in line for line in lines)
    assert "\r" not in done.stderr
    if available_cores() >= 2:  # lme4 fitted beside the PyMC compile, loaded from the cache
        assert any("fitted in a second process" in line for line in lines), done.stderr
    quiet = _run(["--quiet", *args, "--out", str(tmp_path / "b.html")], env)
    assert quiet.returncode == 0, quiet.stderr
    assert "dyestuff: " not in quiet.stderr
