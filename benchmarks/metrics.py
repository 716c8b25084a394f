"""What SSIM costs evaluation and validation: ours against torchmetrics', side by side in one run.

    python -m benchmarks.metrics                      # CPU: Fashion-MNIST and 256x256 RGB batches
    python -m benchmarks.metrics --device cuda --batch-size 256

For each image shape, on the same pairs of [-1, 1] images (a noisy copy against the original):
- **ours** (``imtok.metrics.recon.ssim``: the separable 11x11 Gaussian as shifted weighted sums on
  each channel minus its mean) and **peer** (torchmetrics' ``structural_similarity_index_measure``,
  a depthwise 11x11 convolution), median wall-clock ms; ratio = peer / ours, > 1 means ours is faster;
- peak memory above the inputs for each, on CUDA only (a CPU process's peak RSS cannot be reset
  between the two);
- the largest difference of either from torchmetrics run in float64, the reference.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import machine_description, time_call
from imtok.metrics.recon import ssim

SHAPES = ("1x28x28", "3x64x64", "3x256x256")  # (C, H, W): the demo's images, small and ImageNet-sized RGB


def parse_shape(text: str) -> tuple[int, int, int]:
    """``CxHxW`` -> (C, H, W)."""
    try:
        channels, height, width = (int(part) for part in text.split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected CxHxW, such as 3x256x256") from None
    return channels, height, width


def peer_ssim(images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """torchmetrics' Gaussian SSIM per image, on the [0, 1] range ours uses internally."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    return structural_similarity_index_measure(
        (reconstructions + 1) / 2, (images + 1) / 2, data_range=1.0, reduction="none"
    )


def peak_mib(fn, device: torch.device) -> str:
    """Peak CUDA memory above what was allocated before ``fn()``, in MiB ('-' on a CPU)."""
    if device.type != "cuda":
        return "-"
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return f"{(torch.cuda.max_memory_allocated(device) - before) / 2**20:,.0f}"


def row(shape: tuple[int, int, int], args: argparse.Namespace, device: torch.device) -> str:
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(args.batch_size, *shape, generator=generator) * 2 - 1
    noisy = (images + 0.1 * torch.randn(images.shape, generator=generator)).clamp(-1, 1)
    reference = peer_ssim(images.double(), noisy.double()).float()
    images, noisy = images.to(device), noisy.to(device)
    with torch.no_grad():
        ours_s = time_call(lambda: ssim(images, noisy), device, repeats=args.repeats)
        peer_s = time_call(lambda: peer_ssim(images, noisy), device, repeats=args.repeats)
        ours_mib = peak_mib(lambda: ssim(images, noisy), device)
        peer_mib = peak_mib(lambda: peer_ssim(images, noisy), device)
        ours_err = (ssim(images, noisy).cpu() - reference).abs().max()
        peer_err = (peer_ssim(images, noisy).cpu() - reference).abs().max()
    cells = [
        f"{args.batch_size}",
        f"{ours_s * 1e3:.2f}",
        f"{peer_s * 1e3:.2f}",
        f"{peer_s / ours_s:.2f}x",
        ours_mib,
        peer_mib,
        f"{ours_err:.1e}",
        f"{peer_err:.1e}",
    ]
    return f"| {'x'.join(map(str, shape))} | " + " | ".join(cells) + " |"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shapes", type=parse_shape, nargs="+", default=[parse_shape(s) for s in SHAPES])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        # The peer's window is a cuDNN convolution, which PyTorch lets run in TF32 by default; both
        # sides in full float32, so "max diff" measures the methods, not that default.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    print(f"- machine: {machine_description(device)}")
    from importlib.metadata import version

    peer = f"torchmetrics {version('torchmetrics')}"
    print(f"- SSIM, 11x11 Gaussian window (sigma 1.5), per image; peer: {peer}")
    print()
    print(
        "| image (CxHxW) | batch | ours ms | peer ms | peer / ours | ours peak MiB | peer peak MiB "
        "| ours max diff | peer max diff |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for shape in args.shapes:
        print(row(shape, args, device), flush=True)


if __name__ == "__main__":
    main()
