"""A class label outside the split's classes is refused wherever shards are read, naming shard and key."""

from __future__ import annotations

import numpy as np
import pytest

from imtok.data.encoding import encode_png
from imtok.data.shards import (
    META_NAME,
    ShardError,
    ShardLoader,
    iter_batches,
    iter_samples,
    write_json_atomic,
    write_shards,
)
from imtok.data.tokens import encode_tokens, load_token_split
from imtok.extraction import ShardImages

CLASSES = [f"class-{i}" for i in range(10)]


def image_split(directory, labels, **meta):
    """A 10-class split of 8x8 images with the given labels (keys s0000, s0001, ...)."""
    image = np.zeros((8, 8), dtype=np.uint8)
    samples = [
        {"__key__": f"s{i:04d}", "png": encode_png(image), "cls": str(label).encode()}
        for i, label in enumerate(labels)
    ]
    shards = write_shards(samples, directory)
    write_json_atomic(
        directory / META_NAME,
        {
            "count": len(labels),
            "image_size": 8,
            "channels": 1,
            "class_names": CLASSES,
            "shards": shards,
            **meta,
        },
    )
    return directory


def readers(directory):
    """Every way the pipeline reads an image split, each drained to the end."""
    shards = [(0, str(directory / "shard-000000.tar"), 4)]
    return {
        "iter_samples": lambda: list(iter_samples(directory)),
        "iter_batches": lambda: list(iter_batches(directory, 2)),
        "ShardLoader": lambda: list(ShardLoader(directory, 2, shuffle=False)),
        "extraction": lambda: list(ShardImages(shards, 2, label_range_of(directory))),
    }


def label_range_of(directory):
    from imtok.data.shards import label_range, read_meta

    return label_range(read_meta(directory))


@pytest.mark.parametrize("bad", [57, 10, -1])
@pytest.mark.parametrize("reader", ["iter_samples", "iter_batches", "ShardLoader", "extraction"])
def test_a_label_outside_the_classes_names_the_shard_and_the_key(tmp_path, bad, reader):
    directory = image_split(tmp_path / "train", [0, 9, bad, 3])
    with pytest.raises(
        ShardError, match=rf"shard-000000\.tar: sample 's0002' holds class label {bad}, outside"
    ):
        readers(directory)[reader]()


def test_the_samples_of_an_unconditional_prior_may_say_minus_one(tmp_path):
    directory = image_split(tmp_path / "samples", [-1, -1, -1, -1], conditional=False)
    for read in readers(directory).values():
        read()
    with pytest.raises(ShardError, match="class label -1"):
        list(iter_batches(image_split(tmp_path / "conditional", [0, -1, 1, 2], conditional=True), 2))


def test_a_token_split_with_a_label_outside_the_classes_is_refused(tmp_path):
    directory = tmp_path / "tokens"
    tokens = np.zeros((2, 2), dtype=np.uint16)
    samples = [
        {"__key__": f"t{i}", "tokens.npy": encode_tokens(tokens), "cls": str(label).encode()}
        for i, label in enumerate([1, 57])
    ]
    shards = write_shards(samples, directory)
    meta = {"kind": "tokens", "count": 2, "grid": [2, 2], "codebook_size": 16, "class_names": CLASSES}
    write_json_atomic(directory / META_NAME, meta | {"shards": shards})
    with pytest.raises(ShardError, match=r"sample 't1' holds class label 57.*run extract_tokens again"):
        load_token_split(directory)
