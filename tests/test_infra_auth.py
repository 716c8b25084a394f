"""The team services' authentication, as infra/docker-compose.yml configures it, on real servers on
loopback: MLflow's basic-auth app with infra/mlflow-auth.ini and the compose environment, and a Prefect
server with the compose's API auth string. Strangers get 401, the workers' credentials get through,
and the health endpoints the healthchecks and stages poll stay open. (Docker itself is not run.)"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port
from services import services
from test_infra import INFRA, command, environment, option

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]


def status(url: str, credentials: str | None = None, body: dict | None = None) -> int:
    """The HTTP status of a GET (or a JSON POST with ``body``), with ``user:password`` basic auth."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    if credentials is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(credentials.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def clean_env(prefix: str) -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if not key.startswith(prefix)}


@pytest.mark.slow
def test_mlflow_with_the_compose_auth_settings_refuses_strangers_and_lets_the_workers_log(tmp_path):
    server = environment("mlflow")
    ini = (INFRA / "mlflow-auth.ini").read_text()  # the file compose mounts, with the users' db here
    ini, found = re.subn(r"(?m)^database_uri = .*$", f"database_uri = sqlite:///{tmp_path / 'users.db'}", ini)
    assert found == 1
    (tmp_path / "auth.ini").write_text(ini)
    env = clean_env("MLFLOW_") | {"MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "auth.ini")}
    for key in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        env[key] = server[key]
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    launch = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    launch += ["--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    launch += ["--default-artifact-root", str(tmp_path / "artifacts")]
    launch += ["--app-name", option(command("mlflow"), "--app-name")]
    with services(tmp_path / "logs") as started:
        started.start("mlflow", launch, env, tmp_path)
        started.wait_http("mlflow", f"{base}/health", 180)  # open: compose's healthcheck, check_server
        search = f"{base}/api/2.0/mlflow/experiments/search?max_results=1"
        user = server["MLFLOW_AUTH_ADMIN_USERNAME"]
        assert status(search) == 401
        assert status(search, f"{user}:not-the-password") == 401
        assert status(search, f"{user}:{server['MLFLOW_AUTH_ADMIN_PASSWORD']}") == 200

        worker = environment("cpu-worker")
        client = clean_env("MLFLOW_") | {"MLFLOW_TRACKING_URI": base, "PYTHONPATH": str(REPO)}
        script = "import imtok.tracking as t; m = t.configure(); m.start_run(); m.log_metric('psnr', 1.0)"
        script += "; m.end_run(); print('logged')"

        def log_a_run(env: dict[str, str]) -> subprocess.CompletedProcess:
            command = [sys.executable, "-c", script]
            return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

        refused = log_a_run(client)
        assert refused.returncode != 0, refused.stdout
        assert "set MLFLOW_TRACKING_USERNAME" in refused.stderr, refused.stderr[-2000:]
        client |= {key: worker[key] for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
        logged = log_a_run(client)
        assert logged.returncode == 0 and "logged" in logged.stdout, logged.stderr[-2000:]


@pytest.mark.slow
def test_prefect_with_the_compose_auth_string_refuses_strangers_and_serves_the_workers(tmp_path):
    server = environment("prefect-server")
    env = clean_env("PREFECT_") | {
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp_path / 'prefect.db'}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_API_AUTH_STRING": server["PREFECT_SERVER_API_AUTH_STRING"],
    }
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    launch = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with services(tmp_path / "logs") as started:
        started.start("prefect", launch, env, tmp_path)
        started.wait_http("prefect", f"{api}/health", 180)  # open: compose's healthcheck
        assert status(f"{api}/flows/filter", body={}) == 401
        assert status(f"{api}/flows/filter", "imtok:not-the-string", body={}) == 401
        assert status(f"{api}/flows/filter", server["PREFECT_SERVER_API_AUTH_STRING"], body={}) == 200

        client = clean_env("PREFECT_") | {
            "PREFECT_HOME": str(tmp_path / "client-home"),
            "PREFECT_API_URL": api,
        }
        create = [str(BIN / "prefect"), "work-pool", "create", "cpu", "--type", "process"]
        refused = subprocess.run(
            create, cwd=tmp_path, env=client, capture_output=True, text=True, timeout=300
        )
        assert refused.returncode != 0, refused.stdout
        client["PREFECT_API_AUTH_STRING"] = environment("cpu-worker")["PREFECT_API_AUTH_STRING"]
        created = subprocess.run(
            create, cwd=tmp_path, env=client, capture_output=True, text=True, timeout=300
        )
        assert created.returncode == 0, created.stdout + created.stderr
