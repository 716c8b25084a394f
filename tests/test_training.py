"""Training pieces: LR schedule, EMA, gradient clipping, atomic checkpoints and exact resumption."""

import itertools
import math
import random
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from imtok.models.autoencoder import Tokenizer, TokenizerConfig
from imtok.runtime import Runtime
from imtok.training import (
    IDENTITY_TAIL_BYTES,
    ModelEma,
    agreed_latest_checkpoint,
    checkpoint_disagreement,
    checkpoint_identity,
    checkpoint_path,
    clip_gradients,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    make_scheduler,
    prune_checkpoints,
    save_checkpoint,
    warmup_cosine,
)

SCHEDULE = {"warmup_steps": 10, "total_steps": 110, "min_ratio": 0.1}


# --- schedule ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, 0.1),  # first warmup step: 1 / warmup_steps
        (4, 0.5),
        (9, 1.0),  # warmup ends
        (10, 1.0),  # cosine starts at the peak
        (60, 0.55),  # halfway through the cosine: (1 + min_ratio) / 2
        (110, 0.1),  # total_steps: min_ratio
        (500, 0.1),  # flat afterwards
    ],
)
def test_warmup_cosine_key_steps(step: int, expected: float) -> None:
    assert warmup_cosine(step, **SCHEDULE) == pytest.approx(expected)


def test_warmup_cosine_rises_then_falls() -> None:
    values = [warmup_cosine(step, **SCHEDULE) for step in range(130)]
    warmup, decay = values[:10], values[9:]
    assert all(a < b for a, b in itertools.pairwise(warmup))
    assert all(a >= b for a, b in itertools.pairwise(decay))
    assert min(values) == pytest.approx(0.1) and max(values) == 1.0


def test_warmup_cosine_without_warmup_starts_at_one() -> None:
    assert warmup_cosine(0, warmup_steps=0, total_steps=4) == 1.0
    assert warmup_cosine(2, warmup_steps=0, total_steps=4) == pytest.approx(0.5)
    assert warmup_cosine(4, warmup_steps=0, total_steps=4) == 0.0


def test_make_scheduler_follows_the_multiplier() -> None:
    parameter = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=2.0)
    scheduler = make_scheduler(optimizer, **SCHEDULE)
    for step in range(120):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(2.0 * warmup_cosine(step, **SCHEDULE))
        optimizer.step()
        scheduler.step()


@pytest.mark.parametrize(
    ("warmup_steps", "total_steps", "key"),
    [(-1, 10, "prior.warmup_steps"), (0, 0, "prior.total_steps"), (11, 10, "prior.warmup_steps")],
)
def test_make_scheduler_names_the_bad_key(warmup_steps: int, total_steps: int, key: str) -> None:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match=key):
        make_scheduler(optimizer, warmup_steps=warmup_steps, total_steps=total_steps, prefix="prior")


def test_make_scheduler_default_prefix_is_tokenizer() -> None:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match=r"tokenizer\.total_steps"):
        make_scheduler(optimizer, warmup_steps=0, total_steps=0)


# --- EMA and clipping -------------------------------------------------------------------------------


def set_weights(model: nn.Module, value: float) -> None:
    """Fill every parameter of ``model`` with ``value``."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(value)


def test_ema_matches_hand_computation() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    set_weights(model, 1.0)
    ema = ModelEma(model, decay=0.9)
    set_weights(model, 3.0)
    model[1].num_batches_tracked.fill_(7)
    model[1].running_mean.fill_(0.25)
    ema.update(model)  # warm-up decay min(0.9, 1/10) = 0.1: 0.1 * 1 + 0.9 * 3 = 2.8
    set_weights(model, -2.0)
    ema.update(model)  # min(0.9, 2/11): 2/11 * 2.8 + 9/11 * -2
    expected = 2 / 11 * 2.8 + 9 / 11 * -2.0
    for name, _ in model.named_parameters():
        assert torch.allclose(ema.shadow[name], torch.full_like(ema.shadow[name], expected))
    assert ema.shadow["1.num_batches_tracked"].item() == 7  # buffers are copied, not averaged
    assert torch.equal(ema.shadow["1.running_mean"], torch.full((2,), 0.25))
    assert ema.num_updates == 2

    evaluation_copy = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema.copy_to(evaluation_copy)
    assert torch.allclose(evaluation_copy[0].weight, torch.full((2, 2), expected))

    restored = ModelEma(model, decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.decay == 0.9 and restored.num_updates == 2
    assert all(torch.equal(restored.shadow[name], ema.shadow[name]) for name in ema.shadow)


def test_ema_warm_up_leaves_the_starting_weights_out_of_the_average() -> None:
    from imtok.training import ema_decay_at

    assert ema_decay_at(0.999, 0) == pytest.approx(0.1) and ema_decay_at(0.5, 100) == 0.5
    assert ema_decay_at(0.999, 10**6) == 0.999
    model = nn.Linear(4, 4)
    ema = ModelEma(model, decay=0.999)
    set_weights(model, 1.0)  # the trained values, far from the random start
    for _ in range(100):
        ema.update(model)
    # a fixed 0.999 would still hold 0.999^100 = 90 % of the start; the warm-up holds under 1 %
    assert torch.allclose(ema.shadow["weight"], torch.ones(4, 4), atol=0.01)


def test_an_ema_of_a_vq_tokenizer_encodes_like_the_live_model_after_its_codebook_init() -> None:
    from imtok.models.autoencoder import Tokenizer, TokenizerConfig

    torch.manual_seed(0)
    config = TokenizerConfig(
        quantizer="vq", codebook_size=16, image_size=16, base_channels=8, num_res_blocks=1
    )
    tokenizer = Tokenizer(config)
    ema = ModelEma(tokenizer, decay=0.999)
    images = torch.rand(8, 1, 16, 16) * 2 - 1
    tokenizer.train()
    tokenizer(images)  # the first training batch sets the codebook (k-means init)
    for _ in range(50):
        ema.update(tokenizer)
    averaged = Tokenizer(config)
    ema.copy_to(averaged)
    tokenizer.eval(), averaged.eval()
    assert torch.equal(averaged.quantizer.embed, tokenizer.quantizer.embed)  # the codebook is copied
    agreement = (averaged.encode(images) == tokenizer.encode(images)).float().mean().item()
    assert agreement > 0.9, agreement


def test_ema_shadow_is_independent_of_the_model() -> None:
    model = nn.Linear(2, 1)
    ema = ModelEma(model, decay=0.0)
    set_weights(model, 5.0)
    assert not torch.equal(ema.shadow["weight"], model.weight)
    ema.update(model)  # decay 0: shadow becomes the current weights
    assert torch.equal(ema.shadow["weight"], model.weight.detach())


def test_clip_gradients() -> None:
    model = nn.Linear(2, 1, bias=False)
    assert float(clip_gradients(model, 1.0)) == 0.0  # no gradients yet
    model.weight.grad = torch.tensor([[3.0, 4.0]])
    norm = clip_gradients(model, None)
    assert isinstance(norm, torch.Tensor) and norm.shape == ()  # read back only when the caller wants
    assert float(norm) == pytest.approx(5.0)
    assert float(clip_gradients(model, 0)) == pytest.approx(5.0)
    assert torch.equal(model.weight.grad, torch.tensor([[3.0, 4.0]]))  # disabled: untouched
    assert float(clip_gradients(model, 1.0)) == pytest.approx(5.0)
    assert model.weight.grad.norm().item() == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="max_norm"):
        clip_gradients(model, -1.0)


# --- checkpoints ------------------------------------------------------------------------------------


class TinyNet(nn.Module):
    """Two linear layers with dropout (so the forward pass draws from the torch RNG) and a BatchNorm."""

    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(4, hidden), nn.BatchNorm1d(hidden), nn.Dropout(0.3), nn.Linear(hidden, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def random_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """A batch drawn from torch, numpy and python RNGs, so all three must be restored on resume."""
    x = torch.randn(16, 4) * (1.0 + random.random()) + float(np.random.rand())
    return x, x.sum(dim=1, keepdim=True).sin()


def make_run(
    optimizer_name: str,
) -> tuple[TinyNet, torch.optim.Optimizer, LambdaLR, ModelEma]:
    """A fresh model, optimizer, schedule and EMA."""
    model = TinyNet()
    if optimizer_name == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    scheduler = make_scheduler(optimizer, warmup_steps=2, total_steps=8, min_ratio=0.1)
    return model, optimizer, scheduler, ModelEma(model, decay=0.8)


def train(
    model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: LambdaLR, ema: ModelEma, steps: int
) -> None:
    """``steps`` optimizer steps on random batches."""
    model.train()
    for _ in range(steps):
        x, y = random_batch()
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_gradients(model, 1.0)
        optimizer.step()
        scheduler.step()
        ema.update(model)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path: Path, optimizer_name: str) -> None:
    seed_everything(0)
    model, optimizer, scheduler, ema = make_run(optimizer_name)
    train(model, optimizer, scheduler, ema, 6)

    seed_everything(0)
    first, first_optimizer, first_scheduler, first_ema = make_run(optimizer_name)
    train(first, first_optimizer, first_scheduler, first_ema, 3)
    path = checkpoint_path(tmp_path, 3)
    save_checkpoint(
        path,
        model=first,
        optimizer=first_optimizer,
        scheduler=first_scheduler,
        step=3,
        ema=first_ema,
        extra={"best_loss": 0.5},
    )

    seed_everything(123)  # a new process: other initial weights and RNG states
    resumed, resumed_optimizer, resumed_scheduler, resumed_ema = make_run(optimizer_name)
    state = load_checkpoint(
        path, model=resumed, optimizer=resumed_optimizer, scheduler=resumed_scheduler, ema=resumed_ema
    )
    assert state == {"step": 3, "extra": {"best_loss": 0.5}}
    assert resumed_scheduler.last_epoch == 3
    train(resumed, resumed_optimizer, resumed_scheduler, resumed_ema, 3)

    for name, value in model.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
        assert torch.equal(resumed_ema.shadow[name], ema.shadow[name]), name
    assert resumed_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]


def test_failed_save_leaves_no_partial_file_and_keeps_the_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, optimizer, scheduler, _ = make_run("sgd")
    path = save_checkpoint(
        checkpoint_path(tmp_path, 1), model=model, optimizer=optimizer, scheduler=scheduler, step=1
    )
    original = path.read_bytes()

    def failing_save(obj, file, *args, **kwargs) -> None:
        file.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    for step in (1, 2):  # overwriting the same step, and writing a new one
        with pytest.raises(OSError, match="disk full"):
            save_checkpoint(
                checkpoint_path(tmp_path, step),
                model=model,
                optimizer=optimizer,
                scheduler=scheduler,
                step=step,
            )
    monkeypatch.undo()

    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    assert path.read_bytes() == original
    assert load_checkpoint(path, model=model)["step"] == 1


def test_architecture_mismatch_names_file_key_and_both_values(tmp_path: Path) -> None:
    model, optimizer, scheduler, _ = make_run("sgd")
    path = checkpoint_path(tmp_path / "models" / "tokenizer", 200)
    save_checkpoint(
        path,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        step=200,
        config={"codebook_size": 1024, "levels": (8, 5, 5)},
    )
    with pytest.raises(ValueError) as error:
        load_checkpoint(path, model=model, config={"codebook_size": 4096, "levels": [8, 5, 5]})
    message = str(error.value)
    assert message.startswith(f"{path}: ")
    assert "tokenizer.codebook_size=1024" in message and "4096" in message
    assert "delete the checkpoint directory" in message
    # Tuples and lists compare equal: a YAML list matches the dataclass tuple it was saved from.
    load_checkpoint(path, model=model, config={"codebook_size": 1024, "levels": [8, 5, 5]})

    save_checkpoint(
        path, model=model, optimizer=optimizer, scheduler=None, step=1, config={"width": 1}, prefix="prior"
    )
    with pytest.raises(ValueError, match=r"prior\.width=1 but the config asks for 2"):
        load_checkpoint(path, model=model, config={"width": 2}, prefix="prior")


def test_shape_mismatch_names_the_tensor(tmp_path: Path) -> None:
    model, optimizer, scheduler, _ = make_run("sgd")
    path = save_checkpoint(
        tmp_path / "step-00000001.pt", model=model, optimizer=optimizer, scheduler=scheduler, step=1
    )
    with pytest.raises(ValueError, match=r"step-00000001\.pt: .*net\.0\.weight of shape \[8, 4\].*\[16, 4\]"):
        load_checkpoint(path, model=TinyNet(hidden=16))


def test_tokenizer_config_round_trip_and_mismatch(tmp_path: Path) -> None:
    fields = {"image_size": 8, "base_channels": 8, "channel_multipliers": (1, 2), "num_res_blocks": 1}
    config = TokenizerConfig(**fields, mid_attention=False, levels=(5, 5, 5))
    model = Tokenizer(config)
    optimizer = torch.optim.Adam(model.parameters())
    path = save_checkpoint(
        tmp_path / "step-00000010.pt",
        model=model,
        optimizer=optimizer,
        scheduler=None,
        step=10,
        config=asdict(config),
    )
    assert load_checkpoint(path, model=Tokenizer(config), config=config)["step"] == 10
    other = TokenizerConfig(**fields, mid_attention=False, levels=(8, 5, 5))
    with pytest.raises(
        ValueError, match=r"tokenizer\.levels=\[5, 5, 5\] but the config asks for \[8, 5, 5\]"
    ):
        load_checkpoint(path, model=Tokenizer(other), config=other)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_checkpoint_names_the_file(tmp_path: Path, damage: str) -> None:
    model, optimizer, scheduler, _ = make_run("sgd")
    path = save_checkpoint(
        tmp_path / "step-00000005.pt", model=model, optimizer=optimizer, scheduler=scheduler, step=5
    )
    data = path.read_bytes()
    path.write_bytes(
        {"truncate": data[: len(data) // 2], "garbage": b"\x00not a checkpoint", "empty": b""}[damage]
    )
    with pytest.raises(ValueError, match=r"step-00000005\.pt: cannot read checkpoint"):
        load_checkpoint(path, model=model)


def test_foreign_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "step-00000001.pt"
    torch.save({"weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match=r"step-00000001\.pt: not an imtok checkpoint"):
        load_checkpoint(path, model=nn.Linear(1, 1))


def test_latest_and_prune_order_by_step(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path / "missing") is None
    assert latest_checkpoint(tmp_path) is None
    for step in (100, 5, 2, 123456789):
        checkpoint_path(tmp_path, step).write_bytes(b"")
    (tmp_path / ".step-999999999.pt.x1y2.tmp").write_bytes(b"")  # a save that never finished
    (tmp_path / "notes.txt").write_bytes(b"")
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "step-00000002.pt",
        "step-00000005.pt",
        "step-00000100.pt",
        "step-123456789.pt",
    ]
    assert latest_checkpoint(tmp_path) == tmp_path / "step-123456789.pt"
    deleted = prune_checkpoints(tmp_path, keep=2)
    # the unfinished save's temp file goes too; other files stay
    assert [p.name for p in deleted] == [
        "step-00000002.pt",
        "step-00000005.pt",
        ".step-999999999.pt.x1y2.tmp",
    ]
    assert (tmp_path / "notes.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "notes.txt",
        "step-00000100.pt",
        "step-123456789.pt",
    ]
    assert prune_checkpoints(tmp_path, keep=2) == []
    with pytest.raises(ValueError, match="keep"):
        prune_checkpoints(tmp_path, keep=0)


def test_checkpoint_identity_tells_apart_same_name_and_size_with_other_tensors(tmp_path: Path) -> None:
    """Two runs' checkpoints of one step: same name and size, one weight differs at the file's start."""
    weight = torch.randn(IDENTITY_TAIL_BYTES // 2, generator=torch.Generator().manual_seed(0))
    other = weight.clone()
    other[0] += 1.0  # its bytes lie megabytes before the hashed tail
    paths = []
    for node, tensor in (("node0", weight), ("node1", other), ("copy", weight)):
        (tmp_path / node).mkdir()
        paths.append(tmp_path / node / "step-00000007.pt")
        torch.save({"weight": tensor, "step": 7}, paths[-1])
    first, second, copy = (checkpoint_identity(path) for path in paths)
    assert first[:2] == second[:2] == ("step-00000007.pt", paths[0].stat().st_size)
    assert first[1] > 2 * IDENTITY_TAIL_BYTES
    assert first != second
    assert first == copy


def test_checkpoint_identity_hashes_all_of_a_small_file(tmp_path: Path) -> None:
    one, two = tmp_path / "a" / "step-00000001.pt", tmp_path / "b" / "step-00000001.pt"
    for path, value in ((one, 1.0), (two, 2.0)):
        path.parent.mkdir()
        torch.save({"weight": torch.full((4,), value)}, path)
    assert checkpoint_identity(one)[1] < IDENTITY_TAIL_BYTES
    assert checkpoint_identity(one) != checkpoint_identity(two)


def test_checkpoint_disagreement_lists_groups_of_ranks() -> None:
    same = ("step-00000003.pt", 900, "a" * 64)
    assert checkpoint_disagreement("ckpt", [same] * 4) is None
    assert checkpoint_disagreement("ckpt", [None] * 4) is None
    message = checkpoint_disagreement("ckpt", [same, same, None, same, None])
    assert message is not None
    assert "ckpt: the ranks found different newest checkpoints" in message
    assert "ranks 0-1, 3: step-00000003.pt (900 bytes); ranks 2, 4: no checkpoint" in message
    assert "contents" not in message  # the name and size already tell the groups apart
    assert "one mount that all nodes share" in message


def test_checkpoint_disagreement_shows_contents_only_where_name_and_size_match() -> None:
    node0 = ("step-00000003.pt", 900, "a" * 64)
    node1 = ("step-00000003.pt", 900, "b" * 64)
    older = ("step-00000002.pt", 900, "c" * 64)
    message = checkpoint_disagreement("ckpt", [node0, node0, node1, node1, older])
    assert message is not None
    assert (
        f"ranks 0-1: step-00000003.pt (900 bytes, contents {'a' * 12}); "
        f"ranks 2-3: step-00000003.pt (900 bytes, contents {'b' * 12}); "
        "rank 4: step-00000002.pt (900 bytes)"
    ) in message


def test_checkpoint_disagreement_names_a_rank_that_could_not_read_its_file() -> None:
    same = ("step-00000003.pt", 900, "a" * 64)
    unreadable = "step-00000003.pt unreadable (Permission denied)"
    message = checkpoint_disagreement("ckpt", [same, unreadable, same])
    assert message is not None
    assert "ckpt: not every rank could read its newest checkpoint" in message
    assert f"ranks 0, 2: step-00000003.pt (900 bytes); rank 1: {unreadable}" in message
    every = checkpoint_disagreement("ckpt", [unreadable, unreadable])  # all alike, still an error
    assert every is not None and f"ranks 0-1: {unreadable}" in every


AGREE_RANKS = 2


def _agree_rank(rank: int, port: int, root: str) -> None:
    """Rank 0 holds a real step-5 checkpoint; rank 1's of the same name is a link to a deleted file."""
    from conftest import join_gloo

    join_gloo(rank, AGREE_RANKS, port)
    try:
        runtime = Runtime(torch.device("cpu"), rank=rank, world_size=AGREE_RANKS)
        try:
            agreed_latest_checkpoint(Path(root, f"rank{rank}"), runtime)
            outcome = "no error"
        except ValueError as error:
            outcome = str(error)
        Path(root, f"rank{rank}.txt").write_text(outcome)
    finally:
        dist.destroy_process_group()


def test_a_rank_that_cannot_read_its_checkpoint_stops_every_rank_with_one_message(tmp_path: Path) -> None:
    from conftest import free_port, spawn_ranks

    for rank in range(AGREE_RANKS):
        (tmp_path / f"rank{rank}").mkdir()
    torch.save({"weight": torch.zeros(3)}, tmp_path / "rank0" / "step-00000005.pt")
    (tmp_path / "rank1" / "step-00000005.pt").symlink_to(tmp_path / "deleted.pt")
    spawn_ranks(_agree_rank, AGREE_RANKS, free_port(), str(tmp_path))
    outcomes = [(tmp_path / f"rank{rank}.txt").read_text() for rank in range(AGREE_RANKS)]
    for rank, outcome in enumerate(outcomes):  # each names its own directory, then the same listing
        assert outcome.startswith(f"{tmp_path / f'rank{rank}'}: "), outcomes
    assert outcomes[0].split(": ", 1)[1] == outcomes[1].split(": ", 1)[1], outcomes
    assert "not every rank could read its newest checkpoint" in outcomes[0], outcomes
    assert "rank 1: step-00000005.pt unreadable (No such file or directory)" in outcomes[0], outcomes


def test_schedule_value_is_consistent_with_cosine_formula() -> None:
    step, warmup, total = 35, 10, 110
    progress = (step - warmup) / (total - warmup)
    expected = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    assert warmup_cosine(step, warmup_steps=warmup, total_steps=total, min_ratio=0.1) == pytest.approx(
        expected
    )


def test_the_ema_evaluation_copy_holds_the_averages_draws_nothing_and_leaves_the_model_alone() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = ModelEma(model, 0.5)
    model(torch.randn(5, 3)).sum().backward()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update(model)
    live = {name: value.clone() for name, value in model.state_dict().items()}
    generator_state = torch.get_rng_state()
    averaged = ema.averaged_copy(model)
    assert torch.equal(torch.get_rng_state(), generator_state)  # no initial weights drawn
    assert all(parameter.grad is None for parameter in averaged.parameters())  # gradients not copied
    for name, value in averaged.state_dict().items():
        assert torch.equal(value, ema.shadow[name]), name
    for name, value in model.state_dict().items():
        assert torch.equal(value, live[name]), name
    assert not torch.equal(averaged[0].weight, model[0].weight)
