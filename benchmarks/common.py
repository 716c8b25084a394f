"""Timing and machine-description helpers shared by the benchmarks."""

import argparse
import datetime
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so wall-clock timings cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, *, warmup: int = 2, repeats: int = 5) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def add_tokenizer_arguments(
    parser: argparse.ArgumentParser, *, image_size: int, base_channels: int, batch_size: int
) -> None:
    """The options the tokenizer benchmarks share: model shape, batch, numerics, device, MFU peak."""
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--image-size", type=int, default=image_size)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--base-channels", type=int, default=base_channels)
    parser.add_argument("--multipliers", type=int, nargs="+", default=[1, 2, 2])
    parser.add_argument("--res-blocks", type=int, default=1)
    parser.add_argument("--mid-attention", action="store_true")
    parser.add_argument("--codebook-size", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")


def tokenizer_config(args: argparse.Namespace, quantizer: str = "fsq") -> Any:
    """The ``TokenizerConfig`` the options of ``add_tokenizer_arguments`` describe."""
    from imtok.models.autoencoder import TokenizerConfig

    return TokenizerConfig(
        in_channels=args.channels,
        image_size=args.image_size,
        base_channels=args.base_channels,
        channel_multipliers=tuple(args.multipliers),
        num_res_blocks=args.res_blocks,
        mid_attention=args.mid_attention,
        quantizer=quantizer,
        codebook_size=args.codebook_size,
    )


def write_synthetic_shards(
    directory: Path, count: int, image_size: int, channels: int, shards: int = 8
) -> Path:
    """``count`` seeded synthetic images as a train split of ``shards`` shards (the last may be short)."""
    import math

    from imtok.data.shards import write_split
    from imtok.data.sources import SyntheticShapes

    # The source holds back a 10% val split, so it gets a little more than ``count`` in all.
    source = SyntheticShapes(count=math.ceil(count / 0.9) + 1, image_size=image_size, channels=channels)
    write_split(source, "train", directory, maxcount=math.ceil(count / shards), limit=count)
    return directory


def copy_bandwidth(device: torch.device, megabytes: int = 512) -> float:
    """Measured device copy bandwidth in bytes/s (read + write of one buffer)."""
    source = torch.empty(megabytes * 2**20 // 4, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    seconds = time_call(lambda: target.copy_(source), device, warmup=3, repeats=10)
    return 2 * source.numel() * 4 / seconds


def machine_description(device: torch.device) -> str:
    """One line naming the hardware, software versions and date of a benchmark run."""
    if device.type == "cuda":
        hardware = torch.cuda.get_device_name(device)
    else:
        hardware = f"{_cpu_model()} ({torch.get_num_threads()} threads)"
    today = datetime.date.today().isoformat()
    return (
        f"{hardware}; Python {platform.python_version()}; torch {torch.__version__}; "
        f"{_peer_version()}; {today}"
    )


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _peer_version() -> str:
    try:
        from importlib.metadata import version

        return f"vector-quantize-pytorch {version('vector-quantize-pytorch')}"
    except Exception:
        return "vector-quantize-pytorch not installed"
