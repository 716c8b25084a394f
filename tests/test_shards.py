"""Shards: bit-exact round trips, bad input, atomic writes, truncated shards, and DDP splitting."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import damage_png, free_port, spawn_ranks
from PIL import Image

from imtok.data.shards import (
    ShardError,
    ShardLoader,
    iter_batches,
    iter_samples,
    read_meta,
    to_uint8,
    write_split,
)
from imtok.data.sources import FashionMNIST, ImageFolder, SyntheticShapes


def _decode_with_pil(png: bytes) -> np.ndarray:
    """An independent decoder for checks (the loader decodes with torchvision)."""
    with Image.open(io.BytesIO(png)) as image:
        return np.array(image)


def _assert_round_trip(source, split: str, out_dir: Path, limit: int | None = None) -> None:
    report = write_split(source, split, out_dir, maxcount=25, limit=limit)
    items = source.items(split)[:limit]
    assert report.count == len(items) and not report.skipped
    stored = list(iter_samples(out_dir))
    assert [sample["__key__"] for sample in stored] == [item.key for item in items]
    for sample, item in zip(stored, items, strict=True):
        assert sample["cls"] == item.label
        assert np.array_equal(_decode_with_pil(sample["png"]), source.load(item))

    # the float batches map back to the same bytes
    expected = {item.key: (source.load(item), item.label) for item in items}
    loader = ShardLoader(out_dir, batch_size=16, shuffle=False, num_workers=0)
    seen = set()
    for batch in loader:
        assert batch.images.dtype == torch.float32 and batch.images.shape[0] == 16
        assert batch.images.min() >= -1.0 and batch.images.max() <= 1.0
        for image, label, key in zip(to_uint8(batch.images), batch.labels, batch.keys, strict=True):
            pixels, cls = expected[key]
            chw = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
            assert np.array_equal(image.numpy(), chw) and int(label) == cls
            seen.add(key)
    assert seen == set(expected)


@pytest.mark.parametrize("channels", [1, 3])
def test_round_trip_is_bit_exact_for_synthetic_images(tmp_path, channels):
    source = SyntheticShapes(count=90, image_size=16, channels=channels, seed=1)
    _assert_round_trip(source, "train", tmp_path / "train")


def test_round_trip_is_bit_exact_for_fashion_mnist(tmp_path, fashion_mnist_dir):
    if fashion_mnist_dir is None:
        pytest.skip("dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)")
    source = FashionMNIST(fashion_mnist_dir, image_size=32, channels=1)
    _assert_round_trip(source, "val", tmp_path / "val", limit=120)


def test_meta_json_describes_the_split(tmp_path):
    source = SyntheticShapes(count=60, image_size=8, channels=3, seed=2)
    report = write_split(source, "val", tmp_path, maxcount=2, limit=5, seed=2)
    meta = read_meta(tmp_path)
    assert meta["count"] == 5 == report.count and meta["split"] == "val"
    assert (meta["image_size"], meta["channels"]) == (8, 3)
    assert meta["class_names"] == source.class_names
    assert meta["source_checksum"] == source.checksum("val") and meta["source"] == "synthetic"
    assert [shard["count"] for shard in meta["shards"]] == [2, 2, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "meta.json",
        "shard-000000.tar",
        "shard-000001.tar",
        "shard-000002.tar",
    ]


def test_maxsize_cuts_shards_by_payload_bytes(tmp_path):
    source = SyntheticShapes(count=40, image_size=16, channels=3, seed=0)
    write_split(source, "train", tmp_path, maxcount=1000, maxsize=3000)
    meta = read_meta(tmp_path)
    assert len(meta["shards"]) > 1 and sum(s["count"] for s in meta["shards"]) == meta["count"]


def test_the_same_input_gives_byte_identical_shards(tmp_path):
    source = SyntheticShapes(count=40, image_size=8, seed=0)
    for name in ("a", "b"):
        write_split(source, "train", tmp_path / name, maxcount=10)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_corrupt_png_and_zero_byte_jpeg_are_skipped_and_reported(tmp_path):
    root = tmp_path / "images"
    for i in range(12):
        (root / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20, 20), (i * 20, 10, 10)).save(root / f"class{i % 2}" / f"{i:02d}.png")
    png = (root / "class0" / "00.png").read_bytes()
    (root / "class1" / "corrupt.png").write_bytes(png[:40] + b"\x00" * 30)
    (root / "class0" / "empty.jpg").write_bytes(b"")
    source = ImageFolder(root, image_size=8, channels=3, val_fraction=0.1)
    reports = [write_split(source, split, tmp_path / split) for split in ("train", "val")]
    skipped = {Path(s.origin).name: s.reason for r in reports for s in r.skipped}
    assert set(skipped) == {"corrupt.png", "empty.jpg"}
    assert "empty" in skipped["empty.jpg"]
    assert sum(r.count for r in reports) == 12
    assert sum(read_meta(tmp_path / split)["skipped"] for split in ("train", "val")) == 2
    written = {s["__key__"] for split in ("train", "val") for s in iter_samples(tmp_path / split)}
    assert len(written) == 12 and not any("corrupt" in k or "empty" in k for k in written)


class _FailingSource(SyntheticShapes):
    """Raises a non-image error at item ``fail_at``: a crash in the middle of a split."""

    def __init__(self, fail_at: int, **kw):
        super().__init__(**kw)
        self.fail_at = fail_at
        self.loaded = 0

    def load(self, item):
        self.loaded += 1
        if self.loaded > self.fail_at:
            raise RuntimeError("injected failure")
        return super().load(item)


def _assert_only_complete_shards(directory: Path, per_shard: int) -> list[str]:
    finals = sorted(p.name for p in directory.glob("shard-*.tar"))
    for name in finals:
        with tarfile.open(directory / name) as tar:  # a partial file would fail or come up short
            members = [m for m in tar.getmembers() if m.name.endswith(".png")]
        assert len(members) == per_shard, name
    return finals


def test_a_failure_after_two_shards_leaves_no_partial_shard_and_a_rerun_completes(tmp_path):
    failing = _FailingSource(fail_at=25, count=80, image_size=8, seed=0)
    with pytest.raises(RuntimeError, match="injected"):
        write_split(failing, "train", tmp_path, maxcount=10)
    assert _assert_only_complete_shards(tmp_path, 10) == ["shard-000000.tar", "shard-000001.tar"]
    assert not list(tmp_path.glob("*.partial")) and not (tmp_path / "meta.json").exists()
    with pytest.raises(FileNotFoundError, match="not a complete split"):
        ShardLoader(tmp_path, batch_size=4)

    source = SyntheticShapes(count=80, image_size=8, seed=0)
    report = write_split(source, "train", tmp_path, maxcount=10)
    assert report.count == len(source.items("train"))
    assert len(list(iter_samples(tmp_path))) == report.count


KILLED_WRITER = textwrap.dedent(
    """
    import sys, time
    from imtok.data.shards import write_split
    from imtok.data.sources import SyntheticShapes

    class Slow(SyntheticShapes):
        def load(self, item):
            time.sleep(0.02)
            return super().load(item)

    write_split(Slow(count=600, image_size=8, seed=0), "train", sys.argv[1], maxcount=10)
    """
)


def test_a_killed_prepare_leaves_no_partial_shard_and_a_rerun_completes(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tmp_path)])
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            finals, partials = list(tmp_path.glob("shard-*.tar")), list(tmp_path.glob("*.partial"))
            if len(finals) >= 2 and partials:
                break
            assert child.poll() is None, "the writer finished before it could be killed"
            time.sleep(0.01)
        else:
            pytest.fail("the writer did not write two shards in time")
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=30)
    assert len(_assert_only_complete_shards(tmp_path, 10)) >= 2
    assert not (tmp_path / "meta.json").exists()

    source = SyntheticShapes(count=600, image_size=8, seed=0)
    report = write_split(source, "train", tmp_path, maxcount=10)
    assert not list(tmp_path.glob("*.partial"))
    assert [s["__key__"] for s in iter_samples(tmp_path)] == [i.key for i in source.items("train")]
    assert report.count == len(source.items("train"))


def _members(data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return tar.getmembers()  # members alternate NAME.cls, NAME.png


@pytest.mark.parametrize(
    ("where", "error"),
    [
        ("inside the data of a png", "cannot read shard"),
        ("inside a header", "lacks png"),
        ("at a block boundary", "holds 4 samples but meta.json lists 20"),
    ],
)
def test_a_truncated_shard_is_an_error_naming_its_url(tmp_path, where, error):
    write_split(SyntheticShapes(count=60, image_size=16, seed=0), "train", tmp_path, maxcount=20)
    shard = tmp_path / "shard-000001.tar"
    data = shard.read_bytes()
    members = _members(data)
    cut = {
        "inside the data of a png": members[9].offset_data + 10,
        "inside a header": members[9].offset + 100,
        "at a block boundary": members[8].offset,  # after 4 whole samples (8 members)
    }[where]
    shard.write_bytes(data[:cut])
    with pytest.raises(ShardError, match=f"^{shard}: .*{error}"):
        list(iter_samples(tmp_path))
    with pytest.raises(ShardError, match=f"^{shard}: .*{error}"):
        list(ShardLoader(tmp_path, batch_size=8, shuffle=False))


def test_loader_gives_full_batches_and_reshuffles_per_epoch(tmp_path):
    write_split(SyntheticShapes(count=100, image_size=8, channels=1, seed=0), "train", tmp_path, maxcount=9)
    count = read_meta(tmp_path)["count"]
    loader = ShardLoader(tmp_path, batch_size=10, shuffle=True, shuffle_buffer=50, num_workers=2, seed=4)
    assert len(loader) == -(-count // 10)
    epochs = []
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == len(loader)
        assert all(b.images.shape == (10, 1, 8, 8) and b.labels.dtype == torch.int64 for b in batches)
        keys = [k for b in batches for k in b.keys]
        assert set(keys) == {s["__key__"] for s in iter_samples(tmp_path)}
        epochs.append(keys)
    assert epochs[0] != epochs[1]
    loader.set_epoch(0)
    assert [k for b in loader for k in b.keys] == epochs[0]  # reproducible for (seed, epoch)


def test_more_ranks_than_shards_is_an_error(tmp_path):
    write_split(SyntheticShapes(count=20, image_size=8, seed=0), "train", tmp_path, maxcount=100)
    with pytest.raises(ValueError, match=r"1 shard.* for 2 ranks.*prepare\.maxcount"):
        ShardLoader(tmp_path, batch_size=4, rank=0, world_size=2)


def _ddp_rank(rank: int, world_size: int, port: int, location: str, out_dir: str) -> None:
    """One DDP rank: read an epoch through ShardLoader with 2 workers and record what it saw."""
    import torch.distributed as dist
    from conftest import join_gloo

    join_gloo(rank, world_size, port, timeout_s=60)
    try:
        # torch.multiprocessing's spawned ranks default to spawning DataLoader workers too (torchrun's
        # ranks fork them); forking keeps the test fast
        loader = ShardLoader(
            location,
            batch_size=8,
            shuffle=True,
            shuffle_buffer=20,
            num_workers=2,
            seed=7,
            multiprocessing_context="fork",
        )
        loader.set_epoch(3)
        keys, sizes = [], []
        for batch in loader:
            keys += batch.keys
            sizes.append(len(batch.keys))
        every_count = [None] * world_size
        dist.all_gather_object(every_count, len(sizes))  # the ranks agree on the step count
        record = {"keys": keys, "sizes": sizes, "len": len(loader), "all_counts": every_count}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(record))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("batch_size", [25, 40])  # 18 samples: replay part of them; read them twice
def test_a_split_smaller_than_one_batch_still_gives_one_full_batch(tmp_path, batch_size):
    write_split(SyntheticShapes(count=20, image_size=8, channels=1, seed=0), "train", tmp_path, maxcount=4)
    keys = {s["__key__"] for s in iter_samples(tmp_path)}
    assert len(keys) < batch_size
    (batch,) = list(ShardLoader(tmp_path, batch_size=batch_size, shuffle=False))
    assert batch.images.shape[0] == batch_size and set(batch.keys) == keys  # every sample, some twice


def test_ddp_ranks_read_disjoint_parts_that_cover_the_split_in_equal_batches(tmp_path):
    location = tmp_path / "train"
    source = SyntheticShapes(count=80, image_size=8, seed=0, val_fraction=0.2)
    write_split(source, "train", location, maxcount=7)  # 64 samples in 10 shards of 7,...,7,1
    assert [s["count"] for s in read_meta(location)["shards"]] == [7] * 9 + [1]

    spawn_ranks(_ddp_rank, 2, 2, free_port(), str(location), str(tmp_path), limit_s=150)

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    first, second = (set(r["keys"]) for r in ranks)
    assert not first & second
    assert first | second == {item.key for item in source.items("train")}
    assert ranks[0]["all_counts"] == ranks[1]["all_counts"] == [ranks[0]["len"]] * 2
    assert all(r["sizes"] == [8] * r["len"] for r in ranks)
    assert len(ranks[0]["sizes"]) == len(ranks[1]["sizes"])


def test_a_damaged_png_inside_a_shard_names_the_shard_and_the_sample_for_every_reader(tmp_path):
    write_split(SyntheticShapes(count=40, image_size=8, seed=0), "train", tmp_path, maxcount=10)
    shard = tmp_path / "shard-000001.tar"
    key = damage_png(shard, 0)
    message = rf"^{shard}: sample '{key}' holds a PNG that does not decode"
    with pytest.raises(ShardError, match=message):
        list(iter_batches(tmp_path, 8))
    with pytest.raises(ShardError, match=message):
        list(ShardLoader(tmp_path, 8, shuffle=False))


def test_a_resumed_rank_sees_the_batches_an_uninterrupted_one_would_when_epochs_differ_in_length(tmp_path):
    from imtok.runtime import batches_from

    source = SyntheticShapes(count=260, image_size=8, channels=1, seed=0, val_fraction=0.1)
    write_split(source, "train", tmp_path, maxcount=50)  # shards of 50, 50, 50, 50 and a short last one
    counts = [s["count"] for s in read_meta(tmp_path)["shards"]]
    assert len(set(counts)) == 2

    def loader() -> ShardLoader:
        return ShardLoader(tmp_path, batch_size=8, rank=0, world_size=2, seed=1)

    lengths = []
    probe = loader()
    for epoch in range(4):
        probe.set_epoch(epoch)
        lengths.append(len(probe))
    assert len(set(lengths)) > 1, lengths  # the ranks' shares change from epoch to epoch
    total = sum(lengths)
    stream = batches_from(loader(), 0)
    uninterrupted = [next(stream).keys for _ in range(total)]
    for start in (lengths[0] - 1, lengths[0], lengths[0] + 3, lengths[0] + lengths[1] + 1, total - 1):
        resumed = batches_from(loader(), start)
        assert [next(resumed).keys for _ in range(total - start)] == uninterrupted[start:], start


@pytest.mark.parametrize("num_workers", [0, 1])
def test_reading_batches_leaves_torchs_global_generator_alone(tmp_path, num_workers):
    # A resumed run starts a loader iterator mid-epoch that an unbroken run did not: were its seed drawn
    # from the global generator, every later random draw of training would differ from the unbroken run's.
    write_split(SyntheticShapes(count=40, image_size=8, seed=0), "train", tmp_path, maxcount=10)
    loader = ShardLoader(tmp_path, 8, num_workers=num_workers, seed=3)
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    first = [batch.keys for batch in loader]
    assert torch.equal(torch.rand(4), expected)
    assert [batch.keys for batch in loader] == first  # the reading itself is still seeded


def test_a_damaged_meta_json_names_the_file_and_what_to_do(tmp_path):
    write_split(SyntheticShapes(count=20, image_size=8, seed=0), "train", tmp_path, maxcount=10)
    meta = tmp_path / "meta.json"
    for content in ("", '{"count": 3', "[1, 2]"):
        meta.write_text(content)
        with pytest.raises(ShardError, match=rf"^{meta}: .*write the split again"):
            ShardLoader(tmp_path, 4)


def test_a_missing_shard_says_it_is_missing(tmp_path):
    write_split(SyntheticShapes(count=40, image_size=8, seed=0), "train", tmp_path, maxcount=10)
    (tmp_path / "shard-000002.tar").unlink()
    with pytest.raises(
        ShardError, match=r"shard-000002\.tar: cannot read shard: .*No such file or directory"
    ):
        list(ShardLoader(tmp_path, 8, shuffle=False))


def test_a_damaged_label_or_a_mixed_size_names_the_sample(tmp_path):
    from imtok.data.shards import collate_images, decode_sample

    sample = _raw_sample(tmp_path / "shard-000000.tar")
    with pytest.raises(ShardError, match=r"sample 'k0' holds a class label b'x7' that is not an integer"):
        decode_sample({**sample, "cls": b"x7"})
    small = torch.zeros(1, 8, 8, dtype=torch.uint8)
    large = torch.zeros(1, 16, 16, dtype=torch.uint8)
    with pytest.raises(ShardError, match=r"sample 'b' is a 1x16x16 image but sample 'a' .* is 1x8x8"):
        collate_images([(small, 0, "a"), (large, 1, "b")])


def _raw_sample(url: Path) -> dict:
    """One raw sample as webdataset hands it to ``decode_sample`` (bytes fields)."""
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(buffer, format="PNG")
    return {"__key__": "k0", "__url__": str(url), "png": buffer.getvalue(), "cls": b"3"}


def test_unequal_shares_of_shards_over_ranks_are_warned_about(tmp_path, caplog):
    write_split(
        SyntheticShapes(count=67, image_size=8, seed=0, val_fraction=0.1), "train", tmp_path, maxcount=10
    )
    assert [shard["count"] for shard in read_meta(tmp_path)["shards"]] == [10] * 6
    with caplog.at_level("WARNING", logger="imtok.data.shards"):
        even = ShardLoader(tmp_path, batch_size=4, rank=0, world_size=3)  # 6 shards, 2 per rank
        assert even.repeated_samples() == 0 and not caplog.records
        uneven = ShardLoader(tmp_path, batch_size=4, rank=0, world_size=4)  # 2, 2, 1, 1 shards
    assert uneven.repeated_samples() == 4 * 20 - 60
    (record,) = caplog.records
    assert "6 shards over 4 ranks" in record.getMessage() and "20 of 60 samples (33%)" in record.getMessage()
