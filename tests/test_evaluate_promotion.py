"""evaluate's champions: each metric's direction, and sample metrics on the prior that made the samples.

Against a real sqlite MLflow store (the ``mlflow_store`` fixture); registry versions are made directly.
"""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from imtok.data.shards import META_NAME, write_json_atomic
from imtok.evaluation import record_prior, record_tokenizer, tokenizer_metrics
from imtok.metrics.codebook import CodeCounter
from imtok.metrics.features import STANDARD_NAME, ExtractedFeatures, metric_name
from imtok.metrics.fid import fid_from_features, sample_metrics
from imtok.metrics.recon import ReconstructionTotals
from imtok.params import Params, higher_is_better

BOOKKEEPING = {"codebook_size", "samples", "conditional"}  # computed, but no measure of quality


def model_metrics(quality: str) -> tuple[dict[str, float], dict[str, float]]:
    """Tokenizer and sample metrics, computed by evaluate's own functions, of a good or a bad model."""
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(16, 1, 16, 16, generator=generator) * 2 - 1
    noise = 0.05 if quality == "good" else 0.8
    reconstructions = (images + noise * torch.randn(images.shape, generator=generator)).clamp(-1, 1)
    counter = CodeCounter(16)
    counter.update(torch.arange(16).repeat(8) if quality == "good" else torch.zeros(128, dtype=torch.long))
    totals = ReconstructionTotals()
    for chunk, reconstructed in zip(images.split(8), reconstructions.split(8), strict=True):
        totals.add(chunk, reconstructed)
    tokenizer = tokenizer_metrics(totals, counter, {}, {})
    real = torch.randn(300, 8, generator=generator)
    fake = torch.randn(300, 8, generator=generator) + (0.0 if quality == "good" else 3.0)
    generation: dict[str, float] = {}
    for extractor in (STANDARD_NAME, "fmnist"):
        tokenizer[metric_name("rfid", extractor)] = fid_from_features(real, fake)
        generation |= sample_metrics(
            ExtractedFeatures(real, extractor, (1, 16, 16)), ExtractedFeatures(fake, extractor, (1, 16, 16))
        )
    return tokenizer, generation


def test_every_quality_metric_evaluate_computes_has_the_direction_its_values_show():
    good_tokenizer, good_generation = model_metrics("good")
    bad_tokenizer, bad_generation = model_metrics("bad")
    for good, bad in ((good_tokenizer, bad_tokenizer), (good_generation, bad_generation)):
        for name in sorted(set(good) - BOOKKEEPING):
            assert good[name] != bad[name], name
            assert higher_is_better(name) == (good[name] > bad[name]), name
    assert {"psnr", "ssim", "rfid", "rfid_fmnist", "fid_fmnist", "precision", "recall_fmnist"} <= set(
        good_tokenizer
    ) | set(good_generation)
    assert higher_is_better("class_accuracy")
    for name in [*BOOKKEEPING, "accuracy", "FID", "fid_", "lpips"]:
        with pytest.raises(
            ValueError, match=rf"evaluate\.prior_metric: unknown metric '{name}'.*class_accuracy"
        ):
            higher_is_better(name, key="evaluate.prior_metric")


def test_every_computed_metric_is_a_valid_setting_and_bad_names_fail_at_the_params_boundary():
    tokenizer, generation = model_metrics("good")
    for name in sorted(set(tokenizer) - BOOKKEEPING):
        assert Params.from_dict({"evaluate": {"tokenizer_metric": name}}).evaluate.tokenizer_metric == name
    for name in sorted(set(generation) - BOOKKEEPING | {"class_accuracy"}):
        assert Params.from_dict({"evaluate": {"prior_metric": name}}).evaluate.prior_metric == name
    refused = [
        ("prior_metric", "accuracy"),
        ("prior_metric", "psnr"),  # a tokenizer metric: the prior's samples have none
        ("prior_metric", "samples"),
        ("tokenizer_metric", "fid"),  # a sample metric
        ("tokenizer_metric", "rFID"),
        ("tokenizer_metric", "codebook_size"),
    ]
    for key, name in refused:
        with pytest.raises(
            ValueError, match=rf"^evaluate\.{key}: '{name}' .*use one of .*_<classifier\.name>"
        ):
            Params.from_dict({"evaluate": {key: name}})


def new_version(client, name: str, tmp_path) -> tuple[str, str]:
    """A registry version of ``name`` made in its own run: (version, run id)."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name)
    experiment = client.get_experiment_by_name(os.environ["MLFLOW_EXPERIMENT_NAME"])
    if experiment is None:
        experiment_id = client.create_experiment(os.environ["MLFLOW_EXPERIMENT_NAME"])
    else:
        experiment_id = experiment.experiment_id
    run_id = client.create_run(experiment_id).info.run_id
    source = tmp_path / "sources" / name / run_id
    source.mkdir(parents=True)
    return str(client.create_model_version(name, source=str(source), run_id=run_id).version), run_id


def write_samples(samples_dir, prior: str | None) -> None:
    meta = {"count": 4, "image_size": 16, "channels": 1, "shards": []}
    write_json_atomic(samples_dir / META_NAME, meta if prior is None else meta | {"prior": prior})


def write_prior_summary(directory, version: str, run_id: str) -> None:
    """A prior.json like train_prior's: the pipeline's prior is ``version``."""
    directory.mkdir(parents=True, exist_ok=True)
    registered = {"name": "imtok-prior", "version": version, "uri": f"models:/imtok-prior/{version}"}
    summary = {"mlflow_run_id": run_id, "registered_model": registered}
    (directory / "prior.json").write_text(json.dumps(summary))


def generation(**metrics: float) -> dict[str, float]:
    return {"samples": 4.0, "conditional": 1.0, **metrics}


def champion(client, name: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, "champion").version)
    except MlflowException:
        return None


def test_higher_is_better_prior_metrics_and_lower_is_better_tokenizer_metrics_pick_the_best(
    mlflow_store, tmp_path
):
    import mlflow

    client = mlflow.MlflowClient()
    params = Params.from_dict(
        {"evaluate": {"tokenizer_metric": "rfid_fmnist", "prior_metric": "precision_fmnist"}}
    )
    samples = tmp_path / "samples"
    samples.mkdir()
    for precision, rfid, promoted in ((0.5, 30.0, True), (0.8, 20.0, True), (0.3, 25.0, False)):
        prior, prior_run = new_version(client, "imtok-prior", tmp_path)
        tokenizer, run = new_version(client, "imtok-tokenizer", tmp_path)
        write_prior_summary(tmp_path / "models" / "prior", prior, prior_run)
        write_samples(samples, f"models:/imtok-prior/{prior}")
        summary = {
            "mlflow_run_id": run,
            "registered_model": {"name": "imtok-tokenizer", "version": tokenizer},
        }
        decisions = {
            "tokenizer": record_tokenizer(params, summary, {"psnr": 20.0, "rfid_fmnist": rfid}),
            "prior": record_prior(params, generation(fid_fmnist=10.0, precision_fmnist=precision), samples),
        }
        assert decisions["prior"]["promoted"] is promoted and decisions["tokenizer"]["promoted"] is promoted
    assert champion(client, "imtok-prior") == "2" and champion(client, "imtok-tokenizer") == "2"
    assert decisions["prior"]["higher_is_better"] and not decisions["tokenizer"]["higher_is_better"]
    assert "(higher is better)" in client.get_model_version("imtok-prior", "3").tags["imtok.promotion"]


@pytest.mark.parametrize("made_by", ["models:/imtok-prior@champion", "models:/imtok-prior/1", "other/prior"])
def test_sample_metrics_land_on_the_prior_version_that_made_the_samples(made_by, mlflow_store, tmp_path):
    import mlflow

    client = mlflow.MlflowClient()
    (first, first_run), (second, second_run) = (
        new_version(client, "imtok-prior", tmp_path) for _ in range(2)
    )
    client.set_registered_model_alias("imtok-prior", "champion", first)
    write_prior_summary(tmp_path / "models" / "prior", second, second_run)  # what train_prior made last
    write_prior_summary(tmp_path / "other" / "prior", first, first_run)
    samples = tmp_path / "samples"
    samples.mkdir()
    write_samples(samples, made_by)
    decision = record_prior(Params(), generation(fid_fmnist=12.0), samples)
    assert not any(tag.startswith("eval.") for tag in client.get_model_version("imtok-prior", second).tags)
    assert client.get_run(second_run).data.metrics == {}
    assert client.get_model_version("imtok-prior", first).tags["eval.fid_fmnist"] == "12.0"
    assert client.get_run(first_run).data.metrics["eval/fid_fmnist"] == 12.0
    assert champion(client, "imtok-prior") == first
    assert (
        decision["version"] == f"imtok-prior/{first}" and f"imtok-prior version {first}" in decision["reason"]
    )


@pytest.mark.parametrize(
    ("made_by", "why"),
    [
        ("runs:/{run}/model", "is a run's model"),
        ("models:/imtok-prior/latest", "names no registry version"),
        ("models:/imtok-prior@no-such-alias", "does not resolve"),
        ("models:/imtok-prior/7", "does not resolve"),
        ("unregistered/prior", "records no registered version"),
        (None, "records no prior"),
        ("models:/imtok-prior@candidate", "registered after the samples were written"),
        ("models/prior", "registered after the samples were written"),  # retrained, samples not remade
    ],
)
def test_samples_that_match_no_version_leave_every_version_untagged_and_promote_nothing(
    made_by, why, mlflow_store, tmp_path
):
    import mlflow

    client = mlflow.MlflowClient()
    samples = tmp_path / "samples"
    samples.mkdir()
    write_samples(samples, made_by)
    hour_ago = time.time() - 3600
    os.utime(samples / META_NAME, (hour_ago, hour_ago))
    version, run = new_version(client, "imtok-prior", tmp_path)
    client.set_registered_model_alias("imtok-prior", "candidate", version)
    write_prior_summary(tmp_path / "models" / "prior", version, run)
    if made_by and "{run}" in made_by:
        write_samples(samples, made_by.format(run=run))
    (tmp_path / "unregistered" / "prior").mkdir(parents=True)
    (tmp_path / "unregistered" / "prior" / "prior.json").write_text(json.dumps({"mlflow_run_id": run}))
    decision = record_prior(Params(), generation(fid_fmnist=12.0), samples)
    assert not decision["promoted"] and why in decision["reason"], decision
    assert not any(tag.startswith("eval.") for tag in client.get_model_version("imtok-prior", version).tags)
    assert client.get_run(run).data.metrics == {}
    assert champion(client, "imtok-prior") is None
