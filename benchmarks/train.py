"""Tokenizer training throughput: imtok's training step beside the same step with the peer's FSQ.

    python -m benchmarks.train                                   # CPU, the demo size (32x32 gray)
    python -m benchmarks.train --device cuda --image-size 256 --channels 3 --base-channels 128 \
        --multipliers 1 1 2 2 4 --batch-size 32 --precision bf16 --channels-last

One run measures, on the same machine and inputs:
- the full training step (forward, L1 + quantizer loss, backward, AdamW, weight EMA) of the imtok
  tokenizer with our FSQ, images/s and peak GPU memory (the two models are timed in alternating rounds,
  the median round reported, so warm-up and drift of a shared machine hit both alike);
- the very same step with vector-quantize-pytorch's FSQ (same levels) in place of ours: the ratio
  says what the quantizer choice costs inside a real model;
- the shard loader alone over synthetic shards of the same size (``ShardLoader``, the loader the stage
  uses): it must deliver well above the training rate, so that data is never the bottleneck;
- on CUDA, model FLOPs utilisation (FLOPs of one step counted by ``torch.utils.flop_counter`` over
  the step time, against ``--peak-tflops``) and the GPU utilisation, sampled in a background thread
  from NVML or ``nvidia-smi`` while the timed rounds run.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from benchmarks.common import (
    UtilisationSampler,
    add_tokenizer_arguments,
    fast_path_report,
    machine_description,
    synchronize,
    tokenizer_config,
    write_synthetic_shards,
)
from imtok.data.shards import ShardLoader
from imtok.models.autoencoder import Tokenizer
from imtok.quantizers import QuantizerOutput
from imtok.quantizers.common import codebook_stats
from imtok.training import ModelEma


class PeerFSQ(nn.Module):
    """vector-quantize-pytorch's FSQ behind imtok's quantizer interface (same levels)."""

    def __init__(self, levels: tuple[int, ...]) -> None:
        super().__init__()
        from vector_quantize_pytorch import FSQ as LucidrainsFSQ

        self.inner = LucidrainsFSQ(levels=list(levels))
        self.dim = len(levels)
        self.codebook_size = self.inner.codebook_size

    def forward(self, z: Tensor) -> QuantizerOutput:
        codes, indices = self.inner(z)
        return QuantizerOutput(codes, indices, z.new_zeros(()), codebook_stats(indices, self.codebook_size))


def build(args: argparse.Namespace, device: torch.device, peer: bool) -> Tokenizer:
    torch.manual_seed(0)
    model = Tokenizer(tokenizer_config(args))
    if peer:
        model.quantizer = PeerFSQ(model.quantizer.levels)
    model = model.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def training_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, ema: ModelEma, images: Tensor, dtype
) -> None:
    autocast = torch.autocast(images.device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    with autocast:
        reconstruction, quantized = model(images)
        loss = (reconstruction.float() - images).abs().mean() + quantized.loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    ema.update(model)


def step_flops(model: nn.Module, images: Tensor, dtype) -> float:
    """FLOPs of one forward + backward, counted on the real graph."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    autocast = torch.autocast(images.device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    with counter, autocast:
        reconstruction, quantized = model(images)
        ((reconstruction.float() - images).abs().mean() + quantized.loss).backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


class TrainingRun:
    """One model's training step on a fixed device-resident batch, ready to be timed."""

    def __init__(self, args: argparse.Namespace, device: torch.device, peer: bool) -> None:
        self.model = build(args, device, peer)
        self.step_model = torch.compile(self.model) if args.compile else self.model
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.ema = ModelEma(self.model, 0.999)
        self.dtype = torch.bfloat16 if args.precision == "bf16" else None
        shape = (args.batch_size, args.channels, args.image_size, args.image_size)
        self.images = torch.rand(shape, device=device) * 2 - 1
        if args.channels_last:
            self.images = self.images.contiguous(memory_format=torch.channels_last)
        self.device = device

    def step(self) -> None:
        training_step(self.step_model, self.optimizer, self.ema, self.images, self.dtype)

    def resident_bytes(self) -> int:
        """Bytes this run holds between steps: weights, buffers, gradients, optimizer state, the EMA
        copy and the batch (each storage once)."""
        tensors = [*self.model.parameters(), *self.model.buffers(), *self.ema.shadow.values(), self.images]
        tensors += [p.grad for p in self.model.parameters() if p.grad is not None]
        states = self.optimizer.state.values()
        tensors += [value for state in states for value in state.values() if torch.is_tensor(value)]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        return sum(storages.values())


def measure_training(args: argparse.Namespace, device: torch.device) -> dict[str, dict[str, float]]:
    """Ours and the peer's step, timed in alternating rounds so drift and warm-up hit both alike."""
    runs = {"ours": TrainingRun(args, device, peer=False), "peer": TrainingRun(args, device, peer=True)}
    results: dict[str, dict[str, float]] = {}
    for name, run in runs.items():
        for _ in range(args.warmup):  # compilation, cuDNN autotuning, allocator growth
            run.step()
        synchronize(device)
        results[name] = {}
        if device.type == "cuda":  # on a CPU the only peak is the process's, shared by both models
            # The other model is resident too, with more or less state depending on the order: count
            # this run's own state plus its step's rise above what was allocated before it.
            before, resident = torch.cuda.memory_allocated(device), run.resident_bytes()
            torch.cuda.reset_peak_memory_stats(device)
            run.step()
            synchronize(device)
            rise = torch.cuda.max_memory_allocated(device) - before
            results[name]["peak_mib"] = (resident + rise) / 2**20
    per_round = max(1, args.steps // args.rounds)
    samples: dict[str, list[float]] = {name: [] for name in runs}
    utilisation = {name: UtilisationSampler(device) for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            with utilisation[name]:
                started = time.perf_counter()
                for _ in range(per_round):
                    run.step()
                synchronize(device)
                samples[name].append((time.perf_counter() - started) / per_round)
    for name, run in runs.items():
        seconds = statistics.median(samples[name])
        results[name].update(images_per_s=args.batch_size / seconds, step_ms=1000 * seconds)
        if device.type == "cuda":
            flops = step_flops(run.model, run.images, run.dtype)
            results[name]["mfu_pct"] = 100 * flops / seconds / (args.peak_tflops * 1e12)
        if utilisation[name].mean is not None:
            results[name]["gpu_util_pct"] = utilisation[name].mean
    return results


def measure_loader(args: argparse.Namespace) -> float:
    """Images/s of ``ShardLoader`` over synthetic shards at the benchmark size (decode + collate)."""
    count = max(args.loader_images, args.batch_size * 4)
    with tempfile.TemporaryDirectory(prefix="imtok-bench-") as tmp:
        write_synthetic_shards(Path(tmp), count, args.image_size, args.channels)
        loader = ShardLoader(Path(tmp), args.batch_size, num_workers=args.workers, seed=0)
        for _ in loader:  # warm-up pass: page cache and worker start
            pass
        started, seen = time.perf_counter(), 0
        for batch in loader:
            seen += batch.images.shape[0]
        return seen / (time.perf_counter() - started)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_tokenizer_arguments(parser, image_size=32, base_channels=32, batch_size=64)
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each model")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds the steps are split into")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workers", type=int, default=0, help="loader worker processes")
    parser.add_argument("--loader-images", type=int, default=4096)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    # What is known before measuring goes out first (flushed), so a run stopped by a time limit
    # still leaves its description and every row finished by then.
    print(f"- machine: {machine_description(device)}", flush=True)
    print(
        f"- tokenizer: {args.image_size}x{args.image_size}x{args.channels}, base {args.base_channels}, "
        f"multipliers {args.multipliers}, FSQ {args.codebook_size}, batch {args.batch_size}, {args.precision}"
        f"{', channels_last' if args.channels_last else ''}{', compiled' if args.compile else ''}; "
        f"{args.steps} timed steps after {args.warmup} in {args.rounds} alternating rounds (median); "
        f"loader workers {args.workers}"
    )
    if device.type == "cuda":
        source = UtilisationSampler(device).source or "not available (no NVML, no nvidia-smi)"
        print(f"- MFU against {args.peak_tflops:g} TFLOP/s; GPU utilisation sampled from {source}")
    print(flush=True)
    measured = measure_training(args, device)
    ours, peer = measured["ours"], measured["peer"]
    print("| step with | images/s | ms/step | peak MiB (as if alone) | MFU % | GPU util % |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, result in (("imtok FSQ", ours), ("vector-quantize-pytorch FSQ", peer)):
        mfu = f"{result['mfu_pct']:.1f}" if "mfu_pct" in result else "-"
        util = f"{result['gpu_util_pct']:.0f}" if "gpu_util_pct" in result else "-"
        peak = f"{result['peak_mib']:,.0f}" if "peak_mib" in result else "-"
        print(
            f"| {name} | {result['images_per_s']:,.0f} | {result['step_ms']:.1f} | {peak} | {mfu} | {util} |"
        )
    print()
    print(f"ours/peer throughput ratio: **{ours['images_per_s'] / peer['images_per_s']:.2f}**", flush=True)
    loader = measure_loader(args)
    print(
        f"loader alone: **{loader:,.0f} images/s** = {loader / ours['images_per_s']:.1f}x the training rate"
    )
    print(fast_path_report())


if __name__ == "__main__":
    main()
