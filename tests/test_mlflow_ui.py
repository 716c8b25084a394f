"""The MLflow view a user opens: `make ui` (python -m imtok.ui) serves the project's store and prints
the link to the experiment's training runs, which a real headless Chromium renders as the runs table
(a bare experiment link opens MLflow 3's GenAI overview: traces and latency, empty for us)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port
from services import services

from imtok import tracking

REPO = Path(__file__).resolve().parents[1]


def test_the_runs_link_names_the_experiment_and_the_training_view():
    url = tracking.runs_url("http://127.0.0.1:5000/", "7")
    assert url == "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning"


def test_configure_tags_the_experiment_as_model_training(mlflow_store):
    mlflow = tracking.configure()
    experiment = mlflow.get_experiment_by_name(tracking.experiment_name())
    key, value = tracking.EXPERIMENT_KIND_TAG
    assert experiment.tags[key] == value
    tracking.configure()  # a second stage finds the tag and leaves it
    assert mlflow.get_experiment_by_name(tracking.experiment_name()).tags[key] == value


def rendered(url: str) -> str:
    """The DOM a headless Chromium holds after the page's scripts ran (15 s of virtual time)."""
    done = subprocess.run(
        ["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=15000",
         "--dump-dom", url],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    return done.stdout


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="no chromium here (apt-get install -y chromium)")
def test_make_ui_prints_a_link_that_opens_on_the_training_runs_in_a_real_browser(tmp_path):
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    env |= {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "PYTHONPATH": str(REPO)}
    log_run = "import imtok.tracking as t; m = t.configure(); m.start_run(run_name='train_tokenizer')"
    log_run += "; m.end_run()"
    subprocess.run([sys.executable, "-c", log_run], cwd=tmp_path, env=env, check=True, timeout=300)
    port = free_port()
    with services(tmp_path / "logs") as started:
        command = [sys.executable, "-u", "-m", "imtok.ui", "--port", str(port)]
        started.start("ui", command, env, tmp_path)
        started.wait_http("ui", f"http://127.0.0.1:{port}/health", 180)
        deadline = time.monotonic() + 30
        while not (found := re.search(r"http://\S+/runs\?\S+", started.log("ui"))):
            assert time.monotonic() < deadline, started.log("ui")
            time.sleep(0.2)
        link = found.group(0)
        assert link.startswith(f"http://127.0.0.1:{port}/#/experiments/")
        runs_page = rendered(link)
        assert "train_tokenizer" in runs_page, runs_page[-3000:]  # the runs table lists the run
        overview = rendered(link.split("/runs?")[0])  # what the bare experiment link shows
        assert "train_tokenizer" not in overview
    # stopped (SIGINT, as Ctrl-C), it takes mlflow ui and its uvicorn workers with it (SIGKILLed ones
    # can take seconds to go on a machine busy with disk writes)
    deadline = time.monotonic() + 90
    while left := processes_mentioning(str(tmp_path / "mlflow.db")) + processes_mentioning(f"--port {port}"):
        assert time.monotonic() < deadline, f"still running after the UI stopped: {left}"
        time.sleep(0.5)


def processes_mentioning(text: str) -> list[str]:
    """Command lines of this machine's processes that contain ``text`` (the test's own store path)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            command = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in command:
            found.append(command.strip())
    return found
