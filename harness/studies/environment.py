"""The environment a study's child processes inherit (both executors and the Dask helper)."""

from __future__ import annotations

import os

__all__ = ["prepare_child_environment"]


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
