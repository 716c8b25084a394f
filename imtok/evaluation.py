"""Evaluation of tokenizers and priors: the passes, the metrics, the plots' files and the champions.

The two evaluation stages are thin over this module: ``stages.evaluate_tokenizer`` (reconstruction
metrics, reference rows, the tokenizer's champion) and ``stages.evaluate`` (sample metrics, the prior's
champion). Features: the standard FID InceptionV3 when its weights are on this machine (metrics
``fid``, ``rfid``, ...), and the domain classifier of ``train_classifier`` (``fid_<name>``, ...).
Images are read batch by batch and never held whole: memory holds a batch and the (N, D) features.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

from imtok.data.shards import META_NAME, Batch, iter_batches, read_meta
from imtok.metrics.codebook import CodeCounter
from imtok.metrics.features import ExtractedFeatures, FeatureCollector, metric_name
from imtok.metrics.fid import class_matches, fid_from_features, sample_metrics
from imtok.metrics.recon import ReconstructionTotals
from imtok.params import Params, higher_is_better
from imtok.quantizers.residual_fsq import split_stages

log = logging.getLogger("imtok.evaluation")

CLOCK_SLACK_S = 60.0  # file times and registry times come from different clocks (a remote server)


class Extractors(NamedTuple):
    """The feature extractors an evaluation uses, where they run, and what the report says of them."""

    device: torch.device
    extractors: list[Any]
    features: dict[str, Any]  # {"used": [names], "skipped": {name: why}}


def evaluation_extractors(params: Params, classifier_path: Path) -> Extractors:
    """``run.evaluate.device`` resolved, and the extractors found: InceptionV3 where its weights are on
    this machine, the domain classifier where ``classifier_path`` exists."""
    from imtok.metrics.features import feature_extractors
    from imtok.runtime import resolve_device

    settings = params.evaluate
    device = resolve_device(params.run.evaluate.device, key="run.evaluate.device")
    available = feature_extractors(
        settings.inception_weights, classifier_path if classifier_path.is_file() else None, device
    )
    used = [extractor.name for extractor in available.extractors]
    return Extractors(device, available.extractors, {"used": used, "skipped": available.skipped})


def split_batches(location: Path, batch_size: int, limit: int | None = None) -> Iterator[Batch]:
    """The split's images (float in [-1, 1]) and labels batch by batch in stored order, the first
    ``limit`` only when given; a ValueError naming the split when it holds none."""
    count = 0
    for batch in iter_batches(location, batch_size):
        if limit is not None and count + len(batch.keys) > limit:
            keep = limit - count
            batch = Batch(batch.images[:keep], batch.labels[:keep], batch.keys[:keep])
        if len(batch.keys):
            count += len(batch.keys)
            yield batch
        if limit is not None and count >= limit:
            break
    if count == 0:
        raise ValueError(f"{location}: the split holds no images")


class TokenizerPass(NamedTuple):
    """What one pass of the tokenizer over the val split measured; no images are kept."""

    totals: ReconstructionTotals
    counter: CodeCounter
    real: dict[str, ExtractedFeatures]  # the val images' features, per extractor name
    reconstructed: dict[str, ExtractedFeatures]  # their reconstructions' features
    stage_counters: tuple[CodeCounter, ...] = ()  # residual stages' own histograms (rfsq); else none


@torch.no_grad()
def tokenizer_pass(
    tokenizer: Any, batches: Iterable[Batch], extractors: list[Any], device: torch.device
) -> TokenizerPass:
    """``decode(encode(images))`` batch by batch: PSNR and SSIM, the histogram of the codes, and every
    extractor's features of the images and of their reconstructions.

    Memory holds a batch of images and the (N, D) features, whatever the split's size: 50,000 val
    images at 256x256 RGB would be 39 GB as one float tensor, and as much again reconstructed.
    """
    totals = ReconstructionTotals()
    counter = CodeCounter(tokenizer.codebook_size)
    stages = tokenizer.config.stages
    stage_counters = tuple(CodeCounter(tokenizer.codebook_size) for _ in range(stages)) if stages > 1 else ()
    real = {extractor.name: FeatureCollector(extractor) for extractor in extractors}
    reconstructed = {extractor.name: FeatureCollector(extractor) for extractor in extractors}
    for batch in batches:
        images = batch.images.to(device)
        indices = tokenizer.encode(images)
        counter.update(indices)
        if stage_counters:
            per_stage = split_stages(indices, stages)  # (B, S, h, w)
            for stage, stage_counter in enumerate(stage_counters):
                stage_counter.update(per_stage[:, stage])
        reconstructions = tokenizer.decode(indices)
        # PSNR and SSIM on the CPU: the same numbers on any device (no TF32 convolutions in SSIM)
        totals.add(batch.images, reconstructions.cpu())
        for name in real:
            real[name].add(images)
            reconstructed[name].add(reconstructions)
    return TokenizerPass(
        totals,
        counter,
        {name: collector.result() for name, collector in real.items()},
        {name: collector.result() for name, collector in reconstructed.items()},
        stage_counters,
    )


def tokenizer_metrics(
    totals: ReconstructionTotals,
    counter: CodeCounter,
    real: dict[str, ExtractedFeatures],
    reconstructed: dict[str, ExtractedFeatures],
    stage_counters: Sequence[CodeCounter] = (),
) -> dict[str, float]:
    """PSNR, SSIM, usage and perplexity of the reconstructions, and rFID per extractor between the
    images' features (shared with the generation metrics) and the reconstructions'.

    ``codebook_usage_pct`` and ``perplexity`` count every token; a residual tokenizer's stages share
    one vocabulary, so their union can use every code while stage 0 (the coarse one) uses few: with
    ``stage_counters`` each stage's usage and perplexity are added as ``..._stage<s>``.
    """
    metrics = totals.metrics()
    metrics["codebook_usage_pct"] = 100.0 * counter.usage()
    metrics["perplexity"] = counter.perplexity()
    for stage, stage_counter in enumerate(stage_counters):
        metrics[f"codebook_usage_pct_stage{stage}"] = 100.0 * stage_counter.usage()
        metrics[f"perplexity_stage{stage}"] = stage_counter.perplexity()
    metrics["codes_used"] = float((counter.counts > 0).sum())
    metrics["codebook_size"] = float(counter.codebook_size)
    for name, features in reconstructed.items():
        metrics[metric_name("rfid", name)] = fid_from_features(real[name].features, features.features)
    return metrics


def collect_features(extractors: list[Any], batches: Iterable[Batch]) -> dict[str, ExtractedFeatures]:
    """Every extractor's features of an image set, in one pass over its batches."""
    collectors = {extractor.name: FeatureCollector(extractor) for extractor in extractors}
    for batch in batches:
        for collector in collectors.values():
            collector.add(batch.images)
    return {name: collector.result() for name, collector in collectors.items()}


def generation_metrics(
    real: dict[str, ExtractedFeatures],
    batches: Iterable[Batch],
    extractors: list[Any],
    classifier: Any,
) -> dict[str, float]:
    """Sample metrics per extractor against ``real`` and, when every sample asked for a class, the
    domain classifier's accuracy on it; the samples are read batch by batch, never held."""
    seen = {"count": 0, "matches": 0, "labelled": True}

    def classified(batches: Iterable[Batch]) -> Iterator[Batch]:
        for batch in batches:
            seen["count"] += len(batch.keys)
            seen["labelled"] = seen["labelled"] and bool((batch.labels >= 0).all())
            if classifier is not None and seen["labelled"]:
                seen["matches"] += class_matches(classifier, batch.images, batch.labels)
            yield batch

    fake = collect_features(extractors, classified(batches))
    metrics: dict[str, float] = {"samples": float(seen["count"])}
    for name, features in fake.items():
        metrics.update(sample_metrics(real[name], features))
    if classifier is not None and seen["labelled"] and seen["count"]:
        metrics["class_accuracy"] = seen["matches"] / seen["count"]
    return metrics


def reference_rows(
    real: dict[str, ExtractedFeatures], train: dict[str, ExtractedFeatures]
) -> dict[str, dict[str, float]]:
    """The same sample metrics between two val halves, and between val and as many train images."""
    rows: dict[str, dict[str, float]] = {"val_half_vs_half": {}, "val_vs_train": {}}
    for name, features in real.items():
        half = len(features.features) // 2
        first = ExtractedFeatures(features.features[:half], features.extractor, features.image_shape)
        second = ExtractedFeatures(
            features.features[half : 2 * half], features.extractor, features.image_shape
        )
        rows["val_half_vs_half"].update(sample_metrics(first, second))
        rows["val_vs_train"].update(sample_metrics(features, train[name]))
    return rows


def write_usage_plot(counter: CodeCounter, path: Path) -> None:
    """Codes sorted by frequency: rank, code id, count, share (a long flat tail is a healthy codebook)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    counts = counter.counts
    order = torch.argsort(counts, descending=True, stable=True)
    total = max(int(counts.sum()), 1)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["rank", "code", "count", "share"])
        for rank, code in enumerate(order.tolist()):
            writer.writerow([rank, code, int(counts[code]), f"{int(counts[code]) / total:.6g}"])


def write_curves(run_id: str | None, names: list[str], path: Path) -> None:
    """Metric histories of an MLflow run as one CSV (step plus one column per metric)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table: dict[int, dict[str, float]] = {}
    if run_id:
        from imtok import tracking

        client = tracking.configure().MlflowClient()
        for name in names:
            try:
                history = client.get_metric_history(run_id, name)
            except Exception as error:  # a run from another store: the plot stays empty, said in the log
                log.warning("no history of %s in run %s: %s", name, run_id, error)
                continue
            for point in history:
                table.setdefault(point.step, {})[name] = point.value
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", *[name.replace("/", "_") for name in names]])
        for step in sorted(table):
            writer.writerow([step, *[table[step].get(name, "") for name in names]])


def summary_of(directory: Path, name: str) -> dict[str, Any]:
    path = directory / name
    return json.loads(path.read_text()) if path.is_file() else {}


def check_same_shape(
    samples_dir: Path, samples_meta: dict[str, Any], val_dir: Path, val_meta: dict[str, Any]
) -> None:
    """Samples must have the val images' (C, H, W), as their meta.json files say; else a ValueError
    naming the directory (checked before any sample is read)."""

    def shape(meta: dict[str, Any], location: Path) -> tuple[int, int, int]:
        try:
            size = int(meta["image_size"])
            return int(meta["channels"]), size, size
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(
                f"{location / META_NAME}: no valid image_size and channels ({error!r}); write the split "
                "again with the stage that makes it (prepare or sample)"
            ) from None

    samples_shape, val_shape = shape(samples_meta, samples_dir), shape(val_meta, val_dir)
    if samples_shape != val_shape:
        raise ValueError(
            f"{samples_dir}: samples are {samples_shape} (C, H, W) but val images are "
            f"{val_shape}; sample with a tokenizer trained on these shards"
        )


def chosen_prior_metric(params: Params, generation: dict[str, float]) -> str | None:
    """The metric that decides the prior's champion; ValueError when the configured one is missing."""
    wanted = params.evaluate.prior_metric
    if wanted is None:
        for candidate in ("fid", f"fid_{params.classifier.name}"):
            if candidate in generation:
                return candidate
        return None
    if wanted not in generation:
        raise ValueError(
            f"evaluate.prior_metric: {wanted!r} was not computed; available: {', '.join(sorted(generation))}"
        )
    return wanted


def sampled_prior_version(
    client: Any, location: str | None, samples_written: float | None
) -> tuple[Any, str]:
    """The registry version (an MLflow ``ModelVersion``) of the prior that made the samples, or None, and
    a sentence saying which version that is or why none can be named.

    ``location`` is ``sample.prior`` as the samples' meta.json records it: ``models:/<name>/<version>``,
    ``models:/<name>@<alias>``, or a local directory (or its prior.pt) whose prior.json names the
    version it registered. An alias and a directory are resolved now, so a version registered after
    the samples were written (``samples_written``, seconds since the epoch) is refused: the alias has
    moved, or the prior was retrained, since. Other URIs (``runs:/``, ``models:/<name>/latest``, a
    logged model's ``models:/m-...``) do not name one registry version.
    """
    from mlflow.exceptions import MlflowException

    if not location:
        return None, "the samples' meta.json records no prior (sample.prior); run the sample stage again"
    text = str(location)
    try:
        if text.startswith("models:/"):
            reference = text.removeprefix("models:/").rstrip("/")
            name, at, alias = reference.partition("@")
            if at and alias and "/" not in name:
                version = client.get_model_version_by_alias(name, alias)
            else:
                name, _, number = reference.partition("/")
                if not number.isdigit():
                    return None, (
                        f"sample.prior {text} names no registry version; sample from "
                        "models:/<name>/<version>, models:/<name>@<alias> or a local directory"
                    )
                version = client.get_model_version(name, number)
        elif text.startswith("runs:/"):
            return None, (
                f"sample.prior {text} is a run's model, not a registry version; sample from "
                "models:/<name>/<version>, models:/<name>@<alias> or a local directory"
            )
        else:
            path = Path(text)
            directory = path if path.is_dir() else path.parent
            registered = summary_of(directory, "prior.json").get("registered_model")
            if not registered:
                return None, f"sample.prior {text}: {directory / 'prior.json'} records no registered version"
            version = client.get_model_version(registered["name"], str(registered["version"]))
    except MlflowException as error:
        return None, f"sample.prior {text} does not resolve to a registry version: {error}"
    label = f"{version.name} version {version.version}"
    created = version.creation_timestamp / 1000
    if samples_written is not None and created > samples_written + CLOCK_SLACK_S:
        return None, (
            f"sample.prior {text} is now {label}, registered after the samples were written, so they "
            "come from an earlier prior; run the sample stage again"
        )
    return version, f"sample.prior {text} is {label}"


def log_eval_artifacts(run_id: str | None, paths: Iterable[Path]) -> None:
    """Attach files (the evaluation's PNG plots) to a model's MLflow run under ``evaluation/``."""
    if run_id:
        from imtok import tracking

        client = tracking.configure().MlflowClient()
        for path in paths:
            client.log_artifact(run_id, str(path), "evaluation")


def log_eval_metrics(client: Any, run_id: str | None, metrics: dict[str, float]) -> None:
    if run_id:
        for name, value in metrics.items():
            if math.isfinite(value):
                client.log_metric(run_id, f"eval/{name}", value)


def tag_and_promote(
    client: Any, name: str, version: str, metric: str, metrics: dict[str, float], key: str
) -> dict[str, Any]:
    """Tag ``eval.<metric>`` on the version for every metric, then move the champion alias if it wins."""
    from imtok import registry

    higher = higher_is_better(metric, key=key)
    for each, value in metrics.items():
        # full precision: a later evaluation on another metric compares against these tags
        client.set_model_version_tag(name, version, f"eval.{each}", repr(float(value)))
    decision = registry.promote_if_better(name, version, metric, metrics[metric], higher_is_better=higher)
    return {
        "metric": metric,
        "higher_is_better": higher,
        "version": f"{name}/{version}",
        "promoted": decision.promoted,
        "reason": decision.reason,
    }


def record_tokenizer(
    params: Params, tokenizer_summary: dict[str, Any], metrics: dict[str, float]
) -> dict[str, Any]:
    """Log the tokenizer metrics into its training run, tag its registry version (the one in
    ``tokenizer_summary``, which was reconstructed with) and move the champion alias if it wins;
    returns the decision (empty when the tokenizer was not registered or promotion is off)."""
    from imtok import tracking

    client = tracking.configure().MlflowClient()
    log_eval_metrics(client, tokenizer_summary.get("mlflow_run_id"), metrics)
    registered = tokenizer_summary.get("registered_model")
    if not (registered and params.evaluate.promote):
        return {}
    metric = params.evaluate.tokenizer_metric
    if metric not in metrics:
        raise ValueError(
            f"evaluate.tokenizer_metric: {metric!r} was not computed; available: {', '.join(sorted(metrics))}"
        )
    return tag_and_promote(
        client, registered["name"], str(registered["version"]), metric, metrics, "evaluate.tokenizer_metric"
    )


def record_prior(params: Params, generation: dict[str, float], samples_dir: Path) -> dict[str, Any]:
    """Log the sample metrics into the run of the prior version that made the samples in
    ``samples_dir`` (see ``sampled_prior_version``), tag it and move the champion alias if it wins;
    none is touched when that version cannot be named. Returns the decision (empty when promotion is
    off)."""
    from imtok import tracking

    client = tracking.configure().MlflowClient()
    promote = params.evaluate.promote
    if not generation:
        return {"promoted": False, "reason": f"not promoted: no samples in {samples_dir}"} if promote else {}
    meta_path = samples_dir / META_NAME
    version, which = sampled_prior_version(
        client, read_meta(samples_dir).get("prior"), meta_path.stat().st_mtime
    )
    if version is None:
        log.warning("sample metrics recorded on no prior version: %s", which)
        return {"promoted": False, "reason": f"not promoted: {which}"} if promote else {}
    log_eval_metrics(client, version.run_id, generation)
    if not promote:
        return {}
    metric = chosen_prior_metric(params, generation)
    if metric is None:
        return {"promoted": False, "reason": f"not promoted: {which}, and no sample metric to compare on"}
    decision = tag_and_promote(
        client, version.name, str(version.version), metric, generation, "evaluate.prior_metric"
    )
    return decision | {"reason": f"{which}: {decision['reason']}"}
