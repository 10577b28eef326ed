"""S3 access: one client factory (path-style, bounded retries with backoff) and small helpers.

Everything that talks to object storage goes through `s3_client()` so that endpoint,
credentials, timeouts and retry policy are configured in one place.
boto3 is imported inside the functions: the DAG files import this module (via pipeline.watch)
while parsing, and contracts-only callers never pay for it.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from contracts.common import from_jsonl, to_jsonl
from contracts.processed import MANIFEST_FILE, META_FILE, SPLITS, DatasetMeta, local_version_dir, version_prefix
from contracts.settings import Settings, get_settings


class StorageUnavailable(RuntimeError):
    """Object storage could not be reached after the configured retries."""


def s3_client(settings: Settings | None = None):
    """A boto3 S3 client for the configured endpoint (path-style addressing)."""
    import boto3
    from botocore.config import Config

    s = settings or get_settings()
    config = Config(
        s3={"addressing_style": "path"},
        retries={"total_max_attempts": s.s3_max_attempts, "mode": "standard"},  # attempts incl. the first
        connect_timeout=s.s3_connect_timeout_s,
        read_timeout=s.s3_read_timeout_s,
        max_pool_connections=max(10, s.transfer_workers * 2),
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return boto3.client(
        "s3",
        endpoint_url=s.s3_endpoint_url,
        region_name=s.s3_region,
        aws_access_key_id=s.aws_access_key_id,
        aws_secret_access_key=s.aws_secret_access_key.get_secret_value(),
        config=config,
    )


def _is_connection_error(exc: BaseException) -> bool:
    from botocore.exceptions import ConnectionClosedError, EndpointConnectionError, ReadTimeoutError

    return isinstance(exc, (EndpointConnectionError, ConnectionClosedError, ReadTimeoutError))


def s3_call(settings: Settings, what: str, fn, *args, **kwargs):
    """Run one S3 call; connection failures (after boto's bounded retries) become StorageUnavailable."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - translate only connection failures
        if _is_connection_error(exc):
            raise StorageUnavailable(
                f"S3 endpoint {settings.s3_endpoint_url} is unreachable ({what}) after "
                f"{settings.s3_max_attempts} attempts: {exc}"
            ) from exc
        raise


def ensure_bucket(client=None, settings: Settings | None = None) -> str:
    """Create the bucket if it does not exist (get-or-create); returns its name."""
    from botocore.exceptions import ClientError

    s = settings or get_settings()
    client = client or s3_client(s)
    try:
        s3_call(s, "head bucket", client.head_bucket, Bucket=s.s3_bucket)
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code not in ("404", "NoSuchBucket", "NotFound"):
            raise
        try:
            s3_call(s, "create bucket", client.create_bucket, Bucket=s.s3_bucket)
        except ClientError as exc2:
            if exc2.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise
    return s.s3_bucket


def wait_for_bucket(settings: Settings | None = None, timeout_s: float = 30.0, interval_s: float = 0.5) -> str:
    """ensure_bucket, retried until S3 answers (a gateway answers before its filer takes writes;
    a compose stack starts S3 and its users at the same time); the last error after `timeout_s`."""
    s = settings or get_settings()
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return ensure_bucket(settings=s)
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(interval_s)


def check_reachable(settings: Settings | None = None) -> None:
    """Raise StorageUnavailable with a clear message when the S3 endpoint does not answer."""
    ensure_bucket(settings=settings)


def iter_objects(client, bucket: str, prefix: str) -> Iterator[dict[str, Any]]:
    """All objects under `prefix`, following pagination."""
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        yield from page.get("Contents", [])


def object_exists(client, bucket: str, key: str) -> bool:
    from botocore.exceptions import ClientError

    try:
        client.head_object(Bucket=bucket, Key=key)
        return True
    except ClientError as exc:
        if str(exc.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
            return False
        raise


def put_json(client, bucket: str, key: str, payload: Any) -> None:
    body = json.dumps(payload, indent=2, sort_keys=True, default=str).encode("utf-8")
    client.put_object(Bucket=bucket, Key=key, Body=body, ContentType="application/json")


def get_json(client, bucket: str, key: str) -> Any:
    return json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())


def get_json_or_none(client, bucket: str, key: str) -> Any | None:
    from botocore.exceptions import ClientError

    try:
        return get_json(client, bucket, key)
    except ClientError as exc:
        if str(exc.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
            return None
        raise


def creating_parent(action, path: Path):
    """`action()`, creating `path`'s folder first only if it fails for lack of it.

    Caches write thousands of files into a few folders: an unconditional mkdir per file is a
    syscall that contends on the folder's lock across threads (seconds per ingest on a loaded VM)."""
    try:
        return action()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        return action()


def atomic_write_bytes(path: Path, data: bytes, fsync: bool = True) -> None:
    """Write to a temporary file in the same folder, fsync (unless a cache says not to), then
    rename: never a partial file."""
    fd, tmp = creating_parent(
        lambda: tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part"), path)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def get_jsonl(client, bucket: str, key: str) -> list[dict[str, Any]]:
    return from_jsonl(client.get_object(Bucket=bucket, Key=key)["Body"].read())


def put_bytes(client, bucket: str, key: str, body: bytes, content_type: str = "application/octet-stream") -> None:
    client.put_object(Bucket=bucket, Key=key, Body=body, ContentType=content_type)


def put_jsonl(client, bucket: str, key: str, rows: Iterable[dict[str, Any]]) -> None:
    put_bytes(client, bucket, key, to_jsonl(rows), "application/x-ndjson")


# --- processed dataset versions (format: contracts/processed.py) ------------------------------


def load_meta(dataset: str, dataset_version: str, settings: Settings | None = None, client=None) -> DatasetMeta:
    """Read `dataset.json` of a processed version from S3 (raises if the version is incomplete)."""
    s = settings or get_settings()
    client = client or s3_client(s)
    key = version_prefix(dataset, dataset_version) + META_FILE
    body = client.get_object(Bucket=s.s3_bucket, Key=key)["Body"].read()
    return DatasetMeta.from_json(body.decode("utf-8"))


def fetch_processed(dataset: str, dataset_version: str, settings: Settings | None = None) -> Path:
    """Download a processed version into the local cache (once) and return its folder.

    Files are written to a temporary name and renamed; the folder counts as complete
    only when its `dataset.json` is present, which is written last.
    """
    s = settings or get_settings()
    target = local_version_dir(s, dataset, dataset_version)
    if (target / META_FILE).is_file():
        return target
    client = s3_client(s)
    meta = load_meta(dataset, dataset_version, s, client)
    names = [n for split in SPLITS for n in meta.shards.get(split, [])] + [MANIFEST_FILE]

    def _get(name: str) -> None:
        if not (target / name).is_file():
            data = client.get_object(Bucket=s.s3_bucket, Key=meta.object_key(name))["Body"].read()
            atomic_write_bytes(target / name, data)

    with ThreadPoolExecutor(max_workers=s.transfer_workers) as pool:
        list(pool.map(_get, names))
    atomic_write_bytes(target / META_FILE, meta.to_json().encode("utf-8"))
    return target


def latest_processed_version(dataset: str, settings: Settings | None = None) -> str | None:
    """The newest complete processed version of `dataset` (by dataset.json creation time), or None."""
    s = settings or get_settings()
    client = s3_client(s)
    best: tuple[str, str] | None = None
    for obj in iter_objects(client, s.s3_bucket, f"processed/{dataset}/"):
        if not obj["Key"].endswith("/" + META_FILE):
            continue
        meta = DatasetMeta.from_json(client.get_object(Bucket=s.s3_bucket, Key=obj["Key"])["Body"].read().decode())
        stamp = meta.created_at or str(obj.get("LastModified", ""))
        if best is None or stamp > best[0]:
            best = (stamp, meta.dataset_version)
    return None if best is None else best[1]
