"""Fit several designs in worker processes, stage by stage, so both cores work.

``harness report all`` on a fresh machine is dominated by numba compiling
each PyMC model, and the first compile of a process is the slowest (numba
compiles PyTensor's operations and its own helpers once, into the on-disk
cache).  Fitting whole designs side by side makes two processes pay that
warm-up at the same time; instead every design is cut into three tasks

* ``r``      the lme4 fit and the same-model check (R, no compiler),
* ``pymc``   compile and sample (no R),
* ``finish`` compare and figures, once both fits are in the cache,

and a small list scheduler hands them to the workers: the first PyMC
compile runs alone while the other worker does every design's R work, and a
second compile starts only when that one is done or nothing else is left
to do (an idle core is worth more than a duplicated warm-up).  Then PyMC
fits go before finishing tasks, since they gate them.

Every task leaves its product in the fit cache, so the parent process then
loads each design (no R, no compile) and writes the reports itself.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from harness import progress

log = logging.getLogger("harness")

#: Task kinds in the order a design needs them.
KINDS = ("r", "pymc", "finish")

#: Seconds assumed for a task kind until one of that kind has finished (for the ETA only).
DEFAULT_SECONDS = {"r": 5.0, "pymc": 20.0, "finish": 6.0}


@dataclass(frozen=True, order=True)
class Task:
    """One unit of work for a worker: a design and a task kind (see :data:`KINDS`)."""

    design: str
    kind: str

    def __str__(self) -> str:
        return f"{self.design}: {self.kind}"


def plan(missing: Mapping[str, Collection[str]]) -> dict[Task, frozenset[Task]]:
    """Tasks for designs with missing stages, each with the tasks it waits for.

    Parameters
    ----------
    missing : mapping
        Design name -> stages without a cache entry (from
        :func:`harness.pipeline.runner.missing_stages`).  Designs with nothing
        missing get no task.

    Returns
    -------
    dict
        Task -> the tasks that must finish first.
    """
    tasks: dict[Task, frozenset[Task]] = {}
    for name, stages in missing.items():
        stages = set(stages)
        if not stages:
            continue
        needs: set[Task] = set()
        if stages & {"lme4", "same_model"}:
            needs.add(Task(name, "r"))
        if "pymc" in stages:
            needs.add(Task(name, "pymc"))
        for task in needs:
            tasks[task] = frozenset()
        if stages & {"compare", "figures"} or needs:
            tasks[Task(name, "finish")] = frozenset(needs)
    return tasks


def next_task(
    order: list[Task],
    waits_for: Mapping[Task, frozenset[Task]],
    running: Collection[Task],
    done: Collection[Task],
    failed: Collection[Task],
) -> Task | None:
    """The task a free worker should take next, or None.

    ``order`` lists the tasks not yet started by design order; a task is ready
    when all it waits for is done.  Rules, in turn: a task whose inputs
    failed is never ready; while the first ``pymc`` task runs, another
    ``pymc`` task waits unless nothing else is ready; otherwise ``pymc``
    before ``r`` before ``finish``.
    """
    ready = [
        task
        for task in order
        if task not in running
        and task not in done
        and task not in failed
        and waits_for.get(task, frozenset()) <= set(done)
    ]
    if not ready:
        return None
    warming_up = any(t.kind == "pymc" for t in running) and not any(t.kind == "pymc" for t in done)
    rank = {"pymc": 0, "r": 1, "finish": 2}
    if warming_up:
        rank = {"r": 0, "finish": 1, "pymc": 2}
    return min(ready, key=lambda task: (rank[task.kind], order.index(task)))


def blocked(waits_for: Mapping[Task, frozenset[Task]], failed: Collection[Task]) -> set[Task]:
    """Tasks that can never run because something they wait for failed (transitively)."""
    bad = set(failed)
    changed = True
    while changed:
        changed = False
        for task, needs in waits_for.items():
            if task not in bad and needs & bad:
                bad.add(task)
                changed = True
    return bad - set(failed)


class Estimate:
    """Seconds left, from the latest finished task of each kind (an ETA, not a promise).

    The latest, not the mean: the first PyMC task carries the compiler's
    warm-up and the ones after it are faster.  For the same reason that first
    one alone counts for no more than :data:`DEFAULT_SECONDS` (a cold 45 s
    compile once made the estimate jump from 55 s to 98 s and back to 44 s).
    """

    def __init__(self, workers: int) -> None:
        self.workers = max(1, workers)
        self.seen: dict[str, list[float]] = {}

    def add(self, task: Task, seconds: float) -> None:
        self.seen.setdefault(task.kind, []).append(seconds)

    def typical(self, kind: str) -> float:
        values = self.seen.get(kind)
        if not values:
            return DEFAULT_SECONDS[kind]
        if kind == "pymc" and len(values) == 1:
            return min(values[0], DEFAULT_SECONDS[kind])
        return values[-1]

    def left(self, pending: Iterable[Task], running: Mapping[Task, float]) -> float:
        now = time.perf_counter()
        work = sum(self.typical(t.kind) for t in pending)
        work += sum(max(self.typical(t.kind) - (now - start), 0.0) for t, start in running.items())
        return work / self.workers


def run(
    tasks: Mapping[Task, frozenset[Task]],
    execute: Callable[..., None],
    *,
    workers: int,
    arguments: tuple[Any, ...] = (),
) -> dict[str, str]:
    """Run ``execute(task, *arguments)`` for every task in spawned worker processes.

    Parameters
    ----------
    tasks : mapping
        From :func:`plan`.
    execute : callable
        A module-level function (it is pickled by name); it raises on failure.
    workers : int
        Worker processes.
    arguments : tuple
        Passed to ``execute`` after the task (picklable).

    Returns
    -------
    dict
        Design -> error text, for designs with a failed or blocked task.
    """
    from concurrent.futures import FIRST_COMPLETED, Future, wait

    from harness.child_processes import spawn_pool

    designs = list(dict.fromkeys(task.design for task in tasks))
    order = sorted(tasks, key=lambda t: (designs.index(t.design), KINDS.index(t.kind)))
    running: dict[Task, float] = {}
    futures: dict[Future[None], Task] = {}
    done: set[Task] = set()
    failed: dict[Task, str] = {}
    estimate = Estimate(workers)
    started = time.perf_counter()
    progress.message(f"{len(tasks)} tasks for {len(designs)} designs in {workers} processes")
    pool = spawn_pool(workers)
    try:
        while True:
            while len(running) < workers:
                task = next_task(order, tasks, running, done, failed)
                if task is None:
                    break
                running[task] = time.perf_counter()
                futures[pool.submit(execute, task, *arguments)] = task
            if not futures:
                break
            finished, _ = wait(list(futures), return_when=FIRST_COMPLETED)
            for future in finished:
                task = futures.pop(future)
                seconds = time.perf_counter() - running.pop(task)
                try:
                    future.result()
                except Exception as err:  # the task's own error, or its worker died
                    failed[task] = f"{type(err).__name__}: {err}"
                    log.error("%s failed: %s", task, failed[task])
                else:
                    done.add(task)
                    estimate.add(task, seconds)
                lost = blocked(tasks, failed)
                pending = [
                    t
                    for t in order
                    if t not in done and t not in failed and t not in running and t not in lost
                ]
                progress.message(
                    f"[{len(done) + len(failed)}/{len(tasks)} tasks, "
                    f"{time.perf_counter() - started:.0f} s] {task} "
                    f"{'failed' if task in failed else 'done'} in {seconds:.1f} s; "
                    f"about {estimate.left(pending, running):.0f} s left"
                )
            if not running and next_task(order, tasks, running, done, failed) is None:
                break
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # see spawn_pool
    failures: dict[str, str] = {}
    for task, error in failed.items():
        failures.setdefault(task.design, f"{task.kind} stage: {error}")
    for task in blocked(tasks, failed):
        failures.setdefault(task.design, f"{task.kind} stage not run: an earlier stage failed")
    return failures


def default_workers(n_tasks: int, wanted: int | None = None) -> int:
    """Processes for ``n_tasks`` designs: ``wanted``, else ``HARNESS_WORKERS``, else one per core.

    ``0`` (either way) means one per core; never more than the designs or the
    cores this process may use.
    """
    from harness.engines.samplers import available_cores

    cores = available_cores()
    if wanted is None:
        text = os.environ.get("HARNESS_WORKERS", "").strip()
        wanted = int(text) if text.isdigit() else 0
    return max(1, min(n_tasks, wanted or cores, cores))


def execute_design_task(
    task: Task,
    seed: int,
    refit: bool,
    settings: Any,
    render: Callable[..., Any] | None,
) -> None:
    """Run one task of :func:`plan` in a worker, leaving its products in the fit cache.

    ``render`` is the report's figure renderer, passed in (by reference) so
    that the pipeline never imports report code.
    """
    from harness.pipeline.runner import fit_design, fit_stages

    if task.kind == "r":
        fit_stages(task.design, ("lme4", "same_model"), seed=seed, refit=refit, settings=settings)
    elif task.kind == "pymc":
        fit_stages(task.design, ("pymc",), seed=seed, refit=refit, settings=settings)
    elif task.kind == "finish":
        # Both fits are cached by now (refitted already when asked); what builds on them is redone.
        again = {"compare", "figures"} if refit else set()
        fit_design(task.design, seed=seed, refit=again, settings=settings, render=render)
    else:
        raise ValueError(f"unknown task kind {task.kind!r}")
