"""Data benchmark: prepare throughput, reading shards vs the same images as loose PNG files, and loading
a token split.

prepare is timed in this process alone and with ``--prepare-workers`` encoding processes, side by side
on the same images (the two outputs are checked to be byte-identical). Both readers decode and collate
with the same functions (``decode_png_uint8``, ``collate_images``) into float batches of the same
size, in the same process, with the same number of DataLoader workers; only the storage differs (a
few tar files read in sequence vs one small file per image).

A token split of ``--tokens`` samples (random ids on a ``--token-grid``, one shard) is loaded by
``load_token_split`` (tar reading, then ``decode_tokens`` per sample), and its ``tokens.npy``
payloads are decoded by ``decode_tokens`` beside its peer ``np.load``.

    python -m benchmarks.data --images 10000 --workers 0 2 --batch-size 256 --prepare-workers 2
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from benchmarks.common import usable_cpus
from imtok.data.shards import (
    ShardLoader,
    SplitReport,
    collate_images,
    decode_png_uint8,
    iter_samples,
    write_split,
)
from imtok.data.sources import FASHION_MNIST_DIR, FashionMNIST, SyntheticShapes
from imtok.data.tokens import TOKEN_FIELDS, TokenSample, decode_tokens, load_token_split, write_token_split


class LoosePngs(Dataset):
    """One PNG file per image, class = parent folder, as a map-style dataset."""

    def __init__(self, root: Path, class_names: list[str]):
        self.files = sorted(root.rglob("*.png"))
        self.label_of = {name: i for i, name in enumerate(class_names)}

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        path = self.files[index]
        return decode_png_uint8(path.read_bytes()), int(path.parent.name), path.stem


def _images_per_second(loader: Iterable) -> float:
    """Throughput of one pass over ``loader`` (a batch's first element holds the images)."""
    started, count = time.perf_counter(), 0
    for batch in loader:
        count += batch[0].shape[0]
    return count / (time.perf_counter() - started)


def _compare(first: Iterable, second: Iterable, repeats: int) -> tuple[float, float]:
    """Median throughputs, measured alternately so that load changes on the machine hit both alike."""
    for loader in (first, second):  # warm-up: page cache, worker imports, allocator
        _images_per_second(loader)
    rates = [(_images_per_second(first), _images_per_second(second)) for _ in range(repeats)]
    return statistics.median(r[0] for r in rates), statistics.median(r[1] for r in rates)


def same_files(first: Path, second: Path) -> bool:
    """Whether two directories hold the same file names with the same bytes."""
    names = sorted(path.name for path in first.iterdir())
    if names != sorted(path.name for path in second.iterdir()):
        return False
    return all((first / name).read_bytes() == (second / name).read_bytes() for name in names)


def prepare_rates(
    source: Any, out: Path, images: int, maxcount: int, workers: int, repeats: int
) -> tuple[SplitReport, float, float]:
    """Median prepare images/s without and with ``workers`` encoding processes, run alternately.

    Returns the report of the last run without workers (its shards are in ``out / "serial"``).
    """
    rates: dict[int, list[float]] = {0: [], workers: []}
    for _ in range(repeats):
        for count, name in ((0, "serial"), (workers, "parallel")):
            report = write_split(source, "train", out / name, maxcount=maxcount, limit=images, workers=count)
            rates[count].append(report.count / report.seconds)
            if count == 0:
                serial = report
    if not same_files(out / "serial", out / "parallel"):
        raise RuntimeError(f"prepare with {workers} workers wrote other bytes than without")
    return serial, statistics.median(rates[0]), statistics.median(rates[workers])


def token_loading(samples: int, grid: int, repeats: int) -> list[str]:
    """Table lines: loading a token split of ``samples`` (grid x grid uint16 ids) with ``decode_tokens``
    and with its peer ``np.load`` per sample, and the decoding alone (best of ``repeats``, alternating).
    """
    import io

    import numpy as np

    from imtok.data import tokens as token_module
    from imtok.data.shards import _read_shards, shard_urls

    def np_load(payload: bytes) -> np.ndarray:
        return np.load(io.BytesIO(payload), allow_pickle=False)

    def load_with(decode: Any, split: str) -> float:
        ours, token_module.decode_tokens = token_module.decode_tokens, decode
        try:
            started = time.perf_counter()
            load_token_split(split)
            return time.perf_counter() - started
        finally:
            token_module.decode_tokens = ours

    def decode_all(decode: Any, payloads: list[bytes]) -> float:
        started = time.perf_counter()
        for payload in payloads:
            decode(payload)
        return time.perf_counter() - started

    rng = np.random.default_rng(0)
    tokens = [TokenSample(f"{i:08d}", rng.integers(0, 1024, (grid, grid)), i % 10) for i in range(samples)]
    timings: dict[str, list[float]] = {name: [] for name in ("split", "split peer", "decode", "decode peer")}
    with tempfile.TemporaryDirectory(prefix="imtok-bench-tokens-") as split:
        meta = write_token_split(
            tokens, split, codebook_size=1024, grid=(grid, grid), meta={"split": "train"}
        )
        (url,) = shard_urls(split, meta)
        payloads = [s["tokens.npy"] for s in _read_shards(iter([{"url": url}]), {url: samples}, TOKEN_FIELDS)]
        for _ in range(repeats):
            timings["split"].append(load_with(decode_tokens, split))
            timings["split peer"].append(load_with(np_load, split))
            timings["decode"].append(decode_all(decode_tokens, payloads))
            timings["decode peer"].append(decode_all(np_load, payloads))
    best = {name: min(values) for name, values in timings.items()}
    rows = [
        ("load_token_split, decode_tokens", best["split"], best["split"] / best["split peer"]),
        ("load_token_split, np.load per sample (peer)", best["split peer"], 1.0),
        ("decoding alone: decode_tokens", best["decode"], best["decode"] / best["decode peer"]),
        ("decoding alone: np.load per sample (peer)", best["decode peer"], 1.0),
    ]
    return [
        f"token split: {samples} samples of {grid}x{grid} uint16 ids, one shard, best of {repeats}:",
        "",
        "| step | seconds | samples/s | time vs peer |",
        "|---|---:|---:|---:|",
        *(
            f"| {name} | {seconds:.3g} | {samples / seconds:,.0f} | {ratio:.2f} |"
            for name, seconds, ratio in rows
        ),
    ]


def run(
    images: int,
    workers: list[int],
    batch_size: int,
    repeats: int,
    maxcount: int,
    prepare_workers: int,
    image_size: int = 32,
    channels: int = 1,
    tokens: int = 10000,
    token_grid: int = 7,
) -> str:
    if (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        source, source_name = FashionMNIST(FASHION_MNIST_DIR, image_size, channels), "Fashion-MNIST"
    else:
        count = int(images / 0.9) + 1
        source, source_name = SyntheticShapes(count, image_size, channels), "synthetic shapes"
    lines = []
    with tempfile.TemporaryDirectory(prefix="imtok-bench-") as tmp:
        shards, loose = Path(tmp) / "serial", Path(tmp) / "loose"
        report, prepare_rate, parallel_rate = prepare_rates(
            source, Path(tmp), images, maxcount, prepare_workers, repeats
        )
        for sample in iter_samples(shards):  # the very same PNG bytes, one file each
            folder = loose / str(sample["cls"])
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{sample['__key__']}.png").write_bytes(sample["png"])
        dataset = LoosePngs(loose, [str(i) for i in range(len(source.class_names))])

        lines += [
            f"- source: {source_name}, {report.count} train images at {image_size}x{image_size}x{channels}, "
            f"{len(report.shards)} shards of <= {maxcount}",
            f"- machine: {platform.machine()}, {usable_cpus()} CPU cores, "
            f"torch {torch.__version__}, batch size {batch_size}, "
            f"median of {repeats} alternating passes after a warm-up pass",
            "",
            f"prepare (fit to {image_size}x{image_size}, PNG-encode, write shards; byte-identical outputs; "
            f"median of {repeats} alternating runs):",
            "",
            "| encoding processes | images/s | ratio |",
            "|---:|---:|---:|",
            f"| 0 (in the writer) | {prepare_rate:,.0f} | 1.00 |",
            f"| {prepare_workers} | {parallel_rate:,.0f} | {parallel_rate / prepare_rate:.2f} |",
            "",
            "| workers | shards (ShardLoader) images/s | loose PNGs (DataLoader) images/s | ratio |",
            "|---:|---:|---:|---:|",
        ]
        for num_workers in workers:
            shard_loader = ShardLoader(
                shards, batch_size, shuffle=True, shuffle_buffer=1000, num_workers=num_workers, seed=0
            )
            file_loader = DataLoader(
                dataset, batch_size, shuffle=True, num_workers=num_workers, collate_fn=collate_images
            )
            shard_rate, file_rate = _compare(shard_loader, file_loader, repeats)
            lines.append(
                f"| {num_workers} | {shard_rate:,.0f} | {file_rate:,.0f} | {shard_rate / file_rate:.2f} |"
            )
    lines += ["", *token_loading(tokens, token_grid, repeats)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--maxcount", type=int, default=1000)
    parser.add_argument("--prepare-workers", type=int, default=usable_cpus(), help="encoding processes")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--channels", type=int, choices=(1, 3), default=1)
    parser.add_argument("--tokens", type=int, default=10000, help="samples of the token split")
    parser.add_argument("--token-grid", type=int, default=7, help="token grid side (Fashion-MNIST: 7)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    sizes = (args.images, args.workers, args.batch_size, args.repeats, args.maxcount, args.prepare_workers)
    tokens = {"tokens": args.tokens, "token_grid": args.token_grid}
    print(run(*sizes, image_size=args.image_size, channels=args.channels, **tokens))


if __name__ == "__main__":
    main()
