"""Image grids for people: reconstructions beside their inputs, samples with one class per row."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from torch import Tensor


def paired_rows(images: Tensor, reconstructions: Tensor, per_row: int = 8) -> Tensor:
    """(2N, C, H, W): rows of ``per_row`` inputs, each followed by the row of their reconstructions."""
    if images.shape != reconstructions.shape:
        raise ValueError(
            f"reconstructions: shape {tuple(reconstructions.shape)} differs from images {tuple(images.shape)}"
        )
    rows = []
    for start in range(0, images.shape[0], per_row):
        rows += [images[start : start + per_row], reconstructions[start : start + per_row]]
    return torch.cat(rows)


def save_grid(images: Tensor, path: str | os.PathLike[str], per_row: int = 8, padding: int = 2) -> Path:
    """Write [-1, 1] images (N, C, H, W) as one PNG grid of ``per_row`` columns, atomically."""
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"images: expected a non-empty (N, C, H, W) batch, got shape {tuple(images.shape)}")
    # Imported here: torchvision.utils loads torchvision's models and torch._dynamo (about 3 s of
    # start-up for every stage that imports this module, most of which write a grid only at the end).
    from torchvision.utils import make_grid, save_image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = make_grid(images.detach().float().cpu().clamp(-1, 1), nrow=per_row, padding=padding, pad_value=1.0)
    with tempfile.NamedTemporaryFile(
        dir=path.parent, prefix=f".{path.stem}.", suffix=".png", delete=False
    ) as f:
        temp = Path(f.name)
    try:
        save_image(grid, temp, normalize=True, value_range=(-1, 1))
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    return path
