"""Param overrides (profiles, flow parameters, sweep points) on top of params.yaml.

An override is ``{section: {key: value}}``, nested where params.yaml nests (``{run: {tokenizer:
{log_every: 10}}}``); it sets the leaves it names and keeps every other value, as DVC's
``-S run.tokenizer.log_every=10`` does. It is validated against the typed params before anything runs,
so a typo fails at once with the key named, never after an hour of training.
"""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path
from typing import Any

from imtok.atomic import write_text_atomic
from imtok.params import Params, read_yaml


def leaves(overrides: dict[str, Any] | None) -> list[tuple[tuple[str, ...], Any]]:
    """``(key path, value)`` of every value an override sets: nested mappings are walked, anything
    else (a list, a scalar, null) is a value, and an empty mapping sets nothing (as DVC's ``-S
    key={}`` does). An empty section (null) sets nothing; one that is not a mapping is a ValueError."""
    found: list[tuple[tuple[str, ...], Any]] = []

    def walk(path: tuple[str, ...], value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk((*path, str(key)), inner)
        else:
            found.append((path, value))

    for section, values in (overrides or {}).items():
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ValueError(f"override {section!r} must map keys to values, got {values!r}")
        for key, value in values.items():
            walk((section, str(key)), value)
    return found


def set_leaf(document: dict[str, Any], keys: tuple[str, ...], value: Any) -> None:
    """``document[k1][k2]...[kn] = value``, making the mappings on the way that are missing."""
    for key in keys[:-1]:
        if not isinstance(document.get(key), dict):
            document[key] = {}
        document = document[key]
    document[keys[-1]] = value


def merged(params: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """A copy of params with each of the overrides' leaves set (``leaves``); params that are not a
    mapping of sections (a YAML list, say) are a ValueError naming them."""
    if not isinstance(params, dict):
        raise ValueError(f"params: expected a mapping of sections, got {type(params).__name__}")
    result = copy.deepcopy(params)
    for keys, value in leaves(overrides):
        set_leaf(result, keys, value)
    return result


def validated(params_path: Path, overrides: dict[str, Any] | None) -> Params:
    """The typed params that ``params_path`` with ``overrides`` gives; raises naming a bad key."""
    base = read_yaml(params_path, "params") or {}
    return Params.from_dict(merged(base, overrides))


def set_param_arguments(overrides: dict[str, Any]) -> list[str]:
    """``-S section.key=value`` per leaf of the overrides (DVC experiments), values in compact YAML
    flow syntax."""
    arguments = []
    for path, value in leaves(overrides):
        arguments += ["-S", f"{'.'.join(path)}={json.dumps(value, separators=(',', ':'))}"]
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
    for keys, value in leaves(overrides):
        set_leaf(document, keys, value)
    buffer = io.StringIO()
    round_trip.dump(document, buffer)
    write_text_atomic(path, buffer.getvalue())
    return params
