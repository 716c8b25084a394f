"""Image shards: write a source's split as WebDataset tar files, read them back as batches.

On disk (or under an S3 prefix) a split is ``shard-000000.tar, shard-000001.tar, ...`` holding samples
``{__key__, png, cls}`` (lossless 8-bit PNG, class index as ASCII) and a ``meta.json`` listing the
shards with their sample counts. meta.json is written last: a split without it is incomplete.

Writing is atomic per shard: a shard is written as ``shard-NNNNNN.tar.partial`` and renamed once
closed and synced, so a killed run never leaves a partial file under a final name; a re-run clears
what a previous run left and writes the split again (the output is deterministic for the params).

Reading under DDP splits the split's shards by rank (``rank::world_size`` of a per-epoch permutation
shared by all ranks) and then by DataLoader worker, so every rank and worker reads a disjoint part.
A rank whose shards hold fewer samples than the largest rank's re-reads its own samples to fill up,
so every rank yields the same number of full batches (like ``DistributedSampler`` padding) and the
ranks together cover the whole split each epoch.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import math
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from webdataset.tariterators import tarfile_samples

from imtok.atomic import write_json
from imtok.data.encoding import SkippedImage, encoded_items
from imtok.data.s3 import register_s3_scheme
from imtok.data.sources import Source, SourceItem

log = logging.getLogger(__name__)

register_s3_scheme()

SHARD_PATTERN = "shard-%06d.tar"
PARTIAL_SUFFIX = ".partial"
META_NAME = "meta.json"
META_VERSION = 1
IMAGE_FIELDS = ("png", "cls")


class ShardError(OSError):
    """A shard that cannot be read, or that holds a different number of samples than meta.json lists."""


# ----------------------------------------------------------------------------------------------------
# Writing


@dataclass
class SplitReport:
    split: str
    count: int
    shards: list[dict[str, Any]]
    skipped: list[SkippedImage] = field(default_factory=list)
    seconds: float = 0.0


def sync_and_rename(partial: str) -> str:
    final = partial[: -len(PARTIAL_SUFFIX)]
    with open(partial, "rb") as stream:
        os.fsync(stream.fileno())  # the data is on disk before the final name appears
    os.replace(partial, final)
    return final


def clear_split_dir(out_dir: Path) -> None:
    """Remove what an earlier (possibly killed) run wrote: meta first, so no reader trusts the rest."""
    (out_dir / META_NAME).unlink(missing_ok=True)
    (out_dir / (META_NAME + PARTIAL_SUFFIX)).unlink(missing_ok=True)
    for stale in out_dir.glob(f".{META_NAME}.*.tmp"):  # a write_text_atomic that a kill interrupted
        stale.unlink()
    for stale in [*out_dir.glob("shard-*.tar"), *out_dir.glob(f"shard-*.tar{PARTIAL_SUFFIX}")]:
        stale.unlink()


def write_json_atomic(path: Path, content: dict[str, Any]) -> None:
    """Write a meta.json (keys sorted) atomically: a crash leaves the old file or the whole new one."""
    write_json(path, content, sort_keys=True)


def write_shards(
    samples: Iterable[dict[str, Any]],
    out_dir: str | Path,
    *,
    maxcount: int = 10000,
    maxsize: int = 100_000_000,
) -> list[dict[str, Any]]:
    """Write samples (``__key__`` plus byte fields) as ``shard-NNNNNN.tar`` files in ``out_dir``.

    Each shard is written as ``.partial``, synced and renamed once complete; if iterating ``samples``
    or writing raises, the shard in progress is removed (complete shards keep their final names) and
    the error propagates. Returns ``[{"name", "count"}, ...]`` for meta.json. Clears nothing: callers
    run ``clear_split_dir`` first.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, Any]] = []
    in_shard = 0  # samples written to the shard in progress
    failed = False

    def close_shard(partial: str) -> None:
        nonlocal in_shard
        if failed or in_shard == 0:
            Path(partial).unlink(missing_ok=True)
        else:
            shards.append({"name": Path(sync_and_rename(partial)).name, "count": in_shard})
        in_shard = 0

    writer = wds.ShardWriter(
        str(out_dir / (SHARD_PATTERN + PARTIAL_SUFFIX)),
        maxcount=maxcount,
        maxsize=maxsize,
        post=close_shard,
        verbose=0,
        encoder=False,  # samples arrive as bytes: nothing is re-encoded
        # fixed timestamps make the same input give byte-identical shards; an int, because a float
        # mtime makes tarfile add a pax header to every member (doubling the shard size)
        mtime=0,
    )
    try:
        for sample in samples:
            writer.write(sample)
            in_shard += 1  # after write(): a shard rollover inside write() has already closed the old one
    except BaseException:
        failed = True
        raise
    finally:
        writer.close()
    return shards


def write_split(
    source: Source,
    split: str,
    out_dir: str | Path,
    *,
    maxcount: int = 10000,
    maxsize: int = 100_000_000,
    limit: int | None = None,
    seed: int | None = None,
    workers: int = 0,
) -> SplitReport:
    """Write ``source``'s ``split`` (at most ``limit`` images) as shards plus meta.json in ``out_dir``.

    ``workers`` > 0 processes load and PNG-encode the images while this one writes the tar files; the
    shards are byte-identical for any number of workers. Unreadable images are skipped and listed in
    the returned report; any other error aborts the split, removing the shard in progress (complete
    shards keep their final names).
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    clear_split_dir(out_dir)
    items: list[SourceItem] = source.items(split)[:limit]
    if not items:
        raise ValueError(f"split {split!r} of {source.location} holds no images")
    skipped: list[SkippedImage] = []

    def samples(results: Iterator[dict[str, Any] | SkippedImage]) -> Iterator[dict[str, Any]]:
        for result in results:
            if isinstance(result, SkippedImage):
                log.warning("skipping unreadable image %s: %s", result.origin, result.reason)
                skipped.append(result)
                continue
            yield result

    # closing: a failed write stops the encoding workers at once, not when the traceback is freed
    with contextlib.closing(encoded_items(source, items, workers)) as results:
        shards = write_shards(samples(results), out_dir, maxcount=maxcount, maxsize=maxsize)
    count = sum(shard["count"] for shard in shards)
    if count == 0:
        raise ValueError(
            f"split {split!r} of {source.location}: none of its {len(items)} images could be read "
            f"(first error: {skipped[0].reason if skipped else 'none'})"
        )
    meta = {
        "version": META_VERSION,
        "split": split,
        "count": count,
        "image_size": int(source.image_size),
        "channels": int(source.channels),
        "class_names": list(source.class_names),
        "source": source.kind,
        "source_checksum": source.checksum(split),
        "seed": seed,
        "limit": limit,
        "skipped": len(skipped),
        "shards": shards,
        "sample": {"png": "8-bit PNG, (H, W) or (H, W, 3)", "cls": "class index, ASCII"},
    }
    write_json_atomic(out_dir / META_NAME, meta)
    return SplitReport(split, count, shards, skipped, time.perf_counter() - started)


# ----------------------------------------------------------------------------------------------------
# Reading


def _join(location: str | Path, name: str) -> str:
    return f"{str(location).rstrip('/')}/{name}"


def read_meta(location: str | Path) -> dict[str, Any]:
    """The meta.json of a split directory or S3 prefix."""
    url = _join(location, META_NAME)
    try:
        with wds.gopen(url, "rb") as stream:
            meta = json.loads(stream.read())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{url} not found: {location} is not a complete split written by prepare "
            "(an interrupted prepare leaves no meta.json; run it again)"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ShardError(
            f"{url}: damaged, not JSON ({error}); write the split again with the stage that made it "
            "(prepare for images, extract_tokens for tokens)"
        ) from None
    if not isinstance(meta, dict) or not isinstance(meta.get("shards"), list):
        raise ShardError(
            f"{url}: not a split's meta.json (no list of shards); write the split again with the stage "
            "that made it (prepare for images, extract_tokens for tokens)"
        )
    return meta


def shard_urls(location: str | Path, meta: dict[str, Any] | None = None) -> list[str]:
    """URLs (paths or s3://) of a split's shards, in order."""
    meta = meta if meta is not None else read_meta(location)
    return [_join(location, shard["name"]) for shard in meta["shards"]]


def _read_shards(
    src: Iterator[dict[str, Any]],
    expected: dict[str, int] | None = None,
    fields: tuple[str, ...] = IMAGE_FIELDS,
) -> Iterator[dict[str, Any]]:
    """Pipeline stage: shard URLs -> raw samples, each checked for ``fields``; errors name the shard.

    With ``expected`` (URL -> sample count from meta.json) a shard that ends early is an error too:
    a tar cut at a block boundary otherwise reads as a shorter, valid archive.
    """
    for entry in src:
        url = entry["url"]
        count = 0
        try:
            for sample in tarfile_samples([{"url": url}]):
                missing = [name for name in fields if name not in sample]
                if missing:
                    raise ShardError(
                        f"{url}: sample {sample.get('__key__')!r} lacks {', '.join(missing)}; the shard is "
                        "truncated or not an image shard; write the split again"
                    )
                count += 1
                yield sample
        except ShardError:
            raise
        except Exception as exc:
            detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ShardError(
                f"{url}: cannot read shard: {type(exc).__name__}: {detail}; check that the file or object "
                "exists and is readable, or write the split again"
            ) from exc
        if expected is not None and url in expected and count != expected[url]:
            raise ShardError(
                f"{url}: holds {count} samples but meta.json lists {expected[url]}; the shard is "
                "truncated or stale, write the split again"
            )


read_shards = wds.pipelinefilter(_read_shards)


def _split_samples(location: str | Path) -> Iterator[dict[str, Any]]:
    """Raw samples of a split in stored order, each count checked against meta.json (with ``__url__``)."""
    meta = read_meta(location)
    urls = shard_urls(location, meta)
    expected = {url: shard["count"] for url, shard in zip(urls, meta["shards"], strict=True)}
    yield from _read_shards(iter({"url": url} for url in urls), expected)


def iter_samples(location: str | Path) -> Iterator[dict[str, Any]]:
    """Every raw sample of a split in stored order: ``{"__key__", "png" (bytes), "cls" (int)}``."""
    labels = label_range(read_meta(location))
    for sample in _split_samples(location):
        label = sample_label(sample, labels=labels)
        yield {"__key__": sample["__key__"], "png": sample["png"], "cls": label}


class LabelRange(NamedTuple):
    """The class labels a split may hold: ``low <= label < classes``."""

    low: int  # 0, or -1 where the split's meta.json says unconditional samples (label -1) are in it
    classes: int  # len(class_names)


def label_range(meta: dict[str, Any]) -> LabelRange | None:
    """The labels a split's meta.json allows: its ``class_names``, and -1 for the samples of an
    unconditional prior (``"conditional": false``); None when it names no classes."""
    classes = len(meta.get("class_names") or [])
    if not classes:
        return None
    return LabelRange(-1 if meta.get("conditional") is False else 0, classes)


def sample_label(
    sample: dict[str, Any],
    remedy: str = "the shard is damaged, write the split again",
    labels: LabelRange | None = None,
) -> int:
    """The integer class label of a raw shard sample, checked against ``labels`` when given; a label
    that is not an integer, or outside the split's classes, names its shard and sample and says
    ``remedy``."""
    where = f"{sample.get('__url__', 'a shard')}: sample {sample['__key__']!r}"
    try:
        label = int(sample["cls"])
    except (TypeError, ValueError, UnicodeDecodeError):
        raise ShardError(
            f"{where} holds a class label {repr(sample['cls'])[:40]} that is not an integer; {remedy}"
        ) from None
    if labels is not None and not labels.low <= label < labels.classes:
        raise ShardError(
            f"{where} holds class label {label}, outside the split's {labels.classes} classes (0 to "
            f"{labels.classes - 1} in its meta.json class_names); {remedy}"
        )
    return label


def decode_png_uint8(data: bytes) -> torch.Tensor:
    """PNG bytes -> uint8 tensor (C, H, W)."""
    with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
        array = np.array(image, dtype=np.uint8)  # (H, W) or (H, W, 3)
    tensor = torch.from_numpy(array)
    return tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [-1, 1], same shape."""
    return images.float().div_(127.5).sub_(1.0)


def decode_png(data: bytes) -> torch.Tensor:
    """PNG bytes -> float tensor (C, H, W) in [-1, 1]."""
    return to_float(decode_png_uint8(data))


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Inverse of the [-1, 1] scaling: exact for images that came from 8-bit data. Computed in float32
    whatever the input's dtype (in bfloat16, (x + 1) * 127.5 misses pixel values)."""
    return ((images.float() + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)


class Batch(NamedTuple):
    images: torch.Tensor  # (B, C, H, W) float in [-1, 1]
    labels: torch.Tensor  # (B,) int64
    keys: list[str]


def iter_batches(location: str | Path, batch_size: int) -> Iterator[Batch]:
    """Every sample of a split exactly once, in stored order, as batches (the last may be smaller).

    For evaluation, where ``ShardLoader``'s equal-length padding would count images twice.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    pending: list[tuple[torch.Tensor, int, str]] = []
    labels = label_range(read_meta(location))
    for sample in _split_samples(location):
        pending.append(decode_sample(sample, labels))
        if len(pending) == batch_size:
            yield collate_images(pending)
            pending = []
    if pending:
        yield collate_images(pending)


def decode_sample(sample: dict[str, Any], labels: LabelRange | None = None) -> tuple[torch.Tensor, int, str]:
    """(uint8 image, label, key) of a raw shard sample; a PNG that does not decode, or a label outside
    ``labels``, names its shard."""
    where = f"{sample.get('__url__', 'a shard')}: sample {sample['__key__']!r}"
    try:
        image = decode_png_uint8(sample["png"])
    except (OSError, ValueError, SyntaxError) as exc:  # what PIL raises for damaged image data
        raise ShardError(
            f"{where} holds a PNG that does not decode ({type(exc).__name__}: {exc}); the shard is "
            "damaged, write the split again"
        ) from None
    return image, sample_label(sample, labels=labels), sample["__key__"]


def collate_images(samples: list[tuple[torch.Tensor, int, str]]) -> Batch:
    """(uint8 image, label, key) samples -> one Batch; the float conversion runs once per batch."""
    images, labels, keys = zip(*samples, strict=True)
    shape = images[0].shape
    for image, key in zip(images, keys, strict=True):
        if image.shape != shape:
            raise ShardError(
                f"sample {key!r} is a {'x'.join(map(str, image.shape))} image but sample {keys[0]!r} of "
                f"the same batch is {'x'.join(map(str, shape))}; a split holds one size and channel count: "
                "write it again with prepare"
            )
    return Batch(to_float(torch.stack(images)), torch.tensor(labels, dtype=torch.int64), list(keys))


def batch_pipeline(
    urls: list[str],
    batch_size: int,
    *,
    shuffle_buffer: int = 0,
    seed: int = 0,
    expected_counts: dict[str, int] | None = None,
    labels: LabelRange | None = None,
) -> wds.DataPipeline:
    """The per-worker WebDataset pipeline: split shards by worker, read, shuffle, decode, batch.

    Batches at the end of each worker's stream may be partial; ``ShardLoader`` re-batches.
    """
    stages: list[Any] = [wds.SimpleShardList(urls), wds.split_by_worker, read_shards(expected_counts)]
    if shuffle_buffer > 1:
        stages.append(wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 100), seed=seed))
    decode = functools.partial(decode_sample, labels=labels)
    stages += [wds.map(decode), wds.batched(batch_size, collation_fn=collate_images, partial=True)]
    return wds.DataPipeline(*stages)


def _dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ShardLoader:
    """Batches of a split for one rank: ``Batch(images, labels, keys)``, all of ``batch_size``.

    ``len(loader)`` is the same on every rank. Call ``set_epoch(e)`` before each epoch to draw a new
    shard order (the same on all ranks) and a new shuffle. Rank and world size default to those of
    the initialised ``torch.distributed`` process group (0 and 1 without one). Workers start afresh
    for each pass over the rank's shards, as a DataLoader's do each epoch: under the ``spawn`` start
    method that costs an import of the world per worker, so prefer ``fork`` where the platform has it.
    """

    def __init__(
        self,
        location: str | Path,
        batch_size: int,
        *,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        num_workers: int = 0,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        pin_memory: bool = False,
        multiprocessing_context: str | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.location = str(location)
        self.meta = read_meta(location)
        self.urls = shard_urls(location, self.meta)
        self.counts = [shard["count"] for shard in self.meta["shards"]]
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer if shuffle else 0
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.multiprocessing_context = multiprocessing_context if num_workers > 0 else None
        self.seed = seed
        self.epoch = 0
        detected_rank, detected_world = _dist_info()
        self.rank = detected_rank if rank is None else rank
        self.world_size = detected_world if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world_size {self.world_size}")
        if not self.urls:
            raise ValueError(
                f"{self.location}: its meta.json lists 0 shards, so the split holds no images (every "
                "image skipped or none found: see reports/prepare.json); check prepare.source and "
                "prepare.root, then run prepare again"
            )
        if len(self.urls) < self.world_size:
            raise ValueError(
                f"{self.location} has {len(self.urls)} shard(s) for {self.world_size} ranks; every rank "
                "needs at least one: write smaller shards (lower prepare.maxcount)"
            )
        if self.rank == 0 and self.world_size > 1:
            repeated = self.repeated_samples()
            if repeated > self.batch_size * self.world_size:
                log.warning(
                    "%s: %d shards over %d ranks give the ranks unequal shares, so %d of %d samples "
                    "(%.0f%%) are read twice per epoch to keep the ranks in step; write a number of "
                    "shards that is a multiple of %d (prepare.maxcount)",
                    self.location,
                    len(self.urls),
                    self.world_size,
                    repeated,
                    sum(self.counts),
                    100.0 * repeated / sum(self.counts),
                    self.world_size,
                )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _shard_order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.urls))
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.urls))

    def rank_shards(self, rank: int) -> list[int]:
        """Indices of the shards ``rank`` reads this epoch."""
        return [int(i) for i in self._shard_order()[rank :: self.world_size]]

    def samples_per_rank(self) -> list[int]:
        return [sum(self.counts[i] for i in self.rank_shards(r)) for r in range(self.world_size)]

    def __len__(self) -> int:
        return math.ceil(max(self.samples_per_rank()) / self.batch_size)

    def repeated_samples(self) -> int:
        """Samples this epoch's ranks read beyond the split to end with the same number of batches."""
        return len(self) * self.batch_size * self.world_size - sum(self.counts)

    def _one_pass(self, shards: list[int], repeat: int) -> Any:
        urls = [self.urls[i] for i in shards]
        seed = int(np.random.SeedSequence([self.seed, self.epoch, self.rank, repeat]).generate_state(1)[0])
        pipeline = batch_pipeline(
            urls,
            self.batch_size,
            shuffle_buffer=self.shuffle_buffer,
            seed=seed,
            expected_counts={self.urls[i]: self.counts[i] for i in shards},
            labels=label_range(self.meta),
        )
        # Its own generator: a DataLoader draws its workers' base seed when an iterator starts, from
        # torch's global generator unless given one. A run resumed mid-epoch starts an iterator that an
        # unbroken run did not, so every later random draw of training (dropout, Gumbel samples, code
        # restarts) would differ from the unbroken run's.
        return wds.WebLoader(
            pipeline,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            multiprocessing_context=self.multiprocessing_context,
            generator=torch.Generator().manual_seed(seed),
        )

    def _pieces(self, shards: list[int]) -> Iterator[Batch]:
        """Worker batches over ``shards``: one pass, then repeated samples, without end."""
        own = sum(self.counts[i] for i in shards)
        shortfall = len(self) * self.batch_size - own
        if shortfall <= min(self.batch_size, own):
            # the usual case: replay (at most one batch of) the first samples instead of a second pass
            head: list[Batch] = []
            kept = 0
            for piece in self._one_pass(shards, 0):
                if kept < shortfall:
                    head.append(_slice(piece, 0, shortfall - kept))
                    kept += len(head[-1].keys)
                yield piece
            yield from head
            return
        # a rank far behind the largest one, or a split smaller than half a batch, re-reads its own
        # shards to fill up
        repeat = 0
        while True:
            count = 0
            for piece in self._one_pass(shards, repeat):
                count += len(piece.keys)
                yield piece
            if count == 0:
                raise ShardError(f"{self.location}: rank {self.rank} read no samples from its shards")
            repeat += 1

    def __iter__(self) -> Iterator[Batch]:
        total_batches = len(self)
        pending: list[Batch] = []
        pending_count = 0
        produced = 0
        for piece in self._pieces(self.rank_shards(self.rank)):
            pending.append(piece)
            pending_count += len(piece.keys)
            while pending_count >= self.batch_size and produced < total_batches:
                batch, pending = _take(pending, self.batch_size)
                pending_count -= self.batch_size
                produced += 1
                yield batch
            if produced == total_batches:
                return
        raise ShardError(
            f"{self.location}: rank {self.rank} got {produced} of {total_batches} batches; "
            "its shards hold fewer samples than meta.json lists"
        )


def _slice(batch: Batch, start: int, stop: int) -> Batch:
    return Batch(batch.images[start:stop], batch.labels[start:stop], batch.keys[start:stop])


def _take(pieces: list[Batch], size: int) -> tuple[Batch, list[Batch]]:
    """The first ``size`` samples of ``pieces`` as one batch, and the remaining pieces."""
    if len(pieces[0].keys) == size:
        return pieces[0], pieces[1:]
    images = torch.cat([piece.images for piece in pieces])
    labels = torch.cat([piece.labels for piece in pieces])
    keys = [key for piece in pieces for key in piece.keys]
    joined = Batch(images, labels, keys)
    rest = [_slice(joined, size, len(keys))] if len(keys) > size else []
    return _slice(joined, 0, size), rest
