"""Benchmark: ``harness report all`` cold and warm, and the full InstEval through ``harness compare``.

Each command runs in a child process with an empty ``HARNESS_CACHE_DIR``
(cold) and then again on the cache it filled (warm); numba and PyTensor
caches are left as they are (their state is recorded).  The time split per
design (R fit, compile, sampling, compare, same-model check, figures) comes
from the cache entries the cold run wrote.  InstEval (lme4's 73,421 rows,
``y ~ service + (1 | s) + (1 | d)``) is exported by ``Rscript`` to a
temporary CSV; peak memory is the child's ``ru_maxrss``.

Merges ``report_all`` and ``insteval`` into ``reports/bench.json``.
``--skip-report`` or ``--skip-insteval`` leave one out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "reports" / "bench.json"
INSTEVAL_FORMULA = "y ~ service + (1 | s) + (1 | d)"
INSTEVAL_DRAWS = {"HARNESS_DRAWS": "300", "HARNESS_TUNE": "300", "HARNESS_CHAINS": "2"}


def _run(args: list[str], env: dict[str, str], cwd: Path) -> dict[str, Any]:
    """Run the harness CLI in a child; wall seconds, exit status, peak RSS of that child (MB)."""
    code = (
        "import resource, subprocess, sys, json, time\n"
        "t = time.perf_counter()\n"
        "rc = subprocess.call(sys.argv[1:])\n"
        "print(json.dumps({'rc': rc, 'seconds': time.perf_counter() - t,"
        " 'peak_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, sys.executable, "-m", "harness.cli", "--quiet", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["rc"] != 0:
        result["stderr_tail"] = done.stderr[-2000:]
    return result


def _split(cache: Path) -> dict[str, dict[str, float]]:
    """Seconds per stage from the cache entries' metadata, keyed by kind."""
    split: dict[str, dict[str, float]] = {}
    for meta in sorted(cache.glob("*/*.json")):
        kind = meta.parent.name
        data = json.loads(meta.read_text())
        for field in ("fit_seconds", "compile_seconds", "sample_seconds", "seconds"):
            if field in data:
                split.setdefault(f"{kind}:{field}", {})[meta.stem] = float(data[field])
    return split


def _cold_and_warm(args: list[str], env: dict[str, str], workdir: Path) -> dict[str, Any]:
    cache = workdir / "cache"
    env = {**env, "HARNESS_CACHE_DIR": str(cache)}
    cold = _run(args, env, workdir)
    warm = _run(args, env, workdir)
    return {"cold": cold, "warm": warm, "cold_split_seconds": _split(cache)}


def _caches() -> dict[str, str]:
    return {
        "numba": os.environ.get("NUMBA_CACHE_DIR", "(default)"),
        "pytensor": os.environ.get("PYTENSOR_FLAGS", "(default)"),
        "note": "numba and PyTensor caches left as they were (not emptied)",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--skip-report", action="store_true")
    parser.add_argument("--skip-insteval", action="store_true")
    args = parser.parse_args(argv)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    payload = json.loads(OUT.read_text()) if OUT.is_file() else {}
    with tempfile.TemporaryDirectory(prefix="harness-bench-") as tmp:
        tmpdir = Path(tmp)
        if not args.skip_report:
            work = tmpdir / "report"
            work.mkdir()
            row = _cold_and_warm(["report", "all", "--out-dir", str(work / "out")], env, work)
            row["workers"] = os.environ.get("HARNESS_WORKERS") or "1 (default)"
            row["caches"] = _caches()
            payload["report_all"] = row
            print("report all:", json.dumps({k: row[k] for k in ("cold", "warm")}))
        if not args.skip_insteval:
            work = tmpdir / "insteval"
            work.mkdir()
            csv = work / "insteval.csv"
            subprocess.run(
                [
                    "Rscript",
                    "-e",
                    f"data(InstEval, package='lme4'); write.csv(InstEval, '{csv}', row.names=FALSE)",
                ],
                check=True,
            )
            started = time.perf_counter()
            row = _cold_and_warm(
                [
                    "compare",
                    str(csv),
                    "--formula",
                    INSTEVAL_FORMULA,
                    "--out",
                    str(work / "ie.html"),
                ],
                {**env, **INSTEVAL_DRAWS},
                work,
            )
            row.update(
                formula=INSTEVAL_FORMULA,
                rows=73421,
                draws=INSTEVAL_DRAWS,
                total_seconds=time.perf_counter() - started,
            )
            payload["insteval"] = row
            print("InstEval:", json.dumps({k: row[k] for k in ("cold", "warm")}))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(payload, indent=2))
    print(f"-> {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
