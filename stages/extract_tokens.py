"""DVC stage `extract_tokens`: image shards -> token shards in data/tokens/{train,val}.

Encodes every image of each split with the tokenizer named by ``extract.tokenizer`` (the
``models/tokenizer`` directory the previous stage wrote, or an MLflow model URI such as
``models:/imtok-tokenizer@champion``) in stored order, batched, without gradients, and writes token
shards whose meta.json records the tokenizer's location, registry URI and SHA-256. With
``extract.flip`` the train split also gets the tokens of each image flipped left-right (key suffix
``_hflip``). reports/extract_tokens.json holds count, codebook usage and perplexity per split.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from imtok.data.shards import decode_png, iter_samples, read_meta
from imtok.data.sources import SPLITS
from imtok.data.tokens import TokenSample, write_token_split
from imtok.params import ExtractParams
from imtok.runtime import resolve_device, resolve_precision
from stages.common import stage_main

log = logging.getLogger("stages.extract_tokens")

SHARDS_DIR = Path("data/shards")
TOKENS_DIR = Path("data/tokens")
REPORT_PATH = Path("reports/extract_tokens.json")
FLIP_SUFFIX = "_hflip"


def batches(samples: Iterator[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def tokenizer_provenance(location: str, model_file: Path) -> dict[str, Any]:
    """Where the tokenizer came from: its location, registry URI when known, and file checksum."""
    from imtok.models.files import file_sha256

    provenance = {"tokenizer": location, "tokenizer_sha256": file_sha256(model_file)}
    summary_path = model_file.parent / "tokenizer.json"
    if summary_path.is_file():
        registered = json.loads(summary_path.read_text()).get("registered_model") or {}
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


@torch.no_grad()
def encode_split(
    tokenizer: Any,
    split_dir: Path,
    *,
    batch_size: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    flip: bool,
) -> Iterator[TokenSample]:
    """Token samples of a split in stored order (each flipped twin right after its original)."""
    for batch in batches(iter_samples(split_dir), batch_size):
        images = torch.stack([decode_png(sample["png"]) for sample in batch]).to(device)
        views = [images, images.flip(-1)] if flip else [images]
        encoded = []
        for view in views:
            with torch.autocast(
                device.type, dtype=autocast_dtype or torch.float32, enabled=bool(autocast_dtype)
            ):
                encoded.append(tokenizer.encode(view).cpu().numpy())
        for index, sample in enumerate(batch):
            yield TokenSample(sample["__key__"], encoded[0][index], sample["cls"])
            if flip:
                yield TokenSample(sample["__key__"] + FLIP_SUFFIX, encoded[1][index], sample["cls"])


def extract(
    params: ExtractParams, *, shards_dir: Path = SHARDS_DIR, tokens_dir: Path = TOKENS_DIR
) -> dict[str, Any]:
    """Write token shards of both splits; returns the stage report."""
    from imtok.tracking import load_tokenizer, resolve_model_file

    started = time.perf_counter()
    model_file = resolve_model_file(params.tokenizer, "tokenizer.pt")
    tokenizer, payload = load_tokenizer(model_file)
    device = resolve_device(params.device, key="extract.device")
    autocast_dtype = resolve_precision(params.precision, device, key="extract.precision")
    tokenizer = tokenizer.to(device)
    provenance = tokenizer_provenance(params.tokenizer, model_file)
    report: dict[str, Any] = {"tokenizer": provenance, "codebook_size": tokenizer.codebook_size}
    for split in SPLITS:
        split_dir = shards_dir / split
        image_meta = read_meta(split_dir)
        check_images_fit(image_meta, tokenizer.config, split_dir, params.tokenizer)
        side = int(image_meta["image_size"]) // tokenizer.downsample
        samples = encode_split(
            tokenizer,
            split_dir,
            batch_size=params.batch_size,
            device=device,
            autocast_dtype=autocast_dtype,
            flip=params.flip and split == "train",
        )
        meta = write_token_split(
            samples,
            tokens_dir / split,
            codebook_size=tokenizer.codebook_size,
            grid=(side, side),
            maxcount=params.maxcount,
            meta={
                "split": split,
                **provenance,
                "image_shards": str(split_dir),
                "image_size": int(image_meta["image_size"]),
                "channels": int(image_meta["channels"]),
                "class_names": image_meta.get("class_names", []),
                "flipped": params.flip and split == "train",
                "tokenizer_step": payload["meta"].get("step"),
            },
        )
        report[split] = {
            "count": meta["count"],
            "codebook_usage_pct": round(meta["codebook_usage_pct"], 3),
            "perplexity": round(meta["perplexity"], 3),
        }
        log.info(
            "%s: %d token grids %dx%d, usage %.1f%%",
            split,
            meta["count"],
            side,
            side,
            meta["codebook_usage_pct"],
        )
    report["seconds"] = round(time.perf_counter() - started, 2)
    return report


def main(argv: list[str] | None = None) -> int:
    return stage_main(__doc__, lambda params, _: extract(params.extract), report_path=REPORT_PATH, argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
