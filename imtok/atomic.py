"""Atomic writes: a temp file beside the target, flushed to disk, renamed over it, the rename synced.

The renamed file or directory gets the mode a plain ``open``/``mkdir`` would have given it (or the mode
of the file it replaces), not the private 0600/0700 that ``tempfile`` creates with, so outputs stay
readable on shared checkouts and mounts.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path


def process_umask() -> int:
    """The process's umask, read from /proc where it can be (``os.umask`` must set one to read it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


def creation_mode(directory: bool = False) -> int:
    """What ``open(path, "w")`` (0o666) or ``mkdir`` (0o777) gives under the umask."""
    return (0o777 if directory else 0o666) & ~process_umask()


def match_mode(temporary: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Give ``temporary`` (about to be renamed over ``target``) ``target``'s mode if it exists, else the
    mode a plain creation would have had."""
    temporary, target = Path(temporary), Path(target)
    try:
        mode = target.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = creation_mode(temporary.is_dir())
        if temporary.is_dir():  # keep the set-group-ID bit a shared parent passed on
            mode |= temporary.stat().st_mode & stat.S_ISGID
    os.chmod(temporary, mode)


def fsync_directory(directory: str | os.PathLike[str]) -> None:
    """Persist a rename on POSIX; a no-op where directories cannot be opened or synced (Windows)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` as ``write_bytes_atomic`` does."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old file or the whole new one, never a
    partial or empty one; the parent directory is created if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        match_mode(temporary, path)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)
