"""Simulation studies: coverage, bias, RMSE, Type I error, power and SBC.

A study is a data generator with known truth, a grid of conditions and a list
of fitters (:mod:`harness.studies.core`).  Named studies
(``harness study list``):

- ``partially_clustered``: the partially clustered trial over ICC 0, 0.05,
  0.1, 0.2 (defined within the treatment arm, ``group_sd^2 / (group_sd^2 +
  sigma_treatment^2)``), residual SD ratio 1 and 2, effect 0 and 0.5, groups
  of 5 and 10; fitters ``lm``, ``lme4`` (Satterthwaite), ``nlme_hetero``
  (nlme df), ``nlme_hetero_satt`` (Welch-Satterthwaite df), ``pymc_homo``,
  ``pymc_hetero``.
- ``partially_clustered_type1``: its ICC 0.1 / ratio 2 / effect 0 / groups of
  10 cell, all fitters.
- ``cafe_sbc``: simulation-based calibration of the PyMC cafe model.
- ``smoke``: two cells with the fast fitters (tests, benchmark).

Running::

    harness study partially_clustered_type1 --reps 200          # 2 local processes
    harness study cafe_sbc --workers 2 --out-dir reports/studies
    harness study smoke --scheduler tcp://scheduler:8786        # a Dask cluster

Results go to ``<out-dir>/<name>/results/part-*.parquet`` as replicates
finish; running the same command again resumes (finished replicates are
skipped, the final table is identical).  ``<out-dir>/<name>/report.html`` and
``summary.csv`` are rewritten at the end.

On a Dask cluster every worker needs this package (``pip install -e
'.[study]'`` in a checkout, or set ``HARNESS_R_SCRIPTS`` to its
``r_scripts/``), R with lme4, nlme and lmerTest, and the same Python
environment; the scheduler needs the package importable too (it unpickles the
task graph).  Start ``dask scheduler`` on one machine and ``dask worker
tcp://SCHEDULER:8786 --nworkers N --nthreads 1`` on each worker machine, then
``harness study NAME --scheduler tcp://SCHEDULER:8786``.  Each Dask worker
runs its tasks in one helper process of its own (R on a main thread, one
compiled PyMC model per structure).

In Python::

    from harness.studies.command import get_study, run_study, summarise
    run = run_study(get_study("smoke"), "out/smoke", reps=10)
    summarise(run.results)
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from harness.studies.catalog import STUDIES, get_study, list_studies
from harness.studies.core import (
    KEY_COLUMNS,
    RESULT_DTYPES,
    VOLATILE_COLUMNS,
    Condition,
    Fitter,
    Study,
    Task,
    replicate_seed_sequence,
    replicate_seeds,
    run_task,
)
from harness.studies.execute import ResultStore, StudyRun, run_study
from harness.studies.report import StudyTables, study_tables, write_study_report
from harness.studies.sbc import ecdf_band, ecdf_difference, rank_uniformity, sbc_summary
from harness.studies.summary import nominal_check, performance, summarise, verdicts

log = logging.getLogger("harness")

__all__ = [
    "KEY_COLUMNS",
    "RESULT_DTYPES",
    "STUDIES",
    "VOLATILE_COLUMNS",
    "Condition",
    "Fitter",
    "ResultStore",
    "Study",
    "StudyRun",
    "StudyTables",
    "Task",
    "ecdf_band",
    "ecdf_difference",
    "get_study",
    "list_studies",
    "nominal_check",
    "performance",
    "rank_uniformity",
    "replicate_seed_sequence",
    "replicate_seeds",
    "run_study",
    "run_study_command",
    "run_task",
    "sbc_summary",
    "study_tables",
    "summarise",
    "verdicts",
    "write_study_report",
]


def run_and_report(
    study: Study, out_dir: Path, **options: Any
) -> tuple[StudyRun, StudyTables, Path]:
    """Run (or resume) a study, then write ``summary.csv`` and ``report.html`` into ``out_dir``."""
    run = run_study(study, out_dir, **options)
    tables = study_tables(study, run.results)
    tables.summary.to_csv(Path(out_dir) / "summary.csv", index=False)
    if tables.sbc is not None:
        tables.sbc.to_csv(Path(out_dir) / "sbc.csv", index=False)
    replicates = run.results.drop_duplicates(["condition", "rep"]).shape[0]
    run_info = {
        "reps": run.reps,
        "root_seed": run.root_seed,
        "n_rows": len(run.results),
        "tasks (condition x replicate x fitter)": run.n_tasks,
        "run this time": run.n_run,
        "complete": run.complete,
        "executor": run.executor,
        "wall seconds (this run)": f"{run.seconds:.1f}",
        "replicates (condition x rep) run this time": run.n_replicates_run,
        "replicates per minute (this run, all fitters)": (
            f"{60 * run.n_replicates_run / run.seconds:.2f}" if run.n_run else "n/a"
        ),
        "replicates (condition x rep) in the table": replicates,
        "results folder": str(Path(out_dir) / "results"),
    }
    runs = ResultStore(out_dir, study, run.root_seed).runs()
    if not runs.empty and {"tasks_run", "seconds", "replicates_run"} <= set(runs.columns):
        runs["replicates_per_minute"] = (60 * runs["replicates_run"] / runs["seconds"]).round(2)
    path = write_study_report(
        study,
        run.results,
        Path(out_dir) / "report.html",
        run_info=run_info,
        tables=tables,
        runs=runs,
    )
    return run, tables, path


def run_study_command(args: argparse.Namespace) -> int:
    """``harness study NAME [--reps N] [--scheduler ADDRESS] [--out-dir DIR] [--seed S] [--workers W]``.

    ``NAME`` ``list`` prints the named studies.  Exit code 0 when every
    requested replicate is done, 1 otherwise.
    """
    if args.name == "list":
        for name, text in list_studies():
            print(f"{name:28s} {text}")
        return 0
    from harness._io import check_outputs

    study = get_study(args.name)
    out_dir = Path(args.out_dir) / study.name
    # Before any fit: the report can be written there (not a special file, folder writable).
    check_outputs({"--out-dir": out_dir / "report.html"})
    run, tables, path = run_and_report(
        study,
        out_dir,
        reps=args.reps,
        root_seed=args.seed,
        workers=args.workers,
        scheduler=args.scheduler,
        progress=True,
    )
    print(
        f"{study.name}: {run.n_tasks} fits ({run.n_run} run now) in {run.seconds:.0f} s "
        f"with {run.executor}; results in {out_dir / 'results'}"
    )
    for sentence in [*tables.verdicts.get("sentence", []), *tables.sbc_sentences]:
        print("  " + sentence)
    failed = int(run.results["error"].notna().sum())
    if failed:
        print(f"  {failed} fits failed; see the report")
    print(f"report: {path}")
    return 0 if run.complete else 1
