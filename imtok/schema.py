"""A JSON schema of params.yaml, generated from the typed sections in ``imtok.params``, so editors
complete keys and flag a misspelled one or a value of the wrong type while you type.

Every section forbids keys it does not know (as ``check_params`` does); each key carries its
default (from ``imtok.params``) and, as its description, the comment that follows it in
params.yaml. Cross-key rules (e.g. ``prepare.image_size`` divisible by the tokenizer's downsampling)
stay with ``check_params``. The committed ``params.schema.json`` is checked to be current by a test;
after changing a section or a comment, regenerate it:

    python -m imtok.schema --write            # writes params.schema.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from imtok.params import Params

SCHEMA_FILE = "params.schema.json"
SCHEMA_URL = "https://json-schema.org/draft/2020-12/schema"


def key_comments(params_text: str) -> dict[str, str]:
    """``{dotted key: comment}``: the comment at the end of each key's line in params.yaml, at any
    depth (``run.tokenizer.log_every``)."""
    from ruamel.yaml import YAML

    comments: dict[str, str] = {}

    def walk(mapping: Any, prefix: str) -> None:
        for key, tokens in getattr(getattr(mapping, "ca", None), "items", {}).items():
            token = next((item for item in tokens if item is not None and hasattr(item, "value")), None)
            first = token.value.strip().splitlines()[0] if token is not None and token.value.strip() else ""
            if first.startswith("#") and first.lstrip("#").strip():
                comments[f"{prefix}{key}"] = first.lstrip("#").strip()
        for key, value in mapping.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")

    walk(YAML().load(params_text), "")  # round trip: keeps the comments
    return comments


def params_schema(params_text: str) -> dict[str, Any]:
    """The JSON schema of params.yaml, with ``params_text``'s comments as key descriptions."""
    from pydantic import TypeAdapter

    schema = TypeAdapter(Params).json_schema()
    comments = key_comments(params_text)
    definitions = schema["$defs"]

    def describe(definition: dict[str, Any], prefix: str) -> None:
        definition["additionalProperties"] = False
        for key, prop in definition["properties"].items():
            prop.pop("title", None)
            if f"{prefix}{key}" in comments:
                prop["description"] = comments[f"{prefix}{key}"]
            if "$ref" in prop:  # a nested section (run.tokenizer)
                describe(definitions[prop["$ref"].rsplit("/", 1)[-1]], f"{prefix}{key}.")

    describe(schema, "")
    options = definitions["TokenizerParams"]["properties"]["quantizer_options"]
    options.update(quantizer_options_schema())
    return {"$schema": SCHEMA_URL, "title": "imtok params.yaml", **schema}


def quantizer_options_schema() -> dict[str, Any]:
    """``tokenizer.quantizer_options``: one object per quantizer, its options typed and defaulted as
    its constructor declares them, unknown quantizers and options flagged."""
    import typing

    from pydantic import TypeAdapter

    from imtok.models.autoencoder import QUANTIZERS, quantizer_option_defaults

    properties = {}
    for kind, cls in QUANTIZERS.items():
        hints = typing.get_type_hints(cls.__init__)
        options = {
            name: {**TypeAdapter(hints[name]).json_schema(), "default": default}
            for name, default in quantizer_option_defaults(kind).items()
        }
        properties[kind] = {"type": "object", "additionalProperties": False, "properties": options}
    return {"type": "object", "additionalProperties": False, "properties": properties}


def schema_text(params_text: str) -> str:
    return json.dumps(params_schema(params_text), indent=1, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--write", action="store_true", help=f"write {SCHEMA_FILE} beside --params")
    args = parser.parse_args(argv)
    try:
        text = schema_text(args.params.read_text())
    except OSError as error:
        parser.error(f"--params: cannot read {args.params} ({error.strerror}); run from the repository root")
    if args.write:
        from imtok.atomic import write_text_atomic

        write_text_atomic(args.params.parent / SCHEMA_FILE, text)
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
