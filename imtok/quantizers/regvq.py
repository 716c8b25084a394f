"""Regularized Vector Quantization (Zhang, Zhan, Theobalt, Lu, CVPR 2023)."""

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from imtok.quantizers.common import (
    QuantizerOutput,
    check_channels,
    codebook_stats,
    codes_from_codebook,
    initialization_pending,
    mark_initialized,
    require,
    track_initialization,
)
from imtok.quantizers.vq import broadcast_from_first, distributed_world, sample_rows

# The paper's ablation finds about 40% stochastically quantized positions best: fewer barely
# regularize, more make the decoder train mostly on codes the deterministic path never produces.
DEFAULT_MASK_RATIO = 0.4

# Entries of ``stats`` that are per-position tensors for the contrastive loss and for evaluation,
# not scalars to log; a logger keeps only the 0-dim entries (or drops these keys).
TENSOR_STATS = ("argmax_indices", "sample_mask", "pcl_weights")

# Keeps log(p) finite (and its gradient finite) for codes no position is assigned to; 0 log 0 = 0.
PROB_FLOOR = 1e-12


def _assignment_scores(latents: Tensor, codebook: Tensor, temperature: float) -> Tensor:
    """Assignment logits up to a per-row constant: (2 z.e_k - ||e_k||^2) / temperature (N, K).

    These are the posterior's logits -||z - e_k||^2 / temperature plus ||z||^2 / temperature on each
    row. Softmax, argmax and Gumbel-max sampling ignore a per-row constant (and so do their
    gradients), so they give the same assignment distribution without the passes over (N, K) that
    add ||z||^2 and divide.
    """
    scale = 1.0 / temperature
    # A single matmul [z, 1] (N, D + 1) @ [2 e^T; -||e||^2] / temperature (D + 1, K): the norms and
    # the temperature cost no extra pass over (N, K), and the contiguous right factor keeps the two
    # backward matmuls in their fast layout.
    norms = codebook.pow(2).sum(dim=1, keepdim=True).t()  # (1, K)
    weights = torch.cat([codebook.t() * (2.0 * scale), norms * -scale])  # (D + 1, K)
    return torch.cat([latents, latents.new_ones(latents.shape[0], 1)], dim=1) @ weights


def posterior_mean(assignment_probs: Tensor, *, across_ranks: bool = False) -> Tensor:
    """P_post (K,): the mean of the (..., K) assignment rows; with ``across_ranks`` under
    ``torch.distributed``, the mean over every rank's rows, differentiable for each rank's own.

    One all-reduce of the row sums and the row count, so ranks of unequal batches are weighted by
    their rows. Its backward all-reduces the gradient, so with DDP's gradient averaging the update
    equals one process's on the concatenated batch: the KL of the mean is not the mean of the ranks'
    KLs (it is convex), and per-rank means would push each rank's small batch to use every code.
    """
    num_codes = assignment_probs.shape[-1]
    rows = assignment_probs.reshape(-1, num_codes)  # (N, K)
    if not (across_ranks and distributed_world()):
        return rows.mean(dim=0)
    return mean_of_sums(rows.sum(dim=0), rows.shape[0], across_ranks=across_ranks)


def mean_of_sums(sums: Tensor, count: int, *, across_ranks: bool = False) -> Tensor:
    """``sums / count`` for (K,) sums over ``count`` rows; with ``across_ranks`` under
    ``torch.distributed``, the sums and counts of every rank added first (see ``posterior_mean``)."""
    num_codes = sums.shape[-1]
    if not (across_ranks and distributed_world()):
        return sums / max(count, 1)
    # The functional collective: differentiable (its backward all-reduces the gradient) and traced
    # by torch.compile into the step's graph, where torch.distributed.nn's would break it.
    from torch.distributed import _functional_collectives as funcol

    rows = sums.new_full((1,), float(count))  # a constant: no gradient through the count
    totals = funcol.all_reduce(torch.cat([sums, rows]), "sum", dist.group.WORLD)  # (K + 1,)
    return totals[:num_codes] / totals[num_codes:].clamp_min(1.0)


def prior_kl(assignment_probs: Tensor, *, across_ranks: bool = False) -> Tensor:
    """KL(P_post || uniform) = log K - H(P_post), with P_post the mean of the (..., K) assignment rows
    (over all ranks with ``across_ranks``; see ``posterior_mean``).

    0 when the positions spread evenly over the codes, log K when they all put their mass on one.
    """
    num_codes = assignment_probs.shape[-1]
    posterior = posterior_mean(assignment_probs, across_ranks=across_ranks)  # (K,)
    return (posterior * (posterior.clamp_min(PROB_FLOOR).log() + math.log(num_codes))).sum()


def pcl_weights(sampled_codes: Tensor, argmax_codes: Tensor, sample_mask: Tensor) -> Tensor:
    """Contrastive-loss weights (...,): ||e_sampled - e_argmax||^2 on sampled positions, summing to 1.

    Codes are (..., D) and the mask (...,). Positions outside the mask get 0. When every sampled code
    equals its argmax code (all distances 0) the weights are uniform over the sampled positions; when
    nothing is sampled they are all 0.
    """
    mask = sample_mask.to(sampled_codes.dtype)  # (...,)
    distances = (sampled_codes - argmax_codes).pow(2).sum(dim=-1) * mask  # (...,)
    total = distances.sum()
    uniform = mask / mask.sum().clamp_min(1.0)
    # torch.where instead of a Python branch: no host sync on the accelerator.
    return torch.where(total > 0, distances / total.clamp_min(torch.finfo(total.dtype).tiny), uniform)


def random_rows(num_positions: int, ratio: float, device: torch.device) -> tuple[Tensor, Tensor]:
    """``round(ratio * N)`` of N positions, uniformly at random: their sorted rows (M,) and bool mask (N,).

    A fixed count rather than an independent coin per position: the fraction is within 1/(2N) of
    ``ratio`` (so a batch of fewer than 1/(2 ratio) positions samples none), and M follows from the
    shapes, so gathering the masked rows needs no count read back from the device (no host sync, no
    graph break under torch.compile).
    """
    count = round(ratio * num_positions)
    # sorted: the gathers and the index_copy back walk memory in order, as nonzero() would give
    rows = torch.randperm(num_positions, device=device)[:count].sort().values  # (M,)
    mask = torch.zeros(num_positions, dtype=torch.bool, device=device).index_fill_(0, rows, True)
    return rows, mask


class RegularizedVQ(nn.Module):
    """Learned-codebook vector quantizer with the two quantizer-side regularizers of Regularized VQ.

    Base: each latent's nearest code (the argmax of the posterior below) with the VQ-VAE losses,
    codebook ``||sg[z] - e||^2`` plus ``beta * ||z - sg[e]||^2`` (commitment), and straight-through
    gradients to the encoder.

    Prior distribution regularization: every position's assignment distribution is
    ``softmax(-||z - e_k||^2 / prior_temperature)`` over the K codes. The hard nearest-code assignment
    has no gradient; this softmax does, so the term below trains the encoder and the codebook. The
    temperature sets how soft the assignment is: near 0 it approaches the one-hot nearest code, large
    values spread it over codes whose distances differ by less than about the temperature. P_post is
    its average over all positions in the batch (every rank's, under ``torch.distributed`` in training),
    and ``prior_weight * KL(P_post || uniform)`` is added to the loss, pushing the batch to use all codes.

    Stochastic mask regularization (training mode only): a uniformly random ``mask_ratio`` of the
    batch's positions (``round(mask_ratio * N)`` of N) take a code sampled from that softmax by hard
    Gumbel-softmax; the others keep the nearest code. The sample follows the posterior whatever
    ``gumbel_temperature`` is; that temperature only shapes the straight-through gradient, which
    lets the decoder's loss reach the codebook and the posterior through the sampled one-hot. Eval
    mode never samples.

    Probabilistic contrastive loss: it lives with the tokenizer's losses; this module supplies its
    per-position weights (see ``pcl_weights``).

    ``forward`` returns ``QuantizerOutput(codes, indices, loss, stats)``. ``indices`` are the codes
    actually used (sampled where masked); ``loss`` is codebook + beta * commitment + prior_weight *
    KL. ``stats`` holds scalars for logging (``perplexity`` and ``usage`` of the returned indices,
    ``prior_kl``, ``sampled_fraction``, ``codebook_loss``, ``commitment``) and, listed in
    ``TENSOR_STATS``, three (B, H, W) tensors: ``argmax_indices`` (int64, the deterministic codes,
    for evaluation and token extraction), ``sample_mask`` (bool, where a sampled code was used) and
    ``pcl_weights`` (float32, detached, summing to 1 over the sampled positions).

    Args:
        codebook_size: number of codes K (>= 2).
        dim: channels C of the latents and of the codes (>= 1).
        beta: commitment-loss weight (>= 0).
        mask_ratio: fraction of the positions that take a sampled code in training, in [0, 1].
        prior_weight: weight of KL(P_post || uniform) in the loss (>= 0).
        prior_temperature: temperature of the assignment softmax (> 0).
        gumbel_temperature: temperature of the Gumbel-softmax relaxation (> 0).
        data_init: on the first training batch, set the codes to random latent vectors of that
            batch (rank 0's, broadcast under ``torch.distributed``). Without it the codes start
            uniform in (-1/K, 1/K) as in VQ-VAE: all codes then sit at nearly the same distance from
            every latent, the assignment softmax is almost flat, the prior KL sees no imbalance to
            correct, and only the few codes on the edge of that tiny cloud are ever the nearest.

    Quantization runs in float32 even under autocast; codes come back in the input dtype. The
    assignment softmax needs the full (N, K) distance matrix, so memory grows with positions times
    codes.
    """

    def __init__(
        self,
        codebook_size: int,
        dim: int,
        *,
        beta: float = 0.25,
        mask_ratio: float = DEFAULT_MASK_RATIO,
        prior_weight: float = 0.1,
        prior_temperature: float = 1.0,
        gumbel_temperature: float = 1.0,
        data_init: bool = True,
    ) -> None:
        super().__init__()
        require(codebook_size >= 2, "codebook_size", "an integer >= 2", codebook_size)
        require(dim >= 1, "dim", "an integer >= 1", dim)
        require(beta >= 0.0, "beta", "a value >= 0", beta)
        require(0.0 <= mask_ratio <= 1.0, "mask_ratio", "a value in [0, 1]", mask_ratio)
        require(prior_weight >= 0.0, "prior_weight", "a value >= 0", prior_weight)
        require(prior_temperature > 0.0, "prior_temperature", "a value > 0", prior_temperature)
        require(gumbel_temperature > 0.0, "gumbel_temperature", "a value > 0", gumbel_temperature)
        self.codebook_size = codebook_size
        self.dim = dim
        self.beta = beta
        self.mask_ratio = mask_ratio
        self.prior_weight = prior_weight
        self.prior_temperature = prior_temperature
        self.gumbel_temperature = gumbel_temperature
        self.data_init = data_init
        bound = 1.0 / codebook_size
        self.codebook = nn.Parameter(torch.empty(codebook_size, dim).uniform_(-bound, bound))  # (K, D)
        self.register_buffer("initialized", torch.tensor(not data_init))
        track_initialization(self)

    @torch.no_grad()
    def _initialize_from(self, latents: Tensor) -> None:
        """Seed the codebook with random rows of ``latents`` (N, D), the same on every rank."""
        self.codebook.copy_(broadcast_from_first(sample_rows(latents, self.codebook_size)))
        mark_initialized(self)

    def _stochastic_codes(self, latents: Tensor, argmax_indices: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mask (N,), indices used (N,) and the Gumbel straight-through code term (N, D) for training.

        Only the masked rows get assignment logits, Gumbel noise and a Gumbel term; the others keep
        their nearest code and the term is 0 there.
        """
        num_positions = latents.shape[0]
        rows, mask = random_rows(num_positions, self.mask_ratio, latents.device)  # (M,), (N,)
        tau = self.gumbel_temperature
        # logits / tau of the masked rows, recomputed from their latents: cheaper than selecting
        # rows of the (N, K) logits, whose backward would scatter into another (N, K) tensor.
        scaled_logits = _assignment_scores(
            latents.index_select(0, rows), self.codebook, self.prior_temperature * tau
        )  # (M, K)
        # (logits + g) / tau with Gumbel noise g = -log(E), E = -log(U) ~ Exp(1); its argmax is a
        # draw from softmax(logits) whatever tau is (Gumbel-max). In place from uniforms: on CPU this
        # is 3-4x faster than Tensor.exponential_, which dominated the step at K = 16384. U = 0 (odds
        # 2^-24 an entry) only gives E = inf, a code that position cannot draw this step.
        log_exponential = torch.rand_like(scaled_logits).log_().neg_().log_()  # (M, K)
        perturbed = torch.sub(scaled_logits, log_exponential, alpha=1.0 / tau)  # (M, K)
        sampled = perturbed.detach().argmax(dim=1)  # (M,)
        indices = argmax_indices.index_copy(0, rows, sampled)  # (N,)
        gumbel_term = latents.new_zeros(num_positions, self.dim)  # (N, D)
        if not perturbed.requires_grad:
            return mask, indices, gumbel_term
        # Hard Gumbel-softmax with the straight-through estimator: value the sampled code, gradient
        # that of the relaxed code soft @ codebook, soft = softmax((logits + g) / tau). The codebook's
        # part of that gradient is the sampled code's row alone, so it is taken by index.
        soft = perturbed.softmax(dim=1)  # (M, K)
        relaxed = F.embedding(sampled, self.codebook) + soft @ self.codebook.detach()  # (M, D)
        # Zero in value; carries the Gumbel-softmax gradient, only where a sampled code was used.
        return mask, indices, gumbel_term.index_add(0, rows, relaxed - relaxed.detach())

    def forward(self, z: Tensor) -> QuantizerOutput:
        """Quantize channel-first latents (B, C, H, W) with C == dim."""
        check_channels(z, self.dim, "z")
        batch, _, height, width = z.shape
        with torch.autocast(device_type=z.device.type, enabled=False):
            latents = z.float().permute(0, 2, 3, 1).reshape(-1, self.dim)  # (N, D)
            if self.training and initialization_pending(self):
                self._initialize_from(latents.detach())
            # Logits up to a per-row constant, which neither the softmax nor the argmax sees.
            logits = _assignment_scores(latents, self.codebook, self.prior_temperature)  # (N, K)
            argmax_indices = logits.detach().argmax(dim=1)  # (N,)
            # In training the batch is every rank's batch together, as one process would see it.
            kl = prior_kl(logits.softmax(dim=1), across_ranks=self.training)
            nearest = F.embedding(argmax_indices, self.codebook)  # (N, D)
            # Both VQ-VAE terms use the nearest code: a sampled code is noise, not a target to pull to.
            codebook_loss = F.mse_loss(latents.detach(), nearest)
            commitment = F.mse_loss(latents, nearest.detach())
            loss = codebook_loss + self.beta * commitment + self.prior_weight * kl

            if self.training and self.mask_ratio > 0:
                mask, indices, gumbel_term = self._stochastic_codes(latents, argmax_indices)
            else:
                mask = torch.zeros_like(argmax_indices, dtype=torch.bool)  # (N,)
                indices, gumbel_term = argmax_indices, torch.zeros_like(latents)
            used = F.embedding(indices, self.codebook.detach())  # (N, D)
            weights = pcl_weights(used, nearest.detach(), mask)  # (N,)
            # The identity straight-through gives the encoder the same gradient at every position.
            quantized = latents + (used - latents).detach() + gumbel_term  # (N, D)

        codes = quantized.view(batch, height, width, self.dim).permute(0, 3, 1, 2)  # (B, C, H, W)
        indices = indices.view(batch, height, width)  # (B, H, W)
        stats = {
            **codebook_stats(indices, self.codebook_size),
            "prior_kl": kl.detach(),
            "sampled_fraction": mask.float().mean(),
            "codebook_loss": codebook_loss.detach(),
            "commitment": commitment.detach(),
            "argmax_indices": argmax_indices.view(batch, height, width),
            "sample_mask": mask.view(batch, height, width),
            "pcl_weights": weights.view(batch, height, width),
        }
        return QuantizerOutput(codes.to(z.dtype), indices, loss, stats)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """Codes (B, C, H, W) for integer indices (B, H, W)."""
        return codes_from_codebook(indices, self.codebook)

    def extra_repr(self) -> str:
        return (
            f"codebook_size={self.codebook_size}, dim={self.dim}, beta={self.beta}, "
            f"mask_ratio={self.mask_ratio}, prior_weight={self.prior_weight}, "
            f"prior_temperature={self.prior_temperature}, gumbel_temperature={self.gumbel_temperature}"
        )
