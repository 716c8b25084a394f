"""S3 through boto3: an ``s3://`` scheme for webdataset's ``gopen``, and uploading a written split.

Endpoint, credentials and region come from the standard AWS environment variables or config files
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``,
``AWS_PROFILE``), so MinIO or any S3-compatible store is configuration, not code.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

_clients: dict[tuple, Any] = {}
_clients_lock = threading.Lock()
_CLIENT_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_PROFILE",
)


def split_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` -> ``("bucket", "some/key")``."""
    if not url.startswith("s3://"):
        raise ValueError(f"{url}: not an s3:// URL")
    bucket, _, key = url[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"{url}: no bucket name")
    return bucket, key


def s3_client() -> Any:
    """A boto3 S3 client for the current environment, one per process and configuration."""
    # a client must not cross a fork (its connection pool would be shared), and tests change the
    # environment between cases, so both are part of the cache key
    key = (os.getpid(), *(os.environ.get(name) for name in _CLIENT_ENV))
    with _clients_lock:
        if key not in _clients:
            import boto3
            from botocore.config import Config

            config = Config(
                connect_timeout=10, read_timeout=60, retries={"max_attempts": 5, "mode": "standard"}
            )
            _clients[key] = boto3.session.Session().client("s3", config=config)
        return _clients[key]


def _client_error(url: str, exc: Exception) -> OSError:
    code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
    if code in ("NoSuchKey", "NoSuchBucket", "404"):
        return FileNotFoundError(f"{url}: no such object ({code})")
    return OSError(f"{url}: {exc}")


def open_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> IO[bytes]:
    """Open an S3 object for streaming reads; the signature of a webdataset gopen handler."""
    if mode != "rb":
        raise ValueError(f"{url}: s3:// URLs are read-only here (mode {mode!r}); write locally and upload")
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split_s3_url(url)
    try:
        return s3_client().get_object(Bucket=bucket, Key=key)["Body"]
    except ClientError as exc:
        raise _client_error(url, exc) from exc
    except BotoCoreError as exc:
        raise OSError(f"{url}: {exc}") from exc


def register_s3_scheme() -> None:
    """Make webdataset open ``s3://`` URLs through boto3 (it has no s3 handler of its own)."""
    from webdataset.gopen import gopen_schemes

    gopen_schemes["s3"] = open_s3


def read_bytes(url: str) -> bytes:
    """The whole content of an S3 object."""
    with open_s3(url) as body:
        return body.read()


def upload_split(local_dir: str | Path, url_prefix: str) -> list[str]:
    """Upload a split's shards, then its meta.json; returns the uploaded URLs. The bucket must exist.

    The credentials need s3:PutObject, s3:DeleteObject and s3:ListBucket on the prefix. Replacing a
    split already under ``url_prefix``: its meta.json is deleted first, so while the upload
    runs, or after it failed midway, readers find no meta.json ("not a complete split") instead of the
    old one over a mix of new and old shards with matching counts. The new meta.json goes up last, and
    then shards of the old split that the new one does not have are deleted.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    local_dir = Path(local_dir)
    bucket, prefix = split_s3_url(url_prefix.rstrip("/"))
    files = [*sorted(local_dir.glob("shard-*.tar")), local_dir / "meta.json"]
    client = s3_client()

    def key_of(name: str) -> str:
        return f"{prefix}/{name}" if prefix else name

    def call(url: str, action: str, function: Any, **arguments: Any) -> Any:
        try:
            return function(**arguments)
        except (ClientError, BotoCoreError) as exc:
            error = _client_error(url, exc)
            raise type(error)(
                f"{error} ({action}; replacing a split needs s3:PutObject, s3:DeleteObject and "
                "s3:ListBucket on its prefix)"
            ) from exc
        except Exception as exc:  # s3transfer wraps client errors in its own exception types
            raise OSError(f"{url}: {action} failed: {exc}") from exc

    meta_key = key_of("meta.json")
    call(
        f"s3://{bucket}/{meta_key}",
        "delete of the old meta.json",
        client.delete_object,
        Bucket=bucket,
        Key=meta_key,
    )
    urls = []
    for path in files:
        key = key_of(path.name)
        url = f"s3://{bucket}/{key}"
        log.info("uploading %s -> %s", path, url)
        call(url, f"upload of {path}", client.upload_file, Filename=str(path), Bucket=bucket, Key=key)
        urls.append(url)
    uploaded = {key_of(path.name) for path in files}
    paginator = client.get_paginator("list_objects_v2")
    pages = call(
        url_prefix, "listing", lambda: list(paginator.paginate(Bucket=bucket, Prefix=key_of("shard-")))
    )
    for page in pages:
        for item in page.get("Contents", []):
            if item["Key"] not in uploaded and item["Key"].endswith(".tar"):
                log.info("deleting stale s3://%s/%s", bucket, item["Key"])
                call(
                    f"s3://{bucket}/{item['Key']}",
                    "delete",
                    client.delete_object,
                    Bucket=bucket,
                    Key=item["Key"],
                )
    return urls
