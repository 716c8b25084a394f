"""PSNR and SSIM of [-1, 1] images: closed forms, identities, bad inputs."""

import math

import pytest
import torch

from imtok.metrics.recon import MAX_PSNR_DB, ReconstructionTotals, psnr, reconstruction_metrics, ssim


def images(batch: int = 3, channels: int = 1, size: int = 32) -> torch.Tensor:
    return torch.rand(batch, channels, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1


@pytest.mark.parametrize("offset", [0.01, 0.1, 0.5])
def test_psnr_of_a_constant_offset_is_the_closed_form(offset):
    x = images()
    # MSE = offset^2 and the data range of [-1, 1] is 2: PSNR = 10 log10(4 / offset^2)
    expected = 10 * math.log10(4 / offset**2)
    values = psnr(x, x + offset)
    assert values.shape == (3,)
    torch.testing.assert_close(values, torch.full((3,), expected), atol=1e-4, rtol=0)


def test_psnr_matches_the_zero_one_convention():
    x, y = images(), images().flip(0)
    mse01 = ((x - y) / 2).pow(2).mean(dim=(1, 2, 3))  # the same images mapped to [0, 1]
    torch.testing.assert_close(psnr(x, y), (10 * torch.log10(1 / mse01)).float(), atol=1e-4, rtol=0)


def test_psnr_per_image_and_identical_images():
    x = images(batch=2)
    y = x.clone()
    y[1] += 0.1
    values = psnr(x, y)
    assert math.isinf(values[0]) and values[0] > 0
    assert values[1] == pytest.approx(10 * math.log10(4 / 0.01), abs=1e-3)


@pytest.mark.parametrize("channels", [1, 3])
def test_ssim_of_identical_images_is_one(channels):
    x = images(channels=channels)
    torch.testing.assert_close(ssim(x, x), torch.ones(3), atol=1e-5, rtol=0)


def test_ssim_drops_with_noise_and_is_per_image():
    x = images(batch=2)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    y = x + noise * torch.tensor([0.05, 0.5]).view(2, 1, 1, 1)
    values = ssim(x, y)
    assert values.shape == (2,)
    assert 1.0 > values[0] > values[1]


def test_ssim_is_computed_in_the_zero_one_range():
    x, y = images(), images().flip(0)
    from torchmetrics.functional.image import structural_similarity_index_measure

    expected = structural_similarity_index_measure(
        (y.double() + 1) / 2, (x.double() + 1) / 2, data_range=1.0, reduction="none"
    )
    torch.testing.assert_close(ssim(x, y), expected.float(), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("channels", "height", "width", "noise"),
    [(1, 11, 11, 0.3), (1, 28, 28, 0.05), (3, 16, 40, 0.5), (3, 64, 64, 0.01), (1, 32, 32, 0.0)],
)
def test_ssim_matches_torchmetrics(channels, height, width, noise):
    """Parity with torchmetrics' Gaussian SSIM, computed in float64 as the reference, at the window's
    minimum size, colour, non-square images, and flat images (zero variance: there torchmetrics in
    float32 is off by 1.6e-4 from E[x^2] - E[x]^2 cancelling, while ours subtracts each image's mean
    first and stays within float32 rounding of the float64 value)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    generator = torch.Generator().manual_seed(channels * height + width)
    if noise == 0.0:  # flat images: a constant against another constant
        x = torch.full((2, channels, height, width), 0.2)
        y = torch.full((2, channels, height, width), -0.4)
    else:
        x = torch.rand(4, channels, height, width, generator=generator) * 2 - 1
        y = (x + noise * torch.randn(x.shape, generator=generator)).clamp(-1, 1)
    expected = structural_similarity_index_measure(
        (y.double() + 1) / 2, (x.double() + 1) / 2, data_range=1.0, reduction="none"
    )
    torch.testing.assert_close(ssim(x, y), expected.float(), atol=1e-5, rtol=0)


def test_reconstruction_metrics_are_means():
    x, y = images(), images().flip(0)
    metrics = reconstruction_metrics(x, y)
    assert metrics["psnr"] == pytest.approx(float(psnr(x, y).clamp(max=MAX_PSNR_DB).mean()))
    assert metrics["ssim"] == pytest.approx(float(ssim(x, y).mean()))
    # An exact copy in the batch: capped as the streaming totals cap it, not an infinite mean.
    y[0] = x[0]
    assert math.isfinite(reconstruction_metrics(x, y)["psnr"])
    totals = ReconstructionTotals()
    totals.add(x, y)
    assert reconstruction_metrics(x, y)["psnr"] == pytest.approx(totals.metrics()["psnr"])


def test_bad_inputs_raise():
    x = images()
    with pytest.raises(ValueError, match="reconstructions: shape"):
        psnr(x, x[:, :, :16])
    with pytest.raises(ValueError, match=r"images: expected shape \(B, C, H, W\)"):
        ssim(x[0], x[0])
    with pytest.raises(ValueError, match="float"):
        psnr(x, (x > 0).to(torch.uint8))
    with pytest.raises(ValueError, match="H, W >= 11"):
        ssim(x[..., :8, :8], x[..., :8, :8])
    with pytest.raises(ValueError, match="empty"):
        psnr(x[:0], x[:0])


def test_reconstruction_totals_give_the_means_of_the_whole_set_batch_by_batch():
    from imtok.metrics.recon import MAX_PSNR_DB, ReconstructionTotals

    generator = torch.Generator().manual_seed(3)
    images = torch.rand(10, 3, 16, 16, generator=generator) * 2 - 1
    noisy = (images + 0.1 * torch.randn(images.shape, generator=generator)).clamp(-1, 1)
    noisy[0] = images[0]  # an exact copy: +inf dB, capped
    totals = ReconstructionTotals()
    for start in (0, 4, 8):
        totals.add(images[start : start + 4], noisy[start : start + 4])
    means = totals.metrics()
    assert totals.count == 10
    assert means["psnr"] == pytest.approx(float(psnr(images, noisy).clamp(max=MAX_PSNR_DB).mean()), rel=1e-6)
    assert means["ssim"] == pytest.approx(float(ssim(images, noisy).mean()), rel=1e-6)
    small = ReconstructionTotals()
    small.add(images[:, :, :8, :8], noisy[:, :, :8, :8])  # under SSIM's 11x11 window: left out, not 0
    assert set(small.metrics()) == {"psnr"}
    with pytest.raises(ValueError, match="no reconstructions"):
        ReconstructionTotals().metrics()
