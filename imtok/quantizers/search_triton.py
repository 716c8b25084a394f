"""Fused nearest-code search on the GPU: distances and argmin in one Triton kernel.

The chunked search in ``imtok.quantizers.search`` writes every (rows, K) distance block to memory
and reads it back for the argmin; at small code dimensions that traffic, not the arithmetic, is the
whole cost (N x K floats written and read, whatever the chunking). This kernel keeps a tile of
latents in registers, streams the codebook through in tiles, computes ``||c||^2 - 2 x.c`` with a
float32 (IEEE, no TF32) dot product and folds each tile into a running minimum and argmin. Memory
is O(N + K): the latents, the codebook, and one index and one value per latent.

Ties go to the lowest code index, as with ``argmin``: within a tile ``tl.argmin`` takes the leftmost,
and a later tile replaces the running best only when strictly smaller.

Used for code dimensions up to ``MAX_FUSED_DIM`` (a latent tile then fits in registers); larger
dimensions are arithmetic-bound, where the chunked matmul path is the right tool. Importing this
module needs Triton; with ``TRITON_INTERPRET=1`` the kernel runs on CPU tensors (slowly), which is how
the tests check it on machines without a GPU.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor

from imtok.quantizers.common import MAX_FUSED_DIM

BLOCK_ROWS = 64  # latents per program
BLOCK_CODES = 128  # codes per tile of the inner loop


@triton.jit
def _nearest_code_kernel(
    x_ptr,
    codebook_ptr,
    code_norms_ptr,
    indices_ptr,
    values_ptr,
    num_rows,
    num_codes,
    dim,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_CODES: tl.constexpr,
    BLOCK_DIM: tl.constexpr,
):
    # int64 row offsets: rows * dim passes 2^31 at 33.5 M rows of 64 dims.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    dims = tl.arange(0, BLOCK_DIM)
    row_ok = rows < num_rows
    dim_ok = dims < dim
    x_mask = row_ok[:, None] & dim_ok[None, :]
    x = tl.load(x_ptr + rows[:, None] * dim + dims[None, :], mask=x_mask, other=0.0)  # (rows, dims)
    best = tl.full((BLOCK_ROWS,), float("inf"), tl.float32)
    best_index = tl.zeros((BLOCK_ROWS,), tl.int64)
    for start in range(0, num_codes, BLOCK_CODES):
        codes = start + tl.arange(0, BLOCK_CODES)
        code_ok = codes < num_codes
        # The codebook tile transposed, (BLOCK_DIM, BLOCK_CODES); padded dims are 0 and add nothing.
        tile_mask = dim_ok[:, None] & code_ok[None, :]
        tile = tl.load(codebook_ptr + codes[None, :] * dim + dims[:, None], mask=tile_mask, other=0.0)
        dots = tl.dot(x, tile, input_precision="ieee")  # (BLOCK_ROWS, BLOCK_CODES)
        norms = tl.load(code_norms_ptr + codes, mask=code_ok, other=float("inf"))
        distances = norms[None, :] - 2.0 * dots  # padded codes: +inf, never chosen
        tile_best = tl.min(distances, axis=1)
        tile_index = tl.argmin(distances, axis=1).to(tl.int64) + start
        better = tile_best < best
        best_index = tl.where(better, tile_index, best_index)
        best = tl.where(better, tile_best, best)
    tl.store(indices_ptr + rows, best_index, mask=row_ok)
    tl.store(values_ptr + rows, best, mask=row_ok)


def fused_nearest_code(x: Tensor, codebook: Tensor) -> tuple[Tensor, Tensor]:
    """Index (int64, (N,)) of and squared distance ((N,), clamped at 0) to the nearest code of each row.

    ``x`` (N, D) and ``codebook`` (K, D), float32, on one device, D <= ``MAX_FUSED_DIM``.
    """
    if x.ndim != 2 or codebook.ndim != 2 or x.shape[1] != codebook.shape[1]:
        shapes = f"{tuple(x.shape)} and {tuple(codebook.shape)}"
        raise ValueError(f"x, codebook: expected shapes (N, D) and (K, D) with equal D, got {shapes}")
    dim = x.shape[1]
    if dim > MAX_FUSED_DIM:
        raise ValueError(f"x: the fused search takes code dimensions up to {MAX_FUSED_DIM}, got {dim}")
    x = x.float().contiguous()
    codebook = codebook.float().contiguous()
    num_rows = x.shape[0]
    indices = torch.empty(num_rows, dtype=torch.int64, device=x.device)
    values = torch.empty(num_rows, dtype=torch.float32, device=x.device)
    if num_rows == 0:
        return indices, values
    code_norms = codebook.pow(2).sum(dim=1)  # (K,)
    grid = (triton.cdiv(num_rows, BLOCK_ROWS),)
    # Triton launches on the current CUDA device: make it the tensors' one (cuda:1 without set_device).
    on_device = torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
    with on_device:
        _launch(grid, x, codebook, code_norms, indices, values, dim)
    # ||x||^2 does not move the argmin; added once per row it turns the minimum into a distance.
    return indices, values.add_(x.pow(2).sum(dim=1)).clamp_(min=0)


def _launch(grid: tuple[int], x: Tensor, codebook: Tensor, code_norms: Tensor, indices: Tensor,
            values: Tensor, dim: int) -> None:  # fmt: skip
    _nearest_code_kernel[grid](
        x,
        codebook,
        code_norms,
        indices,
        values,
        x.shape[0],
        codebook.shape[0],
        dim,
        BLOCK_ROWS=BLOCK_ROWS,
        BLOCK_CODES=BLOCK_CODES,
        BLOCK_DIM=max(16, triton.next_power_of_2(dim)),  # tl.dot needs every side >= 16
    )
