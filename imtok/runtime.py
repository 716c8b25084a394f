"""Where and how a training stage runs: device, precision, DDP process group, resumable batch stream.

A stage calls ``setup_runtime`` once. Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) it
joins the process group (NCCL on CUDA, gloo on CPU) and each process takes the GPU of its local rank;
run plainly it is a single process. Only the main process (rank 0) writes files and talks to MLflow.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
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


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def resolve_device(device: str, local_rank: int = 0, key: str = "device") -> torch.device:
    """``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` (the local rank's GPU) or ``cuda:N``."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return torch.device("cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(
                f"{key}: {device!r} was asked for but CUDA is not available here; use auto or cpu"
            )
        return torch.device(device if ":" in device else f"cuda:{local_rank}")
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


def setup_runtime(device: str = "auto", precision: str = "auto", prefix: str = "tokenizer") -> Runtime:
    """Join the torchrun process group when there is one and pick the device and autocast dtype."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    resolved = resolve_device(device, local_rank, key=f"{prefix}.device")
    owns = False
    if world_size > 1 and not dist.is_initialized():
        if resolved.type == "cuda":
            torch.cuda.set_device(resolved)
        dist.init_process_group(backend="nccl" if resolved.type == "cuda" else "gloo")
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


def batches_from(loader: Any, start_step: int) -> Iterator[Any]:
    """Endless batches of ``loader`` (a ``ShardLoader``) as if ``start_step`` batches were already drawn.

    Epoch e uses ``loader.set_epoch(e)``; resuming at step s replays epoch s // len(loader) and skips its
    first s % len(loader) batches, so a resumed run sees the very batches an uninterrupted run would.
    """
    per_epoch = len(loader)
    if per_epoch == 0:
        raise ValueError(f"{loader.location}: the split yields no batches")
    epoch, skip = divmod(start_step, per_epoch)
    while True:
        loader.set_epoch(epoch)
        for index, batch in enumerate(loader):
            if index >= skip:
                yield batch
        epoch, skip = epoch + 1, 0


def progress_bar(total: int, initial: int, runtime: Runtime, description: str) -> Any:
    """A tqdm bar on the main process when stderr is a terminal; silent otherwise."""
    from tqdm.auto import tqdm

    enabled = runtime.is_main and sys.stderr.isatty()
    return tqdm(total=total, initial=initial, desc=description, disable=not enabled, dynamic_ncols=True)
