"""Image grids: the layout of torchvision's make_grid/save_image, written atomically."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from imtok.images import grid_pixels, paired_rows, save_grid


def batch(count: int, channels: int, height: int = 7, width: int = 5) -> torch.Tensor:
    generator = torch.Generator().manual_seed(count * 10 + channels)
    return torch.rand(count, channels, height, width, generator=generator) * 2.4 - 1.2  # overshoots [-1, 1]


@pytest.mark.parametrize(
    ("count", "channels", "per_row", "padding"), [(2, 1, 8, 2), (10, 3, 4, 2), (6, 1, 3, 0)]
)
def test_the_png_has_the_pixels_torchvision_writes(tmp_path, count, channels, per_row, padding):
    from torchvision.utils import make_grid, save_image

    images = batch(count, channels)
    ours = save_grid(images, tmp_path / "ours.png", per_row=per_row, padding=padding)
    reference = make_grid(images.clamp(-1, 1), nrow=per_row, padding=padding, pad_value=1.0)
    save_image(reference, tmp_path / "reference.png", normalize=True, value_range=(-1, 1))
    with Image.open(ours) as a, Image.open(tmp_path / "reference.png") as b:
        assert a.mode == b.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_tiles_sit_on_white_in_rows():
    images = -torch.ones(5, 1, 4, 3)  # black tiles
    pixels = grid_pixels(images, per_row=2, padding=1)
    assert pixels.shape == (3 * 5 + 1, 2 * 4 + 1, 3)
    black = (pixels == 0).all(axis=2)
    assert black.sum() == 5 * 4 * 3
    assert black[1:5, 1:4].all() and black[11:15, 1:4].all() and not black[11:15, 5:8].any()
    assert (pixels[~black] == 255).all()


def test_paired_rows_put_each_row_of_reconstructions_under_its_inputs():
    images, reconstructions = torch.zeros(5, 1, 2, 2), torch.ones(5, 1, 2, 2)
    rows = paired_rows(images, reconstructions, per_row=2)
    assert [float(tile.mean()) for tile in rows] == [0, 0, 1, 1, 0, 0, 1, 1, 0, 1]


def test_a_failed_write_leaves_the_old_grid_and_no_temporary(tmp_path, monkeypatch):
    path = save_grid(batch(2, 1), tmp_path / "grid.png")
    before = path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        save_grid(batch(3, 1), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]


@pytest.mark.parametrize(
    ("images", "match"),
    [
        (torch.zeros(0, 1, 4, 4), "non-empty"),
        (torch.zeros(2, 2, 4, 4), "C 1 or 3"),
        (torch.zeros(4, 4), "shape"),
    ],
)
def test_bad_batches_are_refused(tmp_path, images, match):
    with pytest.raises(ValueError, match=match):
        save_grid(images, tmp_path / "grid.png")
    assert not list(tmp_path.iterdir())
