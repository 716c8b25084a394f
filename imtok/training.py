"""Training-loop pieces shared by the stages: LR schedule, weight EMA, gradient clipping, loss watch,
checkpoints.

A checkpoint is one file ``step-%08d.pt`` holding the model, optimizer, scheduler and EMA states, the
step, the RNG states of python, numpy, torch and CUDA, and an architecture fingerprint (the shape of
every state-dict entry plus the caller's config), so that resuming continues the exact same run and a
checkpoint written under other params is refused with a message naming the differing key.
"""

import contextlib
import copy
import hashlib
import math
import os
import random
import re
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from imtok.atomic import fsync_directory, match_mode
from imtok.runtime import Runtime

CHECKPOINT_FORMAT = 1
CHECKPOINT_PATTERN = re.compile(r"^step-(\d+)\.pt$")
TEMP_SUFFIX = ".tmp"
# How much of a checkpoint's end ranks hash to agree they resume from the same file.
IDENTITY_TAIL_BYTES = 1 << 20
# Appended to every mismatch message: the fix is either a fresh run or the params of the old one.
MISMATCH_ADVICE = "delete the checkpoint directory or restore the params"


# ---------------------------------------------------------------------------------------------------
# Learning-rate schedule


def check_schedule(warmup_steps: int, total_steps: int, min_ratio: float, prefix: str = "tokenizer") -> None:
    """Raise ValueError naming the params key of the first invalid schedule setting."""
    if warmup_steps < 0:
        raise ValueError(f"{prefix}.warmup_steps: expected an integer >= 0, got {warmup_steps}")
    if total_steps < 1:
        raise ValueError(f"{prefix}.total_steps: expected an integer >= 1, got {total_steps}")
    if warmup_steps > total_steps:
        raise ValueError(f"{prefix}.warmup_steps: {warmup_steps} exceeds {prefix}.total_steps={total_steps}")
    if not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"{prefix}.min_lr_ratio: expected a number in [0, 1], got {min_ratio}")


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """LR multiplier: linear warmup to 1 over ``warmup_steps``, cosine to ``min_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        # (step + 1) rather than step so the first update is not wasted at LR 0.
        return (step + 1) / warmup_steps
    if step >= total_steps:
        return min_ratio
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(
    optimizer: Optimizer,
    *,
    warmup_steps: int,
    total_steps: int,
    min_ratio: float = 0.0,
    prefix: str = "tokenizer",
) -> LambdaLR:
    """A LambdaLR following ``warmup_cosine``; call ``scheduler.step()`` once per optimizer step."""
    check_schedule(warmup_steps, total_steps, min_ratio, prefix)

    # A closure (not a callable object) so the scheduler state stores no schedule settings and a
    # resumed run follows the settings of its current params.
    def multiplier(step: int) -> float:
        return warmup_cosine(step, warmup_steps=warmup_steps, total_steps=total_steps, min_ratio=min_ratio)

    return LambdaLR(optimizer, multiplier)


# ---------------------------------------------------------------------------------------------------
# Model helpers


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel/DataParallel and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def clip_gradients(model: nn.Module, max_norm: float | None) -> Tensor:
    """Clip gradients to total L2 norm ``max_norm`` (0 or None: no clipping); return the norm before it.

    The norm is a 0-dim tensor on the gradients' device: reading it is a host sync, left to the caller
    (the trainers average it on the device and read it once per log line).
    """
    if max_norm is not None and max_norm < 0:
        raise ValueError(f"gradient clipping max_norm: expected a number >= 0 or null, got {max_norm}")
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros((), device=next(model.parameters(), torch.zeros(())).device)
    if not max_norm:
        return torch.nn.utils.get_total_norm(grads)
    return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)


def sync_point(done: int, total_steps: int, *every: int) -> bool:
    """Whether the loop reads the device back after ``done`` steps: the last step, or a multiple of
    any of the intervals (log, validation, checkpoint). ``NonFiniteLossWatch.check`` runs exactly there."""
    return done == total_steps or any(done % interval == 0 for interval in every)


class NonFiniteLossWatch:
    """The first training step with a non-finite loss or gradient norm, noted without waiting for it.

    Testing each step's values on the host would stall the device every step. ``observe`` keeps, for
    each named value (``loss``, ``grad_norm``, a discriminator's loss), the first bad step on the
    device; ``check`` reads them back where the loop reads the device anyway (log lines, validation,
    checkpoints) and must run before every checkpoint is written, so no checkpoint holds weights that
    a non-finite step updated. A few steps may run on a broken model before ``check`` stops the run;
    they change nothing that is kept.
    """

    NONE = 2**62  # "no bad step yet": larger than any step, so the earliest rank wins a MIN all-reduce

    def __init__(self, stage: str, checkpoint_dir: str | os.PathLike[str], advice: str) -> None:
        self.stage = stage
        self.checkpoint_dir = checkpoint_dir
        self.advice = advice
        self.first_step: dict[str, Tensor] = {}
        self.first_value: dict[str, Tensor] = {}

    def observe(self, step: int, **values: Tensor) -> None:
        for name, value in values.items():
            value = value.detach().float().reshape(())
            if name not in self.first_step:
                self.first_step[name] = torch.full((), self.NONE, dtype=torch.int64, device=value.device)
                self.first_value[name] = torch.zeros((), device=value.device)
            first = ~torch.isfinite(value) & (self.first_step[name] == self.NONE)
            self.first_step[name] = torch.where(first, step, self.first_step[name])
            self.first_value[name] = torch.where(first, value, self.first_value[name])

    def check(self, distributed: bool = False) -> None:
        """Raise ``FloatingPointError`` if a value so far was not finite (on any rank, when distributed).

        Distributed, every rank must call it at the same steps having observed the same names.
        """
        if not self.first_step:
            return
        names = sorted(self.first_step)
        local = torch.stack([self.first_step[name] for name in names])  # (V,)
        steps = local.clone()
        if distributed:
            torch.distributed.all_reduce(steps, op=torch.distributed.ReduceOp.MIN)
        bad_step = int(steps.min())
        if bad_step == self.NONE:
            return
        found = []
        for name, mine, everyone in zip(names, local.tolist(), steps.tolist(), strict=True):
            if everyone == bad_step:
                value = float(self.first_value[name]) if mine == bad_step else "not finite on another rank"
                found.append(f"{name} is {value}")
        raise FloatingPointError(
            f"{self.stage}: {', '.join(found)} at step {bad_step}; the last checkpoint in "
            f"{self.checkpoint_dir} is intact ({self.advice})"
        )


def ema_decay_at(decay: float, updates: int) -> float:
    """The decay of update number ``updates`` (0 for the first): ``min(decay, (1 + n) / (10 + n))``.

    The warm-up keeps the weights a run starts from out of the average: with a fixed 0.999 they would
    still weigh 0.999^400 = 0.67 after 400 steps, and for a quantizer whose codebook is set from the
    first batch (k-means, data init) the averaged codebook would sit between the random start and the
    trained codes. With the warm-up the start weighs under 1 % after a few dozen updates.
    """
    return min(decay, (1.0 + updates) / (10.0 + updates))


class ModelEma:
    """Exponential moving average of a module's parameters (pass the unwrapped module); buffers are
    copied, not averaged.

    Buffers hold state the module keeps itself: an EMA codebook and its cluster statistics (already
    moving averages, whose restarted dead codes must not be blended with the rows they replaced),
    normalisation statistics, step counters and flags. Parameters use ``ema_decay_at``'s warm-up; a
    codebook that is a parameter (VQ without EMA, RegVQ) is averaged like any other weight.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"ema decay: expected a number in [0, 1], got {decay}")
        self.decay = decay
        self.num_updates = 0
        module = unwrap_model(model)
        self.parameter_names = frozenset(name for name, _ in module.named_parameters(remove_duplicate=False))
        self.shadow: dict[str, Tensor] = {
            name: value.detach().clone() for name, value in module.state_dict().items()
        }

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """shadow <- d * shadow + (1 - d) * current for parameters (d = ``ema_decay_at``); buffers copied."""
        averaged: tuple[list[Tensor], list[Tensor]] = ([], [])
        for name, value in unwrap_model(model).state_dict().items():
            shadow = self.shadow[name]
            if name in self.parameter_names and (shadow.is_floating_point() or shadow.is_complex()):
                averaged[0].append(shadow)
                averaged[1].append(value.detach())
            else:
                shadow.copy_(value)
        if averaged[0]:
            # one multi-tensor kernel per dtype and device instead of a launch per tensor
            torch._foreach_lerp_(averaged[0], averaged[1], 1.0 - ema_decay_at(self.decay, self.num_updates))
        self.num_updates += 1

    @torch.no_grad()
    def averaged_copy(self, model: nn.Module) -> nn.Module:
        """A copy of ``model`` (unwrapped) holding the averaged weights, for evaluation: the model is
        untouched, its gradients are not copied, and no random numbers are drawn (building a new
        model would draw its initial weights from the training run's generator)."""
        module = unwrap_model(model)
        memo: dict[int, Any] = {id(p.grad): None for p in module.parameters() if p.grad is not None}
        averaged = copy.deepcopy(module, memo)
        self.copy_to(averaged)
        return averaged

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into ``model`` (e.g. an evaluation copy)."""
        unwrap_model(model).load_state_dict(self.shadow)

    def state_dict(self) -> dict[str, Any]:
        """Decay, update count and averaged tensors."""
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": dict(self.shadow)}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a ``state_dict``; the tensor names must match this EMA's model."""
        stored = state["shadow"]
        if set(stored) != set(self.shadow):
            difference = sorted(set(stored) ^ set(self.shadow))
            raise ValueError(f"ema state does not match the model: differing entries {difference[:5]}")
        for name, value in stored.items():
            self.shadow[name].copy_(value)
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])


# ---------------------------------------------------------------------------------------------------
# RNG states


@contextlib.contextmanager
def isolated_rng(device: torch.device) -> Iterator[None]:
    """Run the block with torch's generators (CPU, and ``device``'s when it is a GPU) put back after it.

    For what a run does beside training, such as validation: building an evaluation copy of a model
    draws its initial weights, and a resumed run must draw what an unbroken one draws whatever
    ``val_every`` is (it is not part of the run's fingerprint).
    """
    gpus = (
        [device.index if device.index is not None else torch.cuda.current_device()]
        if device.type == "cuda"
        else []
    )
    with torch.random.fork_rng(devices=gpus):
        yield


def rng_states() -> dict[str, Any]:
    """The states of python ``random``, numpy's global RNG, torch CPU and (if present) CUDA."""
    numpy_state = np.random.get_state(legacy=False)
    states: dict[str, Any] = {
        "python": random.getstate(),
        # Plain ints and lists only, so the file loads with ``weights_only=True``.
        "numpy": {
            **numpy_state,
            "state": {**numpy_state["state"], "key": numpy_state["state"]["key"].tolist()},
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: Mapping[str, Any]) -> None:
    """Restore ``rng_states()``; CUDA states are skipped when the device count differs."""
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = dict(states["numpy"])
    numpy_state["state"] = {
        **numpy_state["state"],
        "key": np.asarray(numpy_state["state"]["key"], dtype=np.uint32),
    }
    np.random.set_state(numpy_state)
    torch.set_rng_state(states["torch"])
    cuda = states.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# ---------------------------------------------------------------------------------------------------
# Architecture fingerprint


def _plain(value: Any) -> Any:
    """Tuples to lists and dataclasses to dicts, recursively, so stored and current values compare equal."""
    if is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


def flatten_config(config: Any, prefix: str = "tokenizer") -> dict[str, Any]:
    """A (nested) config mapping or dataclass as ``{"prefix.key.subkey": value}``."""
    flat: dict[str, Any] = {}
    for key, value in _plain(config).items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and value:
            flat.update(flatten_config(value, name))
        else:
            flat[name] = value
    return flat


def architecture(model: nn.Module, config: Any = None, prefix: str = "tokenizer") -> dict[str, Any]:
    """The shape of every state-dict entry and the flattened config: what a checkpoint must match."""
    shapes = {name: list(value.shape) for name, value in unwrap_model(model).state_dict().items()}
    return {"shapes": shapes, "config": None if config is None else flatten_config(config, prefix)}


def _first_difference(stored: Mapping[str, Any], current: Mapping[str, Any]) -> tuple[str, Any, Any] | None:
    """The first key (stored order, then new keys) whose values differ, with both values."""
    missing = object()
    for key in [*stored, *(key for key in current if key not in stored)]:
        old, new = stored.get(key, missing), current.get(key, missing)
        if old != new:
            return key, (None if old is missing else old), (None if new is missing else new)
    return None


def architecture_mismatch(stored: Mapping[str, Any], current: Mapping[str, Any]) -> str | None:
    """Why a checkpoint's architecture differs from the current one, or None when it matches."""
    if stored.get("config") is not None and current.get("config") is not None:
        difference = _first_difference(stored["config"], current["config"])
        if difference is not None:
            key, old, new = difference
            return f"checkpoint was trained with {key}={old!r} but the config asks for {new!r}"
    difference = _first_difference(stored["shapes"], current["shapes"])
    if difference is not None:
        name, old, new = difference
        if old is None:
            return f"the model has tensor {name} (shape {new}) which the checkpoint lacks"
        if new is None:
            return f"checkpoint has tensor {name} (shape {old}) which the model lacks"
        return f"checkpoint has tensor {name} of shape {old} but the model's is {new}"
    return None


# ---------------------------------------------------------------------------------------------------
# Checkpoint files


def checkpoint_path(directory: str | os.PathLike[str], step: int) -> Path:
    """``directory/step-%08d.pt``."""
    return Path(directory) / f"step-{step:08d}.pt"


def list_checkpoints(directory: str | os.PathLike[str]) -> list[Path]:
    """Finished checkpoints in ``directory``, oldest step first (temp files are ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [
        (int(match[1]), path)
        for path in directory.iterdir()
        if (match := CHECKPOINT_PATTERN.match(path.name))
    ]
    return [path for _, path in sorted(found)]


def latest_checkpoint(directory: str | os.PathLike[str]) -> Path | None:
    """The checkpoint with the highest step in ``directory``, or None."""
    checkpoints = list_checkpoints(directory)
    return checkpoints[-1] if checkpoints else None


def _rank_ranges(ranks: list[int]) -> str:
    """``[0, 1, 2, 5]`` as ``0-2, 5``."""
    spans: list[list[int]] = []
    for rank in ranks:
        if spans and rank == spans[-1][1] + 1:
            spans[-1][1] = rank
        else:
            spans.append([rank, rank])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def checkpoint_identity(path: str | os.PathLike[str]) -> tuple[str, int, str]:
    """``(name, size, digest)`` of a checkpoint: what ranks compare to know they hold the same file.

    ``digest`` is the SHA-256 of the file's last ``IDENTITY_TAIL_BYTES`` (the whole file if smaller).
    ``torch.save`` writes a zip archive whose central directory, at the end, lists a CRC-32 of every
    record, so the tail tells apart two checkpoints of one name and size with different tensors (the
    same step of two runs of one config) without reading gigabytes on every rank. (Where CRCs are
    switched off, ``torch.serialization.set_crc32_options(False)``, only the last MiB is compared.)
    """
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as handle:
        handle.seek(max(0, size - IDENTITY_TAIL_BYTES))
        digest = hashlib.sha256(handle.read()).hexdigest()
    return path.name, size, digest


def checkpoint_disagreement(
    directory: str | os.PathLike[str], found: list[tuple[str, int, str] | str | None]
) -> str | None:
    """``None`` when every rank found the same checkpoint identity (or none); else the error to raise.

    ``found[r]`` is ``checkpoint_identity`` of what rank ``r`` found, ``None`` for no checkpoint, or a
    string saying why its newest checkpoint could not be read. The message lists each group of ranks
    with what it found; a digest is shown only where the name and size alone do not tell groups apart.
    """
    unreadable = [seen for seen in found if isinstance(seen, str)]
    if len(set(found)) <= 1 and not unreadable:
        return None
    groups: dict[tuple[str, int, str] | str | None, list[int]] = {}
    for rank, seen in enumerate(found):
        groups.setdefault(seen, []).append(rank)
    name_sizes = [seen[:2] for seen in groups if isinstance(seen, tuple)]

    def describe(seen: tuple[str, int, str] | str | None) -> str:
        if seen is None:
            return "no checkpoint"
        if isinstance(seen, str):
            return seen
        if name_sizes.count(seen[:2]) > 1:
            return f"{seen[0]} ({seen[1]} bytes, contents {seen[2][:12]})"
        return f"{seen[0]} ({seen[1]} bytes)"

    listing = "; ".join(
        f"{'rank' if len(ranks) == 1 else 'ranks'} {_rank_ranges(ranks)}: {describe(seen)}"
        for seen, ranks in groups.items()
    )
    if unreadable:
        return (
            f"{directory}: not every rank could read its newest checkpoint ({listing}). Make the file "
            "readable on every node (permissions, a stale mount) and start the job again"
        )
    return (
        f"{directory}: the ranks found different newest checkpoints ({listing}). Every rank must see the "
        "same checkpoint directory: put it on one mount that all nodes share (or copy the newest "
        "checkpoint to every node's directory) and start the job again"
    )


def agreed_latest_checkpoint(directory: str | os.PathLike[str], runtime: Runtime) -> Path | None:
    """``latest_checkpoint(directory)``, once every rank of the job found the same file there.

    Each rank lists the checkpoint directory itself. If the ranks of a job see different directories
    (a node-local disk instead of one shared mount), some would resume while others start from step
    0, run a different number of steps and hang in a collective; and ranks that resume from different
    files of one name (copies from two runs) would train on with different optimizer states; a rank that
    cannot read its file would leave the others waiting in the gather. Instead every rank raises the
    same ValueError, listing what each group of ranks found.
    """
    latest = latest_checkpoint(directory)
    if not runtime.distributed:
        return latest
    mine: tuple[str, int, str] | str | None = None
    if latest is not None:
        try:
            mine = checkpoint_identity(latest)
        except OSError as error:  # said in the gathered message, so no rank is left waiting for it
            mine = f"{latest.name} unreadable ({error.strerror or error})"
    found: list[Any] = [None] * runtime.world_size
    dist.all_gather_object(found, mine)
    problem = checkpoint_disagreement(directory, found)
    if problem is not None:
        raise ValueError(problem)
    return latest


LOCK_NAME = ".holder.lock"


@contextlib.contextmanager
def holding_checkpoints(directory: str | os.PathLike[str]) -> Iterator[None]:
    """Hold ``directory`` for this process while the block runs: a second run that would train into
    the same checkpoints (the same stage and fingerprint) stops at once, naming the holder's PID.

    Two runs sharing a directory used to interleave their checkpoints, and one's pruning deleted the
    other's temp file mid-write. The lock is an ``flock`` on ``directory/.holder.lock``: the kernel
    drops it when the holder ends in any way (``kill -9`` included), so a dead run never blocks the next.
    """
    import fcntl

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    handle = open(directory / LOCK_NAME, "a+")  # noqa: SIM115 -- held open for the whole block
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise ValueError(
                f"{directory}: another run (PID {holder}) is training into these checkpoints; wait for "
                f"it to finish or stop it (kill {holder}), then run the stage again"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
    finally:
        handle.close()  # releases the lock


def prune_checkpoints(directory: str | os.PathLike[str], keep: int = 2) -> list[Path]:
    """Delete all but the ``keep`` newest checkpoints, and the temp files of saves that never finished
    (a run killed inside ``torch.save`` leaves one the size of a checkpoint); return the deleted paths.

    Called by the one process that saves, right after a save returned, so no save is in flight.
    """
    if keep < 1:
        raise ValueError(f"prune_checkpoints keep: expected an integer >= 1, got {keep}")
    doomed = list_checkpoints(directory)[:-keep]
    doomed += sorted(Path(directory).glob(f".step-*.pt.*{TEMP_SUFFIX}"))
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed


def atomic_save(payload: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` to a temp file beside ``path``, fsync it, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX, delete=False
    ) as handle:
        temp = Path(handle.name)
        try:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        except BaseException:
            handle.close()
            temp.unlink(missing_ok=True)
            raise
    match_mode(temp, path)
    os.replace(temp, path)
    fsync_directory(path.parent)


def save_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: nn.Module,
    optimizer: Optimizer,
    scheduler: LRScheduler | None,
    step: int,
    ema: ModelEma | None = None,
    extra: Mapping[str, Any] | None = None,
    config: Any = None,
    prefix: str = "tokenizer",
) -> Path:
    """Write a resumable checkpoint atomically; ``extra`` must hold plain python/tensor values."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "step": int(step),
        "model": unwrap_model(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "ema": None if ema is None else ema.state_dict(),
        "rng": rng_states(),
        "architecture": architecture(model, config, prefix),
        "extra": dict(extra or {}),
    }
    atomic_save(payload, path)
    return Path(path)


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a checkpoint's payload on the CPU; ValueError naming the file when it is unreadable."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        # torch raises RuntimeError, EOFError, UnpicklingError, ... depending on where the file ends.
        raise ValueError(f"{path}: cannot read checkpoint (truncated or corrupt file?): {error}") from error
    required = ("format", "step", "model", "architecture")
    if not isinstance(payload, dict) or any(key not in payload for key in required):
        raise ValueError(f"{path}: not an imtok checkpoint (expected the keys {', '.join(required)})")
    if payload["format"] != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{path}: checkpoint format {payload['format']} but this code reads {CHECKPOINT_FORMAT}"
        )
    return payload


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: nn.Module,
    optimizer: Optimizer | None = None,
    scheduler: LRScheduler | None = None,
    ema: ModelEma | None = None,
    config: Any = None,
    prefix: str = "tokenizer",
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Restore the given states (and the RNGs) from ``path``; return ``{"step": ..., "extra": ...}``."""
    path = Path(path)
    payload = read_checkpoint(path)
    mismatch = architecture_mismatch(payload["architecture"], architecture(model, config, prefix))
    if mismatch is not None:
        raise ValueError(f"{path}: {mismatch}; {MISMATCH_ADVICE}")
    unwrap_model(model).load_state_dict(payload["model"])
    for name, target in (("optimizer", optimizer), ("scheduler", scheduler), ("ema", ema)):
        if target is None:
            continue
        if payload.get(name) is None:
            raise ValueError(f"{path}: checkpoint holds no {name} state")
        target.load_state_dict(payload[name])
    if restore_rng:
        set_rng_states(payload["rng"])
    return {"step": payload["step"], "extra": payload.get("extra", {})}
