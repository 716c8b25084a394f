"""FSQ's default CPU forward (eval, no grad: the eager path) beside vector-quantize-pytorch's FSQ, one
process, every Table-1 size. No compilation: what a user's CPU inference and token extraction run.

    python -m benchmarks.fsq_cpu [--vectors 1048576] [--repeats 10] [--threads 2]

To time another commit's FSQ the same way, put its checkout first on PYTHONPATH.
"""

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from benchmarks.common import machine_description

SIZES = (2**8, 2**10, 2**12, 2**14, 2**16)


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> None:
    from vector_quantize_pytorch import FSQ as PeerFSQ

    from imtok.quantizers import FSQ

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vectors", type=int, default=1_048_576, help="latent vectors (B x 64 x 64)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    machine = machine_description(torch.device("cpu"))
    print(f"Machine: {machine}; {args.threads} threads; {args.vectors:,} vectors\n")
    print("| levels | ours fwd ms | peer fwd ms | peer / ours |\n|---|---|---|---|")
    for size in SIZES:
        levels = FSQ.levels_for(size)
        torch.manual_seed(0)
        side = 64 if args.vectors >= 4096 else 8
        z = torch.randn(max(1, args.vectors // side**2), len(levels), side, side)
        ours, peer = FSQ(levels).eval(), PeerFSQ(levels=levels, channel_first=True).eval()
        assert not ours.uses_fused(z), "the CPU default is the eager path"
        with torch.no_grad():
            mine = median_ms(lambda: ours(z), args.repeats)  # noqa: B023
            theirs = median_ms(lambda: peer(z), args.repeats)  # noqa: B023
        print(f"| {levels} | {mine:.1f} | {theirs:.1f} | {theirs / mine:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
