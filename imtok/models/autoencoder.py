"""Convolutional image tokenizer: a VQGAN-style encoder and decoder around one of ``QUANTIZERS``.

images (B, C, H, W) -> Encoder -> quant_conv -> quantizer -> post_quant_conv -> Decoder -> (B, C, H, W)

The encoder halves the resolution once per extra entry of ``channel_multipliers``, so a token covers
f x f pixels with f = 2 ** (len(channel_multipliers) - 1). Reconstructions are not squashed by a tanh
(as in VQGAN): ``forward`` returns the raw decoder output so the reconstruction loss keeps its gradient
everywhere, and only ``decode(indices)``, which produces images for viewing, metrics and sampling,
clamps them to [-1, 1].

Tokens are the quantizer's indices, (B, h, w); a residual quantizer's per-stage indices (B, S, h, w) are
stacked along the height into (B, S*h, w) (``imtok.quantizers.residual_fsq``: stage 0's rows first),
so priors, token shards and sampling see one grid of ``token_grid`` whatever the quantizer.
"""

import importlib
import inspect
import math
import typing
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from imtok.models.architecture import QUANTIZER_CLASSES, TokenizerArchitecture, raise_first_failed
from imtok.quantizers import QuantizerOutput
from imtok.quantizers.fsq import FSQ, validate_levels
from imtok.quantizers.residual_fsq import DEFAULT_STAGES, MAX_STAGES, split_stages, stack_stages
from imtok.typerules import type_name, value_matches


def _quantizer_class(at: str) -> type[nn.Module]:
    module, _, name = at.partition(":")
    return getattr(importlib.import_module(module), name)


# The classes of imtok.models.architecture.QUANTIZER_CLASSES, by name.
QUANTIZERS: dict[str, type[nn.Module]] = {
    kind: _quantizer_class(at) for kind, at in QUANTIZER_CLASSES.items()
}
BINARY_QUANTIZERS = ("lfq", "bsq")  # one bit per channel: 2^latent_dim codes
GRID_QUANTIZERS = ("fsq", "rfsq")  # FSQ levels: one channel per level, codebook = prod(levels)

# Codebook size used when none is given: the FSQ paper's middle setting (FSQ gets its Table 1 levels).
DEFAULT_CODEBOOK_SIZE = 2**10
# Channels of vq/regvq codes when latent_dim is not given: low-dimensional codes are used more evenly
# (as ViT-VQGAN's factorized codes) and are comparable to FSQ's handful of channels.
DEFAULT_CODE_DIM = 8

# GroupNorm with at most VQGAN's 32 groups and at least 4 channels per group: narrow CPU models
# (16-64 channels) then still normalise over several channels instead of one.
MAX_NORM_GROUPS = 32
MIN_CHANNELS_PER_GROUP = 4


def norm_groups(channels: int) -> int:
    """The largest GroupNorm group count that divides ``channels`` within the limits above."""
    most = max(1, min(MAX_NORM_GROUPS, channels // MIN_CHANNELS_PER_GROUP))
    return next(groups for groups in range(most, 0, -1) if channels % groups == 0)


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm over ``channels`` with ``norm_groups(channels)`` groups."""
    return nn.GroupNorm(norm_groups(channels), channels, eps=1e-6)


def conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    """3x3 convolution that keeps the spatial size."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)


def quantizer_option_defaults(kind: str) -> dict[str, Any]:
    """The options of quantizer ``kind`` (its constructor's keyword-only arguments) and their defaults."""
    parameters = inspect.signature(QUANTIZERS[kind]).parameters.values()
    return {p.name: p.default for p in parameters if p.kind == p.KEYWORD_ONLY}


def check_quantizer_options(kind: str, options: Mapping[str, Any], where: str) -> None:
    """Refuse an option ``kind`` does not take, or a value of the wrong type (the params' strict rules,
    ``imtok.typerules``), naming ``<where>.<option>``."""
    accepted = quantizer_option_defaults(kind)
    hints = typing.get_type_hints(QUANTIZERS[kind].__init__)
    for name, value in options.items():
        if name not in accepted:
            raise ValueError(
                f"{where}: unknown option {name!r} for {kind!r}; its options are {', '.join(accepted)}"
            )
        if name in hints and not value_matches(value, hints[name])[0]:
            words = isinstance(value, str) and value.lower() in ("yes", "no", "on", "off", "y", "n")
            hint = " (YAML 1.2 reads yes/no/on/off as text: write true or false)" if words else ""
            raise ValueError(
                f"{where}.{name}: expected {type_name(hints[name])} for {kind!r}, got {value!r}{hint}"
            )


def options_by_quantizer(
    given: Mapping[str, Any], where: str = "tokenizer.quantizer_options"
) -> dict[str, Any]:
    """Every quantizer's options (``{kind: {option: value}}``): ``given``'s values over the defaults.

    Each quantizer's options are stated under its name, so any of them can be set like every other
    key (``dvc exp run -S tokenizer.quantizer_options.vq.kmeans_init=false``); only the options of
    the chosen ``tokenizer.quantizer`` reach the model. Unknown quantizers and options, wrong types
    and the older flat form (``quantizer_options: {beta: 0.25}``) are refused naming the key.
    """
    for key in given:
        if key not in QUANTIZERS:
            owners = [kind for kind in QUANTIZERS if key in quantizer_option_defaults(kind)]
            flat = (
                f"; options are given per quantizer: write {{{owners[0]}: {{{key}: ...}}}}" if owners else ""
            )
            raise ValueError(
                f"{where}.{key}: unknown quantizer; the quantizers are {', '.join(QUANTIZERS)}{flat}"
            )
    options: dict[str, Any] = {}
    for kind in QUANTIZERS:
        values = given.get(kind)
        values = {} if values is None else values  # `vq:` with nothing under it: the defaults
        if not isinstance(values, Mapping):
            raise ValueError(
                f"{where}.{kind}: expected a mapping of {kind}'s options to values, got {values!r}"
            )
        check_quantizer_options(kind, values, f"{where}.{kind}")
        options[kind] = {**quantizer_option_defaults(kind), **values}
    return options


def _quantizer_arguments(
    kind: str,
    levels: Sequence[int] | None,
    codebook_size: int | None,
    dim: int | None,
    options: Mapping[str, Any],
) -> tuple[type[nn.Module], tuple[Any, ...]]:
    """Check the quantizer fields and return its class and positional arguments."""
    if kind not in QUANTIZERS:
        raise ValueError(f"tokenizer.quantizer: unknown kind {kind!r}; use one of {', '.join(QUANTIZERS)}")
    cls = QUANTIZERS[kind]
    check_quantizer_options(kind, options, "tokenizer.quantizer_options")
    if codebook_size is not None and codebook_size < 2:
        raise ValueError(f"tokenizer.codebook_size: expected an integer >= 2 or null, got {codebook_size}")
    if dim is not None and dim < 1:
        raise ValueError(f"tokenizer.latent_dim: expected an integer >= 1 or null, got {dim}")
    if kind not in GRID_QUANTIZERS and levels is not None:
        raise ValueError(f"tokenizer.levels: only fsq and rfsq take levels; set it to null for {kind!r}")
    if kind == "rfsq" and not 1 <= options.get("stages", DEFAULT_STAGES) <= MAX_STAGES:
        raise ValueError(
            f"tokenizer.quantizer_options.stages: expected an integer from 1 to {MAX_STAGES}, got "
            f"{options['stages']}"
        )
    if kind in BINARY_QUANTIZERS:
        return cls, (_binary_dim(kind, codebook_size, dim),)
    if kind not in GRID_QUANTIZERS:
        return cls, (codebook_size or DEFAULT_CODEBOOK_SIZE, dim or DEFAULT_CODE_DIM)
    try:
        if levels is None:  # the paper's levels only approximate the size (2^10 -> 8*5*5*5 = 1000)
            levels, codebook_size = FSQ.levels_for(codebook_size or DEFAULT_CODEBOOK_SIZE), None
        levels = validate_levels(levels)
    except ValueError as error:
        raise ValueError(f"tokenizer.{error}") from None
    product = math.prod(levels)
    if codebook_size is not None and product != codebook_size:
        raise ValueError(
            f"tokenizer.levels: {levels} give a codebook of {product} codes but tokenizer.codebook_size is "
            f"{codebook_size}; make them agree or set one of them to null"
        )
    if dim is not None and dim != len(levels):
        raise ValueError(
            f"tokenizer.latent_dim: {kind} has one channel per level, so it must be {len(levels)} "
            f"(len(levels)) or null, got {dim}"
        )
    return cls, (levels,)


def _binary_dim(kind: str, codebook_size: int | None, dim: int | None) -> int:
    """Channels of an lfq/bsq quantizer: log2(codebook_size), latent_dim, or log2 of the default size."""
    if codebook_size is None:
        return dim or DEFAULT_CODEBOOK_SIZE.bit_length() - 1
    bits = codebook_size.bit_length() - 1
    if codebook_size != 2**bits:
        raise ValueError(
            f"tokenizer.codebook_size: {kind} has 2^latent_dim codes, so it must be a power of two "
            f"(e.g. {2**bits} or {2 ** (bits + 1)}), got {codebook_size}"
        )
    if dim is not None and dim != bits:
        raise ValueError(
            f"tokenizer.latent_dim: {kind} has one bit per channel, so {codebook_size} codes need "
            f"{bits} channels; set latent_dim to {bits} or null, got {dim}"
        )
    return bits


def build_quantizer(
    kind: str,
    *,
    levels: Sequence[int] | None = None,
    codebook_size: int | None = None,
    dim: int | None = None,
    **options: Any,
) -> nn.Module:
    """The quantizer named ``kind`` (a key of ``QUANTIZERS``); ``options`` go to its constructor.

    fsq, rfsq: ``levels``, else the paper's levels for ``codebook_size`` (``dim`` must be len(levels) if
    set); rfsq's ``codebook_size`` is each stage's.
    vq, regvq, simvq: ``codebook_size`` codes of ``dim`` channels. lfq, bsq: 2^dim codes, ``dim`` from
    ``codebook_size`` (a power of two) or given. Unset sizes take the defaults above.
    """
    cls, args = _quantizer_arguments(kind, levels, codebook_size, dim, options)
    return cls(*args, **options)


@dataclass(frozen=True)
class TokenizerConfig(TokenizerArchitecture):
    """Shape of the tokenizer: the architecture fields (``TokenizerArchitecture``, shared with the
    params) and the images it takes."""

    in_channels: int = 1  # image channels: 1 (grayscale) or 3 (RGB)
    image_size: int = 32  # the training resolution, for ``token_grid``; any multiple of f works

    def __post_init__(self) -> None:
        super().__post_init__()
        checks = [
            (self.in_channels >= 1, "in_channels", f"must be >= 1 (1 gray, 3 RGB), got {self.in_channels}"),
            (self.image_size >= 1, "image_size", f"must be a positive pixel count, got {self.image_size}"),
        ]
        raise_first_failed("tokenizer", checks)
        f = self.downsample
        if self.image_size % f:
            below, above = self.image_size // f * f, (self.image_size // f + 1) * f
            suggestion = f"{below} or {above}" if below else f"{above}"
            raise ValueError(
                f"tokenizer.image_size: {self.image_size} is not divisible by the downsampling factor f={f} "
                f"(2 ** (len(channel_multipliers) - 1)); use a multiple of {f} such as {suggestion}"
            )
        _quantizer_arguments(
            self.quantizer, self.levels, self.codebook_size, self.latent_dim, self.quantizer_options
        )

    @property
    def downsample(self) -> int:
        """Spatial reduction factor f of the encoder: a token covers f x f pixels."""
        return 2 ** (len(self.channel_multipliers) - 1)

    @property
    def stages(self) -> int:
        """Indices per token position: rfsq's stages (stacked along the height of the grid), else 1."""
        if self.quantizer != "rfsq":
            return 1
        return int(self.quantizer_options.get("stages", DEFAULT_STAGES))

    @property
    def token_grid(self) -> tuple[int, int]:
        """Token grid (h, w) of an ``image_size`` x ``image_size`` image (h covers every stage)."""
        return self.grid_of(self.image_size, self.image_size)

    def grid_of(self, height: int, width: int) -> tuple[int, int]:
        """Token grid (h, w) of a ``height`` x ``width`` image: (stages * height / f, width / f)."""
        return self.stages * (height // self.downsample), width // self.downsample

    @property
    def widths(self) -> list[int]:
        """Channels at each resolution level, finest first."""
        return [self.base_channels * multiplier for multiplier in self.channel_multipliers]


class ResBlock(nn.Module):
    """Pre-activation residual block: (GroupNorm, act, conv3x3) twice, a 1x1 skip when widths differ."""

    def __init__(
        self, in_channels: int, out_channels: int, dropout: float = 0.0, act_layer: type[nn.Module] = nn.SiLU
    ) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = conv3x3(in_channels, out_channels)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.act = act_layer()
        same = in_channels == out_channels
        self.skip = nn.Identity() if same else nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(self.act(self.norm1(x)))  # (B, out, H, W)
        h = self.conv2(self.dropout(self.act(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Single-head self-attention over all positions of a feature map, added back residually."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, kernel_size=1)
        self.proj = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        qkv = self.qkv(self.norm(x)).flatten(2).transpose(1, 2)  # (B, HW, 3C)
        q, k, v = qkv.chunk(3, dim=-1)  # 3 x (B, HW, C)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, HW, C)
        h = h.transpose(1, 2).reshape(batch, channels, height, width)  # (B, C, H, W)
        return x + self.proj(h)


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 conv3x3 or with 2x2 average pooling."""

    def __init__(self, channels: int, use_conv: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1) if use_conv else None

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x) if self.conv is not None else F.avg_pool2d(x, kernel_size=2)  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour upsampling, then a conv3x3."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = conv3x3(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


def middle_blocks(width: int, config: TokenizerConfig, act_layer: type[nn.Module]) -> list[nn.Module]:
    """Residual block, optional self-attention, residual block, at the coarsest resolution."""
    attention = [SelfAttention(width)] if config.mid_attention else []
    return [
        ResBlock(width, width, config.dropout, act_layer),
        *attention,
        ResBlock(width, width, config.dropout, act_layer),
    ]


class Encoder(nn.Module):
    """Images (B, C, H, W) to features (B, widths[-1], H/f, W/f), normalised and activated."""

    def __init__(self, config: TokenizerConfig, act_layer: type[nn.Module] = nn.SiLU) -> None:
        super().__init__()
        widths = config.widths
        width = widths[0]
        blocks: list[nn.Module] = [conv3x3(config.in_channels, width)]
        for level, level_width in enumerate(widths):
            for _ in range(config.num_res_blocks):
                blocks.append(ResBlock(width, level_width, config.dropout, act_layer))
                width = level_width
            if level < len(widths) - 1:
                blocks.append(Downsample(width, config.conv_downsample))
        blocks += [*middle_blocks(width, config, act_layer), group_norm(width), act_layer()]
        self.blocks = nn.Sequential(*blocks)
        self.out_channels = width

    def forward(self, images: Tensor) -> Tensor:
        return self.blocks(images)


class Decoder(nn.Module):
    """Features (B, widths[-1], h, w) to images (B, C, h*f, w*f), the mirror of the encoder."""

    def __init__(self, config: TokenizerConfig, act_layer: type[nn.Module] = nn.SiLU) -> None:
        super().__init__()
        widths = config.widths
        width = widths[-1]
        blocks = middle_blocks(width, config, act_layer)
        for level in reversed(range(len(widths))):
            for _ in range(config.num_res_blocks):
                blocks.append(ResBlock(width, widths[level], config.dropout, act_layer))
                width = widths[level]
            if level > 0:
                blocks.append(Upsample(width))
        blocks += [group_norm(width), act_layer(), conv3x3(width, config.in_channels)]
        self.blocks = nn.Sequential(*blocks)

    def forward(self, features: Tensor) -> Tensor:
        return self.blocks(features)


@contextmanager
def evaluating(module: nn.Module) -> Iterator[None]:
    """Put ``module`` in eval mode for the block, then restore every submodule's own mode."""
    modes = [(submodule, submodule.training) for submodule in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for submodule, training in modes:
            submodule.training = training


class Tokenizer(nn.Module):
    """Discrete image tokenizer: ``encode`` images to code indices, ``decode`` indices to images."""

    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.quantizer = build_quantizer(
            config.quantizer,
            levels=config.levels,
            codebook_size=config.codebook_size,
            dim=config.latent_dim,
            **config.quantizer_options,
        )
        self.quant_conv = nn.Conv2d(self.encoder.out_channels, self.quantizer.dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(self.quantizer.dim, self.encoder.out_channels, kernel_size=1)
        self.decoder = Decoder(config)

    @property
    def downsample(self) -> int:
        """Spatial reduction factor f: a token covers f x f pixels."""
        return self.config.downsample

    @property
    def token_grid(self) -> tuple[int, int]:
        """Token grid (h, w) for the configured image size."""
        return self.config.token_grid

    @property
    def codebook_size(self) -> int:
        """Number of distinct codes (index range) of the quantizer."""
        return self.quantizer.codebook_size

    def check_images(self, images: Tensor) -> None:
        """Raise a ValueError unless ``images`` is (B, in_channels, H, W) with H and W divisible by f."""
        channels, f = self.config.in_channels, self.downsample
        if images.ndim != 4 or images.shape[1] != channels:
            raise ValueError(
                f"images: expected shape (B, {channels}, H, W) for tokenizer.in_channels={channels}, "
                f"got {tuple(images.shape)}"
            )
        if images.shape[2] % f or images.shape[3] % f:
            raise ValueError(
                f"images: height and width {tuple(images.shape[2:])} must be divisible by the "
                f"downsampling factor f={f}; got input shape {tuple(images.shape)}"
            )

    def encode_latents(self, images: Tensor) -> Tensor:
        """Continuous latents (B, D, H/f, W/f) that the quantizer takes, D its channel count."""
        self.check_images(images)
        return self.quant_conv(self.encoder(images))

    def decode_codes(self, codes: Tensor) -> Tensor:
        """Raw reconstructions (B, C, h*f, w*f) from quantized codes (B, D, h, w); not clamped."""
        return self.decoder(self.post_quant_conv(codes))

    def forward(self, images: Tensor) -> tuple[Tensor, QuantizerOutput]:
        """Reconstruct images (B, C, H, W); also return the quantizer's output for its losses and stats.

        The decoder sees exactly the codes the quantizer returns: for regvq in training mode those
        mix argmax and sampled codes, and ``stats`` carries ``pcl_weights`` for the contrastive loss.
        """
        quantized = self.quantizer(self.encode_latents(images))
        return self.decode_codes(quantized.codes), quantized

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Deterministic int64 tokens (B, H/f, W/f) of images (B, C, H, W) in [-1, 1] (rfsq: its S stages
        stacked, (B, S*H/f, W/f)).

        Runs in eval mode whatever the module's mode: no dropout, no codebook updates, and argmax
        (nearest) codes for regvq instead of sampled ones.
        """
        with evaluating(self):
            quantized = self.quantizer(self.encode_latents(images))
        return self.tokens(quantized.stats.get("argmax_indices", quantized.indices))

    def tokens(self, indices: Tensor) -> Tensor:
        """The token grid (B, h, w) of the quantizer's indices: themselves, or rfsq's (B, S, h', w)
        stacked into (B, S*h', w)."""
        return stack_stages(indices) if self.config.quantizer == "rfsq" else indices

    @torch.no_grad()
    def decode(self, indices: Tensor) -> Tensor:
        """Images (B, C, h*f, w*f) clamped to [-1, 1] from integer code indices (B, h, w), in eval mode
        (rfsq: the token grid (B, S*h, w) that ``encode`` returns)."""
        if self.config.quantizer == "rfsq":
            indices = split_stages(indices, self.config.stages)
        with evaluating(self):
            images = self.decode_codes(self.quantizer.indices_to_codes(indices))
        return images.clamp(-1.0, 1.0)
