"""flows.dvc runs dvc in a process group of its own: a timeout or an interrupt stops everything it started.

Real processes throughout: a parent command starts a grandchild that writes its pid to a file and
sleeps (bounded, so nothing outlives the tests even when the code under test fails).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prefect.exceptions import TerminationSignal

from flows.dvc import DvcCommandError, dvc, run_process_group

REPO = Path(__file__).resolve().parents[1]

# argv: pid file, mode (plain: SIGTERM kills it; trap: a handler writes <pid file>.term and exits;
# stubborn: SIGTERM is ignored, only SIGKILL stops it). Sleeps at most 30 s whatever happens.
GRANDCHILD = textwrap.dedent(
    """
    import os, signal, sys, time
    pid_file, mode = sys.argv[1], sys.argv[2]
    if mode == "trap":
        def handler(signum, frame):
            time.sleep(0.5)  # a handler that takes a while (an MLflow run being ended)
            open(pid_file + ".term", "w").write("terminated")
            sys.exit(0)
        signal.signal(signal.SIGTERM, handler)
    elif mode == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with open(pid_file + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(pid_file + ".tmp", pid_file)
    end = time.monotonic() + 30
    while time.monotonic() < end:
        time.sleep(0.1)
    """
)

# argv: pid file, mode; prints a line, starts the grandchild and waits for it (SIGTERM kills it at once).
PARENT = textwrap.dedent(
    """
    import subprocess, sys
    print("parent started", flush=True)
    subprocess.run([sys.executable, "-c", sys.argv[1], sys.argv[2], sys.argv[3]], timeout=30)
    """
)


def _parent(pid_file: Path, mode: str) -> list[str]:
    return [sys.executable, "-c", PARENT, GRANDCHILD, str(pid_file), mode]


def _gone(pid: int, within_s: float = 5.0) -> bool:
    """Whether ``pid`` has exited (or is a zombie nobody reaped yet) within ``within_s`` seconds."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:  # a reparented zombie waits for PID 1 to reap it: it runs no more
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except (FileNotFoundError, IndexError):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


@pytest.fixture
def pid_file(tmp_path) -> Iterator[Path]:
    """Where the grandchild writes its pid; whatever is still running at teardown is SIGKILLed."""
    path = tmp_path / "grandchild.pid"
    yield path
    if path.is_file():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(path.read_text()), signal.SIGKILL)


@contextlib.contextmanager
def interrupt_once(path: Path, error: Callable[[], BaseException], within_s: float) -> Iterator[None]:
    """Raise ``error()`` in this (the main) thread as soon as ``path`` exists, the way Prefect turns
    the runner's SIGTERM into an exception; a RuntimeError after ``within_s`` seconds if it never does."""
    deadline = time.monotonic() + within_s

    def check(_signum, _frame):
        if path.is_file():
            signal.setitimer(signal.ITIMER_REAL, 0)
            raise error()
        if time.monotonic() > deadline:
            signal.setitimer(signal.ITIMER_REAL, 0)
            raise RuntimeError(f"{path} never appeared")

    previous = signal.signal(signal.SIGALRM, check)
    signal.setitimer(signal.ITIMER_REAL, 0.05, 0.05)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_a_timeout_stops_the_grandchild_and_keeps_the_output(pid_file, tmp_path):
    with pytest.raises(subprocess.TimeoutExpired) as timed_out:
        run_process_group(_parent(pid_file, "plain"), cwd=tmp_path, env=None, timeout_s=3, grace_s=5)
    assert pid_file.is_file(), "the grandchild did not start within the 3 s timeout"
    assert _gone(int(pid_file.read_text()))
    assert "parent started" in timed_out.value.stdout


def test_a_grandchild_trapping_sigterm_runs_its_handler_before_the_group_is_killed(pid_file, tmp_path):
    started = time.monotonic()
    with (
        pytest.raises(TerminationSignal),
        interrupt_once(pid_file, lambda: TerminationSignal(signal.SIGTERM), within_s=8),
    ):
        run_process_group(_parent(pid_file, "trap"), cwd=tmp_path, env=None, grace_s=5)
    assert (pid_file.parent / "grandchild.pid.term").read_text() == "terminated"
    assert _gone(int(pid_file.read_text()))
    assert time.monotonic() - started < 9  # the grace period ended when the group did, not after 5 s


def test_a_grandchild_ignoring_sigterm_is_killed_after_the_grace_period(pid_file, tmp_path):
    with pytest.raises(KeyboardInterrupt), interrupt_once(pid_file, KeyboardInterrupt, within_s=8):
        run_process_group(_parent(pid_file, "stubborn"), cwd=tmp_path, env=None, grace_s=1)
    assert _gone(int(pid_file.read_text()), within_s=3)


def test_cancelling_the_callers_process_stops_the_stage_that_dvc_started(pid_file, tmp_path):
    """What a cancelled flow run does: SIGTERM to the flow's process alone, turned into an exception
    while ``dvc repro`` waits on its stage."""
    (tmp_path / "grandchild.py").write_text(GRANDCHILD)
    (tmp_path / "dvc.yaml").write_text(
        f"stages:\n  sleepy:\n    cmd: python grandchild.py {pid_file} trap\n    outs: [never]\n"
    )
    dvc(tmp_path, "init", "--no-scm", "-q")
    with (
        pytest.raises(TerminationSignal),
        interrupt_once(pid_file, lambda: TerminationSignal(signal.SIGTERM), within_s=9),
    ):
        dvc(tmp_path, "repro", "sleepy")
    assert (pid_file.parent / "grandchild.pid.term").read_text() == "terminated"
    assert _gone(int(pid_file.read_text()))


def test_a_dvc_timeout_raises_a_command_error_that_says_so(tmp_path):
    with pytest.raises(DvcCommandError, match=r"`dvc --help` in .*: timed out after 1e-06 s"):
        dvc(tmp_path, "--help", timeout=1e-6)
