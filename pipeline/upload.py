"""Upload a folder-per-class image tree to `raw/<dataset>/<class>/` in the bucket.

Parallel (threads: the work is network I/O), and idempotent: an object that already
exists with the same size and MD5 (its ETag, for single-part uploads) or the same
`sha256` metadata is skipped, so re-running an upload only sends what changed.
Folders that are not class folders of the spec are reported, never uploaded silently.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from contracts.settings import Settings, get_settings


@dataclass(frozen=True)
class LocalFile:
    path: Path
    key: str
    size: int


def _local_files(root: Path, spec) -> tuple[list[LocalFile], list[str]]:
    """Files under the spec's class folders, and the paths that are not (reported)."""
    files: list[LocalFile] = []
    ignored: list[str] = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir() or entry.name not in spec.classes:
            ignored.append(entry.name)
            continue
        for path in sorted(entry.rglob("*")):
            if path.is_file() and not path.name.startswith("."):
                rel = path.relative_to(entry).as_posix()
                files.append(LocalFile(path, spec.key_for(entry.name, rel), path.stat().st_size))
    return files, ignored


def upload_tree(root: Path, dataset: str, settings: Settings | None = None, show_progress: bool = False,
                emit_asset_event: bool = True) -> dict:
    """Put every image of `root/<class folder>/...` under the dataset's S3 prefix.

    When something was sent and AIRFLOW_API_URL is set, emits the dataset's raw Asset event so
    the retraining DAG starts now (`emit_asset_event=False` for callers that run the DAG
    themselves); a failed event is a warning, never a failed upload.
    Returns {uploaded, skipped, bytes, ignored, prefix, asset_event}; `bytes` counts what was sent,
    `asset_event` is {emitted, message, event?} (see pipeline.airflow_api.announce_upload).
    """
    from contracts.dataset_spec import load_spec

    s = settings or get_settings()
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"upload source {root} is not a folder")
    spec = load_spec(dataset, s.dataset_specs_dir)
    files, ignored = _local_files(root, spec)
    if not files:
        raise ValueError(
            f"no files under the class folders {spec.class_folders} of dataset {dataset!r} in {root}"
        )
    uploaded, skipped, sent = put_local_files(files, spec.s3_prefix, f"upload {dataset}", s, show_progress)
    result = {"uploaded": uploaded, "skipped": skipped, "bytes": sent, "ignored": ignored, "prefix": spec.s3_prefix}
    if emit_asset_event:
        from pipeline.airflow_api import announce_upload

        result["asset_event"] = announce_upload(dataset, result, settings=s)
    else:
        result["asset_event"] = {"emitted": False, "message": "asset event not requested by the caller"}
    return result


def put_local_files(files: list[LocalFile], prefix: str, what: str, s: Settings,
                    show_progress: bool = False) -> tuple[int, int, int]:
    """Put `files` in parallel, skipping objects already under `prefix` with the same content.

    Returns (uploaded, skipped, bytes sent). Shared by `upload` (raw/) and `submit` (inbox/)."""
    from contracts.common import progress
    from pipeline.storage import ensure_bucket, iter_objects, s3_call, s3_client

    client = s3_client(s)
    ensure_bucket(client, s)
    existing = {
        o["Key"]: (int(o["Size"]), str(o.get("ETag", "")).strip('"'))
        for o in s3_call(s, "list", lambda: list(iter_objects(client, s.s3_bucket, prefix)))
    }

    def _same_remote(f: LocalFile, data: bytes) -> bool:
        remote = existing.get(f.key)
        if remote is None or remote[0] != f.size:
            return False
        etag = remote[1]
        if "-" not in etag:  # single-part upload: ETag is the MD5 of the content
            return etag == hashlib.md5(data, usedforsecurity=False).hexdigest()
        head = client.head_object(Bucket=s.s3_bucket, Key=f.key)
        return head.get("Metadata", {}).get("sha256") == hashlib.sha256(data).hexdigest()

    def _one(f: LocalFile) -> tuple[bool, int]:
        data = f.path.read_bytes()
        if _same_remote(f, data):
            return False, 0
        s3_call(
            s,
            f"put {f.key}",
            client.put_object,
            Bucket=s.s3_bucket,
            Key=f.key,
            Body=data,
            Metadata={"sha256": hashlib.sha256(data).hexdigest()},
        )
        return True, len(data)

    uploaded = skipped = sent = 0
    with ThreadPoolExecutor(max_workers=s.transfer_workers) as pool:
        for was_sent, nbytes in progress(pool.map(_one, files), len(files), what, show_progress):
            if was_sent:
                uploaded += 1
                sent += nbytes
            else:
                skipped += 1
    return uploaded, skipped, sent
