"""Training the domain classifier (``imtok.models.classifier``) as an ``imtok.engine`` task.

Cross-entropy on (images, labels) batches, a random half of each batch mirrored left-right when
``flip``, AdamW with weight decay on every parameter, warmup then cosine to zero. Its schedule and
cadence are fixed here (``ClassifierLoop``), not params: the classifier is a measuring instrument
trained once per dataset. Convolutions run channels-last (about 2x faster on CPU); the returned model
is contiguous and in eval mode.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from imtok import engine
from imtok.data.shards import ShardLoader, iter_batches, read_meta
from imtok.models.classifier import Classifier, ClassifierConfig, evaluate_accuracy, save_classifier
from imtok.params import ClassifierParams
from imtok.runtime import Runtime, batches_from, code_digest, resolve_device, run_fingerprint
from imtok.training import holding_checkpoints

LabelledBatches = Iterable[tuple[Tensor, Tensor]]

log = logging.getLogger("imtok.classifier")


@dataclass(frozen=True)
class ClassifierLoop:
    """The engine's loop settings for the classifier (``imtok.engine.Schedule`` and ``Cadence``)."""

    total_steps: int
    batch_size: int
    lr: float = 3e-3
    weight_decay: float = 5e-4
    warmup_steps: int = 100
    seed: int = 0
    betas: tuple[float, float] = (0.9, 0.999)
    min_lr_ratio: float = 0.0
    ema_decay: float | None = None
    grad_clip: float | None = None
    val_batches: int = 0
    keep_checkpoints: int = 2

    @property
    def log_every(self) -> int:
        return max(1, self.total_steps // 10)

    @property
    def val_every(self) -> int:
        return self.total_steps

    @property
    def checkpoint_every(self) -> int:
        return max(1, self.total_steps // 4)


def repeat_batches(batches: LabelledBatches, steps: int) -> Iterator[tuple[Tensor, Tensor]]:
    """``steps`` batches, starting a new pass over ``batches`` whenever one ends."""
    done = 0
    while done < steps:
        yielded = False
        for batch in batches:
            yielded = True
            yield batch
            done += 1
            if done == steps:
                return
        if not yielded:
            raise ValueError(
                f"train_batches: yielded no batch after {done} of {steps} steps; pass a re-iterable "
                "(a list or a DataLoader), an endless iterator or a function of the start step"
            )


class ClassifierTask(engine.Task):
    name = "train_classifier"
    prefix = "classifier"
    unit = "images"
    advice = "lower classifier.lr"

    def __init__(
        self, config: ClassifierConfig, batches: Callable[[int], Iterator[tuple[Tensor, Tensor]]], flip: bool
    ) -> None:
        self.config, self.batches, self.flip = config, batches, flip

    def build(self, device: torch.device) -> nn.Module:
        self.device = device
        return Classifier(self.config).to(device, memory_format=torch.channels_last)

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
        return [{"params": list(model.parameters()), "weight_decay": weight_decay}]  # BatchNorm too

    def bind(self, train_model: nn.Module, runtime: Runtime, start: int) -> None:
        self.model, self.stream = train_model, self.batches(start)

    def losses(self, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        images, labels = next(self.stream)
        images = images.to(self.device).contiguous(memory_format=torch.channels_last)
        labels = labels.to(self.device)
        if self.flip:
            mirrored = torch.rand(images.shape[0], 1, 1, 1, device=self.device) < 0.5
            images = torch.where(mirrored, images.flip(-1), images)
        loss = F.cross_entropy(self.model(images), labels)
        return loss, {"loss": loss}


def train_classifier(
    train_batches: LabelledBatches | Callable[[int], Iterator[tuple[Tensor, Tensor]]],
    config: ClassifierConfig | None = None,
    *,
    steps: int = 2000,
    lr: float = 3e-3,
    warmup_steps: int = 100,
    flip: bool = True,
    device: str | torch.device = "cpu",
    seed: int = 0,
    checkpoint_dir: str | Path | None = None,
    batch_size: int = 0,
) -> Classifier:
    """Train a ``Classifier`` for ``steps`` steps and return it in eval mode.

    ``train_batches`` yields ``(images, labels)``: float (B, C, H, W) in [-1, 1] and int64 (B,); it is
    iterated again from the start whenever it runs out. Or it is a function of the start step that
    returns the batches from that step on, which lets a run killed midway resume from its newest
    checkpoint in ``checkpoint_dir`` (None: a temporary directory, no resume). ``batch_size`` only
    feeds the images/s figure of the progress line (0: not known).
    """
    config = config or ClassifierConfig()
    if steps < 1:
        raise ValueError(f"steps: expected at least 1, got {steps}")
    if callable(train_batches):
        batches = train_batches
    else:

        def batches(start: int) -> Iterator[tuple[Tensor, Tensor]]:
            return itertools.islice(repeat_batches(train_batches, steps), start, None)

    loop = ClassifierLoop(
        total_steps=steps, batch_size=batch_size, lr=lr, warmup_steps=min(warmup_steps, steps - 1), seed=seed
    )
    task = ClassifierTask(config, batches, flip)
    runtime = Runtime(device=torch.device(device))
    with tempfile.TemporaryDirectory() as scratch:
        run = engine.train(task, loop, loop, checkpoint_dir=checkpoint_dir or scratch, runtime=runtime)
    return run.model.to(memory_format=torch.contiguous_format).eval()  # type: ignore[return-value]


# The train_classifier stage's run: train, measure val accuracy, save.

RUNTIME_KEYS = frozenset({"min_accuracy"})  # changes nothing that training computes


def labelled_batches(loader: ShardLoader, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (images, labels) batches, a new shuffle each epoch, as if ``start`` were drawn."""
    for batch in batches_from(loader, start):
        yield batch.images, batch.labels


def val_batches(location: Path, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for batch in iter_batches(location, batch_size):
        yield batch.images, batch.labels


def train_and_export(
    params: ClassifierParams,
    *,
    shards_dir: Path,
    out_path: Path,
    checkpoint_root: Path,
    device: str = "auto",
) -> dict[str, Any]:
    """The ``train_classifier`` stage's work: train (or resume) on ``shards_dir``'s train split, measure
    val accuracy, refuse a classifier below ``min_accuracy``, save it to ``out_path``; returns the
    stage report, training on ``device`` (``run.classifier.device``). Checkpoints go to
    ``checkpoint_root/<fingerprint>`` (params, train split, code)."""
    started = time.perf_counter()
    meta = read_meta(shards_dir / "train")
    num_classes = len(meta.get("class_names") or []) or 10
    config = ClassifierConfig(
        in_channels=int(meta["channels"]),
        num_classes=num_classes,
        image_size=int(meta["image_size"]),
        widths=params.widths,
        embed_dim=params.embed_dim,
        name=params.name,
    )
    resolved = resolve_device(device, key="run.classifier.device")
    loader = ShardLoader(
        shards_dir / "train", params.batch_size, shuffle=True, seed=params.seed, rank=0, world_size=1
    )
    values = {**dataclasses.asdict(params), "train_meta": meta, "code": code_digest()}
    checkpoint_dir = checkpoint_root / run_fingerprint(values, RUNTIME_KEYS)
    with holding_checkpoints(checkpoint_dir):
        model = train_classifier(
            lambda start: labelled_batches(loader, start),
            config,
            steps=params.steps,
            lr=params.lr,
            flip=params.flip,
            device=resolved,
            seed=params.seed,
            checkpoint_dir=checkpoint_dir,
            batch_size=params.batch_size,
        )
    accuracy = evaluate_accuracy(model, val_batches(shards_dir / "val", 512))
    log.info("val accuracy %.4f after %d steps", accuracy, params.steps)
    if accuracy < params.min_accuracy:
        raise ValueError(
            f"classifier.min_accuracy: the classifier reached {accuracy:.4f} val accuracy, below "
            f"{params.min_accuracy}; raise classifier.steps or widths (its features would mislead metrics)"
        )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_classifier(model.cpu(), out_path, val_accuracy=accuracy, dataset=meta.get("source"))
    return {
        "name": params.name,
        "val_accuracy": round(accuracy, 5),
        "steps": params.steps,
        "seconds": round(time.perf_counter() - started, 2),
    }
