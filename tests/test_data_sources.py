"""Sources: image fitting, image folders, synthetic shapes, Fashion-MNIST and its download fallback."""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import http.server
import shutil
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port
from PIL import Image

from imtok.data.sources import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_FILES,
    FashionMNIST,
    IdxFile,
    ImageFolder,
    SyntheticShapes,
    UnreadableImage,
    fit_image,
    locate_fashion_mnist,
    source_from_params,
)
from imtok.params import PrepareParams

# ----------------------------------------------------------------------------------------------------
# fit_image


def test_fit_image_keeps_an_image_of_the_target_size_exact():
    pixels = np.random.default_rng(0).integers(0, 256, size=(32, 32), dtype=np.uint8)
    assert np.array_equal(fit_image(Image.fromarray(pixels), 32, 1), pixels)


def test_fit_image_resizes_the_shorter_side_and_centre_crops():
    wide = np.zeros((20, 60, 3), dtype=np.uint8)
    wide[:, :20] = (255, 0, 0)  # left third red, right third blue: both cropped away
    wide[:, 40:] = (0, 0, 255)
    wide[:, 20:40] = (0, 255, 0)
    fitted = fit_image(Image.fromarray(wide), 16, 3)
    assert fitted.shape == (16, 16, 3) and fitted.dtype == np.uint8
    assert (fitted[:, 2:-2, 1] > 240).all() and (fitted[:, 2:-2, 0] < 15).all()


def test_fit_image_converts_modes():
    rgb = Image.new("RGB", (8, 8), (10, 200, 30))
    assert fit_image(rgb, 8, 1).shape == (8, 8)
    gray = fit_image(Image.new("L", (8, 8), 77), 8, 3)
    assert gray.shape == (8, 8, 3) and (gray == 77).all()
    transparent = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert (fit_image(transparent, 8, 3) == 255).all()  # transparency lands on white, not black
    deep = Image.fromarray(np.full((8, 8), 0x8000, dtype=np.uint16))  # 16-bit grayscale
    assert (fit_image(deep, 8, 1) == 0x80).all()


# ----------------------------------------------------------------------------------------------------
# Image folders


def _save(path: Path, size=(40, 30), colour=(120, 60, 30), mode="RGB", format=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour if mode != "L" else colour[0]).save(path, format=format)
    return path


@pytest.fixture
def image_tree(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    _save(root / "cats" / "a.png")
    _save(root / "cats" / "deep" / "er" / "b.JPG", format="JPEG")
    _save(root / "cats" / "a.jpg", format="JPEG")  # same stem as a.png: keys must still differ
    _save(root / "dogs" / "c.webp", mode="RGBA", colour=(1, 2, 3, 128))
    _save(root / "dogs" / "d.e.jpeg", mode="L", format="JPEG")
    _save(root / "loose.png")
    (root / "dogs" / "notes.txt").write_text("not an image")
    return root


def test_folder_finds_images_recursively_with_first_level_classes(image_tree: Path):
    source = ImageFolder(image_tree, image_size=16, channels=3, val_fraction=0.3)
    items = source.items("train") + source.items("val")
    assert source.class_names == ["cats", "dogs", "photos"]
    by_name = {Path(item.origin).name: item for item in items}
    assert set(by_name) == {"a.png", "a.jpg", "b.JPG", "c.webp", "d.e.jpeg", "loose.png"}
    assert {name: source.class_names[item.label] for name, item in by_name.items()} == {
        "a.png": "cats",
        "a.jpg": "cats",
        "b.JPG": "cats",
        "c.webp": "dogs",
        "d.e.jpeg": "dogs",
        "loose.png": "photos",
    }
    keys = [item.key for item in items]
    assert len(set(keys)) == len(keys) and not any("." in key or "/" in key for key in keys)
    for item in items:
        image = source.load(item)
        assert image.shape == (16, 16, 3) and image.dtype == np.uint8
    assert ImageFolder(image_tree, image_size=16, channels=1).load(items[0]).shape == (16, 16)


def test_folder_split_is_disjoint_complete_and_deterministic_for_a_seed(tmp_path: Path):
    for i in range(40):
        _save(tmp_path / f"class{i % 3}" / f"{i:03d}.png", size=(4, 4))

    def split(seed):
        source = ImageFolder(tmp_path, image_size=4, seed=seed, val_fraction=0.25)
        return [item.key for item in source.items("train")], [item.key for item in source.items("val")]

    train, val = split(seed=1)
    assert len(val) == 10 and len(train) == 30 and not set(train) & set(val)
    assert split(seed=1) == (train, val)
    assert split(seed=2) != (train, val)


def test_folder_without_images_is_an_error_naming_the_key(tmp_path: Path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"^prepare\.root: no .* images found under"):
        source_from_params(PrepareParams(source="folder", root=str(tmp_path / "empty")))
    with pytest.raises(ValueError, match=r"^prepare\.root: .* is not a directory"):
        source_from_params(PrepareParams(source="folder", root=str(tmp_path / "missing")))


def test_corrupt_and_empty_files_raise_unreadable_image(tmp_path: Path):
    good = _save(tmp_path / "x" / "good.png", size=(64, 64))
    (tmp_path / "x" / "empty.jpg").write_bytes(b"")
    data = good.read_bytes()
    (tmp_path / "x" / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "x" / "garbage.webp").write_bytes(b"RIFF\x00\x00\x00\x00WEBPnonsense")
    source = ImageFolder(tmp_path, image_size=8, val_fraction=0.25)
    outcomes = {}
    for item in source.items("train") + source.items("val"):
        try:
            source.load(item)
            outcomes[Path(item.origin).name] = "ok"
        except UnreadableImage as exc:
            outcomes[Path(item.origin).name] = str(exc)
    assert outcomes["good.png"] == "ok"
    assert "empty" in outcomes["empty.jpg"]
    assert outcomes["truncated.png"] != "ok" and outcomes["garbage.webp"] != "ok"


# ----------------------------------------------------------------------------------------------------
# Synthetic shapes


def test_synthetic_source_is_deterministic_for_a_seed():
    first = SyntheticShapes(count=30, image_size=16, channels=3, seed=5)
    second = SyntheticShapes(count=30, image_size=16, channels=3, seed=5)
    other = SyntheticShapes(count=30, image_size=16, channels=3, seed=6)
    items = first.items("train")
    assert [i.key for i in items] == [i.key for i in second.items("train")]
    assert all(np.array_equal(first.load(i), second.load(i)) for i in items)
    assert not all(np.array_equal(first.load(i), other.load(i)) for i in items)
    assert {i.label for i in items} <= set(range(len(first.class_names)))
    assert first.load(items[0]).shape == (16, 16, 3)


# ----------------------------------------------------------------------------------------------------
# Fashion-MNIST


def test_fashion_mnist_has_the_official_splits(fashion_mnist_dir):
    if fashion_mnist_dir is None:
        pytest.skip("dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)")
    source = FashionMNIST(fashion_mnist_dir, image_size=32, channels=1, seed=0)
    train, val = source.items("train"), source.items("val")
    assert (len(train), len(val)) == (60000, 10000)
    assert source.class_names == list(FASHION_MNIST_CLASSES)
    assert np.bincount([item.label for item in val]).tolist() == [1000] * 10
    assert source.load(val[0]).shape == (32, 32)
    native = FashionMNIST(fashion_mnist_dir, image_size=28, channels=1)
    assert native.load(val[0]).std() > 0
    assert source.checksum("train") != source.checksum("val")


def _idx(array: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


@pytest.fixture
def tiny_idx(tmp_path: Path) -> tuple[Path, dict[str, IdxFile]]:
    """A fabricated 6 + 4 image dataset in Fashion-MNIST's file layout, and its checksum table."""
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, size=(6, 28, 28)),
        "train_labels": rng.integers(0, 10, size=6),
        "test_images": rng.integers(0, 256, size=(4, 28, 28)),
        "test_labels": rng.integers(0, 10, size=4),
    }
    directory = tmp_path / "mirror"
    directory.mkdir()
    files = {}
    for role, array in arrays.items():
        spec_name = FASHION_MNIST_FILES[role].name
        payload = _idx(array)
        data = gzip.compress(payload, mtime=0)
        (directory / spec_name).write_bytes(data)
        files[role] = IdxFile(spec_name, hashlib.md5(data).hexdigest(), hashlib.sha256(payload).hexdigest())
    return directory, files


@contextlib.contextmanager
def serve(directory: Path) -> Iterator[str]:
    """A static HTTP server for ``directory`` on 127.0.0.1: its base URL."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(directory))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_download_fallback_verifies_checksums_and_skips_dead_mirrors(tmp_path, tiny_idx):
    mirror_dir, files = tiny_idx
    dead_mirror = f"http://127.0.0.1:{free_port()}/"
    download_dir = tmp_path / "data" / "raw"
    with serve(mirror_dir) as url:
        found = locate_fashion_mnist(
            tmp_path / "absent", download_dir, mirrors=[dead_mirror, url], files=files, timeout=5
        )
    assert found == download_dir
    assert sorted(p.name for p in download_dir.iterdir()) == sorted(spec.name for spec in files.values())
    source = FashionMNIST(download_dir, image_size=28, files=files)
    assert (len(source.items("train")), len(source.items("val"))) == (6, 4)
    # a second call finds the downloaded copy without any mirror
    assert locate_fashion_mnist(tmp_path / "absent", download_dir, mirrors=[], files=files) == download_dir


def test_download_with_a_wrong_checksum_fails_naming_both_ways(tmp_path, tiny_idx):
    mirror_dir, files = tiny_idx
    tampered = mirror_dir / files["test_labels"].name
    tampered.write_bytes(gzip.compress(b"\0\0\x08\x01\0\0\0\x01\x07"))
    download_dir = tmp_path / "raw"
    with serve(mirror_dir) as url, pytest.raises(FileNotFoundError) as error:
        locate_fashion_mnist(tmp_path / "absent", download_dir, mirrors=[url], files=files, timeout=5)
    message = str(error.value)
    assert "does not match the published Fashion-MNIST checksums" in message
    assert "apt-get install dataset-fashion-mnist" in message and str(download_dir) in message
    assert not (download_dir / tampered.name).exists()
    assert not list(download_dir.glob("*.partial"))


def test_no_local_copy_and_no_reachable_mirror_names_both_ways(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        locate_fashion_mnist(
            tmp_path / "absent", tmp_path / "raw", mirrors=[f"http://127.0.0.1:{free_port()}/"], timeout=2
        )
    message = str(error.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert "zalandoresearch/fashion-mnist" in message and "prepare.root" in message


def test_hard_coded_checksums_accept_the_real_files_served_over_http(tmp_path, fashion_mnist_dir):
    if fashion_mnist_dir is None:
        pytest.skip("dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)")
    with serve(fashion_mnist_dir) as url:
        found = locate_fashion_mnist(tmp_path / "absent", tmp_path / "raw", mirrors=[url], timeout=10)
    for spec in FASHION_MNIST_FILES.values():
        assert (found / spec.name).read_bytes() == (fashion_mnist_dir / spec.name).read_bytes()


def test_a_tampered_local_file_is_refused(tmp_path, tiny_idx):
    mirror_dir, files = tiny_idx
    copy = tmp_path / "copy"
    shutil.copytree(mirror_dir, copy)
    (copy / files["train_images"].name).write_bytes(gzip.compress(_idx(np.zeros((6, 28, 28)))))
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz.*checksums"):
        FashionMNIST(copy, files=files)
