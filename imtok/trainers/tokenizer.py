"""Training a tokenizer: the objective, and the task that plugs it into ``imtok.engine``.

Objective, per step (weights from the ``tokenizer`` params section):

    L = recon(x, x_hat) + quantizer loss + w_p * perceptual + w_c * contrastive + w_g * lambda * GAN

- recon: L1 or L2 on [-1, 1] images; quantizer loss: commitment / codebook / prior KL (0 for FSQ);
- perceptual (``imtok.losses.PerceptualLoss``) and the probabilistic contrastive loss of Regularized VQ
  (``ProbabilisticContrastiveLoss``, regvq only) share one frozen VGG-19. Without pretrained weights
  both are switched off with a ``VGGWeightsMissingWarning``; ``TokenizerObjective.disabled`` keeps the
  reason for the MLflow tags. They are never computed on random features;
- GAN: PatchGAN with hinge loss from ``gan_start_step`` on, lambda the adaptive weight at the
  decoder's last layer (VQGAN) when ``gan_adaptive``; the discriminator has its own AdamW, its
  weights and optimizer state travel in the engine's checkpoints.

The loop, checkpoints and resume are the engine's (``imtok.engine``). Batches come from the train
shards in an order replayed from any step (``imtok.runtime.batches_from``), so a resumed
single-process run equals an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from imtok import engine
from imtok.data.shards import Batch, ShardLoader, iter_batches, read_meta
from imtok.engine import MetricsCallback, wrap_ddp
from imtok.images import paired_rows, save_grid
from imtok.losses import (
    PatchDiscriminator,
    PerceptualLoss,
    ProbabilisticContrastiveLoss,
    VGGFeatures,
    VGGWeightsMissingWarning,
    adaptive_gan_weight,
    gan_factor,
    generator_adversarial_loss,
    hinge_d_loss,
    load_vgg_weights,
    reconstruction_loss,
)
from imtok.metrics.codebook import CodeCounter
from imtok.metrics.recon import MAX_PSNR_DB, ReconstructionTotals, psnr
from imtok.models.autoencoder import Tokenizer, TokenizerConfig, evaluating
from imtok.params import Params, TokenizerParams, TokenizerRun, check_discriminator_depth
from imtok.quantizers import QuantizerOutput
from imtok.runtime import (
    Runtime,
    agreed_fingerprint,
    batches_from,
    code_digest,
    disagreement,
    run_fingerprint,
)
from imtok.trainers.export import Registration, finish_training, training_run
from imtok.training import NonFiniteLossWatch, unwrap_model

GridCallback = Callable[[Tensor, Tensor, int], None]


class TokenizerObjective(nn.Module):
    """The generator-side losses and the optional discriminator, configured from the params."""

    def __init__(self, params: TokenizerParams, in_channels: int) -> None:
        super().__init__()
        self.params = params
        self.disabled: dict[str, str] = {}  # loss name -> why it is off although its weight is > 0
        self.feature_source: str | None = None
        wanted = []
        if params.perceptual_weight > 0:
            wanted.append("perceptual")
        if params.quantizer == "regvq" and params.pcl_weight > 0:
            wanted.append("contrastive")
        features = None
        if wanted:
            weights = load_vgg_weights(params.vgg_weights)
            if weights.state_dict is None:
                for name in wanted:
                    self.disabled[name] = str(weights.reason)
                warnings.warn(
                    f"{' and '.join(wanted)} loss disabled: {weights.reason}",
                    VGGWeightsMissingWarning,
                    stacklevel=2,
                )
            else:
                features = VGGFeatures(weights.state_dict, weights.source or "given state dict")
                self.feature_source = weights.source
        self.perceptual = PerceptualLoss(features=features) if features and "perceptual" in wanted else None
        self.contrastive = (
            ProbabilisticContrastiveLoss(
                features=features, num_patches=params.pcl_patches, temperature=params.pcl_temperature
            )
            if features and "contrastive" in wanted
            else None
        )
        self.discriminator = (
            PatchDiscriminator(in_channels, params.disc_channels, params.disc_layers, norm_layer=nn.GroupNorm)
            if params.gan_weight > 0
            else None
        )

    def generator_loss(
        self,
        images: Tensor,
        reconstruction: Tensor,
        quantized: QuantizerOutput,
        step: int,
        last_layer: Tensor,
        discriminator: nn.Module | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Total loss and its (weighted) terms; ``discriminator`` defaults to the own (unwrapped) one."""
        p = self.params
        reconstruction = reconstruction.float()
        recon = reconstruction_loss(reconstruction, images, p.recon_loss)
        terms = {"recon": recon, "quantizer": quantized.loss.float()}
        if self.perceptual is not None:
            terms["perceptual"] = p.perceptual_weight * self.perceptual(images, reconstruction)
        if self.contrastive is not None:
            weights = quantized.stats["pcl_weights"]
            terms["contrastive"] = p.pcl_weight * self.contrastive(images, reconstruction, weights)
        factor = gan_factor(step, p.gan_start_step, p.gan_weight)
        if self.discriminator is not None and factor > 0:
            g_loss = generator_adversarial_loss((discriminator or self.discriminator)(reconstruction))
            balance = (
                adaptive_gan_weight(recon + terms.get("perceptual", 0.0), g_loss, last_layer)
                if p.gan_adaptive
                else torch.ones_like(recon)  # a fill on the device, not a copy from the host
            )
            terms["gan"] = factor * balance * g_loss
            terms["gan_weight"] = balance.detach()
        total = sum(value for name, value in terms.items() if name != "gan_weight")
        return total, terms


def decoder_last_layer(model: nn.Module) -> Tensor:
    """Weight of the decoder's final convolution, where the adaptive GAN weight compares gradients."""
    return unwrap_model(model).decoder.blocks[-1].weight


@torch.no_grad()
def evaluate_tokenizer(
    model: Tokenizer,
    batches: Iterable[Batch],
    device: torch.device,
    *,
    max_batches: int | None = None,
    recon_kind: str = "l1",
    autocast: Callable[[], Any] | None = None,
) -> tuple[dict[str, float], tuple[Tensor, Tensor] | None]:
    """Validation metrics over (up to ``max_batches`` of) ``batches``, and the first batch's pair.

    Images are reconstructed as ``decode(encode(x))`` does (eval mode, argmax codes, clamped), so the
    numbers describe the tokens that later stages use. Pass each image once (``iter_batches``); usage
    and perplexity are over all evaluated images.
    """
    counter = CodeCounter(model.codebook_size)
    quality = ReconstructionTotals()  # PSNR and SSIM
    totals = {"recon": 0.0, "mse": 0.0}
    count = 0
    first = None
    with evaluating(model):
        for index, batch in enumerate(batches):
            if max_batches is not None and index >= max_batches:
                break
            images = batch.images.to(device)
            with autocast() if autocast else torch.autocast(device.type, enabled=False):
                reconstruction, quantized = model(images)
            reconstruction = reconstruction.float().clamp(-1.0, 1.0)
            counter.update(quantized.stats.get("argmax_indices", quantized.indices))
            size = images.shape[0]
            totals["recon"] += float(reconstruction_loss(reconstruction, images, recon_kind)) * size  # type: ignore[arg-type]
            totals["mse"] += float((reconstruction - images).pow(2).mean()) * size
            quality.add(images, reconstruction)
            count += size
            if first is None:
                first = (images.cpu(), reconstruction.cpu())
    if count == 0:
        raise ValueError("validation: the split holds no images")
    metrics = {name: value / count for name, value in totals.items()} | quality.metrics()
    metrics["codebook_usage_pct"] = 100.0 * counter.usage()
    metrics["perplexity"] = counter.perplexity()
    metrics["images"] = float(count)
    return metrics, first


@dataclass
class TrainResult:
    """What a finished (or resumed-and-finished) run produced."""

    model: Tokenizer  # unwrapped, on the training device, EMA weights when EMA is on
    step: int
    start_step: int
    val: dict[str, float] = field(default_factory=dict)
    train: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    images_per_s: float = 0.0
    disabled_losses: dict[str, str] = field(default_factory=dict)
    feature_source: str | None = None


def agreed_losses(disabled: Mapping[str, str], runtime: Runtime) -> None:
    """Raise the same ValueError on every rank unless all ranks switched off the same losses.

    Whether the perceptual and contrastive losses run depends on the VGG-19 weights each rank finds
    (``tokenizer.vgg_weights``, else the node's caches). Ranks on nodes that differ there would
    average gradients of different objectives and then stop in a collective of mismatched size.
    """
    gathered = disagreement(sorted(disabled), runtime)
    if gathered is not None:
        listing = "; ".join(
            f"rank {rank}: {', '.join(value) or 'none'} off" for rank, value in enumerate(gathered)
        )
        raise ValueError(
            f"tokenizer.vgg_weights: the ranks found different VGG-19 weights, so they would train "
            f"different losses ({listing}); set tokenizer.vgg_weights to a file every node can read, or "
            "put the weights in every node's cache"
        )


class TokenizerTask(engine.Task):
    """The tokenizer as an ``imtok.engine`` task: the objective above on shard batches, the
    discriminator's own step after the generator's, validation on the val split with a grid of
    reconstructions."""

    name = "train_tokenizer"
    prefix = "tokenizer"
    unit = "images"
    advice = "lower tokenizer.lr or set tokenizer.grad_clip"

    def __init__(
        self,
        params: TokenizerParams,
        config: TokenizerConfig,
        *,
        run: TokenizerRun,
        train_dir: str | Path,
        val_dir: str | Path,
        runtime: Runtime,
        on_grid: GridCallback | None = None,
    ) -> None:
        self.p, self.run, self.config, self.runtime, self.on_grid = params, run, config, runtime, on_grid
        self.train_dir, self.val_dir = train_dir, val_dir

    def build(self, device: torch.device) -> nn.Module:
        p = self.p
        self.device = device
        model = Tokenizer(self.config).to(device)
        if p.channels_last:
            model = model.to(memory_format=torch.channels_last)
        objective = TokenizerObjective(p, self.config.in_channels).to(device)
        agreed_losses(objective.disabled, self.runtime)
        if p.channels_last:
            objective = objective.to(memory_format=torch.channels_last)  # the discriminator's convolutions
        self.objective, self.discriminator = objective, objective.discriminator
        self.d_optimizer = (
            torch.optim.AdamW(self.discriminator.parameters(), lr=p.lr, betas=p.betas)
            if self.discriminator is not None
            else None
        )
        self.model = model
        return model

    def load_state(self, extra: Mapping[str, Any], path: Path) -> None:
        if self.discriminator is not None:
            if "discriminator" not in extra:
                raise ValueError(f"{path}: holds no discriminator state but tokenizer.gan_weight > 0")
            self.discriminator.load_state_dict(extra["discriminator"])
            self.d_optimizer.load_state_dict(extra["disc_optimizer"])  # type: ignore[union-attr]

    def state(self) -> dict[str, Any]:
        if self.discriminator is None:
            return {}
        return {
            "discriminator": self.discriminator.state_dict(),
            "disc_optimizer": self.d_optimizer.state_dict(),  # type: ignore[union-attr]
        }

    def bind(self, train_model: nn.Module, runtime: Runtime, start: int) -> None:
        p, workers = self.p, self.run.num_workers
        self.train_discriminator = (
            wrap_ddp(self.discriminator, runtime) if self.discriminator is not None else None
        )
        self.forward = torch.compile(train_model) if self.run.compile else train_model
        loader = ShardLoader(
            self.train_dir,
            p.batch_size,
            shuffle=True,
            num_workers=workers,
            seed=p.seed,
            pin_memory=self.device.type == "cuda",
            multiprocessing_context="fork" if workers else None,
        )
        self.stream = batches_from(loader, start)
        self.last_layer = decoder_last_layer(self.model)

    def losses(self, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        images = next(self.stream).images.to(self.device, non_blocking=True)
        if self.p.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        reconstruction, quantized = self.forward(images)
        loss, terms = self.objective.generator_loss(
            images, reconstruction, quantized, step, self.last_layer, self.train_discriminator
        )
        self.images, self.reconstruction, self.quantized = images, reconstruction, quantized
        return loss, {**terms, "loss": loss}

    def after_step(self, step: int, watch: NonFiniteLossWatch) -> dict[str, Tensor]:
        images, reconstruction, quantized = self.images, self.reconstruction, self.quantized
        metrics: dict[str, Tensor] = {}
        if self.train_discriminator is not None and gan_factor(step, self.p.gan_start_step) > 0:
            with self.runtime.autocast():
                real = self.train_discriminator(images)
                fake = self.train_discriminator(reconstruction.detach().float())
                d_loss = hinge_d_loss(real.float(), fake.float())
            self.d_optimizer.zero_grad(set_to_none=True)  # type: ignore[union-attr]
            d_loss.backward()
            self.d_optimizer.step()  # type: ignore[union-attr]
            metrics["disc"] = d_loss
            watch.observe(step, disc_loss=d_loss)
        with torch.no_grad():
            clamped = reconstruction.detach().float().clamp(-1, 1)
            metrics["psnr"] = psnr(images, clamped).clamp(max=MAX_PSNR_DB).mean()
        metrics["codebook_usage_pct"] = 100.0 * quantized.stats["usage"]
        metrics["perplexity"] = quantized.stats["perplexity"]
        self.images = self.reconstruction = self.quantized = None  # free the step's activations
        return metrics

    def can_validate(self) -> bool:
        return True

    def validate(self, model: nn.Module, step: int) -> dict[str, float]:
        metrics, pair = evaluate_tokenizer(
            model,
            iter_batches(self.val_dir, self.p.batch_size),
            self.device,
            max_batches=self.run.val_batches,
            recon_kind=self.p.recon_loss,
            autocast=self.runtime.autocast,
        )
        if self.on_grid is not None and pair is not None:
            count = self.run.grid_images
            self.on_grid(pair[0][:count], pair[1][:count], step)
        return metrics

    def progress(self, means: Mapping[str, float]) -> dict[str, str]:
        return {
            "loss": f"{means['train/loss']:.4f}",
            "psnr": f"{means['train/psnr']:.2f}",
            "usage": f"{means['train/codebook_usage_pct']:.1f}%",
        }


def train_tokenizer(
    params: TokenizerParams,
    config: TokenizerConfig,
    *,
    run: TokenizerRun,
    train_dir: str | Path,
    val_dir: str | Path,
    checkpoint_dir: str | Path,
    runtime: Runtime,
    on_metrics: MetricsCallback | None = None,
    on_grid: GridCallback | None = None,
    checkpoint_extra: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Train (or resume training) a tokenizer to ``params.total_steps`` with ``imtok.engine``, at the
    cadence and with the loader processes of ``run``.

    ``on_metrics(metrics, step)`` and ``on_grid(images, reconstructions, step)`` are called on the main
    process only. ``checkpoint_extra`` (plain values) is stored in every checkpoint.
    """
    task = TokenizerTask(
        params, config, run=run, train_dir=train_dir, val_dir=val_dir, runtime=runtime, on_grid=on_grid
    )
    trained = engine.train(
        task,
        params,
        run,
        checkpoint_dir=checkpoint_dir,
        runtime=runtime,
        on_metrics=on_metrics,
        checkpoint_extra=checkpoint_extra,
    )
    return TrainResult(
        model=trained.model,  # type: ignore[arg-type]
        step=trained.step,
        start_step=trained.start_step,
        val=trained.val,
        train=trained.train,
        seconds=trained.seconds,
        images_per_s=trained.units_per_s,
        disabled_losses=dict(task.objective.disabled),
        feature_source=task.objective.feature_source,
    )


# The train_tokenizer stage's run: train, measure on val, export, register, report.

STAGE = "train_tokenizer"
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
    """What a run computes: its params (with only the chosen quantizer's options: another's do not
    change this run), the data's shape and meta.json, and the code."""
    data = json.dumps(train_meta, sort_keys=True)
    values = {
        **params.as_dict(),
        "quantizer_options": params.chosen_options,
        "channels": channels,
        "image_size": image_size,
        "train_meta": data,
        "code": code_digest(),
    }
    return run_fingerprint(values)


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


def train_and_export(
    params: Params,
    *,
    shards_dir: Path,
    out_dir: Path,
    checkpoint_root: Path,
    runtime: Runtime,
    register: bool = True,
) -> dict[str, Any] | None:
    """The ``train_tokenizer`` stage's work: train (or resume) on ``shards_dir``, measure the whole val
    split, export to ``out_dir`` and register; returns the stage report on the main process (else None).
    The caller holds ``runtime`` (``imtok.runtime.setup_runtime`` from ``run.tokenizer.device`` and
    ``tokenizer.precision``) and shuts it down. ``run.tokenizer`` sets the cadence and loader.

    Checkpoints go to ``checkpoint_root/<fingerprint>``, the fingerprint hashing every param that
    changes what is computed, the train split's meta.json and the code.
    """
    from imtok import tracking

    section = params.tokenizer
    channels, image_size, train_meta = data_shape(shards_dir, section.downsample)
    # The shards' size is what trains, whatever prepare.image_size says now.
    check_discriminator_depth(section, image_size, f"{shards_dir / 'train'}: image_size")
    config = params.tokenizer_config(channels, image_size)
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
            run=params.run.tokenizer,
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

        def add_grid(staging: Path) -> None:
            if pair is not None:
                count = params.run.tokenizer.grid_images
                save_grid(paired_rows(pair[0][:count], pair[1][:count]), staging / "reconstructions.png")

        def registration() -> Registration:
            found = version_tags(params, config, final, commit, run_key)
            shape = (channels, image_size, image_size)
            return Registration(REGISTERED_NAME, shape, found, describe(found), MODEL_DESCRIPTION)

        return finish_training(
            out_dir,
            stage=STAGE,
            run=run,
            run_key=run_key,
            commit=commit,
            result=result,
            final=final,
            runtime=runtime,
            kind="tokenizer",
            model_file=MODEL_FILE,
            config=config,
            registration=registration if register else None,
            also=add_grid,
            summary={
                "codebook_size": model.codebook_size,
                "token_grid": list(config.token_grid),
                "image_size": image_size,
                "channels": channels,
            },
            report={
                "images_per_s": round(result.images_per_s, 1),
                "disabled_losses": sorted(result.disabled_losses),
            },
        )
