"""Properties of the samplers: MaskGIT schedule and decoding, guidance, filters, cached AR sampling."""

import itertools
import math
from collections.abc import Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from imtok.models.gpt import GPT, GPTConfig
from imtok.sampling import (
    autoregressive_sample,
    gpt_next_token_logits,
    guided_logits,
    maskgit_decode,
    maskgit_schedule,
    sample_categorical,
    top_k_filter,
    top_p_filter,
)

K = 12  # codebook size of the hand-written logits functions
GRID = (3, 4)
NUM_CLASSES = 3


class FakeMaskGIT:
    """A fixed, input-dependent logits function (B, h, w) -> (B, h, w, K) that records its calls."""

    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        num_tokens = GRID[0] * GRID[1]
        self.base = torch.randn(num_tokens, K, generator=g) * 2
        self.mixing = torch.randn(K + 1, K, generator=g)  # how each visible token (or MASK) shifts logits
        self.class_bias = torch.randn(NUM_CLASSES + 1, K, generator=g) * 2  # last row: labels None
        self.calls: list[tuple[torch.Tensor, torch.Tensor | None]] = []

    def __call__(self, tokens: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        self.calls.append((tokens.clone(), None if labels is None else labels.clone()))
        batch = tokens.shape[0]
        context = self.mixing[tokens.flatten(1)].mean(dim=1, keepdim=True)  # (B, 1, K)
        rows = torch.full((batch,), NUM_CLASSES) if labels is None else labels
        logits = self.base + context + self.class_bias[rows].unsqueeze(1)  # (B, N, K)
        return logits.view(batch, *GRID, K)


@pytest.fixture(autouse=True, scope="module")
def one_thread_for_this_module() -> Iterator[None]:
    """Tiny models are bound by per-op overhead: one thread is as fast and never fights a busy core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def decode(fake, seed=0, **options):
    generator = torch.Generator().manual_seed(seed)
    return maskgit_decode(fake, 5, GRID, mask_id=K, generator=generator, **options)


# ---------------------------------------------------------------------------------------------------
# The schedule


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 400), st.data())
def test_schedule_decreases_strictly_to_zero_and_keeps_a_mask_until_the_end(num_tokens, data):
    steps = data.draw(st.integers(1, min(num_tokens, 40)))
    schedule = maskgit_schedule(num_tokens, steps)
    assert len(schedule) == steps
    assert schedule[-1] == 0
    counts = [num_tokens, *schedule]
    assert all(after < before for before, after in itertools.pairwise(counts))  # >= 1 per step
    assert all(left >= 1 for left in schedule[:-1])


def test_schedule_is_the_cosine_where_no_clamp_is_needed():
    expected = [math.floor(256 * math.cos(math.pi / 2 * (t + 1) / 8)) for t in range(8)]
    assert maskgit_schedule(256, 8) == expected == [251, 236, 212, 181, 142, 97, 49, 0]
    assert maskgit_schedule(4, 4) == [3, 2, 1, 0]  # clamped to one token per step
    assert maskgit_schedule(5, 1) == [0]


@pytest.mark.parametrize(
    ("num_tokens", "steps", "key"), [(4, 5, "steps"), (4, 0, "steps"), (0, 1, "num_tokens")]
)
def test_schedule_rejects_impossible_step_counts(num_tokens, steps, key):
    with pytest.raises(ValueError, match=rf"^{key}:"):
        maskgit_schedule(num_tokens, steps)


# ---------------------------------------------------------------------------------------------------
# MaskGIT decoding


@pytest.mark.parametrize("steps", [1, 3, 8, 12])
def test_masked_count_after_each_step_follows_the_schedule(steps):
    fake = FakeMaskGIT()
    tokens = decode(fake, steps=steps)
    num_tokens = GRID[0] * GRID[1]
    seen = [int((call_tokens == K).sum(dim=(1, 2)).unique().item()) for call_tokens, _ in fake.calls]
    assert seen == [num_tokens, *maskgit_schedule(num_tokens, steps)[:-1]]  # every sample alike
    assert tokens.shape == (5, *GRID) and tokens.dtype == torch.long
    assert not (tokens == K).any() and int(tokens.min()) >= 0 and int(tokens.max()) < K


def test_committed_tokens_are_never_changed():
    fake = FakeMaskGIT()
    final = decode(fake, steps=6)
    inputs = [call_tokens for call_tokens, _ in fake.calls] + [final]
    for before, after in itertools.pairwise(inputs):
        committed = before != K
        assert torch.equal(after[committed], before[committed])


def test_same_seed_same_tokens_and_different_seeds_differ():
    first = decode(FakeMaskGIT(), seed=3, labels=torch.tensor([0, 1, 2, 0, 1]))
    again = decode(FakeMaskGIT(), seed=3, labels=torch.tensor([0, 1, 2, 0, 1]))
    other = decode(FakeMaskGIT(), seed=4, labels=torch.tensor([0, 1, 2, 0, 1]))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_greedy_decoding_without_choice_noise_takes_the_argmax_of_the_final_logits():
    class Constant:
        def __call__(self, tokens, labels):
            return logits.expand(tokens.shape[0], -1, -1, -1)

    logits = torch.randn(1, *GRID, K)
    tokens = decode(Constant(), temperature=0.0, choice_temperature=0.0, steps=4)
    assert torch.equal(tokens, logits.argmax(-1).expand(5, -1, -1))


def test_guidance_scale_zero_is_the_plain_conditional_path():
    labels = torch.tensor([0, 1, 2, 2, 1])

    class ConditionalOnly(FakeMaskGIT):
        def __call__(self, tokens, labels):
            assert labels is not None, "no unconditional call without guidance"
            return super().__call__(tokens, labels)

    plain = decode(ConditionalOnly(), labels=labels)
    unguided = decode(ConditionalOnly(), labels=labels, guidance_scale=0.0)
    assert torch.equal(plain, unguided)
    guided_fake = FakeMaskGIT()
    guided = decode(guided_fake, labels=labels, guidance_scale=3.0)
    assert any(call_labels is None for _, call_labels in guided_fake.calls)
    assert not torch.equal(plain, guided)


def test_guided_logits_convention():
    conditional, unconditional = torch.randn(2, 7), torch.randn(2, 7)
    assert guided_logits(conditional, unconditional, 0.0) is conditional
    expected = unconditional + 3.5 * (conditional - unconditional)
    torch.testing.assert_close(guided_logits(conditional, unconditional, 2.5), expected)


def test_decode_argument_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"^guidance_scale:"):
        decode(FakeMaskGIT(), guidance_scale=1.0)  # no labels to guide towards
    with pytest.raises(ValueError, match=r"^mask_id:"):
        maskgit_decode(FakeMaskGIT(), 2, GRID, mask_id=K - 1)
    with pytest.raises(ValueError, match=r"^steps:"):
        decode(FakeMaskGIT(), steps=GRID[0] * GRID[1] + 1)
    with pytest.raises(ValueError, match=r"^temperature:"):
        decode(FakeMaskGIT(), temperature=-1.0)


# ---------------------------------------------------------------------------------------------------
# Filters and categorical sampling


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5], [5.0, 4.0, 3.0, 2.0, 1.0]])
    kept = torch.isfinite(top_k_filter(logits, 2))
    assert kept.tolist() == [[False, True, False, True, False], [True, True, False, False, False]]
    assert torch.equal(top_k_filter(logits, 5), logits)
    assert torch.equal(top_k_filter(logits, 1).argmax(-1), logits.argmax(-1))
    with pytest.raises(ValueError, match=r"^top_k:"):
        top_k_filter(logits, 0)


@pytest.mark.parametrize(
    ("p", "kept"),
    [(0.3, {2}), (0.45, {2}), (0.7, {2, 0}), (0.9, {2, 0, 3}), (0.99, {0, 1, 2, 3}), (1.0, {0, 1, 2, 3})],
)
def test_top_p_keeps_the_smallest_set_reaching_p(p, kept):
    probs = torch.tensor([0.3, 0.05, 0.5, 0.15])  # sorted: index 2, 0, 3, 1
    filtered = top_p_filter(probs.log().unsqueeze(0), p)[0]
    assert set(torch.isfinite(filtered).nonzero().flatten().tolist()) == kept
    assert torch.equal(filtered[list(kept)], probs.log()[list(kept)])  # survivors are untouched


def test_top_p_rejects_out_of_range():
    with pytest.raises(ValueError, match=r"^top_p:"):
        top_p_filter(torch.zeros(1, 3), 0.0)


def test_sample_categorical_follows_softmax_of_tempered_logits():
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0])
    generator = torch.Generator().manual_seed(0)
    draws = sample_categorical(logits.expand(40_000, -1), temperature=2.0, generator=generator)
    frequencies = torch.bincount(draws, minlength=4).float() / draws.numel()
    torch.testing.assert_close(frequencies, (logits / 2.0).softmax(-1), atol=0.01, rtol=0)


# ---------------------------------------------------------------------------------------------------
# Autoregressive sampling


class FakeNextToken:
    """Hand-written next-token logits from the whole prefix; keeps the prefix itself as its 'cache'."""

    def __init__(self, keep_cache: bool = True) -> None:
        g = torch.Generator().manual_seed(1)
        self.weights = torch.randn(K, K, generator=g)
        self.start = torch.randn(NUM_CLASSES + 1, K, generator=g) * 2
        self.keep_cache = keep_cache
        self.fed_lengths: list[int] = []

    def __call__(self, tokens, labels, cache):
        self.fed_lengths.append(tokens.shape[1])
        prefix = tokens if cache is None else torch.cat([cache, tokens], dim=1)
        rows = torch.full((tokens.shape[0],), NUM_CLASSES) if labels is None else labels
        logits = self.start[rows] + self.weights[prefix].sum(dim=1) / (1 + prefix.shape[1])
        return logits, (prefix if self.keep_cache else None)


def ar_sample(next_token_logits, seed=0, **options):
    generator = torch.Generator().manual_seed(seed)
    return autoregressive_sample(next_token_logits, 4, 10, generator=generator, **options)


def test_ar_sampler_feeds_only_the_new_token_when_a_cache_comes_back():
    cached, uncached = FakeNextToken(), FakeNextToken(keep_cache=False)
    tokens = ar_sample(cached)
    assert cached.fed_lengths == [0] + [1] * 9
    assert torch.equal(ar_sample(uncached), tokens)
    assert uncached.fed_lengths == list(range(10))
    assert tokens.shape == (4, 10) and int(tokens.max()) < K


def test_ar_same_seed_same_tokens_different_seeds_differ():
    labels = torch.tensor([0, 1, 2, 1])
    first = ar_sample(FakeNextToken(), seed=5, labels=labels, top_k=6)
    assert torch.equal(first, ar_sample(FakeNextToken(), seed=5, labels=labels, top_k=6))
    assert not torch.equal(first, ar_sample(FakeNextToken(), seed=6, labels=labels, top_k=6))


def test_ar_guidance_scale_zero_is_the_plain_conditional_path():
    labels = torch.tensor([0, 1, 2, 1])

    class ConditionalOnly(FakeNextToken):
        def __call__(self, tokens, labels, cache):
            assert labels is not None, "no unconditional call without guidance"
            return super().__call__(tokens, labels, cache)

    plain = ar_sample(ConditionalOnly(), labels=labels)
    assert torch.equal(plain, ar_sample(ConditionalOnly(), labels=labels, guidance_scale=0.0))
    assert not torch.equal(plain, ar_sample(FakeNextToken(), labels=labels, guidance_scale=4.0))


def test_ar_greedy_top_1_and_temperature_0_agree():
    greedy = ar_sample(FakeNextToken(), temperature=0.0)
    assert torch.equal(greedy, ar_sample(FakeNextToken(), seed=9, top_k=1))
    assert torch.equal(greedy, ar_sample(FakeNextToken(), seed=9, top_p=1e-6))


@pytest.fixture(scope="module")
def tiny_gpt() -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(
        codebook_size=K, grid=GRID, num_classes=NUM_CLASSES, hidden_dim=32, depth=2, heads=4, dropout=0.0
    )
    return GPT(config).eval()


@pytest.mark.parametrize(
    "options",
    [{}, {"top_k": 5}, {"top_p": 0.8, "temperature": 0.7}, {"guidance_scale": 2.0}, {"temperature": 0.0}],
)
def test_gpt_sampling_with_kv_cache_gives_the_same_tokens_as_without(tiny_gpt, options):
    labels = torch.tensor([0, 2, 1, 0])
    num_tokens = GRID[0] * GRID[1]
    runs = {}
    for use_cache in (True, False):
        generator = torch.Generator().manual_seed(11)
        runs[use_cache] = autoregressive_sample(
            gpt_next_token_logits(tiny_gpt, use_cache=use_cache),
            4,
            num_tokens,
            labels=labels,
            generator=generator,
            use_cache=use_cache,
            **options,
        )
    assert torch.equal(runs[True], runs[False])
    assert runs[True].shape == (4, num_tokens)


def test_ar_argument_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"^guidance_scale:"):
        ar_sample(FakeNextToken(), guidance_scale=1.0)
    with pytest.raises(ValueError, match=r"^temperature:"):
        ar_sample(FakeNextToken(), temperature=-0.5)
    with pytest.raises(ValueError, match=r"^num_tokens:"):
        autoregressive_sample(FakeNextToken(), 2, 0)
