"""``harness report DESIGN|all``: fit each shipped design (or load it from the cache), write its page.

Composes the pipeline (:func:`harness.pipeline.runner.fit_design`) with the
report (:func:`harness.report.page.render_figures` as the render hook, then
:func:`~harness.report.page.write_report`); the pipeline itself never imports
report code.  When several designs need fitting and more than one core is
free, their stages run in spawned processes first
(:mod:`harness.pipeline.schedule`; each task fills the fit cache), then the
pages are written here in index order.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from harness import progress
from harness._io import check_outputs
from harness.pipeline.runner import REPORT_DESIGNS, STAGES, DesignResult, fit_design
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
    settings = settings_from_args(args)
    workers = _report_workers(args, names, settings)
    parallel = workers > 1
    in_workers: set[str] = set()
    if parallel:
        in_workers, worker_failures = _fit_in_parallel(names, workers, args, settings)
        failures.update(worker_failures)
    for name in names:
        path = Path(args.out) if args.out is not None else out_dir / f"{name}.html"
        if name in failures:
            print(f"{name}: FAILED: {failures[name]}", file=sys.stderr)
            continue
        try:
            # Designs the workers fitted load from the cache: their stages were reported there.
            loading = progress.silenced() if name in in_workers else contextlib.nullcontext()
            with loading:
                result = fit_design(
                    name,
                    render=render_figures,
                    seed=args.seed,
                    refit=args.refit and not parallel,  # parallel workers refitted already
                    settings=settings,
                    side_process=len(names) == 1,
                    engines=getattr(args, "engines", None),
                )
            write_report(result, path)
        except Exception as err:
            if getattr(args, "debug", False):
                raise
            failures[name] = f"{type(err).__name__}: {err}"
            log.error("%s: %s", name, err)
            print(f"{name}: FAILED: {failures[name]}", file=sys.stderr)
            continue
        fits = (
            "fitted"
            if name in in_workers or not all(result.cached[n] for n in result.engines)
            else "cached"
        )
        print(f"{name}: {result.verdict} ({fits}) -> {path}")
        results.append(result)
    if args.design == "all":
        index = write_index(results, out_dir / "index.html", failures)
        print(f"index -> {index}")
    print(f"done in {time.perf_counter() - started:.1f} s")
    return 1 if failures else 0


def _report_workers(args: argparse.Namespace, names: list[str], settings: FitSettings) -> int:
    """Worker processes for this run: 1 (serial) unless several designs need fitting.

    ``--workers`` or ``HARNESS_WORKERS`` set the number (``0``: one per core;
    default: the cores this process may use).  Serial when only one design is
    asked for, when ``--workers 1``, and when every stage of every design is
    already in the cache (spawning would only add start-up time).
    """
    from harness.pipeline.runner import missing_stages
    from harness.pipeline.schedule import default_workers

    wanted = getattr(args, "workers", None)
    if len(names) < 2 or default_workers(len(names), wanted) < 2:
        return 1
    if args.refit:
        return default_workers(len(names), wanted)
    try:
        todo = [
            n
            for n in names
            if missing_stages(n, seed=args.seed, settings=settings, render=render_figures)
        ]
    except Exception as err:  # the serial loop reports a broken design with its own error
        log.debug("could not check the cache (%s); fitting serially", err)
        return 1
    return default_workers(len(todo), wanted) if len(todo) >= 2 else 1


def _fit_in_parallel(
    names: list[str], workers: int, args: argparse.Namespace, settings: FitSettings
) -> tuple[set[str], dict[str, str]]:
    """Fit the designs' stages in spawned processes (:mod:`harness.pipeline.schedule`).

    The parent then loads each design from the cache (no R, no compile) and
    writes the reports in index order, so output order and failure handling
    stay those of the serial loop.  Returns the designs given tasks, and the
    failed ones with their errors.
    """
    from harness.pipeline import schedule
    from harness.pipeline.runner import missing_stages

    missing = (
        {n: list(STAGES) for n in names}
        if args.refit
        else {
            n: missing_stages(n, seed=args.seed, settings=settings, render=render_figures)
            for n in names
        }
    )
    tasks = schedule.plan(missing)
    failures = schedule.run(
        tasks,
        schedule.execute_design_task,
        workers=workers,
        arguments=(args.seed, bool(args.refit), settings, render_figures),
    )
    if failures and getattr(args, "debug", False):
        raise RuntimeError("; ".join(f"{n}: {e}" for n, e in failures.items()))
    for name, error in failures.items():
        log.error("%s: %s", name, error)
    return {task.design for task in tasks}, failures
