"""Writing output files safely: checked before any work, atomic, never over an input.

Every report and JSON file the harness writes goes through here:

* :func:`check_outputs` runs before any fitting and refuses an output that is
  an input (same path, a link to it, or a hard link), two outputs on one
  file, an existing path that is not a regular file (a folder, FIFO, device
  node, socket or symbolic link), and a folder the harness cannot write in;
* :func:`atomic_write` writes a temporary file next to the target and renames
  it over the target only when complete (so an interrupted run leaves the
  previous file intact), refusing special files at the last moment too;
* temporary files carry the writer's process id (``.NAME.<pid>.<random>.tmp``)
  so that :func:`clean_stale_temps` can remove those a killed run left behind
  without touching a running writer's.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import socket
import stat
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

log = logging.getLogger("harness")

#: Temporary files older than this with no process id in their name are stale.
STALE_SECONDS = 3600.0


class OutputError(ValueError):
    """An output path the harness refuses to write (names the path and why)."""


def _describe(mode: int) -> str | None:
    """What a non-regular file is, or None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    for test, name in (
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def refuse_special(path: str | os.PathLike[str], what: str = "output") -> None:
    """Raise :class:`OutputError` when ``path`` exists and is not a regular file.

    A symbolic link is refused even when it points to a regular file: the
    rename would replace the link, not what it points to, and a link may
    point at an input or a system file.
    """
    path = Path(path)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    kind = _describe(mode)
    if kind is not None:
        hint = (
            "; give a file name"
            if kind == "a directory"
            else "; the harness writes regular files only"
        )
        raise OutputError(f"{what} '{path}' is {kind}{hint}")


def _same_file(a: Path, b: Path) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)  # hard links
    except OSError:
        return False


def _writable_folder(folder: Path, what: str, path: Path) -> None:
    """Check that a file can be created in ``folder`` (or the folders it will need)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{what} '{path}' cannot be written: '{existing}' is not a directory")
    if existing != folder:
        if not os.access(existing, os.W_OK | os.X_OK):
            raise OutputError(f"{what} '{path}' cannot be written: '{existing}' is not writable")
        return
    # Create and remove a probe: os.access says yes as root on a read-only file system.
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".harness-probe.", suffix=".tmp")
    except OSError as err:
        reason = err.strerror or str(err)
        raise OutputError(f"{what} '{path}' cannot be written: '{folder}': {reason}") from None
    os.close(fd)
    os.unlink(probe)


def check_outputs(
    outputs: Mapping[str, str | os.PathLike[str] | None],
    inputs: Iterable[str | os.PathLike[str]] = (),
) -> None:
    """Refuse bad output paths before any work starts.

    Parameters
    ----------
    outputs : mapping
        What the output is called for the user (``"--out"``) -> its path (None: not written).
    inputs : iterable of path
        Files the run reads; no output may be one of them.

    Raises
    ------
    OutputError
        Naming the option and path at fault.
    """
    given = {what: Path(p) for what, p in outputs.items() if p is not None}
    sources = [Path(p) for p in inputs]
    seen: dict[str, Path] = {}
    for what, path in given.items():
        refuse_special(path, what)
        for source in sources:
            if _same_file(path, source):
                raise OutputError(
                    f"{what} '{path}' is the input file '{source}'; writing it would destroy "
                    "the data. Choose another output name"
                )
        for other, earlier in seen.items():
            if _same_file(path, earlier):
                raise OutputError(f"{other} and {what} name the same file '{path}'")
        seen[what] = path
        _writable_folder(path.parent, what, path)


def host_tag() -> str:
    """A short tag of this machine, so a temp file's writer can be checked only where it ran."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def temp_path(path: Path) -> Path:
    """A fresh temp file next to ``path``: ``.NAME.<host>-<pid>.<random>.tmp``.

    The name says which process on which machine writes it, so a later run can
    tell a killed writer's leftovers from a running writer's file.
    """
    fd, tmp = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.{host_tag()}-{os.getpid()}.", suffix=".tmp"
    )
    os.close(fd)
    return Path(tmp)


def write_via_temp(path: Path, write: Callable[[Path], object]) -> None:
    """Write ``path`` by ``write(temp)`` and a rename; nothing half-written survives.

    The one atomic-write primitive: :func:`atomic_write` (outputs) and the fit
    cache (JSON entries, netCDF draws) both write through a temp file named by
    :func:`temp_path`.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fill(tmp: Path, content: bytes) -> None:
    with open(tmp, "wb") as handle:
        handle.write(content)
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(tmp, 0o644)


def atomic_write(
    items: Mapping[str | os.PathLike[str], bytes | str], *, what: str = "output"
) -> list[Path]:
    """Write one or more files together: all appear, complete, or none changes.

    Each file is written to a temporary file next to it (text as UTF-8) and
    renamed over the target only when every file is complete.  Existing
    targets that are not regular files (or are symbolic links) are refused
    before anything is written, and checked again just before the renames.

    Returns
    -------
    list of Path
        The files written, in the order given.
    """
    targets = [(Path(p), c.encode("utf-8") if isinstance(c, str) else c) for p, c in items.items()]
    for path, _ in targets:
        refuse_special(path, what)
    written: list[tuple[Path, Path]] = []
    try:
        for path, content in targets:
            path.parent.mkdir(parents=True, exist_ok=True)
            clean_stale_temps(path)
            tmp = temp_path(path)
            written.append((tmp, path))
            _fill(tmp, content)
        for _, path in written:
            refuse_special(path, what)
        for tmp, path in written:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in written:
            with contextlib.suppress(OSError):
                tmp.unlink()
        raise
    for _, path in written:
        log.info("wrote %s (%.0f kB)", path, path.stat().st_size / 1024)
    return [path for _, path in written]


def atomic_write_text(path: str | os.PathLike[str], text: str, *, what: str = "output") -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; see :func:`atomic_write`."""
    return atomic_write({path: text}, what=what)[0]


def atomic_write_bytes(
    path: str | os.PathLike[str], payload: bytes, *, what: str = "output"
) -> Path:
    """Write ``payload`` to ``path`` atomically; see :func:`atomic_write`."""
    return atomic_write({path: payload}, what=what)[0]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError as err:  # EPERM: alive, another user's
        return err.errno == errno.EPERM
    return True


def clean_stale_temps(path: str | os.PathLike[str]) -> list[Path]:
    """Remove temporary files a killed run left next to ``path``.

    ``.NAME.<host>-<pid>.<random>.tmp`` (:func:`temp_path`) is stale when it
    was written on this machine by a process that no longer runs; any other
    ``.NAME.<random>.tmp`` when older than :data:`STALE_SECONDS`.

    Returns
    -------
    list of Path
        The files removed.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    pattern = re.compile(
        rf"^\.{re.escape(path.name)}\.(?:(?P<host>[0-9a-f]{{8}})-(?P<pid>\d+)\.)?[^./]+\.tmp$"
    )
    host = host_tag()
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        found = pattern.match(entry.name)
        if found is None:
            continue
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISREG(info.st_mode):
            continue
        pid = int(found["pid"]) if found["pid"] and found["host"] == host else None
        stale = (not _alive(pid)) if pid is not None else now - info.st_mtime > STALE_SECONDS
        if stale and pid != os.getpid():
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
                log.info("removed %s, left by an interrupted run", entry.path)
    return removed
