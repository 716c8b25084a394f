"""evaluate reads its splits batch by batch: the metrics equal those of the whole split in memory,
and no more than a batch of images is alive at a time, whatever the split's size."""

from __future__ import annotations

import dataclasses
import gc
import weakref
from collections.abc import Iterator

import pytest
import torch

from imtok.data.shards import Batch, iter_batches
from imtok.evaluation import (
    collect_features,
    generation_metrics,
    split_batches,
    tokenizer_metrics,
    tokenizer_pass,
)
from imtok.metrics.codebook import CodeCounter
from imtok.metrics.features import ClassifierFeatures, extract_features
from imtok.metrics.fid import class_accuracy, fid_from_features, sample_metrics
from imtok.metrics.recon import psnr, ssim
from imtok.models.autoencoder import Tokenizer, TokenizerConfig
from imtok.models.classifier import Classifier, ClassifierConfig

BATCH = 16  # the tiny val split holds 30 images: a full batch and a short one


def tiny_tokenizer(**changes) -> Tokenizer:
    torch.manual_seed(0)
    config = TokenizerConfig(
        in_channels=1,
        image_size=16,
        base_channels=8,
        channel_multipliers=(1, 1, 2),
        num_res_blocks=1,
        mid_attention=False,
        quantizer="fsq",
        levels=(8, 5, 5, 5),
        codebook_size=None,
    )
    return Tokenizer(dataclasses.replace(config, **changes)).eval()


def tiny_classifier() -> ClassifierFeatures:
    torch.manual_seed(1)
    config = ClassifierConfig(image_size=16, widths=(4, 8), pooled_size=2, embed_dim=8, num_classes=3)
    return ClassifierFeatures(Classifier(config))


def whole_split(location) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(iter_batches(location, 1000))
    return torch.cat([b.images for b in batches]), torch.cat([b.labels for b in batches])


def test_split_batches_stops_at_the_limit_inside_a_batch(tiny_shards):
    images, labels = whole_split(tiny_shards / "train")
    batches = list(split_batches(tiny_shards / "train", BATCH, limit=37))
    assert [len(b.keys) for b in batches] == [16, 16, 5]
    assert torch.equal(torch.cat([b.images for b in batches]), images[:37])
    assert torch.equal(torch.cat([b.labels for b in batches]), labels[:37])
    assert sum(len(b.keys) for b in split_batches(tiny_shards / "train", BATCH, limit=500)) == len(images)


def test_the_tokenizer_pass_equals_the_metrics_of_the_whole_split_in_memory(tiny_shards):
    tokenizer, extractor = tiny_tokenizer(), tiny_classifier()
    streamed = tokenizer_pass(tokenizer, split_batches(tiny_shards / "val", BATCH), [extractor], "cpu")

    images, _ = whole_split(tiny_shards / "val")
    with torch.no_grad():
        indices = tokenizer.encode(images)
        reconstructions = tokenizer.decode(indices)
    counter = CodeCounter(tokenizer.codebook_size)
    counter.update(indices)
    metrics = streamed.totals.metrics()
    assert streamed.totals.count == len(images) == 30
    assert metrics["psnr"] == pytest.approx(float(psnr(images, reconstructions).mean()), rel=1e-6)
    assert metrics["ssim"] == pytest.approx(float(ssim(images, reconstructions).mean()), rel=1e-5)
    assert torch.equal(streamed.counter.counts, counter.counts)
    real = extract_features(extractor, images, BATCH).features
    fake = extract_features(extractor, reconstructions, BATCH).features
    assert torch.allclose(streamed.real[extractor.name].features, real, atol=1e-5)
    assert torch.allclose(streamed.reconstructed[extractor.name].features, fake, atol=1e-5)
    assert fid_from_features(streamed.real[extractor.name].features, fake) == pytest.approx(
        fid_from_features(real, fake), rel=1e-4, abs=1e-6
    )


def test_generation_metrics_stream_the_samples_and_match_the_whole_set(tiny_shards):
    extractor = tiny_classifier()
    real = collect_features([extractor], split_batches(tiny_shards / "val", BATCH))
    samples, labels = whole_split(tiny_shards / "train")
    labels = labels % 3  # class ids the 3-class classifier knows
    batches = [
        Batch(s, lab, [str(i)] * len(s))
        for i, (s, lab) in enumerate(zip(samples.split(BATCH), labels.split(BATCH), strict=True))
    ]

    metrics = generation_metrics(real, iter(batches), [extractor], extractor.classifier)
    expected = sample_metrics(real[extractor.name], extract_features(extractor, samples, BATCH))
    assert metrics["samples"] == len(samples)
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, rel=1e-4, abs=1e-6)
    assert metrics["class_accuracy"] == pytest.approx(class_accuracy(extractor.classifier, samples, labels))

    unconditional = [Batch(b.images, torch.full_like(b.labels, -1), b.keys) for b in batches]
    assert "class_accuracy" not in generation_metrics(
        real, iter(unconditional), [extractor], extractor.classifier
    )


def tracked(batches: Iterator[Batch], alive: list[weakref.ref], peak: list[int]) -> Iterator[Batch]:
    """The batches, noting before each one how many earlier batches' images are still referenced."""
    for batch in batches:
        gc.collect()
        peak[0] = max(peak[0], sum(ref() is not None for ref in alive))
        alive.append(weakref.ref(batch.images))
        yield batch


def test_a_residual_tokenizer_reports_each_stages_usage_beside_the_union(tiny_shards):
    tokenizer = tiny_tokenizer(quantizer="rfsq", levels=(5, 3), quantizer_options={"stages": 2})
    streamed = tokenizer_pass(tokenizer, split_batches(tiny_shards / "val", BATCH), [], "cpu")
    images, _ = whole_split(tiny_shards / "val")
    with torch.no_grad():
        tokens = tokenizer.encode(images)  # (B, 2 * h, w): stage 0's rows, then stage 1's
    h = tokens.shape[1] // 2
    assert len(streamed.stage_counters) == 2
    for stage, counter in enumerate(streamed.stage_counters):
        by_hand = CodeCounter(tokenizer.codebook_size)
        by_hand.update(tokens[:, stage * h : (stage + 1) * h])
        assert torch.equal(counter.counts, by_hand.counts)
    union = streamed.stage_counters[0].counts + streamed.stage_counters[1].counts
    assert torch.equal(streamed.counter.counts, union)
    metrics = tokenizer_metrics(streamed.totals, streamed.counter, {}, {}, streamed.stage_counters)
    for stage, counter in enumerate(streamed.stage_counters):
        assert metrics[f"codebook_usage_pct_stage{stage}"] == pytest.approx(100.0 * counter.usage())
        assert metrics[f"perplexity_stage{stage}"] == pytest.approx(counter.perplexity())
    stage_usage = [metrics["codebook_usage_pct_stage0"], metrics["codebook_usage_pct_stage1"]]
    assert metrics["codebook_usage_pct"] >= max(stage_usage)
    # one stage: no per-stage keys
    plain = tokenizer_pass(tiny_tokenizer(), split_batches(tiny_shards / "val", BATCH), [], "cpu")
    assert plain.stage_counters == ()


def test_no_more_than_one_batch_of_images_outlives_its_step(tiny_shards):
    tokenizer, extractor = tiny_tokenizer(), tiny_classifier()
    alive: list[weakref.ref] = []
    peak = [0]
    tokenizer_pass(tokenizer, tracked(split_batches(tiny_shards / "val", 8), alive, peak), [extractor], "cpu")
    collect_features([extractor], tracked(split_batches(tiny_shards / "train", 8, limit=60), alive, peak))
    generation_metrics(
        collect_features([extractor], split_batches(tiny_shards / "val", 8)),
        tracked(split_batches(tiny_shards / "train", 8, limit=60), alive, peak),
        [extractor],
        None,
    )
    assert len(alive) == 4 + 8 + 8  # 30 val images and twice 60 train images, in batches of 8
    assert peak[0] <= 1  # the batch of the step that just ended, at most; the split is never held
