"""The ingest manifest's place in S3 and the diff of a raw listing against it.

Written by ingest, read by the raw-prefix watcher (is there anything to ingest?) and the CLI,
so neither reaches into the ingest stage.
"""

from __future__ import annotations

from typing import Any

from contracts.settings import Settings
from pipeline.storage import get_json_or_none, get_jsonl


def diff_listing(
    previous: dict[str, dict[str, Any]], listing: list[dict[str, Any]]
) -> tuple[list[dict], list[dict], list[dict], list[str]]:
    """Split a listing into (new, changed, unchanged_rows, deleted_keys) by key, ETag and size.

    `listing` items carry Key, ETag and Size (as S3 returns them); `unchanged_rows` are the
    previous manifest rows, reused as they are.
    """
    new, changed, unchanged = [], [], []
    seen = set()
    for obj in listing:
        key = obj["Key"]
        seen.add(key)
        old = previous.get(key)
        etag = str(obj.get("ETag", "")).strip('"')
        if old is None:
            new.append(obj)
        elif old.get("etag") != etag or int(old.get("bytes", -1)) != int(obj["Size"]):
            changed.append(obj)
        else:
            unchanged.append(old)
    deleted = sorted(k for k in previous if k not in seen)
    return new, changed, unchanged, deleted


def manifest_prefix(dataset: str) -> str:
    return f"manifests/{dataset}/"


def latest_key(dataset: str) -> str:
    return manifest_prefix(dataset) + "latest.json"


def load_previous(client, settings: Settings, dataset: str) -> tuple[dict | None, dict[str, dict]]:
    """The latest.json pointer (None before the first ingest) and the manifest rows it names, by key."""
    pointer = get_json_or_none(client, settings.s3_bucket, latest_key(dataset))
    if not pointer:
        return None, {}
    rows = get_jsonl(client, settings.s3_bucket, pointer["manifest_key"])
    return pointer, {r["key"]: r for r in rows}
