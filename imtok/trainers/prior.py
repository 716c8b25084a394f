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

import dataclasses
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from imtok import engine
from imtok.data.tokens import TokenSplit, load_token_split
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
from imtok.params import Params, PriorParams, PriorRun
from imtok.quantizers.common import check_indices
from imtok.runtime import Runtime, agreed_fingerprint, code_digest, run_fingerprint
from imtok.trainers.export import Registration, finish_training, training_run
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
        self,
        params: PriorParams,
        config: Any,
        *,
        val_batches: int,
        train: TokenSplit,
        val: TokenSplit | None,
    ) -> None:
        self.p, self.config, self.train, self.val = params, config, train, val
        self.val_batches = val_batches

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
            max_batches=self.val_batches,
            conditional=p.conditional,
        )


def train_prior(
    params: PriorParams,
    config: Any,
    *,
    run: PriorRun,
    train: TokenSplit,
    val: TokenSplit | None,
    checkpoint_dir: str | Path,
    runtime: Runtime,
    on_metrics: MetricsCallback | None = None,
    checkpoint_extra: Mapping[str, Any] | None = None,
) -> PriorResult:
    """Train (or resume) a prior to ``params.total_steps`` with ``imtok.engine`` at the cadence of
    ``run``; callbacks run on the main process only."""
    trained = engine.train(
        PriorTask(params, config, val_batches=run.val_batches, train=train, val=val),
        params,
        run,
        checkpoint_dir=checkpoint_dir,
        runtime=runtime,
        on_metrics=on_metrics,
        checkpoint_extra=checkpoint_extra,
    )
    return PriorResult(
        model=trained.model,
        step=trained.step,
        start_step=trained.start_step,
        val=trained.val,
        train=trained.train,
        seconds=trained.seconds,
        tokens_per_s=trained.units_per_s,
    )


# The train_prior stage's run: train, measure on val, export, register, report.

STAGE = "train_prior"
REGISTERED_NAME = "imtok-prior"
MODEL_DESCRIPTION = (
    "Priors over imtok tokens (MaskGIT or GPT) trained by the train_prior stage, one version per run. "
    "Each version names its tokenizer (URI and checksum), codebook, token grid, classes and val loss; "
    "alias candidate is the newest, champion the best on evaluate.prior_metric."
)
MODEL_FILE = "prior.pt"
# What train and val must share: otherwise they were extracted by different tokenizers.
SHARED_KEYS = ("codebook_size", "grid", "tokenizer_sha256")


def check_token_splits(train: TokenSplit, val: TokenSplit, tokens_dir: Path) -> None:
    """Train and val token shards must come from one tokenizer; errors name both values."""
    for key in SHARED_KEYS:
        if train.meta.get(key) != val.meta.get(key):
            raise ValueError(
                f"{tokens_dir / 'val'}: {key} {val.meta.get(key)!r} differs from {tokens_dir / 'train'}'s "
                f"{train.meta.get(key)!r}; extract both splits with the same tokenizer (run extract_tokens)"
            )


def tokenizer_provenance(meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "tokenizer": meta.get("tokenizer"),
        "tokenizer_uri": meta.get("tokenizer_uri"),
        "tokenizer_sha256": meta.get("tokenizer_sha256"),
    }


def train_and_export(
    params: Params,
    *,
    tokens_dir: Path,
    out_dir: Path,
    checkpoint_root: Path,
    runtime: Runtime,
    register: bool = True,
) -> dict[str, Any] | None:
    """The ``train_prior`` stage's work: train (or resume) on the token shards of ``tokens_dir``,
    measure val, export to ``out_dir`` and register; returns the stage report on the main process
    (else None). Checkpoints go to ``checkpoint_root/<fingerprint>`` (params, the token shards'
    identity and the code). The caller holds ``runtime`` and shuts it down."""
    from imtok import tracking

    section = params.prior
    train_split, val_split = load_token_split(tokens_dir / "train"), load_token_split(tokens_dir / "val")
    check_token_splits(train_split, val_split, tokens_dir)
    meta = train_split.meta
    class_names = list(meta.get("class_names") or [])
    num_classes = len(class_names) or int(train_split.labels.max()) + 1
    grid = (int(meta["grid"][0]), int(meta["grid"][1]))
    config = prior_config(section, int(meta["codebook_size"]), grid, num_classes)
    token_identity = json.dumps(
        {k: v for k, v in meta.items() if k != "shards"} | {"shards": meta["shards"]}, sort_keys=True
    )
    run_key = run_fingerprint({**section.as_dict(), "tokens": token_identity, "code": code_digest()})
    run_key = agreed_fingerprint(run_key, runtime, "prior")
    checkpoint_dir = checkpoint_root / run_key
    provenance = tokenizer_provenance(meta)
    logged = {
        **dataclasses.asdict(params),
        "tokens": {**provenance, "grid": list(grid), "count": meta["count"]},
    }
    tags = {"imtok.fingerprint": run_key, "imtok.prior": section.kind}
    with training_run(STAGE, logged, tags, checkpoint_dir, runtime.is_main) as run:
        result = train_prior(
            section,
            config,
            run=params.run.prior,
            train=train_split,
            val=val_split,
            checkpoint_dir=checkpoint_dir,
            runtime=runtime,
            on_metrics=tracking.log_metrics if runtime.is_main else None,
            checkpoint_extra={"mlflow_run_id": run.info.run_id if run else None, "fingerprint": run_key},
        )
        if not runtime.is_main:
            return None
        model = result.model.eval()
        final = evaluate_prior(
            section.kind,
            model,
            val_split,
            runtime.device,
            batch_size=section.batch_size,
            conditional=section.conditional,
        )
        commit = tracking.git_commit()

        def registration() -> Registration:
            tokenizer = provenance["tokenizer_uri"] or provenance["tokenizer"]
            conditional = "class-conditional" if config.num_classes else "unconditional"
            tags = {
                "prior": section.kind,
                "codebook_size": config.codebook_size,
                "token_grid": "x".join(map(str, grid)),
                "num_classes": config.num_classes,
                "tokenizer_uri": tokenizer,
                "tokenizer_sha256": provenance["tokenizer_sha256"],
                "git_commit": commit,
                "fingerprint": run_key,
                "val_loss": f"{final['loss']:.4f}",
            }
            description = (
                f"{section.kind} prior, {conditional}, over {config.codebook_size} codes on a "
                f"{tags['token_grid']} grid; val loss {final['loss']:.4f}; tokenizer {tokenizer}"
            )
            return Registration(REGISTERED_NAME, grid, tags, description, MODEL_DESCRIPTION, "int64")

        return finish_training(
            out_dir,
            stage=STAGE,
            run=run,
            run_key=run_key,
            commit=commit,
            result=result,
            final=final,
            runtime=runtime,
            kind="prior",
            model_file=MODEL_FILE,
            config={"kind": section.kind, "model": dataclasses.asdict(config)},
            registration=registration if register else None,
            summary={
                "kind": section.kind,
                "codebook_size": config.codebook_size,
                "grid": list(grid),
                "num_classes": config.num_classes,
                "class_names": class_names,
                "image_size": meta.get("image_size"),
                "channels": meta.get("channels"),
                **provenance,
            },
            report={"tokens_per_s": round(result.tokens_per_s, 1)},
        )
