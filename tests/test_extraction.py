"""Extraction parallel over shards: the same token bytes for any worker count and process count."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import damage_png, torchrun_command
from test_extract_tokens import save_tokenizer

from imtok.data.shards import ShardError, read_meta, shard_urls
from imtok.data.tokens import load_token_split
from imtok.extraction import ShardImages, encode_pieces, extract, gather_results, rank_shards, split_shards
from imtok.params import ExtractParams, ExtractRun, Params

REPO = Path(__file__).resolve().parents[1]


def digests(split_dir: Path) -> dict[str, str]:
    """SHA-256 of every file of a token split, meta.json included."""
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(split_dir.iterdir())}


@pytest.fixture
def tokenizer_dir(tmp_path: Path) -> Path:
    save_tokenizer(tmp_path / "tokenizer")
    return tmp_path / "tokenizer"


def test_pieces_stay_inside_their_shard_and_mark_its_end(tiny_shards):
    meta = read_meta(tiny_shards / "train")
    shards = split_shards(meta, tiny_shards / "train")
    pieces = list(ShardImages(shards, batch_size=25))
    assert len(shards) > 1 and all(count % 25 for _, _, count in shards)
    for position, _, count in shards:
        mine = [piece for piece in pieces if piece.shard == position]
        assert [len(piece.keys) for piece in mine] == [25] * (count // 25) + [count % 25]
        assert [piece.last for piece in mine] == [False] * (count // 25) + [True]
        assert mine[0].images.dtype == torch.uint8 and mine[0].images.shape[1:] == (1, 16, 16)


def test_a_shard_that_fills_its_last_batch_exactly_ends_with_a_full_piece(tiny_shards):
    shards = split_shards(read_meta(tiny_shards / "train"), tiny_shards / "train")[:1]
    pieces = list(ShardImages(shards, batch_size=shards[0][2]))
    assert len(pieces) == 1 and pieces[0].last and len(pieces[0].keys) == shards[0][2]


def test_ranks_take_every_shard_once():
    shares = [rank_shards(10, rank, 3) for rank in range(3)]
    assert shares == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert rank_shards(2, 3, 4) == []


def test_token_shards_mirror_the_image_shards(tiny_shards, tokenizer_dir, tmp_path, one_thread):
    extract(
        ExtractParams(tokenizer=str(tokenizer_dir), batch_size=16),
        run=ExtractRun(device="cpu", num_workers=0),
        shards_dir=tiny_shards,
        tokens_dir=tmp_path / "t",
    )
    for split in ("train", "val"):
        images, tokens = read_meta(tiny_shards / split), read_meta(tmp_path / "t" / split)
        assert [(s["name"], s["count"]) for s in tokens["shards"]] == [
            (s["name"], s["count"]) for s in images["shards"]
        ]
        assert not list((tmp_path / "t" / split).glob("*.partial"))


@pytest.mark.parametrize("workers", [1, 2])
def test_loader_workers_write_the_same_bytes_as_one_process(
    tiny_shards, tokenizer_dir, tmp_path, one_thread, workers
):
    for name, count in (("serial", 0), ("parallel", workers)):
        extract(
            ExtractParams(tokenizer=str(tokenizer_dir), batch_size=16, flip=True),
            run=ExtractRun(device="cpu", num_workers=count),
            shards_dir=tiny_shards,
            tokens_dir=tmp_path / name,
        )
    for split in ("train", "val"):
        assert digests(tmp_path / "serial" / split) == digests(tmp_path / "parallel" / split)
    train = load_token_split(tmp_path / "parallel" / "train")
    assert train.keys[1::2] == [key + "_hflip" for key in train.keys[0::2]]


def test_channels_last_extraction_gives_the_nchw_tokens(tiny_shards, tokenizer_dir, tmp_path, one_thread):
    for name, channels_last in (("nchw", False), ("nhwc", True)):
        extract(
            ExtractParams(tokenizer=str(tokenizer_dir), channels_last=channels_last),
            run=ExtractRun(device="cpu"),
            shards_dir=tiny_shards,
            tokens_dir=tmp_path / name,
        )
    nchw, nhwc = (load_token_split(tmp_path / name / "val").tokens for name in ("nchw", "nhwc"))
    assert torch.equal(nchw, nhwc)


def test_encoded_pieces_equal_the_tokenizers_own_encoding(tiny_shards, tmp_path, one_thread):
    tokenizer = save_tokenizer(tmp_path / "tok")
    shards = split_shards(read_meta(tiny_shards / "val"), tiny_shards / "val")
    out = list(
        encode_pieces(
            tokenizer.encode,
            iter(ShardImages(shards, batch_size=7)),
            device=torch.device("cpu"),
            autocast_dtype=None,
            flip=False,
        )
    )
    pieces = list(ShardImages(shards, batch_size=1000))
    images = torch.cat([piece.images for piece in pieces]).float().div(127.5).sub(1)
    expected = tokenizer.encode(images).numpy()
    got = np.stack([sample.tokens for _, samples in out for sample in samples])
    assert [position for position, _ in out] == [position for position, _, _ in shards]
    assert np.array_equal(got, expected)


def test_gather_without_a_process_group_orders_this_ranks_shards():
    from imtok.extraction import ShardResult

    results = [
        ShardResult(2, {"name": "c", "count": 1}, np.array([0, 1])),
        ShardResult(0, {"name": "a", "count": 2}, np.array([2, 0])),
    ]
    listed, counts = gather_results(results, 2)
    assert [shard["name"] for shard in listed] == ["a", "c"] and counts.tolist() == [2, 1]


def truncate(shard: Path) -> str:
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return rf"{shard.name}: "


def garble_png(shard: Path) -> str:
    return rf"{shard.name}: sample '{damage_png(shard, 2)}' holds a PNG that does not decode"


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("damage", [truncate, garble_png])
def test_a_damaged_image_shard_names_the_file_and_leaves_no_meta(
    tiny_shards, tokenizer_dir, tmp_path, one_thread, workers, damage
):
    broken = tmp_path / "shards"
    shutil.copytree(tiny_shards, broken)
    message = damage(Path(shard_urls(broken / "train")[2]))
    with pytest.raises(ShardError, match=message):
        extract(
            ExtractParams(tokenizer=str(tokenizer_dir)),
            run=ExtractRun(device="cpu", num_workers=workers),
            shards_dir=broken,
            tokens_dir=tmp_path / "t",
        )
    assert not (tmp_path / "t" / "train" / "meta.json").exists()
    assert not list((tmp_path / "t" / "train").glob("*.partial"))


def test_negative_workers_are_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"^run\.extract\.num_workers: must be >= 0"):
        Params.from_dict({"run": {"extract": {"num_workers": -1}}})


def test_two_gloo_processes_split_the_shards_and_write_what_one_process_writes(tiny_shards, tmp_path):
    """The real stage under torchrun: each rank encodes half of the shards, rank 0 writes meta.json."""
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    shutil.copytree(tiny_shards, project / "data" / "shards")
    save_tokenizer(project / "models" / "tokenizer")
    (project / "params.yaml").write_text(
        yaml.safe_dump(
            {
                "extract": {"batch_size": 16, "flip": True},
                "run": {"extract": {"device": "cpu", "num_workers": 1}},
            }
        )
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = torchrun_command("-m", "stages.extract_tokens", log_dir=tmp_path / "torchrun")
    done = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((project / "reports" / "extract_tokens.json").read_text())
    train_images = read_meta(project / "data" / "shards" / "train")["count"]
    assert report["processes"] == 2 and report["train"]["count"] == 2 * train_images

    torch.set_num_threads(1)
    extract(
        ExtractParams(tokenizer=str(project / "models" / "tokenizer"), batch_size=16, flip=True),
        run=ExtractRun(device="cpu"),
        shards_dir=project / "data" / "shards",
        tokens_dir=tmp_path / "single",
    )
    for split in ("train", "val"):
        two = json.loads((project / "data" / "tokens" / split / "meta.json").read_text())
        one = json.loads((tmp_path / "single" / split / "meta.json").read_text())
        assert two.pop("tokenizer") == "models/tokenizer"
        assert one.pop("tokenizer").endswith("models/tokenizer")
        for meta in (one, two):
            meta.pop("image_shards")
        assert two == one
        shard_digests = [
            {name: digest for name, digest in digests(root / split).items() if name != "meta.json"}
            for root in (project / "data" / "tokens", tmp_path / "single")
        ]
        assert shard_digests[0] == shard_digests[1] and len(shard_digests[0]) == len(two["shards"])


def test_a_token_shard_refuses_ids_outside_the_codebook_naming_the_sample(tmp_path):
    from imtok.data.tokens import TokenSample, decode_tokens, write_token_shard

    good = [TokenSample(f"k{i}", np.full((2, 3), i), i) for i in range(3)]
    with pytest.raises(ValueError, match=r"k9: token ids from 0 to 8 fall outside \[0, 8\)"):
        write_token_shard(
            [*good, TokenSample("k9", np.array([[0, 8, 1]] * 2), 0)],
            tmp_path / "a.tar",
            codebook_size=8,
            grid=(2, 3),
        )
    with pytest.raises(ValueError, match=r"k7: tokens of shape \(3, 2\), expected the grid \(2, 3\)"):
        write_token_shard(
            [*good, TokenSample("k7", np.zeros((3, 2)), 0)], tmp_path / "a.tar", codebook_size=8, grid=(2, 3)
        )
    assert not list(tmp_path.iterdir())
    written = write_token_shard(good, tmp_path / "a.tar", codebook_size=8, grid=(2, 3))
    assert written == {"name": "a.tar", "count": 3}
    from webdataset.tariterators import tarfile_samples

    stored = list(tarfile_samples([{"url": str(tmp_path / "a.tar")}]))
    assert [decode_tokens(s["tokens.npy"]).tolist() for s in stored] == [g.tokens.tolist() for g in good]
    assert decode_tokens(stored[0]["tokens.npy"]).dtype == np.uint16


def test_a_failed_token_shard_write_stops_extraction_with_its_error(tiny_shards, tmp_path, one_thread):
    from imtok.extraction import extract_shards

    tokenizer = save_tokenizer(tmp_path / "tok")
    shards = split_shards(read_meta(tiny_shards / "train"), tiny_shards / "train")
    with pytest.raises(FileNotFoundError):
        extract_shards(
            tokenizer.encode,
            shards,
            tmp_path / "absent" / "train",  # never created: the first write fails
            batch_size=32,
            device=torch.device("cpu"),
            autocast_dtype=None,
            flip=False,
            num_workers=0,
            codebook_size=tokenizer.codebook_size,
            grid=(4, 4),
        )
    assert not (tmp_path / "absent").exists()


def test_the_stage_ends_on_a_damaged_shard_with_one_line_and_exit_code_1(
    tiny_shards, tmp_path, monkeypatch, caplog, one_thread
):
    from stages.extract_tokens import main

    shutil.copytree(tiny_shards, tmp_path / "data" / "shards")
    save_tokenizer(tmp_path / "models" / "tokenizer")
    victim = Path(shard_urls(tmp_path / "data" / "shards" / "val")[0])
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"run": {"extract": {"device": "cpu"}}}))
    monkeypatch.chdir(tmp_path)
    assert main(["--params", "params.yaml"]) == 1
    errors = [record.getMessage() for record in caplog.records if record.levelname == "ERROR"]
    assert len(errors) == 1 and victim.name in errors[0] and "write the split again" in errors[0]
    assert not (tmp_path / "reports" / "extract_tokens.json").exists()


def test_an_image_key_that_ends_like_a_flipped_twins_is_refused_when_flipping():
    from imtok.extraction import ShardPiece

    keys = ["shirts_a", "shirts_a_hflip"]
    piece = ShardPiece(0, torch.zeros(2, 1, 8, 8, dtype=torch.uint8), [0, 0], keys, True)

    def run(flip: bool) -> list:
        encode = lambda images: torch.zeros(images.shape[0], 2, 2, dtype=torch.int64)  # noqa: E731
        pieces = iter([piece])
        return list(encode_pieces(encode, pieces, device=torch.device("cpu"), autocast_dtype=None, flip=flip))

    [(_, samples)] = run(False)
    assert [sample.key for sample in samples] == ["shirts_a", "shirts_a_hflip"]
    with pytest.raises(ValueError, match=r"^extract\.flip: image 'shirts_a_hflip' \(shard 0 of"):
        run(True)
