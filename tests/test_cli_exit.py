"""The ``harness`` program ends quickly but still runs every exit handler and keeps its status."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env
    )


def test_exit_handlers_registered_by_the_work_still_run() -> None:
    code = (
        "import atexit, harness.cli as cli\n"
        "def main(argv=None):\n"
        "    atexit.register(lambda: print('handler ran', flush=True))\n"
        "    return 3\n"
        "cli.main = main\n"
        "cli.run()\n"
    )
    done = _run(code)
    assert done.returncode == 3, done.stderr
    assert "handler ran" in done.stdout


def test_usage_errors_and_help_keep_argparses_status() -> None:
    bad = _run(
        "import sys, harness.cli as cli; sys.argv = ['harness', '--no-such-flag']; cli.run()"
    )
    assert bad.returncode == 2
    assert "usage: harness" in bad.stderr
    helped = _run("import sys, harness.cli as cli; sys.argv = ['harness', '--help']; cli.run()")
    assert helped.returncode == 0
    assert "usage: harness" in helped.stdout


def test_a_failed_command_exits_1_with_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "missing.csv"
    code = (
        "import sys, harness.cli as cli; "
        f"sys.argv = ['harness', 'compare', {str(missing)!r}, '--formula', 'y ~ x + (1 | g)']; "
        "cli.run()"
    )
    done = _run(code)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("harness compare: error:")


def test_arviz_refactor_notice_is_hidden_and_other_warnings_are_not(tmp_path: Path) -> None:
    # ArviZ shows its notice once a day, stamped in the user cache: an empty cache shows it.
    plain = _run("import arviz", {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "plain")})
    if "ArviZ is undergoing" not in plain.stderr:
        pytest.skip("this ArviZ shows no refactor notice")
    code = (
        "import warnings, harness.cli as cli\n"
        "def main(argv=None):\n"
        "    import arviz\n"
        "    warnings.warn('a notice of our own', FutureWarning)\n"
        "    return 0\n"
        "cli.main = main\n"
        "cli.run()\n"
    )
    done = _run(code, {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cli")})
    assert done.returncode == 0, done.stderr
    assert "ArviZ is undergoing" not in done.stderr
    assert "a notice of our own" in done.stderr
