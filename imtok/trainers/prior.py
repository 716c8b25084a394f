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

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from imtok import engine
from imtok.data.tokens import TokenSplit
from imtok.engine import MetricsCallback
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
from imtok.runtime import Runtime
from imtok.training import unwrap_model

VALIDATION_SEED = 1234  # masks of the validation loss: the same at every evaluation


def prior_config(params: PriorParams, codebook_size: int, grid: tuple[int, int], num_classes: int) -> Any:
    """The MaskGIT or GPT config for token grids ``grid`` over ``codebook_size`` codes."""
    config_class = MaskGITConfig if params.kind == "maskgit" else GPTConfig
    return config_class(
        codebook_size=codebook_size,
        grid=grid,
        num_classes=num_classes if params.conditional else 0,
        **(params.architecture | {"label_dropout": params.label_dropout if params.conditional else 0.0}),
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


class PriorTask(engine.Task):
    """A MaskGIT or GPT prior as an ``imtok.engine`` task, on in-memory token splits."""

    name = "train_prior"
    prefix = "prior"
    unit = "tokens"
    advice = "lower prior.lr or set prior.grad_clip"

    def __init__(
        self, params: PriorParams, config: Any, *, train: TokenSplit, val: TokenSplit | None
    ) -> None:
        self.p, self.config, self.train, self.val = params, config, train, val

    def build(self, device: torch.device) -> nn.Module:
        self.device = device
        model = build_prior(self.p.kind, self.config).to(device)
        for split in (self.train, self.val) if self.val is not None else (self.train,):
            check_split(split, model.config.codebook_size, model.config.num_classes, self.p.conditional)
        return model

    def units_per_sample(self) -> int:
        return self.train.tokens[0].numel()

    def bind(self, train_model: nn.Module, runtime: Runtime, start: int) -> None:
        p, device = self.p, self.device
        self.train_model = train_model
        self.batches = index_batches(
            len(self.train.tokens),
            p.batch_size,
            seed=p.seed,
            rank=runtime.rank,
            world_size=runtime.world_size,
            start_step=start,
            device=device,
        )
        self.tokens = self.train.tokens.to(device=device, dtype=torch.int32)  # ids < 2^31; half of int64
        self.labels = self.train.labels.to(device) if p.conditional else None

    def losses(self, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        index = next(self.batches)
        labels = self.labels[index] if self.labels is not None else None
        return prior_loss(self.p.kind, self.train_model, self.tokens[index].long(), labels)

    def can_validate(self) -> bool:
        return self.val is not None

    def validate(self, model: nn.Module, step: int) -> dict[str, float]:
        p = self.p
        assert self.val is not None
        return evaluate_prior(
            p.kind,
            model,
            self.val,
            self.device,
            batch_size=p.batch_size,
            max_batches=p.val_batches,
            conditional=p.conditional,
        )


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
    """Train (or resume) a prior to ``params.total_steps`` with ``imtok.engine``; callbacks run on the
    main process only."""
    run = engine.train(
        PriorTask(params, config, train=train, val=val),
        params,
        checkpoint_dir=checkpoint_dir,
        runtime=runtime,
        on_metrics=on_metrics,
        checkpoint_extra=checkpoint_extra,
    )
    return PriorResult(
        model=run.model,
        step=run.step,
        start_step=run.start_step,
        val=run.val,
        train=run.train,
        seconds=run.seconds,
        tokens_per_s=run.units_per_s,
    )
