"""DVC stage `train_tokenizer`: image shards -> models/tokenizer/, one MLflow run, a registered model.

Run from the repository root as ``python -m stages.train_tokenizer``, or on N GPUs / processes as
``torchrun --nproc-per-node N -m stages.train_tokenizer``. Reads the ``tokenizer`` params section and
``data/shards/{train,val}``; writes

- ``models/tokenizer/tokenizer.pt`` (weights-only model file) and ``tokenizer.json`` (config, provenance,
  the registered MLflow version), ``reconstructions.png`` (val inputs over their reconstructions);
- ``reports/train_tokenizer.json`` (DVC metrics: full val split PSNR, codebook usage, perplexity);
- checkpoints under ``checkpoints/tokenizer/<fingerprint>/``, the fingerprint hashing every param that
  changes what is computed (not logging or checkpoint intervals), the train split's meta.json and the
  code (``imtok.runtime.code_digest``). A run killed midway and started again with the same params and
  code resumes from its newest checkpoint; after a code change it trains anew.

MLflow: one run (resumed runs continue it) with all params, git commit and stage tags, train/ and val/
metrics, reconstruction grids and system metrics; the model is registered as ``imtok-tokenizer`` with
alias ``candidate``. The ``--no-register`` flag skips logging the model (quick local experiments).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from imtok import layout
from imtok.data.shards import iter_batches, read_meta
from imtok.images import paired_rows, save_grid
from imtok.params import Params, TokenizerParams, check_discriminator_depth
from imtok.runtime import (
    Runtime,
    agreed_fingerprint,
    code_digest,
    run_fingerprint,
    setup_runtime,
    shutdown_runtime,
)
from stages.common import Registration, export_model, no_register_option, stage_main, training_run

log = logging.getLogger("stages.train_tokenizer")

STAGE = "train_tokenizer"
SHARDS_DIR = Path(layout.SHARDS)
OUT_DIR = Path(layout.TOKENIZER)
CHECKPOINT_ROOT = Path(layout.CHECKPOINTS) / "tokenizer"
REPORT_PATH = Path(layout.REPORTS) / "train_tokenizer.json"
REGISTERED_NAME = "imtok-tokenizer"
MODEL_DESCRIPTION = (
    "Image tokenizers trained by imtok's train_tokenizer stage, one version per run. Each version's "
    "description and tags give its quantizer, codes, levels, token grid, dataset, commit and val "
    "metrics; alias candidate is the newest, champion the best on evaluate.tokenizer_metric."
)
MODEL_FILE = "tokenizer.pt"


def data_shape(shards_dir: Path, downsample: int) -> tuple[int, int, dict[str, Any]]:
    """(channels, image_size, train meta) of the prepared shards, checked against the tokenizer."""
    meta = read_meta(shards_dir / "train")
    read_meta(shards_dir / "val")  # fail early, naming the split, when val is missing
    size, channels = int(meta["image_size"]), int(meta["channels"])
    if size % downsample:
        raise ValueError(
            f"tokenizer.downsample: {shards_dir / 'train'} holds {size}x{size} images, not divisible by "
            f"tokenizer.downsample={downsample}; re-run prepare with prepare.image_size a multiple of it"
        )
    return channels, size, meta


def fingerprint(params: TokenizerParams, channels: int, image_size: int, train_meta: dict[str, Any]) -> str:
    data = json.dumps(train_meta, sort_keys=True)
    values = {
        **params.as_dict(),
        "channels": channels,
        "image_size": image_size,
        "train_meta": data,
        "code": code_digest(__file__),
    }
    return run_fingerprint(values, TokenizerParams.RUNTIME_KEYS)


def version_tags(
    params: Params, config: Any, final: dict[str, float], commit: str, run_fingerprint: str
) -> dict[str, Any]:
    """What a person filters by when browsing the registry."""
    from imtok.models.autoencoder import GRID_QUANTIZERS, build_quantizer

    quantizer = build_quantizer(
        config.quantizer,
        levels=config.levels,
        codebook_size=config.codebook_size,
        dim=config.latent_dim,
        **config.quantizer_options,
    )
    tags = {
        "quantizer": config.quantizer,
        "codebook_size": quantizer.codebook_size,
        "token_grid": "x".join(map(str, config.token_grid)),
        "image_size": config.image_size,
        "dataset": params.prepare.source,
        "git_commit": commit,
        "fingerprint": run_fingerprint,
        "val_psnr": f"{final['psnr']:.3f}",
        "val_codebook_usage_pct": f"{final['codebook_usage_pct']:.2f}",
    }
    if config.quantizer in GRID_QUANTIZERS:
        tags["levels"] = ",".join(map(str, quantizer.levels))
    return tags


def describe(tags: dict[str, Any]) -> str:
    """The registry's one line for a tokenizer version, from its ``version_tags``."""
    levels = f" (levels {tags['levels']})" if "levels" in tags else ""
    return (
        f"{tags['quantizer']}, {tags['codebook_size']} codes{levels}, {tags['token_grid']} tokens of "
        f"{tags['image_size']}px {tags['dataset']} images; val PSNR {float(tags['val_psnr']):.2f} dB, "
        f"codebook usage {float(tags['val_codebook_usage_pct']):.1f}%"
    )


def train(
    params: Params,
    *,
    shards_dir: Path = SHARDS_DIR,
    out_dir: Path = OUT_DIR,
    checkpoint_root: Path = CHECKPOINT_ROOT,
    register: bool = True,
    runtime: Runtime | None = None,
) -> dict[str, Any] | None:
    """Train, export and register the tokenizer; returns the report on the main process (else None)."""
    from imtok import tracking
    from imtok.trainers.tokenizer import evaluate_tokenizer, train_tokenizer

    section = params.tokenizer
    channels, image_size, train_meta = data_shape(shards_dir, section.downsample)
    # The shards' size is what trains, whatever prepare.image_size says now.
    check_discriminator_depth(section, image_size, f"{shards_dir / 'train'}: image_size")
    config = params.tokenizer_config(channels, image_size)
    runtime = runtime or setup_runtime(
        section.device, section.precision, dist_timeout_s=params.run.dist_timeout_s
    )
    run_key = agreed_fingerprint(fingerprint(section, channels, image_size, train_meta), runtime, "tokenizer")
    checkpoint_dir = checkpoint_root / run_key
    commit = tracking.git_commit()
    tags = {"imtok.fingerprint": run_key, "imtok.quantizer": section.quantizer}
    with training_run(STAGE, dataclasses.asdict(params), tags, checkpoint_dir, runtime.is_main) as run:

        def on_grid(images: Any, reconstructions: Any, step: int) -> None:
            with tempfile.TemporaryDirectory() as scratch:
                path = save_grid(paired_rows(images, reconstructions), Path(scratch) / f"step-{step:08d}.png")
                tracking.log_artifact(path, "reconstructions")

        extra = {"mlflow_run_id": run.info.run_id if run else None, "fingerprint": run_key}
        result = train_tokenizer(
            section,
            config,
            train_dir=shards_dir / "train",
            val_dir=shards_dir / "val",
            checkpoint_dir=checkpoint_dir,
            runtime=runtime,
            on_metrics=tracking.log_metrics if runtime.is_main else None,
            on_grid=on_grid if runtime.is_main else None,
            checkpoint_extra=extra,
        )
        if not runtime.is_main:
            return None
        if result.disabled_losses:
            tracking.set_tags(
                {f"imtok.loss.{name}": f"disabled: {why}" for name, why in result.disabled_losses.items()}
            )
        if result.feature_source:
            tracking.set_tags({"imtok.vgg_weights": result.feature_source})
        model = result.model.eval()
        final, pair = evaluate_tokenizer(
            model,
            iter_batches(shards_dir / "val", section.batch_size),
            runtime.device,
            recon_kind=section.recon_loss,
            autocast=runtime.autocast,
        )
        tracking.log_metrics({f"final/{name}": value for name, value in final.items()}, result.step)
        model = model.cpu()
        summary: dict[str, Any] = {
            "stage": STAGE,
            "step": result.step,
            "fingerprint": run_key,
            "codebook_size": model.codebook_size,
            "token_grid": list(config.token_grid),
            "image_size": image_size,
            "channels": channels,
            "git_commit": commit,
            "mlflow_run_id": run.info.run_id,
            "val": final,
        }

        def add_grid(staging: Path) -> None:
            if pair is not None:
                count = section.grid_images
                save_grid(paired_rows(pair[0][:count], pair[1][:count]), staging / "reconstructions.png")

        def registration() -> Registration:
            found = version_tags(params, config, final, commit, run_key)
            shape = (channels, image_size, image_size)
            return Registration(REGISTERED_NAME, shape, found, describe(found), MODEL_DESCRIPTION)

        export_model(
            out_dir,
            kind="tokenizer",
            model_file=MODEL_FILE,
            config=config,
            model=model,
            summary=summary,
            registration=registration if register else None,
            also=add_grid,
        )
        report = {
            "step": result.step,
            "resumed_from_step": result.start_step,
            "seconds": round(result.seconds, 2),
            "images_per_s": round(result.images_per_s, 1),
            "precision": runtime.precision,
            "world_size": runtime.world_size,
            "disabled_losses": sorted(result.disabled_losses),
            "val": {name: round(value, 5) for name, value in final.items()},
        }
        return report


def train_in_runtime(params: Params, args: Any) -> dict[str, Any] | None:
    section = params.tokenizer
    runtime = setup_runtime(section.device, section.precision, dist_timeout_s=params.run.dist_timeout_s)
    try:
        return train(params, register=not args.no_register, runtime=runtime)
    finally:
        shutdown_runtime(runtime)


def main(argv: list[str] | None = None) -> int:
    return stage_main(
        __doc__, train_in_runtime, report_path=REPORT_PATH, argv=argv, options=no_register_option
    )


if __name__ == "__main__":
    raise SystemExit(main())
