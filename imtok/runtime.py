"""Where and how a training stage runs: device, precision, DDP process group, resumable batch stream.

A stage calls ``setup_runtime`` once. Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) it
joins the process group (NCCL on CUDA, gloo on CPU) and each process takes the GPU of its local rank;
run plainly it is a single process. Only the main process (rank 0) writes files and talks to MLflow.

Any launcher that sets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` works (srun, mpirun,
a shell loop), but only torchrun stops the other ranks when one dies before it joins: elsewhere the
ranks that did join wait for it. ``dist_timeout_s`` bounds that wait (and every collective's), and
``setup_runtime`` then raises ``ProcessGroupError`` saying which rank gave up and why.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
import pathlib
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Runtime:
    """The process's place in the job and the numeric settings every forward pass uses."""

    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    autocast_dtype: torch.dtype | None = None  # None: full float32
    owns_process_group: bool = False  # whether setup_runtime created it (and shutdown destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def precision(self) -> str:
        return "fp32" if self.autocast_dtype is None else "bf16"

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """bf16 autocast when configured, else a no-op; the quantizers keep float32 inside either way."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


class ProcessGroupError(RuntimeError):
    """The process group did not form: a rank did not join within the timeout, or the address is unusable."""


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(
            f"{name}: expected an integer in the environment, got {value!r}; the launcher (torchrun, srun, "
            "...) sets it per process"
        ) from None


def cuda_index(
    device: str,
    local_rank: int,
    local_world_size: int,
    device_count: int,
    key: str,
    visible_devices: str | None = None,
) -> int:
    """The GPU a process takes for ``cuda`` or ``cuda:N``, given its ``LOCAL_RANK``, the number of
    processes on its node and the GPUs it sees.

    ``cuda`` is the local rank's GPU, or GPU 0 when the process sees exactly one. ``cuda:N`` pins one
    GPU, so it is refused when several processes of this node see several GPUs: every rank would
    train on GPU N. Several processes of a node that each see one GPU are fine only when a launcher
    gave each its own through ``CUDA_VISIBLE_DEVICES`` (``visible_devices``; ``srun --gpus-per-task 1``
    does); without it they would all share the node's one GPU, which NCCL refuses at its first
    collective with less to go on.
    """
    if device_count < 1:
        raise ValueError(f"{key}: {device!r} was asked for but no CUDA device is visible; use auto or cpu")
    own_gpu = visible_devices is not None and len([d for d in visible_devices.split(",") if d.strip()]) == 1
    if device_count == 1 and local_world_size > 1 and not own_gpu:
        raise ValueError(
            f"{key}: the {local_world_size} processes of this node (LOCAL_WORLD_SIZE, else WORLD_SIZE) "
            "would all share its one visible GPU; start one process per GPU (torchrun --nproc-per-node 1) "
            "or give each process its own GPU through CUDA_VISIBLE_DEVICES"
        )
    if device == "cuda":
        if device_count == 1:
            return 0
        if local_rank >= device_count:
            raise ValueError(
                f"{key}: LOCAL_RANK {local_rank} has no GPU of its own: this process sees {device_count} "
                f"GPUs; start at most {device_count} processes per node (torchrun --nproc-per-node) or "
                "set CUDA_VISIBLE_DEVICES per process"
            )
        return local_rank
    suffix = device.removeprefix("cuda:")
    if not suffix.isdigit():
        raise ValueError(f"{key}: unknown device {device!r}; use auto, cpu, cuda or cuda:N")
    index = int(suffix)
    if index >= device_count:
        raise ValueError(
            f"{key}: {device!r} but this process sees {device_count} GPU(s) (cuda:0 to "
            f"cuda:{device_count - 1}); check CUDA_VISIBLE_DEVICES"
        )
    if local_world_size > 1 and device_count > 1:
        raise ValueError(
            f"{key}: {device!r} would put all {local_world_size} processes of this node (LOCAL_WORLD_SIZE, "
            f"else WORLD_SIZE) on GPU {index}; use cuda or auto, so that each process takes the GPU of its "
            "LOCAL_RANK (or set LOCAL_WORLD_SIZE=1 where each node runs one process)"
        )
    return index


def resolve_device(
    device: str, local_rank: int = 0, key: str = "device", local_world_size: int = 1
) -> torch.device:
    """``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` (the local rank's GPU) or ``cuda:N``
    (refused when several processes of a node would share it; see ``cuda_index``)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(
                f"{key}: {device!r} was asked for but CUDA is not available here; use auto or cpu"
            )
        index = cuda_index(
            device,
            local_rank,
            local_world_size,
            torch.cuda.device_count(),
            key,
            visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
        )
        return torch.device("cuda", index)
    raise ValueError(f"{key}: unknown device {device!r}; use auto, cpu, cuda or cuda:N")


def resolve_precision(precision: str, device: torch.device, key: str = "precision") -> torch.dtype | None:
    """The autocast dtype: bf16 for ``bf16`` (and for ``auto`` on a bf16-capable GPU), else None."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else None
    raise ValueError(f"{key}: unknown precision {precision!r}; use auto, fp32 or bf16")


def default_dist_timeout_s(backend: str) -> float:
    """PyTorch's own process-group timeout for ``backend`` (10 min for NCCL, 30 min otherwise)."""
    from torch.distributed import constants

    nccl = constants.default_pg_nccl_timeout  # None in builds without NCCL
    return (nccl if backend == "nccl" and nccl is not None else constants.default_pg_timeout).total_seconds()


def join_process_group(
    backend: str, rank: int, world_size: int, timeout_s: float | None, key: str = "run.dist_timeout_s"
) -> None:
    """``init_process_group`` from the environment (``env://``), waiting at most about ``timeout_s``
    (None: PyTorch's default) for the other ranks. ``ProcessGroupError`` names the rank, the address
    and ``key``, and tells a wait that ran out from a failure to open the address at all."""
    seconds = default_dist_timeout_s(backend) if timeout_s is None else timeout_s
    started = time.monotonic()
    try:
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=seconds))
    except dist.DistError as exc:
        waited = time.monotonic() - started
        address = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        torch_said = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if waited < 0.8 * seconds:  # not the timeout: the address is wrong or the port taken
            raise ProcessGroupError(
                f"rank {rank} of {world_size} could not open the process group at {address} after "
                f"{waited:.1f} s: {torch_said}. Check MASTER_ADDR and MASTER_PORT (is the port free on "
                "rank 0's host?)"
            ) from exc
        raise ProcessGroupError(
            f"rank {rank} of {world_size} waited {waited:.0f} s ({key}: {seconds:g}) for the process "
            f"group at {address} to form: another rank failed before joining (look at its log), was "
            "never started, or was given another MASTER_ADDR, MASTER_PORT or WORLD_SIZE; or MASTER_ADDR "
            "does not reach rank 0's host. torchrun stops the other ranks when one fails; other launchers "
            f"rely on this timeout. ({torch_said})"
        ) from exc


def setup_runtime(
    device: str = "auto",
    precision: str = "auto",
    prefix: str = "tokenizer",
    dist_timeout_s: float | None = None,
) -> Runtime:
    """Join the process group when the environment describes one and pick the device and autocast
    dtype; ``dist_timeout_s`` bounds the wait for the other ranks and every collective (None: PyTorch's
    default for the backend). Errors name ``run.<prefix>.device`` and ``<prefix>.precision``."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    # torchrun sets LOCAL_WORLD_SIZE; other launchers may not, and then every rank may share the node
    local_world_size = _env_int("LOCAL_WORLD_SIZE", world_size)
    key = f"run.{prefix}.device"
    resolved = resolve_device(device, local_rank, key=key, local_world_size=local_world_size)
    owns = False
    if world_size > 1 and not dist.is_initialized():
        if resolved.type == "cuda":
            torch.cuda.set_device(resolved)
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        join_process_group(backend, rank, world_size, dist_timeout_s)
        owns = True
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return Runtime(
        device=resolved,
        rank=rank,
        local_rank=local_rank,
        world_size=world_size,
        autocast_dtype=resolve_precision(precision, resolved, key=f"{prefix}.precision"),
        owns_process_group=owns,
    )


def shutdown_runtime(runtime: Runtime) -> None:
    """Leave the process group if ``setup_runtime`` created it."""
    if runtime.owns_process_group and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_object(value: Any, runtime: Runtime) -> Any:
    """Rank 0's ``value`` on every rank (a no-op in a single process)."""
    if not runtime.distributed:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def all_reduce_mean(values: Mapping[str, float], runtime: Runtime) -> dict[str, float]:
    """The mean over ranks of each scalar in ``values`` (same keys on every rank)."""
    if not runtime.distributed or not values:
        return dict(values)
    names = sorted(values)
    stacked = torch.tensor(
        [float(values[name]) for name in names], dtype=torch.float64, device=runtime.device
    )
    dist.all_reduce(stacked)
    stacked /= runtime.world_size
    return dict(zip(names, stacked.tolist(), strict=True))


def run_fingerprint(values: Mapping[str, Any], ignore: frozenset[str] | set[str] = frozenset()) -> str:
    """A short stable hash of the params that define what a run computes (``ignore`` left out).

    Checkpoints live in a directory named by it: the same params resume the same run, other params
    start their own, and neither can pick up the other's optimizer state by accident.
    """
    kept = {key: value for key, value in values.items() if key not in ignore}
    canonical = json.dumps(kept, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def code_digest() -> str:
    """A short hash of the source of the ``imtok`` package (the stages only call into it).

    Part of a training run's fingerprint: a run is its params, its data and the code that computes it.
    Without it a finished run's checkpoint (kept at its last step) would be "resumed" after a fix to the
    trainer, a loss or a quantizer, and the stage would export the old weights without training a step.
    With it, changed code trains anew in its own checkpoint directory and the old one stays untouched.
    Only regular ``.py`` files count (paths relative to the package, then contents), outside hidden
    files and directories, so caches, editor lock files and notebook checkpoints do not. Ranks that run
    different code get different fingerprints, which ``agreed_fingerprint`` refuses.
    """
    package = pathlib.Path(__file__).resolve().parent
    digest = hashlib.sha256()
    files = sorted(
        (
            path
            for path in package.rglob("*.py")
            if path.is_file()
            and not path.is_symlink()
            and not any(part.startswith(".") for part in path.relative_to(package).parts)
        ),
        key=lambda path: path.relative_to(package).as_posix(),
    )
    for path in files:
        content = path.read_bytes()
        digest.update(f"{path.relative_to(package).as_posix()}\0{len(content)}\0".encode())
        digest.update(content)
    return digest.hexdigest()[:12]


def disagreement(value: Any, runtime: Runtime) -> list[Any] | None:
    """Every rank's ``value`` (index = rank) when the ranks do not all hold an equal one, else None.

    All ranks must call it at the same point; each then gets the same answer, so all of them can
    raise the same error together instead of some waiting in a later collective.
    """
    if not runtime.distributed:
        return None
    gathered: list[Any] = [None] * runtime.world_size
    dist.all_gather_object(gathered, value)
    return gathered if any(other != gathered[0] for other in gathered) else None


def agreed_fingerprint(fingerprint: str, runtime: Runtime, key: str) -> str:
    """``fingerprint`` when every rank computed the same one; else every rank raises the same ValueError.

    Ranks that differ run different code (another checkout on some node) or read different params or
    data; training them together would average gradients of different models or objectives.
    """
    gathered = disagreement(fingerprint, runtime)
    if gathered is not None:
        listing = ", ".join(f"rank {rank}: {value}" for rank, value in enumerate(gathered))
        raise ValueError(
            f"{key}: the ranks computed different run fingerprints ({listing}); they run different code, "
            "params or data: start every rank from one checkout, params.yaml and data"
        )
    return fingerprint


def batches_from(loader: Any, start_step: int) -> Iterator[Any]:
    """Endless batches of ``loader`` (a ``ShardLoader``) as if ``start_step`` batches were already drawn.

    Epoch e uses ``loader.set_epoch(e)``. An epoch's length can differ from the next one's (under DDP
    each epoch deals the shards to the ranks anew, and shards of unequal counts give the largest rank a
    different number of batches), so resuming at step s walks the epochs, each at its own length, to the
    one that holds step s and skips the batches of it already drawn: a resumed run sees the very batches
    an uninterrupted run would.
    """
    if start_step < 0:
        raise ValueError(f"start_step must be non-negative, got {start_step}")
    epoch, skip = 0, start_step
    while True:
        loader.set_epoch(epoch)
        per_epoch = len(loader)
        if per_epoch == 0:
            raise ValueError(f"{loader.location}: the split yields no batches")
        if skip >= per_epoch:
            epoch, skip = epoch + 1, skip - per_epoch
            continue
        for index, batch in enumerate(loader):
            if index >= skip:
                yield batch
        epoch, skip = epoch + 1, 0


def duration(seconds: float) -> str:
    """``3h02m``, ``4m12s`` or ``9s``."""
    seconds = max(int(seconds), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


class Progress:
    """A training loop's progress on the main process: a tqdm bar when stderr is a terminal, else a
    log line at each ``report`` (step, the given values, throughput, ETA), so a run under ``dvc repro``
    with its output in a file shows where it is at every ``log_every``."""

    def __init__(self, total: int, initial: int, runtime: Runtime, description: str) -> None:
        from tqdm.auto import tqdm

        self.total, self.initial, self.description = total, initial, description
        self.main = runtime.is_main
        self.lines = self.main and not sys.stderr.isatty()
        self.started = time.perf_counter()
        self.bar = tqdm(
            total=total,
            initial=initial,
            desc=description,
            disable=not self.main or self.lines,
            dynamic_ncols=True,
        )

    def update(self, steps: int = 1) -> None:
        self.bar.update(steps)

    def report(self, done: int, rate: tuple[str, float], **values: str) -> None:
        """At a log step: ``rate`` is (unit, per second), e.g. ("images/s", 295.0); ``values`` are
        formatted numbers such as ``loss="0.0812"``."""
        if not self.main:
            return
        if not self.lines:
            self.bar.set_postfix(**values)
            return
        elapsed = time.perf_counter() - self.started
        remaining = elapsed / max(done - self.initial, 1) * (self.total - done)
        shown = ", ".join(f"{name} {value}" for name, value in values.items())
        logging.getLogger(f"imtok.{self.description}").info(
            "step %d/%d (%d%%), %s, %.0f %s, ETA %s",
            done,
            self.total,
            100 * done // max(self.total, 1),
            shown,
            rate[1],
            rate[0],
            duration(remaining),
        )

    def close(self) -> None:
        self.bar.close()
