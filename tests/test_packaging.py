"""The package installs without ``-e``: every subpackage and the R scripts ship."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _listed_packages() -> set[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return set(config["tool"]["setuptools"]["packages"])


def test_every_subpackage_is_listed_in_pyproject() -> None:
    found = {
        ".".join(path.parent.relative_to(ROOT).parts)
        for path in (ROOT / "harness").rglob("__init__.py")
        if "__pycache__" not in path.parts
    }
    found.add("harness.report.templates")  # data only, installed as a package of its own
    found.add("harness.r_scripts")  # mapped onto the top-level r_scripts/
    assert found == _listed_packages()


def test_r_scripts_folder_is_a_package_with_the_r_code() -> None:
    assert (ROOT / "r_scripts" / "__init__.py").is_file()
    for name in ("fit.R", "versions.R"):
        assert (ROOT / "r_scripts" / name).is_file()


def test_plain_install_ships_the_r_scripts(tmp_path: Path) -> None:
    """``pip install .`` (no -e) into a folder; from elsewhere the R code is found there."""
    target = tmp_path / "site"
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    if build.returncode != 0 and "No module named pip" in build.stderr:
        pytest.skip("pip is not available in this environment")
    assert build.returncode == 0, build.stderr
    env = {k: v for k, v in os.environ.items() if k not in ("HARNESS_R_SCRIPTS", "PYTHONPATH")}
    env["PYTHONPATH"] = str(target)
    code = (
        "import harness, harness._resources as r; "
        "print(harness.__file__); print(r.r_scripts_origin())"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    module_file, origin = done.stdout.splitlines()
    assert module_file.startswith(str(target))
    assert origin.startswith(str(target / "harness" / "r_scripts"))
    assert "installed package" in origin
