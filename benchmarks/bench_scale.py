"""Benchmark issue 14's first-run and scale targets; results go to ``reports/bench.json``.

Each command runs in a child process (the harness CLI, progress lines on), and
its stderr is parsed for the per-stage ``done in`` lines, which give the time
split per design (R fit, compile, sampling, compare, same-model check,
figures) for every run, cold and warm alike.

* ``report_all``: ``harness report all`` with **every cache empty** (new
  numba, PyTensor and harness folders), then again on what it filled (warm),
  then once more with only the harness cache emptied (warm compilers, the
  state of a second project on the same machine).
* ``new_small_model``: a CSV the harness has never seen (``ChickWeight``,
  578 rows, ``weight ~ Time + (1 | Chick)``, exported by ``Rscript``)
  through ``harness compare``, report included, with the compiler caches the
  report run left warm.
* ``insteval``: lme4's full InstEval (73,421 rows, ``y ~ service + (1 | s) +
  (1 | d)``) through ``harness compare``, same-model check included; peak
  memory is the largest child process's ``ru_maxrss``.

``--skip-report``, ``--skip-small`` and ``--skip-insteval`` leave parts out;
other entries of ``reports/bench.json`` are kept.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "reports" / "bench.json"
INSTEVAL_FORMULA = "y ~ service + (1 | s) + (1 | d)"
INSTEVAL_DRAWS = {"HARNESS_DRAWS": "300", "HARNESS_TUNE": "300", "HARNESS_CHAINS": "2"}
SMALL_FORMULA = "weight ~ Time + (1 | Chick)"

#: ``design: stage: done in 12.3 s (detail)`` as harness.progress writes it.
_DONE = re.compile(r"^(?P<design>[^:\[\]]+): (?P<stage>[^:]+): done in (?P<seconds>[0-9.]+) s")
_STAGES = {
    "R fit (lme4)": "r_fit",
    "PyMC fit": "pymc_fit",
    "PyMC compile (nutpie, numba)": "compile",
    "compare": "compare",
    "same-model check": "same_model",
    "figures": "figures",
}


def _run(args: list[str], env: dict[str, str], cwd: Path) -> dict[str, Any]:
    """Run the harness CLI in a child: wall seconds, exit status, peak RSS (MB), time split,
    and the longest silence on stderr (the progress promise: a line at least every 5 s)."""
    code = (
        "import resource, subprocess, sys, json, time\n"
        "t = time.perf_counter()\n"
        "rc = subprocess.call(sys.argv[1:])\n"
        "print(json.dumps({'rc': rc, 'seconds': time.perf_counter() - t,"
        " 'peak_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))\n"
    )
    env = {k: v for k, v in env.items() if k != "HARNESS_QUIET"}
    started = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, "-c", code, sys.executable, "-m", "harness.cli", *args],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[tuple[float, str]] = []

    def read_stderr() -> None:
        assert child.stderr is not None
        for line in child.stderr:
            lines.append((time.perf_counter(), line))

    reader = threading.Thread(target=read_stderr)
    reader.start()
    stdout = child.stdout.read() if child.stdout is not None else ""
    child.wait()
    reader.join()
    ended = time.perf_counter()
    result = json.loads(stdout.strip().splitlines()[-1])
    stderr = "".join(line for _, line in lines)
    stamps = [started, *(t for t, _ in lines), ended]
    result["split_seconds"] = split(stderr)
    result["longest_silence_seconds"] = round(max(b - a for a, b in itertools.pairwise(stamps)), 2)
    if result["rc"] != 0:
        result["stderr_tail"] = stderr[-2000:]
    return result


def split(stderr: str) -> dict[str, dict[str, float]]:
    """Seconds per design and stage from progress lines, summed over the lines of a stage.

    Adaptive sampling compiles and samples once per round, so a stage can end
    several times (InstEval: two compiles and four sampling runs); the sum is
    the time spent.  ``pymc_fit`` is the whole PyMC stage (compiles, sampling
    runs, the diagnostics between rounds, storing the draws).  In ``report
    all`` with workers the parent loads each design from the cache after the
    workers fitted it (``done in 0.0 s (cached)``), which adds nothing.
    """
    table: dict[str, dict[str, float]] = {}
    for line in stderr.splitlines():
        match = _DONE.match(line.strip())
        if match is None:
            continue
        stage = match["stage"]
        key = "sampling" if stage.startswith("sampling ") else _STAGES.get(stage)
        if key is None:
            continue
        row = table.setdefault(match["design"], {})
        row[key] = round(row.get(key, 0.0) + float(match["seconds"]), 2)
    return table


def _compiler_env(base: dict[str, str], caches: Path) -> dict[str, str]:
    """``base`` with numba's and PyTensor's caches (and the harness's) under ``caches``."""
    flags = [f"base_compiledir={caches / 'pytensor'}"]
    user = base.get("PYTENSOR_FLAGS", "")
    flags += [f for f in user.split(",") if f and not f.startswith("base_compiledir=")]
    return {
        **base,
        "PYTENSOR_FLAGS": ",".join(flags),
        "NUMBA_CACHE_DIR": str(caches / "numba"),
        "HARNESS_CACHE_DIR": str(caches / "harness"),
    }


def _export_csv(dataset: str, package: str, path: Path) -> None:
    script = (
        f"data({dataset}, package='{package}'); "
        f"write.csv(as.data.frame({dataset}), '{path}', row.names=FALSE)"
    )
    subprocess.run(["Rscript", "-e", script], check=True)


def bench_report_all(env: dict[str, str], tmpdir: Path) -> dict[str, Any]:
    caches = tmpdir / "caches"
    env = _compiler_env(env, caches)
    args = ["report", "all", "--out-dir", str(tmpdir / "out")]
    cold = _run(args, env, tmpdir)
    warm = _run(args, env, tmpdir)
    shutil.rmtree(caches / "harness")
    compilers_warm = _run(args, env, tmpdir)
    return {
        "cold": cold,
        "warm": warm,
        "harness_cache_empty_compilers_warm": compilers_warm,
        "workers": os.environ.get("HARNESS_WORKERS") or "default (one per core)",
        "caches": "cold: new numba, PyTensor and harness cache folders",
    }


def bench_small_model(env: dict[str, str], tmpdir: Path, caches: Path) -> dict[str, Any]:
    csv = tmpdir / "chickweight.csv"
    _export_csv("ChickWeight", "datasets", csv)
    env = _compiler_env(env, caches)
    env["HARNESS_CACHE_DIR"] = str(tmpdir / "harness-cache")  # never seen by the harness
    run = _run(
        ["compare", str(csv), "--formula", SMALL_FORMULA, "--out", str(tmpdir / "small.html")],
        env,
        tmpdir,
    )
    return {
        "formula": SMALL_FORMULA,
        "rows": 578,
        "run": run,
        "caches": "numba and PyTensor warm (from report_all), harness cache empty",
    }


def bench_insteval(env: dict[str, str], tmpdir: Path) -> dict[str, Any]:
    csv = tmpdir / "insteval.csv"
    _export_csv("InstEval", "lme4", csv)
    env = {**env, **INSTEVAL_DRAWS, "HARNESS_CACHE_DIR": str(tmpdir / "insteval-cache")}
    args = ["compare", str(csv), "--formula", INSTEVAL_FORMULA, "--out", str(tmpdir / "ie.html")]
    started = time.perf_counter()
    cold = _run(args, env, tmpdir)
    warm = _run(args, env, tmpdir)
    return {
        "formula": INSTEVAL_FORMULA,
        "rows": 73421,
        "draws": INSTEVAL_DRAWS,
        "cold": cold,
        "warm": warm,
        "total_seconds": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--skip-report", action="store_true")
    parser.add_argument("--skip-small", action="store_true")
    parser.add_argument("--skip-insteval", action="store_true")
    args = parser.parse_args(argv)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    payload = json.loads(OUT.read_text()) if OUT.is_file() else {}
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="harness-bench-") as tmp:
        tmpdir = Path(tmp)
        if not args.skip_report:
            row = bench_report_all(env, tmpdir)
            row["load_at_start"] = load
            payload["report_all"] = row
            cold, warm = row["cold"], row["warm"]
            again = row["harness_cache_empty_compilers_warm"]
            print(
                f"report all: cold {cold['seconds']:.1f} s (longest silence "
                f"{cold['longest_silence_seconds']:.1f} s), warm {warm['seconds']:.1f} s, "
                f"compilers warm {again['seconds']:.1f} s"
            )
        if not args.skip_small:
            caches = tmpdir / "caches"
            if not caches.is_dir():  # report part skipped: use the session's own caches
                caches = Path(env.get("NUMBA_CACHE_DIR", tmpdir / "numba")).parent
            row = bench_small_model(env, tmpdir, caches)
            payload["new_small_model"] = row
            print(f"new small model: {row['run']['seconds']:.1f} s")
        if not args.skip_insteval:
            row = bench_insteval(env, tmpdir)
            payload["insteval"] = row
            cold, warm = row["cold"], row["warm"]
            print(
                f"InstEval: cold {cold['seconds']:.1f} s (peak {cold['peak_mb']:.0f} MB), "
                f"warm {warm['seconds']:.1f} s"
            )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(payload, indent=2))
    print(f"-> {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
