"""Codebook usage of every quantizer on random latents, at the FSQ paper's Table-1 codebook sizes.

    python -m demos.quantizers [--sizes 8 10 12] [--steps 30]

Each VQ-style quantizer first takes ``--steps`` training steps on fresh N(0, 1) batches of 4,096
vectors (EMA or k-means updates, dead-code restarts, Adam on learned codebooks), then every
quantizer is evaluated on one held-out batch of at least 4 vectors per code. ``usage`` is the
fraction of codes used at least once, ``perplexity`` the exponential of the code distribution's
entropy (K for a perfectly uniform one).
"""

import argparse
import time

import torch

from imtok.quantizers import BSQ, FSQ, LFQ, RegularizedVQ, ResidualFSQ, SimVQ, VectorQuantizer
from imtok.quantizers.common import codebook_stats

VQ_DIM = 8
TRAIN_BATCH_VECTORS = 4096
GRID_SIDE = 32


def random_latents(num_vectors: int, channels: int, generator: torch.Generator) -> torch.Tensor:
    """N(0, 1) latents (B, C, 32, 32) holding at least ``num_vectors`` vectors."""
    batch = -(-num_vectors // GRID_SIDE**2)
    return torch.randn(batch, channels, GRID_SIDE, GRID_SIDE, generator=generator)


def quantizers_for(codebook_size: int) -> dict[str, torch.nn.Module]:
    """The quantizers compared at one codebook size (a power of two), by display name."""
    bits = codebook_size.bit_length() - 1
    return {
        f"FSQ {FSQ.levels_for(codebook_size)}": FSQ(FSQ.levels_for(codebook_size)),
        "VQ, EMA + k-means init + restarts": VectorQuantizer(codebook_size, VQ_DIM),
        "VQ, EMA, no init, no restarts": VectorQuantizer(
            codebook_size, VQ_DIM, kmeans_init=False, restart_after_steps=None
        ),
        "Regularized VQ": RegularizedVQ(codebook_size, VQ_DIM),
        "SimVQ": SimVQ(codebook_size, VQ_DIM),
        f"LFQ, {bits} bits": LFQ(bits),
        f"BSQ, {bits} bits": BSQ(bits),
        f"residual FSQ, 2 x {FSQ.levels_for(codebook_size)}": ResidualFSQ(FSQ.levels_for(codebook_size)),
    }


def train_steps(
    quantizer: torch.nn.Module, steps: int, batch_vectors: int, generator: torch.Generator
) -> None:
    """Let a quantizer adapt to the latent distribution; the learned-codebook ones get SGD steps."""
    quantizer.train()
    parameters = [p for p in quantizer.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=1e-2) if parameters else None
    for _ in range(steps):
        output = quantizer(random_latents(batch_vectors, quantizer_dim(quantizer), generator))
        if optimizer is not None:
            optimizer.zero_grad()
            output.loss.backward()
            optimizer.step()


def quantizer_dim(quantizer: torch.nn.Module) -> int:
    """Channel count a quantizer expects."""
    return quantizer.dim


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 10, 12], help="log2 codebook sizes")
    parser.add_argument("--steps", type=int, default=30, help="training steps before evaluation")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    print("| codebook size | quantizer | usage | perplexity | seconds |")
    print("|---|---|---|---|---|")
    for log2_size in args.sizes:
        codebook_size = 2**log2_size
        eval_vectors = max(4 * codebook_size, 16_384)
        for name, quantizer in quantizers_for(codebook_size).items():
            generator = torch.Generator().manual_seed(args.seed)
            start = time.perf_counter()
            train_steps(quantizer, args.steps, TRAIN_BATCH_VECTORS, generator)
            quantizer.eval()
            with torch.no_grad():
                indices = quantizer(random_latents(eval_vectors, quantizer_dim(quantizer), generator)).indices
            stats = codebook_stats(indices, quantizer.codebook_size)
            seconds = time.perf_counter() - start
            print(
                f"| 2^{log2_size} ({quantizer.codebook_size}) | {name} | {stats['usage'].item():.1%} "
                f"| {stats['perplexity'].item():.0f} | {seconds:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
