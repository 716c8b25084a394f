"""The train_tokenizer stage end to end: MLflow run and registry, kill and resume, DDP, bad input."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import needs_compiler, torchrun_command
from project_factory import with_run_settings

from imtok.models.files import read_model_file
from imtok.params import Params
from imtok.runtime import Runtime
from imtok.trainers.tokenizer import MODEL_FILE, REGISTERED_NAME
from imtok.trainers.tokenizer import train_and_export as train
from imtok.training import list_checkpoints, read_checkpoint

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "prepare": {"source": "synthetic", "image_size": 16, "synthetic_count": 300, "maxcount": 60},
    "tokenizer": {
        "base_channels": 8,
        "codebook_size": 256,
        "batch_size": 16,
        "total_steps": 24,
        "warmup_steps": 4,
        "log_every": 4,
        "val_every": 12,
        "val_batches": 2,
        "checkpoint_every": 8,
        "grid_images": 8,
        "device": "cpu",
    },
}


def tiny_params(**tokenizer: object) -> Params:
    """The tiny params with ``tokenizer`` keys (run settings among them) changed."""
    raw = {"prepare": dict(TINY["prepare"]), "tokenizer": {**TINY["tokenizer"], **tokenizer}}
    return Params.from_dict(with_run_settings(raw))


def project(root: Path, shards: Path, params: dict) -> Path:
    """A working directory laid out like the repository: params.yaml and data/shards."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "data").mkdir(exist_ok=True)
    (root / "data" / "shards").symlink_to(shards, target_is_directory=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


CPU = Runtime(device=torch.device("cpu"))


def test_stage_logs_a_run_registers_the_model_and_the_registry_gives_the_same_indices(
    tiny_shards, mlflow_store, tmp_path, monkeypatch, one_thread
):
    import mlflow
    import mlflow.pytorch

    from imtok.models.files import load_tokenizer

    report = train(
        tiny_params(),
        shards_dir=tiny_shards,
        out_dir=tmp_path / "models" / "tokenizer",
        checkpoint_root=tmp_path / "checkpoints",
        runtime=CPU,
    )
    assert report["step"] == 24 and report["resumed_from_step"] == 0
    assert report["val"]["images"] == 30 and 0 < report["val"]["codebook_usage_pct"] <= 100
    out = tmp_path / "models" / "tokenizer"
    summary = json.loads((out / "tokenizer.json").read_text())
    assert summary["registered_model"]["version"] == "1" and summary["token_grid"] == [4, 4]
    assert (out / "reconstructions.png").stat().st_size > 0

    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias(REGISTERED_NAME, "candidate")
    assert str(version.version) == "1"
    assert version.tags["quantizer"] == "fsq" and version.tags["token_grid"] == "4x4"
    assert version.tags["dataset"] == "synthetic" and "val_psnr" in version.tags
    # the one line the registry's version list shows
    assert re.fullmatch(
        r"fsq, \d+ codes \(levels [\d,]+\), 4x4 tokens of 16px synthetic images; val PSNR [\d.]+ dB, "
        r"codebook usage [\d.]+%",
        version.description,
    ), version.description
    from imtok.trainers.tokenizer import MODEL_DESCRIPTION

    assert client.get_registered_model(REGISTERED_NAME).description == MODEL_DESCRIPTION  # the model page
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["imtok.stage"] == "train_tokenizer"
    assert "mlflow.source.git.commit" in run.data.tags
    assert run.data.params["tokenizer.total_steps"] == "24" and run.data.params["prepare.image_size"] == "16"
    for name in (
        "train/loss",
        "train/recon",
        "train/psnr",
        "train/codebook_usage_pct",
        "val/psnr",
        "final/psnr",
    ):
        assert name in run.data.metrics, name
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [point.step for point in history] == [4, 8, 12, 16, 20, 24]
    grids = [artifact.path for artifact in client.list_artifacts(run.info.run_id, "reconstructions")]
    assert grids == ["reconstructions/step-00000012.png", "reconstructions/step-00000024.png"]
    if run.data.tags.get("imtok.loss.perceptual"):  # no VGG-19 weights on this machine: said, not hidden
        assert run.data.tags["imtok.loss.perceptual"].startswith("disabled: no pretrained VGG-19")

    images = torch.rand(6, 1, 16, 16) * 2 - 1
    local, payload = load_tokenizer(out)
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")
    registered = mlflow.pytorch.load_model(f"models:/{REGISTERED_NAME}@candidate")
    assert torch.equal(registered.encode(images), local.encode(images))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    from_uri, _ = load_tokenizer(f"models:/{REGISTERED_NAME}@candidate")  # weights-only path, no pickle
    assert torch.equal(from_uri.encode(images), local.encode(images))
    assert list(scratch.iterdir()) == []  # the downloaded weights do not outlive the load
    assert payload["meta"]["step"] == 24


def _run_stage(cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "stages.train_tokenizer", "--no-register"],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_a_killed_run_resumes_from_its_checkpoint_and_ends_with_the_uninterrupted_weights(
    tiny_shards, tmp_path, monkeypatch, one_thread
):
    settings = {"total_steps": 96, "checkpoint_every": 8, "val_every": 48}
    params = with_run_settings({"prepare": TINY["prepare"], "tokenizer": {**TINY["tokenizer"], **settings}})
    killed = project(tmp_path / "killed", tiny_shards, params)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MLFLOW_TRACKING_URI": f"sqlite:///{killed / 'mlflow.db'}",
        "PYTHONPATH": str(REPO),
    }
    process = _run_stage(killed, env)
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline and process.poll() is None:
            written = list((killed / "checkpoints" / "tokenizer").glob("*/step-00000016.pt"))
            if written:
                break
            time.sleep(0.02)
        assert written, (
            f"no checkpoint appeared: {process.stdout.read() if process.poll() is not None else ''}"
        )
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
    checkpoints = list_checkpoints(written[0].parent)
    killed_at = read_checkpoint(checkpoints[-1])["step"]
    assert 16 <= killed_at < 96, "the run finished before the kill: the test proves nothing"
    assert not (killed / "models").exists()

    resumed = subprocess.run(
        [sys.executable, "-m", "stages.train_tokenizer", "--no-register"],
        cwd=killed,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resuming from {checkpoints[-1]}"[-30:] in resumed.stderr
    report = json.loads((killed / "reports" / "train_tokenizer.json").read_text())
    assert report["resumed_from_step"] == killed_at and report["step"] == 96

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'reference.db'}")
    monkeypatch.chdir(tmp_path)
    train(
        Params.from_dict(params),
        shards_dir=tiny_shards,
        out_dir=tmp_path / "reference",
        checkpoint_root=tmp_path / "reference-checkpoints",
        register=False,
        runtime=CPU,
    )
    resumed_state = torch.load(killed / "models" / "tokenizer" / MODEL_FILE, weights_only=True)["state_dict"]
    reference_state = torch.load(tmp_path / "reference" / MODEL_FILE, weights_only=True)["state_dict"]
    assert resumed_state.keys() == reference_state.keys()
    for name, value in reference_state.items():
        assert torch.equal(resumed_state[name], value), name


def _trained_state(params: Params, shards: Path, checkpoint_dir: Path) -> tuple[dict, int]:
    from imtok.trainers.tokenizer import train_tokenizer

    result = train_tokenizer(
        params.tokenizer,
        params.tokenizer_config(1, 16),
        run=params.run.tokenizer,
        train_dir=shards / "train",
        val_dir=shards / "val",
        checkpoint_dir=checkpoint_dir,
        runtime=CPU,
    )
    return {name: value.clone() for name, value in result.model.state_dict().items()}, result.start_step


RANDOM_TRAINING = {"total_steps": 12, "checkpoint_every": 4, "keep_checkpoints": 10, "perceptual_weight": 0.0}


@pytest.mark.parametrize("settings", [{"quantizer": "regvq"}, {"dropout": 0.1}], ids=["regvq", "dropout"])
def test_a_run_that_draws_random_numbers_resumes_mid_epoch_to_the_uninterrupted_weights(
    tiny_shards, tmp_path, one_thread, settings
):
    # 15 batches an epoch, so step 8 is mid-epoch: the resumed run starts a loader iterator there that
    # the unbroken run did not, and its Gumbel samples or dropout masks must still be the same.
    params = tiny_params(**RANDOM_TRAINING, val_every=4, **settings)
    reference, _ = _trained_state(params, tiny_shards, tmp_path / "unbroken")
    (tmp_path / "killed").mkdir()
    shutil.copy(tmp_path / "unbroken" / "step-00000008.pt", tmp_path / "killed")
    resumed, start = _trained_state(params, tiny_shards, tmp_path / "killed")
    assert start == 8
    assert reference.keys() == resumed.keys()
    for name, value in reference.items():
        assert torch.equal(resumed[name], value), name


def test_how_often_a_run_validates_does_not_change_its_weights(tiny_shards, tmp_path, one_thread):
    # val_every is left out of the run's fingerprint, so a run may resume under another value; building
    # the EMA evaluation copy used to draw from the generator that dropout then drew from.
    states = [
        _trained_state(
            tiny_params(**RANDOM_TRAINING, dropout=0.1, ema_decay=0.9, val_every=val_every, val_batches=1),
            tiny_shards,
            tmp_path / str(val_every),
        )[0]
        for val_every in (4, 12)
    ]
    for name, value in states[0].items():
        assert torch.equal(states[1][name], value), name


@pytest.mark.parametrize("quantizer", ["vq", "fsq", "regvq", "lfq", "simvq"])
def test_two_gloo_processes_train_and_hold_identical_weights(tiny_shards, tmp_path, quantizer):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = torchrun_command(
        str(REPO / "tests" / "ddp_tokenizer_worker.py"),
        str(tiny_shards),
        str(tmp_path),
        quantizer,
        log_dir=tmp_path / "torchrun",
    )
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert rank0["world_size"] == rank1["world_size"] == 2 and rank0["step"] == 3
    for name, value in rank0["state"].items():
        assert torch.equal(value, rank1["state"][name]), name
    torch.manual_seed(0)
    initial = Params.from_dict(
        {
            "prepare": {"image_size": 16},
            "tokenizer": {
                "base_channels": 8,
                "quantizer": quantizer,
                "codebook_size": 256 if quantizer == "fsq" else 64,
            },
        }
    )
    from imtok.models.autoencoder import Tokenizer

    fresh = Tokenizer(initial.tokenizer_config(1, 16)).state_dict()
    assert not torch.equal(fresh["encoder.blocks.0.weight"], rank0["state"]["encoder.blocks.0.weight"])


def test_a_checkpoint_of_another_architecture_is_refused_naming_the_key_and_both_values(
    tiny_shards, mlflow_store, tmp_path, one_thread
):
    params = tiny_params(total_steps=8, val_batches=0)
    train(
        params,
        shards_dir=tiny_shards,
        out_dir=tmp_path / "a",
        checkpoint_root=tmp_path / "ck",
        register=False,
        runtime=CPU,
    )
    (run_dir,) = (tmp_path / "ck").iterdir()
    other = tiny_params(total_steps=8, val_batches=0, base_channels=16)
    train(
        other,
        shards_dir=tiny_shards,
        out_dir=tmp_path / "b",
        checkpoint_root=tmp_path / "ck",
        register=False,
        runtime=CPU,
    )
    other_dir = next(path for path in (tmp_path / "ck").iterdir() if path != run_dir)
    # the same params resume; a checkpoint dropped in from other params must not be taken silently
    shutil.rmtree(run_dir)
    shutil.copytree(other_dir, run_dir)
    with pytest.raises(ValueError, match=r"tokenizer\.base_channels.*16.*8|tokenizer\.base_channels.*8.*16"):
        train(
            params,
            shards_dir=tiny_shards,
            out_dir=tmp_path / "c",
            checkpoint_root=tmp_path / "ck",
            register=False,
            runtime=CPU,
        )


def test_shards_whose_size_is_not_divisible_by_f_name_the_split_and_the_key(tiny_shards, tmp_path):
    from imtok.trainers.tokenizer import data_shape

    with pytest.raises(
        ValueError, match=r"tokenizer\.downsample: .*16x16 images, not divisible by tokenizer\.downsample=32"
    ):
        data_shape(tiny_shards, 32)
    with pytest.raises(FileNotFoundError):
        data_shape(tmp_path / "nowhere", 4)


@needs_compiler
def test_a_compiled_run_trains_like_the_eager_one(tiny_shards, mlflow_store, tmp_path, one_thread):
    # run.tokenizer.compile wraps the training forward (generator and quantizer; the discriminator and
    # the losses stay eager) in torch.compile: the same steps must give the same weights, to float
    # rounding. (That the forward is one graph is tests/test_code_counts.py's concern.)
    from torch._dynamo.utils import counters

    reports = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        params = tiny_params(total_steps=6, val_batches=0, log_every=2, checkpoint_every=6, compile=compiled)
        reports[compiled] = train(
            params,
            shards_dir=tiny_shards,
            out_dir=tmp_path / f"out-{compiled}",
            checkpoint_root=tmp_path / f"ck-{compiled}",
            register=False,
            runtime=CPU,
        )
    assert counters["stats"]["unique_graphs"] > 0  # the compiled run did trace the model
    eager, compiled = (read_model_file(tmp_path / f"out-{c}" / MODEL_FILE, "tokenizer") for c in reports)
    assert reports[True]["step"] == reports[False]["step"] == 6
    for name, value in eager["state_dict"].items():
        if value.is_floating_point():
            torch.testing.assert_close(compiled["state_dict"][name], value, rtol=1e-3, atol=1e-4, msg=name)


def test_a_discriminator_too_deep_for_the_shards_images_is_refused_before_training(
    tiny_shards, tmp_path, mlflow_store
):
    # prepare.image_size says 32 (deep enough), but the shards hold the 16x16 images that train.
    params = Params.from_dict(
        with_run_settings(
            {
                "prepare": {**TINY["prepare"], "image_size": 32},
                "tokenizer": {**TINY["tokenizer"], "gan_weight": 0.1},
            }
        )
    )
    expected = r"^tokenizer\.disc_layers: 3 .*/train: image_size=16 .* use tokenizer\.disc_layers <= 2$"
    with pytest.raises(ValueError, match=expected):
        train(
            params,
            shards_dir=tiny_shards,
            out_dir=tmp_path / "out",
            checkpoint_root=tmp_path / "checkpoints",
            register=False,
            runtime=CPU,
        )
    assert not (tmp_path / "checkpoints").exists()
