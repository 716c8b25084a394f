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
# PSNR of an image reproduced exactly is +inf; capped so that means over a set stay finite.
MAX_PSNR_DB = 100.0


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


def _gaussian_taps() -> list[float]:
    """The normalised 11-tap Gaussian (sigma 1.5) whose outer product with itself is SSIM's window."""
    offsets = torch.arange(SSIM_KERNEL_SIZE, dtype=torch.float64) - (SSIM_KERNEL_SIZE - 1) / 2
    line = torch.exp(-0.5 * (offsets / SSIM_SIGMA) ** 2)
    return (line / line.sum()).tolist()


def _gaussian_blur(x: Tensor) -> Tensor:
    """The 11x11 Gaussian window at every valid position of x (B, C, H, W): (B, C, H - 10, W - 10).

    The window is separable, so it is a pass of 11 shifted, weighted sums along W and one along H:
    22 multiply-adds a pixel instead of 121, in place on one buffer a pass. On 2 CPU cores this is
    about 4x faster than a depthwise 11x11 ``conv2d``, whose workspace is about ten times its input
    (2.7 GB for 320 RGB images of 256x256, against 0.5 GB here).
    """
    taps = _gaussian_taps()
    height, width = x.shape[-2] - SSIM_KERNEL_SIZE + 1, x.shape[-1] - SSIM_KERNEL_SIZE + 1
    rows = x[..., :, :width] * taps[0]
    for shift, tap in enumerate(taps[1:], start=1):
        rows.add_(x[..., :, shift : shift + width], alpha=tap)
    blurred = rows[..., :height, :] * taps[0]
    for shift, tap in enumerate(taps[1:], start=1):
        blurred.add_(rows[..., shift : shift + height, :], alpha=tap)
    return blurred


def _gaussian_ssim(x: Tensor, y: Tensor, data_range: float) -> Tensor:
    """Mean SSIM map (B,) of x and y, one window centred on every pixel (borders reflect-padded).

    Local means, variances and the covariance are Gaussian-weighted; the map is averaged over channels
    and positions, as torchmetrics does. The second moments are taken of each image channel minus its
    mean (which leaves variances and covariance unchanged, the window summing to 1), so E[x^2] - E[x]^2
    cancels far less: a flat image has exactly zero variance; variances are still clamped at 0.
    """
    pad = (SSIM_KERNEL_SIZE - 1) // 2
    x = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="reflect")
    y = torch.nn.functional.pad(y, (pad, pad, pad, pad), mode="reflect")
    mean_x, mean_y = x.mean(dim=(2, 3), keepdim=True), y.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
    x, y = x - mean_x, y - mean_y
    moments = _gaussian_blur(torch.cat([x, y, x * x, y * y, x * y]))
    mu_x, mu_y, xx, yy, xy = moments.split(x.shape[0])
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    var_x = (xx - mu_x * mu_x).clamp(min=0)
    var_y = (yy - mu_y * mu_y).clamp(min=0)
    cov = xy - mu_x * mu_y
    mu_x, mu_y = mu_x + mean_x, mu_y + mean_y
    luminance = (2 * mu_x * mu_y + c1) / (mu_x * mu_x + mu_y * mu_y + c1)
    structure = (2 * cov + c2) / (var_x + var_y + c2)
    return (luminance * structure).flatten(1).mean(1)


def reconstruction_metrics(images: Tensor, reconstructions: Tensor) -> dict[str, float]:
    """Mean PSNR (dB) and SSIM over the batch: ``{"psnr": ..., "ssim": ...}``; each image's PSNR is
    capped at ``MAX_PSNR_DB`` as in ``ReconstructionTotals``, so an exact copy does not make it inf."""
    return {
        "psnr": float(psnr(images, reconstructions).clamp(max=MAX_PSNR_DB).mean()),
        "ssim": float(ssim(images, reconstructions).mean()),
    }


class ReconstructionTotals:
    """Per-image PSNR (capped at ``MAX_PSNR_DB``) and SSIM summed over batches in float64, for their
    means over a whole split; SSIM only for images at least its window's size."""

    def __init__(self) -> None:
        self.count = 0
        self.psnr_sum = 0.0
        self.ssim_sum: float | None = 0.0  # None: the images are smaller than SSIM's window

    def add(self, images: Tensor, reconstructions: Tensor) -> None:
        self.count += images.shape[0]
        self.psnr_sum += float(psnr(images, reconstructions).clamp(max=MAX_PSNR_DB).double().sum())
        if self.ssim_sum is not None and min(images.shape[-2:]) >= SSIM_KERNEL_SIZE:
            self.ssim_sum += float(ssim(images, reconstructions).double().sum())
        else:
            self.ssim_sum = None

    def metrics(self) -> dict[str, float]:
        """Mean PSNR, and mean SSIM where the images are at least SSIM's window (left out, not 0,
        for smaller ones)."""
        if self.count == 0:
            raise ValueError("no reconstructions were measured")
        means = {"psnr": self.psnr_sum / self.count}
        if self.ssim_sum is not None:
            means["ssim"] = self.ssim_sum / self.count
        return means
