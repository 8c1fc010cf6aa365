"""One function run in a spawned process while this one works on (the lme4 side of a fit).

A single design has two independent expensive halves: R fitting lme4 (and the
same-model check, which needs only that fit) and numba compiling the PyMC
model.  Both are single-threaded, so on a machine with a free core the R half
runs beside the compile; it leaves its products in the fit cache, from which
the caller then loads them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

log = logging.getLogger("harness")

T = TypeVar("T")

#: Seconds a worker gets to end on SIGTERM before it is killed.
STOP_SECONDS = 5.0


class SideResult(Generic[T]):
    """The pending result of :func:`start`; :meth:`result` waits and re-raises its error."""

    def __init__(self, pool: Any, future: Any) -> None:
        self._pool = pool
        self._future = future

    def result(self) -> T:
        try:
            return self._future.result()  # type: ignore[no-any-return]
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def abandon(self) -> None:
        """The caller failed: end the worker now instead of waiting for it at exit.

        Its cache entries are written atomically, so stopping it mid-fit leaves
        no half-written entry.
        """
        self._future.cancel()
        # ProcessPoolExecutor has no public way to stop a busy worker before Python 3.14.
        stop = getattr(self._pool, "terminate_workers", None)
        if stop is not None:
            stop()
            return
        processes = list((getattr(self._pool, "_processes", None) or {}).values())
        for process in processes:
            process.terminate()
        # A worker still starting R may not act on SIGTERM at once (seen in a cold run:
        # alive 10 s later): give it a moment, then kill it.
        for process in processes:
            process.join(timeout=STOP_SECONDS)
            if running(process):
                process.kill()
                process.join(timeout=STOP_SECONDS)
            if running(process):
                log.warning("the side worker %s did not end after SIGKILL", process.pid)
        self._pool.shutdown(wait=False, cancel_futures=True)


def running(process: Any) -> bool:
    """Whether a worker process still runs (not ended, not a zombie).

    ``Process.is_alive()`` is not enough: for a child that something else in this
    process already reaped, ``waitpid`` fails and it says "alive" forever (seen in
    a cold test run: the worker's pid was gone).  Linux's ``/proc`` decides where
    there is one.
    """
    if process.exitcode is not None:
        return False
    proc = Path("/proc")
    if not (proc / "self" / "stat").is_file():
        return bool(process.is_alive())
    try:
        stat = (proc / str(process.pid) / "stat").read_text()
    except OSError:  # no such process
        return False
    state = stat.rsplit(")", 1)[-1].split()[0]  # the name in parentheses may hold spaces
    return state not in ("Z", "X")


def start(function: Callable[..., T], *args: Any, **kwargs: Any) -> SideResult[T]:
    """Run ``function(*args, **kwargs)`` in a new spawned process; arguments must pickle."""
    from harness.child_processes import spawn_pool

    pool = spawn_pool(1)
    return SideResult(pool, pool.submit(function, *args, **kwargs))
