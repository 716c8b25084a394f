"""Real service processes on loopback for integration tests; every one is stopped at the end."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class Services:
    """Starts processes in their own process groups, logs to files, and stops them all."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.logs.mkdir(parents=True, exist_ok=True)
        self.processes: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, command: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        process = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.processes.append((name, process))
        return process

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text()[-6000:] if path.exists() else ""

    def wait_http(self, name: str, url: str, timeout: float = 120.0) -> None:
        """Poll ``url`` until it answers 200; fail with the service's log if it dies or times out."""
        process = dict(self.processes)[name]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}:\n{self.log(name)}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{name} not healthy at {url} after {timeout:.0f} s:\n{self.log(name)}")

    def stop_all(self) -> None:
        """SIGINT each group (twice: a Prefect worker may need it), then SIGKILL what is left."""
        for _, process in reversed(self.processes):
            for sig in (signal.SIGINT, signal.SIGINT, signal.SIGKILL):
                if process.poll() is not None:
                    break
                try:
                    os.killpg(process.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    continue
        for _, process in self.processes:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)  # children left in the group (flow runs)


@contextmanager
def services(logs: Path) -> Iterator[Services]:
    started = Services(logs)
    try:
        yield started
    finally:
        started.stop_all()
