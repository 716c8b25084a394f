"""Parallel prepare: worker processes give the same shards as one process, and fail or die cleanly."""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

import imtok.data.encoding as encoding
from imtok.data.encoding import EncodingWorkerDied, SkippedImage, encoded_items, pool_context
from imtok.data.shards import write_split
from imtok.data.sources import ImageFolder, SyntheticShapes


def _files(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def _folder_with_broken_images(root: Path, count: int) -> Path:
    for i in range(count):
        folder = root / f"c{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (18 + i % 5, 20), (i % 256, 3 * i % 256, 90)).save(folder / f"{i:03d}.png")
    png = (root / "c0" / "000.png").read_bytes()
    (root / "c1" / "truncated.png").write_bytes(png[: len(png) // 2])
    (root / "c2" / "empty.jpg").write_bytes(b"")
    (root / "c0" / "noise.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x01" * 64)
    return root


def test_workers_write_the_same_bytes_and_skip_the_same_files_in_the_same_order(tmp_path):
    source = ImageFolder(_folder_with_broken_images(tmp_path / "images", 150), image_size=8, channels=3)
    serial = write_split(source, "train", tmp_path / "serial", maxcount=17)
    parallel = write_split(source, "train", tmp_path / "parallel", maxcount=17, workers=2)
    assert serial.count == parallel.count == len(source.items("train")) - len(serial.skipped)
    assert len(serial.shards) > 4
    assert _files(tmp_path / "serial") == _files(tmp_path / "parallel")  # meta.json included
    assert [s.origin for s in parallel.skipped] == [s.origin for s in serial.skipped]
    assert {Path(s.origin).name for s in serial.skipped} <= {"truncated.png", "empty.jpg", "noise.png"}
    assert parallel.skipped, "the seeded split put no broken file in train: pick other names"


# The two methods pool_context chooses from. Not forkserver: its server process is one per test
# session and keeps the environment of its start, which later tests (S3 credentials) would inherit.
POOL_METHODS = [method for method in ("fork", "spawn") if method in multiprocessing.get_all_start_methods()]


@pytest.mark.parametrize("method", POOL_METHODS)
def test_forked_and_spawned_workers_write_the_same_bytes_as_one_process(tmp_path, monkeypatch, method):
    # pool_context picks the method from the parent's threads, which vary under pytest: force each
    source = SyntheticShapes(count=120, image_size=12, channels=3, seed=4)
    write_split(source, "train", tmp_path / "serial", maxcount=25)
    monkeypatch.setattr(encoding, "pool_context", lambda: multiprocessing.get_context(method))
    write_split(source, "train", tmp_path / method, maxcount=25, workers=2)
    assert _files(tmp_path / "serial") == _files(tmp_path / method)


CHOSEN_METHOD = "from imtok.data.encoding import pool_context; print(pool_context().get_start_method())"


def test_a_single_threaded_parent_forks_and_one_with_other_threads_spawns():
    fresh = subprocess.run([sys.executable, "-c", CHOSEN_METHOD], capture_output=True, text=True, timeout=120)
    assert fresh.returncode == 0, fresh.stderr
    can_fork = "fork" in multiprocessing.get_all_start_methods()
    assert fresh.stdout.strip() == ("fork" if can_fork else "spawn")
    release = threading.Event()
    other = threading.Thread(target=release.wait, args=(30,))
    other.start()
    try:
        assert pool_context().get_start_method() == "spawn"
    finally:
        release.set()
        other.join(timeout=30)


class _FailsFrom(SyntheticShapes):
    """Raises a non-image error for every item from index ``first_bad`` of its key on."""

    def __init__(self, first_bad: int, **kw):
        super().__init__(**kw)
        self.first_bad = first_bad

    def load(self, item):
        if self.items("train").index(item) >= self.first_bad:
            raise RuntimeError(f"injected failure at {item.key}")
        return super().load(item)


def test_an_error_in_a_worker_aborts_the_split_keeping_only_complete_shards(tmp_path):
    source = _FailsFrom(first_bad=70, count=250, image_size=8, seed=0)
    with pytest.raises(RuntimeError, match="injected failure"):
        write_split(source, "train", tmp_path, maxcount=10, workers=2)
    finals = sorted(tmp_path.glob("shard-*.tar"))
    # items go out in chunks: every shard written holds items before the first failing chunk
    assert 0 < len(finals) <= 7
    for path in finals:
        with tarfile.open(path) as tar:
            assert sum(m.name.endswith(".png") for m in tar.getmembers()) == 10, path.name
    assert not list(tmp_path.glob("*.partial")) and not (tmp_path / "meta.json").exists()


def _exit_now() -> None:
    os._exit(9)  # as if the system had killed the worker


def _block() -> None:
    time.sleep(300)  # as a decoder stuck on a bad file would


class _MisbehavesAt(SyntheticShapes):
    """Loading item ``key`` calls ``misbehave`` (a module-level function, so spawn can pickle it)."""

    def __init__(self, key: str, misbehave, **kw):
        super().__init__(**kw)
        self.key = key
        self.misbehave = misbehave

    def load(self, item):
        if item.key == self.key:
            self.misbehave()
        return super().load(item)


def test_a_worker_that_dies_stops_the_split_with_an_error_naming_the_images(tmp_path):
    source = SyntheticShapes(count=300, image_size=8, seed=0)
    victim = source.items("train")[150]
    dying = _MisbehavesAt(victim.key, _exit_now, count=300, image_size=8, seed=0)
    with pytest.raises(EncodingWorkerDied, match=r"run\.prepare\.num_workers: 0") as caught:
        write_split(dying, "train", tmp_path, maxcount=10, workers=2)
    named = re.search(r"images from (\S+) to (\S+) \(in write order\)", str(caught.value))
    assert named, caught.value
    origins = [item.origin for item in source.items("train")]
    assert origins.index(named[1]) <= 150 <= origins.index(named[2])  # the range holds the victim
    assert not list(tmp_path.glob("*.partial")) and not (tmp_path / "meta.json").exists()


class _Unpicklable(SyntheticShapes):
    """A source a spawned worker cannot rebuild: its unpickling raises."""

    def __reduce__(self):
        return (_refuse, ())


def _refuse():
    raise RuntimeError("this source cannot be rebuilt in another process")


def test_workers_that_cannot_start_stop_the_split_instead_of_restarting_forever(tmp_path, monkeypatch):
    monkeypatch.setattr(encoding, "pool_context", lambda: multiprocessing.get_context("spawn"))
    source = _Unpicklable(count=200, image_size=8, seed=0)
    started = time.monotonic()
    with pytest.raises(EncodingWorkerDied, match="could not start"):
        write_split(source, "train", tmp_path, maxcount=10, workers=2)
    assert time.monotonic() - started < 120
    assert not (tmp_path / "meta.json").exists()


def test_abandoning_the_iteration_stops_a_stuck_worker_at_once():
    source = SyntheticShapes(count=300, image_size=8, seed=0)
    items = source.items("train")
    stuck = _MisbehavesAt(items[100].key, _block, count=300, image_size=8, seed=0)
    results = encoded_items(stuck, items, workers=2)
    first = [next(results) for _ in range(10)]
    assert [r["__key__"] for r in first] == [item.key for item in items[:10]]
    started = time.monotonic()
    results.close()  # as write_split does when writing fails
    assert time.monotonic() - started < 30


def test_encoded_items_keeps_the_item_order_and_refuses_negative_workers():
    source = SyntheticShapes(count=200, image_size=8, seed=1)
    items = source.items("train")
    keys = [result["__key__"] for result in encoded_items(source, items, workers=2)]
    assert keys == [item.key for item in items]
    assert not any(isinstance(r, SkippedImage) for r in encoded_items(source, items[:5], workers=2))
    with pytest.raises(ValueError, match="workers must be >= 0"):
        next(encoded_items(source, items, workers=-1))


def test_prepare_params_refuse_a_negative_worker_count():
    from imtok.params import Params

    with pytest.raises(ValueError, match=r"^run\.prepare\.num_workers: must be >= 0 \(0: encode in the"):
        Params.from_dict({"run": {"prepare": {"num_workers": -1}}})


KILLED_PARENT = textwrap.dedent(
    """
    import sys, time
    from imtok.data.shards import write_split
    from imtok.data.sources import SyntheticShapes

    class Slow(SyntheticShapes):
        def load(self, item):
            time.sleep(0.05)
            return super().load(item)

    write_split(Slow(count=2000, image_size=8, seed=0), "train", sys.argv[1], maxcount=10, workers=2)
    """
)


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state, ppid, ...), or None once gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def _children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) and fields[1] == str(pid):
            found.add(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"  # a zombie has exited; only the wait is missing


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="finds processes through Linux's /proc")
def test_workers_of_a_killed_prepare_exit_by_themselves(tmp_path):
    parent = subprocess.Popen([sys.executable, "-c", KILLED_PARENT, str(tmp_path)])
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not list(tmp_path.glob("shard-*.tar")):
            assert parent.poll() is None, "the writer finished before it could be killed"
            time.sleep(0.05)
        workers = _children(parent.pid)
        assert len(workers) >= 2, f"expected the pool's workers under {parent.pid}, found {workers}"
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(_alive(pid) for pid in workers):
            time.sleep(0.1)
        survivors = [pid for pid in workers if _alive(pid)]
        for pid in survivors:
            os.kill(pid, signal.SIGKILL)
        assert not survivors, f"workers {survivors} outlived their killed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(timeout=30)
    assert not (tmp_path / "meta.json").exists()
