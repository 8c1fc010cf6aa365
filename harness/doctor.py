"""``harness doctor``: which pieces of the two engines are present, and how to fix the rest.

Each check returns one row::

    {"piece": "lme4", "version": "1.1.31", "ok": True, "required": True,
     "detail": "loads in embedded R", "fix": ""}

A failing row always carries a concrete ``fix``.  ``required=False`` marks pieces
that only cost speed (BLAS for PyTensor); :func:`doctor_ok` ignores those.

Nothing heavy is imported at module import: rpy2, PyMC and PyTensor are imported
inside the checks, so ``import harness.doctor`` works on a machine without R.
(rpy2 is otherwise confined to ``harness.engines.lme4``; the doctor imports it on
its own because whether rpy2 imports and embeds R is exactly what it checks.)
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata as metadata
import logging
import platform
import re
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger("harness")

Row = dict[str, Any]

MIN_PYTHON = (3, 11)
MIN_R = (4, 2)
INSTALL_R = "run `bash r_scripts/install_r.sh`"
R_FIX = (
    f"{INSTALL_R} (Debian/Ubuntu, as root); elsewhere install R >= 4.2 and, in R, "
    "install.packages(c('lme4', 'nlme', 'merTools', 'lmerTest', 'pbkrtest', 'MASS'))"
)
RPY2_FIX = "pip install 'rpy2>=3.5,<3.6'  (rpy2 3.6 does not load with R 4.2: undefined R_getVar)"

#: R packages: name -> required (MASS/pbkrtest/merTools/lmerTest serve optional outputs).
R_PACKAGES: dict[str, bool] = {
    "lme4": True,
    "nlme": True,
    "merTools": False,
    "lmerTest": False,
    "pbkrtest": False,
    "MASS": False,
    # The third engine (issue 22): Stan through brms; optional.
    "brms": False,
    "rstan": False,
}
#: R packages that only the brms engine needs, and how to install them.
BRMS_PACKAGES = ("brms", "rstan")
BRMS_FIX = (
    "run `bash r_scripts/install_r.sh --with-brms` (Debian/Ubuntu: apt-get install "
    "--no-install-recommends "
    "r-cran-brms); or in R: install.packages('brms')"
)

#: Python packages: (row name, distribution, import name, pip requirement).
PY_PACKAGES: list[tuple[str, str, str, str]] = [
    ("PyMC", "pymc", "pymc", "pymc>=5.10"),
    ("PyTensor", "pytensor", "pytensor", "pytensor>=2.18"),
    ("ArviZ", "arviz", "arviz", "arviz>=0.17,<1"),
    ("nutpie", "nutpie", "nutpie", "nutpie>=0.13"),
    ("numba", "numba", "numba", "numba>=0.59"),
    ("formulae", "formulae", "formulae", "formulae>=0.5.4"),
]


def _row(
    piece: str,
    version: str | None,
    ok: bool,
    detail: str = "",
    fix: str = "",
    required: bool = True,
) -> Row:
    return {
        "piece": piece,
        "version": version or "",
        "ok": bool(ok),
        "required": required,
        "detail": detail,
        "fix": "" if ok else fix,
    }


def _version_tuple(text: str) -> tuple[int, ...]:
    """Leading numeric components: ``"4.2.2 Patched"`` -> ``(4, 2, 2)``."""
    match = re.match(r"\d+(?:[.-]\d+)*", text.strip())
    return tuple(int(x) for x in re.split(r"[.-]", match.group(0))) if match else ()


def _dist_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


# --- Python --------------------------------------------------------------------------


def check_python() -> Row:
    version = platform.python_version()
    ok = sys.version_info[:2] >= MIN_PYTHON
    return _row(
        "Python",
        version,
        ok,
        detail=sys.executable,
        fix="use Python >= 3.11 (e.g. `pyenv install 3.11`)",
    )


# --- R ---------------------------------------------------------------------------------


def check_rscript() -> Row:
    """R as a program: ``Rscript --version``."""
    exe = shutil.which("Rscript")
    if exe is None:
        return _row("R (Rscript)", None, False, "Rscript not on PATH", R_FIX)
    try:
        done = subprocess.run(
            [exe, "--version"], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        return _row("R (Rscript)", None, False, _first_line(err), R_FIX)
    out = (done.stdout + done.stderr).strip()
    match = re.search(r"version\s+(\d+\.\d+\.\d+)", out)
    version = match.group(1) if match else None
    ok = done.returncode == 0 and version is not None and _version_tuple(version) >= MIN_R
    detail = exe if ok else (out.splitlines()[0] if out else f"exit status {done.returncode}")
    return _row("R (Rscript)", version, ok, detail, R_FIX)


@contextlib.contextmanager
def _r_console_to_log() -> Iterator[None]:
    """Send R console output to the harness logger while the doctor talks to R."""
    from rpy2.rinterface_lib import callbacks

    old = callbacks.consolewrite_print, callbacks.consolewrite_warnerror

    def to_log(text: str) -> None:
        log.debug("R: %s", text.rstrip())

    callbacks.consolewrite_print = to_log
    callbacks.consolewrite_warnerror = to_log
    try:
        yield
    finally:
        callbacks.consolewrite_print, callbacks.consolewrite_warnerror = old


def _r_versions_rpy2() -> tuple[str, dict[str, str | None]]:
    """R version and package versions (None: does not load) through embedded R."""
    import rpy2.robjects as ro

    from harness._resources import r_script

    with _r_console_to_log():
        env = ro.r("new.env()")
        ro.r["source"](str(r_script("versions.R")), local=env)
        frame = env["harness_versions"](ro.StrVector(list(R_PACKAGES)), check_load=True)
        names = [str(v) for v in frame.rx2("package")]
        found = list(frame.rx2("version"))
    values = dict(zip(names, found, strict=True))
    r_version = str(values.pop("R"))
    versions = {
        name: (None if value is ro.NA_Character or str(value) == "NA" else str(value))
        for name, value in values.items()
    }
    return r_version, versions


def _r_versions_rscript() -> dict[str, str | None]:
    """Package versions through ``Rscript r_scripts/versions.R`` (when rpy2 cannot embed R)."""
    from harness.versions import rscript_versions

    return rscript_versions(check_load=True) or {}


def check_r_stack() -> list[Row]:
    """rpy2 itself, R embedded through rpy2, and the R packages' versions."""
    rows: list[Row] = []
    rpy2_version = _dist_version("rpy2")
    if rpy2_version is None:
        rows.append(_row("rpy2", None, False, "not installed", RPY2_FIX))
    else:
        ok = (3, 5) <= _version_tuple(rpy2_version)[:2] < (3, 6)
        rows.append(_row("rpy2", rpy2_version, ok, "3.5.x required" if not ok else "", RPY2_FIX))

    r_version: str | None = None
    versions: dict[str, str | None] = {}
    embedded = False
    if rpy2_version is not None:
        try:
            r_version, versions = _r_versions_rpy2()
            embedded = True
        except Exception as err:  # ImportError, OSError (libR.so), RRuntimeError, ...
            log.debug("rpy2 cannot embed R", exc_info=True)
            rows.append(
                _row(
                    "R (via rpy2)",
                    None,
                    False,
                    _first_line(err),
                    f"{INSTALL_R}, then reinstall rpy2 so it builds against that R: "
                    "pip install --force-reinstall --no-binary rpy2 'rpy2>=3.5,<3.6'",
                )
            )
    else:
        rows.append(_row("R (via rpy2)", None, False, "rpy2 is not installed", RPY2_FIX))
    if embedded:
        ok = r_version is not None and _version_tuple(r_version) >= MIN_R
        rows.append(
            _row("R (via rpy2)", r_version, ok, "embedded R starts", "R >= 4.2 needed; " + R_FIX)
        )
    else:
        versions = _r_versions_rscript()

    how = "loads in embedded R" if embedded else "loads in Rscript"
    for name, required in R_PACKAGES.items():
        version = versions.get(name)
        if not versions:
            detail = "R not available"
        elif version is None:
            detail = "not installed or does not load"
        else:
            detail = how
        fix = f"{INSTALL_R}; or in R: install.packages('{name}')"
        if name in BRMS_PACKAGES:
            fix = BRMS_FIX
            detail = f"{detail} (optional: the brms engine)"
        rows.append(_row(name, version, version is not None, detail, fix, required=required))
    return rows


# --- Python engine packages ---------------------------------------------------------


def _check_import(piece: str, dist: str, module: str, requirement: str) -> Row:
    version = _dist_version(dist)
    fix = f"pip install '{requirement}'"
    if version is None:
        return _row(piece, None, False, "not installed", fix)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            importlib.import_module(module)
    except Exception as err:
        return _row(piece, version, False, f"import fails: {_first_line(err)}", fix)
    return _row(piece, version, True, "imports")


def check_pytensor_toolchain() -> list[Row]:
    """The C++ compiler and the BLAS PyTensor's C backend links against."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pytensor

            cxx = str(pytensor.config.cxx)
            ldflags = str(pytensor.config.blas__ldflags)
    except Exception as err:
        detail = f"pytensor unavailable: {_first_line(err)}"
        return [_row("PyTensor C++ compiler", None, False, detail, "pip install 'pytensor>=2.18'")]
    rows = [
        _row(
            "PyTensor C++ compiler",
            None,
            bool(cxx),
            cxx or "no g++: PyTensor falls back to slow Python code",
            "install g++ (Debian: apt-get install g++; `bash r_scripts/install_r.sh` does it)",
        ),
        _row(
            "PyTensor BLAS",
            None,
            bool(ldflags),
            ldflags or "not linked: PyTensor's C backend uses NumPy's C API instead (slower)",
            "install OpenBLAS (`bash r_scripts/install_r.sh`, i.e. apt-get install "
            "libopenblas-dev) and set PYTENSOR_FLAGS=blas__ldflags=-lopenblas "
            "(the nox sessions set it)",
            required=False,
        ),
    ]
    return rows


def check_r_scripts() -> Row:
    """The R code the lme4 engine sources, and where it was found."""
    from harness._resources import RScriptsMissingError, r_scripts_origin

    try:
        where = r_scripts_origin()
    except RScriptsMissingError as err:
        return _row(
            "r_scripts/",
            None,
            False,
            _first_line(err),
            "reinstall the harness (pip install .), or set HARNESS_R_SCRIPTS to its r_scripts/",
        )
    return _row("r_scripts/", None, True, where)


# --- the report ------------------------------------------------------------------------


def doctor() -> list[Row]:
    """Check every piece both engines need; one row per piece, failing rows carry a fix."""
    checks: list[Callable[[], Row | list[Row]]] = [
        check_python,
        check_rscript,
        check_r_stack,
        *[functools.partial(_check_import, *package) for package in PY_PACKAGES],
        check_pytensor_toolchain,
        check_r_scripts,
    ]
    rows: list[Row] = []
    for check in checks:
        try:
            result = check()
        except Exception as err:  # a check must never take the doctor down
            log.debug("doctor check failed", exc_info=True)
            name = getattr(check, "__name__", None) or getattr(check, "args", ("check",))[0]
            result = _row(name, None, False, _first_line(err), "report this as a harness bug")
        rows.extend(result if isinstance(result, list) else [result])
    for row in rows:
        if not row["ok"]:
            log.info("doctor: %s not ok (%s); fix: %s", row["piece"], row["detail"], row["fix"])
    return rows


def doctor_ok(rows: list[Row]) -> bool:
    """True when every required piece is ok (optional ones, like BLAS, only cost speed)."""
    return all(row["ok"] or not row.get("required", True) for row in rows)


def format_doctor(rows: list[Row]) -> str:
    """A plain-text table of the rows, then one line per fix."""
    header = ("", "piece", "version", "detail")

    def status(row: Row) -> str:
        if row["ok"]:
            return "ok"
        return "FAIL" if row.get("required", True) else "warn"

    table = [header] + [
        (status(r), str(r["piece"]), str(r["version"] or "-"), str(r["detail"])) for r in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(3)]
    lines = [
        "  ".join(
            [*(cell.ljust(w) for cell, w in zip(line[:3], widths, strict=True)), line[3]]
        ).rstrip()
        for line in table
    ]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * 6)
    fixes = [r for r in rows if not r["ok"]]
    if fixes:
        lines.append("")
        lines.append("To fix:")
        lines.extend(f"  {r['piece']}: {r['fix']}" for r in fixes)
    else:
        lines.append("")
        lines.append("All pieces present.")
    return "\n".join(lines)
