"""train_prior and sample stages: priors that learn, registry entries, decodable samples, bad pairs."""

from __future__ import annotations

import gc
import json
import shutil
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from project_factory import with_run_settings

from imtok.data.shards import iter_samples, read_meta
from imtok.data.tokens import TokenSample, load_token_split, write_token_split
from imtok.extraction import extract
from imtok.generation import sample
from imtok.models.autoencoder import Tokenizer, TokenizerConfig
from imtok.models.files import save_model_file
from imtok.params import ExtractParams, ExtractRun, Params, SampleParams
from imtok.runtime import Runtime
from imtok.trainers.prior import REGISTERED_NAME
from imtok.trainers.prior import train_and_export as train

CPU = Runtime(device=torch.device("cpu"))


@pytest.fixture(scope="module")
def tiny_tokens(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Token shards of the tiny image shards, made by a small (untrained) tokenizer saved beside them."""
    root = tmp_path_factory.mktemp("tiny-tokens")
    torch.manual_seed(0)
    config = TokenizerConfig(in_channels=1, image_size=16, base_channels=8, codebook_size=256)
    save_model_file(
        root / "tokenizer" / "tokenizer.pt", kind="tokenizer", config=config, model=Tokenizer(config), meta={}
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        extract(
            ExtractParams(tokenizer=str(root / "tokenizer")),
            shards_dir=tiny_shards,
            tokens_dir=root / "tokens",
            run=ExtractRun(device="cpu"),
        )
    finally:
        torch.set_num_threads(threads)
    return root


def prior_params(kind: str, **overrides: object) -> Params:
    prior = {
        "kind": kind,
        "hidden_dim": 32,
        "depth": 2,
        "heads": 4,
        "dropout": 0.0,
        "batch_size": 32,
        "lr": 3e-3,
        "warmup_steps": 10,
        "total_steps": 150,
        "log_every": 10,
        "val_every": 75,
        "val_batches": 2,
        "checkpoint_every": 75,
        "device": "cpu",
        **overrides,
    }
    return Params.from_dict(with_run_settings({"prepare": {"image_size": 16}, "prior": prior}))


@pytest.mark.parametrize("kind", ["maskgit", "gpt"])
def test_a_tiny_prior_learns_the_tokens_and_is_registered_with_its_tokenizer(
    kind, tiny_tokens, mlflow_store, tmp_path, one_thread
):
    import mlflow

    report = train(
        prior_params(kind),
        tokens_dir=tiny_tokens / "tokens",
        out_dir=tmp_path / "prior",
        checkpoint_root=tmp_path / "checkpoints",
        runtime=CPU,
    )
    assert report["step"] == 150
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias(REGISTERED_NAME, "candidate")
    run = client.get_run(version.run_id)
    history = [point.value for point in client.get_metric_history(run.info.run_id, "train/loss")]
    assert history[-1] < 0.6 * history[0], history  # measured: about 0.35-0.45 for both kinds
    tokens_meta = load_token_split(tiny_tokens / "tokens" / "train").meta
    assert run.data.params["tokens.tokenizer_sha256"] == tokens_meta["tokenizer_sha256"]
    assert (
        version.tags["tokenizer_sha256"] == tokens_meta["tokenizer_sha256"] and version.tags["prior"] == kind
    )
    assert version.description.startswith(f"{kind} prior, class-conditional, over ")  # the registry's line
    assert "val loss" in version.description and "tokenizer" in version.description
    summary = json.loads((tmp_path / "prior" / "prior.json").read_text())
    assert summary["grid"] == [4, 4] and summary["num_classes"] == 4
    assert np.isfinite(report["val"]["loss"]) and 0 <= report["val"]["accuracy"] <= 1


@pytest.mark.parametrize("kind", ["maskgit", "gpt"])
def test_sample_writes_decodable_shards_and_a_class_grid_and_is_seeded(
    kind, tiny_tokens, mlflow_store, tmp_path, one_thread, monkeypatch
):
    train(
        prior_params(kind, total_steps=20, val_batches=0),
        tokens_dir=tiny_tokens / "tokens",
        out_dir=tmp_path / "prior",
        checkpoint_root=tmp_path / "checkpoints",
        register=False,
        runtime=CPU,
    )
    params = SampleParams(prior=str(tmp_path / "prior"), per_class=3, steps=4, batch_size=5, grid_per_class=2)
    report = sample(params, samples_dir=tmp_path / "a", grid_path=tmp_path / "a.png", device="cpu")
    assert report["count"] == 12 and (tmp_path / "a.png").stat().st_size > 0
    meta = read_meta(tmp_path / "a")
    assert meta["image_size"] == 16 and meta["channels"] == 1 and meta["count"] == 12
    first = list(iter_samples(tmp_path / "a"))
    assert [s["cls"] for s in first] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    sample(params, samples_dir=tmp_path / "b", grid_path=tmp_path / "b.png", device="cpu")
    assert [s["png"] for s in first] == [s["png"] for s in iter_samples(tmp_path / "b")]

    import imtok.generation

    # Batch by batch: when a batch is encoded, no earlier batch of float images is still alive
    # (neither kept whole nor through a view that the grid holds).
    earlier_alive: list[int] = []
    batches: list[weakref.ref] = []

    def tracking_to_uint8(images):
        gc.collect()
        earlier_alive.append(sum(ref() is not None for ref in batches))
        batches.append(weakref.ref(images))
        return real_to_uint8(images)

    real_to_uint8 = imtok.generation.to_uint8
    monkeypatch.setattr(imtok.generation, "to_uint8", tracking_to_uint8)
    sample(params, samples_dir=tmp_path / "d", grid_path=tmp_path / "d.png", device="cpu")
    monkeypatch.setattr(imtok.generation, "to_uint8", real_to_uint8)
    assert earlier_alive == [0, 0, 0]  # 12 samples in batches of 5, each holding a grid pick
    assert (tmp_path / "d.png").read_bytes() == (tmp_path / "a.png").read_bytes()

    # A run that fails part-way (here at its third batch) leaves the samples it was to replace.

    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory at batch 3")
        return real_generate(*args, **kwargs)

    real_generate = imtok.generation.generate_tokens
    monkeypatch.setattr(imtok.generation, "generate_tokens", failing)
    with pytest.raises(RuntimeError, match="batch 3"):
        sample(params, samples_dir=tmp_path / "a", grid_path=tmp_path / "c.png", device="cpu")
    assert read_meta(tmp_path / "a") == meta
    assert [s["png"] for s in iter_samples(tmp_path / "a")] == [s["png"] for s in first]
    assert sorted(path.name for path in tmp_path.iterdir() if path.name.startswith(".a.")) == []


@pytest.mark.parametrize(
    ("labels", "total", "per_row", "expected", "width"),
    [
        (None, 20, 3, list(range(9)), 3),
        (None, 5, 3, list(range(5)), 3),
        ([0, 0, 0, 1, 1, 1], 6, 2, [0, 1, 3, 4], 2),
        ([2, 0, 1, 0, 2, 1, 0], 7, 5, [1, 3, 2, 5, 0, 4], 2),  # class by class; the rarest sets the width
    ],
)
def test_grid_positions_pick_the_first_samples_of_each_class(labels, total, per_row, expected, width):
    from imtok.generation import grid_positions

    tensor = None if labels is None else torch.tensor(labels)
    assert grid_positions(tensor, total, per_row) == (expected, width)


def train_two_step_prior(tiny_tokens: Path, tmp_path: Path) -> None:
    """A MaskGIT prior of two steps on the tiny tokens, exported to ``tmp_path / "prior"``."""
    train(
        prior_params("maskgit", total_steps=2, warmup_steps=1, val_batches=0),
        tokens_dir=tiny_tokens / "tokens",
        out_dir=tmp_path / "prior",
        checkpoint_root=tmp_path / "checkpoints",
        register=False,
        runtime=CPU,
    )


def test_a_tokenizer_other_than_the_priors_is_refused_naming_both_checksums(
    tiny_tokens, tmp_path, one_thread
):
    train_two_step_prior(tiny_tokens, tmp_path)
    torch.manual_seed(1)
    config = TokenizerConfig(in_channels=1, image_size=16, base_channels=8, codebook_size=256)
    save_model_file(
        tmp_path / "other" / "tokenizer.pt", kind="tokenizer", config=config, model=Tokenizer(config), meta={}
    )
    params = SampleParams(prior=str(tmp_path / "prior"), tokenizer=str(tmp_path / "other"), per_class=1)
    with pytest.raises(ValueError, match=r"sample\.tokenizer: .*sha256 [0-9a-f]{12}.*sha256 [0-9a-f]{12}"):
        sample(params, samples_dir=tmp_path / "s", grid_path=tmp_path / "s.png", device="cpu")
    bigger = TokenizerConfig(in_channels=1, image_size=16, base_channels=8, codebook_size=1024)
    save_model_file(
        tmp_path / "big" / "tokenizer.pt", kind="tokenizer", config=bigger, model=Tokenizer(bigger), meta={}
    )
    params = SampleParams(prior=str(tmp_path / "prior"), tokenizer=str(tmp_path / "big"), per_class=1)
    with pytest.raises(ValueError, match=r"codebook of 1000 codes but the prior .* was trained on 240"):
        sample(params, samples_dir=tmp_path / "s", grid_path=tmp_path / "s.png", device="cpu")


def test_more_maskgit_steps_than_tokens_are_refused_before_the_tokenizer_is_fetched(
    tiny_tokens, tmp_path, one_thread
):
    train_two_step_prior(tiny_tokens, tmp_path)
    tokens = read_meta(tiny_tokens / "tokens" / "train")["grid"]
    num_tokens = tokens[0] * tokens[1]
    # A tokenizer that is not there: the steps are refused before it would be looked for.
    params = SampleParams(
        prior=str(tmp_path / "prior"),
        tokenizer=str(tmp_path / "absent"),
        per_class=1,
        steps=num_tokens + 1,
    )
    with pytest.raises(ValueError, match=rf"sample\.steps: {num_tokens + 1} .* at most {num_tokens}$"):
        sample(params, samples_dir=tmp_path / "s", grid_path=tmp_path / "s.png", device="cpu")
    assert not (tmp_path / "s").exists()


def test_how_often_a_prior_validates_does_not_change_its_weights(tiny_tokens, tmp_path, one_thread):
    # val_every is not part of the run's fingerprint; with EMA, validation builds an evaluation copy,
    # whose initial weights must not come from the generator that training's masks and dropout use.
    states = []
    for val_every in (4, 12):
        train(
            prior_params(
                "maskgit", total_steps=12, warmup_steps=2, dropout=0.1, ema_decay=0.9, val_every=val_every
            ),
            tokens_dir=tiny_tokens / "tokens",
            out_dir=tmp_path / f"prior-{val_every}",
            checkpoint_root=tmp_path / f"checkpoints-{val_every}",
            register=False,
            runtime=CPU,
        )
        states.append(
            torch.load(tmp_path / f"prior-{val_every}" / "prior.pt", weights_only=True)["state_dict"]
        )
    for name, value in states[0].items():
        assert torch.equal(states[1][name], value), name


def test_token_splits_from_different_tokenizers_are_refused(tiny_tokens, tmp_path):
    tokens = tmp_path / "tokens"
    shutil.copytree(tiny_tokens / "tokens" / "train", tokens / "train")
    samples = [TokenSample(f"k{i}", np.zeros((4, 4), dtype=np.int64), 0) for i in range(4)]
    write_token_split(samples, tokens / "val", codebook_size=512, grid=(4, 4), meta={"tokenizer_sha256": "x"})
    with pytest.raises(ValueError, match=r"codebook_size 512 differs from .*train's 240"):
        train(
            prior_params("maskgit"),
            tokens_dir=tokens,
            out_dir=tmp_path / "p",
            checkpoint_root=tmp_path / "c",
            runtime=CPU,
        )


def test_a_prior_uri_that_does_not_resolve_is_named(mlflow_store, tmp_path):
    params = SampleParams(prior="models:/imtok-prior@nothing")
    with pytest.raises(ValueError, match="models:/imtok-prior@nothing: cannot fetch prior"):
        sample(params, samples_dir=tmp_path / "s", grid_path=tmp_path / "s.png", device="cpu")
