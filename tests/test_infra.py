"""infra/: the compose file, its env file and Dockerfiles agree with each other and with the lock.

Pure file parsing: nothing here starts a container.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
COMPOSE_FILE = INFRA / "docker-compose.yml"
ENV_EXAMPLE = INFRA / ".env.example"
LOCK = ROOT / "requirements.lock"

SERVICES = ("postgres", "minio", "minio-init", "mlflow", "prefect-server", "gpu-worker", "cpu-worker")
WORKERS = ("gpu-worker", "cpu-worker")

# Compose interpolation: `$$` (a literal `$`), `${NAME}`, `${NAME:-default}`, `${NAME:?error}`, ...,
# and the unbraced `$NAME`.
_VARIABLE = re.compile(
    r"\$(?:(?P<escape>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


# --- parsing helpers ------------------------------------------------------------------------------


def strings(node: Any) -> list[str]:
    """Every string in a parsed YAML document, keys included."""
    if isinstance(node, dict):
        return [s for key, value in node.items() for s in strings(key) + strings(value)]
    if isinstance(node, list):
        return [s for item in node for s in strings(item)]
    return [node] if isinstance(node, str) else []


def interpolated_names(document: Any) -> set[str]:
    """The variable names that compose interpolates in a parsed compose file."""
    matches = [m for text in strings(document) for m in _VARIABLE.finditer(text)]
    return {m["braced"] or m["bare"] for m in matches if not m["escape"]}


def interpolate(node: Any, env: dict[str, str]) -> Any:
    """A parsed YAML document with compose's interpolation applied to its strings (``$$`` -> ``$``)."""
    if isinstance(node, dict):
        return {interpolate(key, env): interpolate(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate(item, env) for item in node]
    return interpolate_string(node, env) if isinstance(node, str) else node


def interpolate_string(text: str, env: dict[str, str]) -> str:
    """``text`` with compose's interpolation applied."""

    def substitute(match: re.Match[str]) -> str:
        if match["escape"]:
            return "$"
        name = match["braced"] or match["bare"]
        op, arg = match["op"] or "", match["arg"] or ""
        value = env.get(name)
        is_set = value is not None and (value != "" or not op.startswith(":"))
        if op.endswith("-"):
            return value if is_set else arg
        if op.endswith("+"):
            return arg if is_set else ""
        if op.endswith("?") and not is_set:
            raise KeyError(f"{name}: {arg}")
        return value or ""

    return _VARIABLE.sub(substitute, text)


def parse_env_file(path: Path) -> dict[str, str]:
    """``NAME=value`` lines of an env file; comments and blank lines skipped."""
    env: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, sep, value = line.partition("=")
            assert sep, f"{path.name}: {line!r} is not NAME=value"
            env[name.strip()] = value.strip()
    return env


def locked_version(package: str) -> str:
    """The version that requirements.lock pins for ``package``."""
    found = re.search(rf"^{re.escape(package)}==(\S+)", LOCK.read_text(), re.MULTILINE)
    assert found, f"requirements.lock pins no {package}"
    return found[1]


@cache
def env_example() -> dict[str, str]:
    """The variables of infra/.env.example."""
    return parse_env_file(ENV_EXAMPLE)


@cache
def raw_compose() -> dict[str, Any]:
    """The compose file as written (merge keys resolved, nothing interpolated)."""
    return yaml.safe_load(COMPOSE_FILE.read_text())


@cache
def compose() -> dict[str, Any]:
    """The compose file after interpolation with the values of .env.example."""
    return interpolate(raw_compose(), env_example())


def service(name: str) -> dict[str, Any]:
    """One service of the interpolated compose file."""
    services = compose()["services"]
    assert name in services, f"docker-compose.yml has no service {name!r}"
    return services[name]


def environment(name: str) -> dict[str, str]:
    """A service's environment as a dict (mapping or ``NAME=value`` list syntax)."""
    env = service(name).get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {key: str(value) for key, value in env.items()}


def command(name: str) -> list[str]:
    """A service's command as a list of arguments."""
    cmd = service(name).get("command") or []
    return shlex.split(cmd) if isinstance(cmd, str) else [str(arg) for arg in cmd]


def option(args: list[str], flag: str) -> str:
    """The value of ``flag`` in ``args`` (``--flag value`` or ``--flag=value``)."""
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{flag} not in {args}")


def published_ports(name: str) -> set[int]:
    """Host ports a service publishes (short ``HOST:CONTAINER`` or long syntax)."""
    ports: set[int] = set()
    for entry in service(name).get("ports") or []:
        if isinstance(entry, dict):
            ports.add(int(entry["published"]))
        else:
            parts = str(entry).split("/")[0].split(":")
            ports.add(int(parts[-2] if len(parts) > 1 else parts[-1]))
    return ports


def container_port(name: str) -> int:
    """The container port behind a service's first published port."""
    entry = service(name)["ports"][0]
    return int(entry["target"]) if isinstance(entry, dict) else int(str(entry).split("/")[0].split(":")[-1])


def host_port(url: str) -> tuple[str | None, int | None]:
    """``(host, port)`` of a URL."""
    parts = urlsplit(url)
    return parts.hostname, parts.port


def depends_on(name: str) -> dict[str, dict[str, Any]]:
    """A service's dependencies as ``{service: options}`` (list or mapping syntax)."""
    deps = service(name).get("depends_on") or {}
    return {dep: {} for dep in deps} if isinstance(deps, list) else dict(deps)


def minio_init_buckets() -> set[str]:
    """The buckets that minio-init's script creates with ``mc mb``."""
    script = "\n".join(command("minio-init"))
    buckets: set[str] = set()
    for line in script.splitlines():
        words = shlex.split(line, comments=True)
        if words[:2] == ["mc", "mb"]:
            buckets |= {word.split("/", 1)[1].strip("/") for word in words[2:] if "/" in word}
    return buckets


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` of a Dockerfile, continuation lines joined, comments dropped."""
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    instructions = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, args = line.strip().partition(" ")
            instructions.append((keyword.upper(), args.strip()))
    return instructions


def pip_installs(path: Path) -> list[list[str]]:
    """The arguments of every ``pip install`` in a Dockerfile's RUN instructions."""
    installs = []
    for keyword, args in dockerfile_instructions(path):
        if keyword != "RUN":
            continue
        for part in re.split(r"&&|;", args):
            words = shlex.split(part)
            for i in range(len(words) - 1):
                if words[i].endswith("pip") and words[i + 1] == "install":
                    installs.append(words[i + 2 :])
    return installs


def pinned(installs: list[list[str]], package: str) -> str:
    """The version of ``package`` pinned by ``pip install`` arguments."""
    for args in installs:
        for arg in args:
            if re.match(rf"{re.escape(package)}(\[[\w,-]+\])?==", arg.lower()):
                return arg.split("==", 1)[1]
    raise AssertionError(f"no pip install pins {package}: {installs}")


def build_dockerfile(name: str) -> Path:
    """The Dockerfile a service builds from (relative to its context, which is relative to infra/)."""
    build = service(name)["build"]
    context = INFRA / (build if isinstance(build, str) else build.get("context", "."))
    dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
    return (context / dockerfile).resolve()


# --- the compose file -----------------------------------------------------------------------------


def test_compose_file_has_the_services() -> None:
    missing = set(SERVICES) - set(compose()["services"])
    assert not missing, f"docker-compose.yml lacks the services {sorted(missing)}"


@pytest.mark.parametrize(
    ("name", "port"), [("mlflow", 5000), ("minio", 9000), ("minio", 9001), ("prefect-server", 4200)]
)
def test_port_is_published(name: str, port: int) -> None:
    assert port in published_ports(name), f"{name} does not publish port {port}: {published_ports(name)}"


@pytest.mark.parametrize("name", ["postgres", "minio", "mlflow", "prefect-server"])
def test_long_running_service_has_healthcheck(name: str) -> None:
    assert service(name).get("healthcheck", {}).get("test"), f"{name} has no healthcheck"


def test_every_interpolated_variable_is_in_env_example() -> None:
    missing = interpolated_names(raw_compose()) - set(env_example())
    assert not missing, f"docker-compose.yml interpolates {sorted(missing)}, absent from .env.example"


def test_env_example_has_no_unused_variable() -> None:
    unused = set(env_example()) - interpolated_names(raw_compose())
    assert not unused, f".env.example lists {sorted(unused)}, which docker-compose.yml never uses"


def test_secrets_are_interpolated_not_written() -> None:
    raw = raw_compose()["services"]
    literal = [
        f"{name}.{key}"
        for name, svc in raw.items()
        for key, value in (svc.get("environment") or {}).items()
        if re.search(r"PASSWORD|SECRET|ACCESS_KEY|AUTH_STRING", key) and "${" not in str(value)
    ]
    assert not literal, f"secrets written into docker-compose.yml instead of ${{VAR}}: {literal}"


def test_env_example_secrets_are_placeholders() -> None:
    real = [
        k
        for k, v in env_example().items()
        if re.search(r"PASSWORD|SECRET|AUTH_STRING", k) and "change-me" not in v
    ]
    assert not real, f".env.example must hold change-me placeholders for {real}"


def test_every_dependency_is_a_service() -> None:
    unknown = {f"{name} -> {dep}" for name in compose()["services"] for dep in depends_on(name)}
    unknown = {edge for edge in unknown if edge.split(" -> ")[1] not in compose()["services"]}
    assert not unknown, f"depends_on names services that do not exist: {sorted(unknown)}"


def test_healthy_dependencies_have_healthchecks() -> None:
    unchecked = [
        f"{name} -> {dep}"
        for name in compose()["services"]
        for dep, opts in depends_on(name).items()
        if opts.get("condition") == "service_healthy" and "healthcheck" not in service(dep)
    ]
    assert not unchecked, f"service_healthy on services without a healthcheck: {unchecked}"


def test_named_volumes_are_declared() -> None:
    declared = set(compose().get("volumes") or {})
    used = {
        str(volume).split(":")[0]
        for svc in compose()["services"].values()
        for volume in svc.get("volumes") or []
        if not str(volume).startswith((".", "/", "~"))
    }
    assert used <= declared, f"named volumes used but not declared: {sorted(used - declared)}"


def test_bind_mounted_paths_exist() -> None:
    missing = [
        str(volume)
        for svc in compose()["services"].values()
        for volume in svc.get("volumes") or []
        if str(volume).startswith(".") and not (INFRA / str(volume).split(":")[0]).exists()
    ]
    assert not missing, f"bind mounts of paths missing next to docker-compose.yml: {missing}"


def test_every_build_dockerfile_exists() -> None:
    missing = [
        f"{name}: {build_dockerfile(name)}"
        for name, svc in compose()["services"].items()
        if "build" in svc and not build_dockerfile(name).is_file()
    ]
    assert not missing, f"Dockerfiles missing: {missing}"


def test_worker_build_context_is_repo_root() -> None:
    context = (INFRA / service("gpu-worker")["build"]["context"]).resolve()
    assert context == ROOT, f"the worker image must build from the repository root, not {context}"


# --- MLflow, MinIO, Postgres ----------------------------------------------------------------------


def test_minio_init_creates_the_buckets() -> None:
    missing = {"mlflow", "dvc", "shards"} - minio_init_buckets()
    assert not missing, f"minio-init does not create the buckets {sorted(missing)}"


def test_minio_init_waits_for_healthy_minio() -> None:
    condition = depends_on("minio-init").get("minio", {}).get("condition")
    assert condition == "service_healthy", f"minio-init must wait for minio to be healthy, not {condition}"


def test_mlflow_artifacts_go_to_a_created_bucket() -> None:
    args = command("mlflow")
    flag = "--artifacts-destination" if "--artifacts-destination" in args else "--default-artifact-root"
    destination = urlsplit(option(args, flag))
    assert destination.scheme == "s3", f"MLflow artifacts are not on S3: {destination.geturl()}"
    assert destination.netloc in minio_init_buckets(), f"minio-init does not create {destination.netloc!r}"


def test_mlflow_s3_endpoint_is_minio_api() -> None:
    host, port = host_port(environment("mlflow")["MLFLOW_S3_ENDPOINT_URL"])
    assert host == "minio", f"MLFLOW_S3_ENDPOINT_URL points at {host}, not the minio service"
    assert port == container_port("minio") == 9000, f"MLFLOW_S3_ENDPOINT_URL port {port} is not MinIO's API"


def test_mlflow_s3_credentials_are_the_minio_init_user() -> None:
    mlflow_key = environment("mlflow")["AWS_ACCESS_KEY_ID"]
    init_key = environment("minio-init")["IMTOK_S3_ACCESS_KEY"]
    assert mlflow_key == init_key, "MLflow's AWS_ACCESS_KEY_ID is not the user minio-init creates"


def test_mlflow_waits_for_postgres_and_buckets() -> None:
    deps = depends_on("mlflow")
    assert deps.get("postgres", {}).get("condition") == "service_healthy", "mlflow must wait for postgres"
    assert deps.get("minio-init", {}).get("condition") == "service_completed_successfully", (
        "mlflow must wait for minio-init to finish"
    )


def test_mlflow_backend_is_the_postgres_service() -> None:
    backend = urlsplit(option(command("mlflow"), "--backend-store-uri"))
    postgres = environment("postgres")
    assert backend.scheme.startswith("postgresql"), f"backend store is not Postgres: {backend.scheme}"
    assert backend.hostname == "postgres", f"backend host {backend.hostname} is not the postgres service"
    assert backend.username == postgres["POSTGRES_USER"], "backend store user differs from POSTGRES_USER"
    assert backend.password == postgres["POSTGRES_PASSWORD"], "backend password is not POSTGRES_PASSWORD"
    assert backend.path.lstrip("/") == postgres["POSTGRES_DB"], "backend database differs from POSTGRES_DB"


def test_mlflow_accepts_the_workers_host_header() -> None:
    allowed = option(command("mlflow"), "--allowed-hosts").split(",")
    header = f"mlflow:{container_port('mlflow')}"
    ok = any(fnmatch.fnmatch(header, pattern) if "*" in pattern else header == pattern for pattern in allowed)
    assert ok, f"MLflow's --allowed-hosts {allowed} rejects the workers' Host header {header}"


def test_prefect_database_is_created_by_init_script() -> None:
    url = urlsplit(environment("prefect-server")["PREFECT_API_DATABASE_CONNECTION_URL"])
    created = {
        name.lower()
        for script in (INFRA / "postgres-init").glob("*.sql")
        for name in re.findall(r"CREATE\s+DATABASE\s+\"?(\w+)", script.read_text(), re.IGNORECASE)
    }
    assert url.hostname == "postgres", f"Prefect's database host {url.hostname} is not the postgres service"
    assert url.path.lstrip("/") in created, f"no postgres-init script creates {url.path.lstrip('/')!r}"


# --- workers --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", WORKERS)
def test_worker_prefect_api_is_prefect_server(name: str) -> None:
    url = environment(name)["PREFECT_API_URL"]
    assert host_port(url) == ("prefect-server", container_port("prefect-server")), (
        f"{name}'s PREFECT_API_URL {url} is not the prefect-server service and port"
    )
    assert urlsplit(url).path.rstrip("/") == "/api", f"{name}'s PREFECT_API_URL must end in /api: {url}"


@pytest.mark.parametrize("name", WORKERS)
def test_worker_tracking_uri_is_mlflow(name: str) -> None:
    url = environment(name)["MLFLOW_TRACKING_URI"]
    assert host_port(url) == ("mlflow", container_port("mlflow")), (
        f"{name}'s MLFLOW_TRACKING_URI {url} is not the mlflow service and port"
    )


@pytest.mark.parametrize("name", WORKERS)
def test_worker_s3_endpoint_is_minio(name: str) -> None:
    url = environment(name)["AWS_ENDPOINT_URL"]
    assert host_port(url) == ("minio", 9000), f"{name}'s AWS_ENDPOINT_URL {url} is not MinIO's API"
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(environment(name)), f"{name} has no S3 keys"


@pytest.mark.parametrize(("name", "pool"), [("gpu-worker", "gpu"), ("cpu-worker", "cpu")])
def test_worker_polls_its_pool(name: str, pool: str) -> None:
    args = command(name)
    assert args[:3] == ["prefect", "worker", "start"], f"{name} does not run a Prefect worker: {args}"
    assert option(args, "--pool") == pool, f"{name} polls {option(args, '--pool')!r}, not {pool!r}"
    assert option(args, "--type") == "process", f"{name} is not a process worker"


def gpu_devices(name: str) -> list[dict[str, Any]]:
    """The device reservations of a service."""
    return service(name).get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def test_gpu_worker_reserves_nvidia_gpu() -> None:
    devices = gpu_devices("gpu-worker")
    ok = any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    assert ok, f"gpu-worker reserves no nvidia GPU: {gpu_devices('gpu-worker')}"


def test_cpu_worker_reserves_no_gpu() -> None:
    assert not gpu_devices("cpu-worker"), "cpu-worker reserves devices"


def test_workers_share_one_image() -> None:
    images = {service(name).get("image") for name in WORKERS}
    assert len(images) == 1 and None not in images, f"the workers must use one image: {images}"


# --- Dockerfiles and the lock ---------------------------------------------------------------------


def test_worker_installs_the_lock_without_deps() -> None:
    installs = pip_installs(INFRA / "worker.Dockerfile")
    lock = [args for args in installs if "-r" in args and option(args, "-r") == "requirements.lock"]
    assert lock, f"worker.Dockerfile does not pip install -r requirements.lock: {installs}"
    assert all("--no-deps" in args for args in lock), "the lock must be installed with --no-deps"


def test_worker_installs_the_project_without_deps() -> None:
    installs = [args for args in pip_installs(INFRA / "worker.Dockerfile") if "-e" in args]
    assert installs and option(installs[0], "-e") == ".", "worker.Dockerfile does not pip install -e ."
    assert "--no-deps" in installs[0], "the project must be installed with --no-deps"


def test_worker_context_ignores_local_state() -> None:
    ignore = INFRA / "worker.Dockerfile.dockerignore"
    patterns = set(ignore.read_text().split()) if ignore.is_file() else set()
    missing = {".venv", ".git", "infra/.env"} - patterns
    assert not missing, f"worker.Dockerfile.dockerignore does not exclude {sorted(missing)}"


@pytest.mark.parametrize("package", ["mlflow", "flask-wtf", "boto3"])
def test_mlflow_image_pins_the_locked_version(package: str) -> None:
    version = pinned(pip_installs(INFRA / "mlflow.Dockerfile"), package)
    assert version == locked_version(package), (
        f"mlflow.Dockerfile pins {package}=={version}, requirements.lock {locked_version(package)}"
    )


def test_prefect_server_image_is_the_locked_version() -> None:
    image = service("prefect-server")["image"]
    repository, _, tag = image.rpartition(":")
    assert repository == "prefecthq/prefect", f"prefect-server runs {image}, not prefecthq/prefect"
    assert tag.split("-")[0] == locked_version("prefect"), (
        f"prefect-server runs {tag}, requirements.lock pins prefect=={locked_version('prefect')}"
    )


@pytest.mark.parametrize("name", ["postgres", "minio", "minio-init", "prefect-server"])
def test_pulled_images_are_pinned(name: str) -> None:
    image = service(name)["image"]
    tag = image.rpartition(":")[2] if ":" in image.rsplit("/", 1)[-1] else ""
    assert tag and tag != "latest", f"{name}'s image {image} has no pinned tag"


@pytest.mark.parametrize("dockerfile", ["mlflow.Dockerfile", "worker.Dockerfile"])
def test_dockerfile_bases_are_pinned(dockerfile: str) -> None:
    instructions = dockerfile_instructions(INFRA / dockerfile)
    bases = [args.split()[0] for keyword, args in instructions if keyword == "FROM"]
    unpinned = [base for base in bases if ":" not in base.rsplit("/", 1)[-1] or base.endswith(":latest")]
    assert bases and not unpinned, f"{dockerfile} has unpinned base images: {unpinned}"


@pytest.mark.parametrize("name", ["gpu-worker", "cpu-worker"])
def test_workers_run_flows_in_the_mounted_checkout_prefect_yaml_changes_into(name: str) -> None:
    project = environment(name)["IMTOK_PROJECT_DIR"]
    mounts = [v for v in service(name).get("volumes", []) if isinstance(v, str)]
    assert f"..:{project}" in mounts, f"{name}: the checkout (..) is not mounted at {project}"
    deployment = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    (step,) = deployment["pull"]
    directory = step["prefect.deployments.steps.set_working_directory"]["directory"]
    assert directory.replace(" ", "") == "{{$IMTOK_PROJECT_DIR}}", directory


# --- exposure and authentication ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlflow", "minio", "prefect-server"])
def test_published_ports_listen_on_loopback_unless_the_env_file_opens_them(name: str) -> None:
    raw = [str(entry) for entry in raw_compose()["services"][name]["ports"]]
    for entry in raw:
        assert entry.startswith("${IMTOK_BIND_ADDRESS:-127.0.0.1}:"), (
            f"{name} publishes {entry} on every interface"
        )
    assert env_example()["IMTOK_BIND_ADDRESS"] == "127.0.0.1"
    opened = interpolate(raw, {"IMTOK_BIND_ADDRESS": "0.0.0.0"})
    assert all(entry.startswith("0.0.0.0:") for entry in opened)


def test_mlflow_runs_the_basic_auth_app_with_credentials_from_the_env_file() -> None:
    assert option(command("mlflow"), "--app-name") == "basic-auth"
    env = raw_compose()["services"]["mlflow"]["environment"]
    for key in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert str(env[key]).startswith("${"), f"mlflow's {key} is not taken from infra/.env"
    config = environment("mlflow")["MLFLOW_AUTH_CONFIG_PATH"]
    mounts = {volume.split(":")[1]: volume.split(":")[0] for volume in service("mlflow")["volumes"]}
    assert (INFRA / mounts[config]).is_file(), f"{config} is not mounted from a file under infra/"


@pytest.mark.parametrize("name", WORKERS)
def test_workers_send_the_credentials_the_servers_require(name: str) -> None:
    worker, mlflow = environment(name), environment("mlflow")
    assert worker["MLFLOW_TRACKING_USERNAME"] == mlflow["MLFLOW_AUTH_ADMIN_USERNAME"]
    assert worker["MLFLOW_TRACKING_PASSWORD"] == mlflow["MLFLOW_AUTH_ADMIN_PASSWORD"]
    assert (
        worker["PREFECT_API_AUTH_STRING"] == environment("prefect-server")["PREFECT_SERVER_API_AUTH_STRING"]
    )
