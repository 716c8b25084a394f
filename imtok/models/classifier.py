"""A small CNN classifier: the domain feature network for FID when InceptionV3 weights are absent.

InceptionV3 features are the standard for FID but need weights that cannot be downloaded here, and on
28x28 grayscale clothing they are a poor judge anyway. A CNN trained on the dataset itself gives
features that separate what matters in that domain (the "FID with a domain classifier" used for MNIST
-like data), and its logits grade class-conditional samples (``imtok.metrics.fid.class_accuracy``).
Values computed with it are only comparable with values from the same trained network, which is why
its metrics carry its ``name`` (``fid_fmnist``) and never the plain ``fid``.

Architecture (about 10 M multiply-adds per 32x32 image with the defaults): stages of 3x3 conv,
BatchNorm, ReLU, each followed by a 2x2 max pool (32 -> 16 -> 8 -> 4 pixels with three stages); the
last map is average-pooled to a fixed ``pooled_size`` grid and flattened, so any image size of at
least 2^stages pixels works; a ReLU linear layer gives the embedding (``features``, the penultimate
layer) and a linear head the logits. ``config.image_size`` records the size it was trained at, which
feature users check. Images are float (B, C, H, W) in [-1, 1], the pipeline's convention.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from imtok.training import atomic_save

NAME_PATTERN = re.compile(r"^[a-z0-9_]+$")


@dataclass(frozen=True)
class ClassifierConfig:
    in_channels: int = 1
    num_classes: int = 10
    image_size: int = 32  # the size it is trained at; feature users refuse other sizes
    widths: tuple[int, ...] = (32, 64, 128)  # channels of each stage, a 2x2 max pool after each
    convs_per_stage: int = 1
    pooled_size: int = 4  # the last stage is average-pooled to this grid, then flattened
    embed_dim: int = 128  # the features: a ReLU linear layer on the flattened grid
    dropout: float = 0.2  # before the linear head only
    name: str = "fmnist"  # the training data; metrics from its features are named fid_<name>

    def __post_init__(self) -> None:
        if self.in_channels not in (1, 3):
            raise ValueError(f"classifier.in_channels: expected 1 or 3, got {self.in_channels}")
        if self.num_classes < 2:
            raise ValueError(f"classifier.num_classes: expected at least 2, got {self.num_classes}")
        if not self.widths or any(width < 1 for width in self.widths):
            raise ValueError(f"classifier.widths: expected positive channel counts, got {self.widths}")
        if self.image_size < self.min_image_size:
            raise ValueError(
                f"classifier.image_size: {len(self.widths)} stages halve the image {len(self.widths)} "
                f"times, so it must be >= {self.min_image_size}; got {self.image_size}"
            )
        for key in ("convs_per_stage", "pooled_size", "embed_dim"):
            if getattr(self, key) < 1:
                raise ValueError(f"classifier.{key}: expected at least 1, got {getattr(self, key)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"classifier.dropout: expected a probability in [0, 1), got {self.dropout}")
        if not NAME_PATTERN.match(self.name) or self.name == "inception":
            raise ValueError(
                f"classifier.name: expected lowercase letters, digits and _ (not 'inception'), "
                f"got {self.name!r}"
            )

    @property
    def min_image_size(self) -> int:
        return 2 ** len(self.widths)


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class Classifier(nn.Module):
    """CNN classifier; ``features(images)`` is its embedding (B, embed_dim), ``forward`` its logits."""

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        stages: list[nn.Module] = []
        channels = config.in_channels
        for width in config.widths:
            for _ in range(config.convs_per_stage):
                stages.append(conv_bn_relu(channels, width))
                channels = width
            stages.append(nn.MaxPool2d(2))
        stages.append(nn.AdaptiveAvgPool2d(config.pooled_size))
        self.body = nn.Sequential(*stages)
        self.embed = nn.Sequential(
            nn.Flatten(), nn.Linear(channels * config.pooled_size**2, config.embed_dim), nn.ReLU(inplace=True)
        )
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.embed_dim, config.num_classes)

    @property
    def feature_dim(self) -> int:
        return self.config.embed_dim

    def check_images(self, images: Tensor) -> None:
        """Raise a ValueError naming ``images`` unless they are float (B, in_channels, H, W), large enough."""
        if images.ndim != 4 or images.shape[1] != self.config.in_channels:
            raise ValueError(
                f"images: expected shape (B, {self.config.in_channels}, H, W), got {tuple(images.shape)}"
            )
        if not images.is_floating_point():
            raise ValueError(f"images: expected float images in [-1, 1], got {images.dtype}")
        if min(images.shape[-2:]) < self.config.min_image_size:
            raise ValueError(
                f"images: expected H, W >= {self.config.min_image_size}, got {tuple(images.shape[-2:])}"
            )

    def features(self, images: Tensor) -> Tensor:
        """Embedding (B, embed_dim): the penultimate layer, after its ReLU."""
        self.check_images(images)
        return self.embed(self.body(images))

    def forward(self, images: Tensor) -> Tensor:
        """Logits (B, num_classes)."""
        return self.head(self.dropout(self.features(images)))


# ---------------------------------------------------------------------------------------------------
# Evaluation (training: imtok.trainers.classifier)


@torch.no_grad()
def predict(model: Classifier, images: Tensor, batch_size: int = 512) -> Tensor:
    """Predicted class ids (N,) for images (N, C, H, W), in eval mode, batch by batch."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    predictions = [model(chunk.to(device)).argmax(dim=1).cpu() for chunk in images.split(batch_size)]
    model.train(was_training)
    return torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.int64)


def evaluate_accuracy(model: Classifier, batches: Iterable[tuple[Tensor, Tensor]]) -> float:
    """Fraction of correctly classified images over all ``(images, labels)`` batches."""
    correct = total = 0
    for images, labels in batches:
        correct += int((predict(model, images) == labels.cpu()).sum())
        total += labels.numel()
    if total == 0:
        raise ValueError("batches: no images to evaluate")
    return correct / total


# ---------------------------------------------------------------------------------------------------
# Files


def save_classifier(model: Classifier, path: str | Path, **extra: Any) -> None:
    """Write config, weights and ``extra`` entries (e.g. ``test_accuracy``) to ``path`` atomically."""
    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    atomic_save({"config": asdict(model.config), "state_dict": state, **extra}, path)


def load_classifier(path: str | Path, map_location: str | torch.device = "cpu") -> Classifier:
    """The ``Classifier`` that ``save_classifier`` wrote to ``path``, in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"classifier checkpoint {path} does not exist; train the classifier first")
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or "config" not in payload or "state_dict" not in payload:
        raise ValueError(f"classifier checkpoint {path}: expected a file written by save_classifier")
    settings = dict(payload["config"])
    settings["widths"] = tuple(settings["widths"])
    model = Classifier(ClassifierConfig(**settings))
    model.load_state_dict(payload["state_dict"])
    return model.to(map_location).eval()
