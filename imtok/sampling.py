"""Sampling from token priors: MaskGIT parallel decoding and autoregressive sampling.

Every sampler takes a function that maps tokens to logits, never a model, so each can be tested with
a hand-written function and used with any network that fits the interface:

- ``maskgit_decode`` takes ``tokens_to_logits(tokens (B, h, w), labels (B,) | None) -> (B, h, w, K)``;
  a ``MaskGIT`` module is such a function (``labels=None`` selects its null class).
- ``autoregressive_sample`` takes ``next_token_logits(tokens, labels, cache) -> (logits (B, K), cache)``
  (see ``NextTokenLogits``); ``gpt_next_token_logits(model)`` builds one from a ``GPT``.

Put the model in eval mode first (dropout and label dropout are training-time only). All randomness
comes from ``generator``, so a seeded generator gives the same tokens every time; it must live on
the device the tokens are made on.

Classifier-free guidance (Ho and Salimans 2022; the scale convention of Muse and of Chang et al.'s
follow-ups): with conditional logits ``c`` (the given labels) and unconditional logits ``u`` (labels
``None``: the null class), the guided logits are ``c + scale * (c - u)`` = ``u + (1 + scale)(c - u)``.
``guidance_scale = 0`` is the plain conditional model: the unconditional pass is then skipped, so the
result equals unguided sampling exactly.
"""

import math
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor

from imtok.models.maskgit import mask_ratio

TokensToLogits = Callable[[Tensor, Tensor | None], Tensor]


class NextTokenLogits(Protocol):
    """``(tokens, labels, cache) -> (logits (B, K) for the next token, cache)``.

    ``cache`` is None: ``tokens`` (B, t) are all the tokens sampled so far (t may be 0); return the
    logits of token t and a cache of what was read, or None when the function keeps no cache.
    ``cache`` given: ``tokens`` (B, n) are the tokens sampled since that cache was returned (the
    sampler sends the last one, n = 1); return the logits of the next token and the updated cache.
    """

    def __call__(self, tokens: Tensor, labels: Tensor | None, cache: Any) -> tuple[Tensor, Any]: ...


def _require(ok: bool, name: str, allowed: str, value: object) -> None:
    if not ok:
        raise ValueError(f"{name}: expected {allowed}, got {value!r}")


def _default_device(device: torch.device | str | None, generator: torch.Generator | None) -> torch.device:
    """``device`` if given, else the generator's device, else the CPU."""
    if device is not None:
        return torch.device(device)
    return generator.device if generator is not None else torch.device("cpu")


# ---------------------------------------------------------------------------------------------------
# Shared pieces: guidance, filtering, categorical sampling


def guided_logits(conditional: Tensor, unconditional: Tensor | None, guidance_scale: float) -> Tensor:
    """Classifier-free guidance: ``c + scale * (c - u)``; ``c`` itself when the scale is 0."""
    if guidance_scale == 0 or unconditional is None:
        return conditional
    return conditional + guidance_scale * (conditional - unconditional)


def _check_guidance(guidance_scale: float, labels: Tensor | None) -> None:
    _require(guidance_scale >= 0, "guidance_scale", "a number >= 0 (0: no guidance)", guidance_scale)
    if guidance_scale != 0 and labels is None:
        raise ValueError(
            "guidance_scale: classifier-free guidance mixes conditional and unconditional logits, "
            "so it needs labels; pass labels or set guidance_scale=0"
        )


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the ``k`` largest logits of the last dimension (ties broken by position), -inf elsewhere."""
    _require(k >= 1, "top_k", "an integer >= 1 (or None to switch it off)", k)
    if k >= logits.shape[-1]:
        return logits
    kept = logits.topk(k, dim=-1).indices
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, kept, True)
    return logits.masked_fill(~keep, -math.inf)


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus filtering: keep the fewest most probable tokens whose probability sums to at least ``p``.

    The most probable token is always kept; the rest of the last dimension becomes -inf.
    """
    _require(0 < p <= 1, "top_p", "a probability in (0, 1] (or None to switch it off)", p)
    if p >= 1:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.float().softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the more likely tokens
    drop_sorted = mass_before >= p  # the kept set already reaches p without this token
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, -math.inf)


def gumbel_noise(
    shape: torch.Size | tuple[int, ...],
    generator: torch.Generator | None,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Standard Gumbel samples -log(-log(u)), u ~ U(0, 1), drawn from ``generator``."""
    uniform = torch.rand(shape, generator=generator, device=device, dtype=dtype)
    # In place: one tensor for the whole chain, which matters at (rows, 16384-code) sizes. The floor
    # (the dtype's smallest normal number) keeps -log(-log(u)) finite when u is exactly 0.
    return uniform.clamp_min_(torch.finfo(dtype).tiny).log_().neg_().log_().neg_()


def sample_categorical(
    logits: Tensor, temperature: float = 1.0, generator: torch.Generator | None = None
) -> Tensor:
    """One id per row of ``logits`` (..., K) from softmax(logits / temperature); argmax if temperature is 0.

    Uses the Gumbel-max trick, so the draw is a pure function of the generator state.
    """
    _require(temperature >= 0, "temperature", "a number >= 0 (0: greedy)", temperature)
    if temperature == 0:
        return logits.argmax(dim=-1)
    # float32 noise (float64 for float64 logits), so the sum is never rounded below float32.
    dtype = torch.promote_types(logits.dtype, torch.float32)
    noise = gumbel_noise(logits.shape, generator, logits.device, dtype)
    return noise.add_(logits, alpha=1.0 / temperature).argmax(dim=-1)


# ---------------------------------------------------------------------------------------------------
# MaskGIT parallel decoding


def maskgit_schedule(num_tokens: int, steps: int) -> list[int]:
    """Tokens still masked after each of ``steps`` steps, starting from ``num_tokens`` masked ones.

    Follows the cosine schedule, floor(N * cos(pi/2 * (t + 1) / T)) after step t, clamped so that
    every step commits at least one token and at least one stays masked until the last step, which
    ends at 0. Needs 1 <= steps <= num_tokens.
    """
    _require(num_tokens >= 1, "num_tokens", "an integer >= 1", num_tokens)
    _require(
        1 <= steps <= num_tokens,
        "steps",
        f"an integer in [1, {num_tokens}] (one token per step at least)",
        steps,
    )
    remaining, previous = [], num_tokens
    for step in range(steps):
        target = math.floor(num_tokens * mask_ratio((step + 1) / steps))
        later_steps = steps - 1 - step  # each still needs a masked token to commit
        previous = min(max(target, later_steps), previous - 1)
        remaining.append(previous)
    remaining[-1] = 0
    return remaining


@torch.no_grad()
def maskgit_decode(
    tokens_to_logits: TokensToLogits,
    batch: int,
    grid: tuple[int, int],
    mask_id: int,
    steps: int = 8,
    temperature: float = 1.0,
    choice_temperature: float = 4.5,
    guidance_scale: float = 0.0,
    labels: Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """MaskGIT iterative parallel decoding; returns int64 tokens (B, h, w) with no ``mask_id`` left.

    Starting from an all-MASK grid, each step t of T:
    1. computes (guided) logits for the grid and samples every masked position from
       softmax(logits / temperature) (argmax when temperature is 0);
    2. scores each new token by its log-probability under the model (softmax of the guided logits,
       untempered, as in the reference implementation) plus Gumbel noise scaled by
       ``choice_temperature * (1 - (t + 1) / T)``, annealed linearly to 0 at the last step;
       committed tokens score +inf;
    3. keeps the ``maskgit_schedule(N, T)[t]`` lowest-scoring positions masked and commits the rest.

    ``labels`` (B,) are passed to ``tokens_to_logits``; with ``guidance_scale`` > 0 it is also called
    with ``None`` for the unconditional logits (see the module docstring). ``device`` defaults to the
    generator's device.
    """
    h, w = grid
    num_tokens = h * w
    schedule = maskgit_schedule(num_tokens, steps)
    _require(temperature >= 0, "temperature", "a number >= 0 (0: greedy)", temperature)
    _require(choice_temperature >= 0, "choice_temperature", "a number >= 0", choice_temperature)
    _check_guidance(guidance_scale, labels)
    device = _default_device(device, generator)
    tokens = torch.full((batch, num_tokens), mask_id, dtype=torch.long, device=device)  # (B, N)
    for step, still_masked in enumerate(schedule):
        grid_tokens = tokens.view(batch, h, w)
        conditional = tokens_to_logits(grid_tokens, labels).float()
        unconditional = tokens_to_logits(grid_tokens, None).float() if guidance_scale != 0 else None
        logits = guided_logits(conditional, unconditional, guidance_scale).reshape(batch, num_tokens, -1)
        if mask_id < logits.shape[-1]:
            raise ValueError(
                f"mask_id: {mask_id} is a code the logits can predict ({logits.shape[-1]} logits); "
                "the MASK id must be >= the codebook size"
            )
        masked = tokens == mask_id  # (B, N)
        # Only the M masked positions are drawn and scored: at a large codebook the (M, K) passes
        # (noise, argmax, logsumexp) are the cost of a step, and M shrinks with every step.
        masked_logits = logits[masked]  # (M, K), row-major order of the masked positions
        drawn = sample_categorical(masked_logits, temperature, generator)  # (M,)
        sampled = tokens.masked_scatter(masked, drawn)  # (B, N)
        if still_masked == 0:
            return sampled.view(batch, h, w)
        # log p(drawn) = logit - logsumexp(logits), without materialising the (M, K) log-softmax.
        log_probs = masked_logits.gather(-1, drawn.unsqueeze(-1)).squeeze(-1) - masked_logits.logsumexp(-1)
        noise_scale = choice_temperature * (1 - (step + 1) / steps)
        scores = log_probs + noise_scale * gumbel_noise(log_probs.shape, generator, device)  # (M,)
        confidence = torch.full(masked.shape, math.inf, device=device).masked_scatter(masked, scores)
        least_confident = confidence.argsort(dim=1, stable=True)[:, :still_masked]  # (B, still_masked)
        remask = torch.zeros_like(masked).scatter(1, least_confident, True)
        tokens = sampled.masked_fill(remask, mask_id)
    raise AssertionError("maskgit_schedule always ends at 0")  # pragma: no cover


# ---------------------------------------------------------------------------------------------------
# Autoregressive sampling


def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Apply top-k, then top-p filtering; None switches a filter off."""
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    return logits


@torch.no_grad()
def autoregressive_sample(
    next_token_logits: NextTokenLogits,
    batch: int,
    num_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    guidance_scale: float = 0.0,
    labels: Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    use_cache: bool = True,
) -> Tensor:
    """Sample ``num_tokens`` tokens one at a time; returns int64 (B, num_tokens) in raster order.

    Each step computes the (guided) next-token logits, divides them by ``temperature``, filters them
    by ``top_k`` and ``top_p`` and draws one token (argmax when temperature is 0). With ``use_cache``
    the function's cache is passed back with only the newest token; without it every call re-reads
    the whole prefix (cache None). Both give the same tokens for the same generator state. With
    ``guidance_scale`` > 0 an unconditional stream (labels None) with its own cache runs beside the
    conditional one. Reshape the result to the token grid with ``.view(B, h, w)``.
    """
    _require(num_tokens >= 1, "num_tokens", "an integer >= 1", num_tokens)
    _require(temperature >= 0, "temperature", "a number >= 0 (0: greedy)", temperature)
    _check_guidance(guidance_scale, labels)
    device = _default_device(device, generator)
    stream_labels = [labels, None] if guidance_scale != 0 else [labels]
    caches: list[Any] = [None] * len(stream_labels)
    tokens = torch.empty(batch, 0, dtype=torch.long, device=device)  # (B, t)
    for _ in range(num_tokens):
        stream_logits = []
        for stream, stream_label in enumerate(stream_labels):
            cache = caches[stream]
            feed = tokens if cache is None else tokens[:, -1:]
            logits, cache = next_token_logits(feed, stream_label, cache)
            caches[stream] = cache if use_cache else None
            stream_logits.append(logits.float())  # (B, K)
        unconditional = stream_logits[1] if len(stream_logits) > 1 else None
        logits = guided_logits(stream_logits[0], unconditional, guidance_scale)
        if temperature > 0:
            logits = filter_logits(logits / temperature, top_k, top_p)
        next_token = sample_categorical(logits, 1.0 if temperature > 0 else 0.0, generator)  # (B,)
        tokens = torch.cat([tokens, next_token.unsqueeze(1)], dim=1)
    return tokens


def gpt_next_token_logits(model: torch.nn.Module, use_cache: bool = True) -> NextTokenLogits:
    """A ``NextTokenLogits`` function for a ``GPT`` prior (in eval mode), with or without its KV cache."""

    def next_token_logits(tokens: Tensor, labels: Tensor | None, cache: Any) -> tuple[Tensor, Any]:
        if cache is None and use_cache:
            cache = model.new_cache()
        logits = model(tokens, labels, cache=cache)  # (B, T, K)
        return logits[:, -1], cache

    return next_token_logits
