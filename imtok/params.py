"""Typed models of the params.yaml sections, with one validation boundary.

Every section is a frozen dataclass whose field names are the YAML keys. ``load_params(path)`` (or
``Params.from_dict``) is the only place raw YAML becomes typed values; every error it raises is a
``ValueError`` that starts with the dotted key (``prepare.image_size: ...``) and says what to do.
A later stage adds its section as one more dataclass plus one field on ``Params``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Self, TypeVar

import yaml

SourceKind = Literal["fashion_mnist", "folder", "synthetic"]
_Section = TypeVar("_Section")


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is Literal:
        return " | ".join(repr(value) for value in typing.get_args(annotation))
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return " | ".join(_type_name(arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _matches(value: Any, annotation: Any) -> tuple[bool, Any]:
    """Whether ``value`` fits ``annotation``, and the value converted to it (ints accepted as floats)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        for arg in typing.get_args(annotation):
            ok, converted = _matches(value, arg)
            if ok:
                return True, converted
        return False, value
    if typing.get_origin(annotation) is Literal:
        return value in typing.get_args(annotation), value
    if annotation is type(None):
        return value is None, value
    if annotation is bool:
        return isinstance(value, bool), value
    if annotation is int:
        # YAML reads `true` as a bool, which Python also counts as an int: refuse it here.
        return isinstance(value, int) and not isinstance(value, bool), value
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, value
    if annotation is str:
        return isinstance(value, str), value
    raise TypeError(f"params: no validation rule for type {annotation!r}")


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


def _build_section(cls: type[_Section], raw: Any, section: str) -> _Section:
    """Check keys and types of one section against the dataclass ``cls`` and construct it."""
    fields = {field.name: field for field in dataclasses.fields(cls)}  # type: ignore[arg-type]
    raw = _checked_mapping(raw, section, "keys to values")
    unknown = _first_unknown(raw, fields)
    if unknown:
        raise ValueError(
            f"{section}.{unknown}: unknown key; the keys of `{section}` are {', '.join(fields)} "
            "(check the spelling in params.yaml)"
        )
    hints = typing.get_type_hints(cls)
    values = {}
    for name, field in fields.items():
        if name in raw:
            ok, value = _matches(raw[name], hints[name])
            if not ok and typing.get_origin(hints[name]) is Literal:
                raise ValueError(
                    f"{section}.{name}: unknown value {raw[name]!r}; use one of {_type_name(hints[name])}"
                )
            if not ok:
                raise ValueError(
                    f"{section}.{name}: expected {_type_name(hints[name])}, got {raw[name]!r} "
                    f"({type(raw[name]).__name__})"
                )
            values[name] = value
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ValueError(f"{section}.{name}: missing; add it to the `{section}` section of params.yaml")
    return cls(**values)


@dataclass(frozen=True)
class TokenizerParams:
    """The `tokenizer` section (only what earlier stages need to know about the tokenizer so far)."""

    SECTION: ClassVar[str] = "tokenizer"

    downsample: int = 4  # spatial reduction factor f of the encoder: a token covers f x f pixels

    def __post_init__(self) -> None:
        if self.downsample < 1 or self.downsample & (self.downsample - 1):
            raise ValueError(
                f"tokenizer.downsample: must be a power of two >= 1 (each encoder stage halves the "
                f"resolution), got {self.downsample}"
            )

    @classmethod
    def from_dict(cls, raw: Any) -> Self:
        return _build_section(cls, raw, cls.SECTION)


@dataclass(frozen=True)
class PrepareParams:
    """The `prepare` section: which images become shards, at what size, and how they are cut."""

    SECTION: ClassVar[str] = "prepare"

    source: SourceKind = "fashion_mnist"
    # fashion_mnist: directory with the four IDX .gz files (null: the Debian package's directory,
    # then data/raw/, then a download); folder: the image folder (required); synthetic: unused.
    root: str | None = None
    image_size: int = 32
    channels: int = 1
    val_fraction: float = 0.1  # only for sources without an official split (folder, synthetic)
    seed: int = 0
    limit: int | None = None  # images per split, null = all
    maxcount: int = 10000  # samples per shard
    maxsize: int = 100_000_000  # bytes of payload per shard
    synthetic_count: int = 2000  # images the synthetic source generates (both splits together)
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
        for ok, key, message in checks:
            if not ok:
                raise ValueError(f"{self.SECTION}.{key}: {message}")

    @classmethod
    def from_dict(cls, raw: Any) -> Self:
        return _build_section(cls, raw, cls.SECTION)


@dataclass(frozen=True)
class Params:
    """All sections of params.yaml; checks that need two sections live in ``__post_init__``."""

    prepare: PrepareParams = dataclasses.field(default_factory=PrepareParams)
    tokenizer: TokenizerParams = dataclasses.field(default_factory=TokenizerParams)

    def __post_init__(self) -> None:
        factor = self.tokenizer.downsample
        if self.prepare.image_size % factor:
            below = self.prepare.image_size // factor * factor
            above = below + factor
            suggestion = f"{below} or {above}" if below else f"{above}"
            raise ValueError(
                f"prepare.image_size: {self.prepare.image_size} is not divisible by tokenizer.downsample "
                f"({factor}); use a multiple of {factor} such as {suggestion}"
            )

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


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; raises ValueError naming the offending key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"params: {path} does not exist; run from the repository root") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"params: {path} is not valid YAML: {exc}") from None
    return Params.from_dict(raw)
