"""Replicates per minute of a simulation study, locally and on a Dask LocalCluster (issue 6).

Runs the ``smoke`` study (lm, lme4, nlme on two partially clustered cells)
with 2 local worker processes and with a 2-worker ``LocalCluster``, prints a
table and writes ``reports/bench_study.json``.

Run: ``python benchmarks/bench_study.py [--reps N]`` (``nox -s bench`` runs it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tempfile  # noqa: E402
from collections.abc import Sequence  # noqa: E402

import pandas as pd  # noqa: E402

from harness.child_processes import prepare_child_environment  # noqa: E402
from harness.studies.catalog import get_study  # noqa: E402
from harness.studies.core import Study  # noqa: E402
from harness.studies.execute import run_study  # noqa: E402


def throughput(
    study: Study | None = None,
    reps: int = 6,
    workers: int = 2,
    modes: Sequence[str] = ("local", "dask"),
    root_seed: int = 1,
) -> pd.DataFrame:
    """Replicates per minute of one study, on local processes and on a Dask LocalCluster.

    Each mode runs the same tasks into a fresh temporary folder.  Wall time
    includes starting the workers (and R, and any model compile in them);
    ``steady_per_minute`` counts only from the first finished task on.

    Parameters
    ----------
    study : Study, optional
        Default: the ``smoke`` study (2 conditions, lm / lme4 / nlme).
    reps : int
    workers : int
    modes : sequence of {"local", "dask", "serial"}

    Returns
    -------
    DataFrame
        mode, workers, tasks, replicates, seconds, startup_seconds,
        tasks_per_minute, replicates_per_minute, steady_replicates_per_minute.
    """
    study = study or get_study("smoke")
    rows = []
    for mode in modes:
        with tempfile.TemporaryDirectory(prefix="harness-throughput-") as tmp:
            if mode == "dask":
                from distributed import Client, LocalCluster

                prepare_child_environment()
                with (
                    LocalCluster(
                        n_workers=workers,
                        threads_per_worker=1,
                        processes=True,
                        dashboard_address=":0",
                    ) as cluster,
                    Client(cluster) as client,
                ):
                    run = run_study(
                        study, tmp, reps=reps, root_seed=root_seed, scheduler=client, progress=False
                    )
            elif mode in ("local", "serial"):
                run = run_study(
                    study,
                    tmp,
                    reps=reps,
                    root_seed=root_seed,
                    workers=1 if mode == "serial" else workers,
                    progress=False,
                )
            else:
                raise ValueError(f"unknown mode {mode!r}; choose local, dask or serial")
        replicates = run.n_replicates_run
        per_replicate = run.n_run / max(replicates, 1)
        steady = max(run.seconds - run.startup_seconds, 1e-9)
        rows.append(
            {
                "mode": mode,
                "workers": 1 if mode == "serial" else workers,
                "tasks": run.n_run,
                "replicates": replicates,
                "seconds": run.seconds,
                "startup_seconds": run.startup_seconds,
                "tasks_per_minute": 60 * run.n_run / run.seconds,
                "replicates_per_minute": 60 * replicates / run.seconds,
                "steady_replicates_per_minute": 60 * (run.n_run - 1) / per_replicate / steady,
            }
        )
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20, help="replicates per condition")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "bench_study.json")
    args = parser.parse_args()

    table = throughput(reps=args.reps, workers=2, modes=("local", "dask"))
    print(table.to_string(index=False))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_json(args.out, orient="records", indent=2)


if __name__ == "__main__":
    main()
