"""FSQ's quantization as two fused elementwise kernels: one forward, one backward (torch.compile).

The eager FSQ runs about ten elementwise ops forward, each a kernel that reads and writes the whole
latent tensor, which keeps it 15-25x off the memory floor on a GPU. Here the forward (bound, round,
straight-through codes and the integer indices) is one compiled function, so it reads z once and
writes the codes and indices once; the backward recomputes tanh from z and is one more kernel. The
arithmetic is the eager path's, op for op, but the compiler may use its own tanh and contract
multiply-adds, so a value within an ulp of a rounding boundary can, rarely, land on the other level;
everywhere else indices are identical and codes agree to float32 rounding
(``tests/test_fsq_fused.py`` compares the two).

The constants are the ``FSQ`` module's per-channel buffers, (1, C, 1, 1) each. With the symmetric
bound, ``shift`` and ``offset`` are 0 and the formula below reduces to the eager ``tanh(z) * half_l``
exactly; ``center`` is 0.5 for even levels (half-integer grid) and 0 otherwise.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor


def fsq_forward_math(
    z: Tensor,
    shift: Tensor,
    half_l: Tensor,
    offset: Tensor,
    center: Tensor,
    scale: Tensor,
    inverse_scale: Tensor,
    basis: Tensor,
) -> tuple[Tensor, Tensor]:
    """Codes (B, C, H, W) in [-1, 1] and int64 indices (B, H, W) of float32 latents z (B, C, H, W)."""
    bounded = torch.tanh(z + shift) * half_l - offset
    rounded = torch.round(bounded - center) + center
    # NaN latents get the middle level's digit, as in the eager path: indices stay valid code ids
    indices = ((torch.nan_to_num(rounded, nan=0.0) + scale).long() * basis).sum(dim=1)
    codes = (bounded + (rounded - bounded)) * inverse_scale  # the straight-through value, as eager
    return codes, indices


def fsq_backward_math(
    grad_codes: Tensor, z: Tensor, shift: Tensor, half_l: Tensor, inverse_scale: Tensor
) -> Tensor:
    """d loss / d z through the straight-through rounding: only the tanh bound has a derivative."""
    slope = 1 - torch.tanh(z + shift).pow(2)
    return grad_codes * inverse_scale * half_l * slope


@functools.cache
def compiled(name: str) -> Any:
    """The compiled kernel ``forward`` or ``backward``, built on first use (dynamic batch shapes)."""
    function = {"forward": fsq_forward_math, "backward": fsq_backward_math}[name]
    return torch.compile(function, dynamic=True, fullgraph=True)


class FusedFSQ(torch.autograd.Function):
    """``apply(z, shift, half_l, offset, center, scale, inverse_scale, basis) -> (codes, indices)``."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, shift: Tensor, half_l: Tensor, offset: Tensor, center: Tensor,
                scale: Tensor, inverse_scale: Tensor, basis: Tensor) -> tuple[Tensor, Tensor]:  # fmt: skip
        # Batch and spatial sizes stay symbolic; the channel count is fixed per FSQ, so the kernel
        # specialises on it and unrolls the sum over channels. Detached: whether z requires grad
        # (training) or not (inference) would otherwise be a guard, and each FSQ would compile twice,
        # filling dynamo's recompile limit of 8 with four channel counts.
        z = z.detach()
        torch._dynamo.mark_static(z, 1)
        codes, indices = compiled("forward")(z, shift, half_l, offset, center, scale, inverse_scale, basis)
        ctx.save_for_backward(z, shift, half_l, inverse_scale)
        ctx.mark_non_differentiable(indices)
        return codes, indices

    @staticmethod
    def backward(ctx: Any, grad_codes: Tensor, _grad_indices: Tensor | None) -> tuple[Tensor | None, ...]:
        z, shift, half_l, inverse_scale = ctx.saved_tensors
        grad_codes = grad_codes.contiguous()
        torch._dynamo.mark_static(grad_codes, 1)
        grad_z = compiled("backward")(grad_codes, z, shift, half_l, inverse_scale)
        return (grad_z, None, None, None, None, None, None, None)


# ``fused_fsq(z, shift, half_l, offset, center, scale, inverse_scale, basis) -> (codes, indices)``:
# ``fsq_forward_math`` as one compiled kernel, with a one-kernel straight-through backward.
fused_fsq = FusedFSQ.apply
