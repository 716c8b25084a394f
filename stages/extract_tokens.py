"""DVC stage `extract_tokens`: image shards -> token shards in data/tokens/{train,val}.

Encodes every image of each split with the tokenizer named by ``extract.tokenizer`` (the
``models/tokenizer`` directory the previous stage wrote, or an MLflow model URI such as
``models:/imtok-tokenizer@champion``), batched, without gradients, and writes one token shard per
image shard (same name, same samples in stored order) plus a meta.json recording the tokenizer's
location, registry URI and SHA-256. ``extract.num_workers`` loader processes decode shards while the model
encodes; under ``torchrun`` each process encodes its share of the shards (``imtok.extraction``), and
the output is byte-identical whatever the process and worker counts. With ``extract.flip`` the train
split also gets the tokens of each image flipped left-right (key suffix ``_hflip``; image keys that
already end so are refused).
reports/extract_tokens.json holds count, codebook usage, perplexity and seconds per split.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from imtok import layout
from imtok.data.shards import (
    META_NAME,
    clear_split_dir,
    label_range,
    read_meta,
    shard_urls,
    write_json_atomic,
)
from imtok.data.sources import SPLITS
from imtok.data.tokens import token_split_meta
from imtok.extraction import Encode, channels_last_encode, extract_shards, gather_results, rank_shards
from imtok.params import ExtractParams
from imtok.runtime import Runtime, broadcast_object, setup_runtime, shutdown_runtime
from stages.common import read_json, stage_main

log = logging.getLogger("stages.extract_tokens")

SHARDS_DIR = Path(layout.SHARDS)
TOKENS_DIR = Path(layout.TOKENS)
REPORT_PATH = Path(layout.REPORTS) / "extract_tokens.json"


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
) -> dict[str, Any] | None:
    """Write the token shards of this rank's share of ``split``; rank 0 also writes meta.json, returns it."""
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
        num_workers=params.num_workers,
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
    shards_dir: Path = SHARDS_DIR,
    tokens_dir: Path = TOKENS_DIR,
    runtime: Runtime | None = None,
    dist_timeout_s: float | None = None,
) -> dict[str, Any] | None:
    """Write token shards of both splits; returns the stage report (None on ranks other than 0).
    ``dist_timeout_s`` (``run.dist_timeout_s``) bounds the wait for the other ranks.

    Under ``torchrun`` every process encodes its share of the shards on its own device.
    """
    from imtok.models.files import load_tokenizer
    from imtok.registry import fetched_model_file

    started = time.perf_counter()
    owned = runtime is None
    runtime = runtime or setup_runtime(
        params.device, params.precision, prefix="extract", dist_timeout_s=dist_timeout_s
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
            "loader_workers": params.num_workers,
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


def main(argv: list[str] | None = None) -> int:
    return stage_main(
        __doc__,
        lambda params, _: extract(params.extract, dist_timeout_s=params.run.dist_timeout_s),
        report_path=REPORT_PATH,
        argv=argv,
    )


if __name__ == "__main__":
    raise SystemExit(main())
