"""A stage never outlives the DVC that started it, and two runs never train into one checkpoint directory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from imtok.training import holding_checkpoints, prune_checkpoints

REPO = Path(__file__).resolve().parents[1]
HOLD = (
    "import sys, time\n"
    "from imtok.training import holding_checkpoints\n"
    "with holding_checkpoints(sys.argv[1]):\n"
    "    print('held', flush=True)\n"
    "    time.sleep(120)\n"
)


def test_a_second_run_into_the_same_checkpoints_stops_naming_the_holder_until_the_holder_dies(tmp_path):
    directory = tmp_path / "checkpoints" / "abc"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        message = rf"abc: another run \(PID {holder.pid}\).*kill {holder.pid}"
        with pytest.raises(ValueError, match=message), holding_checkpoints(directory):
            pass
    finally:
        holder.kill()  # SIGKILL: no clean-up runs, the kernel drops the lock
        holder.wait(timeout=30)
    with holding_checkpoints(directory):
        assert (directory / ".holder.lock").read_text().strip() == str(os.getpid())
        assert prune_checkpoints(directory, keep=1) == []  # the lock is no checkpoint to prune


def state(pid: int) -> str | None:
    """The process's state letter (Z: ended, not yet reaped), or None when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def find_stage(marker: str, timeout: float = 60.0) -> int:
    """The PID of the `stages.prepare` process whose command line holds ``marker``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"stages.prepare" in argv and marker.encode() in argv and not argv[0].endswith(b"sh"):
                return int(entry.name)
        time.sleep(0.2)
    raise AssertionError(f"no stages.prepare process with {marker} appeared")


def ended(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if state(pid) in (None, "Z"):
            return True
        time.sleep(0.2)
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
@pytest.mark.parametrize(
    ("launch", "under_dvc"),
    [("shell", True), ("direct", True), ("direct", False)],
    ids=["dvc-shell-wrapper", "dvc-direct", "by-hand"],
)
def test_a_stage_ends_when_the_dvc_that_started_it_is_killed(tmp_path, launch, under_dvc):
    params = tmp_path / "params.yaml"
    full = yaml.safe_load((REPO / "params.yaml").read_text())
    full["prepare"].update({"source": "synthetic", "synthetic_count": 400000, "image_size": 32})
    params.write_text(yaml.safe_dump(full))
    stage = [sys.executable, "-m", "stages.prepare", "--params", str(params)]
    command = ["/bin/sh", "-c", " ".join(stage)] if launch == "shell" else stage
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("DVC_STAGE", None)
    if under_dvc:
        env["DVC_STAGE"] = "prepare"  # what DVC sets for every stage command
    # The stand-in for `dvc repro`: it starts the stage as DVC does, then is killed with SIGKILL.
    dvc = subprocess.Popen(
        [sys.executable, "-c", f"import subprocess, time; subprocess.Popen({command!r}); time.sleep(300)"],
        cwd=tmp_path,
        env=env,
        stderr=subprocess.PIPE,  # the stage writes its log here
        text=True,
    )
    pid = find_stage(str(params))
    try:
        for line in dvc.stderr:  # the stage is at work once it logs its source
            if "source synthetic" in line:
                break
        dvc.kill()
        dvc.wait(timeout=30)
        if under_dvc:
            assert ended(pid, 30.0), f"the stage (PID {pid}) outlived the DVC that started it"
            assert not (tmp_path / "data" / "shards" / "train" / "meta.json").exists()  # no split finished
        else:
            assert not ended(pid, 3.0), "run by hand, a stage outlives its parent (nohup keeps working)"
    finally:
        if state(pid) not in (None, "Z"):
            os.kill(pid, signal.SIGKILL)
