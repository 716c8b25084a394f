"""Training a token prior (MaskGIT or GPT) on cached token splits, single process or DDP.

Token splits are small, so they live in memory as one (N, h, w) tensor, and for training on the
device itself (int32: 1 KiB a 16 x 16 grid), with each epoch's order moved there once: a step
gathers its batch on the device instead of copying it from host memory, which waits for the device.
Each epoch draws a permutation from (seed, epoch), every rank takes its ``rank::world_size`` share
and the last partial batch is dropped, so all ranks run the same number of steps. Resuming at step s
replays the same permutations and skips the batches already drawn; with the RNG states restored from
the checkpoint a resumed single-process run equals an uninterrupted one.

Validation uses a fixed generator for the masks (MaskGIT) so that every evaluation sees the same
masking, and reports cross-entropy without label smoothing, its exponent (perplexity over the
predicted tokens) and the accuracy of the argmax prediction.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from imtok.data.tokens import TokenSplit
from imtok.models.gpt import GPTConfig, gpt_loss
from imtok.models.maskgit import (
    MaskGITConfig,
    check_labels,
    masked_token_loss,
    maskgit_loss,
    random_token_mask,
)
from imtok.models.priors import build_prior
from imtok.params import PriorParams
from imtok.quantizers.common import check_indices
from imtok.runtime import Progress, Runtime, all_reduce_mean
from imtok.trainers.tokenizer import MetricWindow, adamw_param_groups, reseed_rank
from imtok.training import (
    ModelEma,
    NonFiniteLossWatch,
    agreed_latest_checkpoint,
    clip_gradients,
    isolated_rng,
    load_checkpoint,
    make_scheduler,
    prune_checkpoints,
    save_checkpoint,
    sync_point,
    unwrap_model,
)

log = logging.getLogger(__name__)

MetricsCallback = Callable[[Mapping[str, float], int], None]
VALIDATION_SEED = 1234  # masks of the validation loss: the same at every evaluation


def prior_config(params: PriorParams, codebook_size: int, grid: tuple[int, int], num_classes: int) -> Any:
    """The MaskGIT or GPT config for token grids ``grid`` over ``codebook_size`` codes."""
    config_class = MaskGITConfig if params.kind == "maskgit" else GPTConfig
    return config_class(
        codebook_size=codebook_size,
        grid=grid,
        num_classes=num_classes if params.conditional else 0,
        hidden_dim=params.hidden_dim,
        depth=params.depth,
        heads=params.heads,
        mlp_ratio=params.mlp_ratio,
        dropout=params.dropout,
        label_dropout=params.label_dropout if params.conditional else 0.0,
        label_smoothing=params.label_smoothing,
    )


def prior_loss(
    kind: str, model: nn.Module, tokens: Tensor, labels: Tensor | None
) -> tuple[Tensor, dict[str, Tensor]]:
    """The training loss of a batch drawn from a split that ``check_split`` has passed."""
    return (maskgit_loss if kind == "maskgit" else gpt_loss)(model, tokens, labels, validated=True)


def check_split(split: TokenSplit, codebook_size: int, num_classes: int, conditional: bool) -> None:
    """Range-check a whole token split once, on the host, so no training step has to."""
    check_indices(split.tokens, codebook_size)
    if conditional:
        check_labels(split.labels, num_classes)


@torch.no_grad()
def validation_metrics(
    kind: str, model: nn.Module, tokens: Tensor, labels: Tensor | None, generator: torch.Generator
) -> tuple[Tensor, Tensor, int]:
    """Summed cross-entropy (no smoothing), correct predictions and predicted tokens of one batch."""
    batch, h, w = tokens.shape
    if kind == "maskgit":
        mask = random_token_mask(batch, h * w, tokens.device, generator).view(batch, h, w)
        inputs = tokens.masked_fill(mask, unwrap_model(model).config.mask_id)
        logits = model(inputs, labels, positions=mask).float()
        loss, stats = masked_token_loss(logits, tokens, mask, 0.0)
        predicted = int(mask.sum())
        return loss * predicted, stats["accuracy"] * predicted, predicted
    targets = tokens.flatten(1)
    logits = model(targets[:, :-1], labels).float()
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
    correct = (logits.argmax(dim=-1) == targets).sum().float()
    return loss, correct, targets.numel()


@torch.no_grad()
def evaluate_prior(
    kind: str,
    model: nn.Module,
    split: TokenSplit,
    device: torch.device,
    *,
    batch_size: int,
    max_batches: int | None = None,
    conditional: bool = True,
) -> dict[str, float]:
    """Cross-entropy, perplexity and accuracy over (up to ``max_batches`` batches of) ``split``."""
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=device).manual_seed(VALIDATION_SEED)
    total_loss, total_correct, total_tokens = 0.0, 0.0, 0
    try:
        for index, start in enumerate(range(0, len(split.tokens), batch_size)):
            if max_batches is not None and index >= max_batches:
                break
            tokens = split.tokens[start : start + batch_size].to(device=device, dtype=torch.int64)
            labels = split.labels[start : start + batch_size].to(device) if conditional else None
            loss, correct, count = validation_metrics(kind, model, tokens, labels, generator)
            total_loss += float(loss)
            total_correct += float(correct)
            total_tokens += count
    finally:
        model.train(was_training)
    if total_tokens == 0:
        raise ValueError("validation split holds no tokens")
    mean = total_loss / total_tokens
    return {
        "loss": mean,
        "perplexity": float(torch.tensor(mean).exp()),
        "accuracy": total_correct / total_tokens,
    }


def index_batches(
    num_samples: int,
    batch_size: int,
    *,
    seed: int,
    rank: int,
    world_size: int,
    start_step: int,
    device: torch.device | None = None,
) -> Iterator[Tensor]:
    """Endless index batches for ``rank`` (on ``device``, moved once an epoch); see the module docstring
    for order and resumption."""
    per_rank = num_samples // world_size
    per_epoch = per_rank // batch_size
    if per_epoch == 0:
        raise ValueError(
            f"prior.batch_size: {batch_size} x {world_size} process(es) exceeds the {num_samples} token "
            "grids of the train split; lower prior.batch_size"
        )
    epoch, skip = divmod(start_step, per_epoch)
    while True:
        order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        mine = order[rank::world_size][: per_epoch * batch_size].to(device)
        for batch in range(skip, per_epoch):
            yield mine[batch * batch_size : (batch + 1) * batch_size]
        epoch, skip = epoch + 1, 0


@dataclass
class PriorResult:
    model: nn.Module  # unwrapped, EMA weights when EMA is on
    step: int
    start_step: int
    val: dict[str, float] = field(default_factory=dict)
    train: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    tokens_per_s: float = 0.0


def train_prior(
    params: PriorParams,
    config: Any,
    *,
    train: TokenSplit,
    val: TokenSplit | None,
    checkpoint_dir: str | Path,
    runtime: Runtime,
    on_metrics: MetricsCallback | None = None,
    checkpoint_extra: Mapping[str, Any] | None = None,
) -> PriorResult:
    """Train (or resume) a prior to ``params.total_steps``; callbacks run on the main process only."""
    p = params
    device = runtime.device
    torch.manual_seed(p.seed)
    model = build_prior(p.kind, config).to(device)
    for split in (train, val) if val is not None else (train,):
        check_split(split, model.config.codebook_size, model.config.num_classes, p.conditional)
    optimizer = torch.optim.AdamW(adamw_param_groups(model, p.weight_decay), lr=p.lr, betas=p.betas)
    scheduler = make_scheduler(
        optimizer,
        warmup_steps=p.warmup_steps,
        total_steps=p.total_steps,
        min_ratio=p.min_lr_ratio,
        prefix="prior",
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
            config=config,
            prefix="prior",
        )
        start = int(state["step"])
        if runtime.is_main:
            log.info("resuming from %s at step %d of %d", latest, start, p.total_steps)
    reseed_rank(p.seed, runtime.rank, start)
    train_model: nn.Module = model
    if runtime.distributed:
        train_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    batches = index_batches(
        len(train.tokens),
        p.batch_size,
        seed=p.seed,
        rank=runtime.rank,
        world_size=runtime.world_size,
        start_step=start,
        device=device,
    )
    tokens_on_device = train.tokens.to(device=device, dtype=torch.int32)  # ids < 2^31; half of int64
    labels_on_device = train.labels.to(device) if p.conditional else None
    tokens_per_image = train.tokens[0].numel()
    window = MetricWindow()
    result = PriorResult(model=model, step=start, start_step=start)
    watch = NonFiniteLossWatch("train_prior", checkpoint_dir, "lower prior.lr or set prior.grad_clip")
    started = time.perf_counter()
    bar = Progress(p.total_steps, start, runtime, "train_prior")
    try:
        for step in range(start, p.total_steps):
            index = next(batches)
            tokens = tokens_on_device[index].long()
            labels = labels_on_device[index] if labels_on_device is not None else None
            model.train()
            with runtime.autocast():
                loss, stats = prior_loss(p.kind, train_model, tokens, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = clip_gradients(model, p.grad_clip)
            watch.observe(step, loss=loss, grad_norm=grad_norm)
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update(model)
            window.add(
                {f"train/{name}": value for name, value in stats.items()} | {"train/grad_norm": grad_norm}
            )
            done = step + 1
            bar.update(1)
            last = done == p.total_steps
            if sync_point(done, p.total_steps, p.log_every, p.val_every, p.checkpoint_every):
                watch.check(runtime.distributed)  # before any metric is logged or checkpoint written
            if done % p.log_every == 0 or last:
                means = all_reduce_mean(window.means(), runtime)
                means["train/lr"] = scheduler.get_last_lr()[0]
                elapsed = time.perf_counter() - started
                means["train/tokens_per_s"] = (
                    (done - start) * p.batch_size * tokens_per_image * runtime.world_size / elapsed
                )
                result.train = means
                window = MetricWindow()
                if runtime.is_main:
                    bar.report(
                        done, ("tokens/s", means["train/tokens_per_s"]), loss=f"{means['train/loss']:.4f}"
                    )
                    if on_metrics is not None:
                        on_metrics(means, done)
            if runtime.is_main and val is not None and p.val_batches and (done % p.val_every == 0 or last):
                with isolated_rng(device):  # validation draws nothing that training then misses
                    evaluated = model if ema is None else ema.averaged_copy(model)
                    metrics = evaluate_prior(
                        p.kind,
                        evaluated,
                        val,
                        device,
                        batch_size=p.batch_size,
                        max_batches=p.val_batches,
                        conditional=p.conditional,
                    )
                result.val = {f"val/{name}": value for name, value in metrics.items()}
                if on_metrics is not None:
                    on_metrics(result.val, done)
            if done % p.checkpoint_every == 0 or last:
                if runtime.is_main:
                    save_checkpoint(
                        checkpoint_dir / f"step-{done:08d}.pt",
                        model=model,
                        optimizer=optimizer,
                        scheduler=scheduler,
                        step=done,
                        ema=ema,
                        extra=dict(checkpoint_extra or {}),
                        config=config,
                        prefix="prior",
                    )
                    prune_checkpoints(checkpoint_dir, keep=p.keep_checkpoints)
                runtime.barrier()
            result.step = done
    finally:
        bar.close()
    result.seconds = time.perf_counter() - started
    trained = result.step - start
    result.tokens_per_s = (
        trained * p.batch_size * tokens_per_image * runtime.world_size / max(result.seconds, 1e-9)
    )
    if ema is not None:
        ema.copy_to(model)
    return result
