"""``harness report DESIGN|all``: fit each shipped design (or load it from the cache), write its page.

Composes the pipeline (:func:`harness.pipeline.runner.fit_design`) with the
report (:func:`harness.report.page.render_figures` as the render hook, then
:func:`~harness.report.page.write_report`); the pipeline itself never imports
report code.  With ``HARNESS_WORKERS`` > 1 the designs are fitted in spawned
processes first (each fills the fit cache), then written here in index order.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from harness import progress
from harness._io import check_outputs
from harness.pipeline.runner import REPORT_DESIGNS, DesignResult, fit_design
from harness.pipeline.settings import FitSettings, settings_from_args
from harness.report.page import render_figures, write_index, write_report

if TYPE_CHECKING:
    import argparse

log = logging.getLogger("harness")


def run_report_command(args: argparse.Namespace) -> int:
    """``harness report DESIGN|all``: fit (or load), write the report(s) and, for ``all``, the index.

    Returns
    -------
    int
        0 when every report was written, 1 when any design failed (the
        others are still written, and the index says which failed).
    """
    from harness import datasets

    started = time.perf_counter()
    if args.design == "all":
        if args.out is not None:
            raise ValueError("--out names one file; with 'all' use --out-dir")
        names = list(REPORT_DESIGNS)
    elif args.design in datasets.DATASETS:
        names = [args.design]
    else:
        raise ValueError(
            f"unknown design {args.design!r}; choose one of {sorted(datasets.DATASETS)} or 'all'"
        )
    out_dir = Path(args.out_dir)
    # Before any fit: every page's path is writable and not a special file.
    pages = {
        name: Path(args.out) if args.out is not None else out_dir / f"{name}.html" for name in names
    }
    if args.design == "all":
        pages["index"] = out_dir / "index.html"
    check_outputs({"--out" if args.out else f"report {n}": p for n, p in pages.items()})
    results: list[DesignResult] = []
    failures: dict[str, str] = {}
    parallel = len(names) > 1 and _report_workers(len(names)) > 1
    if parallel:
        failures.update(_fit_in_parallel(names, out_dir, args))
    for name in names:
        path = Path(args.out) if args.out is not None else out_dir / f"{name}.html"
        if name in failures:
            print(f"{name}: FAILED: {failures[name]}", file=sys.stderr)
            continue
        try:
            result = fit_design(
                name,
                render=render_figures,
                seed=args.seed,
                refit=args.refit and not parallel,  # parallel workers refitted already
                settings=settings_from_args(args),
            )
            write_report(result, path)
        except Exception as err:
            if getattr(args, "debug", False):
                raise
            failures[name] = f"{type(err).__name__}: {err}"
            log.error("%s: %s", name, err)
            print(f"{name}: FAILED: {failures[name]}", file=sys.stderr)
            continue
        fits = "cached" if result.cached["lme4"] and result.cached["pymc"] else "fitted"
        print(f"{name}: {result.verdict} ({fits}) -> {path}")
        results.append(result)
    if args.design == "all":
        index = write_index(results, out_dir / "index.html", failures)
        print(f"index -> {index}")
    print(f"done in {time.perf_counter() - started:.1f} s")
    return 1 if failures else 0


def _report_workers(n_designs: int) -> int:
    """Processes for ``report all``: ``HARNESS_WORKERS`` (``0``: one per core), default 1.

    Serial is the default because it measured faster on a 2-core machine
    (benchmarks/bench_scale.py: cold 66 s serial against 80 s in two processes,
    warm 1.7 s against 3.0 s): one process compiles each model structure and
    warms numba once, while every spawned worker pays imports and compiles again.
    """
    text = os.environ.get("HARNESS_WORKERS", "").strip()
    if not text.isdigit():
        return 1
    wanted = int(text) or (os.cpu_count() or 1)
    return max(1, min(n_designs, wanted, os.cpu_count() or 1))


def _fit_one(name: str, seed: int, refit: bool, settings: FitSettings) -> str | None:
    """Worker: fit (or load) one design into the shared cache; its error text, or None."""
    try:
        fit_design(name, seed=seed, refit=refit, settings=settings, render=render_figures)
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return None


def _fit_in_parallel(names: list[str], out_dir: Path, args: argparse.Namespace) -> dict[str, str]:
    """Fit designs in spawned processes (R and a compiler in each), filling the fit cache.

    The parent then loads each design from the cache (no R, no compile) and
    writes the reports in index order, so output order and failure handling
    stay those of the serial loop.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    workers = _report_workers(len(names))
    progress.message(f"fitting {len(names)} designs in {workers} processes")
    failures: dict[str, str] = {}
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = {
            name: pool.submit(_fit_one, name, args.seed, args.refit, settings_from_args(args))
            for name in names
        }
        for name, future in futures.items():
            try:
                error = future.result()
            except Exception as err:  # the worker process itself died
                error = f"{type(err).__name__}: {err}"
            if error is not None:
                if getattr(args, "debug", False):
                    raise RuntimeError(f"{name}: {error}")
                failures[name] = error
                log.error("%s: %s", name, error)
    return failures
