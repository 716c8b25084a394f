"""A tiny copy of this project in a temporary git + DVC repository, for pipeline tests."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

TINY_PARAMS = {
    "prepare": {"source": "synthetic", "image_size": 16, "synthetic_count": 300, "maxcount": 60},
    "tokenizer": {
        "base_channels": 8,
        "codebook_size": 256,
        "batch_size": 16,
        "total_steps": 16,
        "warmup_steps": 2,
    },
    "prior": {
        "hidden_dim": 32,
        "depth": 1,
        "heads": 2,
        "batch_size": 16,
        "total_steps": 12,
        "warmup_steps": 2,
    },
    "sample": {"per_class": 4, "steps": 3, "grid_per_class": 2},
    "classifier": {"steps": 20, "batch_size": 32, "min_accuracy": 0.0},
    "run": {
        "tokenizer": {
            "log_every": 8,
            "val_every": 16,
            "val_batches": 1,
            "checkpoint_every": 8,
            "device": "cpu",
        },
        "extract": {"device": "cpu"},
        "prior": {"log_every": 6, "val_every": 12, "val_batches": 1, "checkpoint_every": 12, "device": "cpu"},
        "sample": {"device": "cpu"},
        "classifier": {"device": "cpu"},
        "evaluate": {"device": "cpu"},
    },
}


def with_run_settings(raw: dict) -> dict:
    """``raw`` params with the run settings given inside a section (``tokenizer: {log_every: 4}``)
    moved to ``run.<section>``, where params.yaml holds them: for tests that set both through one
    mapping of keyword arguments."""
    from imtok.params import RunParams

    result = {section: dict(values or {}) for section, values in raw.items()}
    run = result.setdefault("run", {})
    for section, kind in RunParams.stages().items():
        names = {field.name for field in dataclasses.fields(kind)}
        moved = {key: result[section].pop(key) for key in list(result.get(section, {})) if key in names}
        if moved:
            run[section] = {**run.get(section, {}), **moved}
    return result


STAGES = (
    "check_params",
    "prepare",
    "train_tokenizer",
    "extract_tokens",
    "train_prior",
    "sample",
    "train_classifier",
    "evaluate_tokenizer",
    "evaluate",
)


def make_project(root: Path, params: dict) -> Path:
    """A git + DVC repository holding this project's code, dvc.yaml and params.yaml with overrides."""
    root.mkdir(parents=True)
    for name in ("imtok", "stages", "flows"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "prefect.yaml"):
        shutil.copy(REPO / name, root / name)
    # dvc.yaml's top-level plots name the committed study figures: a clone has them, so the project
    # too (those files only: the study's tables would add the committed points to a test's own study)
    for entry in yaml.safe_load((REPO / "dvc.yaml").read_text()).get("plots", []):
        name = entry if isinstance(entry, str) else next(iter(entry))
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, root / name)
    full = yaml.safe_load((REPO / "params.yaml").read_text())  # DVC needs every key a stage lists
    for section, values in params.items():
        full[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(full, sort_keys=False))
    (root / ".gitignore").write_text("/mlruns/\n/mlflow.db\n/checkpoints/\n")
    run(["git", "init", "-q"], root)
    run(["git", "config", "user.email", "pipeline@test.invalid"], root)
    run(["git", "config", "user.name", "pipeline test"], root)
    run(["dvc", "init", "-q"], root, environment(root))
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "project"], root)
    return root


def environment(root: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = "1"
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    env["DVC_NO_ANALYTICS"] = "1"
    return env


def run(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr
