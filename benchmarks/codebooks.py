"""What a large codebook costs: MaskGIT training and decoding, and Regularized VQ, at K = 2^8 ... 2^14.

    python -m benchmarks.codebooks                    # CPU, the codebook-size study's model sizes
    python -m benchmarks.codebooks --device cuda --batch-size 256 --grid 16

Side by side in one run, at every codebook size:
- **MaskGIT training step** (forward, loss, backward, AdamW) with the output head on the masked
  positions only (``MaskGIT.forward(..., positions=mask)``, what training uses) against the head on
  every position followed by selecting the masked logits (the straightforward way); ratio = full /
  masked-only. The loss is the same either way.
- **MaskGIT decoding** (``maskgit_decode``, 12 steps) of ``--samples`` grids, images/s.
- **Regularized VQ training step** (forward and backward of the quantizer alone on ``--batch-size``
  x grid latents) and, inside it, the Gumbel noise drawn from uniforms in place (what the quantizer
  does) against ``Tensor.exponential_``; ratio = exponential_ / uniforms.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import machine_description, time_call
from imtok.models.maskgit import MaskGIT, MaskGITConfig, masked_token_loss, random_token_mask
from imtok.quantizers.regvq import DEFAULT_MASK_RATIO, RegularizedVQ
from imtok.sampling import maskgit_decode

SIZES = (2**8, 2**10, 2**12, 2**14)


def maskgit_step(model: MaskGIT, optimizer, tokens, labels, masked_only: bool) -> None:
    batch, h, w = tokens.shape
    mask = random_token_mask(batch, h * w, tokens.device).view(batch, h, w)
    inputs = tokens.masked_fill(mask, model.config.mask_id)
    logits = model(inputs, labels, positions=mask) if masked_only else model(inputs, labels)
    loss, _ = masked_token_loss(logits, tokens, mask, model.config.label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def row(size: int, args: argparse.Namespace, device: torch.device) -> str:
    torch.manual_seed(0)
    grid = (args.grid, args.grid)
    repeats = args.repeats
    config = MaskGITConfig(
        codebook_size=size, grid=grid, num_classes=10, hidden_dim=args.hidden_dim, depth=args.depth, heads=4
    )
    model = MaskGIT(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, size, (args.batch_size, *grid), device=device)
    labels = torch.randint(0, 10, (args.batch_size,), device=device)
    masked = time_call(lambda: maskgit_step(model, optimizer, tokens, labels, True), device, repeats=repeats)
    full = time_call(lambda: maskgit_step(model, optimizer, tokens, labels, False), device, repeats=repeats)
    model.eval()
    generator = torch.Generator(device).manual_seed(0)
    classes = torch.arange(args.samples, device=device) % 10

    def decode() -> None:
        with torch.no_grad():
            maskgit_decode(model, args.samples, grid, size, steps=12, labels=classes, generator=generator)

    decode_s = time_call(decode, device, warmup=1, repeats=max(1, repeats // 2))
    quantizer = RegularizedVQ(size, args.code_dim).to(device).train()
    latents = torch.randn(args.batch_size, args.code_dim, *grid, device=device, requires_grad=True)

    def regvq_step() -> None:
        out = quantizer(latents)
        (out.codes.square().mean() + out.loss).backward()
        latents.grad = None

    regvq = time_call(regvq_step, device, repeats=repeats)
    rows = int(args.batch_size * args.grid * args.grid * DEFAULT_MASK_RATIO)
    shape = torch.empty(rows, size, device=device)
    exponential = time_call(lambda: torch.empty_like(shape).exponential_().log_(), device, repeats=repeats)
    uniforms = time_call(lambda: torch.rand_like(shape).log_().neg_().log_(), device, repeats=repeats)
    cells = [
        f"{masked * 1e3:.1f}",
        f"{full * 1e3:.1f}",
        f"{full / masked:.2f}x",
        f"{args.samples / decode_s:,.0f}",
        f"{regvq * 1e3:.1f}",
        f"{uniforms * 1e3:.1f}",
        f"{exponential * 1e3:.1f}",
        f"{exponential / uniforms:.2f}x",
    ]
    return f"| {size} | " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--grid", type=int, default=7, help="token grid side (7: 28x28 images, f = 4)")
    parser.add_argument("--hidden-dim", type=int, default=96)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--code-dim", type=int, default=8)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=6)
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"- machine: {machine_description(device)}")
    side = f"{args.grid}x{args.grid}"
    print(
        f"- MaskGIT {args.hidden_dim} wide, {args.depth} blocks, batch {args.batch_size} of {side} tokens; "
        f"decoding {args.samples} grids in 12 steps; RegVQ dim {args.code_dim}, "
        f"mask ratio {DEFAULT_MASK_RATIO}"
    )
    print()
    print(
        "| codes | MaskGIT step, head on masked ms | head on all ms | ratio | decode images/s "
        "| RegVQ step ms | Gumbel noise, uniforms ms | exponential_ ms | ratio |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for size in args.sizes:
        print(row(size, args, device), flush=True)


if __name__ == "__main__":
    main()
