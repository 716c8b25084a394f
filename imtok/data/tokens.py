"""Token shards: the tokenizer's code indices of a split, cached for prior training and evaluation.

A token split is a directory (or S3 prefix) of WebDataset shards with samples ``{__key__, tokens.npy,
cls}``: ``tokens.npy`` is an ``(H, W)`` array in NumPy's .npy format, uint16 when the codebook has at
most 65,536 codes and int32 otherwise. ``meta.json`` (written last) holds the count, the grid, the
codebook size, the dtype and the tokenizer's location, URI and checksum, so a prior can refuse tokens
of another tokenizer. Writing is atomic per shard, like image shards.

Token splits are small (a 16x16 grid of uint16 is 512 bytes an image), so readers load a whole split
into one tensor: ``load_token_split`` checks every sample against meta.json. It holds the ids as int32
(every id fits: ``token_dtype``), half of int64's memory: ImageNet's 1.28 M images and their flips on
a 16x16 grid take 2.6 GB on every rank instead of 5.2 GB; a batch becomes int64 where a loss needs it.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import webdataset as wds

from imtok.data.shards import (
    META_NAME,
    PARTIAL_SUFFIX,
    LabelRange,
    ShardError,
    _read_shards,
    clear_split_dir,
    label_range,
    read_meta,
    sample_label,
    shard_urls,
    sync_and_rename,
    write_json_atomic,
    write_shards,
)

TOKEN_META_VERSION = 1
TOKEN_FIELDS = ("tokens.npy", "cls")
UINT16_CODES = 1 << 16


def token_dtype(codebook_size: int) -> np.dtype:
    """uint16 when every index fits, else int32."""
    if codebook_size < 1:
        raise ValueError(f"codebook_size: expected a positive number of codes, got {codebook_size}")
    if codebook_size > np.iinfo(np.int32).max:
        raise ValueError(f"codebook_size: {codebook_size} codes do not fit int32 token ids")
    return np.dtype(np.uint16) if codebook_size <= UINT16_CODES else np.dtype(np.int32)


def encode_tokens(tokens: np.ndarray) -> bytes:
    """.npy bytes of one (H, W) token array."""
    buffer = io.BytesIO()
    np.save(buffer, tokens, allow_pickle=False)
    return buffer.getvalue()


NPY_V1 = b"\x93NUMPY\x01\x00"  # the magic and version np.save writes for a small array


@functools.lru_cache(maxsize=16)
def _npy_header(header: bytes) -> tuple[np.dtype, tuple[int, ...]] | None:
    """(dtype, shape) of a version 1.0 .npy header (magic included) that ``frombuffer`` can read."""
    try:
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(io.BytesIO(header[len(NPY_V1) :]))
    except Exception:  # a damaged header: np.load then says what is wrong
        return None
    return None if fortran_order or dtype.hasobject else (dtype, tuple(shape))


def decode_tokens(data: bytes) -> np.ndarray:
    """The array of one ``tokens.npy``, as ``np.load`` reads it.

    Every sample of a split has the same header, so it is parsed once and the ids are copied out with
    ``frombuffer``: 20x faster than ``np.load`` a sample, and a split of 70,000 7 x 7 grids loads in
    0.68x the time (``benchmarks.data``, benchmarks/RESULTS.md). Anything else, damaged data
    included, goes to ``np.load``.
    """
    if data[: len(NPY_V1)] == NPY_V1 and len(data) >= len(NPY_V1) + 2:
        end = len(NPY_V1) + 2 + int.from_bytes(data[len(NPY_V1) : len(NPY_V1) + 2], "little")
        known = _npy_header(bytes(data[:end]))
        if known is not None and len(data) - end == known[0].itemsize * math.prod(known[1]):
            return np.frombuffer(data, known[0], offset=end).reshape(known[1]).copy()
    return np.load(io.BytesIO(data), allow_pickle=False)


class TokenSample(NamedTuple):
    key: str
    tokens: np.ndarray  # (H, W) integer code ids
    label: int


def token_record(sample: TokenSample, *, codebook_size: int, grid: tuple[int, int], dtype: np.dtype) -> dict:
    """The shard record of one token sample, checked against the grid and codebook."""
    tokens = np.asarray(sample.tokens)
    if tokens.shape != tuple(grid):
        raise ValueError(f"{sample.key}: tokens of shape {tokens.shape}, expected the grid {grid}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= codebook_size):
        raise ValueError(
            f"{sample.key}: token ids from {tokens.min()} to {tokens.max()} fall outside [0, {codebook_size})"
        )
    cls = str(int(sample.label)).encode()
    return {"__key__": sample.key, "tokens.npy": encode_tokens(tokens.astype(dtype)), "cls": cls}


def count_codes(samples: Iterable[TokenSample], codebook_size: int) -> np.ndarray:
    """How often each code occurs in ``samples``: int64 (codebook_size,), one bincount for all."""
    arrays = [np.asarray(sample.tokens).reshape(-1) for sample in samples]
    if not arrays:
        return np.zeros(codebook_size, dtype=np.int64)
    return np.bincount(np.concatenate(arrays).astype(np.int64), minlength=codebook_size)


def write_token_shard(
    samples: list[TokenSample], path: Path, *, codebook_size: int, grid: tuple[int, int]
) -> dict[str, Any]:
    """Write ``samples`` as the one shard ``path`` (``.partial``, synced, renamed); ``{"name", "count"}``.

    Used by the parallel extraction, which writes one token shard per image shard, so the split's
    layout does not depend on how many processes or loader workers wrote it. The checks and the .npy
    encoding run once over the stacked shard, not per sample: on a GPU host this runs beside the encoder.
    """
    if not samples:
        raise ValueError(f"{path}: no token samples to write")
    dtype = token_dtype(codebook_size)
    for sample in samples:
        if np.shape(sample.tokens) != tuple(grid):
            raise ValueError(
                f"{sample.key}: tokens of shape {np.shape(sample.tokens)}, expected the grid {grid}"
            )
    stacked = np.stack([np.asarray(sample.tokens) for sample in samples])  # (N, H, W)
    if stacked.min() < 0 or stacked.max() >= codebook_size:
        bad = next(s for s in samples if np.min(s.tokens) < 0 or np.max(s.tokens) >= codebook_size)
        token_record(bad, codebook_size=codebook_size, grid=grid, dtype=dtype)  # raises, naming the sample
    stacked = stacked.astype(dtype)
    header = encode_tokens(stacked[0])[: -stacked[0].nbytes]  # the .npy header: the same for every grid
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    try:
        # encoder=False: the fields are bytes already; mtime=0: the same tokens give the same bytes
        with wds.TarWriter(str(partial), encoder=False, mtime=0) as writer:
            for sample, tokens in zip(samples, stacked, strict=True):
                cls = str(int(sample.label)).encode()
                writer.write({"__key__": sample.key, "tokens.npy": header + tokens.tobytes(), "cls": cls})
        sync_and_rename(str(partial))
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return {"name": path.name, "count": len(samples)}


def token_split_meta(
    shards: list[dict[str, Any]],
    counts: np.ndarray,
    *,
    location: str | Path,
    grid: tuple[int, int],
    codebook_size: int,
    meta: Mapping[str, Any],
) -> dict[str, Any]:
    """meta.json of the token split at ``location`` from its shard list and code counts (``meta`` adds
    provenance)."""
    count = sum(shard["count"] for shard in shards)
    if count == 0:
        raise ValueError(f"{location}: no token samples to write (its image split holds no shards)")
    dtype = token_dtype(codebook_size)
    probs = counts / counts.sum()
    nonzero = probs[probs > 0]
    return {
        "version": TOKEN_META_VERSION,
        "kind": "tokens",
        "count": count,
        "grid": list(grid),
        "codebook_size": int(codebook_size),
        "dtype": dtype.name,
        "codebook_usage_pct": float(100.0 * (counts > 0).mean()),
        "perplexity": float(np.exp(-(nonzero * np.log(nonzero)).sum())),
        **dict(meta),
        "shards": shards,
        "sample": {"tokens.npy": f"{dtype.name} (H, W) code ids, .npy format", "cls": "class index, ASCII"},
    }


def write_token_split(
    samples: Iterable[TokenSample],
    out_dir: str | Path,
    *,
    codebook_size: int,
    grid: tuple[int, int],
    meta: Mapping[str, Any],
    maxcount: int = 100_000,
) -> dict[str, Any]:
    """Write token samples as shards plus meta.json (``meta`` adds provenance); returns the meta."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    clear_split_dir(out_dir)
    dtype = token_dtype(codebook_size)
    counts = np.zeros(codebook_size, dtype=np.int64)

    def encoded() -> Iterator[dict[str, Any]]:
        for sample in samples:
            record = token_record(sample, codebook_size=codebook_size, grid=grid, dtype=dtype)
            counts[:] += count_codes([sample], codebook_size)
            yield record

    shards = write_shards(encoded(), out_dir, maxcount=maxcount, maxsize=1 << 40)
    if not shards:
        raise ValueError(f"{out_dir}: no token samples to write")
    content = token_split_meta(
        shards, counts, location=out_dir, grid=grid, codebook_size=codebook_size, meta=meta
    )
    write_json_atomic(out_dir / META_NAME, content)
    return content


class TokenSplit(NamedTuple):
    tokens: torch.Tensor  # (N, H, W) int32 code ids (int64 only per batch, where a loss needs it)
    labels: torch.Tensor  # (N,) int64
    keys: list[str]
    meta: dict[str, Any]


def read_token_meta(location: str | Path) -> dict[str, Any]:
    """meta.json of a token split; ValueError when the directory holds image shards instead."""
    meta = read_meta(location)
    if meta.get("kind") != "tokens":
        raise ValueError(
            f"{location}: meta.json describes {meta.get('kind', 'image')} shards, not token shards; "
            "point at the output of extract_tokens"
        )
    return meta


def decode_token_sample(sample: dict[str, Any], labels: LabelRange | None = None) -> tuple[np.ndarray, int]:
    """(integer token ids, label) of a raw token-shard sample; damaged data names its shard and sample."""
    where = f"{sample.get('__url__', 'a token shard')}: sample {sample['__key__']!r}"
    try:
        array = decode_tokens(sample["tokens.npy"])
    except (ValueError, OSError, EOFError) as exc:  # what np.load raises for damaged .npy data
        raise ShardError(
            f"{where} holds tokens.npy that does not load ({type(exc).__name__}: {exc}); the token shard "
            "is damaged, run extract_tokens again"
        ) from None
    if array.dtype.kind not in "iu":
        raise ShardError(
            f"{where} holds tokens of dtype {array.dtype}, not integer code ids; the token shard is "
            "damaged or not from extract_tokens, run extract_tokens again"
        )
    return array, sample_label(sample, "the token shard is damaged, run extract_tokens again", labels)


def load_token_split(location: str | Path) -> TokenSplit:
    """The whole split in memory, each sample checked against the split's grid and codebook."""
    meta = read_token_meta(location)
    grid = tuple(meta["grid"])
    urls = shard_urls(location, meta)
    expected = {url: shard["count"] for url, shard in zip(urls, meta["shards"], strict=True)}
    tokens = np.empty((meta["count"], *grid), dtype=np.int32)  # ids < 2^31 (token_dtype)
    labels: list[int] = []
    keys: list[str] = []
    allowed = label_range(meta)
    for sample in _read_shards(iter({"url": url} for url in urls), expected, TOKEN_FIELDS):
        array, label = decode_token_sample(sample, allowed)
        if array.shape != grid:
            raise ShardError(
                f"{location}: sample {sample['__key__']!r} has tokens of shape {array.shape}, but meta.json "
                f"says the grid is {grid}"
            )
        if len(keys) >= len(tokens):
            raise ShardError(f"{location}: holds more samples than the {meta['count']} meta.json lists")
        tokens[len(keys)] = array
        labels.append(label)
        keys.append(sample["__key__"])
    if len(keys) != meta["count"]:
        raise ShardError(f"{location}: holds {len(keys)} samples but meta.json lists {meta['count']}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= meta["codebook_size"]):
        raise ShardError(
            f"{location}: token ids from {tokens.min()} to {tokens.max()} fall outside the codebook "
            f"[0, {meta['codebook_size']})"
        )
    return TokenSplit(torch.from_numpy(tokens), torch.tensor(labels, dtype=torch.int64), keys, meta)
