"""The nightly deployment through a real Prefect server and process worker, with real services.

On loopback: `mlflow server` (sqlite backend, artifacts in S3), a moto S3 server (DVC remote,
shard upload, MLflow artifacts), `prefect server start` and `prefect worker start --pool gpu`.
Select alone with ``pytest -m integration``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import free_port
from project_factory import STAGES, TINY_PARAMS, environment, make_project, run
from services import services

BIN = Path(sys.executable).parent


def scheduled_runs(api: str, deployment_id: str) -> list[dict]:
    """Flow runs in state SCHEDULED of one deployment, from the Prefect REST API."""
    body = {
        "flow_runs": {
            "deployment_id": {"any_": [deployment_id]},
            "state": {"type": {"any_": ["SCHEDULED"]}},
        }
    }
    request = urllib.request.Request(
        f"{api}/flow_runs/filter",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def deployment_id(api: str, name: str) -> str:
    with urllib.request.urlopen(f"{api}/deployments/name/{name}", timeout=30) as response:
        return json.loads(response.read())["id"]


def cli(command: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


@pytest.mark.slow
@pytest.mark.integration
def test_nightly_deployment_runs_through_a_gpu_pool_worker_against_real_services(
    tmp_path, s3_bucket, aws_env
):
    import boto3

    params = {section: dict(values) for section, values in TINY_PARAMS.items()}
    params["prepare"]["upload"] = f"s3://{s3_bucket}/shards"
    root = make_project(tmp_path / "project", params)
    env = environment(root)
    env.update({k: v for k, v in os.environ.items() if k.startswith("AWS_")})
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    env["PREFECT_API_DATABASE_CONNECTION_URL"] = f"sqlite+aiosqlite:///{tmp_path / 'prefect.db'}"
    env["PREFECT_WORKER_QUERY_SECONDS"] = "2"
    env["PREFECT_WORKER_PREFETCH_SECONDS"] = "2"
    env["IMTOK_PROJECT_DIR"] = str(root)
    run(["dvc", "remote", "add", "-d", "storage", f"s3://{s3_bucket}/dvc"], root, env)
    run(["dvc", "remote", "modify", "storage", "endpointurl", aws_env], root, env)
    run(["git", "commit", "-qam", "DVC remote on S3"], root, env)

    mlflow_port, prefect_port = free_port(), free_port()
    env["MLFLOW_TRACKING_URI"] = f"http://127.0.0.1:{mlflow_port}"
    env["PREFECT_API_URL"] = f"http://127.0.0.1:{prefect_port}/api"
    server_env = dict(env, MLFLOW_S3_ENDPOINT_URL=aws_env)
    with services(tmp_path / "logs") as started:
        started.start(
            "mlflow",
            [
                str(BIN / "mlflow"),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(mlflow_port),
                "--backend-store-uri",
                f"sqlite:///{tmp_path / 'mlflow-server.db'}",
                "--artifacts-destination",
                f"s3://{s3_bucket}/mlflow",
                "--workers",
                "1",
            ],
            server_env,
            tmp_path,
        )
        started.start(
            "prefect-server",
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
            env,
            tmp_path,
        )
        started.wait_http("prefect-server", f"http://127.0.0.1:{prefect_port}/api/health", 180)
        started.wait_http("mlflow", f"http://127.0.0.1:{mlflow_port}/health", 180)

        prefect = str(BIN / "prefect")
        for pool in ("gpu", "cpu"):
            cli([prefect, "work-pool", "create", pool, "--type", "process"], root, env)
        # As the README sets it up: one task of each promoting stage at a time, so promotions of the
        # same registered model cannot interleave.
        for stage in ("evaluate_tokenizer", "evaluate"):
            cli([prefect, "concurrency-limit", "create", f"stage:{stage}", "1"], root, env)
        deployed = cli([prefect, "--no-prompt", "deploy", "--all"], root, env, timeout=600)
        assert "imtok-pipeline/nightly" in deployed, deployed
        started.start("worker", [prefect, "worker", "start", "--pool", "gpu", "--type", "process"], env, root)
        watched = subprocess.run(
            [prefect, "deployment", "run", "imtok-pipeline/nightly", "--watch", "--watch-interval", "2"],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=1500,
        )
        report = f"{watched.stdout}\n{watched.stderr}\nworker:\n{started.log('worker')}"
        assert watched.returncode == 0 and "Completed" in watched.stdout, report

        lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
        assert set(STAGES) <= set(lock), report
        cloud = json.loads(run(["dvc", "status", "--cloud", "--json"], root, env))
        assert cloud == {}, f"outputs missing on the remote: {cloud}"
        s3 = boto3.client("s3")
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket).get("Contents", [])]
        assert any(key.startswith("dvc/") for key in keys)
        assert any(key.startswith("shards/train/") for key in keys)
        assert any(key.startswith("mlflow/") for key in keys)  # artifacts went through the server

        import mlflow

        client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
        for name in ("imtok-tokenizer", "imtok-prior"):
            for alias in ("candidate", "champion"):
                assert client.get_model_version_by_alias(name, alias).version == "1", (name, alias)
        for path in ("metrics/tokenizer.json", "metrics/generation.json", "metrics/reference.json"):
            assert json.loads((root / path).read_text()), path

        # The server's scheduler turned the nightly cron schedule into upcoming runs.
        nightly = deployment_id(env["PREFECT_API_URL"], "imtok-pipeline/nightly")
        deadline = time.monotonic() + 120
        upcoming = scheduled_runs(env["PREFECT_API_URL"], nightly)
        while not upcoming and time.monotonic() < deadline:
            time.sleep(3)
            upcoming = scheduled_runs(env["PREFECT_API_URL"], nightly)
        assert upcoming, f"no scheduled nightly runs:\n{started.log('prefect-server')}"
        assert all(r["expected_start_time"][11:16] == "03:00" for r in upcoming), upcoming
