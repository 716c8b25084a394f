"""train_prior under torchrun: two gloo processes train the same prior and end with identical weights."""

import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import torchrun_command

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("kind", ["maskgit", "gpt"])
def test_two_gloo_processes_train_a_prior_and_hold_identical_weights(tmp_path, kind):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = torchrun_command(str(REPO / "tests" / "ddp_prior_worker.py"), str(tmp_path), kind)
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
