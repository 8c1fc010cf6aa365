"""A helper process that runs study tasks with R on its main thread (for Dask workers).

A Dask worker runs tasks on a thread pool, but embedded R is only supported
on the main thread of its process: from another thread rpy2 lacks its
conversion rules (they live in the importing thread's context) and R itself
can misbehave (a fit once spun for minutes inside R on a worker thread under
heavy load).  So each Dask worker starts one long-lived helper process
(``python -m harness.studies.helper``) and hands it tasks over a pipe; R, and
each compiled PyMC model, live in that helper for the worker's lifetime.  A
plain subprocess is used because Dask workers are daemonic processes, which
``multiprocessing`` does not let start children.

Protocol: 8-byte big-endian length, then a cloudpickle payload; requests are
:class:`~harness.studies.core.Task` objects, replies ``("ok", rows)`` or
``("error", exception)``.  The helper's standard output is moved to standard
error at start so that stray console output cannot corrupt the protocol.
"""

from __future__ import annotations

import atexit
import os
import pickle
import struct
import subprocess
import sys
import threading
from typing import IO, Any

_HEADER = struct.Struct(">Q")


def _send(stream: IO[bytes], obj: Any) -> None:
    import cloudpickle

    payload = cloudpickle.dumps(obj)
    stream.write(_HEADER.pack(len(payload)))
    stream.write(payload)
    stream.flush()


def _receive(stream: IO[bytes]) -> Any:
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise EOFError("the other end closed the pipe")
    (size,) = _HEADER.unpack(header)
    payload = stream.read(size)
    if len(payload) < size:
        raise EOFError("the other end closed the pipe mid-message")
    return pickle.loads(payload)


class Helper:
    """One helper process and the pipe to it."""

    def __init__(self) -> None:
        from harness.child_processes import prepare_child_environment

        prepare_child_environment()
        env = dict(os.environ)
        # The helper must import exactly what this worker imports.
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "harness.studies.helper"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        self.lock = threading.Lock()

    def run(self, task: Any) -> Any:
        """Run one task in the helper and return its rows (or raise its error)."""
        with self.lock:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the study helper process exited with code {self.process.returncode}"
                )
            assert self.process.stdin is not None and self.process.stdout is not None
            _send(self.process.stdin, task)
            status, value = _receive(self.process.stdout)
        if status == "error":
            raise value
        return value

    def close(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()


_HELPER: Helper | None = None
_HELPER_LOCK = threading.Lock()


def run_in_helper(task: Any) -> Any:
    """Run a task in this process's helper, starting it on first use."""
    global _HELPER
    with _HELPER_LOCK:
        if _HELPER is None or _HELPER.process.poll() is not None:
            _HELPER = Helper()
            atexit.register(_HELPER.close)
        helper = _HELPER
    return helper.run(task)


def main() -> int:
    """Serve tasks from standard input until it closes."""
    import logging
    import warnings

    from harness.child_processes import die_with_parent
    from harness.studies.core import run_task

    die_with_parent()
    requests = sys.stdin.buffer
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    warnings.filterwarnings("ignore", message="R is not initialized by the main thread")
    logging.getLogger("harness").setLevel(logging.WARNING)
    while True:
        try:
            task = _receive(requests)
        except EOFError:
            return 0
        try:
            reply: tuple[str, Any] = ("ok", run_task(task))
        except BaseException as err:  # sent back and raised in the worker
            reply = ("error", err)
        try:
            _send(replies, reply)
        except (pickle.PicklingError, TypeError) as err:
            _send(replies, ("error", RuntimeError(f"unpicklable result: {err}")))


if __name__ == "__main__":
    sys.exit(main())
