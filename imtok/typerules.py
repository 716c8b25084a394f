"""The type rules that the params sections and the model configs share: which YAML value fits a field's
annotation (converted to it), and how an annotation reads in an error message."""

from __future__ import annotations

import types
import typing
from typing import Any, Literal


def type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is Literal:
        return " | ".join(repr(value) for value in typing.get_args(annotation))
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return " | ".join(type_name(arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    if typing.get_origin(annotation) is tuple:
        args = typing.get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {type_name(args[0])}"
        return f"a list of {len(args)} values ({', '.join(type_name(arg) for arg in args)})"
    if typing.get_origin(annotation) is dict:
        return "a mapping of names to values"
    return getattr(annotation, "__name__", str(annotation))


def value_matches(value: Any, annotation: Any) -> tuple[bool, Any]:
    """Whether ``value`` fits ``annotation``, and the value converted to it (ints accepted as floats)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        for arg in typing.get_args(annotation):
            ok, converted = value_matches(value, arg)
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
    origin = typing.get_origin(annotation)
    if origin is tuple:  # YAML lists; tuple[int, ...] or a fixed tuple[float, float]
        args = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            return False, value
        element_types = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(element_types) != len(value):
            return False, value
        converted = [value_matches(item, kind) for item, kind in zip(value, element_types, strict=True)]
        return all(ok for ok, _ in converted), tuple(item for _, item in converted)
    if origin is dict:  # free-form option mappings with string keys, checked by their consumer
        ok = isinstance(value, dict) and all(isinstance(key, str) for key in value)
        return ok, dict(value) if ok else value
    raise TypeError(f"params: no validation rule for type {annotation!r}")
