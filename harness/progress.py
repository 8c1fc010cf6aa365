"""One line per stage of long work on stderr, so a slow run never looks hung.

``harness report``, ``compare`` and ``study`` announce each stage (R fit,
PyMC compile, sampling, same-model check, figures) with the design, the
elapsed seconds and, where known, the rate or an ETA.  While a stage runs, a
heartbeat thread says so every :data:`HEARTBEAT_SECONDS`: on a terminal by
rewriting one line, elsewhere (CI logs) as plain lines.  ``--quiet`` (or
``HARNESS_QUIET=1``, which worker processes inherit) silences all of it.

This is user-facing console output, not logging: the library's own
messages still go to ``logging.getLogger("harness")``.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import TextIO

#: Longest silence during a stage.
HEARTBEAT_SECONDS = 5.0

_design: contextvars.ContextVar[str] = contextvars.ContextVar("harness_progress_design", default="")
_lock = threading.Lock()
#: Stages now running, outermost first: only the innermost one beats (no doubled lines).
_active: list[Stage] = []
#: When the last line was written (perf_counter), so a beat fills silences, not intervals.
_last_write = [0.0]


def enabled() -> bool:
    """False when ``HARNESS_QUIET`` is set (``--quiet``) or progress was not switched on."""
    return os.environ.get("HARNESS_PROGRESS", "") == "1" and not os.environ.get("HARNESS_QUIET")


def configure(*, show: bool) -> None:
    """Switch progress lines on (the CLI does) or off (``--quiet``); library calls stay silent."""
    os.environ["HARNESS_PROGRESS"] = "1"
    if show:
        os.environ.pop("HARNESS_QUIET", None)
    else:
        os.environ["HARNESS_QUIET"] = "1"


def _stream() -> TextIO:
    return sys.stderr


def _is_terminal(stream: TextIO) -> bool:
    if os.environ.get("HARNESS_PROGRESS_PLAIN"):  # worker processes sharing one terminal
        return False
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def is_terminal() -> bool:
    """Whether progress goes to a terminal (samplers may then draw their own bars)."""
    return enabled() and _is_terminal(_stream())


def _write(text: str, *, overwrite: bool = False) -> None:
    stream = _stream()
    with _lock:
        _last_write[0] = time.perf_counter()
        if overwrite:
            stream.write("\r\033[K" + text)
        else:
            stream.write(text + "\n")
        stream.flush()


@contextlib.contextmanager
def design(name: str) -> Iterator[None]:
    """Name the design that the stages inside belong to."""
    token = _design.set(name)
    try:
        yield
    finally:
        _design.reset(token)


@contextlib.contextmanager
def silenced() -> Iterator[None]:
    """No progress lines inside (e.g. loading from the cache what workers just reported)."""
    before = os.environ.get("HARNESS_QUIET")
    os.environ["HARNESS_QUIET"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("HARNESS_QUIET", None)
        else:
            os.environ["HARNESS_QUIET"] = before


def set_design(name: str) -> None:
    """Name the design for the stages that follow in this context (a runner's loop)."""
    _design.set(name)


def message(text: str) -> None:
    """One plain line (with the current design), e.g. an ETA for the remaining designs."""
    if enabled():
        prefix = f"{_design.get()}: " if _design.get() else ""
        _write(f"{prefix}{text}")


class Stage:
    """A running stage; set :attr:`detail` (e.g. ``"650 draws/s"``) before it ends."""

    def __init__(self, name: str, eta: float | None) -> None:
        self.name = name
        self.eta = eta
        self.detail = ""
        self.started = time.perf_counter()
        prefix = f"{_design.get()}: " if _design.get() else ""
        self.label = f"{prefix}{name}"

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def running_text(self) -> str:
        text = f"{self.label}: still running, {self.elapsed():.0f} s"
        if self.eta is not None:
            text += f" (ETA {max(self.eta - self.elapsed(), 0.0):.0f} s)"
        return text


@contextlib.contextmanager
def stage(name: str, *, eta: float | None = None) -> Iterator[Stage]:
    """Report a stage: a heartbeat while it runs, one line with its duration when it ends.

    Parameters
    ----------
    name : str
        What runs, e.g. ``"R fit (lme4)"``, ``"sampling"``.
    eta : float, optional
        Expected seconds, when known.
    """
    current = Stage(name, eta)
    if not enabled():
        yield current
        return
    terminal = _is_terminal(_stream())
    done = threading.Event()

    def beat() -> None:
        # Wake often, write only after a silence: however stages nest and start, no
        # gap on a log exceeds HEARTBEAT_SECONDS.  A beat is due one wake-up early: a
        # long call in a C extension can hold the GIL past the next wake-up (InstEval's
        # compare stage left a 5.05 s gap when beats were due at 4.5 s).
        interval = 1.0 if terminal else min(0.5, HEARTBEAT_SECONDS / 2)
        due = HEARTBEAT_SECONDS - 2 * interval
        while not done.wait(interval):
            with _lock:
                innermost = bool(_active) and _active[-1] is current
                silent = time.perf_counter() - _last_write[0]
            if innermost and (terminal or silent >= due):
                _write(current.running_text(), overwrite=terminal)

    if terminal:
        _write(f"{current.label} ...", overwrite=True)
    with _lock:
        _active.append(current)
    thread = threading.Thread(target=beat, name="harness-progress", daemon=True)
    thread.start()
    failed = True
    try:
        yield current
        failed = False
    finally:
        done.set()
        thread.join()
        with _lock:
            if current in _active:
                _active.remove(current)
        status = "failed after" if failed else "done in"
        detail = f" ({current.detail})" if current.detail and not failed else ""
        _write(f"{current.label}: {status} {current.elapsed():.1f} s{detail}", overwrite=terminal)
        if terminal:
            _write("")
