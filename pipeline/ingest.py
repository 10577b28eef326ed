"""Ingest: list the dataset's S3 prefix, diff against the previous manifest, cache new bytes.

Only objects that are new or whose ETag/size changed are downloaded (in parallel, streamed in
1 MiB chunks, at most MAX_FILE_BYTES per object: larger ones get `error=file_too_large` and are
never read whole) into a local content-addressed cache, `HEMAFLOW_HOME/cache/objects/<sha256[:2]>/<sha256>`.
Each file is written under `cache/objects/.tmp/` and renamed into place, so a crash or a
SIGKILL never leaves a partial file under a content name; temporaries whose writer died
(no lock held on them) are removed on the next run. Unchanged objects reuse their previous manifest row,
so an unchanged re-run downloads nothing and writes no new manifest.

Manifest rows (JSONL at `manifests/<dataset>/<ingest_id>.jsonl`): key, etag, sha256, bytes,
format, width, height, mode, class, label, decoded, error, error_detail. Each new object is
decoded completely once, here, while other downloads are in flight (`decoded` = true);
unreadable files are kept with `error` set: the validate stage decides what to do with them.
`manifests/<dataset>/latest.json` points at the newest manifest and records deletions and
objects that are not under a class folder of the spec (reported, never silently dropped).
"""

from __future__ import annotations

import fcntl
import os
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pipeline.settings import Settings, get_settings

MANIFEST_FIELDS = (
    "key", "etag", "sha256", "bytes", "format", "width", "height", "mode", "class", "label", "decoded", "error",
    "error_detail",
)
STALE_TEMP_AGE_S = 60.0  # a temp file younger than this may be between its writer's open and flock
REPORT_LIMIT = 200  # most keys listed in latest.json per category (counts are always complete)


class CacheMismatch(RuntimeError):
    """The S3 object no longer has the content the manifest recorded (re-run ingest)."""


# --- content-addressed cache --------------------------------------------------------------
def cache_root(settings: Settings) -> Path:
    return settings.hemaflow_home / "cache" / "objects"


def cache_path(settings: Settings, sha256: str) -> Path:
    return cache_root(settings) / sha256[:2] / sha256


def _tmp_dir(settings: Settings) -> Path:
    return cache_root(settings) / ".tmp"


def write_cached(settings: Settings, sha256: str, data: bytes) -> Path:
    """Store `data` under its hash: temp file (locked while written) then atomic rename."""
    target = cache_path(settings, sha256)
    if target.is_file() and target.stat().st_size == len(data):
        return target
    tmp_dir = _tmp_dir(settings)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_dir / f"{os.getpid()}-{secrets.token_hex(6)}.part"
    try:
        with open(tmp, "wb") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)  # released by the kernel when we close or die
            fh.write(data)
            fh.flush()
            os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


class ObjectTooLarge(ValueError):
    """An S3 object is larger than MAX_FILE_BYTES: it is not read further (nor cached)."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"{size} bytes > MAX_FILE_BYTES={limit}")
        self.size = size


STREAM_CHUNK_BYTES = 1 << 20


def stream_to_cache(settings: Settings, client, key: str, limit: int) -> tuple[str, int, Path]:
    """Download `key` into the cache in chunks, hashing as it goes, reading at most `limit` bytes.

    Memory stays at one chunk whatever the object's size; an object over `limit` (by its
    Content-Length, or by what actually arrives) raises ObjectTooLarge and leaves nothing behind.
    Returns (sha256, size, cache path)."""
    import hashlib

    from pipeline.storage import s3_call

    response = s3_call(settings, f"get {key}", client.get_object, Bucket=settings.s3_bucket, Key=key)
    body = response["Body"]
    declared = int(response.get("ContentLength") or 0)
    if declared > limit:
        body.close()
        raise ObjectTooLarge(declared, limit)
    tmp_dir = _tmp_dir(settings)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    tmp = tmp_dir / f"{os.getpid()}-{secrets.token_hex(6)}.part"
    digest, size = hashlib.sha256(), 0
    try:
        with open(tmp, "wb") as fh:
            for chunk in body.iter_chunks(STREAM_CHUNK_BYTES):
                size += len(chunk)
                if size > limit:
                    raise ObjectTooLarge(max(size, declared), limit)
                digest.update(chunk)
                fh.write(chunk)
        target = cache_path(settings, digest.hexdigest())
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, target)
    except BaseException:
        body.close()
        tmp.unlink(missing_ok=True)
        raise
    return digest.hexdigest(), size, target


def clean_stale_temporaries(settings: Settings) -> int:
    """Remove temp files whose writer died (a killed ingest); files being written are untouched.

    A writer holds an exclusive flock on its temp file until it is renamed; the kernel drops
    the lock when the writer dies. So a temp file whose lock we can take has no live writer,
    whatever pid namespace (container) wrote it: pids are not compared, since two Celery
    workers sharing the cache volume each see the other's pids as dead.
    """
    removed = 0
    tmp_dir = _tmp_dir(settings)
    if not tmp_dir.is_dir():
        return 0
    for tmp in tmp_dir.glob("*.part"):
        try:
            if time.time() - tmp.stat().st_mtime < STALE_TEMP_AGE_S:
                continue
            with open(tmp, "rb") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if tmp.exists():  # not renamed away by its writer just before we locked it
                    tmp.unlink()
                    removed += 1
        except (BlockingIOError, FileNotFoundError):
            continue  # a live writer holds it, or it was just renamed into place
    return removed


def ensure_cached(row: dict[str, Any], settings: Settings | None = None, client=None) -> Path:
    """Local path of a manifest row's bytes; re-downloads by key on a cache miss (another worker).

    The downloaded bytes must hash to the row's sha256, else CacheMismatch: the object
    changed in S3 after ingest, and using it would silently mix dataset versions.
    """
    from pipeline.storage import s3_client

    s = settings or get_settings()
    path = cache_path(s, row["sha256"])
    if path.is_file() and path.stat().st_size == int(row["bytes"]):
        return path
    client = client or s3_client(s)
    try:
        digest, _, path = stream_to_cache(s, client, row["key"], int(row["bytes"]))
    except ObjectTooLarge as exc:  # grew since ingest
        raise CacheMismatch(f"s3://{s.s3_bucket}/{row['key']} changed after ingest ({exc}); run ingest again") from None
    if digest != row["sha256"]:
        path.unlink(missing_ok=True)  # cached under its true hash, which no manifest row names
        raise CacheMismatch(
            f"s3://{s.s3_bucket}/{row['key']} now has sha256 {digest[:12]}, the manifest says "
            f"{row['sha256'][:12]}: it changed after ingest; run ingest again"
        )
    return path


def read_cached(row: dict[str, Any], settings: Settings | None = None, client=None) -> bytes:
    return ensure_cached(row, settings, client).read_bytes()


# --- manifest diff ---------------------------------------------------------------------------
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


def describe_bytes(data: bytes, max_pixels: int) -> dict[str, Any]:
    """Facts of an image from a complete decode (and RGB conversion), or why that failed.

    Ingest decodes while its downloads wait on the network, so validate can apply its rules
    to these facts without decoding every image a second time. The decompression-bomb guard
    runs on the header, before any pixel is decoded. Validation decides what the facts mean.
    """
    from pipeline.imaging import ImageRejected, open_image, to_rgb

    try:
        img = open_image(data, max_pixels)
        facts = {"format": str(img.format or "UNKNOWN"), "width": img.width, "height": img.height,
                 "mode": img.mode}
        to_rgb(img)
    except ImageRejected as exc:
        return _undecoded(exc.reason, exc.detail)
    return {**facts, "decoded": True, "error": None, "error_detail": None}


def _undecoded(error: str, detail: str) -> dict[str, Any]:
    return {"format": None, "width": None, "height": None, "mode": None, "decoded": False,
            "error": error, "error_detail": detail}


def manifest_prefix(dataset: str) -> str:
    return f"manifests/{dataset}/"


def latest_key(dataset: str) -> str:
    return manifest_prefix(dataset) + "latest.json"


def load_previous(client, settings: Settings, dataset: str) -> tuple[dict | None, dict[str, dict]]:
    from pipeline.common import get_jsonl
    from pipeline.storage import get_json_or_none

    pointer = get_json_or_none(client, settings.s3_bucket, latest_key(dataset))
    if not pointer:
        return None, {}
    rows = get_jsonl(client, settings.s3_bucket, pointer["manifest_key"])
    return pointer, {r["key"]: r for r in rows}


def ingest(dataset: str, settings: Settings | None = None, show_progress: bool = False,
           before_download=None) -> dict:
    """Bring the manifest of `dataset` up to date with its S3 prefix.

    `before_download(n)` is called when n > 0 objects are about to be downloaded (run_pipeline
    uses it to start slow imports while the downloads wait on the network).

    Returns {manifest_key, new, changed, deleted, unchanged, total, unassigned, errors,
    downloaded_bytes, reused}; `reused` is True when nothing changed and the previous
    manifest is still current (no new manifest written).
    """
    from pipeline.common import progress, put_jsonl, utc_now, utc_stamp
    from pipeline.dataset_spec import load_spec
    from pipeline.storage import ensure_bucket, iter_objects, put_json, s3_call, s3_client

    s = settings or get_settings()
    spec = load_spec(dataset, s.dataset_specs_dir)
    client = s3_client(s)
    ensure_bucket(client, s)  # clear StorageUnavailable when the endpoint is down
    clean_stale_temporaries(s)

    listing, unassigned = [], []
    for obj in s3_call(s, "list", lambda: list(iter_objects(client, s.s3_bucket, spec.s3_prefix))):
        key = obj["Key"]
        if key.endswith("/"):
            continue  # folder marker, not an object
        if spec.class_of_key(key) in spec.classes:
            listing.append(obj)
        else:
            unassigned.append(key)
    pointer, previous = s3_call(s, "read previous manifest", load_previous, client, s, dataset)
    new, changed, unchanged, deleted = diff_listing(previous, listing)
    # The spec may have been edited since (a folder mapped to another label): relabel reused rows.
    relabeled = [r for r in unchanged if r.get("label") != spec.classes[r["class"]]]
    unchanged = [{**r, "label": spec.classes[r["class"]]} for r in unchanged]
    to_fetch = new + changed

    def _fetch(obj: dict) -> dict[str, Any]:
        key = obj["Key"]
        folder = spec.class_of_key(key)
        row = {"key": key, "etag": str(obj.get("ETag", "")).strip('"'), "class": folder, "label": spec.classes[folder]}
        try:  # never more than MAX_FILE_BYTES of one object: by the listing's size, then while streaming
            if int(obj.get("Size") or 0) > s.max_file_bytes:
                raise ObjectTooLarge(int(obj["Size"]), s.max_file_bytes)
            digest, size, path = stream_to_cache(s, client, key, s.max_file_bytes)
        except ObjectTooLarge as exc:  # validate quarantines it with this reason
            return {**row, "sha256": None, "bytes": exc.size, **_undecoded("file_too_large", str(exc))}
        row.update({"sha256": digest, "bytes": size})
        row.update(describe_bytes(path.read_bytes(), s.max_image_pixels))
        return row

    fetched: list[dict] = []
    if to_fetch:
        if before_download is not None:
            before_download(len(to_fetch))
        with ThreadPoolExecutor(max_workers=s.transfer_workers) as pool:
            fetched = list(progress(pool.map(_fetch, to_fetch), len(to_fetch), f"ingest {dataset}", show_progress))
    rows = sorted(unchanged + fetched, key=lambda r: r["key"])
    counts = {"new": len(new), "changed": len(changed), "deleted": len(deleted), "unchanged": len(unchanged),
              "total": len(rows), "unassigned": len(unassigned), "errors": sum(1 for r in rows if r.get("error")),
              "relabeled": len(relabeled)}
    reused = pointer is not None and not (new or changed or deleted or relabeled) and \
        sorted(pointer.get("unassigned", [])) == sorted(unassigned[:REPORT_LIMIT])
    if reused:
        manifest_key = pointer["manifest_key"]
        ingest_id = pointer["ingest_id"]
    else:
        ingest_id = utc_stamp()
        manifest_key = f"{manifest_prefix(dataset)}{ingest_id}.jsonl"
        s3_call(s, "write manifest", put_jsonl, client, s.s3_bucket, manifest_key,
                [{f: r.get(f) for f in MANIFEST_FIELDS} for r in rows])
        s3_call(s, "write latest.json", put_json, client, s.s3_bucket, latest_key(dataset), {
            "dataset": dataset, "manifest_key": manifest_key, "ingest_id": ingest_id, "created_at": utc_now(),
            "previous_manifest_key": pointer["manifest_key"] if pointer else None, "counts": counts,
            "deleted": deleted[:REPORT_LIMIT], "unassigned": unassigned[:REPORT_LIMIT],
            "changed": [o["Key"] for o in changed][:REPORT_LIMIT],
        })
    return {"manifest_key": manifest_key, "ingest_id": ingest_id, **counts, "reused": reused,
            "deleted_keys": deleted[:REPORT_LIMIT], "unassigned_keys": unassigned[:REPORT_LIMIT],
            "downloaded_bytes": sum(r["bytes"] for r in fetched if r["sha256"])}
