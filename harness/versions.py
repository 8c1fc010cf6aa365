"""Versions of everything that shapes a fit, collected in one place.

R's side is asked only through ``r_scripts/versions.R``: sourced into the R
session by the lme4 engine (:func:`harness.engines.lme4.r_versions`), or run as
a script here when the runner needs R's versions for a cache key without
starting R in-process (:func:`r_versions_cheap`).  Python's side is read from
the installed distributions' metadata, without importing them.
"""

from __future__ import annotations

import logging
import platform
import shutil
import subprocess
from functools import cache
from importlib import metadata

from harness import _resources

log = logging.getLogger("harness")

#: Python packages whose versions enter the PyMC cache keys.
PY_PACKAGES = ("pymc", "pytensor", "arviz", "nutpie", "numba", "numpy")


def rscript_versions(
    check_load: bool = False, timeout: float = 120
) -> dict[str, str | None] | None:
    """R and R package versions from ``Rscript r_scripts/versions.R`` (no rpy2).

    Parameters
    ----------
    check_load : bool
        Report a package only if it loads (``requireNamespace``; seconds), not
        merely if it is installed.
    timeout : float
        Seconds before giving up on ``Rscript``.

    Returns
    -------
    dict or None
        name -> version (None for a missing package); None when ``Rscript`` is
        not on the PATH, the script is missing or the call fails.
    """
    rscript = shutil.which("Rscript")
    if rscript is None:
        return None
    try:
        script = _resources.r_script("versions.R")
    except _resources.RScriptsMissingError as err:
        log.warning("%s", err)
        return None
    command = [rscript, "--vanilla", str(script)] + (["--check-load"] if check_load else [])
    try:
        out = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as err:
        log.warning("could not query R versions with Rscript: %s", err)
        return None
    versions: dict[str, str | None] = {}
    for line in out.splitlines():
        name, sep, value = line.partition("=")
        if sep:
            value = value.strip()
            versions[name.strip()] = None if value in ("", "NA") else value
    return versions


@cache
def r_versions_cheap() -> dict[str, str] | None:
    """R and R package versions for cache keys (one ``Rscript`` call per process).

    Spelled as ``packageVersion`` prints them ("1.1.31"), like
    ``FreqFit.versions``; a missing package reads "missing".
    """
    versions = rscript_versions()
    if versions is None:
        return None
    return {k: (v if v is not None else "missing") for k, v in versions.items()}


def r_ready_cheap() -> bool:
    """rpy2 is importable and R has lme4 and nlme (one ``Rscript`` call; R is not started).

    When this says no, a caller starts R in-process, which raises the error
    that names what to install.
    """
    from importlib.util import find_spec

    try:
        if find_spec("rpy2") is None:
            return False
    except (ImportError, ValueError):  # e.g. sys.modules["rpy2"] is None
        return False
    versions = r_versions_cheap()
    return versions is not None and all(
        versions.get(package) not in (None, "missing") for package in ("lme4", "nlme")
    )


def python_versions() -> dict[str, str]:
    """Versions of the Python packages that shape a fit, without importing them."""
    versions = {"python": platform.python_version()}
    for name in (*PY_PACKAGES, "rpy2", "harness"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    if versions["harness"] == "not installed":
        from harness import __version__

        versions["harness"] = __version__
    return versions
