"""Turn a params overrides file (a profile) into the arguments of a DVC experiment.

    dvc exp run $(python -m demos.profile profiles/gpu.yaml)

The profile is validated against params.yaml first (unknown keys and bad values fail here, with the
key named), so a typo never reaches a long run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

from imtok.params import Params


def merged(params: dict[str, Any], profile: dict[str, Any]) -> dict[str, Any]:
    """params.yaml with the profile's values, section by section; unknown sections stay an error."""
    result = {section: dict(values or {}) for section, values in params.items()}
    for section, values in (profile or {}).items():
        result.setdefault(section, {}).update(values or {})
    return result


def set_param_arguments(profile: dict[str, Any]) -> list[str]:
    """``-S section.key=value`` for every override, in YAML flow syntax without spaces (shell-safe)."""
    arguments = []
    for section, values in profile.items():
        for key, value in (values or {}).items():
            arguments += ["-S", f"{section}.{key}={json.dumps(value, separators=(',', ':'))}"]
    return arguments


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", type=Path)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()
    profile = yaml.safe_load(args.profile.read_text()) or {}
    combined = merged(yaml.safe_load(args.params.read_text()), profile)
    Params.from_dict(combined)  # raises naming the key of any bad override
    print(" ".join(set_param_arguments(profile)))


if __name__ == "__main__":
    main()
