"""Param overrides (profiles, flow parameters, sweep points) on top of params.yaml.

An override is ``{section: {key: value}}``. It is validated against the typed params before anything
runs, so a typo fails at once with the key named, never after an hour of training.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from imtok.atomic import write_text_atomic
from imtok.params import Params, read_yaml


def merged(params: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """params with the overrides' values, section by section."""
    result = {section: dict(values or {}) for section, values in params.items()}
    for section, values in (overrides or {}).items():
        if not isinstance(values, dict):
            raise ValueError(f"override {section!r} must map keys to values, got {values!r}")
        result.setdefault(section, {}).update(values)
    return result


def validated(params_path: Path, overrides: dict[str, Any] | None) -> Params:
    """The typed params that ``params_path`` with ``overrides`` gives; raises naming a bad key."""
    base = read_yaml(params_path, "params") or {}
    return Params.from_dict(merged(base, overrides))


def set_param_arguments(overrides: dict[str, Any]) -> list[str]:
    """``-S section.key=value`` per override (DVC experiments), values in compact YAML flow syntax."""
    arguments = []
    for section, values in overrides.items():
        for key, value in (values or {}).items():
            arguments += ["-S", f"{section}.{key}={json.dumps(value, separators=(',', ':'))}"]
    return arguments


def write_overrides(params_path: Path, overrides: dict[str, Any] | None) -> Params:
    """Validate, then write the overrides into params.yaml atomically, keeping its comments."""
    params = validated(params_path, overrides)
    if not overrides:
        return params
    from ruamel.yaml import YAML

    round_trip = YAML()
    round_trip.preserve_quotes = True
    path = Path(params_path)
    document = round_trip.load(path.read_text())
    for section, values in overrides.items():
        if section not in document or document[section] is None:
            document[section] = {}
        for key, value in values.items():
            document[section][key] = value
    buffer = io.StringIO()
    round_trip.dump(document, buffer)
    write_text_atomic(path, buffer.getvalue())
    return params
