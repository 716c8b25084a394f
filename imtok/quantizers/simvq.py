"""SimVQ (Zhu et al. 2024): a frozen random codebook reparameterised by one learned linear layer.

The codebook is C W: C (K, d) is drawn once from N(0, 1/d) and never trained (a buffer, saved with the
weights), W (d, d) is a learned linear map. Plain VQ updates only the codes that won a latent, so the
rest drift out of use; here every step's gradient moves W, and with it every code at once, which is
how SimVQ keeps large codebooks in use without k-means, restarts or EMA.

Each latent takes its nearest code in C W (the exact chunked search of ``imtok.quantizers.search``,
without gradient); the decoder sees it through the straight-through estimator. The loss is the
paper's: ||sg(z) - q||^2 (trains W) + beta * ||z - sg(q)||^2 (commits the encoder). Indices are
(B, H, W), as VQ's, so the priors see one token per position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from imtok.quantizers.common import (
    QuantizerOutput,
    check_channels,
    codebook_stats,
    codes_from_codebook,
    require,
)
from imtok.quantizers.search import check_search_options, nearest_code


class SimVQ(nn.Module):
    """``codebook_size`` codes of ``dim`` channels, the rows of ``frozen_codebook @ transform.weight.T``.

    ``forward(z)`` on channel-first latents (B, dim, H, W) returns ``QuantizerOutput`` (codes, int64
    indices (B, H, W), the loss above, usage and perplexity); float32 under autocast.
    """

    def __init__(
        self,
        codebook_size: int,
        dim: int,
        *,
        beta: float = 0.25,
        search_chunk_size: int | None = None,
        search_fused: bool | None = None,
    ) -> None:
        super().__init__()
        require(codebook_size >= 2, "codebook_size", "an integer >= 2", codebook_size)
        require(dim >= 1, "dim", "an integer >= 1", dim)
        require(beta >= 0.0, "beta", "a value >= 0", beta)
        check_search_options(search_chunk_size, search_fused)
        self.codebook_size = codebook_size
        self.dim = dim
        self.beta = beta
        self.search_chunk_size = search_chunk_size
        self.search_fused = search_fused
        self.register_buffer("frozen_codebook", torch.randn(codebook_size, dim) * dim**-0.5)
        self.transform = nn.Linear(dim, dim, bias=False)

    @property
    def codebook(self) -> Tensor:
        """The effective (K, dim) codebook C W."""
        return self.transform(self.frozen_codebook)

    def forward(self, z: Tensor) -> QuantizerOutput:
        """Quantize channel-first latents (B, C, H, W) with C == dim."""
        check_channels(z, self.dim, "z")
        batch, _, height, width = z.shape
        with torch.autocast(device_type=z.device.type, enabled=False):
            flat = z.float().permute(0, 2, 3, 1).reshape(-1, self.dim)  # (N, d)
            codebook = self.codebook  # (K, d), a function of W
            indices, _ = nearest_code(
                flat.detach(), codebook.detach(), self.search_chunk_size, fused=self.search_fused
            )
            quantized = F.embedding(indices, codebook)  # (N, d), gradient to W
            commitment = F.mse_loss(flat, quantized.detach())
            loss = F.mse_loss(flat.detach(), quantized) + self.beta * commitment
            codes = flat + (quantized - flat).detach()  # straight-through
        codes = codes.view(batch, height, width, self.dim).permute(0, 3, 1, 2)
        indices = indices.view(batch, height, width)
        stats = {**codebook_stats(indices, self.codebook_size), "commitment": commitment.detach()}
        return QuantizerOutput(codes.to(z.dtype), indices, loss, stats)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """Codes (B, dim, H, W) for integer indices (B, H, W)."""
        return codes_from_codebook(indices, self.codebook)

    def extra_repr(self) -> str:
        return f"codebook_size={self.codebook_size}, dim={self.dim}, beta={self.beta}"
