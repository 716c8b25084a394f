"""Ranks started by a launcher other than torchrun (srun, mpirun, a shell loop): when one fails before it
joins, the ones that did join give up after ``dist_timeout_s`` with a message, instead of waiting for it."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml
from conftest import free_port, join_gloo, spawn_ranks

from imtok.runtime import ProcessGroupError, setup_runtime

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 4


def rank_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    """The variables a launcher sets for one rank on one host (no torchrun agent)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC_", "GROUP_", "ROLE_"))}
    env.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    return env


def write_params(path: Path, sections: dict) -> Path:
    path.write_text(yaml.safe_dump(sections))
    return path


@pytest.mark.parametrize("stage", ["train_tokenizer", "train_prior"])
def test_a_rank_whose_peer_failed_before_joining_gives_up_after_the_timeout(tmp_path, stage):
    section = "tokenizer" if stage == "train_tokenizer" else "prior"
    good = write_params(
        tmp_path / "params.yaml", {"run": {"dist_timeout_s": TIMEOUT_S, section: {"device": "cpu"}}}
    )
    broken = write_params(tmp_path / "broken.yaml", {section: {"devcie": "cpu"}})  # fails at the params
    port = free_port()
    command = [sys.executable, "-m", f"stages.{stage}", "--no-register"]
    started = time.monotonic()
    ranks = [
        subprocess.Popen(
            [*command, "--params", str(params)],
            cwd=tmp_path,
            env=dict(rank_env(rank, 2, port), PYTHONPATH=str(REPO)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank, params in ((0, good), (1, broken))
    ]
    try:
        logs = [process.communicate(timeout=240)[0] for process in ranks]
    finally:
        for process in ranks:
            process.kill()
            process.wait()
    elapsed = time.monotonic() - started

    assert ranks[1].returncode == 1 and f"{section}.devcie: unknown key" in logs[1], logs[1]
    assert ranks[0].returncode == 1, logs[0]
    waited = re.search(rf"rank 0 of 2 waited (\d+) s \(run\.dist_timeout_s: {TIMEOUT_S}\)", logs[0])
    assert waited and int(waited[1]) >= TIMEOUT_S - 1, logs[0]  # the wait ran out, no other failure
    assert f"for the process group at 127.0.0.1:{port} to form" in logs[0], logs[0]
    assert "Traceback" not in logs[0], logs[0]
    assert elapsed < 120, f"the waiting rank took {elapsed:.0f} s to give up"


@pytest.fixture
def no_process_group():
    yield
    if dist.is_initialized():  # joined by accident (the port reused): leave the worker clean
        dist.destroy_process_group()


def test_a_rank_with_no_rank_0_listening_gives_up_naming_the_key(monkeypatch, no_process_group):
    # rank 1 connects to rank 0's store; none is there
    for name, value in rank_env(1, 2, free_port()).items():
        monkeypatch.setenv(name, value)
    started = time.monotonic()
    with pytest.raises(ProcessGroupError, match=r"^rank 1 of 2 waited \d+ s \(run\.dist_timeout_s: 2\)"):
        setup_runtime("cpu", "fp32", prefix="extract", dist_timeout_s=2)
    assert 1.5 < time.monotonic() - started < 60


def test_a_port_taken_by_another_program_is_not_reported_as_a_missing_rank(monkeypatch, no_process_group):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        for name, value in rank_env(0, 2, taken.getsockname()[1]).items():
            monkeypatch.setenv(name, value)
        with pytest.raises(ProcessGroupError) as error:
            setup_runtime("cpu", "fp32", prefix="prior", dist_timeout_s=60)
    message = str(error.value)
    assert message.startswith("rank 0 of 2 could not open the process group at 127.0.0.1:"), message
    assert "MASTER_PORT" in message and "waited" not in message, message


def test_a_malformed_launcher_variable_is_named(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match=r"^WORLD_SIZE: expected an integer in the environment, got 'two'"):
        setup_runtime("cpu", "fp32")


def test_the_code_digest_follows_the_package_source(tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(REPO / "imtok", copy / "imtok", ignore=shutil.ignore_patterns("__pycache__"))

    def digest() -> str:
        command = [
            sys.executable,
            "-c",
            "from imtok.runtime import code_digest; print(code_digest())",
        ]
        env = {**os.environ, "PYTHONPATH": str(copy)}
        done = subprocess.run(
            command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=True
        )
        return done.stdout.strip()

    first = digest()
    assert len(first) == 12 and digest() == first
    (copy / "imtok" / "notes.txt").write_text("not code")  # caches and other files do not count
    (copy / "imtok" / ".#losses.py").symlink_to("root@host.123:456")  # an editor's lock: a dangling link
    (copy / "imtok" / ".ipynb_checkpoints").mkdir()
    (copy / "imtok" / ".ipynb_checkpoints" / "losses-checkpoint.py").write_text("x = 1\n")
    assert digest() == first
    with (copy / "imtok" / "losses.py").open("a") as handle:
        handle.write("# a fix to a loss\n")
    assert digest() != first


def _agreement_rank(rank: int, world_size: int, port: int, out_dir: str, check: str, same: bool) -> None:
    """One rank of a 2-rank agreement check: rank 1 differs unless ``same``; writes what it got."""
    from imtok.runtime import Runtime, agreed_fingerprint
    from imtok.trainers.tokenizer import agreed_losses

    join_gloo(rank, world_size, port, timeout_s=60)
    runtime = Runtime(device=torch.device("cpu"), rank=rank, world_size=world_size, owns_process_group=True)
    differs = not same and rank == 1
    try:
        if check == "fingerprint":
            result = agreed_fingerprint("bbbb" if differs else "aaaa", runtime, "tokenizer")
        else:  # as when only some nodes find VGG-19 weights: there the perceptual loss is on
            agreed_losses({"perceptual": "no VGG-19 weights found"} if differs else {}, runtime)
            result = "agreed"
    except ValueError as error:
        result = f"error: {error}"
    finally:
        dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.txt").write_text(result)


@pytest.mark.parametrize(
    ("check", "agreed", "error", "listing"),
    [
        (
            "fingerprint",
            "aaaa",
            "tokenizer: the ranks computed different run fingerprints",
            "rank 0: aaaa, rank 1: bbbb",
        ),
        (
            "losses",
            "agreed",
            "tokenizer.vgg_weights: the ranks found different VGG-19 weights",
            "rank 0: none off; rank 1: perceptual off",
        ),
    ],
)
@pytest.mark.parametrize("same", [True, False])
def test_ranks_that_differ_in_fingerprint_or_losses_all_stop_naming_each(
    tmp_path, check, agreed, error, listing, same
):
    spawn_ranks(_agreement_rank, 2, 2, free_port(), str(tmp_path), check, same, limit_s=90)
    results = [(tmp_path / f"rank{rank}.txt").read_text() for rank in range(2)]
    if same:
        assert results == [agreed, agreed]
    else:
        assert results[0] == results[1]
        assert results[0].startswith(f"error: {error}") and listing in results[0]


# ---------------------------------------------------------------------------------------------------
# Which GPU each process takes: a pure function of the launch, so it is checked here without a GPU.


@pytest.mark.parametrize(
    ("device", "local_rank", "local_world_size", "device_count", "visible", "expected"),
    [
        ("cuda", 0, 1, 1, None, 0),
        ("cuda", 5, 8, 8, None, 5),  # torchrun --nproc-per-node 8: rank 5 on GPU 5
        ("cuda", 3, 4, 1, "3", 0),  # srun --gpus-per-task 1: each process sees only its own GPU
        ("cuda:3", 0, 1, 8, None, 3),  # one process a node may pin any GPU
        ("cuda:0", 2, 4, 1, "GPU-5e1f", 0),  # pinning the one GPU the launcher gave it
    ],
)
def test_cuda_index_gives_each_process_its_gpu(
    device, local_rank, local_world_size, device_count, visible, expected
):
    from imtok.runtime import cuda_index

    key = "run.tokenizer.device"
    assert cuda_index(device, local_rank, local_world_size, device_count, key, visible) == expected


@pytest.mark.parametrize(
    ("device", "local_rank", "local_world_size", "device_count", "message"),
    [
        (
            "cuda:0",
            3,
            8,
            8,
            r"run\.tokenizer\.device: 'cuda:0' would put all 8 processes of this node .* GPU 0",
        ),
        ("cuda", 8, 16, 8, r"LOCAL_RANK 8 has no GPU of its own: this process sees 8 GPUs"),
        ("cuda:4", 0, 1, 2, r"'cuda:4' but this process sees 2 GPU\(s\) \(cuda:0 to cuda:1\)"),
        ("cuda:x", 0, 1, 2, r"unknown device 'cuda:x'"),
        ("cuda", 0, 1, 0, r"no CUDA device is visible"),
        ("cuda", 1, 2, 1, r"the 2 processes of this node .* would all share its one visible GPU"),
        ("cuda:0", 0, 2, 1, r"would all share its one visible GPU"),
    ],
)
def test_cuda_index_refuses_a_gpu_that_ranks_would_share_or_that_is_not_there(
    device, local_rank, local_world_size, device_count, message
):
    from imtok.runtime import cuda_index

    with pytest.raises(ValueError, match=message):
        cuda_index(device, local_rank, local_world_size, device_count, "run.tokenizer.device")


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_resolve_device_without_cuda_names_the_key(device, monkeypatch):
    from imtok.runtime import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a host without CUDA, also on GPU hosts

    expected = rf"run\.prior\.device: '{device}' was asked for but CUDA is not available"
    with pytest.raises(ValueError, match=expected):
        resolve_device(device, key="run.prior.device")


@pytest.mark.parametrize("device", ["gpu", "cudax", "mps0"])
def test_resolve_device_refuses_unknown_names(device):
    from imtok.runtime import resolve_device

    with pytest.raises(ValueError, match=rf"run\.sample\.device: unknown device '{device}'"):
        resolve_device(device, key="run.sample.device")
