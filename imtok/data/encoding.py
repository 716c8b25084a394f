"""Load and PNG-encode a source's images, in this process or in a pool of worker processes.

``encoded_items`` yields one result per item in item order whatever the number of workers, so the
shards written from it are byte-identical for any ``workers``. Loading (decode, resize) and PNG
encoding are the CPU work of ``prepare``; writing the tar files stays in the calling process.

Workers are forked where the platform can fork and the caller runs no other thread (the source's
arrays are then shared, not copied), and spawned otherwise (the source is pickled to each worker).
A worker that dies (killed, out of memory, a crash inside an image decoder) or cannot start stops
the iteration with ``EncodingWorkerDied``; a worker whose parent is killed exits by itself.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from imtok.data.sources import Source, SourceItem, UnreadableImage

# Items per task sent to a worker: large enough that the pipe round trip (~0.1 ms) is small next to
# encoding them (0.1 ms for a 28x28 image, ~7 ms at 256x256 RGB), small enough to keep workers even.
CHUNK_ITEMS = 32
# Chunks queued or finished ahead of the writer, per worker: a worker always has its next chunk, and
# results waiting for the writer stay a few chunks per worker however fast the workers are.
CHUNKS_AHEAD_PER_WORKER = 2
PARENT_POLL_SECONDS = 1.0


class EncodingWorkerDied(RuntimeError):
    """An encoding worker process exited without returning its images, or could not start."""


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


def _exit_when_orphaned(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_SECONDS)
    os._exit(1)  # the stage is gone and nobody will read this worker's results


def _start_worker(source: Source) -> None:
    global _worker_source
    _worker_source = source
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the stage, and the stage the pool
    # The parent as it is now: the stage under fork and spawn, the server process under forkserver
    # (which exits with the stage); when it is gone, this worker has been orphaned.
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True).start()


def _encode_chunk(items: Sequence[SourceItem]) -> list[dict[str, Any] | SkippedImage]:
    assert _worker_source is not None, "worker started without a source"
    return [encode_item(_worker_source, item) for item in items]


def pool_context() -> multiprocessing.context.BaseContext:
    """Fork where it is safe (a POSIX parent with a single thread), else spawn."""
    if "fork" in multiprocessing.get_all_start_methods() and threading.active_count() == 1:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def _worker_died(in_flight: Sequence[Sequence[SourceItem]], workers: int) -> EncodingWorkerDied:
    """The error for a broken pool: which images were being encoded (in write order) when it broke."""
    count = sum(len(chunk) for chunk in in_flight)
    return EncodingWorkerDied(
        f"an encoding worker process died or could not start while the {count} images from "
        f"{in_flight[0][0].origin} to {in_flight[-1][-1].origin} (in write order) were being encoded: "
        "killed by the system, out of memory, or crashed in an image decoder (its error, if any, is "
        f"printed above). Set run.prepare.num_workers: 0 (now {workers}) to encode in the stage itself "
        "and see the error there."
    )


def encoded_items(
    source: Source, items: Sequence[SourceItem], workers: int = 0
) -> Iterator[dict[str, Any] | SkippedImage]:
    """``encode_item`` of every item, in order; ``workers`` > 0 processes do the work in parallel.

    An error other than ``UnreadableImage`` in a worker is raised here, a dead worker raises
    ``EncodingWorkerDied``, and closing the iterator (or an error in the caller) stops the pool.
    """
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    if workers == 0 or len(items) <= CHUNK_ITEMS:
        for item in items:
            yield encode_item(source, item)
        return
    chunks = [items[start : start + CHUNK_ITEMS] for start in range(0, len(items), CHUNK_ITEMS)]
    processes = min(workers, len(chunks))  # no idle processes for a small split
    pool = ProcessPoolExecutor(
        processes, mp_context=pool_context(), initializer=_start_worker, initargs=(source,)
    )
    ahead: deque[tuple[Sequence[SourceItem], Future]] = deque()
    submitted = 0
    finished = False
    try:
        while ahead or submitted < len(chunks):
            while submitted < len(chunks) and len(ahead) < processes * CHUNKS_AHEAD_PER_WORKER:
                chunk = chunks[submitted]
                try:
                    ahead.append((chunk, pool.submit(_encode_chunk, chunk)))
                except BrokenProcessPool as exc:
                    raise _worker_died([c for c, _ in ahead] + [chunk], workers) from exc
                submitted += 1
            try:
                results = ahead[0][1].result()
            except BrokenProcessPool as exc:
                raise _worker_died([c for c, _ in ahead], workers) from exc
            ahead.popleft()
            yield from results
        finished = True
    finally:
        if not finished:  # an error, Ctrl-C or an abandoned iteration: do not wait for running chunks
            stop_workers(pool)
        pool.shutdown(wait=True, cancel_futures=True)


def stop_workers(pool: ProcessPoolExecutor) -> None:
    """Terminate the pool's processes now (one stuck in an image decoder would hold up a shutdown)."""
    terminate = getattr(pool, "terminate_workers", None)  # public from Python 3.14
    if terminate is not None:
        terminate()
        return
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        process.terminate()
