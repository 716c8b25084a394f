"""An MLflow server that is down: a stage fails at once if it is down at start, and an outage during
training costs neither the training nor the metrics. A real `mlflow server` on loopback, stopped and
restarted by the tests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import free_port
from services import services

from imtok.overrides import merged

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = {
    "prepare": {"source": "synthetic", "image_size": 16, "synthetic_count": 300, "maxcount": 100},
    "tokenizer": {
        "base_channels": 8, "codebook_size": 256, "batch_size": 8, "warmup_steps": 2, "total_steps": 400,
        "perceptual_weight": 0.0,
    },
    "run": {
        "tokenizer": {"log_every": 5, "val_every": 400, "val_batches": 1, "checkpoint_every": 20,
                      "keep_checkpoints": 50, "device": "cpu"},
    },
}  # fmt: skip


def project(root: Path, uri: str) -> tuple[Path, dict[str, str]]:
    """A directory with tiny params and prepared shards; the environment that points at ``uri``."""
    root.mkdir(parents=True, exist_ok=True)
    full = yaml.safe_load((REPO / "params.yaml").read_text())
    full = merged(full, TINY)
    (root / "params.yaml").write_text(yaml.safe_dump(full))
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    env |= {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": uri}
    subprocess.run(
        [sys.executable, "-m", "stages.prepare"], cwd=root, env=env, check=True, capture_output=True
    )
    return root, env


def mlflow_server(started, name: str, port: int, database: Path, cwd: Path) -> None:
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    command = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    command += [
        "--backend-store-uri",
        f"sqlite:///{database}",
        "--default-artifact-root",
        str(cwd / "artifacts"),
    ]
    started.start(name, command, env, cwd)
    started.wait_http(name, f"http://127.0.0.1:{port}/health", 180)


def stop(started, name: str) -> None:
    import signal

    process = dict(started.processes)[name]
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


def wait_for(path: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.1)


def test_a_server_that_is_not_there_fails_the_stage_at_once_naming_the_variable(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    root, env = project(tmp_path / "p", uri)
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "stages.train_tokenizer"], cwd=root, env=env, capture_output=True, text=True
    )
    assert done.returncode == 1
    assert time.monotonic() - started < 60  # the wait itself is 20 s; it took 252 s of retries before
    assert f"MLFLOW_TRACKING_URI={uri}: no MLflow server answered" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (root / "models").exists() and not list((root / "checkpoints").rglob("step-*.pt"))


@pytest.mark.slow
def test_an_outage_during_training_neither_stalls_it_nor_loses_its_metrics(tmp_path):
    port = free_port()
    root, env = project(tmp_path / "p", f"http://127.0.0.1:{port}")
    with services(tmp_path / "logs") as started:
        mlflow_server(started, "mlflow", port, tmp_path / "mlflow.db", tmp_path)
        stage = subprocess.Popen(
            [sys.executable, "-m", "stages.train_tokenizer"],
            cwd=root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            checkpoints = None
            deadline = time.monotonic() + 180
            while checkpoints is None:
                found = list((root / "checkpoints").rglob("step-00000020.pt"))
                checkpoints = found[0].parent if found else None
                assert time.monotonic() < deadline and stage.poll() is None, "no checkpoint at step 20"
                time.sleep(0.05)
            stop(started, "mlflow")  # killed at step 20 of 400
            killed = time.monotonic()
            wait_for(checkpoints / "step-00000400.pt")  # training went on, checkpoints too
            trained_through_outage = time.monotonic() - killed
            mlflow_server(started, "mlflow-again", port, tmp_path / "mlflow.db", tmp_path)
            output, _ = stage.communicate(timeout=300)
        finally:
            if stage.poll() is None:
                stage.kill()
        assert stage.returncode == 0, output
        assert "does not answer" in output and "is back" in output, output
        import mlflow

        client = mlflow.MlflowClient(f"http://127.0.0.1:{port}")
        run = client.search_runs(client.get_experiment_by_name("imtok").experiment_id)[0]
        steps = [point.step for point in client.get_metric_history(run.info.run_id, "train/loss")]
        assert steps == list(range(5, 401, 5)), steps  # every log step, those of the outage included
        assert client.get_model_version_by_alias("imtok-tokenizer", "candidate").version == "1"
    assert trained_through_outage < 120, trained_through_outage


@pytest.mark.slow
def test_registration_against_a_server_that_stays_down_says_the_model_is_safe_on_disk(tmp_path):
    port = free_port()
    root, env = project(tmp_path / "p", f"http://127.0.0.1:{port}")
    env |= {"IMTOK_REGISTER_WAIT_S": "6", "IMTOK_FLUSH_WAIT_S": "3"}
    with services(tmp_path / "logs") as started:
        mlflow_server(started, "mlflow", port, tmp_path / "mlflow.db", tmp_path)
        stage = subprocess.Popen(
            [sys.executable, "-m", "stages.train_tokenizer"],
            cwd=root,
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 120
            while not list((root / "checkpoints").rglob("step-00000020.pt")):
                assert time.monotonic() < deadline
                time.sleep(0.05)
            stop(started, "mlflow")
            _, errors = stage.communicate(timeout=300)
        finally:
            if stage.poll() is None:
                stage.kill()
    assert stage.returncode == 1
    assert "could not register imtok-tokenizer" in errors
    assert "the trained model is safe in models/tokenizer/tokenizer.pt" in errors
    assert (root / "models" / "tokenizer" / "tokenizer.pt").is_file()
