"""extract_tokens: token shards that decode to the tokenizer's own reconstructions, and their errors."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch

from imtok.data.shards import ShardError, decode_png, iter_samples
from imtok.data.tokens import TokenSample, load_token_split, token_dtype, write_token_split
from imtok.extraction import FLIP_SUFFIX, extract
from imtok.models.autoencoder import Tokenizer, TokenizerConfig
from imtok.models.files import save_model_file
from imtok.params import ExtractParams, ExtractRun


def save_tokenizer(directory: Path, in_channels: int = 1, seed: int = 0) -> Tokenizer:
    torch.manual_seed(seed)
    config = TokenizerConfig(in_channels=in_channels, image_size=16, base_channels=8, codebook_size=256)
    tokenizer = Tokenizer(config).eval()
    save_model_file(
        directory / "tokenizer.pt", kind="tokenizer", config=config, model=tokenizer, meta={"step": 0}
    )
    return tokenizer


@pytest.fixture
def tokenizer_dir(tmp_path: Path) -> Path:
    save_tokenizer(tmp_path / "tokenizer")
    return tmp_path / "tokenizer"


def split_images(split_dir: Path) -> tuple[list[str], torch.Tensor]:
    samples = list(iter_samples(split_dir))
    return [s["__key__"] for s in samples], torch.stack([decode_png(s["png"]) for s in samples])


def test_extracted_tokens_decode_to_exactly_the_tokenizers_reconstruction(
    tiny_shards, tokenizer_dir, tmp_path, one_thread
):
    params = ExtractParams(tokenizer=str(tokenizer_dir), batch_size=7)
    report = extract(
        params, shards_dir=tiny_shards, tokens_dir=tmp_path / "tokens", run=ExtractRun(device="cpu")
    )
    tokenizer = save_tokenizer(tmp_path / "again")
    val = load_token_split(tmp_path / "tokens" / "val")
    keys, images = split_images(tiny_shards / "val")
    assert val.keys == keys and val.tokens.shape == (len(keys), 4, 4)
    assert torch.equal(tokenizer.decode(val.tokens), tokenizer.decode(tokenizer.encode(images)))
    assert val.meta["dtype"] == "uint16" and val.meta["codebook_size"] == tokenizer.codebook_size == 240
    assert val.meta["tokenizer_sha256"] == report["tokenizer"]["tokenizer_sha256"]
    assert report["val"]["count"] == len(keys) and 0 < report["val"]["codebook_usage_pct"] <= 100


def test_extraction_is_deterministic_byte_for_byte(tiny_shards, tokenizer_dir, tmp_path, one_thread):
    digests = []
    for name in ("first", "second"):
        extract(
            ExtractParams(tokenizer=str(tokenizer_dir)),
            run=ExtractRun(device="cpu"),
            shards_dir=tiny_shards,
            tokens_dir=tmp_path / name,
        )
        files = sorted((tmp_path / name / "train").glob("shard-*.tar"))
        digests.append([hashlib.sha256(path.read_bytes()).hexdigest() for path in files])
    assert digests[0] == digests[1] and digests[0]


def test_flip_adds_the_tokens_of_mirrored_train_images_only(tiny_shards, tokenizer_dir, tmp_path, one_thread):
    extract(
        ExtractParams(tokenizer=str(tokenizer_dir), flip=True),
        run=ExtractRun(device="cpu"),
        shards_dir=tiny_shards,
        tokens_dir=tmp_path / "t",
    )
    train = load_token_split(tmp_path / "t" / "train")
    keys, images = split_images(tiny_shards / "train")
    assert train.keys[0::2] == keys and train.keys[1::2] == [key + FLIP_SUFFIX for key in keys]
    tokenizer = save_tokenizer(tmp_path / "again")
    assert torch.equal(train.tokens[1::2], tokenizer.encode(images.flip(-1)))
    assert len(load_token_split(tmp_path / "t" / "val").keys) == len(split_images(tiny_shards / "val")[0])


def test_large_codebooks_are_stored_as_int32_and_round_trip(tmp_path):
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.int32
    rng = np.random.default_rng(0)
    samples = [TokenSample(f"k{i}", rng.integers(0, 2**18, size=(2, 3)), i % 3) for i in range(5)]
    meta = write_token_split(samples, tmp_path / "s", codebook_size=2**18, grid=(2, 3), meta={}, maxcount=2)
    assert meta["dtype"] == "int32" and len(meta["shards"]) == 3
    split = load_token_split(tmp_path / "s")
    assert torch.equal(split.tokens, torch.from_numpy(np.stack([s.tokens for s in samples])))
    assert split.labels.tolist() == [0, 1, 2, 0, 1]


@pytest.mark.parametrize("codebook_size", [1000, 65536, 2**18])
def test_a_loaded_split_holds_int32_ids_for_every_stored_dtype(tmp_path, codebook_size):
    # int32 on the host: half of int64's memory for a whole split, and every id still fits
    rng = np.random.default_rng(1)
    top = np.array([[codebook_size - 1, 0]])  # the largest id survives the load
    samples = [TokenSample("k0", top, 0)]
    samples += [TokenSample(f"k{i}", rng.integers(0, codebook_size, size=(1, 2)), 1) for i in range(1, 4)]
    write_token_split(samples, tmp_path / "s", codebook_size=codebook_size, grid=(1, 2), meta={})
    split = load_token_split(tmp_path / "s")
    assert split.tokens.dtype == torch.int32
    assert split.tokens.tolist() == [s.tokens.tolist() for s in samples]


def test_tokens_outside_the_grid_or_codebook_are_refused_naming_the_sample(tmp_path):
    with pytest.raises(ValueError, match=r"k0: tokens of shape \(2, 2\), expected the grid \(2, 3\)"):
        write_token_split(
            [TokenSample("k0", np.zeros((2, 2)), 0)], tmp_path / "a", codebook_size=8, grid=(2, 3), meta={}
        )
    with pytest.raises(ValueError, match=r"k0: token ids from 0 to 8 fall outside \[0, 8\)"):
        samples = [TokenSample("k0", np.array([[0, 8]]), 0)]
        write_token_split(samples, tmp_path / "b", codebook_size=8, grid=(1, 2), meta={})
    assert not list((tmp_path / "b").glob("*.tar"))


def test_a_truncated_token_shard_names_the_file(tmp_path):
    samples = [TokenSample(f"k{i}", np.full((4, 4), i), 0) for i in range(50)]
    write_token_split(samples, tmp_path / "s", codebook_size=64, grid=(4, 4), meta={})
    shard = tmp_path / "s" / "shard-000000.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ShardError, match=r"shard-000000\.tar"):
        load_token_split(tmp_path / "s")


def _rewrite_member(shard: Path, name: str, change) -> None:
    """Rewrite the tar ``shard`` with member ``name``'s bytes replaced by ``change(bytes)``: an intact
    archive holding one damaged sample."""
    import io
    import tarfile

    with tarfile.open(shard) as archive:
        members = [(member, archive.extractfile(member).read()) for member in archive.getmembers()]
    with tarfile.open(shard, "w") as archive:
        for member, data in members:
            data = change(data) if member.name == name else data
            member.size = len(data)
            archive.addfile(member, io.BytesIO(data))


@pytest.mark.parametrize(
    ("member", "change", "message"),
    [
        ("k4.tokens.npy", lambda data: b"XXXXXX" + data[6:], "holds tokens.npy that does not load"),
        ("k4.tokens.npy", lambda data: data[:-5], "holds tokens.npy that does not load"),
        ("k4.tokens.npy", lambda data: _npy(np.zeros((4, 4))), "holds tokens of dtype float64"),
        ("k4.cls", lambda data: b"x", r"holds a class label b'x' that is not an integer"),
    ],
)
def test_a_damaged_token_sample_names_its_shard_and_key(tmp_path, member, change, message):
    samples = [TokenSample(f"k{i}", np.full((4, 4), i), 0) for i in range(10)]
    write_token_split(samples, tmp_path / "s", codebook_size=64, grid=(4, 4), meta={})
    _rewrite_member(tmp_path / "s" / "shard-000000.tar", member, change)
    expected = rf"shard-000000\.tar: sample 'k4' {message}.*run extract_tokens again"
    with pytest.raises(ShardError, match=expected):
        load_token_split(tmp_path / "s")


def _npy(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "array",
    [
        np.arange(16, dtype=np.uint16).reshape(4, 4),
        np.arange(98, dtype=np.int32).reshape(14, 7) * 1000,
        np.asfortranarray(np.arange(12, dtype=np.int32).reshape(3, 4)),  # np.load's path
        np.zeros((0, 5), dtype=np.uint16),
        np.array(7, dtype=np.int64),
        np.arange(6, dtype=">i4").reshape(2, 3),  # big-endian
    ],
)
def test_decode_tokens_reads_what_np_load_reads(array):
    from imtok.data.tokens import decode_tokens

    data = _npy(array)
    decoded, loaded = decode_tokens(data), np.load(io.BytesIO(data))
    assert decoded.dtype == loaded.dtype and decoded.shape == loaded.shape
    assert np.array_equal(decoded, loaded) and decoded.flags.writeable
    assert np.array_equal(decode_tokens(data), loaded)  # the header cached, the same again


def test_image_shards_are_not_mistaken_for_tokens(tiny_shards):
    with pytest.raises(ValueError, match="not token shards"):
        load_token_split(tiny_shards / "val")


def test_a_tokenizer_for_other_channels_names_both_counts(tiny_shards, tmp_path):
    save_tokenizer(tmp_path / "rgb", in_channels=3)
    with pytest.raises(
        ValueError, match=r"extract\.tokenizer: .* takes 3-channel images but .* holds 1-channel"
    ):
        extract(
            ExtractParams(tokenizer=str(tmp_path / "rgb")),
            run=ExtractRun(device="cpu"),
            shards_dir=tiny_shards,
            tokens_dir=tmp_path / "t",
        )


def test_missing_tokenizer_and_unresolvable_uri_are_named(tiny_shards, tmp_path, mlflow_store):
    with pytest.raises(FileNotFoundError, match="no such model file"):
        extract(
            ExtractParams(tokenizer=str(tmp_path / "nowhere")),
            shards_dir=tiny_shards,
            tokens_dir=tmp_path / "t",
        )
    with pytest.raises(ValueError, match=r"models:/imtok-tokenizer@missing: cannot fetch tokenizer\.pt"):
        extract(
            ExtractParams(tokenizer="models:/imtok-tokenizer@missing"),
            shards_dir=tiny_shards,
            tokens_dir=tmp_path / "t",
        )
