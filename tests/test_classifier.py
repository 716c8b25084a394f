"""The domain classifier: shapes at any size and channel count, training on separable data, files."""

import pytest
import torch

from imtok.metrics.fid import class_accuracy
from imtok.models.classifier import (
    Classifier,
    ClassifierConfig,
    evaluate_accuracy,
    load_classifier,
    predict,
    save_classifier,
)
from imtok.trainers.classifier import train_classifier

SMALL = {"widths": (8, 16), "embed_dim": 32, "pooled_size": 2}


@pytest.mark.parametrize(("channels", "size"), [(1, 32), (3, 32), (1, 28), (3, 8), (1, 64)])
def test_forward_and_feature_shapes(channels, size):
    config = ClassifierConfig(in_channels=channels, image_size=size, num_classes=7, embed_dim=48)
    model = Classifier(config).eval()
    images = torch.rand(4, channels, size, size) * 2 - 1
    logits, features = model(images), model.features(images)
    assert logits.shape == (4, 7)
    assert features.shape == (4, config.embed_dim) == (4, model.feature_dim)
    assert torch.isfinite(logits).all() and torch.isfinite(features).all()


def separable_batches(count: int, size: int = 16, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Four classes: a bright left, right, top or bottom half on noise, in [-1, 1]."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (count,), generator=generator)
    images = torch.rand(count, 1, size, size, generator=generator) - 1.0  # noise in [-1, 0]
    half = size // 2
    for index, label in enumerate(labels.tolist()):
        region = [
            (slice(None), slice(None, half)),
            (slice(None), slice(half, None)),
            (slice(None, half), slice(None)),
            (slice(half, None), slice(None)),
        ][label]
        images[index, 0][region] += 1.0
    return [(images[i : i + 32], labels[i : i + 32]) for i in range(0, count, 32)]


def test_training_on_separable_data_reaches_high_accuracy():
    config = ClassifierConfig(image_size=16, num_classes=4, **SMALL)
    train = separable_batches(256)
    test = separable_batches(256, seed=1)
    # flips would swap the left and right classes
    model = train_classifier(train, config, steps=60, lr=1e-2, warmup_steps=5, flip=False)
    assert not model.training
    assert evaluate_accuracy(model, test) >= 0.95
    images = torch.cat([images for images, _ in test])
    labels = torch.cat([labels for _, labels in test])
    assert class_accuracy(model, images, labels) >= 0.95
    assert class_accuracy(model, images, (labels + 1) % 4) <= 0.05


def test_training_is_reproducible_for_a_seed():
    config = ClassifierConfig(image_size=16, num_classes=4, **SMALL)
    train = separable_batches(64)
    first = train_classifier(train, config, steps=3, seed=3)
    second = train_classifier(train, config, steps=3, seed=3)
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)


def test_save_and_load_round_trip(tmp_path):
    model = Classifier(ClassifierConfig(in_channels=3, name="shapes", **SMALL)).eval()
    save_classifier(model, tmp_path / "classifier.pt", test_accuracy=0.5)
    loaded = load_classifier(tmp_path / "classifier.pt")
    assert loaded.config == model.config and not loaded.training
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(loaded(images), model(images))
    assert torch.load(tmp_path / "classifier.pt", weights_only=True)["test_accuracy"] == 0.5


def test_bad_inputs_raise(tmp_path):
    with pytest.raises(ValueError, match=r"classifier\.in_channels"):
        ClassifierConfig(in_channels=2)
    with pytest.raises(ValueError, match=r"classifier\.image_size: 3 stages .* >= 8; got 4"):
        ClassifierConfig(image_size=4)
    with pytest.raises(ValueError, match=r"classifier\.dropout"):
        ClassifierConfig(dropout=1.0)
    with pytest.raises(ValueError, match=r"classifier\.embed_dim"):
        ClassifierConfig(embed_dim=0)
    with pytest.raises(ValueError, match=r"classifier\.name"):
        ClassifierConfig(name="inception")
    with pytest.raises(ValueError, match=r"classifier\.name"):
        ClassifierConfig(name="Fashion MNIST")
    model = Classifier(ClassifierConfig(**SMALL))
    with pytest.raises(ValueError, match=r"images: expected shape \(B, 1, H, W\)"):
        model(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match="float"):
        model(torch.zeros(2, 1, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"images: expected H, W >= 4"):
        model(torch.zeros(2, 1, 2, 2))
    with pytest.raises(ValueError, match="train_batches: yielded no batch after 0 of 5 steps"):
        train_classifier([], ClassifierConfig(**SMALL), steps=5)
    with pytest.raises(ValueError, match="train_batches: yielded no batch after 1 of 5 steps"):
        train_classifier(iter(separable_batches(32, size=32)), ClassifierConfig(**SMALL), steps=5)
    with pytest.raises(ValueError, match="batches: no images"):
        evaluate_accuracy(model, [])
    images = torch.rand(4, 1, 32, 32)
    with pytest.raises(ValueError, match="requested_labels: expected one label per image"):
        class_accuracy(model, images, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"requested_labels: expected integer class ids in \[0, 10\)"):
        class_accuracy(model, images, torch.full((4,), 10))
    with pytest.raises(ValueError, match="images: expected a non-empty"):
        class_accuracy(model, images[:0], torch.zeros(0, dtype=torch.int64))
    with pytest.raises(ValueError, match="images: the classifier was trained on 32x32 images, got 16x16"):
        class_accuracy(model, torch.rand(4, 1, 16, 16), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(FileNotFoundError, match="train the classifier first"):
        load_classifier(tmp_path / "absent.pt")
    assert predict(model, images[:0]).shape == (0,)


def test_a_run_killed_midway_resumes_from_its_checkpoint_to_the_same_weights(tmp_path):
    config = ClassifierConfig(image_size=16, num_classes=4, **SMALL)
    data = separable_batches(128)

    def batches(start, fail_at=None):
        for step in range(start, 10_000):
            if step == fail_at:
                raise KeyboardInterrupt("killed")
            yield data[step % len(data)]

    whole = train_classifier(batches, config, steps=8, warmup_steps=2, checkpoint_dir=tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):  # checkpoints every 2 steps: steps 2 and 4 are kept
        train_classifier(
            lambda start: batches(start, fail_at=5),
            config,
            steps=8,
            warmup_steps=2,
            checkpoint_dir=tmp_path / "b",
        )
    assert sorted(path.name for path in (tmp_path / "b").glob("step-*.pt")) == [
        "step-00000002.pt", "step-00000004.pt"
    ]  # fmt: skip
    resumed = train_classifier(batches, config, steps=8, warmup_steps=2, checkpoint_dir=tmp_path / "b")
    for name, value in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
