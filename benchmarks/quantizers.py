"""Quantizer speed against vector-quantize-pytorch, side by side in one process.

    python -m benchmarks.quantizers                      # CPU, sizes that fit a laptop
    python -m benchmarks.quantizers --device cuda        # GPU, the sizes RESULTS.md reports

Prints one markdown table per quantizer: milliseconds for forward (eval) and forward+backward
(training mode, EMA updates included for VQ), and the peer/ours ratio (> 1 means we are faster);
"OOM" marks a run that ran out of device memory. FSQ is timed on both of our paths, the fused
(compiled, one kernel each way; first call compiles, outside the timing) and the eager reference.
The FSQ table also gives the memory floor: the time to read float32 z and write float32 codes and
int32 indices at the device's measured copy bandwidth, and how far the fused path is from it, both as
the quantization alone ("fused kernel": ``FSQ.quantize``, codes and indices) and as the module call.
Every "fwd" is the whole module call, so it includes the usage statistics (a count of every code
and the perplexity) beside the kernel; a third table times that count, our scatter-add beside
``torch.bincount`` (which reads the largest index back to the host on CUDA).
"""

import argparse
import math
from collections.abc import Callable, Iterator

import torch

from benchmarks.common import copy_bandwidth, fast_path_report, machine_description, time_call
from imtok.quantizers import BSQ, FSQ, LFQ, ResidualFSQ, SimVQ, VectorQuantizer
from imtok.quantizers.common import scatter_counts

TABLE_ONE_SIZES = (2**8, 2**10, 2**12, 2**14, 2**16)


def latent_grid(num_vectors: int, channels: int, device: torch.device) -> torch.Tensor:
    """Random N(0, 1) latents (B, C, 64, 64) holding ``num_vectors`` vectors (one smaller square
    grid below 4,096 vectors)."""
    side = min(64, max(1, math.isqrt(num_vectors)))
    batch = max(1, num_vectors // (side * side))
    return torch.randn(batch, channels, side, side, device=device)


def forward_fn(module: torch.nn.Module, z: torch.Tensor) -> Callable[[], object]:
    """Inference-mode forward of a quantizer."""

    def run() -> object:
        with torch.no_grad():
            return module(z)

    return run


def forward_backward_fn(module: torch.nn.Module, z: torch.Tensor, codes_of: Callable) -> Callable[[], None]:
    """Training-mode forward and backward through the straight-through codes and any aux loss."""
    leaf = z.detach().clone().requires_grad_(True)

    def run() -> None:
        codes, loss = codes_of(module(leaf))
        (codes.float().mean() + loss).backward()
        leaf.grad = None

    return run


def measure(fn: Callable[[], object], device: torch.device, repeats: int) -> float | None:
    """Median seconds of ``fn``, or None when it runs out of device memory."""
    try:
        return time_call(fn, device, repeats=repeats)
    except torch.OutOfMemoryError:
        return None
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def time_pair(modules: dict, z: torch.Tensor, codes_of: dict, device: torch.device, repeats: int) -> dict:
    """Forward (eval) and forward+backward (train) timings of each named module on ``z``."""
    timings = {}
    for name, module in modules.items():
        module.eval()
        timings[f"{name}_fwd"] = measure(forward_fn(module, z), device, repeats)
        module.train()
        timings[f"{name}_fb"] = measure(forward_backward_fn(module, z, codes_of[name]), device, repeats)
    return timings


def memory_floor_bytes(z: torch.Tensor) -> int:
    """Bytes an FSQ forward must move at least: read float32 z, write float32 codes and int32 indices.

    int32 holds every Table-1 index; our indices are int64 (4 more bytes per vector, 8-15% more).
    """
    vectors = z.numel() // z.shape[1]
    return z.numel() * 4 * 2 + vectors * 4


def kernel_fn(module: FSQ, z: torch.Tensor) -> Callable[[], object]:
    """The quantization alone (``FSQ.quantize``: codes and indices, no usage statistics), no grad."""

    def run() -> object:
        with torch.no_grad():
            return module.quantize(z)

    return run


def fsq_rows(
    device: torch.device, num_vectors: int, repeats: int, sizes: tuple[int, ...] = TABLE_ONE_SIZES
) -> Iterator[str]:
    """Markdown rows: our fused and eager FSQ beside the peer's at every Table-1 size."""
    from vector_quantize_pytorch import FSQ as PeerFSQ

    bandwidth = copy_bandwidth(device)
    for size in sizes:
        levels = FSQ.levels_for(size)
        z = latent_grid(num_vectors, len(levels), device)
        modules = {
            "fused": FSQ(levels, fused=True).to(device),
            "eager": FSQ(levels, fused=False).to(device),
            "peer": PeerFSQ(levels=levels, channel_first=True).to(device),
        }
        ours = lambda out: (out.codes, out.loss)  # noqa: E731
        peer = lambda out: (out[0], torch.zeros((), device=device))  # noqa: E731
        codes_of = {"fused": ours, "eager": ours, "peer": peer}
        timings = time_pair(modules, z, codes_of, device, repeats)
        modules["fused"].eval()
        timings["kernel_fwd"] = measure(kernel_fn(modules["fused"], z), device, repeats)
        floor = memory_floor_bytes(z) / bandwidth
        yield _fsq_row(f"2^{size.bit_length() - 1} {levels}", z, timings, floor)


def _fsq_row(label: str, z: torch.Tensor, timings: dict[str, float | None], floor: float) -> str:
    def ms(key: str) -> str:
        return "OOM" if timings[key] is None else f"{timings[key] * 1e3:.3f}"

    def ratio(numerator: str, denominator: str) -> str:
        top, bottom = timings[numerator], timings[denominator]
        return "-" if top is None or bottom is None else f"{top / bottom:.2f}x"

    def off_floor(key: str) -> str:
        return "-" if timings[key] is None else f"{timings[key] / floor:.1f}x"

    vectors = z.numel() // z.shape[1]
    return (
        f"| {label} | {vectors:,} | {floor * 1e3:.3g} | {ms('kernel_fwd')} | {off_floor('kernel_fwd')} "
        f"| {ms('fused_fwd')} | {off_floor('fused_fwd')} | {ms('eager_fwd')} "
        f"| {ms('peer_fwd')} | {ratio('peer_fwd', 'fused_fwd')} | {ms('fused_fb')} | {ms('eager_fb')} "
        f"| {ms('peer_fb')} | {ratio('peer_fb', 'fused_fb')} |"
    )


FSQ_HEADER = (
    "| size | vectors | floor ms | fused kernel ms | kernel / floor | fused fwd ms | fused / floor "
    "| eager fwd ms | peer fwd ms | peer / fused fwd | fused fwd+bwd ms | eager fwd+bwd ms "
    "| peer fwd+bwd ms | peer / fused fwd+bwd |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def count_rows(
    device: torch.device, num_vectors: int, repeats: int, sizes: tuple[int, ...] = TABLE_ONE_SIZES
) -> Iterator[str]:
    """Markdown rows: the usage statistics' code counting, the scatter-add beside ``torch.bincount``."""
    for size in sizes:
        indices = torch.randint(0, size, (num_vectors,), device=device)
        ours = measure(lambda: scatter_counts(indices, size), device, repeats)  # noqa: B023
        bincount = measure(lambda: torch.bincount(indices, minlength=size), device, repeats)  # noqa: B023
        ratio = "-" if ours is None or bincount is None else f"{bincount / ours:.2f}x"
        cells = ["OOM" if t is None else f"{t * 1e3:.3g}" for t in (ours, bincount)]
        yield f"| 2^{size.bit_length() - 1} | {num_vectors:,} | {cells[0]} | {cells[1]} | {ratio} |"


COUNT_HEADER = (
    "| codes | indices | `scatter_counts` ms | `torch.bincount` ms | bincount / scatter |\n"
    "|---|---|---|---|---|"
)


SEARCH_PATHS = {"auto": None, "fused": True, "chunked": False}


def vq_rows(
    device: torch.device,
    num_vectors: int,
    dim: int,
    repeats: int,
    search: str = "auto",
    sizes: tuple[int, ...] = TABLE_ONE_SIZES,
) -> Iterator[str]:
    """Markdown rows comparing our EMA VQ with the peer's VectorQuantize at every Table-1 size."""
    from vector_quantize_pytorch import VectorQuantize

    for size in sizes:
        z = latent_grid(num_vectors, dim, device)
        # The same work on both sides: a straight-through backward (the peer's rotation trick is its
        # default for dim > 1) and no dead-code restarts (the peer's default).
        ours = VectorQuantizer(
            size, dim, kmeans_init=False, restart_after_steps=None, search_fused=SEARCH_PATHS[search]
        ).to(device)
        peer = VectorQuantize(
            dim=dim, codebook_size=size, accept_image_fmap=True, decay=0.99, rotation_trick=False
        ).to(device)
        with torch.no_grad():
            peer._codebook.embed.copy_(ours.codebook.unsqueeze(0))
        codes_of = {
            "ours": lambda out: (out.codes, out.loss),
            "peer": lambda out: (out[0], out[2].sum()),
        }
        timings = time_pair({"ours": ours, "peer": peer}, z, codes_of, device, repeats)
        del ours, peer
        yield _row(f"K=2^{size.bit_length() - 1}, dim {dim}", z, timings, "")


def newer_rows(
    device: torch.device, num_vectors: int, repeats: int, sizes: tuple[int, ...] = TABLE_ONE_SIZES
) -> Iterator[str]:
    """Markdown rows: LFQ and BSQ (entropy loss in training) beside the peer's LFQ (spherical for BSQ),
    SimVQ beside the peer's SimVQ on the same weights, residual FSQ (two stages of the Table-1 levels)
    beside the peer's ResidualFSQ, at every Table-1 size (2^d codes)."""
    from vector_quantize_pytorch import LFQ as PeerLFQ
    from vector_quantize_pytorch import ResidualFSQ as PeerResidualFSQ
    from vector_quantize_pytorch import SimVQ as PeerSimVQ

    codes_of = {"ours": lambda out: (out.codes, out.loss), "peer": lambda out: (out[0], out[2].sum())}
    for size in sizes:
        bits = size.bit_length() - 1
        z = latent_grid(num_vectors, bits, device)
        for name, ours in (("LFQ", LFQ(bits)), ("BSQ", BSQ(bits))):
            # the peer's defaults beside ours: entropy weight 0.1; no commitment on either side
            ours.commitment_weight = 0.0
            peer = PeerLFQ(dim=bits, codebook_size=size, channel_first=True, spherical=name == "BSQ")
            timings = time_pair(
                {"ours": ours.to(device), "peer": peer.to(device)}, z, codes_of, device, repeats
            )
            yield _row(f"{name} 2^{bits}", z, timings, "")
        dim = 8
        z = latent_grid(num_vectors, dim, device)
        ours = SimVQ(size, dim).to(device)
        peer = PeerSimVQ(dim=dim, codebook_size=size, channel_first=True, rotation_trick=False).to(device)
        with torch.no_grad():
            peer.frozen_codebook.copy_(ours.frozen_codebook)
            peer.code_transform.weight.copy_(ours.transform.weight)
        timings = time_pair({"ours": ours, "peer": peer}, z, codes_of, device, repeats)
        yield _row(f"SimVQ 2^{bits}, dim {dim}", z, timings, "")
        levels = FSQ.levels_for(size)
        z = latent_grid(num_vectors, len(levels), device)
        ours = ResidualFSQ(levels, stages=2).to(device)
        peer = PeerResidualFSQ(levels=levels, num_quantizers=2, is_channel_first=True).to(device)
        no_loss = {"ours": codes_of["ours"], "peer": lambda out: (out[0], 0.0)}
        timings = time_pair({"ours": ours, "peer": peer}, z, no_loss, device, repeats)
        yield _row(f"residual FSQ 2 x {levels}", z, timings, "")


def _row(label: str, z: torch.Tensor, timings: dict[str, float | None], floor: str) -> str:
    def ms(key: str) -> str:
        return "OOM" if timings[key] is None else f"{timings[key] * 1e3:.2f}"

    def ratio(kind: str) -> str:
        ours, peer = timings[f"ours_{kind}"], timings[f"peer_{kind}"]
        return "-" if ours is None or peer is None else f"{peer / ours:.2f}x"

    vectors = z.numel() // z.shape[1]
    return (
        f"| {label} | {vectors:,} | {floor} | {ms('ours_fwd')} | {ms('peer_fwd')} | {ratio('fwd')} "
        f"| {ms('ours_fb')} | {ms('peer_fb')} | {ratio('fb')} |"
    )


HEADER = (
    "| size | vectors | floor ms | ours fwd ms | peer fwd ms | fwd ratio | ours fwd+bwd ms "
    "| peer fwd+bwd ms | fwd+bwd ratio |\n|---|---|---|---|---|---|---|---|---|"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--fsq-vectors", type=int, default=None, help="latent vectors for FSQ")
    parser.add_argument("--vq-vectors", type=int, default=None, help="latent vectors for VQ")
    parser.add_argument("--vq-dim", type=int, default=8, help="VQ code dimension")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=list(TABLE_ONE_SIZES),
        choices=TABLE_ONE_SIZES,
        metavar="K",
        help="codebook sizes, from the FSQ paper's Table 1 (default: all of 256 1024 4096 16384 65536)",
    )
    parser.add_argument("--skip-fsq", action="store_true")
    parser.add_argument("--skip-vq", action="store_true")
    parser.add_argument("--skip-newer", action="store_true", help="skip LFQ, BSQ, SimVQ and residual FSQ")
    parser.add_argument("--newer-vectors", type=int, default=None, help="vectors for the newer ones")
    parser.add_argument(
        "--vq-search",
        choices=sorted(SEARCH_PATHS),
        default="auto",
        help="our VQ's nearest-code search: auto (fused on CUDA for dim <= 64), fused or chunked",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    fsq_vectors = args.fsq_vectors or (4_194_304 if on_gpu else 262_144)
    vq_vectors = args.vq_vectors or (65_536 if on_gpu else 8_192)
    torch.manual_seed(0)

    print(f"Machine: {machine_description(device)}\n")
    if not args.skip_fsq:
        print(f"FSQ, Table-1 levels, {fsq_vectors:,} latent vectors (peer: vector_quantize_pytorch.FSQ)\n")
        print(FSQ_HEADER)
        for row in fsq_rows(device, fsq_vectors, args.repeats, tuple(args.sizes)):
            print(row, flush=True)
        used = "scatter_counts" if device.type == "cuda" else "bincount, scatter_counts under torch.compile"
        print(f"\nCode counting for the usage statistics, {fsq_vectors:,} indices (used here: {used})\n")
        print(COUNT_HEADER)
        for row in count_rows(device, fsq_vectors, args.repeats, tuple(args.sizes)):
            print(row, flush=True)
    if not args.skip_vq:
        print(
            f"\nVQ (EMA codebook), {vq_vectors:,} latent vectors, dim {args.vq_dim}, our search: "
            f"{args.vq_search} (peer: VectorQuantize)\n"
        )
        print(HEADER)
        for row in vq_rows(device, vq_vectors, args.vq_dim, args.repeats, args.vq_search, tuple(args.sizes)):
            print(row, flush=True)
    if not args.skip_newer:
        newer_vectors = args.newer_vectors or (262_144 if on_gpu else 16_384)
        print(
            f"\nLFQ, BSQ (peer: LFQ, spherical=True), SimVQ (peer: SimVQ, same weights) and residual FSQ "
            f"(peer: ResidualFSQ), "
            f"{newer_vectors:,} latent vectors; fwd+bwd includes the entropy loss over every code\n"
        )
        print(HEADER)
        for row in newer_rows(device, newer_vectors, args.repeats, tuple(args.sizes)):
            print(row, flush=True)
    print()
    print(fast_path_report())


if __name__ == "__main__":
    main()
