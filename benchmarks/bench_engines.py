"""Benchmark: time and memory of a brms (Stan) fit beside the PyMC fit of the same model.

Run ``python benchmarks/bench_engines.py [--cases NAME ...] [--draws --tune --chains --seed]``
from the repository root (``nox -s bench`` runs it at 4 chains x 1000 draws, 1000 tuning).
Each (engine, case) runs in a fresh child process, so its memory is its own:

- ``pymc``: :func:`harness.engines.pymc.fit_pymc`, one run (``adaptive=False``: the same
  single run of NUTS that brms makes), nutpie, ``target_accept`` 0.8;
- ``brms``: :func:`harness.engines.brms.fit_brms` with the same priors and design,
  ``adapt_delta`` 0.8, chains one after the other in the R of the child (``cores = 1``).
  The Stan program is compiled first (:func:`harness.engines.brms.compiled_model`) and
  kept under ``$HARNESS_CACHE_DIR/brms``: the first run of a model structure compiles
  (minutes), later runs read the compiled program from the cache (``compile cached``).

Columns: compile seconds (PyMC: nutpie's compilation; brms: the C++ compile, or the
read of the cached program), sampling seconds, the child's CPU seconds for the fit (all
threads; child processes, such as brms's C++ compiler, are counted apart in ``children
CPU s``), peak memory, the smallest bulk ESS over every compared quantity
(:func:`harness.engines.adaptive.diagnose`: fixed effects, SDs, correlations, sigma,
offsets of informed groups), bulk ESS per sampling second, the largest R-hat and the
divergences.  Peak memory is the child's ``ru_maxrss``: the **whole child process's
high-water mark** (Python, imports, R, the sampler and its draws), given together with
the resident size after the imports (``rss before fit``) so that the fit's own growth
is their difference; ``children peak`` is the largest child process the child waited for
(on a cold brms compile, the C++ compiler; otherwise a short-lived fork of the child
itself, about its size at the time).

A missing brms (R packages brms/rstan not installed) skips the brms rows with a message
saying so; the PyMC rows are still written.  Writes ``reports/bench/engines.csv`` and
``reports/bench/engines.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_OUT = ROOT / "reports" / "bench"
CASES = ("sleepstudy", "cafe")
ENGINES = ("pymc", "brms")


def _rss_mib() -> float:
    """Resident memory of this process now (Linux), MiB."""
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _diagnose(fit: Any) -> dict[str, Any]:
    from harness.engines.adaptive import AdaptiveSettings, diagnose

    return diagnose(fit.idata, fit.design, AdaptiveSettings())


def _fit_pymc(spec: Any, data: Any, args: argparse.Namespace) -> dict[str, Any]:
    from harness.engines.pymc import fit_pymc

    started = time.process_time()
    fit = fit_pymc(
        spec,
        data,
        seed=args.seed,
        draws=args.draws,
        tune=args.tune,
        chains=args.chains,
        target_accept=0.8,
        adaptive=False,
    )
    return {
        "fit": fit,
        "cpu_s": time.process_time() - started,
        "compile_s": fit.compile_seconds,
        "compile_cached": bool(fit.settings.get("compiled_model_reused")),
    }


def _fit_brms(spec: Any, data: Any, args: argparse.Namespace) -> dict[str, Any]:
    from harness.engines.brms import compiled_model, fit_brms, prepare
    from harness.model.spec import build_design

    started = time.process_time()
    design = build_design(spec, data)
    # Compiled (or read from the cache) here, timed on its own; fit_brms then finds the
    # program in this process and reports compile 0.
    _, cached, compile_s = compiled_model(prepare(design))
    fit = fit_brms(
        spec,
        data,
        seed=args.seed,
        draws=args.draws,
        tune=args.tune,
        chains=args.chains,
        design=design,
        adapt_delta=0.8,
    )
    return {
        "fit": fit,
        "cpu_s": time.process_time() - started,
        "compile_s": compile_s,
        "compile_cached": bool(cached),
    }


def _child(args: argparse.Namespace) -> None:
    """Fit one case with one engine and write its row (run in a fresh process)."""
    import logging
    import warnings

    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    import harness as hz

    row: dict[str, Any] = {"engine": args.engine, "case": args.child}
    if args.engine == "brms":
        from harness.engines.brms import brms_available, brms_versions

        if not brms_available():
            row["skipped"] = (
                "brms is not installed here (R packages brms and rstan): "
                "run `bash r_scripts/install_r.sh --with-brms`"
            )
            Path(args.child_out).write_text(json.dumps(row))
            return
        row["versions"] = brms_versions()
    else:
        import pymc  # noqa: F401 - imported before the fit: an import cost, not the fit's

        from harness.engines.pymc import pymc_versions

        row["versions"] = pymc_versions("nutpie")
    data, spec = hz.datasets.load(args.child)
    row["rss_before_fit_mib"] = _rss_mib()
    wall = time.perf_counter()
    done = _fit_brms(spec, data, args) if args.engine == "brms" else _fit_pymc(spec, data, args)
    row["fit_wall_s"] = time.perf_counter() - wall
    fit = done.pop("fit")
    diag = _diagnose(fit)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    row.update(done)
    row.update(
        {
            "sample_s": fit.sample_seconds,
            "chains": fit.chains,
            "draws": fit.draws,
            "tune": fit.tune,
            "min_ess_bulk": diag["min_ess_bulk"],
            "min_ess_bulk_quantity": diag["min_ess_bulk_quantity"],
            "ess_bulk_per_s": (diag["min_ess_bulk"] or 0.0) / fit.sample_seconds
            if fit.sample_seconds
            else None,
            "max_r_hat": diag["max_r_hat"],
            "divergences": diag["divergences"],
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "children_peak_rss_mib": children.ru_maxrss / 1024,
            "children_cpu_s": children.ru_utime + children.ru_stime,
        }
    )
    Path(args.child_out).write_text(json.dumps(row))


def run_one(engine: str, case: str, args: argparse.Namespace) -> dict[str, Any]:
    """One (engine, case) in a fresh child process; its row, or the error it ended with."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        out = Path(handle.name)
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        case,
        "--engine",
        engine,
        "--child-out",
        str(out),
        *("--draws", str(args.draws), "--tune", str(args.tune)),
        *("--chains", str(args.chains), "--seed", str(args.seed)),
    ]
    load = os.getloadavg()[0]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
            row: dict[str, Any] = {"error": f"exit {done.returncode}: " + " | ".join(tail)}
        else:
            row = json.loads(out.read_text())
    except subprocess.TimeoutExpired:
        row = {"error": f"timed out after {args.timeout} s"}
    finally:
        out.unlink(missing_ok=True)
    row.update({"engine": engine, "case": case, "load_avg_1min_at_start": load})
    return row


COLUMNS = [
    ("case", "case", "{}"),
    ("engine", "engine", "{}"),
    ("compile_s", "compile s", "{:.1f}"),
    ("compile_cached", "cached", "{}"),
    ("sample_s", "sample s", "{:.1f}"),
    ("cpu_s", "fit CPU s", "{:.1f}"),
    ("rss_before_fit_mib", "rss before fit MiB", "{:.0f}"),
    ("peak_rss_mib", "peak MiB", "{:.0f}"),
    ("children_peak_rss_mib", "children peak MiB", "{:.0f}"),
    ("children_cpu_s", "children CPU s", "{:.0f}"),
    ("min_ess_bulk", "min bulk ESS", "{:.0f}"),
    ("ess_bulk_per_s", "ESS/s", "{:.0f}"),
    ("max_r_hat", "max R-hat", "{:.3f}"),
    ("divergences", "div", "{}"),
    ("load_avg_1min_at_start", "load", "{:.1f}"),
]


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table (errors and skips on a line of their own)."""
    lines = [
        "| " + " | ".join(title for _, title, _ in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    notes = []
    for row in rows:
        if "skipped" in row or "error" in row:
            notes.append(f"{row['case']} {row['engine']}: {row.get('skipped') or row['error']}")
            continue
        cells = []
        for key, _, fmt in COLUMNS:
            value = row.get(key)
            cells.append("-" if value is None else fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument("--draws", type=int, default=1000)
    parser.add_argument("--tune", type=int, default=1000)
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--timeout", type=int, default=1800, help="seconds per fit (a cold brms compile included)"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the CSV/JSON")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--engine", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return

    import pandas as pd

    rows = []
    for case in args.cases:
        for engine in args.engines:
            print(f"{case} {engine} ...", file=sys.stderr, flush=True)
            row = run_one(engine, case, args)
            if "skipped" in row:
                print(f"{case} {engine}: skipped: {row['skipped']}", file=sys.stderr)
            rows.append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(args, k) for k in ("draws", "tune", "chains", "seed")}
    frame = pd.DataFrame([{k: v for k, v in r.items() if k != "versions"} for r in rows])
    frame.to_csv(args.out / "engines.csv", index=False)
    (args.out / "engines.json").write_text(
        json.dumps({"settings": settings, "runs": rows}, indent=2, default=str) + "\n"
    )
    print(table(rows))
    print(
        "peak MiB: the whole child process's high-water mark (ru_maxrss: imports, R, "
        "sampler, draws); the fit's own growth is peak minus 'rss before fit'."
    )
    if any("error" in r for r in rows):
        raise SystemExit("some fits failed (see the table)")


if __name__ == "__main__":
    main()
