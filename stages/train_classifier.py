"""DVC stage `train_classifier`: the domain feature network, trained on the real image shards.

Generation and reconstruction metrics are also computed on the embedding of this classifier,
always, under their own names (``fid_<classifier.name>``, never ``fid``); the standard InceptionV3
metrics come beside them only when its weights are on the machine. It also scores class-conditional
samples (accuracy on the requested class). Trains on
``data/shards/train``, measures accuracy on ``data/shards/val`` and fails when it stays below
``classifier.min_accuracy``: features of a weak classifier would make the metrics mislead. Writes
``models/classifier/classifier.pt`` and ``reports/train_classifier.json``; checkpoints under
``checkpoints/classifier/<fingerprint>/`` (params, train split and code), so a killed run resumes.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from imtok import layout
from imtok.data.shards import ShardLoader, iter_batches, read_meta
from imtok.models.classifier import ClassifierConfig, evaluate_accuracy, save_classifier
from imtok.params import ClassifierParams
from imtok.runtime import batches_from, code_digest, resolve_device, run_fingerprint
from imtok.trainers.classifier import train_classifier
from imtok.training import holding_checkpoints
from stages.common import CLASSIFIER_PATH, stage_main

log = logging.getLogger("stages.train_classifier")

SHARDS_DIR = Path(layout.SHARDS)
OUT_PATH = CLASSIFIER_PATH
REPORT_PATH = Path(layout.REPORTS) / "train_classifier.json"
CHECKPOINT_ROOT = Path(layout.CHECKPOINTS) / "classifier"
RUNTIME_KEYS = frozenset({"device", "min_accuracy"})  # change nothing that training computes


def labelled_batches(loader: ShardLoader, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (images, labels) batches, a new shuffle each epoch, as if ``start`` were drawn."""
    for batch in batches_from(loader, start):
        yield batch.images, batch.labels


def val_batches(location: Path, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for batch in iter_batches(location, batch_size):
        yield batch.images, batch.labels


def train(
    params: ClassifierParams,
    *,
    shards_dir: Path = SHARDS_DIR,
    out_path: Path = OUT_PATH,
    checkpoint_root: Path = CHECKPOINT_ROOT,
) -> dict[str, Any]:
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
    device = resolve_device(params.device, key="classifier.device")
    loader = ShardLoader(
        shards_dir / "train", params.batch_size, shuffle=True, seed=params.seed, rank=0, world_size=1
    )
    values = {**dataclasses.asdict(params), "train_meta": meta, "code": code_digest(__file__)}
    checkpoint_dir = checkpoint_root / run_fingerprint(values, RUNTIME_KEYS)
    with holding_checkpoints(checkpoint_dir):
        model = train_classifier(
            lambda start: labelled_batches(loader, start),
            config,
            steps=params.steps,
            lr=params.lr,
            flip=params.flip,
            device=device,
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


def main(argv: list[str] | None = None) -> int:
    return stage_main(__doc__, lambda params, _: train(params.classifier), report_path=REPORT_PATH, argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
