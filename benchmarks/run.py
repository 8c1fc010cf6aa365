"""Benchmark: lme4 and PyMC (nutpie) fit times, ESS per second, memory, cold and warm.

Run ``nox -s bench`` or ``python benchmarks/run.py`` from the repository root.
Each case runs in a fresh child process, so "cold" means what a new process
pays (R start-up, imports, nutpie compilation against the on-disk caches) and
the peak memory is that child's own (``ru_maxrss``: native memory included,
which tracemalloc would miss).  "Warm" is a second fit of the same structure
in the same process: the compiled model is reused and new data swapped in.

Writes ``reports/bench.json`` and prints one table.  ``--cases`` selects cases
by name prefix; ``--list`` lists them.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # running from a checkout without installing the package
    sys.path.insert(0, str(ROOT))

DEFAULT_OUT = ROOT / "reports" / "bench.json"
DRAWS = {"draws": 1000, "tune": 1000, "chains": 4, "adaptive": False}
STUDY_REPLICATES = 20
OPENBLAS = "-lopenblas"


# --------------------------------------------------------------------------- measuring (child)


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _timed(function: Callable[[], Any]) -> tuple[Any, float, float]:
    """(result, wall seconds, CPU seconds of this process, all threads)."""
    cpu, wall = _cpu(), time.perf_counter()
    result = function()
    return result, time.perf_counter() - wall, _cpu() - cpu


def min_bulk_ess(fit: Any) -> float:
    """Smallest bulk ESS over the parameters a comparison reports (not z, not Cholesky parts)."""
    import arviz as az
    import numpy as np

    posterior = fit.idata.posterior
    names = [v for v in posterior.data_vars if not v.startswith(("z_", "chol_")) and "__" not in v]
    ess = az.ess(posterior[names], method="bulk")
    # Correlation-matrix diagonals are constant 1: their ESS is undefined, not small.
    values = np.concatenate([np.ravel(ess[name].values) for name in names])
    return float(np.nanmin(values))


def _pymc_row(prefix: str, fit: Any, wall: float, cpu: float) -> dict[str, Any]:
    ess = min_bulk_ess(fit)
    return {
        f"{prefix}_compile_s": fit.compile_seconds,
        f"{prefix}_sample_s": fit.sample_seconds,
        f"{prefix}_fit_s": wall,
        f"{prefix}_cpu_s": cpu,
        f"{prefix}_min_ess": ess,
        f"{prefix}_ess_per_s": ess / fit.sample_seconds,
        f"{prefix}_divergences": fit.n_divergent,
    }


def _lme4_twice(spec: Any, data: Any) -> dict[str, Any]:
    import harness as hz
    from harness.engines.lme4 import r_available

    if not r_available():
        return {"lme4_note": "R/lme4 unavailable"}
    _, cold, _ = _timed(lambda: hz.fit_lme4(spec, data, n_sims=0))
    _, warm, _ = _timed(lambda: hz.fit_lme4(spec, data, n_sims=0))
    return {"lme4_cold_s": cold, "lme4_warm_s": warm}


def _both_engines(spec: Any, data: Any, sampler: str = "nutpie") -> dict[str, Any]:
    import harness as hz

    row = _lme4_twice(spec, data)
    fit, wall, cpu = _timed(lambda: hz.fit_pymc(spec, data, seed=1, sampler=sampler, **DRAWS))
    row |= _pymc_row("cold", fit, wall, cpu)
    del fit  # a study keeps one fit's draws at a time; so does the peak-memory figure
    gc.collect()
    fit, wall, cpu = _timed(lambda: hz.fit_pymc(spec, data, seed=2, sampler=sampler, **DRAWS))
    row |= _pymc_row("warm", fit, wall, cpu)
    row["n_rows"] = fit.design.n
    return row


def case_design(name: str) -> dict[str, Any]:
    import harness as hz

    data, spec = hz.datasets.load(name)
    return _both_engines(spec, data)


def case_groups(n_groups: int) -> dict[str, Any]:
    import harness as hz

    spec = hz.datasets.load("cafe")[1]
    return _both_engines(spec, hz.datasets.simulate_cafe(seed=1, n_cafes=n_groups))


def case_study() -> dict[str, Any]:
    """One replicate = new data of the cafe structure, fitted by both engines."""
    import harness as hz
    from harness.engines.lme4 import r_available

    spec = hz.datasets.load("cafe")[1]
    with_r = r_available()
    lme4_s, pymc_s, cpu_s, sample_s, compile_s, ess = [], [], [], [], [], []
    for replicate in range(STUDY_REPLICATES + 1):
        data = hz.datasets.simulate_cafe(seed=1000 + replicate)
        if with_r:
            _, seconds, _ = _timed(lambda d=data: hz.fit_lme4(spec, d, n_sims=0))
            lme4_s.append(seconds)
        fit, seconds, cpu = _timed(
            lambda d=data, r=replicate: hz.fit_pymc(spec, d, seed=r, **DRAWS)
        )
        if replicate == 0:  # compiles the structure; the study's replicates follow
            compile_s.append(fit.compile_seconds)
            continue
        pymc_s.append(seconds)
        cpu_s.append(cpu)
        sample_s.append(fit.sample_seconds)
        ess.append(min_bulk_ess(fit))
    row: dict[str, Any] = {
        "replicates": STUDY_REPLICATES,
        "cold_compile_s": compile_s[0],
        "pymc_replicate_median_s": statistics.median(pymc_s),
        "pymc_replicate_max_s": max(pymc_s),
        "warm_sample_s": statistics.median(sample_s),
        "warm_cpu_s": statistics.median(cpu_s),
        "warm_min_ess": min(ess),
        "warm_ess_per_s": statistics.median(e / s for e, s in zip(ess, sample_s, strict=True)),
    }
    if with_r:
        row["lme4_cold_s"] = lme4_s[0]
        row["lme4_warm_s"] = statistics.median(lme4_s[1:])
        totals = [a + b for a, b in zip(lme4_s[1:], pymc_s, strict=True)]
        row["replicate_median_s"] = statistics.median(totals)
    return row


def case_pymc_sampler() -> dict[str, Any]:
    """PyMC's own NUTS against nutpie on cafe, warm, in one process: the ESS/s ratio."""
    import harness as hz

    data, spec = hz.datasets.load("cafe")
    row: dict[str, Any] = {}
    for sampler, prefix in (("pymc", "pymc"), ("nutpie", "nutpie")):
        hz.fit_pymc(spec, data, seed=1, sampler=sampler, **DRAWS)  # compile / warm up
        fit, wall, cpu = _timed(
            lambda s=sampler: hz.fit_pymc(spec, data, seed=2, sampler=s, **DRAWS)
        )
        part = _pymc_row("warm", fit, wall, cpu)
        row |= {k.replace("warm_", f"{prefix}_"): v for k, v in part.items()}
    row["warm_sample_s"] = row["nutpie_sample_s"]
    row["warm_min_ess"] = row["nutpie_min_ess"]
    row["warm_ess_per_s"] = row["nutpie_ess_per_s"]
    row["warm_cpu_s"] = row["nutpie_cpu_s"]
    row["speedup_ess_per_s"] = row["nutpie_ess_per_s"] / row["pymc_ess_per_s"]
    import pytensor

    row["blas_ldflags"] = pytensor.config.blas__ldflags
    return row


def case_compile() -> dict[str, Any]:
    """Compile cafe in a fresh process against whatever on-disk caches the environment names."""
    import pytensor

    import harness as hz

    data, spec = hz.datasets.load("cafe")
    fit, wall, cpu = _timed(lambda: hz.fit_pymc(spec, data, seed=1, **DRAWS))
    row = _pymc_row("cold", fit, wall, cpu)
    row["base_compiledir"] = str(pytensor.config.base_compiledir)
    return row


# --------------------------------------------------------------------------- cases (parent)


def _openblas_available() -> bool:
    import ctypes.util

    return ctypes.util.find_library("openblas") is not None


def cases() -> dict[str, dict[str, Any]]:
    """name -> {call: (function, args), env: extra environment, note: what it shows}."""
    found: dict[str, dict[str, Any]] = {}
    for name in ("sleepstudy", "cafe", "partially_clustered", "partially_clustered_hetero", "cbpp"):
        found[f"design:{name}"] = {"call": ("case_design", [name]), "note": "shipped design"}
    for groups in (20, 200, 2000):
        found[f"groups:{groups}x10"] = {
            "call": ("case_groups", [groups]),
            "note": "cafe-like, correlated intercept and slope",
        }
    found["study:cafe"] = {
        "call": ("case_study", []),
        "note": f"{STUDY_REPLICATES} replicates, new data, same structure, both engines",
    }
    found["sampler:pymc-vs-nutpie"] = {
        "call": ("case_pymc_sampler", []),
        "note": "PyMC's NUTS vs nutpie, cafe, same process",
        "env": {"PYTENSOR_FLAGS": _flags(blas="")},
    }
    if _openblas_available():
        found["sampler:pymc-vs-nutpie+openblas"] = {
            "call": ("case_pymc_sampler", []),
            "note": f"as above, PyTensor C backend linked with {OPENBLAS}",
            "env": {"PYTENSOR_FLAGS": _flags(blas=OPENBLAS)},
        }
    found["compile:empty-cache"] = {
        "call": ("case_compile", []),
        "note": "cafe, fresh process, empty PyTensor/numba caches",
        "env": "empty-cache",
    }
    found["compile:warm-cache"] = {
        "call": ("case_compile", []),
        "note": "cafe, fresh process, on-disk caches warm",
    }
    return found


def _flags(blas: str | None = None, base: str | None = None) -> str:
    """PYTENSOR_FLAGS with ``blas__ldflags`` / ``base_compiledir`` replaced, others kept."""
    current = [f for f in os.environ.get("PYTENSOR_FLAGS", "").split(",") if f]
    keep = [
        f
        for f in current
        if not (blas is not None and f.startswith("blas__ldflags="))
        and not (base is not None and f.startswith(("base_compiledir=", "compiledir=")))
    ]
    if blas is not None:
        keep.append(f"blas__ldflags={blas}")
    if base is not None:
        keep.append(f"base_compiledir={base}")
    return ",".join(keep)


def run_case(name: str, case: dict[str, Any], timeout: int) -> dict[str, Any]:
    """Run one case in a fresh child process; its row plus the child's peak memory."""
    env = dict(os.environ)
    scratch = None
    extra = case.get("env")
    if extra == "empty-cache":
        scratch = tempfile.TemporaryDirectory(prefix="harness-bench-cache-")
        env["PYTENSOR_FLAGS"] = _flags(base=scratch.name)
        env["NUMBA_CACHE_DIR"] = os.path.join(scratch.name, "numba")
    elif extra:
        env.update(extra)
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        out = Path(handle.name)
    function, args = case["call"]
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        function,
        "--child-out",
        str(out),
        *map(str, args),
    ]
    load = os.getloadavg()[0]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
            row = {"error": f"exit {done.returncode}: " + " | ".join(tail)}
        else:
            row = json.loads(out.read_text())
    except subprocess.TimeoutExpired:
        row = {"error": f"timed out after {timeout} s"}
    finally:
        out.unlink(missing_ok=True)
        if scratch is not None:
            scratch.cleanup()
    row.update(
        {
            "case": name,
            "note": case["note"],
            "case_wall_s": time.perf_counter() - started,
            "load_avg_1min_at_start": load,
        }
    )
    return row


def _child(function: str, out: str, args: list[str]) -> None:
    import logging
    import warnings

    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    converted = [int(a) if a.isdigit() else a for a in args]
    row = globals()[function](*converted)
    row["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(out).write_text(json.dumps(row))


# --------------------------------------------------------------------------- report


COLUMNS = [
    ("case", "case", "{}"),
    ("lme4_cold_s", "lme4 cold s", "{:.2f}"),
    ("lme4_warm_s", "lme4 warm s", "{:.3f}"),
    ("cold_compile_s", "compile s", "{:.1f}"),
    ("cold_sample_s", "sample cold s", "{:.2f}"),
    ("warm_sample_s", "sample warm s", "{:.2f}"),
    ("warm_min_ess", "min ESS", "{:.0f}"),
    ("warm_ess_per_s", "ESS/s", "{:.0f}"),
    ("warm_cpu_s", "warm CPU s", "{:.2f}"),
    ("peak_rss_mib", "peak MiB", "{:.0f}"),
    ("load_avg_1min_at_start", "load", "{:.1f}"),
]


def table(rows: list[dict[str, Any]]) -> str:
    cells = [[title for _, title, _ in COLUMNS]]
    for row in rows:
        line = []
        for key, _, fmt in COLUMNS:
            value = row.get(key)
            line.append("-" if value is None else fmt.format(value))
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    text = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in cells
    ]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def summary_lines(rows: list[dict[str, Any]]) -> list[str]:
    by = {r["case"]: r for r in rows if "error" not in r}
    lines = []
    for name in ("sampler:pymc-vs-nutpie", "sampler:pymc-vs-nutpie+openblas"):
        r = by.get(name)
        if r:
            lines.append(
                f"{name}: nutpie {r['nutpie_ess_per_s']:.0f} ESS/s ({r['nutpie_sample_s']:.2f} s), "
                f"PyMC NUTS {r['pymc_ess_per_s']:.0f} ESS/s ({r['pymc_sample_s']:.2f} s): "
                f"speed-up {r['speedup_ess_per_s']:.1f}x [blas_ldflags={r['blas_ldflags']!r}]"
            )
    base = by.get("groups:20x10")
    if base and "warm_sample_s" in base:
        parts = []
        for groups in (20, 200, 2000):
            r = by.get(f"groups:{groups}x10")
            if r and "warm_sample_s" in r:
                lme4 = (
                    f", lme4 x{r['lme4_warm_s'] / base['lme4_warm_s']:.1f}"
                    if "lme4_warm_s" in r and "lme4_warm_s" in base
                    else ""
                )
                parts.append(
                    f"{groups}: sampling x{r['warm_sample_s'] / base['warm_sample_s']:.1f}"
                    f" ({r['warm_sample_s']:.1f} s){lme4}"
                )
        lines.append("growth from 20 groups: " + "; ".join(parts))
    study = by.get("study:cafe")
    if study:
        total = study.get("replicate_median_s")
        lines.append(
            f"study replicate (median of {study['replicates']}): PyMC "
            f"{study['pymc_replicate_median_s']:.2f} s (sampling {study['warm_sample_s']:.2f} s)"
            + (f", lme4 {study['lme4_warm_s']:.3f} s, both {total:.2f} s" if total else "")
            + f"; compiled once in {study['cold_compile_s']:.1f} s"
        )
    for name in ("compile:empty-cache", "compile:warm-cache"):
        r = by.get(name)
        if r:
            lines.append(
                f"{name}: compile {r['cold_compile_s']:.1f} s "
                f"(whole first fit {r['cold_fit_s']:.1f} s, CPU {r['cold_cpu_s']:.1f} s)"
            )
    for r in rows:
        if "error" in r:
            lines.append(f"{r['case']}: FAILED {r['error']}")
    return lines


def environment() -> dict[str, Any]:
    import harness

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cores": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "harness": harness.__version__,
        "draws": DRAWS,
        "PYTENSOR_FLAGS": os.environ.get("PYTENSOR_FLAGS", ""),
        "NUMBA_CACHE_DIR": os.environ.get("NUMBA_CACHE_DIR", ""),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        from harness.engines.pymc import pymc_versions

        info["versions"] = pymc_versions("nutpie")
    except Exception as err:
        info["versions"] = {"error": str(err)}
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=None, help="name prefixes to run")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per case")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    parser.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.child:
        _child(options.child, options.child_out, options.args)
        return 0
    available = cases()
    if options.list:
        for name, case in available.items():
            print(f"{name:34s} {case['note']}")
        return 0
    chosen = {
        n: c
        for n, c in available.items()
        if options.cases is None or any(n.startswith(p) for p in options.cases)
    }
    if not chosen:
        parser.error(f"no case matches {options.cases}; known: {list(available)}")
    rows = []
    for name, case in chosen.items():
        print(f"... {name}", flush=True)
        rows.append(run_case(name, case, options.timeout))
    report = {"environment": environment(), "cases": rows}
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps(report, indent=2))
    print()
    print(table(rows))
    print()
    for line in summary_lines(rows):
        print(line)
    print(f"\nwrote {options.out}")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
