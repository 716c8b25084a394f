"""Load and PNG-encode a source's images, in this process or in a pool of worker processes.

``encoded_items`` yields one result per item in item order whatever the number of workers, so the
shards written from it are byte-identical for any ``workers``. Loading (decode, resize) and PNG
encoding are the CPU work of ``prepare``; writing the tar files stays in the calling process.

Workers are forked where the platform can fork and the caller runs no other thread (the source's
arrays are then shared, not copied), and spawned otherwise (the source is pickled to each worker).
A worker whose parent is killed before it can stop the pool reads the end of its task pipe and exits.
"""

from __future__ import annotations

import io
import multiprocessing
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from imtok.data.sources import Source, SourceItem, UnreadableImage

# Items per task sent to a worker: large enough that the pipe round trip (~0.1 ms) is small next to
# encoding them (0.1 ms for a 28x28 image, ~7 ms at 256x256 RGB), small enough to keep workers even.
CHUNK_ITEMS = 32


@dataclass
class SkippedImage:
    key: str
    origin: str
    reason: str


def encode_png(image: np.ndarray) -> bytes:
    """Lossless PNG bytes of a uint8 (H, W) or (H, W, 3) array."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def encode_item(source: Source, item: SourceItem) -> dict[str, Any] | SkippedImage:
    """The shard sample of ``item`` (``__key__``, ``png``, ``cls``), or why it cannot be read."""
    try:
        image = source.load(item)
    except UnreadableImage as exc:
        return SkippedImage(item.key, item.origin, str(exc))
    return {"__key__": item.key, "png": encode_png(image), "cls": str(item.label).encode()}


_worker_source: Source | None = None


def _start_worker(source: Source) -> None:
    global _worker_source
    _worker_source = source


def _encode_in_worker(item: SourceItem) -> dict[str, Any] | SkippedImage:
    assert _worker_source is not None, "worker started without a source"
    return encode_item(_worker_source, item)


def pool_context() -> multiprocessing.context.BaseContext:
    """Fork where it is safe (a POSIX parent with a single thread), else spawn."""
    if "fork" in multiprocessing.get_all_start_methods() and threading.active_count() == 1:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def encoded_items(
    source: Source, items: Sequence[SourceItem], workers: int = 0
) -> Iterator[dict[str, Any] | SkippedImage]:
    """``encode_item`` of every item, in order; ``workers`` > 0 processes do the work in parallel.

    An error other than ``UnreadableImage`` in a worker is raised here, and closing the iterator (or
    an error in the caller) terminates the pool.
    """
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    if workers == 0 or len(items) <= CHUNK_ITEMS:
        for item in items:
            yield encode_item(source, item)
        return
    workers = min(workers, -(-len(items) // CHUNK_ITEMS))  # no idle processes for a small split
    context = pool_context()
    with context.Pool(workers, initializer=_start_worker, initargs=(source,)) as pool:
        yield from pool.imap(_encode_in_worker, items, chunksize=CHUNK_ITEMS)
