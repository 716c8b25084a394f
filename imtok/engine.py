"""The one training loop. A model plugs in as a ``Task``; the engine does the rest, the same for all.

The engine owns: seeding (the same initial weights on every rank, a stream of its own per rank after
that), AdamW with decay on weight matrices only and the warmup-cosine schedule, weight EMA, DDP
wrapping, checkpoints with exact resume (optimizer, schedule, EMA, RNG states and the task's own
state), the non-finite loss watch, the running metric window, throughput, and the log / validate /
checkpoint cadence. A task builds its model, computes a step's losses on the batch it draws for that
step, may take a second step of its own (a discriminator's) and evaluates a model.

One step: ``model.train()``; under autocast ``task.losses(step)``; backward, gradient clipping, the
watch, the optimizer and schedule steps, the EMA update; ``task.after_step(step, watch)``; the step's
metrics go into the window on the device. Nothing is read back to the host except at the cadence's
sync points (log lines, validation, checkpoints), where the watch is checked first, so no checkpoint
holds weights that a non-finite step updated.

Resume. The newest checkpoint that every rank agrees on is loaded with its RNG states; the task
replays its batch order from the resumed step (``Task.bind``), so a resumed single-process run
equals an uninterrupted one bit for bit. Under DDP the checkpoint holds rank 0's RNG state; other
ranks reseed from (seed, rank, step), so their random draws after a resume differ from an
uninterrupted run's. Validation runs in an isolated RNG scope on the main process only, so how
often it runs changes nothing in training.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from imtok.runtime import Progress, Runtime, all_reduce_mean
from imtok.training import (
    ModelEma,
    NonFiniteLossWatch,
    agreed_latest_checkpoint,
    checkpoint_path,
    clip_gradients,
    isolated_rng,
    load_checkpoint,
    make_scheduler,
    prune_checkpoints,
    save_checkpoint,
    sync_point,
)

log = logging.getLogger(__name__)

MetricsCallback = Callable[[Mapping[str, float], int], None]


class Schedule(Protocol):
    """What a task trains with, all of it in the run's fingerprint (``TokenizerParams``,
    ``PriorParams``, the classifier's ``imtok.trainers.classifier.ClassifierLoop``)."""

    seed: int
    lr: float
    betas: tuple[float, float]
    weight_decay: float
    warmup_steps: int
    total_steps: int
    min_lr_ratio: float
    ema_decay: float | None
    grad_clip: float | None
    batch_size: int


class Cadence(Protocol):
    """How often the loop logs, validates and checkpoints; none of it changes the weights
    (``imtok.params.TrainingRun``, ``ClassifierLoop``)."""

    val_batches: int
    log_every: int
    val_every: int
    checkpoint_every: int
    keep_checkpoints: int


class Task:
    """What a model brings to the engine: a subclass sets the four names and overrides ``build``,
    ``bind`` and ``losses``, and what else differs from the defaults here. ``name`` is the stage
    (progress, errors), ``prefix`` the params section (schedule and checkpoint errors), ``unit`` what a
    sample counts in throughput (``images``, ``tokens``), ``advice`` what to change when the loss is
    not finite; ``config`` (the model's) is stored in checkpoints and checked on resume."""

    name: str
    prefix: str
    unit: str = "images"
    advice: str
    config: Any

    def build(self, device: torch.device) -> nn.Module:
        """The model on ``device`` (and anything else with weights), right after the seed is set."""
        raise NotImplementedError

    def bind(self, train_model: nn.Module, runtime: Runtime, start: int) -> None:
        """Get ready to train from step ``start`` with ``train_model`` (the model, DDP-wrapped when
        distributed): wrap other modules, open the batch stream at that step."""
        raise NotImplementedError

    def losses(self, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss to minimise on step ``step``'s batch and the step's metrics (``loss`` among them)."""
        raise NotImplementedError

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW's parameter groups: decay on weight matrices only."""
        return adamw_param_groups(model, weight_decay)

    def units_per_sample(self) -> int:
        """``unit`` per training sample (1 image; a grid's tokens)."""
        return 1

    def after_step(self, step: int, watch: NonFiniteLossWatch) -> dict[str, Tensor]:
        """Anything after the optimizer step (a discriminator's step, metrics of the step's output)."""
        return {}

    def can_validate(self) -> bool:
        return False

    def validate(self, model: nn.Module, step: int) -> dict[str, float]:
        """Metrics of ``model`` (the EMA weights when EMA is on) on the validation data."""
        return {}

    def state(self) -> dict[str, Any]:
        """The task's own checkpoint state (a discriminator and its optimizer)."""
        return {}

    def load_state(self, extra: Mapping[str, Any], path: Path) -> None:
        """Restore ``state()`` from a checkpoint's extra values (``path``, for errors)."""

    def progress(self, means: Mapping[str, float]) -> dict[str, str]:
        """Fields of the progress line from the logged means."""
        return {"loss": f"{means['train/loss']:.4f}"}


@dataclass
class Run:
    """What a finished (or resumed-and-finished) run produced."""

    model: nn.Module  # unwrapped, on the training device, the EMA weights when EMA is on
    step: int
    start_step: int
    val: dict[str, float] = field(default_factory=dict)
    train: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    units_per_s: float = 0.0  # ``unit`` per second, all ranks together


class MetricWindow:
    """Running means of the step metrics between two log lines (kept on device to avoid syncs)."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.count = 0

    def add(self, values: Mapping[str, Tensor]) -> None:
        for name, value in values.items():
            value = value.detach().float()
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.count += 1

    def means(self) -> dict[str, float]:
        return {name: float(total) / max(self.count, 1) for name, total in self.sums.items()}


def reseed_rank(seed: int, rank: int, step: int) -> None:
    """Give ranks after the first a stream of their own from (seed, rank, step); rank 0 keeps its own."""
    if rank > 0:
        torch.manual_seed(int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0]))


def adamw_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on weight matrices and kernels only, not on biases, norms or 1-D parameters."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def wrap_ddp(module: nn.Module, runtime: Runtime) -> nn.Module:
    """``module`` in DistributedDataParallel when the runtime is distributed, else itself."""
    if not runtime.distributed:
        return module
    device = runtime.device
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def train(
    task: Task,
    p: Schedule,
    cadence: Cadence,
    *,
    checkpoint_dir: str | Path,
    runtime: Runtime,
    on_metrics: MetricsCallback | None = None,
    checkpoint_extra: Mapping[str, Any] | None = None,
) -> Run:
    """Train (or resume) ``task`` to ``p.total_steps``; see the module docstring.

    ``on_metrics(metrics, step)`` is called on the main process only. ``checkpoint_extra`` (plain
    values) is stored in every checkpoint beside the task's own state.
    """
    device = runtime.device
    torch.manual_seed(p.seed)  # the same initial weights on every rank
    model = task.build(device)
    optimizer = torch.optim.AdamW(task.param_groups(model, p.weight_decay), lr=p.lr, betas=p.betas)
    scheduler = make_scheduler(
        optimizer,
        warmup_steps=p.warmup_steps,
        total_steps=p.total_steps,
        min_ratio=p.min_lr_ratio,
        prefix=task.prefix,
    )
    ema = ModelEma(model, p.ema_decay) if p.ema_decay else None
    checkpoint_dir = Path(checkpoint_dir)
    start = 0
    latest = agreed_latest_checkpoint(checkpoint_dir, runtime)
    if latest is not None:
        state = load_checkpoint(
            latest,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            ema=ema,
            config=task.config,
            prefix=task.prefix,
        )
        start = int(state["step"])
        task.load_state(state["extra"], latest)
        if runtime.is_main:
            log.info("resuming from %s at step %d of %d", latest, start, p.total_steps)
    reseed_rank(p.seed, runtime.rank, start)
    task.bind(wrap_ddp(model, runtime), runtime, start)
    units_per_step = p.batch_size * task.units_per_sample() * runtime.world_size
    throughput = f"train/{task.unit}_per_s"
    c = cadence
    validating = runtime.is_main and c.val_batches > 0 and task.can_validate()
    window = MetricWindow()
    result = Run(model=model, step=start, start_step=start)
    watch = NonFiniteLossWatch(task.name, checkpoint_dir, task.advice)
    started = time.perf_counter()
    bar = Progress(p.total_steps, start, runtime, task.name)
    try:
        for step in range(start, p.total_steps):
            model.train()
            with runtime.autocast():
                loss, metrics = task.losses(step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = clip_gradients(model, p.grad_clip)
            watch.observe(step, loss=loss, grad_norm=grad_norm)
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update(model)
            metrics = metrics | task.after_step(step, watch) | {"grad_norm": grad_norm}
            window.add({f"train/{name}": value for name, value in metrics.items()})
            done = step + 1
            bar.update(1)
            last = done == p.total_steps
            if sync_point(done, p.total_steps, c.log_every, c.val_every, c.checkpoint_every):
                watch.check(runtime.distributed)  # before any metric is logged or checkpoint written
            if done % c.log_every == 0 or last:
                means = all_reduce_mean(window.means(), runtime)
                means["train/lr"] = scheduler.get_last_lr()[0]
                means[throughput] = (done - start) * units_per_step / (time.perf_counter() - started)
                result.train = means
                window = MetricWindow()
                if runtime.is_main:
                    bar.report(done, (f"{task.unit}/s", means[throughput]), **task.progress(means))
                    if on_metrics is not None:
                        on_metrics(means, done)
            if validating and (done % c.val_every == 0 or last):
                # Isolated: validation draws nothing that training then misses (val_every is not in
                # the run's fingerprint, so a run resumed with another value continues identically).
                with isolated_rng(device):
                    evaluated = model if ema is None else ema.averaged_copy(model)  # what is exported
                    metrics_val = task.validate(evaluated, done)
                result.val = {f"val/{name}": value for name, value in metrics_val.items()}
                if on_metrics is not None:
                    on_metrics(result.val, done)
            if done % c.checkpoint_every == 0 or last:
                if runtime.is_main:
                    save_checkpoint(
                        checkpoint_path(checkpoint_dir, done),
                        model=model,
                        optimizer=optimizer,
                        scheduler=scheduler,
                        step=done,
                        ema=ema,
                        extra=dict(checkpoint_extra or {}) | task.state(),
                        config=task.config,
                        prefix=task.prefix,
                    )
                    prune_checkpoints(checkpoint_dir, keep=c.keep_checkpoints)
                runtime.barrier()
            result.step = done
    finally:
        bar.close()
    result.seconds = time.perf_counter() - started
    result.units_per_s = (result.step - start) * units_per_step / max(result.seconds, 1e-9)
    if ema is not None:
        ema.copy_to(model)
    return result
