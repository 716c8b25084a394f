"""Timing and machine-description helpers shared by the benchmarks."""

import argparse
import datetime
import functools
import math
import os
import platform
import shutil
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so wall-clock timings cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


BURST_S = 2e-3
"""Least seconds one timed sample lasts on a GPU: a burst of calls between two synchronisations."""

MAX_BURST = 1000


def burst_size(single_s: float, burst: bool) -> int:
    """Calls per timed sample: enough to last ``BURST_S`` when ``burst`` (at most ``MAX_BURST``), else 1."""
    if not burst:
        return 1
    return max(1, min(MAX_BURST, math.ceil(BURST_S / max(single_s, 1e-9))))


def time_call(
    fn: Callable[[], object],
    device: torch.device,
    *,
    warmup: int = 2,
    repeats: int = 5,
    burst: bool | None = None,
) -> float:
    """Median wall-clock seconds per ``fn()`` over ``repeats`` samples after ``warmup`` calls.

    ``burst`` (default: on a GPU) times each sample as a burst of calls lasting at least ``BURST_S``
    between two synchronisations, divided by the count: launches then overlap the device's work as
    in a training loop, where a synchronisation after every call would add a host round trip to
    each, comparable to the memory floor of a kernel of tens of microseconds. On a CPU calls run
    synchronously, one per sample.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    if burst is None:
        burst = device.type == "cuda"
    calls = 1
    if burst:  # sized from the median of three single calls, so one slow call does not shrink it
        singles = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            synchronize(device)
            singles.append(time.perf_counter() - start)
        calls = burst_size(statistics.median(singles), burst)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        synchronize(device)
        samples.append((time.perf_counter() - start) / calls)
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


def usable_cpus() -> int:
    """The CPUs this process may run on (a container's share, not the host's count where known)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def write_synthetic_shards(
    directory: Path, count: int, image_size: int, channels: int, shards: int = 8
) -> Path:
    """``count`` seeded synthetic images as a train split of ``shards`` shards (the last may be short).

    Every core this process may run on but one loads and PNG-encodes (the one left writes the tars).
    """
    import math

    from imtok.data.shards import write_split
    from imtok.data.sources import SyntheticShapes

    # The source holds back a 10% val split, so it gets a little more than ``count`` in all.
    source = SyntheticShapes(count=math.ceil(count / 0.9) + 1, image_size=image_size, channels=channels)
    workers = max(1, usable_cpus() - 1)
    write_split(source, "train", directory, maxcount=math.ceil(count / shards), limit=count, workers=workers)
    return directory


def copy_bandwidth(device: torch.device, megabytes: int = 512) -> float:
    """Measured device copy bandwidth in bytes/s (read + write of one buffer)."""
    source = torch.empty(megabytes * 2**20 // 4, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    seconds = time_call(lambda: target.copy_(source), device, warmup=3, repeats=10)
    return 2 * source.numel() * 4 / seconds


def fast_path_report() -> str:
    """One line saying whether any default fast path (fused FSQ, fused search) fell back in this run.

    A default fast path that fails is replaced by the reference path for the rest of the process
    with one warning; printed under each table, this keeps a fallback from passing for the fast path.
    """
    from imtok.quantizers.common import FAST_PATH_FAILURES

    if not FAST_PATH_FAILURES:
        return "- fast paths: none fell back to the reference path in this run"
    failures = "; ".join(f"{name}: {error}" for name, error in sorted(FAST_PATH_FAILURES.items()))
    return f"- fast paths that FELL BACK to the reference path in this run: {failures}"


def parse_nvidia_smi_utilisation(text: str) -> float:
    """The percentage in ``nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits`` output."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) != 1:
        raise ValueError(f"nvidia-smi: expected one utilisation line for one GPU, got {lines!r}")
    value = float(lines[0])
    if not 0.0 <= value <= 100.0:
        raise ValueError(f"nvidia-smi: expected a percentage in [0, 100], got {value}")
    return value


@functools.cache
def utilisation_reader(device: torch.device) -> tuple[Callable[[], float], str] | None:
    """A function returning the GPU's current utilisation in percent, and the source it reads, or None
    (probed once per device and process).

    NVML through torch (needs the ``nvidia-ml-py`` package) where it answers, else the ``nvidia-smi``
    command line; None on a CPU or when neither is there. NVML's figure is the share of the last
    sample period (1/6 s to 1 s) in which at least one kernel ran on the GPU.
    """
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        torch.cuda.utilization(index)
        return (lambda: float(torch.cuda.utilization(index))), "NVML"
    except Exception:  # no pynvml: fall back to the command line tool
        pass
    executable = shutil.which("nvidia-smi")
    if executable is None:
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    # nvidia-smi numbers GPUs physically; torch counts only the visible ones (indices or UUIDs).
    physical = visible.split(",")[index].strip() if visible else str(index)
    command = [executable, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", physical]

    def read() -> float:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=True)
        return parse_nvidia_smi_utilisation(done.stdout)

    try:
        read()
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return read, "nvidia-smi"


class UtilisationSampler:
    """Samples GPU utilisation in a background thread while inside ``with sampler:`` (re-enterable).

    Sampling off the timed thread keeps the query (an NVML call or an ``nvidia-smi`` process) out of
    the loop being timed. ``mean`` is the average over every sample of every window, None without
    samples (a CPU device, no NVML and no ``nvidia-smi``, or windows shorter than one interval).
    """

    def __init__(self, device: torch.device, interval_s: float = 0.2) -> None:
        found = utilisation_reader(device)
        self.read, self.source = found if found is not None else (None, None)
        self.interval_s = interval_s
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.samples.append(self.read())
            except Exception:  # a query that failed once is a missing sample, not a failed benchmark
                continue

    def __enter__(self) -> "UtilisationSampler":
        if self.read is not None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, name="gpu-utilisation", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=30)
            self._thread = None

    @property
    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


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
