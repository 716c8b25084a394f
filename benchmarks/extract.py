"""Token extraction throughput: the shard reader alone, the encoder alone and the stage end to end.

    python -m benchmarks.extract                                 # CPU, the demo size (28x28 gray)
    python -m benchmarks.extract --device cuda --image-size 256 --channels 3 --base-channels 128 \
        --multipliers 1 1 2 2 4 --batch-size 128 --precision bf16 --channels-last --compile

One run measures, on the same synthetic shards and the same (randomly initialised) tokenizer:
- **reader**: ``iter_batches``, every image once in stored order (tar parsing, PNG decoding, collation),
  as the evaluation stage reads a split (extraction decodes the same samples one by one);
- **encode**: ``Tokenizer.encode`` on batches already on the device, with the chosen precision,
  memory format and compilation: the rate the model allows;
- **stage**: ``imtok.extraction.extract_shards``, what the extraction stage runs in each process
  (read and decode, move uint8 to the device, encode, copy the indices back, write one token shard
  per image shard) over the same shards with the same encoder as the encode row (compiled and
  channels_last when asked for), twice side by side: with no loader worker (reading and encoding
  take turns, as the stage did before it was parallel) and with ``--workers`` loader processes
  decoding while the model encodes.

``reader / encode`` must be well above 1 for the data never to be the bottleneck; ``stage / encode``
is the share of the model's rate the stage reaches (taking turns, it approaches
1 / (1 + encode / reader); with workers, min(1, workers x reader / encode) where cores allow). On
CUDA every model row also gives the model FLOPs utilisation (the encoder's FLOPs per image, counted
by ``torch.utils.flop_counter``, times the row's images/s, over ``--peak-tflops``) and the GPU
utilisation, sampled from NVML or ``nvidia-smi`` in a background thread while the row runs. A
randomly initialised tokenizer costs the same FLOPs as a trained one.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import (
    UtilisationSampler,
    add_tokenizer_arguments,
    fast_path_report,
    machine_description,
    synchronize,
    tokenizer_config,
    write_synthetic_shards,
)
from imtok.data.shards import iter_batches
from imtok.models.autoencoder import Tokenizer


def build_tokenizer(args: argparse.Namespace, device: torch.device) -> Tokenizer:
    torch.manual_seed(0)
    model = Tokenizer(tokenizer_config(args, args.quantizer)).to(device).eval()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def measure_reader(shards: Path, batch_size: int) -> float:
    """Images/s of ``iter_batches`` over the shards (a warm pass first: page cache)."""
    for _ in iter_batches(shards, batch_size):
        pass
    started, seen = time.perf_counter(), 0
    for batch in iter_batches(shards, batch_size):
        seen += batch.images.shape[0]
    return seen / (time.perf_counter() - started)


class Encoder:
    """The tokenizer's ``encode`` as the benchmark runs it: compiled and channels_last when asked for.

    ``extract_shards`` calls ``.encode`` only, so the stage rows run this very encoder too.
    """

    def __init__(self, model: Tokenizer, compile_: bool, channels_last: bool) -> None:
        self.run = torch.compile(model.encode) if compile_ else model.encode
        self.channels_last = channels_last
        self.config = model.config
        self.codebook_size = model.codebook_size

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.run(images)


def measure_encode(
    encoder: Encoder,
    args: argparse.Namespace,
    device: torch.device,
    dtype: torch.dtype | None,
) -> dict[str, float]:
    """Images/s of ``encode`` on device-resident batches, with the GPU utilisation on CUDA."""
    shape = (args.batch_size, args.channels, args.image_size, args.image_size)
    images = torch.rand(shape, device=device) * 2 - 1
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()

    def run() -> None:
        with torch.no_grad(), autocast:
            encoder.encode(images)

    for _ in range(args.warmup):
        run()
    synchronize(device)
    with UtilisationSampler(device) as utilisation:
        started = time.perf_counter()
        for _ in range(args.steps):
            run()
        synchronize(device)
        seconds = (time.perf_counter() - started) / args.steps
    return with_utilisation({"images_per_s": args.batch_size / seconds}, utilisation)


def encode_flops_per_image(model: Tokenizer, args: argparse.Namespace, device: torch.device, dtype) -> float:
    """FLOPs of encoding one image, counted by ``torch.utils.flop_counter`` on the eager model."""
    from torch.utils.flop_counter import FlopCounterMode

    images = torch.rand((args.batch_size, args.channels, args.image_size, args.image_size), device=device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad(), autocast:
        model.encode(images * 2 - 1)
    return counter.get_total_flops() / args.batch_size


def with_utilisation(result: dict[str, float], sampler: UtilisationSampler) -> dict[str, float]:
    if sampler.mean is not None:
        result["gpu_util_pct"] = sampler.mean
    return result


def measure_stage(
    encoder: Encoder,
    shards: Path,
    args: argparse.Namespace,
    device: torch.device,
    dtype: torch.dtype | None,
    workers: int,
) -> dict[str, float]:
    """Images/s of one process of the extraction stage over the shards (one warm pass first), with the
    GPU utilisation on CUDA."""
    from imtok.data.shards import read_meta
    from imtok.extraction import extract_shards, split_shards

    listed = split_shards(read_meta(shards), shards)
    grid = encoder.config.grid_of(args.image_size, args.image_size)

    def run() -> int:
        with tempfile.TemporaryDirectory(prefix="imtok-bench-tokens-") as out:
            results = extract_shards(
                encoder.encode,
                listed,
                Path(out),
                batch_size=args.batch_size,
                device=device,
                autocast_dtype=dtype,
                flip=False,
                num_workers=workers,
                codebook_size=encoder.codebook_size,
                grid=grid,
            )
        return sum(result.shard["count"] for result in results)

    run()
    synchronize(device)
    with UtilisationSampler(device) as utilisation:
        started = time.perf_counter()
        count = run()
        synchronize(device)
        seconds = time.perf_counter() - started
    return with_utilisation({"images_per_s": count / seconds}, utilisation)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_tokenizer_arguments(parser, image_size=28, base_channels=16, batch_size=256)
    parser.add_argument("--quantizer", default="fsq", choices=["fsq", "vq", "regvq"])
    parser.add_argument("--images", type=int, default=4096, help="synthetic images in the shards")
    parser.add_argument("--steps", type=int, default=10, help="timed encode batches")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--shards", type=int, default=16, help="image shards the synthetic images fill")
    parser.add_argument("--workers", type=int, default=2, help="loader processes of the parallel stage row")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.precision == "bf16" else None
    model = build_tokenizer(args, device)
    # The description goes out before measuring (flushed), so a run stopped by a time limit still
    # says what it was measuring.
    print(f"- machine: {machine_description(device)}")
    print(
        f"- tokenizer encoder: {args.image_size}x{args.image_size}x{args.channels}, "
        f"base {args.base_channels}, multipliers {args.multipliers}, {args.quantizer} {args.codebook_size}, "
        f"batch {args.batch_size}, "
        f"{args.precision}{', channels_last' if args.channels_last else ''}"
        f"{', compiled' if args.compile else ''}; {args.images:,} synthetic images in {args.shards} shards",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="imtok-bench-") as tmp:
        shards = write_synthetic_shards(Path(tmp), args.images, args.image_size, args.channels, args.shards)
        encoder = Encoder(model, args.compile, args.channels_last)
        reader = measure_reader(shards, args.batch_size)
        encode = measure_encode(encoder, args, device, dtype)
        in_turn = measure_stage(encoder, shards, args, device, dtype, workers=0)
        parallel = measure_stage(encoder, shards, args, device, dtype, workers=args.workers)
    flops = encode_flops_per_image(model, args, device, dtype) if device.type == "cuda" else None
    if flops is not None:
        source = UtilisationSampler(device).source or "not available (no NVML, no nvidia-smi)"
        print(
            f"- encoder {flops / 1e9:.1f} GFLOP per image; MFU against {args.peak_tflops:g} TFLOP/s; "
            f"GPU utilisation sampled from {source}"
        )
    print()
    print("| part | images/s | MFU % | GPU util % |")
    print("|---|---:|---:|---:|")

    def cells(result: dict[str, float]) -> str:
        achieved = None if flops is None else result["images_per_s"] * flops
        mfu = "-" if achieved is None else f"{100 * achieved / (args.peak_tflops * 1e12):.1f}"
        util = f"{result['gpu_util_pct']:.0f}" if "gpu_util_pct" in result else "-"
        return f"{result['images_per_s']:,.0f} | {mfu} | {util}"

    print(f"| reader (`iter_batches`) | {reader:,.0f} | - | - |")
    print(f"| encode (`Tokenizer.encode`) | {cells(encode)} |")
    print(f"| stage (`extract_shards`), no loader worker | {cells(in_turn)} |")
    print(f"| stage (`extract_shards`), {args.workers} loader workers | {cells(parallel)} |")
    print()
    rate = encode["images_per_s"]
    in_turn_rate, parallel_rate = in_turn["images_per_s"], parallel["images_per_s"]
    print(
        f"reader / encode: **{reader / rate:.2f}**; stage / encode: **{in_turn_rate / rate:.2f}** without "
        f"workers, **{parallel_rate / rate:.2f}** with {args.workers}; "
        f"workers / in turn: **{parallel_rate / in_turn_rate:.2f}x**"
    )
    print(fast_path_report())


if __name__ == "__main__":
    main()
