"""Pieces the stage scripts share: swapping in a finished output directory, writing reports."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def replace_directory(out_dir: Path, fill: Callable[[Path], None]) -> None:
    """Let ``fill`` write a staging directory beside ``out_dir``, then swap it in.

    Readers never see a half-written output: until the rename the old directory (or none) is there.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        fill(staging)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_json(path: Path, content: dict[str, Any]) -> None:
    """Write JSON atomically (temp file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(json.dumps(content, indent=2) + "\n")
    os.replace(temp, path)


def terminate_gracefully(signum: int, _frame: Any) -> None:
    """SIGTERM handler (a scheduler's cancel, a job time limit): unwind like Ctrl-C, so the MLflow run
    ends FAILED and the last checkpoint stays for the re-run to resume from."""
    raise SystemExit(128 + signum)
