"""FID and precision/recall: closed forms, parity with torch-fidelity, the FID InceptionV3 and its weights.

No pretrained weights exist here, so the Inception tests make a weights file with random (but
BatchNorm-calibrated, so that activations stay in a sensible range) parameters, load it through the
real lookup (``IMTOK_INCEPTION_WEIGHTS``, torch hub's cache) and through torch-fidelity, and compare
features and FID on the same uint8 images.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from imtok.data.shards import to_float, to_uint8
from imtok.metrics.features import (
    ClassifierFeatures,
    ExtractedFeatures,
    extract_features,
    feature_extractors,
    metric_name,
)
from imtok.metrics.fid import (
    _psd_sqrt,
    _sum_sqrt_eigenvalues,
    check_comparable,
    feature_statistics,
    fid_from_features,
    frechet_distance,
    precision_recall,
    sample_metrics,
    trace_sqrt_product,
    trace_sqrt_product_of_features,
)
from imtok.metrics.inception import (
    TORCH_HUB_FILENAMES,
    WEIGHTS_ENV,
    FIDInceptionV3,
    InceptionFeatures,
    expected_shapes,
    load_inception_weights,
    read_inception_weights,
    resize_like_tf1,
)
from imtok.models.classifier import Classifier, ClassifierConfig

torch_fidelity = pytest.importorskip("torch_fidelity")
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3  # noqa: E402
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x  # noqa: E402
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric  # noqa: E402
from torch_fidelity.metric_prc import calculate_precision_recall_full  # noqa: E402

SET_SIZE = 10  # images per set in the Inception parity test: 0.3-0.8 s per image per network on 2 CPU cores


def rng(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------------
# Fréchet distance


def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form():
    generator = np.random.default_rng(0)
    mu1, mu2 = generator.normal(size=5), generator.normal(size=5)
    s1, s2 = generator.uniform(0.1, 3, size=5), generator.uniform(0.1, 3, size=5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_of_full_covariances_matches_sqrtm():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    generator = np.random.default_rng(1)
    a, b = generator.normal(size=(6, 6)), generator.normal(size=(6, 6))
    sigma1, sigma2 = a @ a.T + 0.1 * np.eye(6), b @ b.T
    mu1, mu2 = generator.normal(size=6), generator.normal(size=6)
    covmean = scipy_linalg.sqrtm(sigma1 @ sigma2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1 + sigma2 - 2 * covmean)
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-9)
    # symmetric in its two Gaussians, and accepts torch tensors
    swapped = frechet_distance(
        torch.tensor(mu2), torch.tensor(sigma2), torch.tensor(mu1), torch.tensor(sigma1)
    )
    assert swapped == pytest.approx(expected, rel=1e-9)


def test_fid_of_a_set_against_itself_is_zero():
    features = torch.randn(50, 8, generator=rng(0))
    assert fid_from_features(features, features) == pytest.approx(0.0, abs=1e-9)
    # also with fewer samples than dimensions (singular covariances)
    wide = torch.randn(10, 64, generator=rng(1))
    assert fid_from_features(wide, wide) == pytest.approx(0.0, abs=1e-6)


def test_feature_statistics_are_mean_and_unbiased_covariance():
    features = torch.randn(20, 4, generator=rng(2))
    mu, sigma = feature_statistics(features)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, features.double().mean(0).numpy())
    np.testing.assert_allclose(sigma, np.cov(features.double().numpy(), rowvar=False))


@pytest.mark.parametrize("count", [40, 300])  # fewer and more samples than the 64 dimensions
def test_fid_matches_torch_fidelity(count):
    real = torch.randn(count, 64, generator=rng(3))
    fake = torch.randn(count, 64, generator=rng(4)) * 1.3 + 0.2
    expected = fid_statistics_to_metric(
        fid_features_to_statistics(real), fid_features_to_statistics(fake), verbose=False
    )["frechet_inception_distance"]
    assert fid_from_features(real, fake) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("count", [20, 200])  # singular and regular covariances in 32 dimensions
def test_the_three_trace_computations_agree(count):
    real = torch.randn(count, 32, generator=rng(20), dtype=torch.float64)
    fake = torch.randn(count, 32, generator=rng(21), dtype=torch.float64) ** 2
    (mu1, sigma1), (mu2, sigma2) = feature_statistics(real), feature_statistics(fake)
    by_root = _sum_sqrt_eigenvalues(_psd_sqrt(sigma1), sigma2)
    by_features = trace_sqrt_product_of_features(real.numpy() - mu1, fake.numpy() - mu2)
    # with singular covariances the eigh root adds sqrt(rounding) ~ 1e-8 per null direction
    assert trace_sqrt_product(sigma1, sigma2) == pytest.approx(by_root, rel=1e-7)
    assert by_features == pytest.approx(by_root, rel=1e-7)
    assert fid_from_features(real, fake) == pytest.approx(
        frechet_distance(mu1, sigma1, mu2, sigma2), rel=1e-7
    )


def test_bad_statistics_inputs_raise():
    with pytest.raises(ValueError, match="at least 2 samples"):
        feature_statistics(torch.randn(1, 4))
    with pytest.raises(ValueError, match="fake_features: a covariance needs at least 2 samples"):
        fid_from_features(torch.randn(5, 4), torch.randn(1, 4))
    with pytest.raises(ValueError, match=r"expected shape \(N, D\)"):
        feature_statistics(torch.randn(4))
    with pytest.raises(ValueError, match="NaN"):
        feature_statistics(torch.tensor([[0.0, math.nan], [1.0, 2.0]]))
    with pytest.raises(ValueError, match="sigma2"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))
    with pytest.raises(ValueError, match="mu1, mu2"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(3))
    with pytest.raises(ValueError, match="fake_features: 5-d but real_features are 4-d"):
        fid_from_features(torch.randn(6, 4), torch.randn(6, 5))


# ---------------------------------------------------------------------------------------------------
# Precision and recall


def test_precision_recall_of_identical_sets_is_one():
    features = torch.randn(60, 16, generator=rng(5))
    assert precision_recall(features, features.clone()) == (1.0, 1.0)


def test_precision_recall_of_far_apart_sets_is_zero():
    real = torch.randn(60, 16, generator=rng(6))
    assert precision_recall(real, real + 100.0) == (0.0, 0.0)


def test_precision_recall_separates_fidelity_from_diversity():
    real = torch.randn(400, 2, generator=rng(7))
    collapsed = torch.randn(400, 2, generator=rng(8)) * 0.05  # realistic but not diverse
    precision, recall = precision_recall(real, collapsed)
    assert precision > 0.95
    assert recall < 0.3


@pytest.mark.parametrize("chunk_size", [7, 1024])
def test_precision_recall_matches_torch_fidelity(chunk_size):
    real = torch.randn(150, 32, generator=rng(9))
    fake = torch.randn(120, 32, generator=rng(10)) * 1.2 + 0.3
    # torch-fidelity's convention: features_1 are the generated ones
    expected = calculate_precision_recall_full(fake, real, neighborhood=3, batch_size=10000)
    assert precision_recall(real, fake, k=3, chunk_size=chunk_size) == pytest.approx(expected)


def test_precision_recall_bad_inputs_raise():
    with pytest.raises(ValueError, match=r"real_features: k-NN radii with k=3 need at least 4 samples"):
        precision_recall(torch.randn(3, 4), torch.randn(10, 4))
    with pytest.raises(ValueError, match="fake_features: 5-d"):
        precision_recall(torch.randn(10, 4), torch.randn(10, 5))
    with pytest.raises(ValueError, match="k: expected at least 1"):
        precision_recall(torch.randn(10, 4), torch.randn(10, 4), k=0)


# ---------------------------------------------------------------------------------------------------
# Image sets and metric names


class MeanColour:
    """A toy extractor: per-channel means and standard deviations."""

    feature_dim = 6

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = images.float().expand(-1, 3, -1, -1)
        return torch.cat([images.mean(dim=(2, 3)), images.std(dim=(2, 3))], dim=1)


def test_metric_names_say_which_features_were_used():
    assert metric_name("fid", "inception") == "fid"
    assert metric_name("fid", MeanColour("fmnist")) == "fid_fmnist"
    real = torch.rand(40, 1, 8, 8, generator=rng(11)) * 2 - 1
    fake = torch.rand(40, 1, 8, 8, generator=rng(12)) * 2 - 1
    for name, expected in (("inception", "fid"), ("fmnist", "fid_fmnist")):
        extractor = MeanColour(name)
        metrics = sample_metrics(extract_features(extractor, real), extract_features(extractor, fake))
        assert set(metrics) == {expected, metric_name("precision", name), metric_name("recall", name)}


def test_extract_features_from_batches_equals_from_a_tensor():
    images = torch.rand(10, 3, 8, 8, generator=rng(13))
    whole = extract_features(MeanColour("toy"), images, batch_size=3)
    batched = extract_features(MeanColour("toy"), [images[:4], images[4:]])
    torch.testing.assert_close(whole.features, batched.features)
    assert whole.image_shape == (3, 8, 8) and whole.extractor == "toy"


def test_sample_sets_that_differ_from_the_reference_raise():
    extractor = MeanColour("toy")
    reference = extract_features(extractor, torch.rand(8, 1, 32, 32))
    with pytest.raises(ValueError, match=r"samples: images are 1x28x28 .* reference set's are 1x32x32"):
        check_comparable(reference, extract_features(extractor, torch.rand(8, 1, 28, 28)))
    with pytest.raises(ValueError, match=r"samples: images are 3x32x32"):
        sample_metrics(reference, extract_features(extractor, torch.rand(8, 3, 32, 32)))
    with pytest.raises(ValueError, match="cannot be compared"):
        check_comparable(reference, ExtractedFeatures(reference.features, "other", (1, 32, 32)))
    with pytest.raises(ValueError, match="images: the set is empty"):
        extract_features(extractor, torch.rand(0, 1, 32, 32))
    with pytest.raises(ValueError, match="images: the set is empty"):
        extract_features(extractor, [])
    with pytest.raises(ValueError, match="one image set must hold images of one size"):
        extract_features(extractor, [torch.rand(2, 1, 32, 32), torch.rand(2, 1, 16, 16)])
    with pytest.raises(ValueError, match="at least 2 samples"):
        sample_metrics(reference, extract_features(extractor, torch.rand(1, 1, 32, 32)))


# ---------------------------------------------------------------------------------------------------
# FID InceptionV3: resize, weights lookup, parity with torch-fidelity


@pytest.mark.parametrize("shape", [(2, 3, 32, 32), (1, 3, 28, 17), (1, 3, 299, 299), (1, 3, 400, 350)])
def test_resize_equals_torch_fidelity(shape):
    images = torch.rand(shape, generator=rng(14)) * 255
    expected = interpolate_bilinear_2d_like_tensorflow1x(images, size=(299, 299), align_corners=False)
    assert torch.equal(resize_like_tf1(images, 299), expected)


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> Path:
    """A FID InceptionV3 state dict with random weights and BatchNorm statistics fitted to random images."""
    torch.manual_seed(0)
    network = FIDInceptionV3()
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # running statistics = this batch's statistics
    network.train()
    with torch.no_grad():
        network(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=rng(15)))
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(network.state_dict(), path)
    return path


@pytest.fixture
def no_cached_weights(monkeypatch, tmp_path):
    """No configured weights and an empty torch hub cache."""
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    return tmp_path / "torch-home"


def test_missing_weights_give_a_reason_not_random_features(no_cached_weights):
    weights = load_inception_weights()
    assert weights.state_dict is None
    assert WEIGHTS_ENV in weights.reason
    for filename in TORCH_HUB_FILENAMES:
        assert str(no_cached_weights / "hub" / "checkpoints" / filename) in weights.reason
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        InceptionFeatures.from_file()
    available = feature_extractors()
    assert available.extractors == []
    assert "never downloaded" in available.skipped["inception"]


def test_configured_weights_that_are_missing_raise(no_cached_weights, monkeypatch, tmp_path):
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "absent.pth"))
    with pytest.raises(FileNotFoundError, match=r"absent\.pth does not exist .*IMTOK_INCEPTION_WEIGHTS"):
        load_inception_weights()


def test_weights_found_in_the_torch_hub_cache(weights_file, no_cached_weights):
    checkpoints = no_cached_weights / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    shutil.copy(weights_file, checkpoints / TORCH_HUB_FILENAMES[1])
    weights = load_inception_weights()
    assert weights.source == str(checkpoints / TORCH_HUB_FILENAMES[1])
    assert set(weights.state_dict) == set(expected_shapes())


def test_wrong_weights_files_are_refused_with_the_file_named(weights_file, tmp_path):
    state_dict = torch.load(weights_file, weights_only=True)
    # num_batches_tracked is optional: older checkpoints lack it
    lean = {key: value for key, value in state_dict.items() if not key.endswith("num_batches_tracked")}
    torch.save(lean, tmp_path / "lean.pth")
    assert len(read_inception_weights(tmp_path / "lean.pth")) == len(lean)

    missing = dict(state_dict)
    del missing["Mixed_7c.branch_pool.conv.weight"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"missing\.pth: not the FID InceptionV3 .*Mixed_7c\.branch_pool"):
        read_inception_weights(tmp_path / "missing.pth")

    torchvision_like = dict(state_dict)
    torchvision_like["fc.weight"] = torch.zeros(1000, 2048)
    torchvision_like["AuxLogits.fc.weight"] = torch.zeros(1000, 768)
    torch.save(torchvision_like, tmp_path / "imagenet.pth")
    with pytest.raises(ValueError, match=r"imagenet\.pth: holds AuxLogits.*torchvision"):
        read_inception_weights(tmp_path / "imagenet.pth")

    del torchvision_like["AuxLogits.fc.weight"]
    torch.save(torchvision_like, tmp_path / "classes.pth")
    with pytest.raises(ValueError, match=r"classes\.pth: tensor shapes .*fc\.weight \(1000, 2048\)"):
        read_inception_weights(tmp_path / "classes.pth")

    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"garbage\.pth could not be read"):
        read_inception_weights(tmp_path / "garbage.pth")


def test_inception_features_and_fid_match_torch_fidelity(weights_file, no_cached_weights, monkeypatch):
    reference = FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights_file)
    )
    # the keys and shapes we require are exactly those torch-fidelity's extractor loads
    assert {name: tuple(t.shape) for name, t in reference.state_dict().items()} == expected_shapes()

    monkeypatch.setenv(WEIGHTS_ENV, str(weights_file))
    available = feature_extractors()
    assert available.skipped == {"classifier": "no domain classifier given"}
    (ours,) = available.extractors
    assert isinstance(ours, InceptionFeatures) and ours.source == str(weights_file)

    real = torch.randint(0, 256, (SET_SIZE, 3, 32, 32), dtype=torch.uint8, generator=rng(16))
    fake = (torch.rand(SET_SIZE, 3, 32, 32, generator=rng(17)) ** 2 * 255).to(torch.uint8)
    # one batch of both sets per network: the forward at 299x299 is what costs time on a CPU
    both = extract_features(ours, torch.cat([real, fake]), batch_size=2 * SET_SIZE)
    ours_real = both._replace(features=both.features[:SET_SIZE])
    ours_fake = both._replace(features=both.features[SET_SIZE:])
    with torch.no_grad():
        reference_real, reference_fake = reference(torch.cat([real, fake]))[0].split(SET_SIZE)
    assert both.features.shape == (2 * SET_SIZE, 2048)
    torch.testing.assert_close(ours_real.features, reference_real, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_fake.features, reference_fake, rtol=1e-5, atol=1e-6)

    expected = fid_statistics_to_metric(
        fid_features_to_statistics(reference_real),
        fid_features_to_statistics(reference_fake),
        verbose=False,
    )["frechet_inception_distance"]
    metrics = sample_metrics(ours_real, ours_fake)
    assert expected > 0
    assert metrics["fid"] == pytest.approx(expected, rel=1e-3)
    assert fid_from_features(ours_real.features, ours_real.features) == pytest.approx(0.0, abs=1e-6)

    # grayscale is repeated to three channels; float [-1, 1] images are quantised like saved PNGs
    gray = real[:1, :1]
    torch.testing.assert_close(ours(to_float(gray)), reference(gray.expand(-1, 3, -1, -1))[0])
    with pytest.raises(ValueError, match=r"images: expected shape \(B, 1 \| 3, H, W\)"):
        ours(real[:, :2])


def test_classifier_features_are_named_after_the_classifier(no_cached_weights):
    classifier = Classifier(ClassifierConfig(name="fmnist", image_size=16))
    (extractor,) = feature_extractors(classifier=classifier).extractors
    assert isinstance(extractor, ClassifierFeatures)
    assert metric_name("fid", extractor) == "fid_fmnist"
    images = torch.rand(5, 1, 16, 16) * 2 - 1
    features = extract_features(extractor, images)
    assert features.features.shape == (5, classifier.feature_dim)
    quantised = to_uint8(images)
    torch.testing.assert_close(extractor(quantised), extractor(to_float(quantised)))
    every_value = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    # bfloat16 images (as under autocast) still give back their pixels
    assert torch.equal(to_uint8(to_float(every_value).bfloat16()), every_value)
    with pytest.raises(ValueError, match="trained on 16x16 images, got 32x32"):
        extractor(torch.rand(2, 1, 32, 32))
    # A classifier the caller trains on stays in training mode; features use BatchNorm's running
    # statistics and leave them as they were.
    classifier.train()
    running = {name: value.clone() for name, value in classifier.state_dict().items()}
    torch.testing.assert_close(extractor(images), features.features)
    assert classifier.training
    for name, value in classifier.state_dict().items():
        assert torch.equal(value, running[name]), name
    with pytest.raises(ValueError, match=r"expects \(B, 1, H, W\)"):
        extractor(torch.rand(2, 3, 16, 16))


def test_images_with_nan_pixels_are_refused_not_scored_as_black(weights_file):
    extractor = InceptionFeatures(torch.load(weights_file, weights_only=True))
    images = torch.zeros(3, 1, 32, 32)
    images[1, 0, 4, 4] = float("nan")
    with pytest.raises(ValueError, match=r"images: 1 of 3 hold NaN or infinite pixels"):
        extractor(images)


def test_one_dimensional_features_have_a_one_by_one_covariance():
    values = torch.randn(50, 1, generator=rng(21))
    mu, sigma = feature_statistics(values)
    assert mu.shape == (1,) and sigma.shape == (1, 1)
    assert fid_from_features(values, values + 1.0) == pytest.approx(1.0, abs=1e-6)  # only the means differ
