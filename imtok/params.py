"""Typed models of the params.yaml sections, with one validation boundary.

Every section is a frozen dataclass whose field names are the YAML keys. ``load_params(path)`` (or
``Params.from_dict``) is the only place raw YAML becomes typed values: pydantic checks each section's
keys and types (a strict model made from the dataclass, unknown keys forbidden), the dataclass's
``__post_init__`` its ranges. Every error is a ``ValueError`` that starts with the dotted key
(``prepare.image_size: ...``) and says what to do. A later stage adds its section as one more
dataclass plus one field on ``Params``.

The sections stay dataclasses, not pydantic models: the models' own configs (``TokenizerConfig``,
``MaskGITConfig``, ``GPTConfig``) extend the same architecture dataclasses, and they are built and
``dataclasses.replace``d in code that never sees params.yaml.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Self, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from imtok import layout
from imtok.models.architecture import PriorArchitecture, TokenizerArchitecture, raise_first_failed
from imtok.typerules import STRICT, type_name, yaml_value

SourceKind = Literal["fashion_mnist", "folder", "synthetic"]
_Section = TypeVar("_Section")


def _checked_mapping(raw: Any, where: str, of_what: str) -> dict:
    """``raw`` as a dict (an empty YAML block counts as {}), or a ValueError naming ``where``."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a mapping of {of_what}, got {type(raw).__name__}")
    return raw


def _first_unknown(raw: dict, known: Mapping[str, Any]) -> str | None:
    """The alphabetically first key of ``raw`` that is not in ``known``, if any."""
    unknown = sorted(set(raw) - set(known))
    return unknown[0] if unknown else None


@functools.cache
def _section_model(cls: type) -> type[BaseModel]:
    """The pydantic model that checks a section's keys and types: the dataclass ``cls``'s fields,
    strict (``imtok.typerules``), unknown keys forbidden. Only the keys given are checked; the
    dataclass supplies the defaults and its ``__post_init__`` the ranges."""
    hints = typing.get_type_hints(cls)
    fields: dict[str, Any] = {
        field.name: (hints[field.name], None)
        if field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING
        else (hints[field.name], ...)
        for field in dataclasses.fields(cls)
    }
    config = ConfigDict(**STRICT, extra="forbid")
    return create_model(f"{cls.__name__}Keys", __config__=config, **fields)


def _build_section(cls: type[_Section], raw: Any, section: str) -> _Section:
    """Check keys and types of one section against the dataclass ``cls`` and construct it."""
    raw = _checked_mapping(raw, section, "keys to values")
    given = {key: yaml_value(value) for key, value in raw.items()}
    try:
        checked = _section_model(cls).model_validate(given)
    except ValidationError as error:
        raise ValueError(_section_error(cls, section, raw, error.errors()[0])) from None
    return cls(**{name: getattr(checked, name) for name in given})


def _section_error(cls: type, section: str, raw: dict, error: Any) -> str:
    """The first pydantic error of a section as ``<section>.<key>: <what is wrong and what to write>``."""
    name = str(error["loc"][0])  # YAML may give a key that is no string (`1:`, `null:`)
    keys = [field.name for field in dataclasses.fields(cls)]
    moved = moved_key(section, name)
    if moved and name not in keys:
        return f"{section}.{name}: moved to {moved}; set it there in params.yaml"
    if error["type"] == "extra_forbidden" or name not in keys:
        keys = ", ".join(keys)
        return (
            f"{section}.{name}: unknown key; the keys of `{section}` are {keys} "
            "(check the spelling in params.yaml)"
        )
    if error["type"] == "missing" and len(error["loc"]) == 1:
        return f"{section}.{name}: missing; add it to the `{section}` section of params.yaml"
    hint, value = typing.get_type_hints(cls)[name], raw[name]
    if typing.get_origin(hint) is Literal:
        return f"{section}.{name}: unknown value {value!r}; use one of {type_name(hint)}"
    return f"{section}.{name}: expected {type_name(hint)}, got {value!r} ({type(value).__name__})"


MAX_DIST_TIMEOUT_S = 30 * 24 * 3600  # 30 days: the bound of the `dist_timeout_s` keys (no .inf or NaN)
Precision = Literal["auto", "fp32", "bf16"]


def _dist_timeout_check(value: float | None) -> tuple[bool, str, str]:
    """(ok, key, message) for the ``dist_timeout_s`` key of the sections that run under DDP."""
    return (
        value is None or 0 < value <= MAX_DIST_TIMEOUT_S,
        "dist_timeout_s",
        f"must be seconds in (0, {MAX_DIST_TIMEOUT_S}] or null (PyTorch's default), got {value}",
    )


class Section:
    """What every section dataclass shares: ``SECTION`` (its key in params.yaml), the one way in
    (``from_dict``, which checks keys and types) and its values as plain YAML (``as_dict``)."""

    SECTION: ClassVar[str]

    def as_dict(self) -> dict[str, Any]:
        """The section as plain YAML-like values (lists for tuples), for logging and fingerprints."""
        return {
            field.name: list(value) if isinstance(value, tuple) else value
            for field in dataclasses.fields(self)  # type: ignore[arg-type]
            for value in [getattr(self, field.name)]
        }

    @classmethod
    def from_dict(cls, raw: Any) -> Self:
        """The section from its raw YAML mapping: unknown keys and wrong types named (see
        ``_build_section``), then the section's own range checks."""
        return _build_section(cls, raw, cls.SECTION)


def _training_checks(section: Any) -> list[tuple[bool, str, str]]:
    """(ok, key, message) for the optimisation fields the tokenizer and prior sections share."""
    s = section
    return [
        (s.lr > 0, "lr", f"must be > 0, got {s.lr}"),
        (all(0 <= b < 1 for b in s.betas), "betas", f"must lie in [0, 1), got {list(s.betas)}"),
        (s.weight_decay >= 0, "weight_decay", f"must be >= 0, got {s.weight_decay}"),
        (s.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {s.warmup_steps}"),
        (
            s.warmup_steps <= s.total_steps,
            "warmup_steps",
            f"{s.warmup_steps} exceeds {s.SECTION}.total_steps={s.total_steps}",
        ),
        (0 <= s.min_lr_ratio <= 1, "min_lr_ratio", f"must lie in [0, 1], got {s.min_lr_ratio}"),
        (s.grad_clip is None or s.grad_clip > 0, "grad_clip", f"must be > 0 or null, got {s.grad_clip}"),
        (
            s.ema_decay is None or 0 < s.ema_decay < 1,
            "ema_decay",
            f"must lie in (0, 1) or be null (off), got {s.ema_decay}",
        ),
    ]


@dataclass(frozen=True)
class TokenizerParams(TokenizerArchitecture, Section):
    """The `tokenizer` section: architecture (``TokenizerArchitecture``: the model's own fields, declared
    once), quantizer, losses and optimisation: what the run computes, all of it in the run's
    fingerprint. How it runs is ``run.tokenizer`` (``TokenizerRun``)."""

    SECTION: ClassVar[str] = "tokenizer"

    # every quantizer's options under its name ({vq: {beta: 0.25, ...}, ...}); the keys left out take the
    # quantizer's defaults (imtok.models.autoencoder.options_by_quantizer), tokenizer.quantizer's reach it
    quantizer_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    downsample: int = 4  # spatial reduction factor f of the encoder: a token covers f x f pixels
    # losses (imtok.losses)
    recon_loss: Literal["l1", "l2"] = "l1"
    perceptual_weight: float = 0.1  # off (with a warning and an MLflow tag) without VGG-19 weights
    vgg_weights: str | None = None  # local VGG-19 weights file; null: the HF / torch hub caches
    pcl_weight: float = 0.1  # regvq only: probabilistic contrastive loss
    pcl_temperature: float = 0.07
    pcl_patches: int = 256
    gan_weight: float = 0.0  # 0: no discriminator
    gan_start_step: int = 0
    gan_adaptive: bool = True  # VQGAN's adaptive weight at the decoder's last layer
    disc_channels: int = 64
    disc_layers: int = 3
    # optimisation (imtok.training)
    batch_size: int = 64  # per process; the global batch is batch_size x world size
    lr: float = 2e-3
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 1e-4  # AdamW, on weight matrices and kernels only
    warmup_steps: int = 50
    total_steps: int = 1500
    min_lr_ratio: float = 0.1
    grad_clip: float | None = 1.0
    ema_decay: float | None = None  # EMA of the weights; the exported model then uses them
    seed: int = 0
    precision: Precision = "auto"  # auto: bf16 autocast on CUDA, fp32 elsewhere
    channels_last: bool = True  # NHWC convolutions: 1.13-1.28x faster steps on 2 CPU cores (benchmarks.train)

    @property
    def chosen_options(self) -> dict[str, Any]:
        """The options of ``quantizer``: what the model is built with."""
        return dict(self.quantizer_options[self.quantizer])

    def __post_init__(self) -> None:
        from imtok.models.autoencoder import options_by_quantizer

        super().__post_init__()
        object.__setattr__(self, "quantizer_options", options_by_quantizer(self.quantizer_options))
        if self.downsample < 1 or self.downsample & (self.downsample - 1):
            raise ValueError(
                f"tokenizer.downsample: must be a power of two >= 1 (each encoder stage halves the "
                f"resolution), got {self.downsample}"
            )
        levels_needed = self.downsample.bit_length()  # log2(downsample) + 1
        if len(self.channel_multipliers) != levels_needed:
            raise ValueError(
                f"tokenizer.channel_multipliers: {list(self.channel_multipliers)} has "
                f"{len(self.channel_multipliers)} resolution levels, but "
                f"tokenizer.downsample={self.downsample} needs {levels_needed} (one more than the number "
                "of halvings); make them agree"
            )
        positive = ("batch_size", "total_steps", "pcl_patches", "disc_channels", "disc_layers")
        checks = _at_least_one(self, positive)
        checks += [
            (self.pcl_temperature > 0, "pcl_temperature", f"must be > 0, got {self.pcl_temperature}"),
            (self.gan_start_step >= 0, "gan_start_step", f"must be >= 0, got {self.gan_start_step}"),
            (
                self.gan_weight == 0 or self.gan_start_step < self.total_steps,
                "gan_start_step",
                f"{self.gan_start_step} is not before total_steps ({self.total_steps}), so the "
                f"discriminator (gan_weight {self.gan_weight}) would never train; lower gan_start_step "
                "or set gan_weight to 0",
            ),
        ]
        checks += [
            (
                getattr(self, key) >= 0,
                key,
                f"must be >= 0 (0 switches the term off), got {getattr(self, key)}",
            )
            for key in ("perceptual_weight", "pcl_weight", "gan_weight")
        ]
        raise_first_failed(self.SECTION, checks + _training_checks(self))


@dataclass(frozen=True)
class PrepareParams(Section):
    """The `prepare` section: which images become shards, at what size, and how they are cut."""

    SECTION: ClassVar[str] = "prepare"

    source: SourceKind = "fashion_mnist"
    # fashion_mnist: directory with the four IDX .gz files (null: the Debian package's directory,
    # then data/raw/, then a download); folder: the image folder (required); synthetic: unused.
    root: str | None = None
    image_size: int = 28
    channels: int = 1
    val_fraction: float = 0.1  # only for sources without an official split (folder, synthetic)
    seed: int = 0
    limit: int | None = None  # images per split, null = all
    maxcount: int = 10000  # samples per shard
    maxsize: int = 100_000_000  # bytes of payload per shard
    synthetic_count: int = 2000  # images the synthetic source generates (both splits together)
    # folder: larger images are skipped (and reported) before they are decoded: 64 MP passes every
    # camera photo up to 8192 x 8192, while a 13000 x 13000 PNG would take 3.8 GB to decode
    max_pixels: int = 64_000_000
    upload: str | None = None  # s3://bucket/prefix: upload <prefix>/train and <prefix>/val after writing

    def __post_init__(self) -> None:
        checks = [
            (
                self.source != "folder" or bool(self.root),
                "root",
                "the folder source needs an image folder path",
            ),
            (
                self.image_size >= 1,
                "image_size",
                f"must be a positive number of pixels, got {self.image_size}",
            ),
            (self.channels in (1, 3), "channels", f"must be 1 (grayscale) or 3 (RGB), got {self.channels}"),
            (0.0 < self.val_fraction < 1.0, "val_fraction", f"must lie in (0, 1), got {self.val_fraction}"),
            (self.limit is None or self.limit >= 1, "limit", f"must be >= 1 or null (all), got {self.limit}"),
            (self.maxcount >= 1, "maxcount", f"must be a positive number of samples, got {self.maxcount}"),
            (self.maxsize >= 1, "maxsize", f"must be a positive number of bytes, got {self.maxsize}"),
            (
                self.max_pixels >= 1,
                "max_pixels",
                f"must be a positive number of pixels, got {self.max_pixels}",
            ),
            (
                self.synthetic_count >= 2,
                "synthetic_count",
                f"must be >= 2 (one per split), got {self.synthetic_count}",
            ),
            (
                self.upload is None or (self.upload.startswith("s3://") and len(self.upload) > len("s3://")),
                "upload",
                f"must be an s3://bucket/prefix URL or null, got {self.upload!r}",
            ),
        ]
        raise_first_failed(self.SECTION, checks)


@dataclass(frozen=True)
class ExtractParams(Section):
    """The `extract` section: which tokenizer encodes the image shards into token shards, and how."""

    SECTION: ClassVar[str] = "extract"

    tokenizer: str = layout.TOKENIZER  # a directory with tokenizer.pt, or models:/imtok-tokenizer@champion
    batch_size: int = 256
    flip: bool = False  # also store the tokens of horizontally flipped train images (keys ending _hflip)
    precision: Precision = "fp32"  # bf16 autocast is faster on GPUs but may flip near-tie codes
    channels_last: bool = False  # NHWC encoder: faster, but may flip near-tie codes against NCHW

    def __post_init__(self) -> None:
        checks = [
            (bool(self.tokenizer), "tokenizer", "must name a directory, a model file or an MLflow model URI"),
            (self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}"),
        ]
        raise_first_failed(self.SECTION, checks)


@dataclass(frozen=True)
class PriorParams(PriorArchitecture, Section):
    """The `prior` section: a MaskGIT or GPT prior over the token shards (its transformer:
    ``PriorArchitecture``, declared once with the models' configs), and how it is trained. How it
    runs is ``run.prior`` (``PriorRun``)."""

    SECTION: ClassVar[str] = "prior"

    kind: Literal["maskgit", "gpt"] = "maskgit"
    conditional: bool = True  # class-conditional (class names from the token shards) or unconditional
    batch_size: int = 64  # per process
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05
    warmup_steps: int = 100
    total_steps: int = 800
    min_lr_ratio: float = 0.1
    grad_clip: float | None = 1.0
    ema_decay: float | None = None
    seed: int = 0
    precision: Precision = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        checks = _at_least_one(self, ("batch_size", "total_steps"))
        checks.append(
            (
                self.label_dropout < 1,
                "label_dropout",
                f"must be below 1 (1 would never train the classes), got {self.label_dropout}",
            )
        )
        raise_first_failed(self.SECTION, checks + _training_checks(self))


@dataclass(frozen=True)
class SampleParams(Section):
    """The `sample` section: how many images the prior generates, and how it decodes them."""

    SECTION: ClassVar[str] = "sample"

    prior: str = layout.PRIOR  # a directory with prior.pt, or models:/imtok-prior@champion
    tokenizer: str | None = None  # null: the tokenizer the prior was trained on (from its metadata)
    per_class: int = 100  # images per class of a conditional prior
    count: int = 1000  # images of an unconditional prior
    steps: int = 12  # maskgit: parallel decoding steps
    temperature: float = 1.0
    choice_temperature: float = 4.5  # maskgit: Gumbel noise on confidences, annealed to 0
    guidance_scale: float = 0.0  # classifier-free guidance: logits c + s * (c - u)
    top_k: int | None = None  # gpt
    top_p: float | None = None  # gpt
    batch_size: int = 250
    seed: int = 0
    grid_per_class: int = 10  # columns of the PNG grid (one row per class)
    maxcount: int = 10000

    def __post_init__(self) -> None:
        checks = [
            (self.per_class >= 1, "per_class", f"must be >= 1, got {self.per_class}"),
            (self.count >= 1, "count", f"must be >= 1, got {self.count}"),
            (self.steps >= 1, "steps", f"must be >= 1, got {self.steps}"),
            (self.temperature >= 0, "temperature", f"must be >= 0 (0: greedy), got {self.temperature}"),
            (
                self.choice_temperature >= 0,
                "choice_temperature",
                f"must be >= 0, got {self.choice_temperature}",
            ),
            (self.guidance_scale >= 0, "guidance_scale", f"must be >= 0, got {self.guidance_scale}"),
            (self.top_k is None or self.top_k >= 1, "top_k", f"must be >= 1 or null, got {self.top_k}"),
            (
                self.top_p is None or 0 < self.top_p <= 1,
                "top_p",
                f"must lie in (0, 1] or be null, got {self.top_p}",
            ),
            (self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}"),
            (self.grid_per_class >= 1, "grid_per_class", f"must be >= 1, got {self.grid_per_class}"),
            (self.maxcount >= 1, "maxcount", f"must be >= 1, got {self.maxcount}"),
        ]
        raise_first_failed(self.SECTION, checks)


@dataclass(frozen=True)
class ClassifierParams(Section):
    """The `classifier` section: the domain feature network for FID-type metrics without InceptionV3."""

    SECTION: ClassVar[str] = "classifier"

    name: str = "fmnist"  # metrics from its features are named fid_<name>, precision_<name>, ...
    widths: tuple[int, ...] = (16, 32, 64)
    embed_dim: int = 128
    steps: int = 2000
    batch_size: int = 128
    lr: float = 3e-3
    flip: bool = True  # mirror half of each batch (right for clothing, wrong for digits or text)
    seed: int = 0
    min_accuracy: float = 0.9  # the stage fails below this val accuracy: its features would mislead

    def __post_init__(self) -> None:
        checks = [
            (
                len(self.widths) >= 1 and all(width >= 1 for width in self.widths),
                "widths",
                f"must list one or more channel counts >= 1 (one per stage), got {list(self.widths)}",
            ),
            (self.embed_dim >= 1, "embed_dim", f"must be >= 1, got {self.embed_dim}"),
            (self.steps >= 1, "steps", f"must be >= 1, got {self.steps}"),
            (self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}"),
            (self.lr > 0, "lr", f"must be > 0, got {self.lr}"),
            (0 <= self.min_accuracy <= 1, "min_accuracy", f"must lie in [0, 1], got {self.min_accuracy}"),
        ]
        raise_first_failed(self.SECTION, checks)


# The metrics `evaluate` computes that can decide a champion, and whether higher is better. Those in
# PER_EXTRACTOR_METRICS also exist per domain classifier as ``<metric>_<classifier name>`` (fid_fmnist).
TOKENIZER_METRICS: dict[str, bool] = {
    "psnr": True,
    "ssim": True,
    "codebook_usage_pct": True,
    "codes_used": True,
    "perplexity": True,  # of the code histogram: higher is a more even use of the codebook
    "rfid": False,
}
PRIOR_METRICS: dict[str, bool] = {"fid": False, "precision": True, "recall": True, "class_accuracy": True}
PER_EXTRACTOR_METRICS = frozenset({"rfid", "fid", "precision", "recall"})


def _metric_base(metric: str) -> str:
    """``fid_fmnist`` -> ``fid``; a name without an extractor suffix is its own base."""
    for base in PER_EXTRACTOR_METRICS:
        if metric.startswith(f"{base}_") and len(metric) > len(base) + 1:
            return base
    return metric


def _allowed_metrics(table: Mapping[str, bool]) -> str:
    suffixed = [f"{name}_<classifier.name>" for name in table if name in PER_EXTRACTOR_METRICS]
    return ", ".join([*table, *suffixed])


def higher_is_better(metric: str, key: str = "metric") -> bool:
    """Whether a larger value of the evaluate metric ``metric`` is the better model.

    A name evaluate does not compute as a quality metric (``codebook_size``, ``samples``, a typo) is a
    ValueError naming ``key`` and the metric.
    """
    table = TOKENIZER_METRICS | PRIOR_METRICS
    base = _metric_base(metric)
    if base not in table:
        raise ValueError(f"{key}: unknown metric {metric!r}; known: {_allowed_metrics(table)}")
    return table[base]


@dataclass(frozen=True)
class EvaluateParams(Section):
    """The `evaluate` section: which features the metrics use and how champions are chosen."""

    SECTION: ClassVar[str] = "evaluate"

    inception_weights: str | None = None  # FID InceptionV3 weights; null: $IMTOK_INCEPTION_WEIGHTS, torch hub
    batch_size: int = 256
    tokenizer_metric: str = "psnr"  # promotes imtok-tokenizer to champion (direction: higher_is_better)
    prior_metric: str | None = None  # null: fid when InceptionV3 is available, else fid_<classifier.name>
    promote: bool = True  # move the `champion` aliases

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"{self.SECTION}.batch_size: must be >= 1, got {self.batch_size}")
        for key, metric, table in (
            ("tokenizer_metric", self.tokenizer_metric, TOKENIZER_METRICS),
            ("prior_metric", self.prior_metric, PRIOR_METRICS),
        ):
            if metric is not None and _metric_base(metric) not in table:
                raise ValueError(
                    f"{self.SECTION}.{key}: {metric!r} is not a metric evaluate computes for this model; "
                    f"use one of {_allowed_metrics(table)}"
                )


def _at_least_one(section: Any, keys: tuple[str, ...]) -> list[tuple[bool, str, str]]:
    """(ok, key, message) checks that each of ``keys`` of ``section`` is >= 1."""
    return [(getattr(section, key) >= 1, key, f"must be >= 1, got {getattr(section, key)}") for key in keys]


def _no_fewer_than_zero(key: str, value: int, zero: str) -> tuple[bool, str, str]:
    """(ok, key, message) for a count that may be 0, which means ``zero``."""
    return (value >= 0, key, f"must be >= 0 (0: {zero}), got {value}")


# The `run` section: how the stages run. No checkpoint fingerprint holds it (a run resumes under other
# values) and dvc.yaml lists only each stage's device of it: where a model runs changes its numerics
# (bf16 autocast on CUDA under precision auto). One subsection per section that has such settings,
# under the same name.


@dataclass(frozen=True)
class PrepareRun(Section):
    SECTION: ClassVar[str] = "run.prepare"

    # processes that load and PNG-encode images while the stage writes the shards (0: the stage
    # itself); the shards are byte-identical for any count
    num_workers: int = 0

    def __post_init__(self) -> None:
        zero = "encode in the stage itself"
        raise_first_failed(self.SECTION, [_no_fewer_than_zero("num_workers", self.num_workers, zero)])


@dataclass(frozen=True)
class DeviceRun(Section):
    """Where a stage runs its model (``run.sample``, ``run.classifier``, ``run.evaluate``)."""

    SECTION: ClassVar[str] = "run"  # no checks of its own: errors of its keys name run.<stage>

    device: str = "auto"  # auto | cpu | cuda (torchrun: the local rank's GPU) | cuda:N (one process a node)


@dataclass(frozen=True)
class ExtractRun(DeviceRun):
    SECTION: ClassVar[str] = "run.extract"

    num_workers: int = 0  # DataLoader processes decoding image shards while the model encodes; 0: in turn

    def __post_init__(self) -> None:
        zero = "decode in the stage itself"
        raise_first_failed(self.SECTION, [_no_fewer_than_zero("num_workers", self.num_workers, zero)])


@dataclass(frozen=True)
class TrainingRun(DeviceRun):
    """Where a training stage runs and its cadence (``imtok.engine.Cadence``): how often it logs,
    validates (on how many batches) and checkpoints (keeping how many)."""

    log_every: int = 50
    val_every: int = 400
    val_batches: int = 8  # 0: no validation during training
    checkpoint_every: int = 400
    keep_checkpoints: int = 2

    def checks(self) -> list[tuple[bool, str, str]]:
        positive = ("log_every", "val_every", "checkpoint_every", "keep_checkpoints")
        return [
            *_at_least_one(self, positive),
            _no_fewer_than_zero("val_batches", self.val_batches, "no validation"),
        ]

    def __post_init__(self) -> None:
        raise_first_failed(self.SECTION, self.checks())


@dataclass(frozen=True)
class TokenizerRun(TrainingRun):
    SECTION: ClassVar[str] = "run.tokenizer"

    log_every: int = 25
    val_every: int = 250
    checkpoint_every: int = 500
    num_workers: int = 0  # data loader processes per training process
    compile: bool = False  # torch.compile the model (the same weights to float tolerance)
    grid_images: int = 32  # reconstructions in each logged grid

    def checks(self) -> list[tuple[bool, str, str]]:
        workers = _no_fewer_than_zero("num_workers", self.num_workers, "load in the training process")
        return [*super().checks(), workers, *_at_least_one(self, ("grid_images",))]


@dataclass(frozen=True)
class PriorRun(TrainingRun):
    SECTION: ClassVar[str] = "run.prior"


@dataclass(frozen=True)
class RunParams(Section):
    """The `run` section: ``dist_timeout_s`` and one subsection per stage section (see above)."""

    SECTION: ClassVar[str] = "run"

    dist_timeout_s: float | None = None  # multi-process stages (tokenizer, extract, prior): the wait for
    # the other ranks to join and in every collective (extract: also for the slowest rank's shards at
    # the end of a split); null: PyTorch's default (10 min NCCL, 30 min gloo). Keep it above the longest
    # time rank 0 spends alone (validation, checkpoints, MLflow) while the others wait
    prepare: PrepareRun = dataclasses.field(default_factory=PrepareRun)
    tokenizer: TokenizerRun = dataclasses.field(default_factory=TokenizerRun)
    extract: ExtractRun = dataclasses.field(default_factory=ExtractRun)
    prior: PriorRun = dataclasses.field(default_factory=PriorRun)
    sample: DeviceRun = dataclasses.field(default_factory=DeviceRun)
    classifier: DeviceRun = dataclasses.field(default_factory=DeviceRun)
    evaluate: DeviceRun = dataclasses.field(default_factory=DeviceRun)

    def __post_init__(self) -> None:
        raise_first_failed(self.SECTION, [_dist_timeout_check(self.dist_timeout_s)])

    @classmethod
    def stages(cls) -> dict[str, type[Section]]:
        """``{name: subsection class}``: the sections with run settings, by their names."""
        hints = typing.get_type_hints(cls)
        return {
            field.name: hints[field.name]
            for field in dataclasses.fields(cls)
            if isinstance(hints[field.name], type) and issubclass(hints[field.name], Section)
        }

    @classmethod
    def from_dict(cls, raw: Any) -> Self:
        raw = _checked_mapping(raw, cls.SECTION, "keys to values")
        stages = cls.stages()
        own = _build_section(
            cls, {key: value for key, value in raw.items() if key not in stages}, cls.SECTION
        )
        nested = {
            name: _build_section(kind, raw[name], f"{cls.SECTION}.{name}")
            for name, kind in stages.items()
            if name in raw
        }
        return dataclasses.replace(own, **nested)


def moved_key(section: str, name: str) -> str | None:
    """Where the key ``name`` of ``section`` lives now, if it moved to the `run` section
    (``tokenizer.device`` -> ``run.tokenizer.device``); else None."""
    if name == "dist_timeout_s" and section != RunParams.SECTION:
        return f"{RunParams.SECTION}.dist_timeout_s"
    kind = RunParams.stages().get(section)
    if kind is not None and name in {field.name for field in dataclasses.fields(kind)}:
        return f"{RunParams.SECTION}.{section}.{name}"
    return None


@dataclass(frozen=True)
class Params:
    """All sections of params.yaml; checks that need two sections live in ``__post_init__``."""

    prepare: PrepareParams = dataclasses.field(default_factory=PrepareParams)
    tokenizer: TokenizerParams = dataclasses.field(default_factory=TokenizerParams)
    extract: ExtractParams = dataclasses.field(default_factory=ExtractParams)
    prior: PriorParams = dataclasses.field(default_factory=PriorParams)
    sample: SampleParams = dataclasses.field(default_factory=SampleParams)
    classifier: ClassifierParams = dataclasses.field(default_factory=ClassifierParams)
    evaluate: EvaluateParams = dataclasses.field(default_factory=EvaluateParams)
    run: RunParams = dataclasses.field(default_factory=RunParams)

    def __post_init__(self) -> None:
        self.tokenizer_config(self.prepare.channels, self.prepare.image_size)  # raises naming the key
        factor = self.tokenizer.downsample
        if self.prepare.image_size % factor:
            below = self.prepare.image_size // factor * factor
            above = below + factor
            suggestion = f"{below} or {above}" if below else f"{above}"
            raise ValueError(
                f"prepare.image_size: {self.prepare.image_size} is not divisible by tokenizer.downsample "
                f"({factor}); use a multiple of {factor} such as {suggestion}"
            )

        check_discriminator_depth(self.tokenizer, self.prepare.image_size, "prepare.image_size")

    def tokenizer_config(self, channels: int, image_size: int) -> Any:
        """The ``TokenizerConfig`` these params describe for images of ``channels`` x ``image_size``^2."""
        from imtok.models.autoencoder import TokenizerConfig  # torch is only needed from here on

        section = self.tokenizer
        if image_size % section.downsample:  # reported in prepare's terms by __post_init__
            image_size = section.downsample
        architecture = section.architecture | {"quantizer_options": section.chosen_options}
        return TokenizerConfig(in_channels=channels, image_size=image_size, **architecture)

    @classmethod
    def from_dict(cls, raw: Any) -> Self:
        sections = {field.name: field.type for field in dataclasses.fields(cls)}
        raw = _checked_mapping(raw, "params", "sections")
        unknown = _first_unknown(raw, sections)
        if unknown:
            raise ValueError(
                f"{unknown}: unknown params section; the sections are {', '.join(sections)} "
                "(add a dataclass for it in imtok/params.py)"
            )
        hints = typing.get_type_hints(cls)
        return cls(**{name: hints[name].from_dict(raw[name]) for name in sections if name in raw})


def check_discriminator_depth(tokenizer: TokenizerParams, image_size: int, source: str) -> None:
    """With a GAN, refuse a discriminator too deep for ``image_size`` images (``source`` names where
    that size comes from): its convolutions would fail when the GAN starts, on every resume too."""
    if tokenizer.gan_weight <= 0:
        return
    from imtok.losses import patch_logits_size

    layers = tokenizer.disc_layers
    if patch_logits_size(image_size, layers) < 1:
        fitting = [n for n in range(1, layers) if patch_logits_size(image_size, n) >= 1]
        advice = (
            f"use tokenizer.disc_layers <= {fitting[-1]}"
            if fitting
            else "use larger images or set tokenizer.gan_weight to 0"
        )
        raise ValueError(
            f"tokenizer.disc_layers: {layers} discriminator layers shrink {source}={image_size} images "
            f"below one logit, so training would fail when the GAN starts (step "
            f"{tokenizer.gan_start_step}); {advice}"
        )


def load_yaml(text: str) -> Any:
    """Parse YAML as YAML 1.2, the way DVC reads and writes params.yaml (ruamel.yaml).

    PyYAML's YAML 1.1 would read ``lr: 5e-5`` (no dot) as the string ``'5e-5'`` and ``on``/``no`` as
    booleans, so a value DVC and the override writer treat as a float would fail validation here.
    Raises ``ruamel.yaml.error.YAMLError`` for text that is not YAML.
    """
    from ruamel.yaml import YAML

    return YAML(typ="safe", pure=True).load(text)


def read_yaml(path: str | Path, what: str) -> Any:
    """``load_yaml`` of the file ``path``; text that is not YAML is a ValueError naming ``what`` (e.g.
    ``params``, ``sweep points``) and the file, not a parser traceback."""
    from ruamel.yaml.error import YAMLError

    try:
        return load_yaml(Path(path).read_text())
    except YAMLError as exc:
        raise ValueError(f"{what}: {path} is not valid YAML: {exc}") from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read (``read_yaml``) and validate params.yaml; raises ValueError naming the offending key."""
    path = Path(path)
    try:
        raw = read_yaml(path, "params")
    except FileNotFoundError:
        raise ValueError(f"params: {path} does not exist; run from the repository root") from None
    return Params.from_dict(raw)
