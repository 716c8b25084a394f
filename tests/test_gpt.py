"""Properties of the GPT prior: causality, KV cache equal to the full forward, loss, training, sampling."""

import math
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from imtok.models.gpt import GPT, GPTConfig, KVCache, gpt_loss
from imtok.sampling import autoregressive_sample, gpt_next_token_logits

K = 16  # codebook size of the synthetic data
NUM_CLASSES = 4
GRID = (4, 4)
N = GRID[0] * GRID[1]


def tiny_config(**changes) -> GPTConfig:
    fields = dict(
        codebook_size=K, grid=GRID, num_classes=NUM_CLASSES, hidden_dim=32, depth=2, heads=4, mlp_ratio=2.0
    )
    fields |= dict(dropout=0.0, label_dropout=0.1, label_smoothing=0.0)
    return GPTConfig(**(fields | changes))


def class_patterns(seed: int = 0) -> torch.Tensor:
    """One random (h, w) token pattern per class."""
    return torch.randint(0, K, (NUM_CLASSES, *GRID), generator=torch.Generator().manual_seed(seed))


def synthetic_tokens(count: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token grids (count, h, w) = (class pattern + a per-sample shift in 0..3) mod K, and their labels.

    Given the class, the first token fixes the whole grid: only token 0 is uncertain (ln 4 nats).
    """
    labels = torch.arange(count) % NUM_CLASSES
    shifts = torch.randint(0, 4, (count, 1, 1), generator=torch.Generator().manual_seed(seed + 1))
    return (class_patterns(seed)[labels] + shifts) % K, labels


def valid_grids(labels: torch.Tensor) -> torch.Tensor:
    """All four grids of each label's class: (B, 4, h, w)."""
    shifts = torch.arange(4).view(1, 4, 1, 1)
    return (class_patterns()[labels].unsqueeze(1) + shifts) % K


@pytest.fixture(autouse=True, scope="module")
def one_thread_for_this_module() -> Iterator[None]:
    """Tiny models are bound by per-op overhead: one thread is as fast and never fights a busy core
    (the module scope covers the trained-model fixtures too)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------
# Config and forward


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"codebook_size": 0}, "codebook_size"),
        ({"grid": (2, 2, 2)}, "grid"),
        ({"hidden_dim": 33}, "hidden_dim"),
        ({"depth": 0}, "depth"),
        ({"dropout": -0.1}, "dropout"),
        ({"label_dropout": -0.5}, "label_dropout"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
    ],
)
def test_bad_config_raises_naming_the_key(change, key):
    with pytest.raises(ValueError, match=rf"^prior\.{key}:"):
        tiny_config(**change)


def test_forward_prepends_the_class_prefix():
    model = GPT(tiny_config())
    tokens = torch.randint(0, K, (3, 5))
    logits = model(tokens, torch.tensor([0, 1, 2]))
    assert logits.shape == (3, 6, K)  # row i predicts token i; the prefix predicts token 0
    assert torch.isfinite(logits).all()
    assert model(tokens[:, :0]).shape == (3, 1, K)  # prefix only: logits of the first token


def test_logits_depend_only_on_earlier_tokens():
    model = GPT(tiny_config()).eval()
    tokens = torch.randint(0, K, (2, N - 1))
    changed = tokens.clone()
    changed[:, 6] = (changed[:, 6] + 1) % K
    before, after = model(tokens), model(changed)
    torch.testing.assert_close(before[:, :7], after[:, :7])  # rows 0..6 predict tokens 0..6
    assert not torch.allclose(before[:, 7:], after[:, 7:])


def test_sequences_longer_than_the_grid_are_refused():
    model = GPT(tiny_config())
    with pytest.raises(ValueError, match=r"^tokens:"):
        model(torch.zeros(1, N, dtype=torch.long))  # prefix + N tokens = N + 1 positions
    assert model(torch.zeros(1, N - 1, dtype=torch.long)).shape == (1, N, K)


# ---------------------------------------------------------------------------------------------------
# Key/value cache


@pytest.mark.parametrize("chunks", [[0, 1, 1, 1], [3, 1, 4, 2], [0, 15]])
def test_cached_forward_equals_full_forward(chunks):
    model = GPT(tiny_config()).eval()
    tokens = torch.randint(0, K, (3, N - 1))
    labels = torch.tensor([1, 3, 0])
    used = sum(chunks)
    full = model(tokens[:, :used], labels)  # (B, used + 1, K)
    cache = model.new_cache()
    pieces, start = [], 0
    for chunk in chunks:
        pieces.append(model(tokens[:, start : start + chunk], labels, cache=cache))
        start += chunk
    assert cache.length == used + 1  # the prefix and every token fed
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_cache_holds_keys_and_values_of_every_layer():
    model = GPT(tiny_config(depth=3))
    cache = model.new_cache()
    assert isinstance(cache, KVCache) and cache.length == 0 and cache.batch is None
    model(torch.randint(0, K, (2, 4)), cache=cache)
    assert len(cache.layers) == 3
    for keys, values in cache.layers:
        assert keys.shape == values.shape == (2, 4, 5, 32 // 4)  # (B, nh, S, hs)


def test_cache_misuse_is_refused():
    model = GPT(tiny_config())
    cache = model.new_cache()
    model(torch.randint(0, K, (2, 3)), cache=cache)
    with pytest.raises(ValueError, match=r"^tokens:"):
        model(torch.randint(0, K, (3, 1)), cache=cache)  # other batch
    with pytest.raises(ValueError, match=r"^tokens:"):
        model(torch.randint(0, K, (2, N - 3)), cache=cache)  # past the grid
    with pytest.raises(ValueError, match=r"^cache:"):
        model(torch.randint(0, K, (2, 1)), cache=KVCache([None]))


# ---------------------------------------------------------------------------------------------------
# Conditioning and the loss


def test_label_dropout_uses_the_null_class_in_training_mode_only():
    model = GPT(tiny_config(label_dropout=1.0))
    tokens = torch.randint(0, K, (4, 5))
    labels = torch.tensor([0, 1, 2, 3])
    torch.testing.assert_close(model(tokens, labels), model(tokens, None))  # train mode: all dropped
    model.eval()
    assert not torch.allclose(model(tokens, labels), model(tokens, None))


def test_gpt_loss_is_next_token_cross_entropy():
    model = GPT(tiny_config(label_smoothing=0.1)).eval()  # no label dropout
    indices, labels = synthetic_tokens(4)
    loss, stats = gpt_loss(model, indices, labels)
    logits = model(indices.flatten(1)[:, :-1], labels)
    expected = nn.functional.cross_entropy(logits.flatten(0, 1), indices.flatten(), label_smoothing=0.1)
    torch.testing.assert_close(loss, expected)
    assert set(stats) == {"loss", "accuracy"} and 0.0 <= stats["accuracy"].item() <= 1.0
    with pytest.raises(ValueError, match=r"^indices:"):
        gpt_loss(model, indices.flatten(1), labels)


# ---------------------------------------------------------------------------------------------------
# Training and sampling a tiny prior

TRAIN_STEPS = 100
# Measured: the loss falls from ln(16) = 2.78 to about 0.08 (ratio 0.03): after the first token
# the grid is determined by the class. Token 0 alone keeps ln(4) / 16 = 0.087 of irreducible loss,
# which training on 64 samples overfits slightly below.
MAX_LOSS_RATIO = 0.15


@pytest.fixture(scope="module")
def trained() -> tuple[GPT, float, float]:
    """A tiny GPT trained with AdamW on 64 synthetic grids: the model and its loss before and after."""
    torch.manual_seed(0)
    indices, labels = synthetic_tokens(64)
    model = GPT(tiny_config())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with torch.no_grad():
        initial = gpt_loss(model.eval(), indices, labels)[0].item()
    model.train()
    for _ in range(TRAIN_STEPS):
        loss, _ = gpt_loss(model, indices, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        final = gpt_loss(model.eval(), indices, labels)[0].item()
    return model, initial, final


def test_training_lowers_the_loss(trained):
    _, initial, final = trained
    assert initial == pytest.approx(math.log(K), rel=0.05)
    assert final < MAX_LOSS_RATIO * initial


def test_sampling_the_trained_prior_reproduces_its_classes(trained):
    model, _, _ = trained
    labels = torch.arange(32) % NUM_CLASSES
    tokens = autoregressive_sample(
        gpt_next_token_logits(model), 32, N, labels=labels, generator=torch.Generator().manual_seed(0)
    )
    exact = (tokens.view(32, *GRID).unsqueeze(1) == valid_grids(labels)).flatten(2).all(-1).any(-1)
    # Measured: about 95% of samples are exactly one of the four grids of their class.
    assert exact.float().mean() > 0.75
