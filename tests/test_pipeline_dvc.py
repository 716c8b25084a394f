"""`dvc repro` of the real dvc.yaml in a temporary git repository, on tiny params."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from imtok.data.shards import iter_samples, read_meta

REPO = Path(__file__).resolve().parents[1]

TINY_PARAMS = {
    "prepare": {"source": "synthetic", "image_size": 16, "synthetic_count": 300, "maxcount": 60},
    "tokenizer": {
        "base_channels": 8,
        "codebook_size": 256,
        "batch_size": 16,
        "total_steps": 16,
        "warmup_steps": 2,
        "log_every": 8,
        "val_every": 16,
        "val_batches": 1,
        "checkpoint_every": 8,
        "device": "cpu",
    },
    "extract": {"device": "cpu"},
    "prior": {
        "hidden_dim": 32,
        "depth": 1,
        "heads": 2,
        "batch_size": 16,
        "total_steps": 12,
        "warmup_steps": 2,
        "log_every": 6,
        "val_every": 12,
        "val_batches": 1,
        "checkpoint_every": 12,
        "device": "cpu",
    },
    "sample": {"per_class": 4, "steps": 3, "device": "cpu", "grid_per_class": 2},
    "classifier": {"steps": 20, "batch_size": 32, "min_accuracy": 0.0, "device": "cpu"},
    "evaluate": {"device": "cpu"},
}

STAGES = (
    "prepare",
    "train_tokenizer",
    "extract_tokens",
    "train_prior",
    "sample",
    "train_classifier",
    "evaluate",
)


def make_project(root: Path, params: dict) -> Path:
    """A git + DVC repository holding this project's code, dvc.yaml and params.yaml with overrides."""
    root.mkdir(parents=True)
    for name in ("imtok", "stages"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
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


@pytest.mark.slow
def test_dvc_repro_runs_every_stage_once_then_skips_and_dvc_reads_the_metrics_and_plots(tmp_path):
    root = make_project(tmp_path / "project", TINY_PARAMS)
    env = environment(root)
    output = run(["dvc", "repro"], root, env)
    for stage in STAGES:
        assert f"Running stage '{stage}'" in output, output
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert set(STAGES) <= set(lock)
    meta = read_meta(root / "data" / "samples")
    assert meta["count"] == 16 and meta["image_size"] == 16
    assert len(list(iter_samples(root / "data" / "samples"))) == 16
    from PIL import Image

    with Image.open(root / "reports" / "samples.png") as grid:
        assert grid.size[0] > 16 and grid.size[1] > 16
    report = json.loads((root / "reports" / "extract_tokens.json").read_text())
    assert report["train"]["count"] == 270

    metrics = json.loads(run(["dvc", "metrics", "show", "--json"], root, env))
    shown = json.dumps(metrics)
    for name in (
        "psnr",
        "codebook_usage_pct",
        "rfid_fmnist",
        "fid_fmnist",
        "precision_fmnist",
        "class_accuracy",
    ):
        assert f'"{name}"' in shown, name
    generation = json.loads((root / "metrics" / "generation.json").read_text())
    assert "fid" not in generation  # no InceptionV3 weights here: only the domain network's names
    plots = json.loads(run(["dvc", "plots", "show", "--json"], root, env))
    assert any("codebook_usage.csv" in key for key in json.dumps(plots).split('"'))

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    for name in ("imtok-tokenizer", "imtok-prior"):
        champion = client.get_model_version_by_alias(name, "champion")
        assert champion.tags["imtok.promotion"].startswith("first champion")

    again = run(["dvc", "repro"], root, env)
    assert "Running stage" not in again, again

    params = yaml.safe_load((root / "params.yaml").read_text())
    params["sample"]["seed"] = 1
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = run(["dvc", "repro"], root, env)
    assert "Running stage 'sample'" in changed and "Running stage 'evaluate'" in changed, changed
    assert "Running stage 'train_prior'" not in changed, changed
