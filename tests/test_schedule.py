"""``report all`` in worker processes: the task plan, the scheduling rules, real workers."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from harness.pipeline import schedule
from harness.pipeline.schedule import Task

ALL = ["lme4", "pymc", "compare", "same_model", "figures"]


def test_plan_cuts_each_design_into_r_pymc_and_finish():
    tasks = schedule.plan(
        {"a": ALL, "b": ["pymc", "compare", "figures"], "c": [], "d": ["figures"]}
    )
    assert tasks[Task("a", "finish")] == {Task("a", "r"), Task("a", "pymc")}
    assert tasks[Task("a", "r")] == frozenset() and tasks[Task("a", "pymc")] == frozenset()
    # Only PyMC missing: no R task, the finish waits for PyMC alone.
    assert Task("b", "r") not in tasks
    assert tasks[Task("b", "finish")] == {Task("b", "pymc")}
    # Nothing missing: no task; only the figures: a finish with nothing to wait for.
    assert not [t for t in tasks if t.design == "c"]
    assert tasks[Task("d", "finish")] == frozenset()


def _order(tasks):
    designs = list(dict.fromkeys(t.design for t in tasks))
    return sorted(tasks, key=lambda t: (designs.index(t.design), schedule.KINDS.index(t.kind)))


def test_first_compile_runs_alone_while_the_other_worker_does_r_work():
    tasks = schedule.plan({"a": ALL, "b": ALL})
    order = _order(tasks)
    first = schedule.next_task(order, tasks, set(), set(), set())
    assert first == Task("a", "pymc")
    # The second worker takes R work, not a second cold compile ...
    second = schedule.next_task(order, tasks, {first}, set(), set())
    assert second == Task("a", "r")
    third = schedule.next_task(order, tasks, {first}, {second}, set())
    assert third == Task("b", "r")
    # ... and a second compile only when nothing else is left to do.
    fourth = schedule.next_task(order, tasks, {first}, {second, third}, set())
    assert fourth == Task("b", "pymc")


def test_after_the_first_compile_pymc_goes_before_finishing():
    tasks = schedule.plan({"a": ALL, "b": ALL})
    order = _order(tasks)
    done = {Task("a", "pymc"), Task("a", "r"), Task("b", "r")}
    assert schedule.next_task(order, tasks, set(), done, set()) == Task("b", "pymc")
    running = {Task("b", "pymc")}
    assert schedule.next_task(order, tasks, running, done, set()) == Task("a", "finish")


def test_a_failed_stage_blocks_its_design_only():
    tasks = schedule.plan({"a": ALL, "b": ALL})
    order = _order(tasks)
    failed = {Task("a", "r")}
    assert schedule.blocked(tasks, failed) == {Task("a", "finish")}
    done = {Task("a", "pymc"), Task("b", "r"), Task("b", "pymc")}
    assert schedule.next_task(order, tasks, set(), done, failed) == Task("b", "finish")
    assert schedule.next_task(order, tasks, set(), done | {Task("b", "finish")}, failed) is None


def test_estimate_uses_the_latest_duration_of_each_kind():
    estimate = schedule.Estimate(workers=2)
    assert estimate.left([Task("a", "r")], {}) == schedule.DEFAULT_SECONDS["r"] / 2
    estimate.add(Task("a", "pymc"), 40.0)  # the first compile, with the warm-up
    pymc = schedule.DEFAULT_SECONDS["pymc"]
    assert estimate.left([Task("c", "pymc"), Task("d", "pymc")], {}) == pytest.approx(pymc)
    estimate.add(Task("b", "pymc"), 10.0)
    assert estimate.left([Task("c", "pymc"), Task("d", "pymc")], {}) == pytest.approx(10.0)


# --------------------------------------------------------------------------- real workers


def record_task(task: Task, log: str, fail: str) -> None:
    """A worker task: sleep a little, note start and end; fails for the task named ``fail``."""
    started = time.time()
    time.sleep(0.2)
    if str(task) == fail:
        raise RuntimeError(f"{task} broke")
    with open(log, "a") as handle:
        handle.write(json.dumps([task.design, task.kind, started, time.time(), os.getpid()]) + "\n")


def test_run_in_two_processes_keeps_the_order_and_reports_failures(tmp_path: Path):
    log = tmp_path / "tasks.jsonl"
    tasks = schedule.plan({"a": ALL, "b": ALL, "c": ["pymc", "compare", "figures"]})
    failures = schedule.run(tasks, record_task, workers=2, arguments=(str(log), "b: pymc"))
    assert set(failures) == {"b"}
    assert "pymc stage" in failures["b"] and "broke" in failures["b"]
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    ran = {(d, k): (start, end) for d, k, start, end, _ in rows}
    # Everything but b's PyMC task (failed) and b's finish (blocked) ran, each once.
    assert len(rows) == len(ran) == len(tasks) - 2
    assert ("b", "finish") not in ran
    for design in ("a", "c"):
        finish_start = ran[(design, "finish")][0]
        for need in tasks[Task(design, "finish")]:
            assert ran[(need.design, need.kind)][1] <= finish_start
    workers = {pid for *_, pid in rows}
    assert os.getpid() not in workers and len(workers) <= 2


@pytest.mark.slow
@pytest.mark.r
@pytest.mark.sampling
def test_report_all_in_two_workers_writes_every_page(tmp_path: Path):
    import subprocess
    import sys

    from harness.pipeline.runner import REPORT_DESIGNS

    env = {
        **os.environ,
        "HARNESS_CACHE_DIR": str(tmp_path / "cache"),
        "HARNESS_DRAWS": "200",
        "HARNESS_TUNE": "200",
        "HARNESS_CHAINS": "2",
    }
    env.pop("HARNESS_QUIET", None)
    args = [sys.executable, "-m", "harness.cli", "report", "all", "--workers", "2"]
    done = subprocess.run(
        [*args, "--out-dir", str(tmp_path / "out")], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "in 2 processes" in done.stderr
    for name in REPORT_DESIGNS:
        assert (tmp_path / "out" / f"{name}.html").is_file()
        assert f"{name}: " in done.stdout
    # A second run finds everything cached and spawns nobody.
    again = subprocess.run(
        [*args, "--out-dir", str(tmp_path / "out2")], capture_output=True, text=True, env=env
    )
    assert again.returncode == 0 and "processes" not in again.stderr
    assert again.stdout.count("(cached)") == len(REPORT_DESIGNS)
