"""DVC's command line, run from the project's root with the interpreter of this environment.

Failures of ``pull``/``push`` (network, remote storage) raise `DvcTransferError`, which the flows
retry; any other failure raises `DvcCommandError` and is never retried.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

TRANSFERS = ("pull", "push", "fetch")


class DvcCommandError(RuntimeError):
    """A dvc command failed; the message holds the command and the end of its output."""


class DvcTransferError(DvcCommandError):
    """dvc pull/push failed (remote storage or network): safe to retry."""


def environment() -> dict[str, str]:
    """This environment's bin first on PATH, so stage commands (``python -m stages...``) use it."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("DVC_NO_ANALYTICS", "1")
    return env


def dvc(project: Path, *arguments: str, timeout: float | None = None) -> str:
    """Run ``dvc <arguments>`` in ``project``; returns stdout + stderr, raises on failure."""
    command = [sys.executable, "-m", "dvc", *arguments]
    try:
        done = subprocess.run(
            command,
            cwd=project,
            env=environment(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as error:
        raise DvcCommandError(f"`dvc {' '.join(arguments)}` in {project}: timed out") from error
    output = done.stdout + done.stderr
    if done.returncode != 0:
        kind = DvcTransferError if arguments and arguments[0] in TRANSFERS else DvcCommandError
        raise kind(
            f"`dvc {' '.join(arguments)}` in {project} exited with {done.returncode}:\n{output[-4000:]}"
        )
    return output


def lock_entry(project: Path, stage: str) -> dict | None:
    """The stage's entry in dvc.lock (hashes of its command, deps, params and outs)."""
    path = Path(project) / "dvc.lock"
    if not path.is_file():
        return None
    return (yaml.safe_load(path.read_text()) or {}).get("stages", {}).get(stage)
