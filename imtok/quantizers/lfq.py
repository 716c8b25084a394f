"""Lookup-free quantization (LFQ; MAGVIT-v2, Yu et al. 2023): each latent channel is its sign.

A latent vector x of d channels becomes the code c = sign(x) * s in {-s, +s}^d, so the codebook is the
2^d corners of a hypercube and nothing is looked up. Its index reads the sign bits as a binary number,
channel 0 the most significant bit (vector-quantize-pytorch's order), so index k's code has bit
``(k >> (d - 1 - i)) & 1`` in channel i.

The entropy loss makes each token's code confident and the batch's codes spread: with the soft
assignment q(c | x) = softmax_c(-tau ||x - c||^2) over all codes,

    loss_entropy = mean_x H(q(. | x)) - gamma * H(mean_x q(. | x)).

Because the codes are a product of channels, q factorises: bit i of the code is +1 with probability
sigmoid(4 tau s x_i), so the per-sample entropy is exactly the sum of d binary entropies (no 2^d
softmax). The batch ("codebook") entropy does not factorise, but its batch-mean distribution is a
matrix product of the two halves of the channels (``code_probability_sums``), so ``exact_entropy``
computes it over all 2^d codes in N x 2^(d/2) + 2^d memory (the default up to
``MAX_EXACT_ENTROPY_CODES``); otherwise the sum of the d binary entropies of the batch-mean bit
probabilities is used, an upper bound that the BSQ paper uses for large codebooks. Under
torch.distributed the batch mean is taken over every rank's tokens (one differentiable all-reduce), so
every rank computes the same codebook entropy, that of the global batch. A commitment term
``commitment_weight * ||x - sg(c)||^2`` keeps latents near their codes.

``BSQ`` (``imtok.quantizers.bsq``) is the same on the unit sphere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from imtok.quantizers.common import (
    QuantizerOutput,
    channel_index,
    check_channels,
    check_indices,
    codebook_stats,
    require,
)
from imtok.quantizers.regvq import mean_of_sums, posterior_mean

MAX_DIM = 24  # 2^24 codes: indices summed in float32 stay exact
MAX_EXACT_ENTROPY_CODES = 2**18  # above: the factorised bound (MAGVIT-v2 computes 2^18 codes exactly)
PROB_FLOOR = 1e-12


def bit_probabilities(latents: Tensor, scale: float, inv_temperature: float) -> Tensor:
    """p(bit i = +1 | x) for latents (..., d): the soft assignment over the 2^d codes in {-s, s}^d
    factorised over channels, sigmoid(4 * tau * s * x_i)."""
    return torch.sigmoid(4.0 * inv_temperature * scale * latents)


def binary_entropy(p: Tensor) -> Tensor:
    """Entropy in nats of Bernoulli(p), elementwise."""
    return -(p * p.clamp_min(PROB_FLOOR).log() + (1 - p) * (1 - p).clamp_min(PROB_FLOOR).log())


def code_bits(dim: int, device: torch.device | None = None) -> Tensor:
    """(2^d, d) 0/1 float bits of every code index, channel 0 the most significant."""
    shifts = torch.arange(dim - 1, -1, -1, device=device)
    return ((torch.arange(2**dim, device=device)[:, None] >> shifts) & 1).float()


def code_probabilities(bit_probs: Tensor) -> Tensor:
    """(N, 2^d) probabilities of every code from (N, d) bit probabilities (a product over channels)."""
    bits = code_bits(bit_probs.shape[-1], bit_probs.device).to(bit_probs.dtype)  # (K, d)
    log_on = bit_probs.clamp_min(PROB_FLOOR).log()
    log_off = (1 - bit_probs).clamp_min(PROB_FLOOR).log()
    return (log_on @ bits.T + log_off @ (1 - bits).T).exp()


def code_probability_sums(bit_probs: Tensor) -> Tensor:
    """(2^d,) sums over the N rows of every code's probability, from (N, d) bit probabilities,
    without the (N, 2^d) matrix.

    A code's probability is the product of its high half's (channels 0 .. h-1) and its low half's, so
    the sums are the matrix product Q_high^T Q_low of the halves' (N, 2^h) and (N, 2^(d-h)) code
    probabilities, whose (i, j) entry is code i * 2^(d-h) + j (channel 0 the most significant bit).
    Memory N * 2^(d/2) + 2^d instead of N * 2^d, and one matmul instead of an exp of N * 2^d.
    """
    high = bit_probs.shape[-1] // 2
    q_high = code_probabilities(bit_probs[:, :high])  # (N, 2^h); one column of ones when h == 0
    q_low = code_probabilities(bit_probs[:, high:])  # (N, 2^(d-h))
    return (q_high.T @ q_low).reshape(-1)


def entropy_terms(bit_probs: Tensor, *, exact: bool, across_ranks: bool) -> tuple[Tensor, Tensor]:
    """(mean per-sample entropy, entropy of the batch-mean assignment) of (N, d) bit probabilities."""
    per_sample = binary_entropy(bit_probs).sum(dim=-1).mean()
    if exact:
        sums = code_probability_sums(bit_probs)  # (K,)
        mean = mean_of_sums(sums, bit_probs.shape[0], across_ranks=across_ranks)
        codebook = -(mean * mean.clamp_min(PROB_FLOOR).log()).sum()
    else:
        codebook = binary_entropy(posterior_mean(bit_probs, across_ranks=across_ranks)).sum()
    return per_sample, codebook


class LFQ(nn.Module):
    """Lookup-free quantizer of ``dim`` channels: 2^dim codes in {-1, +1}^dim.

    ``forward(z)`` on channel-first latents (B, dim, H, W) returns ``QuantizerOutput``: straight-through
    codes, int64 indices (B, H, W), the auxiliary loss (entropy and commitment; 0 outside training)
    and statistics (usage, perplexity, and in training the two entropy terms). Quantizes in float32
    under autocast.
    """

    spherical = False

    def __init__(
        self,
        dim: int,
        *,
        entropy_weight: float = 0.1,
        diversity_gamma: float = 1.0,
        commitment_weight: float = 0.25,
        inv_temperature: float = 100.0,
        exact_entropy: bool | None = None,
    ) -> None:
        super().__init__()
        require(1 <= dim <= MAX_DIM, "dim", f"an integer from 1 to {MAX_DIM} (2^dim codes)", dim)
        require(entropy_weight >= 0.0, "entropy_weight", "a value >= 0", entropy_weight)
        require(diversity_gamma >= 0.0, "diversity_gamma", "a value >= 0", diversity_gamma)
        require(commitment_weight >= 0.0, "commitment_weight", "a value >= 0", commitment_weight)
        require(inv_temperature > 0.0, "inv_temperature", "a value > 0", inv_temperature)
        require(exact_entropy in (None, True, False), "exact_entropy", "true, false or null", exact_entropy)
        self.dim = dim
        self.codebook_size = 2**dim
        self.entropy_weight = entropy_weight
        self.diversity_gamma = diversity_gamma
        self.commitment_weight = commitment_weight
        self.inv_temperature = inv_temperature
        self.exact_entropy = (
            self.codebook_size <= MAX_EXACT_ENTROPY_CODES if exact_entropy is None else exact_entropy
        )
        self.scale = dim**-0.5 if self.spherical else 1.0  # the magnitude of every code channel
        self._weights = [float(2 ** (dim - 1 - channel)) for channel in range(dim)]

    def project(self, latents: Tensor) -> Tensor:
        """What is quantized: the latents themselves (``BSQ``: projected onto the unit sphere)."""
        return latents

    def indices_from_signs(self, positive: Tensor) -> Tensor:
        """Int64 indices (B, H, W) from the sign bits (B, d, H, W): one multiply-add per channel in
        float32 (exact below 2^24), channel 0 the most significant bit."""
        return channel_index(positive.float(), self._weights)

    def forward(self, z: Tensor) -> QuantizerOutput:
        """Quantize channel-first latents (B, C, H, W) with C == dim."""
        check_channels(z, self.dim, "z")
        with torch.autocast(device_type=z.device.type, enabled=False):
            latents = self.project(z.float())
            positive = latents > 0
            quantized = torch.where(positive, self.scale, -self.scale)
            indices = self.indices_from_signs(positive)
            codes = latents + (quantized - latents).detach()  # straight-through
            stats = codebook_stats(indices, self.codebook_size)
            loss = latents.new_zeros(())
            if self.training:
                flat = latents.permute(0, 2, 3, 1).reshape(-1, self.dim)
                probs = bit_probabilities(flat, self.scale, self.inv_temperature)
                per_sample, batch = entropy_terms(probs, exact=self.exact_entropy, across_ranks=True)
                commitment = F.mse_loss(latents, quantized)
                loss = (
                    self.entropy_weight * (per_sample - self.diversity_gamma * batch)
                    + self.commitment_weight * commitment
                )
                stats |= {
                    "per_sample_entropy": per_sample.detach(),
                    "codebook_entropy": batch.detach(),
                    "commitment": commitment.detach(),
                }
        return QuantizerOutput(codes.to(z.dtype), indices, loss, stats)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """Codes (B, dim, H, W) for integer indices (B, H, W)."""
        check_indices(indices, self.codebook_size)
        shifts = torch.arange(self.dim - 1, -1, -1, device=indices.device).view(1, -1, 1, 1)
        bits = (indices.long()[:, None] >> shifts) & 1
        return (bits.float() * 2 - 1) * self.scale

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, codebook_size={self.codebook_size}, entropy_weight={self.entropy_weight}, "
            f"diversity_gamma={self.diversity_gamma}, commitment_weight={self.commitment_weight}, "
            f"inv_temperature={self.inv_temperature}, exact_entropy={self.exact_entropy}"
        )
