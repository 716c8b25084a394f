"""Turn a params overrides file (a profile) into the arguments of a DVC experiment.

    dvc exp run $(python -m demos.profile profiles/gpu.yaml)

The profile is validated against params.yaml first (unknown keys and bad values fail here, with the
key named), so a typo never reaches a long run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from imtok.overrides import set_param_arguments, validated
from imtok.params import read_yaml


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", type=Path)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()
    try:
        profile = read_yaml(args.profile, "profile") or {}
        validated(args.params, profile)  # raises naming the key of any bad override
    except (OSError, ValueError) as error:
        parser.error(str(error))
    print(" ".join(set_param_arguments(profile)))


if __name__ == "__main__":
    main()
