"""Samples from a prior: token grids generated (MaskGIT or GPT), decoded by the prior's tokenizer, and
written as image shards with a grid of the first images of each class (the ``sample`` stage's work).

The tokenizer is checked against the prior (checksum, codebook size, residual stages) before anything
is generated, and both decoders take a seeded generator, so the same params give the same images.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from imtok.atomic import replace_directory
from imtok.data.encoding import encode_png
from imtok.data.shards import META_NAME, to_uint8, write_json_atomic, write_shards
from imtok.images import save_grid
from imtok.params import SampleParams
from imtok.runtime import resolve_device
from imtok.sampling import autoregressive_sample, gpt_next_token_logits, maskgit_decode


def matching_tokenizer(
    params: SampleParams, prior_meta: dict[str, Any], prior_config: Any
) -> tuple[Any, str]:
    """The tokenizer to decode with, checked against what the prior was trained on."""
    from imtok.models.files import file_sha256, load_tokenizer
    from imtok.registry import fetched_model_file

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
    stages, height = tokenizer.config.stages, prior_config.grid[0]
    if height % stages:
        raise ValueError(
            f"sample.tokenizer: {location} stacks {stages} residual stages along the token grid's "
            f"height, but the prior {params.prior} generates grids {height} tokens high; use the prior's "
            "own tokenizer"
        )
    expected = prior_meta.get("tokenizer_sha256")
    if expected and actual != expected:
        raise ValueError(
            f"sample.tokenizer: {location} (sha256 {actual[:12]}) is not the tokenizer the prior "
            f"{params.prior} was trained on (sha256 {expected[:12]}, {prior_meta.get('tokenizer')}); its "
            "codes mean other things: set sample.tokenizer to null or to that tokenizer"
        )
    return tokenizer, location


def check_decoding_steps(params: SampleParams, kind: str, num_tokens: int, prior: str) -> None:
    """Refuse MaskGIT decoding in more steps than the grid has tokens (each step fixes one at least),
    before the tokenizer is fetched and anything is generated. GPT samples one token per step and
    does not read ``steps``."""
    if kind == "maskgit" and params.steps > num_tokens:
        raise ValueError(
            f"sample.steps: {params.steps} MaskGIT decoding steps for the prior {prior}, whose grid has "
            f"{num_tokens} tokens; each step fixes one token at least, so set sample.steps to at most "
            f"{num_tokens}"
        )


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


def grid_positions(labels: torch.Tensor | None, total: int, per_row: int) -> tuple[list[int], int]:
    """Which samples the grid shows, in grid order, and its row width: the first ``per_row`` of each
    requested class, class by class, cut to the rarest class's count (or the first ``per_row`` rows
    of ``per_row`` when no class was requested)."""
    if labels is None:
        return list(range(min(total, per_row * per_row))), per_row
    rows = [torch.nonzero(labels == label).flatten()[:per_row] for label in labels.unique(sorted=True)]
    width = min(per_row, min(len(row) for row in rows))
    return [int(position) for row in rows for position in row[:width]], width


def sample(
    params: SampleParams, *, samples_dir: Path, grid_path: Path, device: str = "auto"
) -> dict[str, Any]:
    """Generate, decode and write the samples on ``device`` (``run.sample.device``); returns the stage
    report.

    Batch by batch: each batch is decoded, turned into PNG records and written to the shards before
    the next one is generated, so memory holds one batch of images (and the few the grid shows),
    not the whole set: 50,000 samples at 256x256 RGB would be 39 GB as float images. The shards go to
    a staging directory that replaces ``samples_dir`` once meta.json is written.
    """
    from imtok.models.files import load_prior

    started = time.perf_counter()
    prior, payload = load_prior(params.prior)
    kind, prior_meta = payload["config"]["kind"], payload["meta"]
    check_decoding_steps(params, kind, prior.config.num_tokens, params.prior)
    tokenizer, tokenizer_location = matching_tokenizer(params, prior_meta, prior.config)
    resolved = resolve_device(device, key="run.sample.device")
    prior, tokenizer = prior.to(resolved), tokenizer.to(resolved)
    labels = requested_labels(params, prior.config.num_classes)
    total = params.count if labels is None else len(labels)
    shown, width = grid_positions(labels, total, params.grid_per_class)
    grid_images: dict[int, torch.Tensor] = {}
    image_shape: list[int] = []
    generator = torch.Generator(device=resolved).manual_seed(params.seed)

    def records() -> Iterator[dict[str, Any]]:
        for start in range(0, total, params.batch_size):
            size = min(params.batch_size, total - start)
            batch_labels = None if labels is None else labels[start : start + size].to(resolved)
            tokens = generate_tokens(prior, kind, params, batch_labels, size, generator)
            images = tokenizer.decode(tokens).cpu()  # (B, C, H, W) in [-1, 1]
            image_shape[:] = images.shape[1:]
            for position in shown:
                if start <= position < start + size:
                    # a copy: a view would keep its whole batch alive until the grid is saved
                    grid_images[position] = images[position - start].clone()
            pixels = to_uint8(images)  # (B, C, H, W) uint8
            classes = [-1] * size if batch_labels is None else batch_labels.tolist()
            for offset in range(size):
                array = pixels[offset].permute(1, 2, 0).squeeze(-1).numpy()  # (H, W) or (H, W, 3)
                yield {
                    "__key__": f"sample_{start + offset:06d}",
                    "png": encode_png(array),
                    "cls": str(int(classes[offset])).encode(),
                }

    def fill(staging: Path) -> None:
        shards = write_shards(records(), staging, maxcount=params.maxcount)
        meta = {
            "version": 1,
            "split": "samples",
            "count": total,
            "image_size": int(image_shape[-1]),
            "channels": int(image_shape[0]),
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
        write_json_atomic(staging / META_NAME, meta)

    replace_directory(samples_dir, fill)
    save_grid(torch.stack([grid_images[position] for position in shown]), grid_path, per_row=width)
    seconds = time.perf_counter() - started
    return {
        "count": total,
        "prior_kind": kind,
        "conditional": labels is not None,
        "seconds": round(seconds, 2),
        "images_per_s": round(total / max(seconds, 1e-9), 2),
        "grid": str(grid_path),
    }
