"""Finite Scalar Quantization (Mentzer, Minnen, Agustsson, Tschannen, ICLR 2024)."""

from collections.abc import Sequence
from numbers import Integral

import torch
from torch import Tensor, nn

from imtok.quantizers.common import (
    FAST_PATH_FAILURES,
    QuantizerOutput,
    channel_index,
    check_channels,
    check_indices,
    codebook_stats,
    run_fast_path,
    under_dispatch_mode,
)

FUSED_PATH = "fused FSQ"

# The paper's Table 1: recommended levels per target codebook size.
RECOMMENDED_LEVELS: dict[int, tuple[int, ...]] = {
    2**8: (8, 6, 5),
    2**10: (8, 5, 5, 5),
    2**12: (7, 5, 5, 5, 5),
    2**14: (8, 8, 8, 6, 5),
    2**16: (8, 8, 8, 5, 5, 5),
}

# Widens the tanh range by a hair so the outermost levels are reached before tanh saturates;
# the same value as the paper's reference code, so odd-level indices agree with it.
BOUND_EPS = 1e-3

# The most levels a channel may have: a saturated tanh reaches eps * (L - 1) / 2 beyond the outermost
# level, which rounds back onto it only while that is at most 1/2 (at 1/2, round-half-to-even does).
MAX_LEVELS = 1001


def validate_levels(levels: Sequence[int]) -> list[int]:
    """Check that ``levels`` is a non-empty list of integers >= 2 and return it as a list."""
    if isinstance(levels, (str, bytes)) or not isinstance(levels, Sequence):
        raise ValueError(f"levels: expected a list of integers >= 2, got {levels!r}")
    if len(levels) == 0:
        raise ValueError("levels: expected a non-empty list of integers >= 2 (e.g. [8, 5, 5, 5]), got []")
    for position, level in enumerate(levels):
        if isinstance(level, bool) or not isinstance(level, Integral):
            raise ValueError(f"levels[{position}]: expected an integer >= 2, got {level!r}")
        if level < 2:
            raise ValueError(f"levels[{position}]: expected an integer >= 2, got {level}")
        if level > MAX_LEVELS:
            raise ValueError(
                f"levels[{position}]: {level} levels in one channel; at most {MAX_LEVELS} are supported "
                "(beyond that the bound, widened by BOUND_EPS, rounds a saturated latent past the "
                "outermost level). Spread the codebook over more channels with fewer levels each"
            )
    return [int(level) for level in levels]


class FSQ(nn.Module):
    """Finite Scalar Quantization: bound each channel, round it to one of ``levels[i]`` values.

    The implicit codebook is the product grid of the per-channel levels (``codebook_size`` =
    prod(levels)); there are no codebook parameters and no auxiliary loss.

    Bounding. For a channel with L levels the paper's bound is
    ``tanh(z + shift) * half_l - offset`` with ``half_l = (L - 1)(1 + eps) / 2``, ``offset = 0.5``
    for even L (0 for odd) and ``shift = atanh(offset / half_l)`` so that z = 0 maps to 0. (The
    paper's published code computes the shift with ``tan``, a slip its authors confirmed; we use
    atanh.) The bounded value is rounded with a straight-through gradient and scaled into [-1, 1].

    Odd L: both modes below are the paper's bound; levels {-(L-1)/2, ..., (L-1)/2}, symmetric.

    Even L, ``symmetric=True`` (default): levels sit symmetrically around 0 at the half-integers
    {-(L-1)/2, ..., (L-1)/2}, scaled so the codes span exactly [-1, 1] (L = 2 gives {-1, +1}).
    For z ~ N(0, 1) the level shares are balanced: L = 2 -> 50% / 50%,
    L = 4 -> 21% / 29% / 29% / 21%.

    Even L, ``symmetric=False``: the paper's exact bound. Its levels are the integers
    {-L/2, ..., L/2 - 1} divided by L/2, so the top code is 1 - 2/L, and the assignment is lopsided:
    for z ~ N(0, 1) and L = 2 the atanh shift (about 3.8) sends 99.99% of values to one level (about
    94% with the published tan shift of about 1.56); L = 4 gives 13% / 24% / 31% / 32%.

    Training noise (``noise_prob`` > 0, off by default): in training mode that fraction of the
    channel values is replaced by a uniform sample inside its level's bin (level + U(-1/2, 1/2) in
    level units) instead of the level itself, a dithered stand-in for rounding that spreads the
    decoder's input over each bin; indices always come from the rounded levels, and eval mode never
    adds noise.

    Quantization always runs in float32 (autocast is disabled inside) so that rounding and the
    integer index arithmetic are exact under bf16 autocast; codes are returned in the input dtype.

    Fused path (``fused``): the same arithmetic as one compiled forward kernel and one backward
    kernel (``imtok.quantizers.fsq_fused``). ``None`` (default) uses it on CUDA, where the eager
    path's one-kernel-per-op traffic dominates, and falls back to eager with a warning when it
    cannot compile; ``True`` uses it on any device (the first call of a process compiles, seconds
    to a minute); ``False`` never (``tokenizer.quantizer_options: {fused: false}`` in params).
    The eager path stays the reference, and it is used whatever ``fused`` says while training with
    ``noise_prob`` > 0 and inside a model that ``torch.compile`` is tracing (which fuses the eager
    ops itself).
    """

    def __init__(
        self,
        levels: Sequence[int],
        *,
        symmetric: bool = True,
        noise_prob: float = 0.0,
        fused: bool | None = None,
    ) -> None:
        super().__init__()
        self.levels = validate_levels(levels)
        if not 0.0 <= noise_prob <= 1.0:
            raise ValueError(f"noise_prob: expected a probability in [0, 1], got {noise_prob}")
        if fused not in (None, True, False):
            raise ValueError(f"fused: expected true, false or null (CUDA only), got {fused!r}")
        self.fused = fused
        self.symmetric = symmetric
        self.noise_prob = float(noise_prob)
        self.dim = len(self.levels)
        self.codebook_size = 1
        for level in self.levels:
            self.codebook_size *= level

        levels_f = torch.tensor(self.levels, dtype=torch.float64)
        is_even = levels_f.remainder(2) == 0
        half_l = (levels_f - 1) * (1 + BOUND_EPS) / 2
        if symmetric:
            offset = torch.zeros_like(levels_f)
            center = torch.where(is_even, 0.5, 0.0)  # even L rounds onto half-integers
            scale = (levels_f - 1) / 2
        else:
            offset = torch.where(is_even, 0.5, 0.0)
            center = torch.zeros_like(levels_f)
            scale = torch.floor(levels_f / 2)
        shift = torch.atanh(offset / half_l)
        self._paper_even_levels = bool((offset != 0).any())
        self._has_half_integer_levels = bool((center != 0).any())
        basis = torch.cumprod(torch.tensor([1, *self.levels[:-1]], dtype=torch.int64), dim=0)
        self._float_basis = [float(b) for b in basis] if self.codebook_size <= 2**24 else None

        def channel_buffer(name: str, values: Tensor) -> None:
            # (C, 1, 1), broadcasting over (B, C, H, W) latents: a 4-D (1, C, 1, 1) buffer would be
            # made channels_last with the model, strides that overlap, which DDP cannot broadcast into.
            self.register_buffer(name, values.view(-1, 1, 1), persistent=False)

        channel_buffer("_half_l", half_l.float())
        channel_buffer("_offset", offset.float())
        channel_buffer("_shift", shift.float())
        channel_buffer("_center", center.float())
        channel_buffer("_scale", scale.float())
        channel_buffer("_inverse_scale", (1 / scale).float())
        channel_buffer("_levels", levels_f.float())
        channel_buffer("_basis", basis)

    @staticmethod
    def levels_for(codebook_size: int) -> list[int]:
        """The paper's Table 1 levels for a target codebook size (2^8, 2^10, 2^12, 2^14, 2^16)."""
        if codebook_size not in RECOMMENDED_LEVELS:
            sizes = ", ".join(f"2^{size.bit_length() - 1}" for size in RECOMMENDED_LEVELS)
            raise ValueError(
                f"codebook_size: the FSQ paper recommends levels only for {sizes}; got {codebook_size}. "
                "Pass explicit levels instead (codebook size = product of levels)."
            )
        return list(RECOMMENDED_LEVELS[codebook_size])

    def bound(self, z: Tensor) -> Tensor:
        """Squash float32 latents (B, C, H, W) into each channel's level range, before rounding."""
        if self._paper_even_levels:
            return torch.tanh(z + self._shift) * self._half_l - self._offset
        return torch.tanh(z) * self._half_l

    def _round_to_levels(self, bounded: Tensor) -> Tensor:
        """Nearest level value of each bounded value (integers, or half-integers for symmetric even L).

        No clamp is needed: ``eps * (L - 1) / 2 <= 1/2`` for every L up to ``MAX_LEVELS``, so even a
        saturated tanh rounds onto the outermost level.
        """
        if self._has_half_integer_levels:
            return torch.round(bounded - self._center) + self._center
        return torch.round(bounded)

    def _indices_from_level_values(self, level_values: Tensor) -> Tensor:
        """Exact int64 indices (B, H, W) from level values (B, C, H, W) on the grid.

        A NaN latent (a diverged encoder) gets the middle level's digit, so its index stays a valid
        code id (casting NaN to an integer gives garbage, which the code counts would index with);
        its code stays NaN, so the loss shows the divergence.
        """
        level_values = torch.nan_to_num(level_values, nan=0.0)
        digits = level_values + self._scale  # small integers, exact in float32
        if self._has_half_integer_levels:  # NaN's 0.0 is off their grid: floor, as the int64 cast truncates
            digits = digits.floor_()
        if self._float_basis is None:  # a codebook past 2^24 codes: float32 sums would round
            return (digits.long() * self._basis).sum(dim=1)
        # One multiply-add per channel in float32 (exact below 2^24), cast once: on CPU a channel sum
        # over int64 digits took 25 of the forward's 27 ms (262,144 vectors, one thread), this 1.6.
        return channel_index(digits, self._float_basis)

    def _add_noise(self, level_values: Tensor) -> Tensor:
        """Replace a ``noise_prob`` fraction of level values by a uniform sample inside their bin."""
        replace = torch.rand_like(level_values) < self.noise_prob
        dithered = level_values + (torch.rand_like(level_values) - 0.5)
        return torch.where(replace, dithered, level_values)

    def uses_fused(self, z: Tensor) -> bool:
        """Whether ``forward(z)`` takes the fused path (see the class docstring); never under a Python
        dispatch mode such as ``FlopCounterMode`` (``under_dispatch_mode``)."""
        if (self.training and self.noise_prob > 0) or torch.compiler.is_compiling() or under_dispatch_mode():
            return False
        if self.fused is None:
            return z.is_cuda and FUSED_PATH not in FAST_PATH_FAILURES
        return self.fused

    def forward(self, z: Tensor) -> QuantizerOutput:
        """Quantize channel-first latents (B, C, H, W) with C == len(levels)."""
        codes, indices = self.quantize(z)
        stats = codebook_stats(indices, self.codebook_size)
        loss = torch.zeros((), device=z.device, dtype=torch.float32)
        return QuantizerOutput(codes.to(z.dtype), indices, loss, stats)

    def quantize(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Float32 codes (B, C, H, W) and indices (B, H, W) of latents z: ``forward`` without the
        statistics and the cast back to the input dtype."""
        check_channels(z, self.dim, "z")
        with torch.autocast(device_type=z.device.type, enabled=False):
            quantize = self._quantize_fused if self.uses_fused(z) else self._quantize_eager
            return quantize(z.float())

    def _quantize_eager(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """The reference path: codes (B, C, H, W) and indices (B, H, W) of float32 latents."""
        if not (z.requires_grad and torch.is_grad_enabled()) and not (self.training and self.noise_prob > 0):
            return self._quantize_inplace(z)
        bounded = self.bound(z)  # (B, C, H, W)
        rounded = self._round_to_levels(bounded).detach()
        indices = self._indices_from_level_values(rounded)  # (B, H, W)
        if self.training and self.noise_prob > 0:
            rounded = self._add_noise(rounded)
        level_values = bounded + (rounded - bounded).detach()  # straight-through rounding
        return level_values * self._inverse_scale, indices

    def _quantize_inplace(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``_quantize_eager``'s arithmetic, op for op, for latents that need no gradient (inference,
        token extraction): in place on two buffers instead of a fresh tensor per op, so the same
        values (bit for bit) in about half the memory traffic on CPU."""
        bounded = torch.tanh(z + self._shift) if self._paper_even_levels else torch.tanh(z)
        bounded.mul_(self._half_l)
        if self._paper_even_levels:
            bounded.sub_(self._offset)
        if self._has_half_integer_levels:
            rounded = torch.sub(bounded, self._center).round_().add_(self._center)
        else:
            rounded = torch.round(bounded)
        indices = self._indices_from_level_values(rounded)
        codes = rounded.sub_(bounded).add_(bounded)  # bounded + (rounded - bounded), as the STE gives
        return codes.mul_(self._inverse_scale), indices

    def _quantize_fused(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """The same arithmetic as ``_quantize_eager`` (without noise) in one compiled kernel each way.

        By default (``fused=None``) a compiler that fails here (no Triton, an unsupported GPU) is
        reported once and the eager path takes over for the rest of the process; asked for
        explicitly (``fused=True``), its error stands.
        """
        constants = (self._shift, self._half_l, self._offset, self._center, self._scale, self._inverse_scale)

        def fused() -> tuple[Tensor, Tensor]:
            from imtok.quantizers.fsq_fused import fused_fsq

            return fused_fsq(z, *constants, self._basis)

        return run_fast_path(FUSED_PATH, fused, lambda: self._quantize_eager(z), requested=bool(self.fused))

    def codes_to_indices(self, codes: Tensor) -> Tensor:
        """Exact integer indices (B, H, W) for codes (B, C, H, W) on the grid.

        Codes in a float type too coarse to tell neighbouring levels apart near +-1 (bfloat16 beyond 513
        levels in a channel) are refused: their indices would be wrong.
        """
        check_channels(codes, self.dim, "codes")
        if codes.is_floating_point() and torch.finfo(codes.dtype).eps * float(self._scale.max()) > 2:
            raise ValueError(
                f"codes: {codes.dtype} cannot tell apart the {max(self.levels)} levels of a channel; pass "
                "float32 codes (quantize float32 latents) to recover their indices"
            )
        with torch.autocast(device_type=codes.device.type, enabled=False):
            digits = torch.round(codes.float() * self._scale + self._scale).long()
            digits = digits.clamp_(min=0).minimum(self._levels.long() - 1)  # codes off the grid snap to it
            return (digits * self._basis).sum(dim=1)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """Codes (B, C, H, W) in [-1, 1] for integer indices (B, H, W)."""
        check_indices(indices, self.codebook_size)
        digits = (indices.long().unsqueeze(1) // self._basis) % self._levels.long()  # (B, C, H, W)
        return (digits.float() - self._scale) * self._inverse_scale

    @property
    def implicit_codebook(self) -> Tensor:
        """All ``codebook_size`` codes as a (K, C) float32 tensor, row k being the code of index k."""
        indices = torch.arange(self.codebook_size, device=self._basis.device).view(1, -1, 1)
        return self.indices_to_codes(indices)[0, :, :, 0].T  # (K, C)

    def extra_repr(self) -> str:
        return (
            f"levels={self.levels}, symmetric={self.symmetric}, noise_prob={self.noise_prob}, "
            f"fused={self.fused}"
        )
