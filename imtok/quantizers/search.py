"""Exact nearest-code search that never builds the full (N, K) distance matrix."""

import torch
from torch import Tensor

from imtok.quantizers.common import FAST_PATH_FAILURES, MAX_FUSED_DIM, require, run_fast_path

FUSED_PATH = "fused nearest-code search"

# 2^22 float32 distances = 16 MiB per block: large enough that each block is one efficient matmul,
# small enough that even 65,536 codes leave room for 64 rows and memory stays O(N + K).
DEFAULT_BLOCK_ELEMENTS = 2**22


def rows_per_chunk(num_codes: int, max_block_elements: int = DEFAULT_BLOCK_ELEMENTS) -> int:
    """Most rows whose (rows, num_codes) distance block fits in ``max_block_elements`` (at least 1)."""
    return max(1, max_block_elements // max(1, num_codes))


def distance_block(x: Tensor, codebook_t: Tensor, codebook_sq_norms: Tensor) -> Tensor:
    """Squared distances (n, K) from x (n, D) to the codes given as codebook_t (D, K) and norms (K,)."""
    x_sq_norms = x.pow(2).sum(dim=1, keepdim=True)  # (n, 1)
    # ||c||^2 - 2 x.c in one fused matmul; ||x||^2 does not change the argmin but makes it a distance.
    return torch.addmm(codebook_sq_norms, x, codebook_t, alpha=-2).add_(x_sq_norms)  # (n, K)


def squared_distances(x: Tensor, codebook: Tensor) -> Tensor:
    """Full (N, K) squared distances ||x||^2 - 2 x.c + ||c||^2; for small problems and reference checks."""
    return distance_block(x, codebook.t(), codebook.pow(2).sum(dim=1))


def check_search_options(chunk_size: int | None, fused: bool | None) -> None:
    """The nearest-code search's options of a quantizer (``search_chunk_size``, ``search_fused``),
    or a ValueError naming the one that is wrong."""
    require(chunk_size is None or chunk_size >= 1, "search_chunk_size", "None or an integer >= 1", chunk_size)
    require(fused in (None, True, False), "search_fused", "true, false or null", fused)


def fused_search_applies(x: Tensor, codebook: Tensor, fused: bool | None) -> bool:
    """Whether ``nearest_code`` runs the fused Triton kernel: ``fused``, or by default (None) for
    float32 CUDA tensors whose code dimension the kernel keeps in registers, unless it failed here
    before."""
    if fused is not None:
        return fused
    on_cuda = x.is_cuda and codebook.is_cuda
    float32 = x.dtype == codebook.dtype == torch.float32
    return on_cuda and float32 and x.shape[1] <= MAX_FUSED_DIM and FUSED_PATH not in FAST_PATH_FAILURES


def nearest_code(
    x: Tensor,
    codebook: Tensor,
    chunk_size: int | None = None,
    max_block_elements: int = DEFAULT_BLOCK_ELEMENTS,
    fused: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """Index (int64, (N,)) of and squared distance ((N,), clamped at 0) to the nearest code for each row.

    Two exact paths (up to float32 rounding, which can decide near-ties differently between them),
    both with memory O(N + K) and ties going to the lowest code index, as with ``argmin``. Fused
    (``imtok.quantizers.search_triton``): one Triton kernel that never writes a distance, in float32;
    the default for float32 CUDA tensors with D <= 64 (``fused=None``), forced with ``fused=True``.
    Chunked (``fused=False``, and everywhere else): rows of ``x`` (N, D) are processed ``chunk_size`` at a
    time against the whole ``codebook`` (K, D); by default ``chunk_size`` is chosen so a chunk's
    (chunk, K) block holds at most ``max_block_elements`` distances.
    """
    if x.ndim != 2 or codebook.ndim != 2 or x.shape[1] != codebook.shape[1]:
        shapes = f"{tuple(x.shape)} and {tuple(codebook.shape)}"
        raise ValueError(f"x, codebook: expected shapes (N, D) and (K, D) with equal D, got {shapes}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size: expected an integer >= 1 or None, got {chunk_size}")
    if fused_search_applies(x, codebook, fused):

        def fast() -> tuple[Tensor, Tensor]:
            from imtok.quantizers.search_triton import fused_nearest_code

            return fused_nearest_code(x, codebook)

        def chunked() -> tuple[Tensor, Tensor]:
            return chunked_nearest_code(x, codebook, chunk_size, max_block_elements)

        return run_fast_path(FUSED_PATH, fast, chunked, requested=bool(fused))
    return chunked_nearest_code(x, codebook, chunk_size, max_block_elements)


def chunked_nearest_code(
    x: Tensor, codebook: Tensor, chunk_size: int | None, max_block_elements: int
) -> tuple[Tensor, Tensor]:
    """The chunked path of ``nearest_code`` (arguments already checked); no gradients (a search).

    Eager, one (rows, K) distance block is allocated per search and every chunk is written into it
    (``out=``), as are the per-row results. A fresh 16 MiB block per chunk used to leave glibc's
    adaptive mmap threshold to decide whether freed blocks went back to the system: 65,536 codes
    against 32,768 vectors peaked at 6.4-8.3 GB resident in most fresh processes, 0.5 GB now. Under
    torch.compile the compiler plans the buffers, and ``out=`` would break the graph: the chunks
    are written functionally there.
    """
    rows = chunk_size if chunk_size is not None else rows_per_chunk(codebook.shape[0], max_block_elements)
    codebook_t = codebook.t()  # (D, K)
    codebook_sq_norms = codebook.pow(2).sum(dim=1)  # (K,)
    if torch.compiler.is_compiling():
        chunk_indices, chunk_distances = [], []
        for start in range(0, x.shape[0], rows):
            block = distance_block(x[start : start + rows], codebook_t, codebook_sq_norms)  # (rows, K)
            block_distances, block_indices = block.min(dim=1)  # (rows,), (rows,)
            chunk_distances.append(block_distances)
            chunk_indices.append(block_indices)
        if not chunk_indices:
            empty = x.new_empty(0)
            return empty.long(), empty
        indices, distances = torch.cat(chunk_indices), torch.cat(chunk_distances)  # (N,), (N,)
        return indices, distances.clamp(min=0)
    with torch.no_grad():
        num_rows = x.shape[0]
        rows = min(rows, max(num_rows, 1))
        block = x.new_empty(rows, codebook.shape[0])  # (rows, K), reused by every chunk
        distances = x.new_empty(num_rows)  # (N,)
        indices = torch.empty(num_rows, dtype=torch.long, device=x.device)  # (N,)
        for start in range(0, num_rows, rows):
            chunk = x[start : start + rows]  # (n, D)
            out = block[: chunk.shape[0]]  # (n, K), contiguous: the leading rows of the block
            torch.addmm(codebook_sq_norms, chunk, codebook_t, alpha=-2, out=out)
            out.add_(chunk.pow(2).sum(dim=1, keepdim=True))  # + ||x||^2: a distance, same argmin
            torch.min(out, dim=1, out=(distances[start : start + rows], indices[start : start + rows]))
        # Cancellation in the expanded formula can dip a hair below zero for near-exact matches.
        return indices, distances.clamp_(min=0)
