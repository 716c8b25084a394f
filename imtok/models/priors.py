"""The token priors by kind: ``maskgit`` (MaskGIT) or ``gpt`` (GPT), built from their config."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from imtok.models.gpt import GPT, GPTConfig
from imtok.models.maskgit import MaskGIT, MaskGITConfig

PRIOR_KINDS = ("maskgit", "gpt")


def build_prior(kind: str, config: Any) -> nn.Module:
    """A ``MaskGIT`` or ``GPT`` from its config (dataclass or the dict a model file stores)."""
    if kind not in PRIOR_KINDS:
        raise ValueError(f"prior.kind: unknown kind {kind!r}; use maskgit or gpt")
    config_class, model_class = (MaskGITConfig, MaskGIT) if kind == "maskgit" else (GPTConfig, GPT)
    if isinstance(config, Mapping):
        config = config_class(**config)
    return model_class(config)
