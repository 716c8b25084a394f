"""Codebook statistics over a whole evaluation set: usage and perplexity of the code distribution.

Usage is the fraction of the codebook's K codes used at least once when the evaluation set is
encoded, as the FSQ paper (Mentzer et al. 2024, Sec. 4) measures it: a per-batch figure understates
it, since a batch of a few thousand tokens cannot touch all 2^16 codes. Perplexity is exp of the
entropy of the empirical code distribution: K for uniform use, 1 when a single code is used, so it
reads as "the number of codes effectively in use".

``CodeCounter`` accumulates one histogram over batches of indices; ``codebook_usage`` and
``code_perplexity`` are the pure functions of a histogram. The per-batch statistics the quantizers
log come from ``imtok.quantizers.common``, whose ``code_counts`` does the counting here too.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from imtok.quantizers.common import code_counts


def _check_counts(counts: Tensor) -> None:
    if counts.ndim != 1 or counts.numel() == 0:
        raise ValueError(
            f"counts: expected a 1-D histogram over the codebook, got shape {tuple(counts.shape)}"
        )
    if bool((counts < 0).any()):
        raise ValueError("counts: a histogram cannot hold negative counts")


def codebook_usage(counts: Tensor) -> float:
    """Fraction of the codebook (len(counts) codes) used at least once."""
    _check_counts(counts)
    return float((counts > 0).sum()) / counts.numel()


def code_perplexity(counts: Tensor) -> float:
    """exp(entropy) of the code distribution ``counts / counts.sum()``, in [1, K]; nan for no counts."""
    _check_counts(counts)
    total = float(counts.sum())
    if total == 0:
        return math.nan
    probs = counts.double() / total
    probs = probs[probs > 0]  # 0 log 0 = 0
    return math.exp(float(-(probs * probs.log()).sum()))


class CodeCounter:
    """Histogram of code ids over many batches; ``usage`` and ``perplexity`` are over all of them.

    Counts are int64 on the CPU, so they stay exact however large the evaluation set is.
    """

    def __init__(self, codebook_size: int) -> None:
        if codebook_size < 1:
            raise ValueError(f"codebook_size: expected at least 1, got {codebook_size}")
        self.codebook_size = codebook_size
        self.counts = torch.zeros(codebook_size, dtype=torch.int64)

    def update(self, indices: Tensor) -> None:
        """Add a batch of code ids (any shape, e.g. (B, H, W)) to the histogram."""
        if indices.is_floating_point() or indices.dtype == torch.bool:
            raise ValueError(f"indices: expected an integer tensor of code ids, got {indices.dtype}")
        if indices.numel() == 0:
            return
        low, high = int(indices.min()), int(indices.max())
        if low < 0 or high >= self.codebook_size:
            raise ValueError(
                f"indices: expected values in [0, {self.codebook_size}), the codebook size; got values "
                f"from {low} to {high}"
            )
        self.counts += code_counts(indices, self.codebook_size).cpu()

    @property
    def total(self) -> int:
        """Number of code ids counted so far."""
        return int(self.counts.sum())

    def usage(self) -> float:
        return codebook_usage(self.counts)

    def perplexity(self) -> float:
        return code_perplexity(self.counts)

    def stats(self) -> dict[str, float]:
        """``{"usage", "perplexity", "codes_used"}`` over everything counted so far."""
        return {
            "usage": self.usage(),
            "perplexity": self.perplexity(),
            "codes_used": float((self.counts > 0).sum()),
        }
