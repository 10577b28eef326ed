"""The local content-addressed cache of raw image bytes: `HEMAFLOW_HOME/cache/objects/<sha[:2]>/<sha>`.

Ingest fills it; validate and preprocess read it through `ensure_cached`, which re-downloads a
miss by key (a task on another worker, with its own disk) and checks the bytes still hash to
the manifest's sha256. Every file is written under `.tmp/` while flock-ed and renamed into
place, so a crash or SIGKILL never leaves a partial file under a content name, and
`clean_stale_temporaries` removes only temp files no live writer holds, whatever pid namespace
(container) wrote them.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from contracts.settings import Settings, get_settings
from pipeline.storage import creating_parent, s3_call, s3_client

STALE_TEMP_AGE_S = 60.0  # a temp file younger than this may be between its writer's open and flock
STREAM_CHUNK_BYTES = 1 << 20


class CacheMismatch(RuntimeError):
    """The S3 object no longer has the content the manifest recorded (re-run ingest)."""


def cache_root(settings: Settings) -> Path:
    return settings.hemaflow_home / "cache" / "objects"


def cache_path(settings: Settings, sha256: str) -> Path:
    return cache_root(settings) / sha256[:2] / sha256


def _tmp_dir(settings: Settings) -> Path:
    return cache_root(settings) / ".tmp"


@contextmanager
def _locked_temporary(settings: Settings) -> Iterator[tuple[Path, BinaryIO]]:
    """A new temp file under `.tmp/`, exclusively flock-ed while the caller writes and renames it.

    The kernel drops the lock when the writer closes the file or dies, which is how
    `clean_stale_temporaries` tells an abandoned temp file from one being written. On any
    error the temp file is removed."""
    tmp = _tmp_dir(settings) / f"{os.getpid()}-{secrets.token_hex(6)}.part"
    try:
        with creating_parent(lambda: open(tmp, "wb"), tmp) as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            yield tmp, fh
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _publish(tmp: Path, fh: BinaryIO, target: Path) -> None:
    """Rename a written temp file to its content name (still holding the lock)."""
    fh.flush()
    creating_parent(lambda: os.replace(tmp, target), target)


def write_cached(settings: Settings, sha256: str, data: bytes) -> Path:
    """Store `data` under its hash: locked temp file, then atomic rename."""
    target = cache_path(settings, sha256)
    if target.is_file() and target.stat().st_size == len(data):
        return target
    with _locked_temporary(settings) as (tmp, fh):
        fh.write(data)
        _publish(tmp, fh, target)
    return target


class ObjectTooLarge(ValueError):
    """An S3 object is larger than MAX_FILE_BYTES: it is not read further (nor cached)."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"{size} bytes > MAX_FILE_BYTES={limit}")
        self.size = size



def stream_to_cache(settings: Settings, client, key: str, limit: int) -> tuple[str, int, Path]:
    """Download `key` into the cache in chunks, hashing as it goes, reading at most `limit` bytes.

    Memory stays at one chunk whatever the object's size; an object over `limit` (by its
    Content-Length, or by what actually arrives) raises ObjectTooLarge and leaves nothing behind.
    Returns (sha256, size, cache path)."""
    response = s3_call(settings, f"get {key}", client.get_object, Bucket=settings.s3_bucket, Key=key)
    body = response["Body"]
    declared = int(response.get("ContentLength") or 0)
    if declared > limit:
        body.close()
        raise ObjectTooLarge(declared, limit)
    digest, size = hashlib.sha256(), 0
    try:
        with _locked_temporary(settings) as (tmp, fh):
            for chunk in body.iter_chunks(STREAM_CHUNK_BYTES):
                size += len(chunk)
                if size > limit:
                    raise ObjectTooLarge(max(size, declared), limit)
                digest.update(chunk)
                fh.write(chunk)
            target = cache_path(settings, digest.hexdigest())
            _publish(tmp, fh, target)
    except BaseException:
        body.close()
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
