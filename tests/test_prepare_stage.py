"""The prepare stage: `dvc repro` in a fresh repository, its report, its errors, S3 upload and remotes."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import boto3
import pytest
import yaml
from PIL import Image
from project_factory import with_run_settings

from imtok.data.shards import iter_samples, read_meta
from stages.prepare import main

REPO = Path(__file__).resolve().parents[1]
PROJECT_FILES = ["dvc.yaml", "params.yaml", ".dvcignore", ".dvc/config", ".dvc/.gitignore"]
PROJECT_PACKAGES = ["imtok", "stages"]


def _run(command: list[str], cwd: Path, env: dict[str, str], timeout: float = 180) -> str:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(command)} failed ({result.returncode}):\n{output}"
    return output


def _dvc(*args: str, cwd: Path, env: dict[str, str]) -> str:
    return _run([sys.executable, "-m", "dvc", *args], cwd, env)


@pytest.fixture
def project(tmp_path: Path, fashion_mnist_dir) -> tuple[Path, dict[str, str]]:
    """A git repository holding a copy of the pipeline, with small prepare params, and its env."""
    repo = tmp_path / "repo"
    for name in PROJECT_FILES:
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, repo / name)
    for package in PROJECT_PACKAGES:
        shutil.copytree(REPO / package, repo / package, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["prepare"].update(limit=200, maxcount=64)
    if fashion_mnist_dir is None:
        message = (
            "Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist): "
            "dvc repro prepare runs on the synthetic source instead"
        )
        warnings.warn(message, stacklevel=1)
        print(message)
        params["prepare"].update(source="synthetic", synthetic_count=2000)  # 10% val: 200 images
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "DVC_"))}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",  # `python` = this venv's
        DVC_NO_ANALYTICS="1",
        DVC_GLOBAL_CONFIG_DIR=str(tmp_path / "dvc-global"),
        DVC_SYSTEM_CONFIG_DIR=str(tmp_path / "dvc-system"),
        GIT_CONFIG_NOSYSTEM="1",
        HOME=str(tmp_path / "home"),
    )
    _run(["git", "init", "-q"], repo, env)
    return repo, env


@pytest.mark.slow
def test_dvc_repro_prepare_in_a_fresh_repository(project, s3_bucket, moto_endpoint):
    repo, env = project
    _dvc("repro", "prepare", cwd=repo, env=env)
    report = json.loads((repo / "reports/prepare.json").read_text())
    assert report["train"]["count"] == report["val"]["count"] == 200
    assert report["skipped_total"] == 0
    for split in ("train", "val"):
        meta = read_meta(repo / "data/shards" / split)
        assert meta["count"] == 200 and [s["count"] for s in meta["shards"]] == [64, 64, 64, 8]
        assert len(list(iter_samples(repo / "data/shards" / split))) == 200
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["prepare"]
    assert lock["params"]["params.yaml"]["prepare"]["limit"] == 200

    assert "didn't change" in _dvc("repro", "prepare", cwd=repo, env=env)
    _dvc("repro", "--force", "prepare", cwd=repo, env=env)  # a rerun writes byte-identical shards
    relock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["prepare"]
    shards = [out for out in lock["outs"] if out["path"].startswith("data/")]
    assert len(shards) == 2 and shards == [out for out in relock["outs"] if out["path"].startswith("data/")]

    # the committed default remote (a directory beside the clone) works from this copy
    _dvc("push", cwd=repo, env=env)
    assert any((repo.parent / "imtok-dvc-remote").rglob("*"))

    # switching to S3 as docs/data.md describes: endpoint in the config, credentials in config.local
    _dvc("remote", "add", "s3", f"s3://{s3_bucket}/dvc", cwd=repo, env=env)
    _dvc("remote", "modify", "s3", "endpointurl", moto_endpoint, cwd=repo, env=env)
    _dvc("remote", "modify", "--local", "s3", "access_key_id", "testing", cwd=repo, env=env)
    _dvc("remote", "modify", "--local", "s3", "secret_access_key", "testing", cwd=repo, env=env)
    _dvc("push", "-r", "s3", cwd=repo, env=env)  # env has no AWS_* variables: only the config speaks
    stored = boto3.client("s3").list_objects_v2(Bucket=s3_bucket, Prefix="dvc/")
    assert stored["KeyCount"] > 0
    assert "testing" not in (repo / ".dvc/config").read_text()


def _write_params(path: Path, **prepare) -> Path:
    path.write_text(yaml.safe_dump(with_run_settings({"prepare": prepare, "tokenizer": {"downsample": 4}})))
    return path


def test_unreadable_files_are_listed_in_the_report_and_the_log(tmp_path, monkeypatch, caplog):
    images = tmp_path / "images"
    for i in range(10):
        (images / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (12, 12), (i * 25, 0, 0)).save(images / f"c{i % 2}" / f"{i}.png")
    (images / "c0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    (images / "c1" / "empty.jpg").write_bytes(b"")
    params = _write_params(
        tmp_path / "params.yaml", source="folder", root=str(images), image_size=8, channels=3
    )
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING):
        assert main(["--params", str(params)]) == 0
    report = json.loads((tmp_path / "reports/prepare.json").read_text())
    assert report["skipped_total"] == 2
    assert report["train"]["count"] + report["val"]["count"] == 10
    listed = {Path(entry["file"]).name for entry in report["skipped_files"]}
    assert listed == {"broken.png", "empty.jpg"}
    assert "broken.png" in caplog.text and "empty.jpg" in caplog.text


@pytest.mark.parametrize(
    ("prepare", "key"),
    [
        ({"image_size": 30}, "prepare.image_size"),
        ({"source": "imagenet"}, "prepare.source"),
        ({"source": "folder", "root": "no-such-folder"}, "prepare.root"),
        ({"source": "folder", "root": "empty"}, "prepare.root"),
    ],
)
def test_bad_params_and_empty_sources_fail_naming_the_key(tmp_path, monkeypatch, caplog, prepare, key):
    (tmp_path / "empty" / "nested").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    params = _write_params(tmp_path / "params.yaml", **prepare)
    with caplog.at_level(logging.ERROR):
        assert main(["--params", str(params)]) == 1
    assert key in caplog.text
    assert not (tmp_path / "data/shards/train/meta.json").exists()


def test_prepare_uploads_both_splits_to_s3(tmp_path, monkeypatch, s3_bucket):
    monkeypatch.chdir(tmp_path)
    upload = f"s3://{s3_bucket}/prepared"
    params = _write_params(
        tmp_path / "params.yaml",
        source="synthetic",
        synthetic_count=60,
        image_size=8,
        maxcount=20,
        upload=upload,
    )
    assert main(["--params", str(params)]) == 0
    report = json.loads((tmp_path / "reports/prepare.json").read_text())
    for split in ("train", "val"):
        assert report[split]["uploaded_to"] == f"{upload}/{split}"
        remote = list(iter_samples(f"{upload}/{split}"))
        assert remote == list(iter_samples(tmp_path / "data/shards" / split))


def test_encoding_workers_change_neither_the_shards_nor_the_dvc_params(tmp_path, monkeypatch):
    outputs = {}
    for workers in (0, 2):
        run_dir = tmp_path / f"workers{workers}"
        run_dir.mkdir()
        monkeypatch.chdir(run_dir)
        params = _write_params(
            run_dir / "params.yaml", source="synthetic", synthetic_count=240, image_size=8, maxcount=30,
            num_workers=workers,
        )  # fmt: skip
        assert main(["--params", str(params)]) == 0
        report = json.loads((run_dir / "reports/prepare.json").read_text())
        assert report["encode_workers"] == workers
        outputs[workers] = {
            path.relative_to(run_dir).as_posix(): path.read_bytes()
            for path in sorted((run_dir / "data/shards").rglob("*"))
            if path.is_file()
        }
    assert len(outputs[0]) > 8 and outputs[0] == outputs[2]
    listed = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["prepare"]["params"]
    assert not [entry for entry in listed if entry.startswith("run.")]


def test_an_image_over_max_pixels_is_skipped_undecoded_and_reported(tmp_path, monkeypatch, recwarn):
    import resource

    images = tmp_path / "images"
    (images / "c0").mkdir(parents=True)
    for i in range(4):
        Image.new("L", (12, 12), i * 40).save(images / "c0" / f"{i}.png")
    # 13000 x 13000, 656 KB on disk: decoding it whole took 3.8 GB and 15 s
    Image.new("L", (13000, 13000), 0).save(images / "c0" / "bomb.png", optimize=True)
    (images / "c0" / "text.png").write_bytes(b"not an image at all")
    params = _write_params(tmp_path / "params.yaml", source="folder", root=str(images), image_size=8)
    monkeypatch.chdir(tmp_path)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert main(["--params", str(params)]) == 0
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 500, f"peak memory grew {grown_mib:.0f} MiB: the image was decoded"
    report = json.loads((tmp_path / "reports/prepare.json").read_text())
    reasons = {Path(entry["file"]).name: entry["reason"] for entry in report["skipped_files"]}
    assert set(reasons) == {"bomb.png", "text.png"}
    assert "13000x13000 is 169,000,000 pixels, over prepare.max_pixels=64,000,000" in reasons["bomb.png"]
    assert str(images / "c0" / "text.png") in reasons["text.png"]  # the file, not a BytesIO repr
    assert "BytesIO" not in reasons["text.png"]
    assert not [w for w in recwarn if "DecompressionBomb" in type(w.message).__name__]


def test_a_large_jpeg_is_decoded_at_a_reduced_scale_that_still_covers_the_target(tmp_path):
    from imtok.data.sources import ImageFolder

    (tmp_path / "c").mkdir()
    Image.new("RGB", (4000, 3000), (200, 10, 10)).save(tmp_path / "c" / "big.jpg", quality=90)
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "c" / "small.jpg", quality=90)
    source = ImageFolder(tmp_path, image_size=32, val_fraction=0.5)
    opened = []
    original = Image.Image.load

    def recording_load(image):  # records the size PIL decodes at, then decodes
        opened.append(image.size)
        return original(image)

    Image.Image.load = recording_load
    try:
        arrays = [source.load(item) for item in source.items("train") + source.items("val")]
    finally:
        Image.Image.load = original
    assert all(array.shape == (32, 32, 3) for array in arrays)
    assert (500, 375) in opened, opened  # 1/8 scale: both sides still over 32
    assert (4000, 3000) not in opened


def test_a_split_whose_meta_lists_no_shards_says_why_and_what_to_do(tmp_path):
    from imtok.data.shards import ShardLoader, write_json_atomic

    split = tmp_path / "train"
    split.mkdir()
    write_json_atomic(split / "meta.json", {"count": 0, "image_size": 8, "channels": 1, "shards": []})
    with pytest.raises(ValueError, match=r"lists 0 shards.*reports/prepare\.json.*prepare\.root"):
        ShardLoader(split, 4)
