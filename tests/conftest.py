"""Shared fixtures: a moto S3 server over real HTTP on loopback, AWS settings scoped to one test."""

from __future__ import annotations

import os
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no telemetry from test servers
os.environ.setdefault("DVC_NO_ANALYTICS", "1")


# On CPU, torch.compile builds C++ kernels: a machine without a C++ compiler cannot run them.
needs_compiler = pytest.mark.skipif(
    not any(shutil.which(name) for name in ("g++", "c++", "clang++")),
    reason="torch.compile on CPU needs a C++ compiler (g++ or clang++)",
)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def join_gloo(rank: int, world_size: int, port: int, timeout_s: float = 30) -> None:
    """Join a gloo process group of ``world_size`` CPU ranks meeting on 127.0.0.1:``port`` (in a rank
    that ``spawn_ranks`` started; the caller destroys the group)."""
    from datetime import timedelta

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))


def spawn_ranks(function: Callable[..., None], ranks: int, *args: object, limit_s: float = 90) -> None:
    """``function(rank, *args)`` in ``ranks`` spawned processes, joined; the test fails when they have
    not all finished within ``limit_s``, and no process outlives the call."""
    import torch.multiprocessing

    context = torch.multiprocessing.start_processes(
        function, args=args, nprocs=ranks, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + limit_s
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"the ranks did not finish within {limit_s:g} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join(timeout=10)


def torchrun_command(*args: str, log_dir: Path, processes: int = 2) -> list[str]:
    """``args`` (a script or ``-m module`` and its arguments) under ``torch.distributed.run``: local
    ranks that meet on a free loopback port. The launcher's per-run directories go to ``log_dir``
    (inside the test's tmp_path) instead of a ``torchelastic_*`` directory it would leave in /tmp."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(processes),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        "--log-dir",
        str(log_dir),
        *args,
    ]


def damage_png(shard: Path, index: int) -> str:
    """Garble the PNG bytes of sample ``index`` of an image shard, keeping the tar valid; its key."""
    import webdataset as wds
    from webdataset.tariterators import tarfile_samples

    fields = ("__key__", "png", "cls")
    samples = [{name: s[name] for name in fields} for s in tarfile_samples([{"url": str(shard)}])]
    samples[index]["png"] = samples[index]["png"][:20] + b"\x00" * 40
    with wds.TarWriter(str(shard), encoder=False) as writer:
        for sample in samples:
            writer.write(sample)
    return samples[index]["__key__"]


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """One moto server (S3 and the other AWS APIs) for the whole session: its http:// endpoint."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def aws_env(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """Point boto3, s3fs and DVC at the moto server through the standard variables, for this test only.

    Any AWS_* variable of the caller is removed first, and config files are redirected, so a
    developer's real credentials or profile never reach the tests.
    """
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config-absent"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials-absent"))
    return moto_endpoint


@pytest.fixture
def s3_bucket(aws_env: str) -> str:
    """A fresh, empty bucket on the moto server (tests never share buckets)."""
    import boto3

    name = f"imtok-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def fashion_mnist_dir() -> Path | None:
    """The Debian package's Fashion-MNIST directory, or None where it is not installed."""
    names = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")
    names += ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
    if all((FASHION_MNIST_DIR / name).is_file() for name in names):
        return FASHION_MNIST_DIR
    return None


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run on one CPU thread: tiny convolutions gain nothing from more, and on a busy machine
    OpenMP threads waiting for each other can make a step many times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """data/shards/{train,val} of 16x16 grayscale synthetic images (240 train, 60 val, 4 shards each)."""
    from imtok.params import PrepareParams
    from stages.prepare import prepare

    root = tmp_path_factory.mktemp("tiny-shards")
    params = PrepareParams(source="synthetic", synthetic_count=300, image_size=16, maxcount=60, seed=0)
    prepare(params, shards_dir=root / "data" / "shards", download_dir=root / "raw")
    return root / "data" / "shards"


@pytest.fixture
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh sqlite MLflow store (registry included) for this test, set through the standard variable."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "imtok-test")
    monkeypatch.chdir(tmp_path)  # artifacts go to ./mlruns of the working directory
    import mlflow

    mlflow.set_tracking_uri(uri)  # an earlier test's configure() set the process-wide URI: replace it
    return uri


@dataclass(frozen=True)
class Reproduced:
    """A tiny project after its first `dvc repro`: what that printed and the lock it wrote."""

    root: Path
    output: str
    lock: str


@pytest.fixture(scope="session")
def reproduced_project(tmp_path_factory: pytest.TempPathFactory) -> Reproduced:
    """One `dvc repro` of the real dvc.yaml on TINY_PARAMS for the run (about 90 s on 2 cores).

    The pipeline tests share it: the DVC test goes on to change params in ``root`` and rerun (the only
    test that may touch ``root``); the flow test compares its own lock with ``lock``, the text of the
    first one, whatever ran since. Under pytest-xdist each worker has its own session, so the project
    lives in the run's shared base directory and the first worker to ask builds it, under a file
    lock that the others wait on. (``xdist_group`` marks with ``--dist loadgroup`` would keep the two
    tests on one worker, but pytest-xdist 3.8 appends the group to ``item._nodeid``, an attribute
    pytest 9.2 no longer reads, so those marks group nothing.)
    """
    import fcntl
    import json

    from project_factory import TINY_PARAMS, environment, make_project, run

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # one directory for every worker of this run
    home = base / "reproduced"
    home.mkdir(exist_ok=True)
    record = home / "first-repro.json"
    with open(home / ".lock", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)  # released when the file closes, also if the build fails
        if not record.is_file():
            if (home / "project").exists():  # a worker that held the lock before failed to build it
                pytest.fail(f"this run's first dvc repro failed in {home / 'project'}; see that test's error")
            root = make_project(home / "project", TINY_PARAMS)
            output = run(["dvc", "repro"], root, environment(root))
            temporary = record.with_suffix(".tmp")
            temporary.write_text(json.dumps({"output": output, "lock": (root / "dvc.lock").read_text()}))
            os.replace(temporary, record)
    first = json.loads(record.read_text())
    return Reproduced(home / "project", first["output"], first["lock"])
