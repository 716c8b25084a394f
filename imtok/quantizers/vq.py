"""Vector quantization with an EMA or learned codebook (VQ-VAE, van den Oord et al. 2017; VQ-VAE-2)."""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from imtok.quantizers.common import (
    QuantizerOutput,
    check_channels,
    check_indices,
    code_counts,
    code_histogram,
    codebook_stats,
    initialization_pending,
    mark_initialized,
    require,
    track_initialization,
)
from imtok.quantizers.search import check_search_options, nearest_code


def distributed_world() -> bool:
    """True when torch.distributed is initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` in place over all processes (a no-op in a single process)."""
    if distributed_world():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_from_first(tensor: Tensor) -> Tensor:
    """Overwrite ``tensor`` in place with rank 0's copy (a no-op in a single process).

    Sent as a sum over all ranks of rank 0's tensor and zeros (exact: x + 0 = x): torch.compile traces
    an all-reduce into the graph, where a broadcast would break it, and VQ sends restart rows every
    training step.
    """
    if distributed_world():
        if dist.get_rank() != 0:
            tensor.zero_()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def l2_normalize(x: Tensor) -> Tensor:
    """Rows of ``x`` (..., D) scaled to unit length (zero rows stay zero)."""
    return F.normalize(x, dim=-1)


def sample_rows(x: Tensor, count: int) -> Tensor:
    """``count`` random rows of x (N, D): distinct rows when N >= count, else drawn with replacement."""
    if x.shape[0] >= count:
        picks = torch.randperm(x.shape[0], device=x.device)[:count]
    else:
        picks = torch.randint(x.shape[0], (count,), device=x.device)
    return x[picks].contiguous()  # (count, D)


def restart_rows(x: Tensor, dead: Tensor) -> Tensor:
    """(K, D) replacement rows for the codes flagged in ``dead`` (K,), drawn from x (N, D).

    The i-th dead code gets row i of a random permutation of x (cycling when more codes than rows are
    dead), so dead codes get distinct rows while N suffices; rows for live codes are filler. Nothing
    here depends on how many codes are dead, so it runs without reading that count back to the host.
    """
    order = torch.randperm(x.shape[0], device=x.device)  # (N,)
    slot = (dead.long().cumsum(0) - 1).clamp_min(0) % x.shape[0]  # (K,): rank among the dead codes
    return x[order[slot]]  # (K, D)


def cluster_sums(x: Tensor, indices: Tensor, num_codes: int) -> tuple[Tensor, Tensor]:
    """Per-code counts (K,) and vector sums (K, D) of x (N, D) under the assignment ``indices`` (N,)."""
    counts = code_counts(indices, num_codes).to(x.dtype)  # (K,)
    sums = x.new_zeros(num_codes, x.shape[1]).index_add_(0, indices, x)  # (K, D)
    return counts, sums


def all_reduced_cluster_sums(x: Tensor, indices: Tensor, num_codes: int) -> tuple[Tensor, Tensor]:
    """``cluster_sums`` summed over all processes, in one collective."""
    counts, sums = cluster_sums(x, indices, num_codes)
    packed = all_reduce_sum(torch.cat([counts[:, None], sums], dim=1))  # (K, 1 + D)
    return packed[:, 0], packed[:, 1:]


def kmeans(
    x: Tensor, num_codes: int, iters: int, cosine: bool, chunk_size: int | None, fused: bool | None = None
) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means on x (N, D) seeded from its rows: centres (K, D) and final cluster counts (K,).

    Seeds come from rank 0 and every iteration's statistics are summed over all processes, so all
    ranks end with the same centres, fitted to all ranks' vectors. Empty clusters keep their seed.
    """
    centres = broadcast_from_first(sample_rows(x, num_codes))  # (K, D)
    counts = x.new_zeros(num_codes)
    for _ in range(iters):
        indices, _ = nearest_code(x, centres, chunk_size, fused=fused)  # (N,)
        counts, sums = all_reduced_cluster_sums(x, indices, num_codes)
        means = sums / counts.clamp_min(1.0)[:, None]  # (K, D)
        if cosine:
            means = l2_normalize(means)
        centres = torch.where(counts[:, None] > 0, means, centres)
    return centres, counts


def laplace_smoothed(cluster_size: Tensor, eps: float) -> Tensor:
    """Cluster sizes (K,) with add-eps smoothing that keeps their total, so no code divides by zero."""
    total = cluster_size.sum()
    return (cluster_size + eps) / (total + cluster_size.numel() * eps) * total


class VectorQuantizer(nn.Module):
    """Nearest-neighbour vector quantizer with an EMA or a learned codebook.

    Each latent vector is replaced by its nearest code (squared Euclidean distance, or cosine when
    ``cosine``); gradients pass straight through to the encoder, and the loss is
    ``beta * ||z - sg[e]||^2`` (commitment) plus, for a learned codebook, ``||sg[z] - e||^2``.

    Args:
        codebook_size: number of codes K (>= 2).
        dim: channels C of the latents given to ``forward`` (>= 1).
        codebook_dim: dimension of the codes; when it differs from ``dim`` the latents are linearly
            projected into it before the search and the codes back out to ``dim`` after (default:
            ``dim``, no projections).
        ema: update codes as exponential moving averages of the vectors assigned to them (VQ-VAE-2,
            Sonnet's ``VectorQuantizerEMA``); if False the codebook is an ``nn.Parameter`` trained by
            the codebook loss.
        decay: EMA decay in (0, 1) for cluster sizes and embedding sums.
        eps: Laplace smoothing (> 0) added to every EMA cluster size so rarely used codes stay finite.
        beta: commitment-loss weight (>= 0).
        kmeans_init: on the first training batch, set the codes by k-means on that batch's vectors.
        kmeans_iters: Lloyd iterations for that initialisation (>= 0; 0 keeps the random seeds).
        dead_code_threshold: a code counts as used in a training step when at least this many vectors
            (over all processes) are assigned to it (>= 1).
        restart_after_steps: codes unused for this many consecutive training steps are re-seeded from
            random vectors of the current batch (>= 1); None disables restarts.
        cosine: l2-normalise latents and codes, so the search is by cosine similarity.
        search_chunk_size: rows per chunk in the nearest-code search; None sizes chunks to a fixed
            memory budget (see ``imtok.quantizers.search``).
        search_fused: the fused Triton search (True), the chunked one (False), or None: fused on
            CUDA for code dimensions up to 64, chunked elsewhere (see ``nearest_code``).

    Training mode updates the codebook (EMA), runs the k-means initialisation once and restarts dead
    codes; eval mode does none of these. Under ``torch.distributed`` the EMA statistics, the k-means
    statistics and the restart vectors are all-reduced or broadcast so every rank keeps the same
    codebook. Quantization runs in float32 even under autocast; codes come back in the input dtype.
    """

    def __init__(
        self,
        codebook_size: int,
        dim: int,
        *,
        codebook_dim: int | None = None,
        ema: bool = True,
        decay: float = 0.99,
        eps: float = 1e-5,
        beta: float = 0.25,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
        dead_code_threshold: int = 1,
        restart_after_steps: int | None = 100,
        cosine: bool = False,
        search_chunk_size: int | None = None,
        search_fused: bool | None = None,
    ) -> None:
        super().__init__()
        require(codebook_size >= 2, "codebook_size", "an integer >= 2", codebook_size)
        require(dim >= 1, "dim", "an integer >= 1", dim)
        require(codebook_dim is None or codebook_dim >= 1, "codebook_dim", "None or >= 1", codebook_dim)
        require(0.0 < decay < 1.0, "decay", "a value in the open interval (0, 1)", decay)
        require(eps > 0.0, "eps", "a value > 0", eps)
        require(beta >= 0.0, "beta", "a value >= 0", beta)
        require(kmeans_iters >= 0, "kmeans_iters", "an integer >= 0", kmeans_iters)
        require(dead_code_threshold >= 1, "dead_code_threshold", "an integer >= 1", dead_code_threshold)
        require(
            restart_after_steps is None or restart_after_steps >= 1,
            "restart_after_steps",
            "None or an integer >= 1",
            restart_after_steps,
        )
        check_search_options(search_chunk_size, search_fused)
        self.codebook_size = codebook_size
        self.dim = dim
        self.codebook_dim = dim if codebook_dim is None else codebook_dim
        self.ema = ema
        self.decay = decay
        self.eps = eps
        self.beta = beta
        self.kmeans_iters = kmeans_iters
        self.dead_code_threshold = dead_code_threshold
        self.restart_after_steps = restart_after_steps
        self.cosine = cosine
        self.search_chunk_size = search_chunk_size
        self.search_fused = search_fused

        projected = self.codebook_dim != dim
        self.project_in = nn.Linear(dim, self.codebook_dim) if projected else nn.Identity()
        self.project_out = nn.Linear(self.codebook_dim, dim) if projected else nn.Identity()

        embed = torch.randn(codebook_size, self.codebook_dim)  # (K, Dc)
        if cosine:
            embed = l2_normalize(embed)
        if ema:
            self.register_buffer("embed", embed)
            # Every code starts with the weight of one vector at its position.
            self.register_buffer("cluster_size", torch.ones(codebook_size))
            self.register_buffer("embed_sum", embed.clone())
        else:
            self.embed = nn.Parameter(embed)
        self.register_buffer("initialized", torch.tensor(not kmeans_init))
        track_initialization(self)
        self.register_buffer("steps_unused", torch.zeros(codebook_size, dtype=torch.int64))

    @property
    def codebook(self) -> Tensor:
        """The effective (K, codebook_dim) codebook that ``forward`` searches (unit rows when cosine)."""
        return l2_normalize(self.embed) if self.cosine else self.embed

    def _to_codebook_space(self, flat: Tensor) -> Tensor:
        """Latent vectors (N, C) projected (and normalised when cosine) into codebook space (N, Dc)."""
        latents = self.project_in(flat)
        return l2_normalize(latents) if self.cosine else latents

    @torch.no_grad()
    def _set_codes(self, selected: Tensor, values: Tensor) -> None:
        """Overwrite the codes where the mask ``selected`` (K,) is set with those rows of ``values``
        (K, Dc), giving each the EMA weight of one vector."""
        keep = ~selected[:, None]  # (K, 1)
        if self.ema:
            self.embed.copy_(torch.where(keep, self.embed, values))
            self.embed_sum.copy_(torch.where(keep, self.embed_sum, values))
            self.cluster_size.masked_fill_(selected, 1.0)
        else:
            # Through .data: autograd may still hold the codebook for this step's backward. Rewritten
            # rows unused this step (or not yet searched) get no gradient; a code used by fewer than
            # dead_code_threshold vectors does, and that step's small update lands on its new row.
            self.embed.data.copy_(torch.where(keep, self.embed.data, values))

    @torch.no_grad()
    def _kmeans_init(self, latents: Tensor) -> None:
        """Set the codebook by k-means on this batch's vectors (N, Dc) and mark it initialised."""
        centres, counts = kmeans(
            latents,
            self.codebook_size,
            self.kmeans_iters,
            self.cosine,
            self.search_chunk_size,
            fused=self.search_fused,
        )
        all_codes = torch.ones(self.codebook_size, dtype=torch.bool, device=latents.device)
        self._set_codes(all_codes, centres)
        if self.ema:
            sizes = counts.clamp_min(1.0)  # (K,)
            self.cluster_size.copy_(sizes)
            self.embed_sum.copy_(centres * sizes[:, None])
        mark_initialized(self)

    @torch.no_grad()
    def _ema_update(self, counts: Tensor, sums: Tensor) -> None:
        """Move cluster sizes and embedding sums toward this step's (all-reduced) statistics."""
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        self.embed.copy_(self.embed_sum / laplace_smoothed(self.cluster_size, self.eps)[:, None])

    @torch.no_grad()
    def _restart_dead_codes(self, latents: Tensor, counts: Tensor) -> Tensor:
        """Re-seed codes unused for ``restart_after_steps`` steps from this batch; return how many (0-dim).

        Masked, with no branch on the number of dead codes: a step never waits for the device to
        report it, and under torch.compile the step stays one graph. The replacement rows come from
        rank 0 (the dead set is the same on every rank, since counts are all-reduced).
        """
        if latents.shape[0] == 0:  # an empty batch is no evidence of disuse, and offers no rows
            if distributed_world():  # skipping here alone would leave the other ranks' collective waiting
                raise ValueError(
                    "VectorQuantizer: an empty training batch under torch.distributed; every rank "
                    "needs vectors in every training step"
                )
            return latents.new_zeros((), dtype=torch.int64)
        self.steps_unused.add_(1).masked_fill_(counts >= self.dead_code_threshold, 0)
        dead = self.steps_unused >= self.restart_after_steps  # (K,)
        self._set_codes(dead, broadcast_from_first(restart_rows(latents, dead)))
        self.steps_unused.masked_fill_(dead, 0)
        return dead.sum()

    @torch.no_grad()
    def _train_step(self, latents: Tensor, indices: Tensor) -> Tensor:
        """Codebook updates for one training batch (N, Dc) with assignment (N,); return restarts."""
        if self.ema:
            counts, sums = all_reduced_cluster_sums(latents, indices, self.codebook_size)
            self._ema_update(counts, sums)
        if self.restart_after_steps is None:
            return latents.new_zeros((), dtype=torch.int64)
        if not self.ema:
            counts = all_reduce_sum(code_histogram(indices, self.codebook_size))
        return self._restart_dead_codes(latents, counts)

    def forward(self, z: Tensor) -> QuantizerOutput:
        """Quantize channel-first latents (B, C, H, W) with C == dim."""
        check_channels(z, self.dim, "z")
        batch, _, height, width = z.shape
        with torch.autocast(device_type=z.device.type, enabled=False):
            flat = z.float().permute(0, 2, 3, 1).reshape(-1, self.dim)  # (N, C)
            latents = self._to_codebook_space(flat)  # (N, Dc)
            if self.training and initialization_pending(self):
                self._kmeans_init(latents.detach())
            codebook = self.codebook  # (K, Dc)
            indices, _ = nearest_code(
                latents.detach(), codebook.detach(), self.search_chunk_size, fused=self.search_fused
            )  # (N,)
            quantized = F.embedding(indices, codebook)  # (N, Dc)
            commitment = F.mse_loss(latents, quantized.detach())
            loss = self.beta * commitment
            if not self.ema:
                loss = loss + F.mse_loss(latents.detach(), quantized)
            restarted = (
                self._train_step(latents.detach(), indices)
                if self.training
                else latents.new_zeros((), dtype=torch.int64)
            )
            quantized = latents + (quantized - latents).detach()  # straight-through estimator
            codes = self.project_out(quantized)  # (N, C)
        codes = codes.view(batch, height, width, self.dim).permute(0, 3, 1, 2)  # (B, C, H, W)
        indices = indices.view(batch, height, width)  # (B, H, W)
        stats = {
            **codebook_stats(indices, self.codebook_size),
            "commitment": commitment.detach(),
            "restarted_codes": restarted.float(),
        }
        return QuantizerOutput(codes.to(z.dtype), indices, loss, stats)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """Codes (B, C, H, W) in latent space for integer indices (B, H, W)."""
        check_indices(indices, self.codebook_size)
        with torch.autocast(device_type=indices.device.type, enabled=False):
            codes = self.project_out(F.embedding(indices.long(), self.codebook))  # (B, H, W, C)
        return codes.permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return (
            f"codebook_size={self.codebook_size}, dim={self.dim}, codebook_dim={self.codebook_dim}, "
            f"ema={self.ema}, cosine={self.cosine}, beta={self.beta}"
        )
