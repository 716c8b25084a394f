"""Tokenizer losses: reconstruction, VGG-19 weights lookup and features, perceptual, PCL, PatchGAN.

No pretrained weights exist here, so the VGG tests save a randomly initialised timm vgg19 and load it
back through the same paths real weights take.
"""

import math
import socket
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from imtok.losses import (
    HF_REPO_ID,
    TORCH_HUB_FILENAME,
    VGG19_LAYERS,
    WEIGHTS_SETTING,
    PatchDiscriminator,
    PerceptualLoss,
    ProbabilisticContrastiveLoss,
    VGGFeatures,
    VGGWeightsMissingWarning,
    adaptive_gan_weight,
    gan_factor,
    generator_adversarial_loss,
    hinge_d_loss,
    load_vgg_weights,
    patch_logits_size,
    patch_nce,
    read_vgg_weights,
    reconstruction_loss,
)
from imtok.quantizers import RegularizedVQ

# ---------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def vgg_state_dict() -> dict[str, torch.Tensor]:
    """State dict of a randomly initialised timm vgg19 (seeded), classifier keys included.

    The classifier is shrunk (it is never loaded) so the fixture stays fast; the features are VGG-19's.
    """
    torch.manual_seed(0)
    return timm.create_model("vgg19", pretrained=False, mlp_ratio=1 / 64, num_classes=10).state_dict()


@pytest.fixture(scope="module")
def feature_weights(vgg_state_dict) -> dict[str, torch.Tensor]:
    """The convolutional part (``features.N.*``) of ``vgg_state_dict``."""
    return {key: value for key, value in vgg_state_dict.items() if key.startswith("features.")}


@pytest.fixture(scope="module")
def weights_files(tmp_path_factory, vgg_state_dict, feature_weights) -> dict[str, Path]:
    """The random weights saved under the namings a user may bring."""
    root = tmp_path_factory.mktemp("vgg-weights")
    files = {
        "timm.safetensors": root / "model.safetensors",
        "torchvision.pth": root / "vgg19-torchvision.pth",
        "data-parallel.pt": root / "vgg19-module.pt",
        "bare-features.pth": root / "vgg19-features.pth",
    }
    # timm's Hugging Face file holds the whole model, classifier included.
    save_file(vgg_state_dict, str(files["timm.safetensors"]))
    # torchvision shares the features naming; its classifier keys differ and must be ignored.
    torch.save({**feature_weights, "classifier.6.weight": torch.zeros(10, 4)}, files["torchvision.pth"])
    torch.save({f"module.{key}": value for key, value in feature_weights.items()}, files["data-parallel.pt"])
    bare = {key.removeprefix("features."): value for key, value in feature_weights.items()}
    torch.save({"state_dict": bare}, files["bare-features.pth"])
    return files


@pytest.fixture(scope="module")
def features(weights_files) -> VGGFeatures:
    """VGG features with the saved random weights, shared by the loss tests."""
    return VGGFeatures.from_file(weights_files["torchvision.pth"])


@pytest.fixture
def no_network(monkeypatch):
    """Make any attempt to open a network connection fail the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def empty_caches(monkeypatch, tmp_path, no_network) -> dict[str, Path]:
    """Point every weights cache at fresh empty directories, offline."""
    dirs = {name: tmp_path / name for name in ("torch", "hf-home", "hf-hub", "xdg")}
    for path in dirs.values():
        path.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(dirs["torch"]))
    monkeypatch.setenv("HF_HOME", str(dirs["hf-home"]))
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(dirs["hf-hub"]))
    monkeypatch.setenv("HF_HUB_CACHE", str(dirs["hf-hub"]))
    monkeypatch.setenv("XDG_CACHE_HOME", str(dirs["xdg"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return dirs


def images(seed: int, shape=(2, 3, 32, 32)) -> torch.Tensor:
    """Random images in [-1, 1]."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---------------------------------------------------------------------------------------------------
# Reconstruction


def test_reconstruction_loss_kinds():
    x = torch.tensor([0.0, 1.0, -1.0, 0.5])
    y = torch.tensor([1.0, 1.0, 1.0, 0.0])
    assert reconstruction_loss(x, y, "l1").item() == pytest.approx((1 + 0 + 2 + 0.5) / 4)
    assert reconstruction_loss(x, y, "l2").item() == pytest.approx((1 + 0 + 4 + 0.25) / 4)
    assert reconstruction_loss(x, y).item() == pytest.approx((1 + 0 + 2 + 0.5) / 4)


def test_reconstruction_loss_rejects_unknown_kind_naming_the_key():
    with pytest.raises(ValueError, match=r"tokenizer\.recon_loss.*'l1' \| 'l2'.*'huber'"):
        reconstruction_loss(torch.zeros(2), torch.zeros(2), "huber")


# ---------------------------------------------------------------------------------------------------
# VGG-19 layers, weights and features


def test_layer_indices_are_the_named_relus_of_timm_vgg19():
    with torch.device("meta"):
        layers = timm.create_model("vgg19", pretrained=False).features
    for name, index in VGG19_LAYERS.items():
        block, conv = (int(part) for part in name.removeprefix("relu").split("_"))
        before = list(layers[:index])
        assert isinstance(layers[index], nn.ReLU)
        assert isinstance(layers[index - 1], nn.Conv2d)
        assert sum(isinstance(layer, nn.MaxPool2d) for layer in before) == block - 1
        last_pool = max((i for i, layer in enumerate(before) if isinstance(layer, nn.MaxPool2d)), default=-1)
        assert sum(isinstance(layer, nn.Conv2d) for layer in before[last_pool + 1 :]) == conv


VARIANTS = ["timm.safetensors", "torchvision.pth", "data-parallel.pt", "bare-features.pth"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_configured_weights_file_loads_into_the_features(variant, weights_files, feature_weights, no_network):
    loss = PerceptualLoss(weights_path=weights_files[variant])
    assert loss.enabled and loss.disabled_reason is None
    assert loss.features.source == str(weights_files[variant])
    loaded = loss.features.state_dict()
    last = VGG19_LAYERS["relu5_3"]
    assert set(loaded) == {key for key in feature_weights if int(key.split(".")[1]) <= last}
    for key, value in loaded.items():
        torch.testing.assert_close(value, feature_weights[key], rtol=0, atol=0)


def test_perceptual_loss_is_positive_for_different_and_zero_for_identical_images(features):
    loss = PerceptualLoss(features=features)
    a, b = images(0), images(1)
    assert loss(a, b).item() > 0
    assert loss(a, a.clone()).item() == pytest.approx(0.0, abs=1e-6)


def test_features_shapes_grayscale_and_frozen(features):
    gray = images(2, (2, 1, 32, 32))
    outputs = features(gray)
    assert [tuple(o.shape) for o in outputs] == [
        (2, 64, 32, 32),
        (2, 128, 16, 16),
        (2, 256, 8, 8),
        (2, 512, 4, 4),
        (2, 512, 2, 2),
    ]
    for gray_map, rgb_map in zip(outputs, features(gray.repeat(1, 3, 1, 1)), strict=True):
        torch.testing.assert_close(gray_map, rgb_map)
    features.train()
    assert not features.training
    assert not any(p.requires_grad for p in features.parameters())
    with pytest.raises(ValueError, match="H, W >= 16"):
        features(images(3, (1, 3, 8, 8)))


@pytest.mark.parametrize("hub_importable", [True, False])
def test_weights_found_in_the_hugging_face_cache(hub_importable, empty_caches, weights_files, monkeypatch):
    if not hub_importable:
        monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    repo = empty_caches["hf-hub"] / f"models--{HF_REPO_ID.replace('/', '--')}"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    (snapshot / "model.safetensors").symlink_to(weights_files["timm.safetensors"])
    found = load_vgg_weights(None)
    assert found.state_dict is not None and found.reason is None
    assert found.source == str(snapshot / "model.safetensors")


def test_weights_found_in_the_torch_hub_cache(empty_caches, weights_files):
    checkpoints = empty_caches["torch"] / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / TORCH_HUB_FILENAME).symlink_to(weights_files["torchvision.pth"])
    found = load_vgg_weights(None)
    assert found.source == str(checkpoints / TORCH_HUB_FILENAME)
    assert ProbabilisticContrastiveLoss().enabled


def test_without_weights_the_vgg_losses_warn_switch_off_and_return_zero(empty_caches):
    found = load_vgg_weights(None)
    assert found.state_dict is None and found.source is None
    hub_checkpoints = empty_caches["torch"] / "hub" / "checkpoints"
    searched = [str(empty_caches["hf-hub"]), str(hub_checkpoints), WEIGHTS_SETTING]
    x, y = images(4), images(5).requires_grad_()
    with pytest.warns(VGGWeightsMissingWarning, match="perceptual loss disabled") as caught:
        perceptual = PerceptualLoss()
    with pytest.warns(VGGWeightsMissingWarning, match="contrastive loss disabled"):
        contrastive = ProbabilisticContrastiveLoss()
    message = str(caught[0].message)
    assert all(path in message for path in searched)
    for loss in (perceptual, contrastive):
        assert not loss.enabled
        assert loss.features is None
        assert all(path in loss.disabled_reason for path in searched)
    assert perceptual(x, y).item() == 0.0
    assert contrastive(x, y, torch.full((2, 8, 8), 1 / 128)).item() == 0.0


def test_missing_configured_file_is_an_error_naming_it(tmp_path):
    path = tmp_path / "nowhere" / "vgg19.pth"
    with pytest.raises(FileNotFoundError, match=str(path)):
        PerceptualLoss(weights_path=path)


@pytest.mark.parametrize("name", ["broken.pth", "broken.safetensors"])
def test_corrupt_weights_file_is_an_error_naming_it(name, tmp_path):
    path = tmp_path / name
    path.write_bytes(b"\x00\x01 this is not a checkpoint")
    with pytest.raises(ValueError, match=f"{path}.*could not be read"):
        read_vgg_weights(path)


def test_mismatching_weights_files_are_errors_naming_them(tmp_path, feature_weights):
    wrong_shape = tmp_path / "vgg-wrong.pth"
    torch.save({**feature_weights, "features.0.weight": torch.zeros(32, 3, 3, 3)}, wrong_shape)
    with pytest.raises(ValueError, match=f"{wrong_shape}.*shapes do not match.*features.0.weight"):
        PerceptualLoss(weights_path=wrong_shape)
    other_model = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, other_model)
    with pytest.raises(ValueError, match=f"{other_model}.*missing 30 of the 30"):
        ProbabilisticContrastiveLoss(weights_path=other_model)


# ---------------------------------------------------------------------------------------------------
# PatchNCE and the probabilistic contrastive loss


def unit(v: list[float]) -> list[float]:
    norm = math.hypot(*v)
    return [c / norm for c in v]


def test_patch_nce_matches_the_formula_by_hand():
    query = [[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]
    keys = [[3.0, 0.0], [1.0, 1.0], [0.0, -1.0]]
    weights = [2.0, 1.0, 1.0]
    tau = 0.5
    q, k = [unit(v) for v in query], [unit(v) for v in keys]
    sim = [[(q[i][0] * k[j][0] + q[i][1] * k[j][1]) / tau for j in range(3)] for i in range(3)]
    terms = []
    for i in range(3):
        negatives = sum(math.exp(sim[i][j]) for j in range(3) if j != i) / 2  # L = P - 1 = 2
        terms.append(-math.log(math.exp(sim[i][i]) / (math.exp(sim[i][i]) + negatives)))
    expected = sum(w * t for w, t in zip(weights, terms, strict=True)) / sum(weights)

    got = patch_nce(torch.tensor([query]), torch.tensor([keys]), torch.tensor([weights]), tau)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_patch_nce_keeps_images_apart_and_handles_degenerate_weights():
    gen = torch.Generator().manual_seed(0)
    query, keys = torch.randn(2, 5, 4, generator=gen), torch.randn(2, 5, 4, generator=gen)
    weights = torch.rand(2, 5, generator=gen)
    per_image = [patch_nce(query[n : n + 1], keys[n : n + 1], weights[n : n + 1], 0.07) for n in range(2)]
    totals = weights.sum(dim=1)
    combined = (totals[0] * per_image[0] + totals[1] * per_image[1]) / totals.sum()
    torch.testing.assert_close(patch_nce(query, keys, weights, 0.07), combined)

    query.requires_grad_()
    zero = patch_nce(query, keys, torch.zeros(2, 5), 0.07)
    zero.backward()
    assert zero.item() == 0.0 and torch.isfinite(query.grad).all()
    assert patch_nce(query[:, :1], keys[:, :1], weights[:, :1], 0.07).item() == pytest.approx(0.0, abs=1e-6)


def test_pcl_end_to_end_with_regularized_vq_weights(features):
    torch.manual_seed(0)
    quantizer = RegularizedVQ(codebook_size=16, dim=4, mask_ratio=0.5).train()
    stats = quantizer(torch.randn(2, 4, 8, 8)).stats  # token grid of 32x32 images, downsample 4
    assert stats["pcl_weights"].shape == (2, 8, 8) and stats["pcl_weights"].sum() > 0
    loss = ProbabilisticContrastiveLoss(features=features, num_patches=64)
    x = images(6, (2, 1, 32, 32))
    reconstruction = (x + 0.3 * images(7, (2, 1, 32, 32))).clamp(-1, 1).requires_grad_()
    value = loss(x, reconstruction, stats["pcl_weights"])
    assert value.ndim == 0 and torch.isfinite(value) and value.item() > 0
    value.backward()
    assert torch.isfinite(reconstruction.grad).all() and reconstruction.grad.abs().sum() > 0

    quantizer.eval()
    eval_weights = quantizer(torch.randn(2, 4, 8, 8)).stats["pcl_weights"]
    assert eval_weights.sum() == 0
    assert loss(x, reconstruction, eval_weights).item() == 0.0
    with pytest.raises(ValueError, match="weights: expected shape"):
        loss(x, reconstruction, eval_weights[0])


# ---------------------------------------------------------------------------------------------------
# Adversarial


def test_hinge_and_generator_losses_on_known_logits():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.5])
    # relu(1 - real) = [0, 0.5, 2], relu(1 + fake) = [0, 1, 2.5]
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 3.5 / 3))
    assert generator_adversarial_loss(fake).item() == pytest.approx(-(-2.0 + 0.0 + 1.5) / 3)


def test_adaptive_gan_weight_is_the_ratio_of_gradient_norms():
    torch.manual_seed(0)
    decoder = nn.Linear(3, 2)
    x, target, critic = torch.randn(4, 3), torch.randn(4, 2), torch.randn(4, 2)
    out = decoder(x)
    recon_loss = (out - target).pow(2).mean()
    g_loss = -(out * critic).mean()
    weight = adaptive_gan_weight(recon_loss, g_loss, decoder.weight)
    with torch.no_grad():
        recon_grad = 2 / out.numel() * (out - target).t() @ x  # d mean((Wx + b - t)^2) / dW
        g_grad = -1 / out.numel() * critic.t() @ x
        expected = recon_grad.norm() / (g_grad.norm() + 1e-4)
    assert not weight.requires_grad
    assert weight.item() == pytest.approx(expected.item(), rel=1e-5)
    clamped = adaptive_gan_weight(recon_loss, g_loss, decoder.weight, max_weight=1e-3)
    assert clamped.item() == pytest.approx(1e-3)
    (recon_loss + weight * g_loss).backward()  # the graphs survive for the real backward pass


def test_gan_factor_starts_at_the_start_step():
    assert gan_factor(0, 100) == 0.0
    assert gan_factor(99, 100) == 0.0
    assert gan_factor(100, 100) == 1.0
    assert gan_factor(500, 100, factor=0.5) == 0.5


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("norm_layer", [nn.BatchNorm2d, nn.GroupNorm])
def test_discriminator_output_shape(channels, norm_layer):
    disc = PatchDiscriminator(in_channels=channels, base_channels=16, n_layers=3, norm_layer=norm_layer)
    logits = disc(images(8, (2, channels, 32, 32)))
    # 32 -> 16 -> 8 -> 4 (stride 2), -> 3 (stride 1), -> 2 (final conv)
    assert logits.shape == (2, 1, 2, 2) and torch.isfinite(logits).all()
    assert any(isinstance(m, norm_layer) for m in disc.modules())


def test_patch_logits_size_is_the_discriminators_output_size_and_below_one_where_it_cannot_run():
    for n_layers in range(1, 5):
        discriminator = PatchDiscriminator(in_channels=1, base_channels=4, n_layers=n_layers).eval()
        for size in range(2, 50):
            expected = patch_logits_size(size, n_layers)
            if expected >= 1:
                assert discriminator(torch.zeros(2, 1, size, size)).shape[-2:] == (expected, expected)
            else:
                with pytest.raises(RuntimeError):
                    discriminator(torch.zeros(2, 1, size, size))
