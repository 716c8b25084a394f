"""train_prior under torchrun: two gloo processes train the same prior and end with identical weights; ranks
that see different checkpoint directories stop with one message instead of training apart."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import torchrun_command

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("kind", ["maskgit", "gpt"])
def test_two_gloo_processes_train_a_prior_and_hold_identical_weights(tmp_path, kind):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = torchrun_command(
        str(REPO / "tests" / "ddp_prior_worker.py"), str(tmp_path), kind, log_dir=tmp_path / "torchrun"
    )
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert rank0["world_size"] == rank1["world_size"] == 2 and rank0["step"] == rank1["step"] == 3
    for name, value in rank0["state"].items():
        assert torch.equal(value, rank1["state"][name]), name
    initial = rank0["initial"]
    changed = [name for name, value in rank0["state"].items() if not torch.equal(value, initial[name])]
    assert changed, "three training steps left every weight at its initial value"


def test_ranks_that_find_different_checkpoints_stop_at_once_saying_what_each_found(tmp_path):
    # nodes without a shared checkpoint mount: rank 0 finds the finished run's checkpoint, rank 1 none.
    # Resuming on one and starting over on the other used to leave them at different step counts.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    worker = str(REPO / "tests" / "ddp_prior_worker.py")
    first = subprocess.run(
        torchrun_command(worker, str(tmp_path), "maskgit", log_dir=tmp_path / "torchrun-first"),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert first.returncode == 0, first.stdout + first.stderr
    (checkpoint,) = (tmp_path / "checkpoints").rglob("*.pt")
    shutil.copytree(tmp_path / "checkpoints", tmp_path / "checkpoints-rank0")
    (tmp_path / "rank0.pt").unlink()
    (tmp_path / "rank1.pt").unlink()

    second = subprocess.run(
        torchrun_command(
            worker, str(tmp_path), "maskgit", "per-rank-checkpoints", log_dir=tmp_path / "torchrun-second"
        ),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = second.stdout + second.stderr
    assert second.returncode != 0, output
    size = checkpoint.stat().st_size
    expected = f"rank 0: {checkpoint.name} ({size} bytes); rank 1: no checkpoint"
    assert expected in output and "one mount that all nodes share" in output, output
    assert not (tmp_path / "rank0.pt").exists() and not (tmp_path / "rank1.pt").exists()
