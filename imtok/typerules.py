"""The type rules the params sections and the quantizer options share: pydantic checks a YAML value
against a field's annotation in strict mode (no ``"1"`` for 1, no ``true`` for an integer; an integer
is a float), and ``type_name`` says the annotation in an error message."""

from __future__ import annotations

import functools
import types
import typing
from typing import Any, Literal

from pydantic import ConfigDict, TypeAdapter, ValidationError

STRICT = ConfigDict(strict=True)


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


@functools.cache
def _adapter(annotation: Any) -> TypeAdapter:
    return TypeAdapter(annotation, config=STRICT)


def yaml_value(value: Any) -> Any:
    """A YAML list as the tuple the fields declare (strict mode takes no list for a tuple)."""
    return tuple(value) if isinstance(value, list) else value


def value_matches(value: Any, annotation: Any) -> tuple[bool, Any]:
    """Whether ``value`` fits ``annotation`` under the strict rules, and the value converted to it."""
    try:
        return True, _adapter(annotation).validate_python(yaml_value(value))
    except ValidationError:
        return False, value
