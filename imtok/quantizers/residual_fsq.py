"""Residual FSQ: several FSQ stages, each quantizing what the stages before it left.

FSQ (Mentzer et al., ICLR 2024) rounds each bounded channel to one of L levels. In the residual scheme
(SoundStream, RQ-VAE), stage s quantizes the residual r_s = x - (q_0 + ... + q_{s-1}) on the same grid
shrunk by L^-s, so S stages of K = prod(levels) codes give K^S combinations at S tokens per position.
The arithmetic is vector-quantize-pytorch's ``ResidualFSQ`` (its indices agree, tested):

- the input is first softly bounded per channel, x = c * tanh(z / c) with c = 1 + 1 / (L - 1), so a
  latent may reach half a grid step beyond +-1 (the outermost bins keep their full width);
- stage s takes y = clamp(r_s * L^s, -1, 1) and rounds it onto the symmetric grid of L values in
  [-1, 1] (-1 + 2k / (L - 1), k = 0 .. L-1; half up on a tie), with a straight-through gradient;
  its code is that value times L^-s, and the residual passed on is r_s minus it (no gradient);
- the codes of all stages are summed. After stage 0 the residual is at most half a grid step,
  1 / (L - 1), which L^1 scales back to about the full range, and so on.

Each stage's index is the FSQ index of its grid digits (channel 0 the least significant), so every
stage has the same vocabulary of ``codebook_size`` = prod(levels) codes.

Indices are one per stage: ``forward`` returns int64 (B, S, H, W), stage 0 (the coarsest) first, and
``indices_to_codes`` takes the same. Token layout the priors see (``stack_stages``): the stages
stacked along the height, (B, S * H, W), rows 0 .. H-1 stage 0, the next H rows stage 1, and so on. A
raster-order prior (GPT) therefore predicts every coarse token of an image before any finer one, and
MaskGIT sees an S*H x W grid; the vocabulary is ``codebook_size`` per token. ``split_stages`` undoes it.

No auxiliary loss and no parameters; quantization runs in float32 under autocast.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from imtok.quantizers.common import (
    QuantizerOutput,
    channel_index,
    check_channels,
    check_indices,
    codebook_stats,
    require,
)
from imtok.quantizers.fsq import validate_levels

DEFAULT_STAGES = 2
MAX_STAGES = 8  # L^-s shrinks the grid geometrically: past a handful of stages it is below float32's step


def stack_stages(indices: Tensor) -> Tensor:
    """Token grid (B, S * H, W) of per-stage indices (B, S, H, W): stage 0's rows first."""
    if indices.ndim != 4:
        raise ValueError(f"indices: expected per-stage indices (B, S, H, W), got {tuple(indices.shape)}")
    return indices.flatten(1, 2)


def split_stages(tokens: Tensor, stages: int) -> Tensor:
    """Per-stage indices (B, S, H, W) of a token grid (B, S * H, W) written by ``stack_stages``."""
    if tokens.ndim != 3 or tokens.shape[1] % stages:
        raise ValueError(
            f"tokens: expected a token grid (B, {stages} * H, W) of {stages} residual stages stacked along "
            f"the height, got shape {tuple(tokens.shape)}"
        )
    return tokens.unflatten(1, (stages, tokens.shape[1] // stages))


class ResidualFSQ(nn.Module):
    """``stages`` FSQ stages of ``levels`` on successively finer grids (see the module docstring).

    ``forward(z)`` on channel-first latents (B, len(levels), H, W) returns ``QuantizerOutput``: the sum
    of the stages' straight-through codes, int64 indices (B, S, H, W), a zero loss and statistics
    (usage and perplexity over all stages' codes together).
    """

    def __init__(self, levels: Sequence[int], *, stages: int = DEFAULT_STAGES) -> None:
        super().__init__()
        self.levels = validate_levels(levels)
        require(
            isinstance(stages, int) and not isinstance(stages, bool) and 1 <= stages <= MAX_STAGES,
            "stages",
            f"an integer from 1 to {MAX_STAGES}",
            stages,
        )
        self.stages = stages
        self.dim = len(self.levels)
        self.codebook_size = math.prod(self.levels)
        levels_f = torch.tensor(self.levels, dtype=torch.float64)
        half = (levels_f - 1) / 2  # grid steps per unit: value = digit / half - 1
        basis = torch.cumprod(torch.tensor([1, *self.levels[:-1]], dtype=torch.int64), dim=0)
        self._float_basis = [float(b) for b in basis] if self.codebook_size <= 2**24 else None
        scales = torch.stack([levels_f ** (-stage) for stage in range(stages)])  # (S, C)

        def buffer(name: str, values: Tensor) -> None:  # (..., C, 1, 1): broadcasts over (B, C, H, W)
            self.register_buffer(name, values.unsqueeze(-1).unsqueeze(-1), persistent=False)

        buffer("_half", half.float())
        buffer("_bound", (1 + 1 / (levels_f - 1)).float())
        buffer("_levels", levels_f.float())
        buffer("_basis", basis)
        buffer("_scales", scales.float())

    def _index(self, digits: Tensor) -> Tensor:
        """Int64 indices (B, H, W) of integer float digits (B, C, H, W), channel 0 least significant."""
        if self._float_basis is None:
            return (digits.long() * self._basis).sum(dim=1)
        return channel_index(digits, self._float_basis)

    def forward(self, z: Tensor) -> QuantizerOutput:
        """Quantize channel-first latents (B, C, H, W) with C == len(levels)."""
        check_channels(z, self.dim, "z")
        with torch.autocast(device_type=z.device.type, enabled=False):
            residual = torch.tanh(z.float() / self._bound) * self._bound
            quantized = torch.zeros_like(residual)
            indices = []
            for stage in range(self.stages):
                scale = self._scales[stage]
                scaled = (residual / scale).clamp(-1.0, 1.0)
                digits = torch.floor((scaled.detach() + 1) * self._half + 0.5)
                digits = torch.nan_to_num(digits, nan=0.0).clamp_(min=0).minimum(self._levels - 1)
                grid = digits / self._half - 1
                code = (scaled + (grid - scaled).detach()) * scale  # straight-through rounding
                residual = residual - code.detach()
                quantized = quantized + code
                indices.append(self._index(digits))
            stacked = torch.stack(indices, dim=1)  # (B, S, H, W)
            stats = codebook_stats(stacked, self.codebook_size)
        loss = torch.zeros((), device=z.device, dtype=torch.float32)
        return QuantizerOutput(quantized.to(z.dtype), stacked, loss, stats)

    def check_stage_indices(self, indices: Tensor) -> None:
        """Raise a ValueError naming the shape unless ``indices`` is (B, stages, H, W) of valid codes."""
        if indices.ndim != 4 or indices.shape[1] != self.stages:
            raise ValueError(
                f"indices: expected one index per stage, shape (B, {self.stages}, H, W), got "
                f"{tuple(indices.shape)}; a token grid (B, {self.stages} * H, W) goes through split_stages"
            )
        check_indices(indices.flatten(1, 2), self.codebook_size)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """Summed codes (B, C, H, W) of per-stage indices (B, S, H, W)."""
        self.check_stage_indices(indices)
        digits = (indices.long().unsqueeze(2) // self._basis) % self._levels.long()  # (B, S, C, H, W)
        return ((digits.float() / self._half - 1) * self._scales).sum(dim=1)

    def extra_repr(self) -> str:
        return f"levels={self.levels}, stages={self.stages}, codebook_size={self.codebook_size} per stage"
