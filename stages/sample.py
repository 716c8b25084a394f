"""DVC stage `sample`: the prior generates token grids, its tokenizer decodes them into image shards.

Reads the ``sample`` params section. The prior comes from ``sample.prior`` (``models/prior`` or an
MLflow URI); the tokenizer is ``sample.tokenizer`` or, when null, the one the prior was trained on as
its metadata records. A tokenizer whose checksum (when the prior records one) or codebook size differs
from the prior's is refused; images come out at the prior's token grid times the tokenizer's factor f.
A class-conditional prior makes ``per_class`` images of every class, an unconditional one ``count``.
MaskGIT decodes in ``steps`` parallel steps, GPT samples token by token with its KV cache; both take a
seeded generator, so the same params give the same images.

Writes ``data/samples`` (image shards ``{__key__, png, cls}`` with meta.json, readable by every image
reader of imtok), ``reports/samples.png`` (one row per class) and ``reports/sample.json``; logs the
grid to an MLflow run of this stage.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from imtok.data.encoding import encode_png
from imtok.data.shards import (
    META_NAME,
    clear_split_dir,
    to_uint8,
    write_json_atomic,
    write_shards,
)
from imtok.images import save_grid
from imtok.params import Params, SampleParams
from imtok.runtime import resolve_device
from imtok.sampling import autoregressive_sample, gpt_next_token_logits, maskgit_decode
from stages.common import stage_main

log = logging.getLogger("stages.sample")

STAGE = "sample"
SAMPLES_DIR = Path("data/samples")
GRID_PATH = Path("reports/samples.png")
REPORT_PATH = Path("reports/sample.json")


def matching_tokenizer(
    params: SampleParams, prior_meta: dict[str, Any], prior_config: Any
) -> tuple[Any, str]:
    """The tokenizer to decode with, checked against what the prior was trained on."""
    from imtok.models.files import file_sha256
    from imtok.tracking import fetched_model_file, load_tokenizer

    location = params.tokenizer or prior_meta.get("tokenizer_uri") or prior_meta.get("tokenizer")
    if not location:
        raise ValueError("sample.tokenizer: the prior records no tokenizer; set sample.tokenizer to one")
    with fetched_model_file(location, "tokenizer.pt") as model_file:
        tokenizer, _ = load_tokenizer(model_file)
        actual = file_sha256(model_file)
    if tokenizer.codebook_size != prior_config.codebook_size:
        raise ValueError(
            f"sample.tokenizer: {location} has a codebook of {tokenizer.codebook_size} codes but the prior "
            f"{params.prior} was trained on {prior_config.codebook_size}; use the prior's own tokenizer"
        )
    expected = prior_meta.get("tokenizer_sha256")
    if expected and actual != expected:
        raise ValueError(
            f"sample.tokenizer: {location} (sha256 {actual[:12]}) is not the tokenizer the prior "
            f"{params.prior} was trained on (sha256 {expected[:12]}, {prior_meta.get('tokenizer')}); its "
            "codes mean other things: set sample.tokenizer to null or to that tokenizer"
        )
    return tokenizer, location


def requested_labels(params: SampleParams, num_classes: int) -> torch.Tensor | None:
    """Class of every image to generate (per_class of each), or None for an unconditional prior."""
    if num_classes == 0:
        return None
    return torch.arange(num_classes).repeat_interleave(params.per_class)


@torch.no_grad()
def generate_tokens(
    prior: Any,
    kind: str,
    params: SampleParams,
    labels: torch.Tensor | None,
    batch: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """One batch of token grids (B, h, w) from the prior."""
    config = prior.config
    if kind == "maskgit":
        return maskgit_decode(
            lambda tokens, labels: prior(tokens, labels),
            batch,
            config.grid,
            config.mask_id,
            steps=params.steps,
            temperature=params.temperature,
            choice_temperature=params.choice_temperature,
            guidance_scale=params.guidance_scale,
            labels=labels,
            generator=generator,
        )
    flat = autoregressive_sample(
        gpt_next_token_logits(prior),
        batch,
        config.num_tokens,
        temperature=params.temperature,
        top_k=params.top_k,
        top_p=params.top_p,
        guidance_scale=params.guidance_scale,
        labels=labels,
        generator=generator,
    )
    return flat.view(batch, *config.grid)


def class_rows(images: torch.Tensor, labels: torch.Tensor | None, per_row: int) -> tuple[torch.Tensor, int]:
    """The first ``per_row`` images of each class, class by class (or the first images), and the row width."""
    if labels is None:
        return images[: per_row * per_row], per_row
    rows = [images[labels == label][:per_row] for label in labels.unique(sorted=True)]
    width = min(per_row, min(len(row) for row in rows))
    return torch.cat([row[:width] for row in rows]), width


def sample(
    params: SampleParams, *, samples_dir: Path = SAMPLES_DIR, grid_path: Path = GRID_PATH
) -> dict[str, Any]:
    """Generate, decode and write the samples; returns the stage report."""
    from imtok.tracking import load_prior

    started = time.perf_counter()
    prior, payload = load_prior(params.prior)
    kind, prior_meta = payload["config"]["kind"], payload["meta"]
    tokenizer, tokenizer_location = matching_tokenizer(params, prior_meta, prior.config)
    device = resolve_device(params.device, key="sample.device")
    prior, tokenizer = prior.to(device), tokenizer.to(device)
    labels = requested_labels(params, prior.config.num_classes)
    total = params.count if labels is None else len(labels)
    generator = torch.Generator(device=device).manual_seed(params.seed)
    images, classes = [], []
    for start in range(0, total, params.batch_size):
        size = min(params.batch_size, total - start)
        batch_labels = None if labels is None else labels[start : start + size].to(device)
        tokens = generate_tokens(prior, kind, params, batch_labels, size, generator)
        images.append(tokenizer.decode(tokens).cpu())
        classes.append(torch.full((size,), -1) if batch_labels is None else batch_labels.cpu())
    all_images, all_labels = torch.cat(images), torch.cat(classes)
    pixels = to_uint8(all_images)  # (N, C, H, W) uint8

    def encoded() -> Iterator[dict[str, Any]]:
        for index in range(total):
            array = pixels[index].permute(1, 2, 0).squeeze(-1).numpy()  # (H, W) or (H, W, 3)
            yield {
                "__key__": f"sample_{index:06d}",
                "png": encode_png(array),
                "cls": str(int(all_labels[index])).encode(),
            }

    clear_split_dir(samples_dir)
    shards = write_shards(encoded(), samples_dir, maxcount=params.maxcount)
    meta = {
        "version": 1,
        "split": "samples",
        "count": total,
        "image_size": int(all_images.shape[-1]),
        "channels": int(all_images.shape[1]),
        "class_names": list(prior_meta.get("class_names") or []),
        "source": "prior",
        "conditional": labels is not None,
        "prior": params.prior,
        "prior_kind": kind,
        "tokenizer": tokenizer_location,
        "sample_params": dataclasses.asdict(params),
        "shards": shards,
        "sample": {"png": "8-bit PNG", "cls": "requested class index (-1: unconditional), ASCII"},
    }
    write_json_atomic(samples_dir / META_NAME, meta)
    grid_images, width = class_rows(all_images, None if labels is None else all_labels, params.grid_per_class)
    save_grid(grid_images, grid_path, per_row=width)
    seconds = time.perf_counter() - started
    return {
        "count": total,
        "prior_kind": kind,
        "conditional": labels is not None,
        "seconds": round(seconds, 2),
        "images_per_s": round(total / max(seconds, 1e-9), 2),
        "grid": str(grid_path),
    }


def sample_and_log(params: Params, _args: Any) -> dict[str, Any]:
    """``sample`` inside an MLflow run of this stage that keeps the grid."""
    from imtok import tracking

    with tracking.stage_run(STAGE, {"sample": dataclasses.asdict(params.sample)}, system_metrics=False):
        report = sample(params.sample)
        tracking.log_artifact(GRID_PATH, "samples")
        tracking.log_metrics({"sample/images_per_s": report["images_per_s"]}, 0)
    log.info("%d samples in %s, grid %s", report["count"], SAMPLES_DIR, report["grid"])
    return report


def main(argv: list[str] | None = None) -> int:
    return stage_main(__doc__, sample_and_log, report_path=REPORT_PATH, argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
