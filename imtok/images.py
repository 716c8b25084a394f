"""Image grids for people: reconstructions beside their inputs, samples with one class per row."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from imtok.atomic import match_mode


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


def grid_pixels(images: Tensor, per_row: int = 8, padding: int = 2) -> np.ndarray:
    """uint8 RGB (H, W, 3) of [-1, 1] images (N, C, H, W) tiled ``per_row`` to a row on white.

    Values are clamped to [-1, 1] and rounded from [0, 255]; one-channel images become grey RGB.
    Tiles sit ``padding`` pixels apart and from the border, as torchvision's ``make_grid`` lays out two
    or more (it returns a single image unpadded; here one image gets its border too).
    """
    if images.ndim != 4 or images.shape[0] == 0 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"images: expected a non-empty (N, C, H, W) batch with C 1 or 3, got shape {tuple(images.shape)}"
        )
    if per_row < 1 or padding < 0:
        raise ValueError(f"per_row must be >= 1 and padding >= 0, got {per_row} and {padding}")
    tiles = (images.detach().float().cpu().clamp(-1, 1) + 1) / 2
    tiles = tiles.expand(-1, 3, -1, -1)
    count, _, height, width = tiles.shape
    columns = min(per_row, count)
    rows = -(-count // columns)
    step_y, step_x = height + padding, width + padding
    canvas = torch.ones(3, rows * step_y + padding, columns * step_x + padding)
    for index in range(count):
        y, x = (index // columns) * step_y + padding, (index % columns) * step_x + padding
        canvas[:, y : y + height, x : x + width] = tiles[index]
    return canvas.mul(255).add(0.5).clamp(0, 255).permute(1, 2, 0).to(torch.uint8).numpy()


def save_grid(images: Tensor, path: str | os.PathLike[str], per_row: int = 8, padding: int = 2) -> Path:
    """Write [-1, 1] images (N, C, H, W) as one PNG grid of ``per_row`` columns, atomically."""
    pixels = grid_pixels(images, per_row, padding)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        dir=path.parent, prefix=f".{path.stem}.", suffix=".png", delete=False
    ) as f:
        temp = Path(f.name)
    try:
        Image.fromarray(pixels).save(temp, format="PNG")
        match_mode(temp, path)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    return path
