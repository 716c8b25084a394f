"""Atomic writes: a temp file beside the target, flushed to disk, renamed over it, the rename synced;
whole output directories swapped in (``replace_directory``); JSON files written and read.

The renamed file or directory gets the mode a plain ``open``/``mkdir`` would have given it (or the mode
of the file it replaces), not the private 0600/0700 that ``tempfile`` creates with, so outputs stay
readable on shared checkouts and mounts.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


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


STAGING_MARK = "staging-"
RETIRED_MARK = "retired-"


def replace_directory(out_dir: Path, fill: Callable[[Path], None]) -> None:
    """Let ``fill`` write a staging directory beside ``out_dir``, then swap it in.

    Readers never see a half-written output: until the swap the old directory (or none) is there. The
    old one is renamed aside before the new one is renamed in, so it is gone only for the instant
    between two renames (not for a whole ``rmtree``), and deleted after. Staging and retired
    directories that a killed run left beside ``out_dir`` are removed first. The new directory gets the
    old one's mode (or a plain ``mkdir``'s), not ``mkdtemp``'s private 0700.
    """
    parent = out_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    name = glob.escape(out_dir.name)
    retired_before = sorted(parent.glob(f".{name}.{RETIRED_MARK}*"), key=lambda path: path.stat().st_mtime)
    if retired_before and not out_dir.exists():  # killed between the two renames: the old output is back
        os.replace(retired_before.pop(), out_dir)
    for leftover in [*parent.glob(f".{name}.{STAGING_MARK}*"), *retired_before]:
        shutil.rmtree(leftover, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.{STAGING_MARK}", dir=parent))
    retired = staging.with_name(staging.name.replace(STAGING_MARK, RETIRED_MARK, 1))
    try:
        fill(staging)
        match_mode(staging, out_dir)
        if out_dir.exists():
            os.replace(out_dir, retired)
        try:
            os.replace(staging, out_dir)
        except BaseException:
            if retired.exists() and not out_dir.exists():
                os.replace(retired, out_dir)
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(retired, ignore_errors=True)


def read_json(path: Path) -> Any:
    """The JSON in ``path``; a file that does not parse raises a ValueError naming it."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{path}: damaged, not JSON ({error}); run the stage that writes it again (dvc repro)"
        ) from None


def write_json(path: str | os.PathLike[str], content: dict[str, Any], *, sort_keys: bool = False) -> None:
    """Write JSON (indented, one trailing newline) with ``write_text_atomic``."""
    write_text_atomic(path, json.dumps(content, indent=2, sort_keys=sort_keys) + "\n")
