"""Training a tokenizer: the objective and the loop (single process or DDP under torchrun).

Objective, per step (weights from the ``tokenizer`` params section):

    L = recon(x, x_hat) + quantizer loss + w_p * perceptual + w_c * contrastive + w_g * lambda * GAN

- recon: L1 or L2 on [-1, 1] images; quantizer loss: commitment / codebook / prior KL (0 for FSQ);
- perceptual (``imtok.losses.PerceptualLoss``) and the probabilistic contrastive loss of Regularized VQ
  (``ProbabilisticContrastiveLoss``, regvq only) share one frozen VGG-19. Without pretrained weights
  both are switched off with a ``VGGWeightsMissingWarning``; ``TokenizerObjective.disabled`` keeps the
  reason for the MLflow tags. They are never computed on random features;
- GAN: PatchGAN with hinge loss from ``gan_start_step`` on, lambda the adaptive weight at the
  decoder's last layer (VQGAN) when ``gan_adaptive``; the discriminator has its own AdamW.

The loop checkpoints every ``checkpoint_every`` steps (atomically, with optimizer, scheduler, EMA,
discriminator and RNG states) and resumes from the newest checkpoint in its directory. A resumed
single-process run replays the same batches (``imtok.runtime.batches_from``) and RNG stream, so its
weights equal an uninterrupted run's. Under DDP the checkpoint holds rank 0's RNG state; other ranks
reseed from (seed, rank, step) on resume, so their random draws differ from an uninterrupted run's.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from imtok.data.shards import Batch, ShardLoader, iter_batches
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
from imtok.params import TokenizerParams
from imtok.quantizers import QuantizerOutput
from imtok.runtime import Progress, Runtime, all_reduce_mean, batches_from, disagreement
from imtok.training import (
    ModelEma,
    NonFiniteLossWatch,
    agreed_latest_checkpoint,
    clip_gradients,
    isolated_rng,
    load_checkpoint,
    make_scheduler,
    prune_checkpoints,
    save_checkpoint,
    sync_point,
    unwrap_model,
)

log = logging.getLogger(__name__)

MetricsCallback = Callable[[Mapping[str, float], int], None]
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


def adamw_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay weight matrices and kernels only; biases, norm scales and embeddings' 1-d params none."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


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


class MetricWindow:
    """Running means of the step metrics between two log lines (kept on device to avoid syncs)."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.count = 0

    def add(self, values: Mapping[str, Tensor]) -> None:
        for name, value in values.items():
            value = value.detach().float()
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.count += 1

    def means(self) -> dict[str, float]:
        return {name: float(total) / max(self.count, 1) for name, total in self.sums.items()}


def reseed_rank(seed: int, rank: int, step: int) -> None:
    if rank > 0:
        torch.manual_seed(int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0]))


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


def train_tokenizer(
    params: TokenizerParams,
    config: TokenizerConfig,
    *,
    train_dir: str | Path,
    val_dir: str | Path,
    checkpoint_dir: str | Path,
    runtime: Runtime,
    on_metrics: MetricsCallback | None = None,
    on_grid: GridCallback | None = None,
    checkpoint_extra: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Train (or resume training) a tokenizer to ``params.total_steps``; see the module docstring.

    ``on_metrics(metrics, step)`` and ``on_grid(images, reconstructions, step)`` are called on the main
    process only. ``checkpoint_extra`` (plain values) is stored in every checkpoint.
    """
    p = params
    device = runtime.device
    torch.manual_seed(p.seed)  # the same initial weights on every rank
    model = Tokenizer(config).to(device)
    if p.channels_last:
        model = model.to(memory_format=torch.channels_last)
    objective = TokenizerObjective(p, config.in_channels).to(device)
    agreed_losses(objective.disabled, runtime)
    if p.channels_last:
        objective = objective.to(memory_format=torch.channels_last)  # the discriminator's convolutions
    discriminator = objective.discriminator
    optimizer = torch.optim.AdamW(adamw_param_groups(model, p.weight_decay), lr=p.lr, betas=p.betas)
    scheduler = make_scheduler(
        optimizer, warmup_steps=p.warmup_steps, total_steps=p.total_steps, min_ratio=p.min_lr_ratio
    )
    d_optimizer = (
        torch.optim.AdamW(discriminator.parameters(), lr=p.lr, betas=p.betas) if discriminator else None
    )
    ema = ModelEma(model, p.ema_decay) if p.ema_decay else None
    start = 0
    checkpoint_dir = Path(checkpoint_dir)
    latest = agreed_latest_checkpoint(checkpoint_dir, runtime)
    if latest is not None:
        state = load_checkpoint(
            latest, model=model, optimizer=optimizer, scheduler=scheduler, ema=ema, config=config
        )
        start = int(state["step"])
        extra = state["extra"]
        if discriminator is not None:
            if "discriminator" not in extra:
                raise ValueError(f"{latest}: holds no discriminator state but tokenizer.gan_weight > 0")
            discriminator.load_state_dict(extra["discriminator"])
            d_optimizer.load_state_dict(extra["disc_optimizer"])  # type: ignore[union-attr]
        reseed_rank(p.seed, runtime.rank, start)
        if runtime.is_main:
            log.info("resuming from %s at step %d of %d", latest, start, p.total_steps)
    else:
        reseed_rank(p.seed, runtime.rank, 0)

    train_model: nn.Module = model
    train_discriminator = discriminator
    if runtime.distributed:
        device_ids = [device.index] if device.type == "cuda" else None
        train_model = DistributedDataParallel(model, device_ids=device_ids)
        if discriminator is not None:
            train_discriminator = DistributedDataParallel(discriminator, device_ids=device_ids)
    forward = torch.compile(train_model) if p.compile else train_model

    loader = ShardLoader(
        train_dir,
        p.batch_size,
        shuffle=True,
        num_workers=p.num_workers,
        seed=p.seed,
        pin_memory=device.type == "cuda",
        multiprocessing_context="fork" if p.num_workers else None,
    )
    validating = runtime.is_main and p.val_batches > 0
    stream = batches_from(loader, start)
    last_layer = decoder_last_layer(model)
    window = MetricWindow()
    result = TrainResult(
        model=model,
        step=start,
        start_step=start,
        disabled_losses=dict(objective.disabled),
        feature_source=objective.feature_source,
    )
    watch = NonFiniteLossWatch(
        "train_tokenizer", checkpoint_dir, "lower tokenizer.lr or set tokenizer.grad_clip"
    )
    started = time.perf_counter()
    bar = Progress(p.total_steps, start, runtime, "train_tokenizer")

    def validate(step: int) -> dict[str, float]:
        # Isolated: validation draws nothing that training then misses (val_every is not in the run's
        # fingerprint, so a run resumed with another value must still continue identically).
        with isolated_rng(device):
            # the averaged weights, which are what gets exported
            evaluated = model if ema is None else ema.averaged_copy(model)
            metrics, pair = evaluate_tokenizer(
                evaluated,
                iter_batches(val_dir, p.batch_size),
                device,
                max_batches=p.val_batches,
                recon_kind=p.recon_loss,
                autocast=runtime.autocast,
            )
        if on_grid is not None and pair is not None:
            on_grid(pair[0][: p.grid_images], pair[1][: p.grid_images], step)
        return metrics

    try:
        for step in range(start, p.total_steps):
            images = next(stream).images.to(device, non_blocking=True)
            if p.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            model.train()
            with runtime.autocast():
                reconstruction, quantized = forward(images)
                loss, terms = objective.generator_loss(
                    images, reconstruction, quantized, step, last_layer, train_discriminator
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = clip_gradients(model, p.grad_clip)
            watch.observe(step, loss=loss, grad_norm=grad_norm)
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update(model)
            step_metrics = {f"train/{name}": value for name, value in terms.items()}
            step_metrics["train/loss"] = loss
            if train_discriminator is not None and gan_factor(step, p.gan_start_step) > 0:
                with runtime.autocast():
                    real = train_discriminator(images)
                    fake = train_discriminator(reconstruction.detach().float())
                    d_loss = hinge_d_loss(real.float(), fake.float())
                d_optimizer.zero_grad(set_to_none=True)  # type: ignore[union-attr]
                d_loss.backward()
                d_optimizer.step()  # type: ignore[union-attr]
                step_metrics["train/disc"] = d_loss
                watch.observe(step, disc_loss=d_loss)
            with torch.no_grad():
                clamped = reconstruction.detach().float().clamp(-1, 1)
                step_metrics["train/psnr"] = psnr(images, clamped).clamp(max=MAX_PSNR_DB).mean()
            step_metrics["train/codebook_usage_pct"] = 100.0 * quantized.stats["usage"]
            step_metrics["train/perplexity"] = quantized.stats["perplexity"]
            step_metrics["train/grad_norm"] = grad_norm
            window.add(step_metrics)
            done = step + 1
            bar.update(1)
            last = done == p.total_steps
            if sync_point(done, p.total_steps, p.log_every, p.val_every, p.checkpoint_every):
                watch.check(runtime.distributed)  # before any metric is logged or checkpoint written
            if done % p.log_every == 0 or last:
                means = all_reduce_mean(window.means(), runtime)
                means["train/lr"] = scheduler.get_last_lr()[0]
                elapsed = time.perf_counter() - started
                means["train/images_per_s"] = (done - start) * p.batch_size * runtime.world_size / elapsed
                result.train = means
                window = MetricWindow()
                if runtime.is_main:
                    bar.report(
                        done,
                        ("images/s", means["train/images_per_s"]),
                        loss=f"{means['train/loss']:.4f}",
                        psnr=f"{means['train/psnr']:.2f}",
                        usage=f"{means['train/codebook_usage_pct']:.1f}%",
                    )
                    if on_metrics is not None:
                        on_metrics(means, done)
            if validating and (done % p.val_every == 0 or last):
                result.val = {f"val/{name}": value for name, value in validate(done).items()}
                if on_metrics is not None:
                    on_metrics(result.val, done)
            if done % p.checkpoint_every == 0 or last:
                if runtime.is_main:
                    extra = dict(checkpoint_extra or {})
                    if discriminator is not None:
                        extra["discriminator"] = discriminator.state_dict()
                        extra["disc_optimizer"] = d_optimizer.state_dict()  # type: ignore[union-attr]
                    save_checkpoint(
                        checkpoint_dir / f"step-{done:08d}.pt",
                        model=model,
                        optimizer=optimizer,
                        scheduler=scheduler,
                        step=done,
                        ema=ema,
                        extra=extra,
                        config=config,
                    )
                    prune_checkpoints(checkpoint_dir, keep=p.keep_checkpoints)
                runtime.barrier()
            result.step = done
    finally:
        bar.close()
    result.seconds = time.perf_counter() - started
    trained = result.step - start
    result.images_per_s = trained * p.batch_size * runtime.world_size / max(result.seconds, 1e-9)
    if ema is not None:
        ema.copy_to(model)
    return result
