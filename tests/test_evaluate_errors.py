"""evaluate's bad-input errors: empty sample set, samples of another size, unknown metric names."""

from __future__ import annotations

import dataclasses

import pytest

from imtok.data.shards import META_NAME, write_json_atomic, write_shards
from imtok.evaluation import check_same_shape, chosen_prior_metric, split_batches
from imtok.params import Params


def test_an_empty_sample_set_is_an_error_naming_the_directory(tmp_path):
    empty = tmp_path / "samples"
    shards = write_shards([], empty)
    meta = {"count": 0, "image_size": 28, "channels": 1, "shards": shards}
    write_json_atomic(empty / META_NAME, meta)
    with pytest.raises(ValueError, match=r"samples.*(no images|empty|no samples)"):
        list(split_batches(empty, batch_size=8))


def test_samples_of_another_size_or_channel_count_are_refused(tmp_path):
    val = {"image_size": 28, "channels": 1}
    samples, val_dir = tmp_path / "samples", tmp_path / "val"
    check_same_shape(samples, {"image_size": 28, "channels": 1, "count": 2}, val_dir, val)
    with pytest.raises(ValueError, match=r"\(1, 32, 32\).*\(1, 28, 28\)"):
        check_same_shape(samples, {"image_size": 32, "channels": 1}, val_dir, val)
    with pytest.raises(ValueError, match=r"\(3, 28, 28\)"):
        check_same_shape(samples, {"image_size": 28, "channels": 3}, val_dir, val)


@pytest.mark.parametrize("broken", [{"channels": 1}, {"image_size": "big", "channels": 1}])
def test_a_meta_json_without_a_usable_image_size_is_named(tmp_path, broken):
    with pytest.raises(ValueError, match=r"samples/meta\.json: no valid image_size and channels"):
        check_same_shape(tmp_path / "samples", broken, tmp_path / "val", {"image_size": 28, "channels": 1})


def test_a_promotion_metric_that_was_not_computed_names_the_key_and_what_exists():
    params = Params()
    wrong = dataclasses.replace(params, evaluate=dataclasses.replace(params.evaluate, prior_metric="fid"))
    with pytest.raises(ValueError, match=r"evaluate\.prior_metric: 'fid'.*fid_fmnist"):
        chosen_prior_metric(wrong, {"fid_fmnist": 10.0, "precision_fmnist": 0.5})
    assert chosen_prior_metric(params, {"fid_fmnist": 10.0}) == "fid_fmnist"
    assert chosen_prior_metric(params, {"precision_fmnist": 0.5}) is None
