"""`dvc repro` of the real dvc.yaml in a temporary git repository, on tiny params."""

from __future__ import annotations

import json

import pytest
import yaml
from project_factory import STAGES, environment, run

from imtok.data.shards import iter_samples, read_meta


@pytest.mark.slow
def test_dvc_repro_runs_every_stage_once_then_skips_and_dvc_reads_the_metrics_and_plots(reproduced_project):
    root, output = reproduced_project.root, reproduced_project.output
    env = environment(root)
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
    assert "errors" not in plots, plots
    keys = json.dumps(plots).split('"')
    assert any("codebook_usage.csv" in key for key in keys)
    assert any(key.endswith("reports/study/codebook_size.png") for key in keys)

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    for name in ("imtok-tokenizer", "imtok-prior"):
        champion = client.get_model_version_by_alias(name, "champion")
        assert champion.tags["imtok.promotion"].startswith("first champion")

    again = run(["dvc", "repro"], root, env)
    assert "Running stage" not in again, again

    params = yaml.safe_load((root / "params.yaml").read_text())
    params["prior"]["seed"] = 1
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = run(["dvc", "repro"], root, env)
    ran = {stage for stage in STAGES if f"Running stage '{stage}'" in changed}
    assert ran == {"check_params", "train_prior", "sample", "evaluate"}, changed

    params["run"]["tokenizer"]["log_every"] = 4  # a run setting: validated, and no stage reruns for it
    params["run"]["extract"]["num_workers"] = 1
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = run(["dvc", "repro"], root, env)
    ran = {stage for stage in STAGES if f"Running stage '{stage}'" in changed}
    assert ran == {"check_params"}, changed


@pytest.mark.slow
def test_a_misspelled_key_stops_dvc_repro_naming_it_and_a_valid_edit_reruns_only_its_readers(tmp_path):
    from project_factory import TINY_PARAMS, make_project

    root = make_project(tmp_path / "misspelled", TINY_PARAMS)
    env = environment(root)
    first = run(["dvc", "repro", "prepare"], root, env)
    assert "Running stage 'check_params'" in first and "Running stage 'prepare'" in first

    params = yaml.safe_load((root / "params.yaml").read_text())
    params["tokenizer"]["learning_rate"] = 0.01  # no stage lists it: DVC alone would skip everything
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    import subprocess

    done = subprocess.run(["dvc", "repro"], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0, done.stdout
    assert "tokenizer.learning_rate: unknown key" in done.stdout + done.stderr
    assert "Running stage 'train_tokenizer'" not in done.stdout

    del params["tokenizer"]["learning_rate"]
    params["prepare"]["maxcount"] = 50  # a key prepare reads: check_params and prepare run
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    again = run(["dvc", "repro", "prepare"], root, env)
    assert "Running stage 'check_params'" in again and "Running stage 'prepare'" in again
    params["prior"]["lr"] = 0.002  # a key only train_prior reads: prepare stays as it is
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    valid = run(["dvc", "repro", "prepare"], root, env)
    assert "Running stage 'check_params'" in valid and "Running stage 'prepare'" not in valid, valid
