"""Where images come from: Fashion-MNIST IDX files, image folders, and seeded synthetic shapes.

The sources share no base class, only the shape described by the ``Source`` protocol, which is what
``imtok.data.shards.write_split`` relies on. Splits are named ``train`` and ``val``: Fashion-MNIST's
val split is its official test set; sources without an official split hold out a seeded
``val_fraction``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import os
import re
import struct
import time
import urllib.request
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from imtok import layout
from imtok.params import PrepareParams

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


class UnreadableImage(Exception):
    """An image that cannot be decoded; prepare skips it, counts it and lists it in its report."""


class EmptySource(ValueError):
    """A source that holds no images at all."""


@dataclass(frozen=True)
class SourceItem:
    key: str  # the sample's __key__ in the shards: unique in its split, no dots
    label: int
    origin: str  # where the image came from (file path, or IDX file and index), for reports


class Source(Protocol):
    """What every source provides."""

    kind: str  # the prepare.source value
    location: str  # where the images come from, for reports
    class_names: list[str]
    image_size: int
    channels: int

    def items(self, split: str) -> list[SourceItem]:
        """The split's items in write order, deterministic for the source's seed."""
        ...

    def load(self, item: SourceItem) -> np.ndarray:
        """uint8 (image_size, image_size) or (image_size, image_size, 3); ``UnreadableImage`` if broken."""
        ...

    def checksum(self, split: str) -> str:
        """``sha256:...`` of the split's source data, recorded in the shards' meta.json."""
        ...


def _fit_mode(image: Image.Image, channels: int) -> Image.Image:
    """Convert any PIL mode to 8-bit L (channels=1) or RGB (channels=3); transparency goes on white."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        # 16-bit grayscale: keep the top 8 bits rather than clipping everything above 255 to white
        image = Image.fromarray((np.asarray(image).astype(np.uint32) >> 8).astype(np.uint8), mode="L")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    target = "L" if channels == 1 else "RGB"
    return image if image.mode == target else image.convert(target)


def fit_image(image: Image.Image, image_size: int, channels: int) -> np.ndarray:
    """Resize the shorter side to ``image_size`` and centre-crop: uint8 (S, S) or (S, S, 3)."""
    image = _fit_mode(image, channels)
    width, height = image.size
    if (width, height) != (image_size, image_size):
        side = min(width, height)
        left, top = (width - side) / 2, (height - side) / 2
        # one resampling pass over the centred square: crop and resize together
        image = image.resize(
            (image_size, image_size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side)
        )
    return np.array(image, dtype=np.uint8)  # a writable copy (torch.from_numpy warns on read-only)


def _seeded_split(count: int, val_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Indices of a seeded train/val split of ``count`` items, each in a seeded order."""
    if count < 2:
        raise EmptySource(f"{count} image(s) cannot be split into train and val; at least 2 are needed")
    order = np.random.default_rng(seed).permutation(count)
    n_val = min(count - 1, max(1, round(count * val_fraction)))
    return {"val": order[:n_val], "train": order[n_val:]}


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; the splits are {', '.join(SPLITS)}")


# ----------------------------------------------------------------------------------------------------
# Fashion-MNIST

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist
FASHION_MNIST_MIRRORS = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
)
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


@dataclass(frozen=True)
class IdxFile:
    """One gzipped IDX file and the checksums that identify it.

    ``gz_md5`` is the MD5 of the .gz file as published by Zalando Research; ``payload_sha256`` is the
    SHA-256 of the decompressed IDX bytes (taken from Debian's package, which recompresses the files,
    so their .gz MD5s differ from the published ones while the data is the same). A file matching
    either is accepted.
    """

    name: str
    gz_md5: str
    payload_sha256: str


FASHION_MNIST_FILES = {
    "train_images": IdxFile(
        "train-images-idx3-ubyte.gz",
        "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    ),
    "train_labels": IdxFile(
        "train-labels-idx1-ubyte.gz",
        "25c81989df183df01b3e8a0aad5dffbe",
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    ),
    "test_images": IdxFile(
        "t10k-images-idx3-ubyte.gz",
        "bef4ecab320f06d8554ea6380940ec79",
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    ),
    "test_labels": IdxFile(
        "t10k-labels-idx1-ubyte.gz",
        "bb300cfdad3c16e7a12a480ee83cd310",
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    ),
}


def _verify_idx_gz(data: bytes, spec: IdxFile) -> bytes:
    """The decompressed payload of ``data`` if it is the file ``spec`` describes, else ValueError."""
    if hashlib.md5(data).hexdigest() == spec.gz_md5:
        return gzip.decompress(data)
    try:
        payload = gzip.decompress(data)
    except (OSError, EOFError) as exc:
        raise ValueError(f"{spec.name} is not a valid gzip file ({exc})") from None
    if hashlib.sha256(payload).hexdigest() != spec.payload_sha256:
        raise ValueError(f"{spec.name} does not match the published Fashion-MNIST checksums")
    return payload


def parse_idx(payload: bytes, name: str) -> np.ndarray:
    """Decode an unsigned-byte IDX payload into an array of the shape its header declares."""
    if len(payload) < 4 or payload[:2] != b"\0\0" or payload[2] != 0x08:
        raise ValueError(f"{name}: not an unsigned-byte IDX file")
    ndim = payload[3]
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", payload[4:header])
    data = np.frombuffer(payload, dtype=np.uint8, offset=header)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{name}: holds {data.size} values but its header declares shape {dims}")
    return data.reshape(dims)


def _has_files(directory: Path, files: dict[str, IdxFile]) -> bool:
    return all((directory / spec.name).is_file() for spec in files.values())


def _download(url: str, dest: Path, spec: IdxFile, timeout: float) -> None:
    """Fetch ``url`` to ``dest`` through a temporary name; only a verified file gets the final name."""
    partial = dest.with_name(dest.name + ".partial")
    deadline = time.monotonic() + 10 * timeout
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            chunks = []
            while chunk := response.read(1 << 20):
                chunks.append(chunk)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"download took longer than {10 * timeout:.0f} s")
        data = b"".join(chunks)
        _verify_idx_gz(data, spec)
        partial.write_bytes(data)
        os.replace(partial, dest)
    finally:
        partial.unlink(missing_ok=True)


def locate_fashion_mnist(
    root: str | Path | None = None,
    download_dir: str | Path = layout.RAW,
    mirrors: Sequence[str] = FASHION_MNIST_MIRRORS,
    files: dict[str, IdxFile] = FASHION_MNIST_FILES,
    timeout: float = 30.0,
) -> Path:
    """The directory holding the four Fashion-MNIST files, downloading them when no copy exists.

    Looks in ``root`` (default: the Debian package's directory), then ``download_dir``; otherwise
    downloads into ``download_dir`` from the first mirror that serves a file with the right checksum.
    """
    root = Path(root) if root is not None else FASHION_MNIST_DIR
    download_dir = Path(download_dir)
    for directory in (root, download_dir):
        if _has_files(directory, files):
            return directory
    download_dir.mkdir(parents=True, exist_ok=True)
    failures = []
    for spec in files.values():
        dest = download_dir / spec.name
        if dest.is_file():
            continue
        for mirror in mirrors:
            url = mirror.rstrip("/") + "/" + spec.name
            try:
                log.info("downloading %s", url)
                _download(url, dest, spec, timeout)
                break
            except (OSError, ValueError) as exc:
                failures.append(f"{url}: {exc}")
        else:
            tried = "\n  ".join(failures) or "(no mirrors configured)"
            raise FileNotFoundError(
                f"Fashion-MNIST not found: {root} does not hold the four IDX .gz files and downloading "
                f"{spec.name} into {download_dir} failed:\n  {tried}\n"
                "Get it either way: (1) install the Debian package: "
                "`apt-get install dataset-fashion-mnist` (files in /usr/share/datasets/fashion-mnist), "
                f"or (2) download {', '.join(s.name for s in files.values())} from "
                "https://github.com/zalandoresearch/fashion-mnist into "
                f"{download_dir}/ (or a directory named by prepare.root)."
            )
    return download_dir


class FashionMNIST:
    """Fashion-MNIST from its four IDX .gz files: train 60,000 and val (official test) 10,000 images."""

    kind = "fashion_mnist"
    class_names: ClassVar[list[str]] = list(FASHION_MNIST_CLASSES)

    def __init__(
        self,
        directory: str | Path,
        image_size: int = 32,
        channels: int = 1,
        seed: int = 0,
        files: dict[str, IdxFile] = FASHION_MNIST_FILES,
    ):
        self.directory = Path(directory)
        self.location = str(self.directory)
        self.image_size = image_size
        self.channels = channels
        self.seed = seed
        self._images: dict[str, np.ndarray] = {}
        self._labels: dict[str, np.ndarray] = {}
        self._checksums: dict[str, str] = {}
        for split, prefix in (("train", "train"), ("val", "test")):
            digest = hashlib.sha256()
            arrays = []
            for part in ("images", "labels"):
                spec = files[f"{prefix}_{part}"]
                path = self.directory / spec.name
                try:
                    payload = _verify_idx_gz(path.read_bytes(), spec)
                except ValueError as exc:
                    raise ValueError(
                        f"{path}: {exc}; reinstall dataset-fashion-mnist or delete the file so that it "
                        "is downloaded again"
                    ) from None
                digest.update(hashlib.sha256(payload).digest())
                arrays.append(parse_idx(payload, str(path)))
            images, labels = arrays
            if images.ndim != 3 or labels.shape != images.shape[:1]:
                raise ValueError(f"{self.directory}: {prefix} images {images.shape}, labels {labels.shape}")
            self._images[split], self._labels[split] = images, labels
            self._checksums[split] = "sha256:" + digest.hexdigest()
        self._image_file = {"train": files["train_images"].name, "val": files["test_images"].name}

    def items(self, split: str) -> list[SourceItem]:
        _check_split(split)
        prefix = "train" if split == "train" else "test"  # keys keep the official split's name
        origin = self.directory / self._image_file[split]
        labels = self._labels[split]
        # a seeded write order mixes classes within and across shards
        order = np.random.default_rng([self.seed, SPLITS.index(split)]).permutation(len(labels))
        return [SourceItem(f"{prefix}_{i:05d}", int(labels[i]), f"{origin}[{i}]") for i in order]

    def load(self, item: SourceItem) -> np.ndarray:
        split = "train" if item.key.startswith("train_") else "val"
        index = int(item.key.rsplit("_", 1)[1])
        image = Image.fromarray(self._images[split][index], mode="L")
        return fit_image(image, self.image_size, self.channels)

    def checksum(self, split: str) -> str:
        _check_split(split)
        return self._checksums[split]


# ----------------------------------------------------------------------------------------------------
# Image folders


def _safe_key(relative: Path) -> str:
    """A webdataset-safe key: no dots (they separate key and extension) and no path separators."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", relative.with_suffix("").as_posix()).strip("_") or "image"


class ImageFolder:
    """Images (JPEG/PNG/WebP) found recursively under ``root``; class = first-level subfolder.

    Files directly in ``root`` belong to a class named after ``root`` itself. There is no official
    split: a seeded ``val_fraction`` of the images forms ``val``.
    """

    kind = "folder"

    def __init__(
        self,
        root: str | Path,
        image_size: int = 32,
        channels: int = 3,
        seed: int = 0,
        val_fraction: float = 0.1,
        *,
        max_pixels: int = 64_000_000,
    ):
        self.root = Path(root)
        self.location = str(self.root)
        self.image_size = image_size
        self.channels = channels
        self.max_pixels = max_pixels
        if not self.root.is_dir():
            raise EmptySource(f"{self.root} is not a directory")
        paths = sorted(
            path for path in self.root.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
        )
        if not paths:
            raise EmptySource(f"no {'/'.join(IMAGE_SUFFIXES)} images found under {self.root}")
        relatives = [path.relative_to(self.root) for path in paths]
        class_of = [rel.parts[0] if len(rel.parts) > 1 else self.root.name for rel in relatives]
        self.class_names = sorted(set(class_of))
        label_of = {name: i for i, name in enumerate(self.class_names)}
        keys: list[str] = []
        seen: set[str] = set()
        for rel in relatives:
            key, suffix = _safe_key(rel), 1
            while key in seen:  # e.g. a.jpg and a.png in one folder
                suffix += 1
                key = f"{_safe_key(rel)}-{suffix}"
            seen.add(key)
            keys.append(key)
        every = [
            SourceItem(key, label_of[name], str(path))
            for key, name, path in zip(keys, class_of, paths, strict=True)
        ]
        self._items = {
            split: [every[i] for i in indices]
            for split, indices in _seeded_split(len(every), val_fraction, seed).items()
        }

    def items(self, split: str) -> list[SourceItem]:
        _check_split(split)
        return list(self._items[split])

    def load(self, item: SourceItem) -> np.ndarray:
        """The image of ``item`` fitted to the square; an unusable file raises ``UnreadableImage``
        naming it. Only the header is read before the size check: an image over ``max_pixels`` is
        refused undecoded, and a large JPEG is decoded at the smallest scale (1/2, 1/4, 1/8) that
        still covers the target size (PIL's draft mode)."""
        path = Path(item.origin)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise UnreadableImage(f"{path}: cannot read the file: {exc}") from None
        if not data:
            raise UnreadableImage(f"{path}: empty file (0 bytes)")
        try:
            with warnings.catch_warnings():
                # the pixel count is checked here, against prepare.max_pixels, before decoding
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(data)) as image:
                    width, height = image.size
                    if width * height > self.max_pixels:
                        raise UnreadableImage(
                            f"{path}: {width}x{height} is {width * height:,} pixels, over "
                            f"prepare.max_pixels={self.max_pixels:,}; skipped undecoded (raise "
                            "prepare.max_pixels to keep it)"
                        )
                    if image.format == "JPEG":
                        image.draft(None, (self.image_size, self.image_size))
                    image.load()  # decodes now, so truncation shows up here
                    image = ImageOps.exif_transpose(image)
                    return fit_image(image, self.image_size, self.channels)
        except UnreadableImage:
            raise
        except Exception as exc:  # any decoder failure means this file is unusable
            message = str(exc)
            if "<_io.BytesIO object" in message:  # PIL names the buffer it read, not the file
                message = message.split("<_io.BytesIO object", 1)[0].rstrip(" '\"")
            raise UnreadableImage(f"{path}: {type(exc).__name__}: {message}") from None

    def checksum(self, split: str) -> str:
        _check_split(split)
        digest = hashlib.sha256()
        for item in sorted(self._items[split], key=lambda item: item.origin):
            path = Path(item.origin)
            digest.update(path.relative_to(self.root).as_posix().encode() + b"\0")
            try:
                digest.update(hashlib.sha256(path.read_bytes()).digest())
            except OSError:
                digest.update(b"unreadable")
        return "sha256:" + digest.hexdigest()


# ----------------------------------------------------------------------------------------------------
# Synthetic shapes (for fast tests only)


class SyntheticShapes:
    """Seeded random shapes on noisy backgrounds; class = shape. For tests, not for training."""

    kind = "synthetic"
    class_names: ClassVar[list[str]] = ["square", "disc", "triangle", "stripes"]

    def __init__(
        self,
        count: int = 2000,
        image_size: int = 32,
        channels: int = 1,
        seed: int = 0,
        val_fraction: float = 0.1,
    ):
        self.count = count
        self.image_size = image_size
        self.channels = channels
        self.seed = seed
        self.location = f"synthetic(count={count}, seed={seed})"
        every = [SourceItem(f"synth_{i:06d}", self._label(i), f"synthetic[{i}]") for i in range(count)]
        self._items = {
            split: [every[i] for i in indices]
            for split, indices in _seeded_split(count, val_fraction, seed).items()
        }

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, index])

    def _label(self, index: int) -> int:
        return int(self._rng(index).integers(len(self.class_names)))

    def items(self, split: str) -> list[SourceItem]:
        _check_split(split)
        return list(self._items[split])

    def load(self, item: SourceItem) -> np.ndarray:
        index = int(item.key.rsplit("_", 1)[1])
        rng = self._rng(index)
        label = int(rng.integers(len(self.class_names)))  # same draw as _label
        size = self.image_size
        noise = rng.integers(0, 64, size=(size, size, 3), dtype=np.uint8)
        image = Image.fromarray(noise, mode="RGB")
        draw = ImageDraw.Draw(image)
        colour = tuple(int(c) for c in rng.integers(128, 256, size=3))
        half = int(rng.integers(size // 6, size // 3 + 1))
        cx, cy = (int(c) for c in rng.integers(half, size - half + 1, size=2))
        box = (cx - half, cy - half, cx + half, cy + half)
        if label == 0:
            draw.rectangle(box, fill=colour)
        elif label == 1:
            draw.ellipse(box, fill=colour)
        elif label == 2:
            draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=colour)
        else:
            period = int(rng.integers(3, 7))
            for x in range(0, size, period):
                draw.rectangle((x, 0, x + period // 2, size), fill=colour)
        return fit_image(image, self.image_size, self.channels)

    def checksum(self, split: str) -> str:
        _check_split(split)
        recipe = f"synthetic-shapes-v1:{self.seed}:{self.count}:{self.image_size}:{self.channels}:{split}"
        return "sha256:" + hashlib.sha256(recipe.encode()).hexdigest()


def source_from_params(params: PrepareParams, download_dir: str | Path = layout.RAW) -> Source:
    """Build the source that ``prepare.*`` describes; errors name the key to change."""
    if params.source == "fashion_mnist":
        directory = locate_fashion_mnist(params.root, download_dir)
        return FashionMNIST(directory, params.image_size, params.channels, params.seed)
    if params.source == "folder":
        try:
            return ImageFolder(
                params.root,
                params.image_size,
                params.channels,
                params.seed,
                params.val_fraction,
                max_pixels=params.max_pixels,
            )
        except EmptySource as exc:
            raise EmptySource(f"prepare.root: {exc}") from None
    if params.source == "synthetic":
        return SyntheticShapes(
            params.synthetic_count, params.image_size, params.channels, params.seed, params.val_fraction
        )
    raise ValueError(f"prepare.source: unknown source kind {params.source!r}")
