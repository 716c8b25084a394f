"""S3 through boto3 against a moto server over real HTTP: upload a split, read it back by s3:// URL."""

from __future__ import annotations

import boto3
import pytest
import webdataset as wds

from imtok.data.s3 import open_s3, split_s3_url, upload_split
from imtok.data.shards import ShardError, ShardLoader, iter_samples, read_meta, write_split
from imtok.data.sources import SyntheticShapes


@pytest.fixture
def local_split(tmp_path):
    location = tmp_path / "train"
    write_split(SyntheticShapes(count=70, image_size=8, channels=3, seed=3), "train", location, maxcount=16)
    return location


def test_split_s3_url():
    assert split_s3_url("s3://bucket/a/b/shard-000000.tar") == ("bucket", "a/b/shard-000000.tar")
    assert split_s3_url("s3://bucket") == ("bucket", "")
    for bad in ("bucket/key", "s3:///key"):
        with pytest.raises(ValueError):
            split_s3_url(bad)


def test_upload_then_read_back_through_s3_urls_gives_the_same_samples(local_split, s3_bucket):
    prefix = f"s3://{s3_bucket}/datasets/v1/train"
    urls = upload_split(local_split, prefix)
    assert urls[-1] == f"{prefix}/meta.json"  # meta goes last
    listed = boto3.client("s3").list_objects_v2(Bucket=s3_bucket, Prefix="datasets/v1/train/")
    assert sorted(obj["Key"].rsplit("/", 1)[1] for obj in listed["Contents"]) == sorted(
        path.name for path in local_split.iterdir()
    )

    local = list(iter_samples(local_split))
    assert list(iter_samples(prefix)) == local
    assert read_meta(prefix) == read_meta(local_split)

    # a plain WebDataset pipeline over a brace pattern of s3:// URLs, through the registered handler
    last = len(read_meta(prefix)["shards"]) - 1
    pattern = f"{prefix}/shard-{{000000..{last:06d}}}.tar"
    dataset = wds.WebDataset(pattern, shardshuffle=False, empty_check=True)
    remote = [{"__key__": s["__key__"], "png": s["png"], "cls": int(s["cls"])} for s in dataset]
    assert remote == local

    # forkserver: workers start from a clean process, not a fork of this one, which by now may
    # hold threads and exit handlers of servers that earlier tests started (Prefect, MLflow)
    loader = ShardLoader(
        prefix, batch_size=10, shuffle=True, num_workers=2, seed=1, multiprocessing_context="forkserver"
    )
    keys = [key for batch in loader for key in batch.keys]
    assert set(keys) == {sample["__key__"] for sample in local}


def test_missing_objects_are_errors_naming_the_url(s3_bucket):
    with pytest.raises(FileNotFoundError, match=f"s3://{s3_bucket}/absent/shard-000000.tar"):
        open_s3(f"s3://{s3_bucket}/absent/shard-000000.tar")
    with pytest.raises(FileNotFoundError, match="not a complete split written by prepare"):
        read_meta(f"s3://{s3_bucket}/absent")
    with pytest.raises(FileNotFoundError, match="s3://imtok-no-such-bucket/x"):
        open_s3("s3://imtok-no-such-bucket/x")


def test_a_truncated_shard_on_s3_is_an_error_naming_its_url(local_split, s3_bucket):
    prefix = f"s3://{s3_bucket}/cut"
    upload_split(local_split, prefix)
    shard = local_split / "shard-000002.tar"
    boto3.client("s3").put_object(
        Bucket=s3_bucket, Key="cut/shard-000002.tar", Body=shard.read_bytes()[:3000]
    )
    with pytest.raises(ShardError, match=f"^{prefix}/shard-000002.tar: "):
        list(iter_samples(prefix))


def test_s3_urls_are_read_only(s3_bucket):
    with pytest.raises(ValueError, match="read-only"):
        open_s3(f"s3://{s3_bucket}/x.tar", mode="wb")


def test_replacing_a_split_leaves_no_old_meta_over_new_shards_and_no_stale_shards(
    local_split, s3_bucket, tmp_path
):
    prefix = f"s3://{s3_bucket}/replaced/train"
    upload_split(local_split, prefix)
    assert len(read_meta(prefix)["shards"]) == 4

    # an upload that fails midway: the old meta.json must not vouch for the mix of shards left
    broken = tmp_path / "broken"
    write_split(SyntheticShapes(count=70, image_size=8, channels=3, seed=4), "train", broken, maxcount=16)
    (broken / "shard-000002.tar").unlink()
    (broken / "shard-000002.tar").mkdir()  # unreadable as a file: its upload fails
    with pytest.raises(OSError, match=r"shard-000002\.tar"):
        upload_split(broken, prefix)
    with pytest.raises(FileNotFoundError, match="not a complete split"):
        read_meta(prefix)

    # a smaller split uploaded over it: only its own shards remain
    smaller = tmp_path / "smaller"
    write_split(SyntheticShapes(count=30, image_size=8, channels=3, seed=5), "train", smaller, maxcount=16)
    upload_split(smaller, prefix)
    listed = boto3.client("s3").list_objects_v2(Bucket=s3_bucket, Prefix="replaced/train/")
    assert sorted(obj["Key"].rsplit("/", 1)[1] for obj in listed["Contents"]) == sorted(
        path.name for path in smaller.iterdir()
    )
    assert list(iter_samples(prefix)) == list(iter_samples(smaller))
