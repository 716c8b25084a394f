"""DVC stage `check_params`: the whole params.yaml validated before any other stage runs.

dvc.yaml lists each stage's params key by key, so a change reruns only the stages it touches; a
misspelled key (``learning_rate`` under ``tokenizer:``) is then a change no stage lists, and
``dvc repro`` used to print "didn't change, skipping" and exit 0. This stage depends on the whole
file, so any edit runs it: it validates every section (an unknown key or a bad value is named, and
``dvc repro`` stops) and writes ``reports/params.json``, which ``prepare`` and through it every stage
depends on. The report lists the sections and keys the params accept, which change only with the
code, so a valid edit reruns no other stage than those that read the edited key.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from imtok import layout
from imtok.params import Params
from stages.common import stage_main

REPORT_PATH = Path(layout.REPORTS) / "params.json"


def accepted_keys() -> dict[str, list[str]]:
    """Every section of params.yaml and the keys it accepts, a nested section's as dotted keys
    (``run``: ``tokenizer.log_every``, ...)."""

    def keys(section: Any) -> list[str]:
        found = []
        for field in dataclasses.fields(section):
            value = getattr(section, field.name)
            nested = dataclasses.is_dataclass(value)
            found += [f"{field.name}.{key}" for key in keys(value)] if nested else [field.name]
        return found

    defaults = Params()
    return {section.name: keys(getattr(defaults, section.name)) for section in dataclasses.fields(Params)}


def check(params: Params, _args: Any) -> dict[str, Any]:
    """params.yaml has been read and validated whole by ``stage_main`` by now; the report says so."""
    return {"valid": True, "sections": accepted_keys()}


def main(argv: list[str] | None = None) -> int:
    return stage_main(__doc__, check, report_path=REPORT_PATH, argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
