"""``make ui``: the MLflow UI on this project's store, opened on the experiment's training runs.

A bare ``http://127.0.0.1:5000`` lands MLflow 3's UI on its GenAI overview (traces, latency: empty for
a tokenizer project); this starts ``mlflow ui`` on the local store, creates the experiment if no stage
has yet, and prints the link to its runs table. With ``MLFLOW_TRACKING_URI`` pointing at a server,
that server is the UI: only the link is printed.

    python -m imtok.ui [--host 127.0.0.1] [--port 5000]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from imtok import tracking


def wait_for_health(base: str, process: subprocess.Popen, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"mlflow ui exited with code {process.returncode} before it answered at {base}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    raise SystemExit(f"mlflow ui did not answer at {base}/health within {timeout_s:.0f} s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (loopback by default)")
    parser.add_argument("--port", type=int, default=5000)
    args = parser.parse_args(argv)
    try:
        mlflow = tracking.configure()  # creates the experiment (tagged as model training) if it is new
    except tracking.TrackingUnavailable as error:  # a server that is down or refuses us: one line
        parser.exit(2, f"make ui: {error}\n")
    experiment = mlflow.get_experiment_by_name(tracking.experiment_name())
    uri = tracking.tracking_uri()
    if tracking.is_server(uri):
        link = tracking.runs_url(uri, experiment.experiment_id)
        print(f"MLflow UI (the server of MLFLOW_TRACKING_URI): {link}")
        return
    base = f"http://{args.host}:{args.port}"
    command = [str(Path(sys.executable).parent / "mlflow"), "ui", "--backend-store-uri", uri]
    command += ["--host", args.host, "--port", str(args.port)]
    # its own process group (mlflow ui starts uvicorn workers), stopped as a whole on Ctrl-C or SIGTERM;
    # MLflow's job runner serves GenAI features only
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    process = subprocess.Popen(command, env=env, start_new_session=True)
    signal.signal(signal.SIGTERM, interrupted)
    # Ctrl-C stops it even when started from a process that ignores SIGINT (Python then inherits the
    # ignore, and the UI would be killed without stopping mlflow ui, which is in a session of its own)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        wait_for_health(base, process)
        print(f"\nMLflow UI, the training runs of experiment {experiment.name!r}:", flush=True)
        print(f"  {tracking.runs_url(base, experiment.experiment_id)}\n(Ctrl-C stops it)", flush=True)
        process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut the clean-up short
            signal.signal(sig, signal.SIG_IGN)
        stop_group(process)


def interrupted(*_: object) -> None:
    raise KeyboardInterrupt


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc; elsewhere none): mlflow ui starts uvicorn, which starts
    its workers, and a child that leaves the process group must not outlive the UI."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_group(process: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM the UI's process group and every process below it (mlflow ui, uvicorn and its workers),
    SIGKILL what is left after ``grace_s``."""
    pids = [process.pid, *descendants(process.pid)]  # before any exits and its children are re-parented
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            process.poll()  # reaps the leader, which else stays a zombie that counts as alive
            if not any(alive(pid) for pid in pids if pid != process.pid) and process.returncode is not None:
                return
            time.sleep(0.1)
    process.poll()


if __name__ == "__main__":
    main()
