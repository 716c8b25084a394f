"""Outputs written atomically keep ordinary modes, and a swapped-in directory leaves nothing behind."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from imtok.atomic import creation_mode, process_umask, read_json, replace_directory
from imtok.images import save_grid
from imtok.overrides import write_overrides
from imtok.training import atomic_save

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_the_umask_is_read_without_changing_it(umask_022):
    assert process_umask() == 0o022 and process_umask() == 0o022
    assert creation_mode() == 0o644 and creation_mode(directory=True) == 0o755


def test_new_atomic_files_get_a_plain_creation_mode_and_replaced_ones_keep_theirs(tmp_path, umask_022):
    atomic_save({"x": torch.zeros(2)}, tmp_path / "step.pt")
    save_grid(torch.zeros(2, 1, 4, 4), tmp_path / "grid.png")
    assert mode(tmp_path / "step.pt") == 0o644 and mode(tmp_path / "grid.png") == 0o644  # not 0600
    params = tmp_path / "params.yaml"
    params.write_text(PARAMS.read_text())
    params.chmod(0o664)
    write_overrides(params, {"tokenizer": {"total_steps": 777}})
    assert mode(params) == 0o664 and "total_steps: 777" in params.read_text()


def test_a_swapped_in_directory_is_shareable_and_clears_what_a_killed_swap_left(tmp_path, umask_022):
    out = tmp_path / "models" / "tokenizer"
    leftover = tmp_path / "models" / ".tokenizer.staging-dead"
    leftover.mkdir(parents=True)
    (leftover / "tokenizer.pt").write_bytes(b"half-written")
    unrelated = tmp_path / "models" / ".tokenizer.backup"
    unrelated.mkdir()

    replace_directory(out, lambda staging: (staging / "a.txt").write_text("first"))
    assert mode(out) == 0o755 and (out / "a.txt").read_text() == "first"
    assert not leftover.exists() and unrelated.exists()

    def failing(staging: Path) -> None:
        (staging / "a.txt").write_text("broken")
        raise RuntimeError("killed midway")

    with pytest.raises(RuntimeError):
        replace_directory(out, failing)
    assert (out / "a.txt").read_text() == "first"  # the old output stays whole
    replace_directory(out, lambda staging: (staging / "b.txt").write_text("second"))
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in out.parent.iterdir()) == [".tokenizer.backup", "tokenizer"]


def test_a_damaged_json_file_is_named(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text('{"registered_model": ')
    with pytest.raises(ValueError, match=rf"^{path}: damaged, not JSON"):
        read_json(path)


def test_a_setgid_parent_passes_its_group_bit_on_to_a_new_output(tmp_path, umask_022):
    parent = tmp_path / "shared"
    parent.mkdir()
    parent.chmod(0o2775)
    replace_directory(parent / "tokenizer", lambda staging: (staging / "a.txt").write_text("x"))
    assert stat.S_IMODE((parent / "tokenizer").stat().st_mode) & stat.S_ISGID


def test_an_output_renamed_aside_by_a_killed_swap_is_restored_not_deleted(tmp_path):
    out = tmp_path / "models" / "tokenizer"
    retired = tmp_path / "models" / ".tokenizer.retired-dead"
    retired.mkdir(parents=True)
    (retired / "tokenizer.pt").write_text("the old model")  # killed between the two renames

    def failing(staging: Path) -> None:
        raise RuntimeError("this run fails too")

    with pytest.raises(RuntimeError):
        replace_directory(out, failing)
    assert (out / "tokenizer.pt").read_text() == "the old model" and not retired.exists()


def test_an_atomic_text_write_keeps_the_old_file_whole_when_it_fails(tmp_path, umask_022):
    from imtok.atomic import write_bytes_atomic, write_text_atomic

    path = tmp_path / "reports" / "train.json"
    write_text_atomic(path, "old\n")
    assert mode(path) == 0o644 and path.read_text() == "old\n"
    with pytest.raises(TypeError):
        write_bytes_atomic(path, "not bytes")  # fails inside the write
    assert path.read_text() == "old\n" and sorted(p.name for p in path.parent.iterdir()) == ["train.json"]
