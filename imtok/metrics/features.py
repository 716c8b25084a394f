"""Feature extractors for sample metrics, and the names their metrics carry.

A FID (or precision/recall) value means something only together with the network whose features it
compares, so every extractor has a ``name`` and every metric computed from it is named after it:
``metric_name("fid", extractor)`` is ``"fid"`` for the standard FID InceptionV3 (``inception``) and
``"fid_<name>"`` for anything else, e.g. ``fid_fmnist`` for the Fashion-MNIST classifier. A caller
cannot report domain-classifier features under the standard name by mistake.

Two extractors exist: ``InceptionFeatures`` (``imtok.metrics.inception``; needs the FID weights file)
and ``ClassifierFeatures`` (the embedding of a ``Classifier`` trained on the dataset).
``feature_extractors`` returns those that can be built on this machine and, for the others, why not.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor

from imtok.data.shards import to_float
from imtok.metrics.inception import InceptionFeatures, load_inception_weights
from imtok.models.autoencoder import evaluating
from imtok.models.classifier import Classifier, load_classifier

STANDARD_NAME = InceptionFeatures.name  # the only extractor whose metrics carry the bare names


@runtime_checkable
class FeatureExtractor(Protocol):
    """Maps images (B, C, H, W), uint8 or float in [-1, 1], to features (B, feature_dim)."""

    name: str
    feature_dim: int

    def __call__(self, images: Tensor) -> Tensor: ...


def metric_name(metric: str, extractor: FeatureExtractor | str) -> str:
    """``metric`` for InceptionV3 features, ``metric_<name>`` for any other extractor."""
    name = extractor if isinstance(extractor, str) else extractor.name
    return metric if name == STANDARD_NAME else f"{metric}_{name}"


class ClassifierFeatures:
    """The embedding of a trained ``Classifier`` as a feature extractor named after its training data.

    Accepts uint8 images or float images in [-1, 1]; one channel is repeated for a 3-channel
    classifier, and images must have the size the classifier was trained at (its features at other
    sizes are not the ones it learnt).
    """

    def __init__(self, classifier: Classifier) -> None:
        self.classifier = classifier  # put in eval mode for each call, then left as the caller had it
        self.name = classifier.config.name
        self.feature_dim = classifier.feature_dim

    @classmethod
    def from_file(cls, path: str | Path) -> ClassifierFeatures:
        return cls(load_classifier(path))

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        config = self.classifier.config
        if images.ndim != 4 or images.shape[1] not in (1, config.in_channels):
            raise ValueError(
                f"images: the {self.name} classifier expects (B, {config.in_channels}, H, W) images, "
                f"got {tuple(images.shape)}"
            )
        if tuple(images.shape[-2:]) != (config.image_size, config.image_size):
            raise ValueError(
                f"images: the {self.name} classifier was trained on {config.image_size}x"
                f"{config.image_size} images, got {images.shape[-2]}x{images.shape[-1]}"
            )
        if images.dtype == torch.uint8:
            images = to_float(images)
        device = next(self.classifier.parameters()).device
        images = images.to(device).expand(-1, config.in_channels, -1, -1)
        with evaluating(self.classifier):  # BatchNorm's running statistics, not the batch's, and no update
            return self.classifier.features(images).float()


class ExtractedFeatures(NamedTuple):
    """Features (N, D) of an image set, the extractor's name and the (C, H, W) of the images."""

    features: Tensor
    extractor: str
    image_shape: tuple[int, int, int]


class FeatureCollector:
    """The features of one image set fed batch by batch (``add``), kept on the CPU: only (N, D)
    features grow with the set, never the images, so sets of any image size fit in memory."""

    def __init__(self, extractor: FeatureExtractor) -> None:
        self.extractor = extractor
        self.image_shape: tuple[int, int, int] | None = None
        self._features: list[Tensor] = []

    def add(self, batch: Tensor) -> None:
        """Extract the features of ``batch`` (B, C, H, W); every batch of a set has one (C, H, W)."""
        if batch.ndim != 4:
            raise ValueError(f"images: expected batches of shape (B, C, H, W), got {tuple(batch.shape)}")
        shape = tuple(batch.shape[1:])
        if self.image_shape is None:
            self.image_shape = shape  # type: ignore[assignment]
        elif shape != self.image_shape:
            raise ValueError(
                f"images: batch of (C, H, W) = {shape} after batches of {self.image_shape}; one image set "
                "must hold images of one size and channel count"
            )
        if batch.shape[0]:
            self._features.append(self.extractor(batch).cpu())

    def result(self) -> ExtractedFeatures:
        """The features (N, D) of every image added; ValueError when there were none."""
        if self.image_shape is None or not self._features:
            raise ValueError(f"images: the set is empty; no {self.extractor.name} features to compute")
        return ExtractedFeatures(torch.cat(self._features), self.extractor.name, self.image_shape)


def extract_features(
    extractor: FeatureExtractor,
    images: Tensor | Iterable[Tensor],
    batch_size: int = 64,
) -> ExtractedFeatures:
    """Features (N, D) on the CPU of an image tensor (N, C, H, W) or of an iterable of image batches.

    Every batch must have one (C, H, W); the set must not be empty.
    """
    collector = FeatureCollector(extractor)
    for batch in images.split(batch_size) if isinstance(images, Tensor) else images:
        collector.add(batch)
    return collector.result()


class AvailableExtractors(NamedTuple):
    """Extractors that could be built, and for each one that could not, the reason."""

    extractors: list[FeatureExtractor]
    skipped: dict[str, str]


def feature_extractors(
    inception_weights: str | Path | None = None,
    classifier: Classifier | str | Path | None = None,
    device: str | torch.device = "cpu",
) -> AvailableExtractors:
    """InceptionV3 when its weights are found (see ``load_inception_weights``), and the classifier.

    ``classifier`` is a trained ``Classifier`` or a file from ``save_classifier``; None skips it. A
    configured file that is missing or wrong raises; weights merely absent from the caches are skipped
    with the reason, which a stage should record next to its metrics.
    """
    extractors: list[FeatureExtractor] = []
    skipped: dict[str, str] = {}
    weights = load_inception_weights(inception_weights)
    if weights.state_dict is None:
        skipped[STANDARD_NAME] = weights.reason or "no weights"
    else:
        extractors.append(InceptionFeatures(weights.state_dict, weights.source or "").to(device))
    if classifier is None:
        skipped["classifier"] = "no domain classifier given"
    else:
        model = classifier if isinstance(classifier, Classifier) else load_classifier(classifier)
        extractors.append(ClassifierFeatures(model.to(device)))
    return AvailableExtractors(extractors, skipped)
