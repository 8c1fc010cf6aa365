"""Running a study: in this process, on local worker processes, or on a Dask cluster.

Results are appended as tasks finish to a folder of Parquet files
(``<out_dir>/results/part-*.parquet``, each written to a temporary name and
renamed, so a part is either whole or absent).  Before running, the folder's
finished (condition, replicate, fitter) keys are read and skipped, so an
interrupted study resumes where it stopped; because every task's seeds come
from (root seed, condition, replicate) and the final table is sorted, the
resumed study ends with the same table as an uninterrupted one (timings
aside).  ``<out_dir>/study.json`` records the root seed and fitter settings;
resuming with different ones is refused.

Parallelism: local worker processes (``ProcessPoolExecutor``, spawned, so
each worker starts its own R and compiles each PyMC model structure once and
keeps it for every later replicate), or a Dask distributed cluster.  With
Dask, every worker needs the harness, R with lme4/nlme/lmerTest and the same
Python environment, and the scheduler needs the harness importable (it
unpickles the task graph); start one with ``dask scheduler`` on one machine and
``dask worker tcp://SCHEDULER:8786 --nworkers N --nthreads 1`` on each worker
machine (from the repository checkout, or with ``HARNESS_R_SCRIPTS`` pointing
at ``r_scripts/``), then run ``harness study NAME --scheduler
tcp://SCHEDULER:8786``.  Embedded R belongs on the main thread of its
process, and a Dask worker runs tasks on threads, so each Dask worker hands
its tasks to one long-lived helper process (:mod:`harness.studies.helper`)
where R and the compiled PyMC models live.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
import uuid
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from harness._io import write_via_temp
from harness.child_processes import die_with_parent, prepare_child_environment
from harness.studies.core import Study, Task, rows_to_frame, run_task, sort_results

log = logging.getLogger("harness")

MANIFEST = "study.json"
RESULTS = "results"
RUNS = "runs.jsonl"


# --------------------------------------------------------------------------- result store


class ResultStore:
    """A folder of Parquet parts holding a study's finished rows."""

    def __init__(self, out_dir: Path, study: Study, root_seed: int) -> None:
        self.out_dir = Path(out_dir)
        self.folder = self.out_dir / RESULTS
        self.study = study
        self.root_seed = int(root_seed)

    def open(self) -> None:
        """Create the folder, or check that its results match this study and seed."""
        self.folder.mkdir(parents=True, exist_ok=True)
        manifest = self.study.manifest(self.root_seed)
        path = self.out_dir / MANIFEST
        if path.exists():
            old = json.loads(path.read_text())
            _check_manifest(old, manifest, self.out_dir)
            # Keep conditions and fitters of earlier runs of a larger grid.
            manifest["conditions"] = {**old.get("conditions", {}), **manifest["conditions"]}
            manifest["fitters"] = {**old.get("fitters", {}), **manifest["fitters"]}
        write_via_temp(
            path, lambda tmp: tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
        )

    def parts(self) -> list[Path]:
        return sorted(self.folder.glob("part-*.parquet")) if self.folder.exists() else []

    def read(self) -> pd.DataFrame:
        """Every stored row (duplicates of a task, if any, dropped)."""
        parts = [pd.read_parquet(p) for p in self.parts()]
        if not parts:
            return rows_to_frame([], self.study)
        frame = pd.concat(parts, ignore_index=True)
        frame = frame.drop_duplicates(["condition", "rep", "fitter", "parameter"], keep="first")
        return frame

    def done_keys(self) -> set[tuple[str, int, str]]:
        frame = self.read()
        return set(
            zip(
                frame["condition"].astype(str),
                frame["rep"].astype(int),
                frame["fitter"].astype(str),
                strict=True,
            )
        )

    def log_run(self, record: dict[str, Any]) -> None:
        """Append one run's record (executor, tasks, seconds) to ``runs.jsonl``."""
        with open(self.out_dir / RUNS, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def runs(self) -> pd.DataFrame:
        """Every recorded run of this folder, oldest first."""
        path = self.out_dir / RUNS
        if not path.exists():
            return pd.DataFrame()
        lines = path.read_text(encoding="utf-8").splitlines()
        return pd.DataFrame([json.loads(line) for line in lines if line.strip()])

    def write(self, rows: list[dict[str, Any]]) -> None:
        """Append rows as one new part (atomic)."""
        if not rows:
            return
        frame = rows_to_frame(rows, self.study)
        name = f"part-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}.parquet"
        write_via_temp(self.folder / name, lambda tmp: frame.to_parquet(tmp, index=False))


def _check_manifest(old: dict[str, Any], new: dict[str, Any], out_dir: Path) -> None:
    if old.get("study") != new["study"]:
        raise ValueError(
            f"{out_dir} holds results of study {old.get('study')!r}, not "
            f"{new['study']!r}; use another --out-dir"
        )
    if old.get("root_seed") != new["root_seed"]:
        raise ValueError(
            f"{out_dir} holds results made with root seed {old.get('root_seed')}; "
            f"resume with --seed {old.get('root_seed')} or use another --out-dir"
        )
    for cid, params in new["conditions"].items():
        if cid in old.get("conditions", {}) and old["conditions"][cid] != params:
            raise ValueError(
                f"{out_dir}: condition {cid!r} had parameters "
                f"{old['conditions'][cid]}, now {params}; use another --out-dir"
            )
    for name, settings in new["fitters"].items():
        if name in old.get("fitters", {}) and old["fitters"][name] != settings:
            raise ValueError(
                f"{out_dir}: fitter {name!r} ran with settings "
                f"{old['fitters'][name]}, now {settings}; use another --out-dir"
            )


# --------------------------------------------------------------------------- running


@dataclass
class StudyRun:
    """What :func:`run_study` did.

    Attributes
    ----------
    results : DataFrame
        Every row of the requested replicates, in canonical order.
    out_dir : Path
    n_tasks : int
        Tasks of the requested replicates.
    n_run : int
        Tasks run this time (the rest were already in the folder).
    n_replicates_run : int
        Distinct (condition, replicate) pairs among them.
    complete : bool
        Whether every requested task is now done.
    seconds : float
        Wall time of this run.
    startup_seconds : float
        Until the first result arrived (worker start, R start, model compiles).
    executor : str
        "serial", "processes(N)" or "dask(ADDRESS)".
    """

    results: pd.DataFrame
    out_dir: Path
    n_tasks: int
    n_run: int
    complete: bool
    seconds: float
    startup_seconds: float
    executor: str
    root_seed: int
    reps: int
    n_replicates_run: int = 0


def run_study(
    study: Study,
    out_dir: Path | str,
    *,
    reps: int | None = None,
    root_seed: int = 20261121,
    workers: int | None = None,
    scheduler: Any = None,
    max_tasks: int | None = None,
    progress: bool = True,
    flush_every: int = 25,
    flush_seconds: float = 30.0,
) -> StudyRun:
    """Run (or resume) a study and return its results.

    Parameters
    ----------
    study : Study
    out_dir : path
        Folder for ``study.json`` and ``results/``; an existing one is resumed.
    reps : int, optional
        Replicates per condition (default ``study.default_reps``).
    root_seed : int
        Every replicate's seeds derive from it.
    workers : int, optional
        Local worker processes (default: 2, or fewer CPUs); 1 runs in this process.
    scheduler : str or distributed.Client, optional
        A Dask scheduler address (``tcp://host:8786``) or a connected client:
        run on that cluster instead of local processes.
    max_tasks : int, optional
        Stop after running this many new tasks (the rest stay for a resume).
    progress : bool
        Progress bar with ETA on stderr.
    flush_every, flush_seconds : int, float
        Write a Parquet part after this many finished tasks or seconds.

    Returns
    -------
    StudyRun
    """
    reps = study.default_reps if reps is None else int(reps)
    prepare_child_environment()
    store = ResultStore(Path(out_dir), study, root_seed)
    store.open()
    all_tasks = study.tasks(reps, root_seed)
    done = store.done_keys()
    remaining = [t for t in all_tasks if t.key not in done]
    todo = remaining if max_tasks is None else remaining[: max(0, int(max_tasks))]
    n_done = len(all_tasks) - len(remaining)
    log.info(
        "study %s: %d tasks, %d already done, running %d",
        study.name,
        len(all_tasks),
        n_done,
        len(todo),
    )
    started, wall_start = time.perf_counter(), time.time()
    first: list[float | None] = [None]
    buffer: list[dict[str, Any]] = []
    last_flush = [time.perf_counter()]
    finished = [0]
    bar = _progress(study, len(all_tasks), n_done, progress)

    def flush() -> None:
        store.write(buffer)
        buffer.clear()
        last_flush[0] = time.perf_counter()

    def collect(rows: list[dict[str, Any]]) -> None:
        if first[0] is None:
            first[0] = time.perf_counter() - started
        buffer.extend(rows)
        finished[0] += 1
        bar.update(1)
        if finished[0] % flush_every == 0 or time.perf_counter() - last_flush[0] > flush_seconds:
            flush()

    executor, status = "none", "interrupted"
    try:
        if not todo:
            pass
        elif scheduler is not None:
            executor = _run_dask(todo, scheduler, collect)
        elif (workers or default_workers()) <= 1:
            executor = "serial"
            for task in todo:
                collect(run_task(task))
        else:
            n = workers or default_workers()
            executor = f"processes({n})"
            _run_processes(todo, n, collect)
        status = "finished"
    finally:
        flush()
        bar.close()
        if finished[0]:
            store.log_run(
                {
                    "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(wall_start)),
                    "status": status,
                    "executor": executor,
                    "tasks_run": finished[0],
                    "seconds": round(time.perf_counter() - started, 2),
                    "startup_seconds": round(first[0] or 0.0, 2),
                    "replicates_run": len({(t.condition.id, t.rep) for t in todo[: finished[0]]})
                    if status == "finished"
                    else None,
                }
            )
    seconds = time.perf_counter() - started
    results = select(store.read(), all_tasks, study)
    complete = len(store_keys(results)) == len({t.key for t in all_tasks})
    return StudyRun(
        results,
        Path(out_dir),
        len(all_tasks),
        len(todo),
        complete,
        seconds,
        first[0] if first[0] is not None else seconds,
        executor,
        int(root_seed),
        reps,
        len({(t.condition.id, t.rep) for t in todo}),
    )


def store_keys(frame: pd.DataFrame) -> set[tuple[str, int, str]]:
    return set(
        zip(
            frame["condition"].astype(str),
            frame["rep"].astype(int),
            frame["fitter"].astype(str),
            strict=True,
        )
    )


def select(frame: pd.DataFrame, tasks: Sequence[Task], study: Study) -> pd.DataFrame:
    """The rows of ``tasks`` only (a folder may hold more replicates), in canonical order."""
    wanted = {t.key for t in tasks}
    keys = list(
        zip(
            frame["condition"].astype(str),
            frame["rep"].astype(int),
            frame["fitter"].astype(str),
            strict=True,
        )
    )
    mask = [k in wanted for k in keys]
    return sort_results(frame[mask], study)


def default_workers() -> int:
    """Two local workers, or one on a single-CPU machine."""
    return max(1, min(2, os.cpu_count() or 1))


def _progress(study: Study, total: int, initial: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=study.name,
        unit="fit",
        file=sys.stderr,
        disable=not enabled,
        smoothing=0.1,
        dynamic_ncols=True,
    )


def _run_processes(tasks: list[Task], workers: int, collect: Any) -> None:
    import multiprocessing

    # Spawned, not forked: a forked child of a process that already runs R
    # (or holds numba/OpenMP threads) is not safe.
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_worker_init)
    pending: set[Future] = set()
    queue = iter(tasks)
    try:
        # Keep a bounded number of tasks in flight so an interrupt loses little
        # and a huge study does not pickle everything up front.
        for task in _take(queue, 4 * workers):
            pending.add(pool.submit(run_task, task))
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                collect(future.result())
                for task in _take(queue, 1):
                    pending.add(pool.submit(run_task, task))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _take(iterator: Iterator[Task], n: int) -> list[Task]:
    out = []
    for _ in range(n):
        try:
            out.append(next(iterator))
        except StopIteration:
            break
    return out


def _worker_init() -> None:
    die_with_parent()
    warnings.filterwarnings("ignore", message="R is not initialized by the main thread")
    logging.getLogger("harness").setLevel(logging.WARNING)


# --------------------------------------------------------------------------- dask


@contextlib.contextmanager
def _client(scheduler: Any) -> Iterator[Any]:
    try:
        from distributed import Client
    except ImportError:  # pragma: no cover - dask is an optional extra
        raise RuntimeError(
            "--scheduler needs dask.distributed: pip install 'harness[study]'"
        ) from None
    if isinstance(scheduler, Client):
        yield scheduler
        return
    client = Client(scheduler, timeout="30s")
    try:
        yield client
    finally:
        client.close()


def _check_workers(client: Any) -> None:
    def probe() -> str:
        import importlib.util

        return "ok" if importlib.util.find_spec("harness") is not None else "missing"

    answers = client.run(probe)
    if not answers:
        raise RuntimeError(f"Dask scheduler {client.scheduler.address} has no workers")
    lacking = [w for w, a in answers.items() if a != "ok"]
    if lacking:
        raise RuntimeError(
            f"Dask worker(s) {lacking} cannot import harness; install it (with R, "
            "lme4, nlme, lmerTest) on every worker"
        )


def _run_dask(tasks: list[Task], scheduler: Any, collect: Any) -> str:
    from distributed import as_completed

    with _client(scheduler) as client:
        _check_workers(client)
        from harness.studies.helper import run_in_helper

        futures = client.map(run_in_helper, tasks, pure=False)
        try:
            for future in as_completed(futures):
                collect(future.result())
        finally:
            client.cancel(futures)
        return f"dask({client.scheduler.address})"
