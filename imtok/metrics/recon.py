"""Reconstruction quality: PSNR and SSIM of images in [-1, 1], per image and averaged.

Images follow the pipeline's convention, float (B, C, H, W) in [-1, 1], so the data range is 2:
PSNR = 10 log10(2^2 / MSE), which equals the PSNR of the same images mapped to [0, 1] with range 1.
SSIM (Wang et al. 2004) is the Gaussian-window SSIM (11x11, sigma 1.5, K1 0.01, K2 0.03) of the
images mapped to [0, 1] with ``data_range=1``, averaged over one window per pixel (the borders
reflect-padded). It gives torchmetrics' ``structural_similarity_index_measure`` (the tests compare
the two) without its import, which pulls in torchvision's models, torch._dynamo and scipy.signal
(about 5 s of start-up for every stage that validates). The mapping matters: SSIM's luminance term
2 mu_x mu_y / (mu_x^2 + mu_y^2) depends on the absolute means, so SSIM is not shift invariant, and
[-1, 1] values with range 2 would give other numbers than every published SSIM. Both metrics are
computed per image and the reported value is the mean over images (not the PSNR of the pooled MSE),
as tokenizer papers report them. Values are not clamped: pass images already clipped to [-1, 1] (as
they would be saved) when the decoder can overshoot.
"""

from __future__ import annotations

import torch
from torch import Tensor

DATA_RANGE = 2.0  # images live in [-1, 1]
SSIM_KERNEL_SIZE = 11  # the window of Wang et al.; images must be at least this large
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _check_pair(images: Tensor, reconstructions: Tensor) -> None:
    """Raise a ValueError naming the argument unless both are float (B, C, H, W) of one shape."""
    if images.ndim != 4:
        raise ValueError(f"images: expected shape (B, C, H, W), got {tuple(images.shape)}")
    if reconstructions.shape != images.shape:
        raise ValueError(
            f"reconstructions: shape {tuple(reconstructions.shape)} differs from the images' "
            f"{tuple(images.shape)}"
        )
    if not (images.is_floating_point() and reconstructions.is_floating_point()):
        raise ValueError(
            f"images, reconstructions: expected float tensors in [-1, 1], got {images.dtype} and "
            f"{reconstructions.dtype}"
        )
    if images.shape[0] == 0:
        raise ValueError("images: empty batch")


def psnr(images: Tensor, reconstructions: Tensor) -> Tensor:
    """Per-image PSNR in dB (B,) of [-1, 1] images; +inf where an image is reproduced exactly."""
    _check_pair(images, reconstructions)
    mse = (images.double() - reconstructions.double()).pow(2).mean(dim=(1, 2, 3))  # (B,)
    return (10.0 * torch.log10(DATA_RANGE**2 / mse)).float()


def ssim(images: Tensor, reconstructions: Tensor) -> Tensor:
    """Per-image SSIM (B,) of [-1, 1] images, computed in [0, 1]; 1 for identical images."""
    _check_pair(images, reconstructions)
    if min(images.shape[-2:]) < SSIM_KERNEL_SIZE:
        raise ValueError(
            f"images: SSIM's {SSIM_KERNEL_SIZE}x{SSIM_KERNEL_SIZE} window needs H, W >= "
            f"{SSIM_KERNEL_SIZE}, got {tuple(images.shape[-2:])}"
        )
    return _gaussian_ssim((reconstructions.float() + 1) / 2, (images.float() + 1) / 2, data_range=1.0)


def _gaussian_window(channels: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The normalised 11x11 Gaussian window (sigma 1.5) as a depthwise conv weight (C, 1, 11, 11)."""
    offsets = torch.arange(SSIM_KERNEL_SIZE, dtype=dtype, device=device) - (SSIM_KERNEL_SIZE - 1) / 2
    line = torch.exp(-0.5 * (offsets / SSIM_SIGMA) ** 2)
    line = line / line.sum()
    return torch.outer(line, line).expand(channels, 1, SSIM_KERNEL_SIZE, SSIM_KERNEL_SIZE)


def _gaussian_ssim(x: Tensor, y: Tensor, data_range: float) -> Tensor:
    """Mean SSIM map (B,) of x and y, one window centred on every pixel (borders reflect-padded).

    Local means, variances and the covariance are Gaussian-weighted; variances are clamped at 0
    against cancellation; the map is averaged over channels and positions, as torchmetrics does.
    """
    channels, pad = x.shape[1], (SSIM_KERNEL_SIZE - 1) // 2
    window = _gaussian_window(channels, x.dtype, x.device)
    x = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="reflect")
    y = torch.nn.functional.pad(y, (pad, pad, pad, pad), mode="reflect")
    moments = torch.nn.functional.conv2d(torch.cat([x, y, x * x, y * y, x * y]), window, groups=channels)
    mu_x, mu_y, xx, yy, xy = moments.split(x.shape[0])
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    var_x = (xx - mu_x * mu_x).clamp(min=0)
    var_y = (yy - mu_y * mu_y).clamp(min=0)
    cov = xy - mu_x * mu_y
    luminance = (2 * mu_x * mu_y + c1) / (mu_x * mu_x + mu_y * mu_y + c1)
    structure = (2 * cov + c2) / (var_x + var_y + c2)
    return (luminance * structure).flatten(1).mean(1)


def reconstruction_metrics(images: Tensor, reconstructions: Tensor) -> dict[str, float]:
    """Mean PSNR (dB) and SSIM over the batch: ``{"psnr": ..., "ssim": ...}``."""
    return {
        "psnr": float(psnr(images, reconstructions).mean()),
        "ssim": float(ssim(images, reconstructions).mean()),
    }
