"""Where the files the harness ships beside its Python code are: the R scripts.

The R code lives in the repository's top-level ``r_scripts/`` and is installed
as the package ``harness.r_scripts`` (a setuptools ``package-dir`` mapping in
``pyproject.toml``), so ``pip install .`` and editable installs both find it
through :mod:`importlib.resources`.  ``$HARNESS_R_SCRIPTS`` overrides both.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

__all__ = ["RScriptsMissingError", "r_script", "r_scripts_dir", "r_scripts_origin"]


class RScriptsMissingError(FileNotFoundError):
    """The R scripts are neither where ``$HARNESS_R_SCRIPTS`` points nor installed."""


def _candidates() -> list[tuple[str, Path]]:
    found: list[tuple[str, Path]] = []
    override = os.environ.get("HARNESS_R_SCRIPTS")
    if override:
        found.append(("$HARNESS_R_SCRIPTS", Path(override)))
    try:
        installed = resources.files("harness.r_scripts")
    except ModuleNotFoundError:
        installed = None
    if installed is not None and isinstance(installed, Path):
        found.append(("installed package harness.r_scripts", installed))
    elif installed is not None:  # a MultiplexedPath (namespace package): take its first folder
        for entry in getattr(installed, "_paths", []):
            found.append(("installed package harness.r_scripts", Path(entry)))
    # A source checkout run without installing (PYTHONPATH=.): the repository's folder.
    found.append(("repository checkout", Path(__file__).resolve().parent.parent / "r_scripts"))
    return found


def r_scripts_dir() -> Path:
    """The folder holding ``fit.R`` and ``versions.R``.

    Raises
    ------
    RScriptsMissingError
        When no candidate folder holds ``fit.R``; the message lists where it looked.
    """
    return _locate()[1]


def r_scripts_origin() -> str:
    """How :func:`r_scripts_dir` found the folder (for ``harness doctor``)."""
    origin, path = _locate()
    return f"{path} ({origin})"


def _locate() -> tuple[str, Path]:
    tried = []
    for origin, path in _candidates():
        if (path / "fit.R").is_file():
            return origin, path
        tried.append(f"{path} ({origin})")
    raise RScriptsMissingError(
        "the harness's R scripts (fit.R) were not found; looked in "
        + "; ".join(tried)
        + ". Reinstall the harness (pip install .) or set HARNESS_R_SCRIPTS to its r_scripts/ folder"
    )


def r_script(name: str) -> Path:
    """Path of one shipped R script, e.g. ``r_script("fit.R")``."""
    path = r_scripts_dir() / name
    if not path.is_file():
        raise RScriptsMissingError(f"{name} is missing from {path.parent}")
    return path
