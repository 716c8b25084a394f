"""DVC's command line, run from the project's root with the interpreter of this environment.

Failures of ``pull``/``push`` (network, remote storage) raise `DvcTransferError`, which the flows
retry; any other failure, and a pull of files the remote does not have, raises `DvcCommandError` and
is never retried.

dvc runs in a process group of its own (`run_process_group`): when the call ends early (its timeout,
Ctrl-C, a cancelled Prefect flow run, whose SIGTERM reaches only the flow's process) the whole group
is stopped, so a stage that dvc started never outlives the flow run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from flows.dag import read_stages, uncached_outputs

TRANSFERS = ("pull", "push", "fetch")
MISSING_ON_REMOTE = "Missing cache files"  # what dvc says of files neither in the cache nor on the remote


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


GRACE_S = 30.0
"""Seconds a stopped command's process group gets between SIGTERM and SIGKILL: a stage's SIGTERM
handler (`stages.common.terminate_gracefully`) unwinds, so its MLflow run ends FAILED and its last
checkpoint stays for the re-run."""

DRAIN_S = 5.0
"""Seconds to collect the rest of the output once the group is killed (a process that left the group
could hold the pipes open forever)."""


def run_process_group(
    command: Sequence[str],
    *,
    cwd: Path | str,
    env: dict[str, str] | None,
    timeout_s: float | None = None,
    grace_s: float = GRACE_S,
) -> subprocess.CompletedProcess[str]:
    """Run ``command`` in a new session (its own process group), capturing stdout and stderr as text.

    Whatever ends the wait early — ``timeout_s`` (`subprocess.TimeoutExpired`, carrying the output so
    far), KeyboardInterrupt, SystemExit, a Prefect cancellation — the whole group gets SIGTERM, then up
    to ``grace_s`` seconds to exit, then SIGKILL; the command is reaped and the exception re-raised.
    """
    process = subprocess.Popen(
        list(command),
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except BaseException as error:
        stdout, stderr = _stop_group(process, grace_s)
        if isinstance(error, subprocess.TimeoutExpired):
            error.stdout, error.stderr = stdout, stderr
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _signal_group(process: subprocess.Popen[str], name: str) -> None:
    """Send SIGTERM or SIGKILL (``name``) to the process group led by ``process``; where there are no
    process groups (Windows) to the process alone."""
    if not hasattr(os, "killpg"):
        with contextlib.suppress(OSError):
            process.terminate() if name == "SIGTERM" else process.kill()
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is gone already
        os.killpg(process.pid, getattr(signal, name))


def _stop_group(process: subprocess.Popen[str], grace_s: float) -> tuple[str, str]:
    """SIGTERM the group (its id is the leader's pid), wait ``grace_s`` for its output pipes to close
    and the leader to exit, SIGKILL whatever is left, reap the leader; returns the output read."""
    output: tuple[str, str] | None = None
    try:
        _signal_group(process, "SIGTERM")
        output = process.communicate(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    finally:  # also when a second interrupt arrives during the grace period
        _signal_group(process, "SIGKILL")
        if output is None:
            try:
                output = process.communicate(timeout=DRAIN_S)
            except subprocess.TimeoutExpired:
                for pipe in (process.stdout, process.stderr):
                    if pipe is not None:
                        pipe.close()
        process.wait()
    return output or ("", "")


def dvc(project: Path, *arguments: str, timeout: float | None = None) -> str:
    """Run ``dvc <arguments>`` in ``project``; returns stdout + stderr, raises on failure."""
    command = [sys.executable, "-m", "dvc", *arguments]
    try:
        done = run_process_group(command, cwd=project, env=environment(), timeout_s=timeout)
    except subprocess.TimeoutExpired as error:
        output = (error.stdout or "") + (error.stderr or "")
        raise DvcCommandError(
            f"`dvc {' '.join(arguments)}` in {project}: timed out after {timeout} s; its process group "
            f"was stopped (SIGTERM, then SIGKILL within {GRACE_S:g} s):\n{output[-4000:]}"
        ) from error
    output = done.stdout + done.stderr
    if done.returncode != 0:
        transfer = bool(arguments) and arguments[0] in TRANSFERS
        if transfer and MISSING_ON_REMOTE in output:  # no retry brings back files the remote never had
            raise DvcCommandError(
                f"`dvc {' '.join(arguments)}` in {project}: the remote lacks files dvc.lock names; push "
                f"them from the host that made them, or run the stage again:\n{output[-4000:]}"
            )
        kind = DvcTransferError if transfer else DvcCommandError
        raise kind(
            f"`dvc {' '.join(arguments)}` in {project} exited with {done.returncode}:\n{output[-4000:]}"
        )
    return output


def save_experiment(project: Path, name: str) -> str:
    """``dvc exp save`` of the workspace as ``name`` (replacing one of that name), with the uncached
    outputs that exist, which ``exp save`` would otherwise leave out of the experiment."""
    present = [path for path in uncached_outputs(read_stages(project)) if (Path(project) / path).exists()]
    include = [argument for path in present for argument in ("-I", path)]
    return dvc(project, "exp", "save", "--force", "--name", name, *include)


def lock_entry(project: Path, stage: str) -> dict | None:
    """The stage's entry in dvc.lock (hashes of its command, deps, params and outs)."""
    path = Path(project) / "dvc.lock"
    if not path.is_file():
        return None
    return (yaml.safe_load(path.read_text()) or {}).get("stages", {}).get(stage)
