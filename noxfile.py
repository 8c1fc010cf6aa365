"""Nox sessions for the lme4-vs-PyMC harness.

``python3 -m nox -s tests`` is the test command (README, ``.ci/run``).
``python3 -m nox -s report`` renders every report into ``reports/``.
``python3 -m nox -s examples`` runs the worked notebooks into ``reports/examples/``.
``python3 -m nox -l`` lists all sessions.

Every session first runs ``r_scripts/install_r.sh`` (R, lme4 and friends,
system libraries; quick when they are present) and installs the package in
editable mode: ``r_scripts/`` lives at the repository top level and the R bridge
finds it relative to the package source, which only an editable install keeps.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import nox

nox.needs_version = ">=2025.2.9"  # nox.project.dependency_groups
nox.options.sessions = ["tests", "lint"]
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = True

ROOT = Path(__file__).resolve().parent
PYPROJECT = nox.project.load_toml(ROOT / "pyproject.toml")
PYTHON = "3.11"
CACHE = ROOT / ".cache"


def _blas_ldflags() -> str | None:
    """``-lopenblas`` when the linker can find OpenBLAS, else None (PyTensor autodetects).

    PyTensor's autodetection misses Debian's OpenBLAS (it also wants libgfortran.so
    or libcblas.so), so we name it; ``cc -print-file-name`` answers with a path only
    when the library is on the linker's search path.
    """
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        return None
    try:
        found = subprocess.run(
            [cc, "-print-file-name=libopenblas.so"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return "-lopenblas" if os.path.isabs(found) and os.path.exists(found) else None


def _env() -> dict[str, str]:
    """Persistent caches (PyTensor C modules, numba, fitted models) under ``.cache/``."""
    flags = [f"base_compiledir={CACHE / 'pytensor'}"]
    ldflags = _blas_ldflags()
    if ldflags:
        flags.append(f"blas__ldflags={ldflags}")
    user_flags = os.environ.get("PYTENSOR_FLAGS")
    if user_flags:
        flags.append(user_flags)  # later entries win
    return {
        "PYTENSOR_FLAGS": ",".join(flags),
        "NUMBA_CACHE_DIR": str(CACHE / "numba"),
        "HARNESS_CACHE_DIR": str(CACHE / "harness"),
        "MPLBACKEND": "Agg",
    }


def _setup(
    session: nox.Session,
    *groups: str,
    extras: str = "",
    browser: bool = False,
    gallery: bool = False,
) -> None:
    """System setup (R and packages), then the package (editable) and dependency groups.

    ``browser=True`` also installs Debian's Chromium for the report browser tests;
    ``gallery=True`` the R data packages only the gallery reads (mlmRev).
    """
    script = [str(ROOT / "r_scripts" / "install_r.sh")]
    script += (["--with-browser"] if browser else []) + (["--with-gallery"] if gallery else [])
    session.run("bash", *script, external=True)
    # The install is editable, so only a change of pyproject.toml (or of the groups and
    # extras asked for) needs pip again; a stamp in the venv records what was installed.
    key = hashlib.sha256(
        (ROOT / "pyproject.toml").read_bytes() + repr((groups, extras)).encode()
    ).hexdigest()
    venv = getattr(session.virtualenv, "location", None)
    stamp = Path(venv) / ".harness-install-stamp" if venv else None
    if stamp is not None and stamp.is_file() and stamp.read_text() == key:
        session.log("harness and its dependencies already installed (pyproject.toml unchanged)")
        return
    session.install("-e", f".{extras}")
    deps = nox.project.dependency_groups(PYPROJECT, *groups) if groups else ()
    if deps:
        session.install(*deps)
    if stamp is not None:
        stamp.write_text(key)


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Run the fast test suite (pyproject's addopts deselect ``slow``); posargs go to pytest."""
    _setup(session, "test", browser=True)
    session.run("pytest", *session.posargs, env=_env())


@nox.session(python=PYTHON, default=False)
def tests_slow(session: nox.Session) -> None:
    """Run the sampling-heavy tests (``pytest -m slow``); posargs go to pytest."""
    _setup(session, "test")
    session.run("pytest", "-m", "slow", *session.posargs, env=_env())


@nox.session(python=PYTHON, default=False)
def report(session: nox.Session) -> None:
    """Fit every shipped design with both engines and write the HTML reports to ``reports/``."""
    _setup(session)
    args = session.posargs or ["all", "--out-dir", "reports"]
    session.run("python", "-m", "harness.cli", "report", *args, env=_env())


@nox.session(python=PYTHON, default=False)
def bench(session: nox.Session) -> None:
    """Time fits and samplers (``benchmarks/run.py``, posargs go to it), the same-model
    check (``bench_same_model.py``), study throughput (``bench_study.py``), adaptive
    sampling against one run (``bench_adaptive.py``), and the fixed effects' basis and nutpie's
    mass matrix (``bench_geometry.py``)."""
    _setup(session, extras="[study]")
    session.run("python", "benchmarks/run.py", *session.posargs, env=_env())
    session.run("python", "benchmarks/bench_same_model.py", env=_env())
    session.run("python", "benchmarks/bench_study.py", env=_env())
    session.run("python", "benchmarks/bench_adaptive.py", env=_env())
    session.run("python", "benchmarks/bench_geometry.py", env=_env())
    session.run("python", "benchmarks/bench_scale.py", env=_env())


@nox.session(python=PYTHON, default=False)
def gallery(session: nox.Session) -> None:
    """Fit the real-data gallery (R packages' shipped data) into ``reports/gallery/``.

    ``nox -s gallery -- --cases orthodont dyestuff2 --draws 500``; ``--list`` names the cases;
    ``--engines lme4,pymc,brms`` adds brms (PyMC vs brms per case).
    Cached fits make a rerun resume where the last one stopped.
    """
    _setup(session, gallery=True)
    session.run("python", "benchmarks/gallery.py", *session.posargs, env=_env())


@nox.session(python=PYTHON, default=False)
def study(session: nox.Session) -> None:
    """Run a simulation study: ``nox -s study -- NAME [--reps N] [--scheduler ADDRESS]``."""
    _setup(session, extras="[study]")
    session.run("python", "-m", "harness.cli", "study", *session.posargs, env=_env())


@nox.session(python=PYTHON, default=False)
def examples(session: nox.Session) -> None:
    """Run the worked examples (``examples/*.ipynb``) and render them to ``reports/examples/``.

    ``nox -s examples -- sleepstudy`` runs one; ``HARNESS_DRAWS=200 nox -s examples`` a quick pass.
    """
    _setup(session, "examples")
    session.run("python", "examples/run.py", *session.posargs, env=_env())


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """Lint and type-check: ruff check, ruff format --check, mypy."""
    _setup(session, "lint")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("mypy", "harness", env=_env())
