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
# One OpenMP thread per test process, unless the caller chose: the suite runs in PYTEST_WORKERS
# processes on a few cores, where OpenMP threads waiting for each other make the tiny convolutions of
# the tests many times slower (the unit tests of losses, autoencoder and metrics: 280 s with the
# default threads, 124 s with one, two workers beside a training job). Stages and ranks the tests
# start inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")


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


# The two tiers. `make test` runs everything; `make test-fast` (the inner loop) leaves out what is
# marked slow: the modules below run stages, DVC, services or several processes, or train for real,
# and the tests below are the slow ones in modules that are otherwise unit tests. Chosen from a
# `--durations=0` run of the whole suite on the 2-core Xeon (2026-12-07), where each took several
# seconds or more; a new test of that kind belongs here (or carries @pytest.mark.slow itself).
FULL_TIER_MODULES = {
    "test_benchmarks.py", "test_classifier.py", "test_code_counts.py", "test_dvc_views.py",
    "test_encoding.py", "test_evaluate_promotion.py", "test_evaluate_streaming.py",
    "test_extract_tokens.py", "test_extraction.py", "test_flow_pipeline.py", "test_flows_subprocess.py",
    "test_flows_units.py", "test_infra_auth.py", "test_integration_services.py", "test_mlflow_ui.py",
    "test_pipeline_dvc.py", "test_prepare_stage.py", "test_prior_ddp.py", "test_prior_stages.py",
    "test_runtime_launch.py", "test_s3.py", "test_stage_common.py", "test_stage_lifetimes.py",
    "test_tracking.py", "test_tracking_outage.py", "test_train_tokenizer.py", "test_training.py",
    "test_training_loop.py",
}  # fmt: skip
FULL_TIER_TESTS = {
    "test_autoencoder.py::test_short_training_lowers_reconstruction_error",
    "test_fid.py::test_inception_features_and_fid_match_torch_fidelity",
    "test_fsq_fused.py::test_fused_path_matches_the_eager_reference",
    "test_fsq_fused.py::test_training_and_inference_calls_share_one_compiled_kernel",
    "test_lfq_bsq.py::test_two_gloo_ranks_compute_the_codebook_entropy_of_the_whole_batch",
    "test_maskgit.py::test_training_lowers_the_loss",
    "test_regvq.py::test_distributed_prior_kl_and_its_gradients_equal_one_process_on_the_whole_batch",
    "test_search_triton.py::test_fused_kernel_matches_brute_force_in_the_interpreter",
    "test_shards.py::test_ddp_ranks_read_disjoint_parts_that_cover_the_split_in_equal_batches",
    "test_shards.py::test_a_killed_prepare_leaves_no_partial_shard_and_a_rerun_completes",
    "test_vq.py::test_the_cpu_search_peak_memory_stays_small_in_fresh_processes",
    "test_vq.py::test_distributed_ranks_keep_identical_codebooks",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in FULL_TIER_MODULES or f"{item.path.name}::{item.originalname}" in FULL_TIER_TESTS:
            item.add_marker(pytest.mark.slow)
