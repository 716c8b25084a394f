"""Token extraction parallel over shards: every image shard becomes one token shard of the same name.

The unit of work is the image shard. Under ``torchrun`` rank r encodes the shards ``r::world_size``
(in meta.json order); inside a rank, ``num_workers`` DataLoader processes read and decode whole
shards (worker w takes the rank's shards ``w::num_workers``) while the main process encodes, so
decoding overlaps the model instead of taking turns with it. The encoder sees uint8 batches moved to
the device (pinned, non-blocking on CUDA; a quarter of the float bytes) and scaled there, and the
indices of one batch are copied back while the next one is encoded.

Because a token shard holds exactly the samples of its image shard, in stored order (each flipped
twin right after its original), the output is the same bytes whatever the world size and worker
count: only meta.json, written last by rank 0 from the shard lists and code counts of all ranks,
says where the split ends.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from imtok.atomic import read_json
from imtok.data.shards import (
    IMAGE_FIELDS,
    META_NAME,
    LabelRange,
    ShardError,
    _read_shards,
    clear_split_dir,
    decode_sample,
    label_range,
    read_meta,
    shard_urls,
    to_float,
    write_json_atomic,
)
from imtok.data.sources import SPLITS
from imtok.data.tokens import TokenSample, count_codes, token_split_meta, write_token_shard
from imtok.params import ExtractParams, ExtractRun
from imtok.runtime import Runtime, broadcast_object, setup_runtime, shutdown_runtime

FLIP_SUFFIX = "_hflip"
MAX_PENDING_WRITES = 2  # encoded shards waiting for the writer thread before the loop waits for it

log = logging.getLogger("imtok.extraction")


class ShardPiece(NamedTuple):
    """Up to ``batch_size`` consecutive images of one shard; ``last`` marks the shard's final piece."""

    shard: int  # position of the shard in the split's meta.json
    images: torch.Tensor  # (B, C, H, W) uint8
    labels: list[int]
    keys: list[str]
    last: bool


class ShardImages(IterableDataset):
    """Decoded pieces of whole image shards; each DataLoader worker reads its own shards.

    ``shards`` are ``(position, url, expected count)``; a piece never spans two shards.
    """

    def __init__(
        self, shards: list[tuple[int, str, int]], batch_size: int, labels: LabelRange | None = None
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.shards = shards
        self.batch_size = batch_size
        self.labels = labels  # the split's class labels (shards.label_range), checked per sample

    def __iter__(self) -> Iterator[ShardPiece]:
        worker = get_worker_info()
        first, step = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        for position, url, expected in self.shards[first::step]:
            yield from self.read_shard(position, url, expected)

    def read_shard(self, position: int, url: str, expected: int) -> Iterator[ShardPiece]:
        if expected < 1:
            raise ShardError(f"{url}: meta.json lists {expected} samples; write the split again")
        pending: list[tuple[torch.Tensor, int, str]] = []
        samples = _read_shards(iter([{"url": url}]), {url: expected}, IMAGE_FIELDS)
        for seen, sample in enumerate(samples, start=1):
            pending.append(decode_sample(sample, self.labels))
            if len(pending) == self.batch_size and seen < expected:
                yield piece(position, pending, last=False)
                pending = []
        # _read_shards has checked the count by now, so the final piece is the shard's last
        yield piece(position, pending, last=True)


def piece(position: int, samples: list[tuple[torch.Tensor, int, str]], last: bool) -> ShardPiece:
    images, labels, keys = zip(*samples, strict=True)
    return ShardPiece(position, torch.stack(images), list(labels), list(keys), last)


def rank_shards(count: int, rank: int, world_size: int) -> list[int]:
    """Positions of the shards ``rank`` encodes: every ``world_size``-th, from ``rank``."""
    return list(range(count))[rank::world_size]


Encode = Callable[[torch.Tensor], torch.Tensor]


def channels_last_encode(tokenizer: Any) -> Encode:
    """``tokenizer.encode`` on NHWC weights and inputs (the tokenizer is converted in place)."""
    tokenizer.to(memory_format=torch.channels_last)

    def encode(images: torch.Tensor) -> torch.Tensor:
        return tokenizer.encode(images.contiguous(memory_format=torch.channels_last))

    return encode


class Pending(NamedTuple):
    piece: ShardPiece
    indices: list[torch.Tensor]  # one (B, h, w) per view, on the CPU once ``ready`` has completed
    ready: Any  # a CUDA event, or None on the CPU


def check_flip_keys(piece: ShardPiece) -> None:
    """Refuse image keys that already end in ``FLIP_SUFFIX``: with ``extract.flip`` their key and a
    flipped twin's could be one key twice in the token split, which no reader can load."""
    taken = [key for key in piece.keys if key.endswith(FLIP_SUFFIX)]
    if taken:
        raise ValueError(
            f"extract.flip: image {taken[0]!r} (shard {piece.shard} of the split's meta.json) ends in "
            f"{FLIP_SUFFIX!r}, the suffix of flipped twins' keys, so two token samples could share a key; "
            "rename such images and prepare the shards again, or set extract.flip to false"
        )


@torch.no_grad()
def encode_pieces(
    encode: Encode,
    pieces: Iterator[ShardPiece],
    *,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    flip: bool,
) -> Iterator[tuple[int, list[TokenSample]]]:
    """``(shard position, token samples)`` for each shard once its last piece is encoded.

    Samples keep the shard's stored order, each flipped twin right after its original. On CUDA the
    indices of a piece come back while the next piece is being encoded (one piece in flight).
    """
    collected: dict[int, list[TokenSample]] = {}
    in_flight: deque[Pending] = deque()
    cuda = device.type == "cuda"

    def finish(done: Pending) -> Iterator[tuple[int, list[TokenSample]]]:
        if done.ready is not None:
            done.ready.synchronize()
        arrays = [indices.numpy() for indices in done.indices]
        samples = collected.setdefault(done.piece.shard, [])
        for index, (key, label) in enumerate(zip(done.piece.keys, done.piece.labels, strict=True)):
            samples.append(TokenSample(key, arrays[0][index], label))
            if flip:
                samples.append(TokenSample(key + FLIP_SUFFIX, arrays[1][index], label))
        if done.piece.last:
            yield done.piece.shard, collected.pop(done.piece.shard)

    for current in pieces:
        if flip:
            check_flip_keys(current)
        images = to_float(current.images.to(device, non_blocking=cuda))
        views = [images, images.flip(-1)] if flip else [images]
        indices = []
        for view in views:
            dtype = autocast_dtype or torch.float32
            with torch.autocast(device.type, dtype=dtype, enabled=autocast_dtype is not None):
                codes = encode(view)
            indices.append(codes.to("cpu", non_blocking=cuda))
        ready = None
        if cuda:  # on the device's own stream: a bare record() would use the current device's
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(device))
        in_flight.append(Pending(current, indices, ready))
        if len(in_flight) > 1:
            yield from finish(in_flight.popleft())
    while in_flight:
        yield from finish(in_flight.popleft())
    if collected:
        raise ShardError(f"shards at positions {sorted(collected)} ended without their last piece")


def shard_loader(
    shards: list[tuple[int, str, int]],
    batch_size: int,
    *,
    num_workers: int,
    pin_memory: bool,
    labels: LabelRange | None = None,
) -> DataLoader:
    """The DataLoader over ``ShardImages``: pieces already batched, so ``batch_size=None``."""
    return DataLoader(
        ShardImages(shards, batch_size, labels),
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
    )


class ShardResult(NamedTuple):
    position: int
    shard: dict[str, Any]  # {"name", "count"} for meta.json
    counts: np.ndarray  # (codebook_size,) int64 code counts of the shard


def extract_shards(
    encode: Encode,
    shards: list[tuple[int, str, int]],
    out_dir: Path,
    *,
    batch_size: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    flip: bool,
    num_workers: int,
    codebook_size: int,
    grid: tuple[int, int],
    labels: LabelRange | None = None,
) -> list[ShardResult]:
    """Encode ``shards`` (this rank's share) and write one token shard per image shard into ``out_dir``;
    ``labels`` (the split's, ``shards.label_range``) are checked on every sample."""
    # a worker beyond one per shard would start for nothing
    workers = min(num_workers, len(shards))
    loader = shard_loader(
        shards, batch_size, num_workers=workers, pin_memory=device.type == "cuda", labels=labels
    )
    names = {position: Path(url).name for position, url, _ in shards}
    # one writer thread: tar writing (tens of microseconds a sample) runs while the next shard encodes;
    # at most MAX_PENDING_WRITES shards wait for it, so a fast encoder cannot pile up samples
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="imtok-token-writer")
    writes: deque[Future[ShardResult]] = deque()
    results: list[ShardResult] = []
    try:
        for position, samples in encode_pieces(
            encode, iter(loader), device=device, autocast_dtype=autocast_dtype, flip=flip
        ):
            path = out_dir / names[position]
            writes.append(writer.submit(write_one, position, samples, path, codebook_size, grid))
            while writes and (writes[0].done() or len(writes) > MAX_PENDING_WRITES):
                results.append(writes.popleft().result())  # a failed write stops the loop here
        results.extend(write.result() for write in writes)
    finally:
        writer.shutdown(wait=True, cancel_futures=True)  # after an error: no queued shard is written
    missing = sorted(set(names) - {result.position for result in results})
    if missing:
        unwritten = [names[i] for i in missing]
        raise ShardError(f"{out_dir}: no tokens were written for the image shards {unwritten}")
    return results


def write_one(
    position: int, samples: list[TokenSample], path: Path, codebook_size: int, grid: tuple[int, int]
) -> ShardResult:
    written = write_token_shard(samples, path, codebook_size=codebook_size, grid=grid)
    return ShardResult(position, written, count_codes(samples, codebook_size))


def gather_results(results: list[ShardResult], codebook_size: int) -> tuple[list[dict[str, Any]], np.ndarray]:
    """Every rank's shards in split order and the summed code counts (on every rank).

    Without a process group, this rank's results alone.
    """
    counts = np.zeros(codebook_size, dtype=np.int64)
    for result in results:
        counts += result.counts
    listed = [(result.position, result.shard) for result in results]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, listed)
        listed = [entry for part in gathered for entry in part]
        # int64 on the CPU: gloo and NCCL both reduce it exactly; counts are small enough to move
        total = torch.from_numpy(counts)
        if dist.get_backend() == "nccl":
            total = total.cuda()
        dist.all_reduce(total)
        counts = total.cpu().numpy()
    listed.sort(key=lambda entry: entry[0])
    return [shard for _, shard in listed], counts


# The extract_tokens stage's work: both splits encoded, one token shard per image shard.


def tokenizer_provenance(location: str, model_file: Path) -> dict[str, Any]:
    """Where the tokenizer came from: its location, registry URI when known, and file checksum."""
    from imtok.models.files import file_sha256

    provenance = {"tokenizer": location, "tokenizer_sha256": file_sha256(model_file)}
    summary_path = model_file.parent / "tokenizer.json"
    if summary_path.is_file():
        registered = read_json(summary_path).get("registered_model") or {}
        provenance["tokenizer_uri"] = registered.get("uri")
    if location.startswith(("models:/", "runs:/")):
        provenance["tokenizer_uri"] = location
    return provenance


def check_images_fit(meta: dict[str, Any], config: Any, split_dir: Path, location: str) -> None:
    """The tokenizer must take the shards' channel count and divide their size; errors name both."""
    if int(meta["channels"]) != config.in_channels:
        raise ValueError(
            f"extract.tokenizer: {location} takes {config.in_channels}-channel images but {split_dir} holds "
            f"{meta['channels']}-channel images; use a tokenizer trained on these shards"
        )
    if int(meta["image_size"]) % config.downsample:
        raise ValueError(
            f"extract.tokenizer: {location} downsamples by {config.downsample} but {split_dir} holds "
            f"{meta['image_size']}x{meta['image_size']} images; use a tokenizer whose factor divides the size"
        )


def split_shards(meta: dict[str, Any], split_dir: Path) -> list[tuple[int, str, int]]:
    """``(position, url, count)`` of every image shard of a split, in meta.json order."""
    urls = shard_urls(split_dir, meta)
    counts = [int(shard["count"]) for shard in meta["shards"]]
    return [(index, url, count) for index, (url, count) in enumerate(zip(urls, counts, strict=True))]


def check_same_tokenizer(checksum: str, runtime: Runtime) -> None:
    """Every rank must encode with the same weights (an alias can move between two downloads)."""
    reference = broadcast_object(checksum, runtime)
    if reference != checksum:
        raise ValueError(
            f"extract.tokenizer: rank {runtime.rank} loaded a tokenizer with SHA-256 {checksum[:12]}, "
            f"rank 0 one with {reference[:12]}; the registry alias moved while the ranks started, "
            "run the stage again"
        )


def extract_split(
    tokenizer: Any,
    encode: Encode,
    params: ExtractParams,
    split: str,
    *,
    shards_dir: Path,
    tokens_dir: Path,
    runtime: Runtime,
    meta: dict[str, Any],
    num_workers: int = 0,
) -> dict[str, Any] | None:
    """Write the token shards of this rank's share of ``split`` (``num_workers`` loader processes);
    rank 0 also writes meta.json, returns it."""
    split_dir = shards_dir / split
    image_meta = read_meta(split_dir)
    check_images_fit(image_meta, tokenizer.config, split_dir, params.tokenizer)
    size = int(image_meta["image_size"])
    grid = tokenizer.config.grid_of(size, size)
    out_dir = tokens_dir / split
    if runtime.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        clear_split_dir(out_dir)
    runtime.barrier()  # nobody writes before the old split is gone
    shards = split_shards(image_meta, split_dir)
    if len(shards) < runtime.world_size and runtime.is_main:
        log.warning(
            "%s: %d shard(s) for %d processes; some stay idle (lower prepare.maxcount for more shards)",
            split_dir,
            len(shards),
            runtime.world_size,
        )
    flip = params.flip and split == "train"
    results = extract_shards(
        encode,
        [shards[i] for i in rank_shards(len(shards), runtime.rank, runtime.world_size)],
        out_dir,
        batch_size=params.batch_size,
        device=runtime.device,
        autocast_dtype=runtime.autocast_dtype,
        flip=flip,
        num_workers=num_workers,
        codebook_size=tokenizer.codebook_size,
        grid=grid,
        labels=label_range(image_meta),
    )
    listed, counts = gather_results(results, tokenizer.codebook_size)
    content = None
    if runtime.is_main:
        content = token_split_meta(
            listed,
            counts,
            location=out_dir,
            grid=grid,
            codebook_size=tokenizer.codebook_size,
            meta={
                "split": split,
                **meta,
                "image_shards": str(split_dir),
                "image_size": int(image_meta["image_size"]),
                "channels": int(image_meta["channels"]),
                "class_names": image_meta.get("class_names", []),
                "flipped": flip,
            },
        )
        write_json_atomic(out_dir / META_NAME, content)
    runtime.barrier()  # the split is complete for every rank before the next one starts
    return content


def extract(
    params: ExtractParams,
    *,
    shards_dir: Path,
    tokens_dir: Path,
    run: ExtractRun | None = None,
    runtime: Runtime | None = None,
    dist_timeout_s: float | None = None,
) -> dict[str, Any] | None:
    """Write token shards of both splits; returns the stage report (None on ranks other than 0).
    ``run`` (``run.extract``, default: its defaults) says where and with how many loader processes;
    ``dist_timeout_s`` (``run.dist_timeout_s``) bounds the wait for the other ranks.

    Under ``torchrun`` every process encodes its share of the shards on its own device.
    """
    from imtok.models.files import load_tokenizer
    from imtok.registry import fetched_model_file

    started = time.perf_counter()
    run = run or ExtractRun()
    owned = runtime is None
    runtime = runtime or setup_runtime(
        run.device, params.precision, prefix="extract", dist_timeout_s=dist_timeout_s
    )
    try:
        with fetched_model_file(params.tokenizer, "tokenizer.pt") as model_file:
            tokenizer, payload = load_tokenizer(model_file)
            provenance = tokenizer_provenance(params.tokenizer, model_file)
        tokenizer = tokenizer.to(runtime.device)
        check_same_tokenizer(provenance["tokenizer_sha256"], runtime)
        encode = channels_last_encode(tokenizer) if params.channels_last else tokenizer.encode
        report: dict[str, Any] = {
            "tokenizer": provenance,
            "codebook_size": tokenizer.codebook_size,
            "processes": runtime.world_size,
            "loader_workers": run.num_workers,
        }
        for split in SPLITS:
            split_started = time.perf_counter()
            meta = extract_split(
                tokenizer,
                encode,
                params,
                split,
                shards_dir=shards_dir,
                tokens_dir=tokens_dir,
                runtime=runtime,
                meta={**provenance, "tokenizer_step": payload["meta"].get("step")},
                num_workers=run.num_workers,
            )
            if meta is None:
                continue
            seconds = time.perf_counter() - split_started
            report[split] = {
                "count": meta["count"],
                "codebook_usage_pct": round(meta["codebook_usage_pct"], 3),
                "perplexity": round(meta["perplexity"], 3),
                "seconds": round(seconds, 2),
            }
            log.info(
                "%s: %d token grids %s in %.1f s, usage %.1f%%",
                split,
                meta["count"],
                "x".join(map(str, meta["grid"])),
                seconds,
                meta["codebook_usage_pct"],
            )
    finally:
        if owned:
            shutdown_runtime(runtime)
    if not runtime.is_main:
        return None
    report["seconds"] = round(time.perf_counter() - started, 2)
    return report
