"""The training loops wait for the device only at log lines, validation and checkpoints.

On a GPU every read of a device value on the host (``bool(t)``, ``float(t)``, ``.item()``, ...) is a
sync that stalls the launch queue. These tests count such reads with a ``TorchFunctionMode`` during
whole CPU training runs of different lengths: a read inside every step would make the longer run read
more. And a non-finite loss, no longer checked on the host every step, still stops the run before it
can write a checkpoint.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
import torch
from project_factory import with_run_settings
from torch.overrides import TorchFunctionMode

from imtok.data.shards import read_meta
from imtok.params import Params
from imtok.runtime import Runtime
from imtok.training import NonFiniteLossWatch, list_checkpoints, read_checkpoint

CPU = Runtime(device=torch.device("cpu"))
HOST_READS = {"__bool__", "__float__", "__int__", "__index__", "item", "tolist", "numpy", "cpu"}
HOST_READS |= {"__array__", "__format__", "__repr__"}  # np.asarray(t), f"{t}", printing


class HostReads(TorchFunctionMode):
    """Counts the tensor methods that copy a value back to the host.

    Reads made by torch's optimizers are left out: without ``capturable`` they keep their step
    counters on the host by design (``.item()`` there reads host memory, on a GPU run too).
    """

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in HOST_READS:
            caller = sys._getframe(1).f_code.co_filename
            if f"torch{os.sep}optim{os.sep}" not in caller:
                self.count += 1
        return func(*args, **(kwargs or {}))


def tokenizer_params(steps: int, **tokenizer: object) -> Params:
    every = {"log_every": steps, "val_every": steps, "checkpoint_every": steps, "val_batches": 0}
    raw = {
        "prepare": {"source": "synthetic", "image_size": 16},
        "tokenizer": {
            "base_channels": 8, "codebook_size": 256, "batch_size": 8, "total_steps": steps,
            "warmup_steps": 0, "device": "cpu", "ema_decay": 0.9, **every, **tokenizer,
        },
    }  # fmt: skip
    return Params.from_dict(with_run_settings(raw))


def run_tokenizer(params: Params, shards: Path, checkpoints: Path):
    from imtok.trainers.tokenizer import train_tokenizer

    meta = read_meta(shards / "train")
    config = params.tokenizer_config(meta["channels"], meta["image_size"])
    return train_tokenizer(
        params.tokenizer,
        config,
        run=params.run.tokenizer,
        train_dir=shards / "train",
        val_dir=shards / "val",
        checkpoint_dir=checkpoints,
        runtime=CPU,
    )


@pytest.mark.parametrize(
    "options",
    [{"quantizer": "fsq"}, {"quantizer": "vq", "quantizer_options": {"vq": {"restart_after_steps": 1}}},
     {"quantizer": "regvq", "pcl_weight": 0.0, "perceptual_weight": 0.0}, {"grad_clip": 1.0},
     {"gan_weight": 0.1, "gan_start_step": 0, "disc_channels": 8, "disc_layers": 2},
     {"gan_weight": 0.1, "gan_start_step": 0, "gan_adaptive": False, "disc_channels": 8, "disc_layers": 2}],
    ids=["fsq", "vq-restarting", "regvq", "clipped", "gan-adaptive", "gan-fixed"],
)  # fmt: skip
def test_tokenizer_training_steps_read_nothing_back_between_log_lines(tiny_shards, tmp_path, options):
    reads = {}
    for steps in (3, 7):
        with HostReads() as counter:
            result = run_tokenizer(tokenizer_params(steps, **options), tiny_shards, tmp_path / f"ck{steps}")
        assert result.step == steps and torch.isfinite(torch.tensor(result.train["train/loss"]))
        reads[steps] = counter.count
    assert reads[3] == reads[7], f"reads grow with the steps: {reads}"


@pytest.mark.parametrize("kind", ["maskgit", "gpt"])
def test_prior_training_steps_read_nothing_back_between_log_lines(tmp_path, kind):
    from imtok.data.tokens import TokenSplit
    from imtok.trainers.prior import prior_config, train_prior

    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 32, (64, 4, 4), generator=generator)
    labels = torch.arange(64) % 4
    meta = {"codebook_size": 32, "grid": [4, 4], "class_names": [str(c) for c in range(4)]}
    split = TokenSplit(tokens, labels, [f"{i:04d}" for i in range(64)], meta)
    reads = {}
    for steps in (3, 7):
        prior = {"kind": kind, "hidden_dim": 16, "depth": 1, "heads": 2, "batch_size": 8, "device": "cpu"}
        prior |= {"total_steps": steps, "warmup_steps": 0, "val_batches": 0, "grad_clip": 1.0}
        prior |= {"log_every": steps, "val_every": steps, "checkpoint_every": steps}
        params = Params.from_dict(with_run_settings({"prior": prior}))
        config = prior_config(params.prior, 32, (4, 4), 4)
        with HostReads() as counter:
            checkpoints = tmp_path / f"ck{steps}"
            result = train_prior(
                params.prior,
                config,
                run=params.run.prior,
                train=split,
                val=None,
                checkpoint_dir=checkpoints,
                runtime=CPU,
            )
        assert result.step == steps
        reads[steps] = counter.count
    assert reads[3] == reads[7], f"reads grow with the steps: {reads}"


def test_the_watch_names_the_first_non_finite_step_and_its_values():
    watch = NonFiniteLossWatch("train_x", "checkpoints/x", "lower x.lr")
    watch.check()  # nothing observed yet
    losses = [1.0, 0.5, 3.0, float("nan"), 2.0]
    norms = [0.1, 0.2, float("inf"), float("nan"), 0.3]
    for step, (loss, norm) in enumerate(zip(losses, norms, strict=True)):
        watch.observe(step, loss=torch.tensor(loss), grad_norm=torch.tensor(norm))
        if step < 2:
            watch.check()
    # the loss went bad one step after the gradients: the earliest bad value is the one named
    expected = r"train_x: grad_norm is inf at step 2; .*checkpoints/x.*lower x\.lr"
    with pytest.raises(FloatingPointError, match=expected):
        watch.check()


WATCH_RANKS = 2


def _watch_rank(rank: int, port: int, out_dir: str) -> None:
    from conftest import join_gloo

    join_gloo(rank, WATCH_RANKS, port)
    try:
        watch = NonFiniteLossWatch("train_x", "ck", "advice")
        for step in range(6):
            bad = rank == 1 and step >= 3  # only rank 1 diverges
            watch.observe(step, loss=torch.tensor(float("nan") if bad else 1.0))
            try:
                watch.check(distributed=True)
            except FloatingPointError as error:
                Path(out_dir, f"rank{rank}.txt").write_text(f"{step}: {error}")
                return
        Path(out_dir, f"rank{rank}.txt").write_text("no error")
    finally:
        torch.distributed.destroy_process_group()


def test_a_rank_that_diverges_alone_stops_every_rank_at_the_same_step(tmp_path):
    from conftest import free_port, spawn_ranks

    spawn_ranks(_watch_rank, WATCH_RANKS, free_port(), str(tmp_path))
    outcomes = [(tmp_path / f"rank{rank}.txt").read_text() for rank in range(WATCH_RANKS)]
    assert outcomes[0].startswith("3: train_x: loss is not finite on another rank at step 3"), outcomes
    assert outcomes[1].startswith("3: train_x: loss is nan at step 3"), outcomes


def test_a_token_split_with_ids_outside_the_codebook_is_refused_before_training(tmp_path):
    from imtok.data.tokens import TokenSplit
    from imtok.trainers.prior import prior_config, train_prior

    tokens = torch.randint(0, 32, (64, 4, 4), generator=torch.Generator().manual_seed(1))
    meta = {"codebook_size": 32, "grid": [4, 4], "class_names": ["a", "b"]}
    good = TokenSplit(tokens, torch.arange(64) % 2, [f"{i:04d}" for i in range(64)], meta)
    bad_tokens = tokens.clone()
    bad_tokens[5, 1, 2] = 32
    bad = good._replace(tokens=bad_tokens)
    bad_labels = good._replace(labels=torch.full((64,), 7))
    prior = {"hidden_dim": 16, "depth": 1, "heads": 2, "batch_size": 8, "total_steps": 2, "warmup_steps": 0}
    params = Params.from_dict({"prior": prior, "run": {"prior": {"device": "cpu", "val_batches": 0}}})
    config = prior_config(params.prior, 32, (4, 4), 2)
    checkpoints = tmp_path / "ck"
    run = params.run.prior
    for train, val, match in ((bad, None, "indices"), (good, bad, "indices"), (bad_labels, None, "labels")):
        with pytest.raises(ValueError, match=match):
            train_prior(
                params.prior, config, run=run, train=train, val=val, checkpoint_dir=checkpoints, runtime=CPU
            )
    assert not list(tmp_path.glob("ck/*.pt"))  # refused before the first step


def test_a_diverging_run_stops_before_its_next_checkpoint_and_keeps_the_good_ones(tiny_shards, tmp_path):
    # A learning rate that sends the weights to about 1e30 in one step: the second step's loss is
    # not finite. A checkpoint is due after every step, the only point where the loss is read back.
    checkpoints = tmp_path / "ck"
    diverging = tokenizer_params(6, lr=1e30, log_every=6, val_every=6, checkpoint_every=1, ema_decay=None)
    non_finite = r"(loss|grad_norm) is (nan|inf|-inf).* at step \d+"
    with pytest.raises(FloatingPointError, match=non_finite) as caught:
        run_tokenizer(diverging, tiny_shards, checkpoints)
    bad_step = int(re.search(r"at step (\d+)", str(caught.value))[1])
    assert 1 <= bad_step < 6 and "is intact" in str(caught.value) and str(checkpoints) in str(caught.value)
    kept = {read_checkpoint(path)["step"]: path for path in list_checkpoints(checkpoints)}
    # a checkpoint at step d holds the weights after step d - 1: none may come after the bad step
    assert kept and all(done <= bad_step for done in kept), (sorted(kept), bad_step)
    for path in kept.values():
        state = read_checkpoint(path)["model"]
        assert all(torch.isfinite(value).all() for value in state.values() if value.is_floating_point())


def test_a_run_without_a_terminal_logs_a_progress_line_at_each_log_step(tiny_shards, tmp_path, caplog):
    caplog.set_level("INFO", logger="imtok.train_tokenizer")
    params = tokenizer_params(6, log_every=3)  # pytest's captured stderr is no terminal
    run_tokenizer(params, tiny_shards, tmp_path / "ck")
    lines = [r.getMessage() for r in caplog.records if r.name == "imtok.train_tokenizer"]
    assert len(lines) == 2, lines
    expected = r"step 3/6 \(50%\), loss \d+\.\d{4}, psnr [\d.]+, usage [\d.]+%, \d+ images/s, ETA \d+s$"
    assert re.match(expected, lines[0]), lines[0]
    assert lines[1].startswith("step 6/6 (100%)") and lines[1].endswith("ETA 0s")
