"""Trained models as single files: config, weights and provenance, readable without unpickling code.

A model file is a ``torch.save``d dict ``{format, kind, config, state_dict, meta}`` holding only plain
values and tensors, so it loads with ``torch.load(weights_only=True)``: safe to read from any store.
It is written atomically (temp file, then rename). Stages write one per trained model
(``models/tokenizer/tokenizer.pt``, ``models/prior/prior.pt``) and log the same file inside the
MLflow model, so a registry URI and a local directory give the very same weights.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from imtok.registry import fetched_model_file
from imtok.training import atomic_save

MODEL_FILE_FORMAT = 1


def _plain(value: Any) -> Any:
    """Dataclasses to dicts and tuples to lists, recursively: what weights-only loading accepts."""
    if is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def save_model_file(
    path: str | os.PathLike[str], *, kind: str, config: Any, model: nn.Module, meta: Mapping[str, Any]
) -> Path:
    """Write ``model``'s weights with its ``config`` (dataclass or dict) and ``meta`` atomically."""
    payload = {
        "format": MODEL_FILE_FORMAT,
        "kind": kind,
        "config": _plain(config),
        "state_dict": {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()},
        "meta": _plain(dict(meta)),
    }
    atomic_save(payload, path)
    return Path(path)


def read_model_file(path: str | os.PathLike[str], kind: str) -> dict[str, Any]:
    """The payload of a model file of ``kind``; ValueError naming the file when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such model file; run the stage that trains the {kind} first")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{path}: cannot read model file (truncated or corrupt?): {error}") from error
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FILE_FORMAT:
        raise ValueError(f"{path}: not an imtok model file of format {MODEL_FILE_FORMAT}")
    if payload.get("kind") != kind:
        raise ValueError(f"{path}: holds a {payload.get('kind')!r} model, expected a {kind!r} model")
    return payload


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_tokenizer(
    location: str | os.PathLike[str], filename: str = "tokenizer.pt"
) -> tuple[Any, dict[str, Any]]:
    """A ``Tokenizer`` (eval mode, CPU) and its model-file payload from a directory, file or MLflow URI."""
    from imtok.models.autoencoder import Tokenizer, TokenizerConfig

    with fetched_model_file(location, filename) as path:
        payload = read_model_file(path, "tokenizer")
        try:
            tokenizer = Tokenizer(TokenizerConfig(**payload["config"]))
            tokenizer.load_state_dict(payload["state_dict"])
        except (TypeError, RuntimeError) as error:
            raise ValueError(
                f"{location}: the stored tokenizer does not match this version of imtok: {error}"
            ) from None
    return tokenizer.eval(), payload


def load_prior(location: str | os.PathLike[str], filename: str = "prior.pt") -> tuple[Any, dict[str, Any]]:
    """A prior (MaskGIT or GPT, eval mode, CPU) and its model-file payload, like ``load_tokenizer``."""
    from imtok.models.priors import build_prior

    with fetched_model_file(location, filename) as path:
        payload = read_model_file(path, "prior")
        try:
            prior = build_prior(payload["config"]["kind"], payload["config"]["model"])
            prior.load_state_dict(payload["state_dict"])
        except (TypeError, KeyError, RuntimeError) as error:
            raise ValueError(
                f"{location}: the stored prior does not match this version of imtok: {error}"
            ) from None
    return prior.eval(), payload
