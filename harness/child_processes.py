"""What child processes (study executors, the Dask helper, report workers) inherit and how they end."""

from __future__ import annotations

import os
import sys
from typing import Any

__all__ = [
    "die_with_parent",
    "init_worker",
    "prepare_child_environment",
    "quiet_library_notices",
    "spawn_pool",
]


def prepare_child_environment() -> None:
    """Make processes started from here load this Python's own ``libpython``.

    Starting R through rpy2 prepends R's library folders (``/usr/lib/R/lib:
    /usr/lib/x86_64-linux-gnu:...``) to ``LD_LIBRARY_PATH`` in this process's
    environment.  A worker process started afterwards (``spawn``, a Dask
    nanny) then finds the *system* ``libpython3.X.so`` before its own
    interpreter's (``LD_LIBRARY_PATH`` wins over the binary's RUNPATH) and
    fails on the first extension module built for the other patch release
    (``_ssl``: undefined symbol).  Putting the interpreter's ``LIBDIR`` first
    restores the right one and changes nothing else.  Call this before
    creating a Dask ``LocalCluster`` in a process that has already used R.
    """
    import sysconfig

    current = os.environ.get("LD_LIBRARY_PATH")
    libdir = sysconfig.get_config_var("LIBDIR")
    if not current or not sysconfig.get_config_var("Py_ENABLE_SHARED") or not libdir:
        return
    if current.split(os.pathsep)[0] != libdir:
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join([libdir, current])


def quiet_library_notices() -> None:
    """Hide notices a library addresses to its own users, not to the harness's.

    ArviZ 0.x announces its coming 1.0 refactor with a ``FutureWarning`` once a day
    at import; a harness user never calls ArviZ, so in the console it is only noise
    that arrives in the middle of the progress lines.  Other warnings are untouched.
    """
    import warnings

    warnings.filterwarnings(
        "ignore", message=r"\s*ArviZ is undergoing a major refactor", category=FutureWarning
    )


def die_with_parent() -> None:
    """End this process when the process that started it ends.

    Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)``; elsewhere a daemon thread
    watches the parent's id.  A worker holds nothing to save (a study's results
    are written by the parent, a report worker's cache entries are written
    atomically), so it may die at any point.
    """
    import signal
    import threading
    import time

    parent = os.getppid()
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, int(signal.SIGKILL), 0, 0, 0) == 0:  # 1: PR_SET_PDEATHSIG
            if os.getppid() != parent:  # the parent ended before prctl took effect
                os._exit(1)
            return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="harness-parent-watch", daemon=True).start()


def init_worker(log_level: int) -> None:
    """In a worker of the harness's own pools: end with the parent, log like the parent,
    and write plain progress lines (two processes share the terminal, so neither may
    rewrite "its" line)."""
    import atexit
    import logging

    die_with_parent()
    quiet_library_notices()
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s: %(message)s")
    os.environ["HARNESS_PROGRESS_PLAIN"] = "1"
    # Registered first, so it runs last: R's and the other libraries' exit handlers still
    # run (R removes its temp folder), then the worker skips tearing down its modules,
    # which took seconds with R, compiled models and figures loaded; the parent waits on it.
    atexit.register(_exit_now)


def _exit_now() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_pool(workers: int) -> Any:
    """A ``ProcessPoolExecutor`` of spawned workers set up by :func:`init_worker`.

    Spawned, not forked: the parent may hold R, numba's compiler and threads.
    Shut it down with ``wait=False`` once its results are in: processes that
    hold R and compiled models take seconds to exit, and are joined at the
    interpreter's exit instead.
    """
    import logging
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    prepare_child_environment()  # this process may have started R already
    return ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=init_worker,
        initargs=(logging.getLogger().getEffectiveLevel(),),
    )
