"""The FID InceptionV3: the network, its input resize and its weights, which are never downloaded.

FID (Heusel et al. 2017) is defined by one network: the TensorFlow InceptionV3 graph of 2015-12-05,
whose 2048-d pool3 features the original TTUR code compared. pytorch-fid and torch-fidelity ship it
converted to PyTorch (``pt_inception-2015-12-05-6726825d.pth`` and
``weights-inception-2015-12-05-6726825d.pth``, same layout). It is *not* torchvision's ImageNet
InceptionV3: the FID graph has 1008 classes and three pooling differences, kept here because FID
values are only comparable when computed by the very same function:

- the average pools inside Mixed_5b..5d, 6b..6e and Mixed_7b exclude the zero padding from the mean
  (``count_include_pad=False``), as TensorFlow's did;
- Mixed_7c's pool branch is a 3x3 *max* pool (stride 1), where the paper and torchvision average;
- images are resized to 299x299 with TensorFlow 1.x bilinear resampling (``align_corners=False``
  there means source coordinate = destination x in/out, no half-pixel offset; that is not
  ``F.interpolate(..., align_corners=False)``), from uint8 values cast to float, and only then
  scaled by ``(x - 128) / 128``.

This module follows torch-fidelity's ``FeatureExtractorInceptionV3`` in each of these steps, so the
two give the same features for the same uint8 images; the tests check that. ``load_inception_weights``
looks for the weights in a configured file (argument or ``IMTOK_INCEPTION_WEIGHTS``) and in torch
hub's checkpoint cache, where pytorch-fid and torch-fidelity download them. When there are none it
says where it looked; no feature is ever computed with random weights.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from imtok.data.shards import to_uint8
from imtok.weights import Cache, FoundWeights, Setting, existing, locate_weights

# The environment variable naming a local weights file (an explicit argument takes precedence).
WEIGHTS_ENV = "IMTOK_INCEPTION_WEIGHTS"
# File names of the FID weights in torch hub's checkpoint cache: pytorch-fid's, then torch-fidelity's.
TORCH_HUB_FILENAMES = (
    "pt_inception-2015-12-05-6726825d.pth",
    "weights-inception-2015-12-05-6726825d.pth",
)
INPUT_SIZE = 299
FEATURE_DIM = 2048
# The TF graph's classifier has 1008 outputs (1000 ImageNet classes plus unused ones); torchvision's
# ImageNet InceptionV3 has 1000, which is how the two checkpoints are told apart.
NUM_CLASSES = 1008
# BatchNorm's step counter: absent from older checkpoints and never used in eval mode.
OPTIONAL_SUFFIX = ".num_batches_tracked"


# ---------------------------------------------------------------------------------------------------
# Network


class BasicConv2d(nn.Module):
    """Convolution without bias, BatchNorm (TensorFlow's eps 1e-3), ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def tf_avg_pool(x: Tensor) -> Tensor:
    """3x3 stride-1 average pool whose border means exclude the padding, as TensorFlow's 'SAME' pool."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block: 1x1, 5x5, double 3x3 and pooled 1x1 branches."""

    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.branch_pool(tf_avg_pool(x))
        return torch.cat([self.branch1x1(x), branch5x5, branch3x3dbl, branch_pool], dim=1)


class InceptionB(nn.Module):
    """35x35 -> 17x17 reduction: strided 3x3, strided double 3x3 and a max pool."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([self.branch3x3(x), branch3x3dbl, branch_pool], dim=1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (1x7 then 7x1)."""

    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = x
        for layer in (
            self.branch7x7dbl_1,
            self.branch7x7dbl_2,
            self.branch7x7dbl_3,
            self.branch7x7dbl_4,
            self.branch7x7dbl_5,
        ):
            branch7x7dbl = layer(branch7x7dbl)
        branch_pool = self.branch_pool(tf_avg_pool(x))
        return torch.cat([self.branch1x1(x), branch7x7, branch7x7dbl, branch_pool], dim=1)


class InceptionD(nn.Module):
    """17x17 -> 8x8 reduction."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = x
        for layer in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            branch7x7x3 = layer(branch7x7x3)
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([branch3x3, branch7x7x3, branch_pool], dim=1)


class InceptionE(nn.Module):
    """8x8 block with split 1x3 / 3x1 outputs; ``max_pool`` selects the FID graph's Mixed_7c pooling."""

    def __init__(self, in_channels: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(in_channels, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], dim=1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], 1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else tf_avg_pool(x)
        branch_pool = self.branch_pool(pooled)
        return torch.cat([self.branch1x1(x), branch3x3, branch3x3dbl, branch_pool], dim=1)


def resize_like_tf1(images: Tensor, size: int) -> Tensor:
    """Bilinear resize of float (B, C, H, W) to (B, C, size, size) as TensorFlow 1.x computed it.

    TF 1.x's ``resize_bilinear(align_corners=False)`` samples output pixel i at source coordinate
    ``i * in / out`` (no half-pixel centres), blending the two neighbours ``floor`` and
    ``min(floor + 1, in - 1)``. Coordinates are computed in float32 and rows are blended before
    columns, the same operations in the same order as torch-fidelity, so the results are equal.
    """

    def taps(in_size: int) -> tuple[Tensor, Tensor, Tensor]:
        scale = torch.tensor(in_size / size, dtype=torch.float32)
        coords = torch.arange(size, dtype=images.dtype, device=images.device) * scale  # (size,)
        low = coords.long()  # coords >= 0, so truncation is floor
        high = (low + 1).clamp_max(in_size - 1)
        return low, high, coords - low.float()

    y_low, y_high, dy = taps(images.shape[2])
    x_low, x_high, dx = taps(images.shape[3])
    rows = (images[:, :, y_low, :], images[:, :, y_high, :])  # 2 x (B, C, size, W)
    left_low, right_low = rows[0][..., x_low], rows[0][..., x_high]  # (B, C, size, size)
    left_high, right_high = rows[1][..., x_low], rows[1][..., x_high]
    top = left_low + (right_low - left_low) * dx.view(1, 1, 1, size)
    bottom = left_high + (right_high - left_high) * dx.view(1, 1, 1, size)
    return top + (bottom - top) * dy.view(1, 1, size, 1)


class FIDInceptionV3(nn.Module):
    """The FID InceptionV3 up to its 2048-d pool3 features (plus the 1008-way ``fc`` the file holds).

    Parameter names match pytorch-fid's and torch-fidelity's checkpoints, so their state dicts load
    strictly. ``forward`` takes uint8 (B, 3, H, W) images of any size and returns float32 (B, 2048).
    """

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(FEATURE_DIM, NUM_CLASSES)  # unused by FID; kept so the file loads strictly

    def forward(self, images: Tensor) -> Tensor:
        x = resize_like_tf1(images.float(), INPUT_SIZE)  # (B, 3, 299, 299), values in [0, 255]
        x = (x - 128) / 128
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (B, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (B, 288, 35, 35)
        x = self.Mixed_6a(x)  # (B, 768, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))  # (B, 768, 17, 17)
        x = self.Mixed_7a(x)  # (B, 1280, 8, 8)
        x = self.Mixed_7c(self.Mixed_7b(x))  # (B, 2048, 8, 8)
        return x.mean(dim=(2, 3))  # (B, 2048)


# ---------------------------------------------------------------------------------------------------
# Weights


@cache
def expected_shapes() -> dict[str, tuple[int, ...]]:
    """State-dict name -> shape of the FID InceptionV3, as torch-fidelity's extractor expects them."""
    with torch.device("meta"):
        model = FIDInceptionV3()
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def torch_hub_checkpoints() -> list[Path]:
    """Where pytorch-fid and torch-fidelity keep the weights (``$TORCH_HOME/hub/checkpoints``)."""
    directory = Path(torch.hub.get_dir()) / "checkpoints"
    return [directory / name for name in TORCH_HUB_FILENAMES]


def check_inception_state_dict(state_dict: dict[str, Tensor], path: str | Path) -> dict[str, Tensor]:
    """``state_dict`` without a ``module.`` prefix, or a ValueError naming ``path`` and what is wrong."""
    state_dict = {key.removeprefix("module."): value for key, value in state_dict.items()}
    expected = expected_shapes()
    required = {name for name in expected if not name.endswith(OPTIONAL_SUFFIX)}
    missing = sorted(required - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if unexpected and any(name.startswith("AuxLogits.") for name in unexpected):
        raise ValueError(
            f"Inception weights file {path}: holds AuxLogits.*, so it is torchvision's ImageNet "
            "InceptionV3, not the FID network; use pytorch-fid's or torch-fidelity's "
            f"{TORCH_HUB_FILENAMES[0]} / {TORCH_HUB_FILENAMES[1]}"
        )
    if missing or unexpected:
        raise ValueError(
            f"Inception weights file {path}: not the FID InceptionV3 state dict "
            f"({len(missing)} missing tensors, first: {', '.join(missing[:3]) or '-'}; "
            f"{len(unexpected)} unexpected, first: {', '.join(unexpected[:3]) or '-'})"
        )
    wrong = [
        f"{name} {tuple(value.shape)} != {expected[name]}"
        for name, value in state_dict.items()
        if tuple(value.shape) != expected[name]
    ]
    if wrong:
        raise ValueError(
            f"Inception weights file {path}: tensor shapes do not match the FID InceptionV3 "
            f"({'; '.join(wrong[:3])})"
        )
    return state_dict


def read_inception_weights(path: str | Path) -> dict[str, Tensor]:
    """The FID InceptionV3 state dict in ``path`` (a torch .pth), its keys and shapes checked."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"Inception weights file {path} does not exist (given as an argument or by {WEIGHTS_ENV})"
        )
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt or foreign files fail in many library-specific ways
        raise ValueError(f"Inception weights file {path} could not be read: {error}") from error
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(isinstance(value, Tensor) for value in loaded.values()):
        raise ValueError(f"Inception weights file {path}: expected a state dict of tensors")
    return check_inception_state_dict(loaded, path)


def load_inception_weights(path: str | Path | None = None) -> FoundWeights:
    """Find the FID InceptionV3 weights on this machine (``imtok.weights``); only the local disk is read.

    Order: (a) ``path``, (b) the file named by ``IMTOK_INCEPTION_WEIGHTS`` (a configured file that is
    missing or wrong is an error, not a fallback), (c) torch hub's checkpoint cache
    (``$TORCH_HOME/hub/checkpoints``) under pytorch-fid's or torch-fidelity's file name. When nothing
    is found the state dict is None and ``reason`` lists the places checked and how to provide them.
    """
    checkpoints = torch_hub_checkpoints()
    return locate_weights(
        "FID InceptionV3 weights",
        [Setting("an explicit path", path), Setting(WEIGHTS_ENV, os.environ.get(WEIGHTS_ENV))],
        [
            Cache(
                f"torch hub cache: {' or '.join(map(str, checkpoints))}",
                lambda: next((found for found in map(existing, checkpoints) if found is not None), None),
            )
        ],
        read_inception_weights,
        f"To enable, copy {TORCH_HUB_FILENAMES[0]} (pytorch-fid) or {TORCH_HUB_FILENAMES[1]} "
        f"(torch-fidelity) to this machine and set {WEIGHTS_ENV} to its path (or place it at (c)).",
    )


# ---------------------------------------------------------------------------------------------------
# Feature extractor


class InceptionFeatures(nn.Module):
    """2048-d FID features of images; its metrics carry the standard names (``fid``, ``precision``).

    Takes (B, 1 | 3, H, W) images, uint8 in [0, 255] or float in [-1, 1]; float images are first
    quantised to uint8 exactly as they would be saved to PNG (``imtok.data.shards.to_uint8``), so the
    FID of generated images equals the FID of their saved files. One channel is repeated to three.
    Runs in float32 and eval mode, without gradients. ``source`` names the weights file.
    """

    name = "inception"
    feature_dim = FEATURE_DIM

    def __init__(self, state_dict: dict[str, Tensor], source: str = "given state dict") -> None:
        super().__init__()
        self.network = FIDInceptionV3()
        self.network.load_state_dict(check_inception_state_dict(state_dict, source), strict=False)
        self.source = source
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_file(cls, path: str | Path | None = None) -> InceptionFeatures:
        """Features with the weights ``load_inception_weights`` finds; FileNotFoundError with the reason."""
        weights = load_inception_weights(path)
        if weights.state_dict is None:
            raise FileNotFoundError(weights.reason)
        return cls(weights.state_dict, weights.source or "given state dict")

    def train(self, mode: bool = True) -> InceptionFeatures:
        """Stay in eval mode: BatchNorm must use the stored statistics."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """(B, 2048) float32 features of (B, 1 | 3, H, W) uint8 or [-1, 1] float images."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images: expected shape (B, 1 | 3, H, W), got {tuple(images.shape)}")
        if images.dtype != torch.uint8:
            if not images.is_floating_point():
                raise ValueError(f"images: expected uint8 or float in [-1, 1], got {images.dtype}")
            finite = torch.isfinite(images).flatten(1).all(dim=1)
            if not bool(finite.all()):
                raise ValueError(
                    f"images: {int((~finite).sum())} of {len(images)} hold NaN or infinite pixels (a "
                    "diverged generator or decoder), which would be scored as black images"
                )
            images = to_uint8(images)
        device = next(self.network.parameters()).device
        return self.network(images.to(device).expand(-1, 3, -1, -1))
