"""Incremental preprocessing: decode each image once ever, rewrite only the shards a change touches.

Two mechanisms, both keyed by content so the dataset version stays a pure function of the data
and the parameters (same images and settings -> same version and same shard bytes, in any order):

- Prepared-pixel cache, `HEMAFLOW_HOME/cache/prepared/<params hash>/<sha[:2]>/<sha256>`: the
  uint8 pixels `prepare_image` produced for one image. The params hash is `stable_hash` of the
  preprocessing parameters dict (`preprocess.preprocessing_params`: image size, crop policy,
  resample, PREPROCESS_VERSION), so changing any of them starts a fresh cache instead of
  reusing stale pixels. The pixels rather than the encoded Example are kept: the label index
  can change with the spec, and framing an Example is a copy, not a decode.
- Content-bucketed shards: within a split, an image's shard is the top bits of its sha256
  (`bucket_of`) among a power-of-two number of buckets (`bucket_count`: about SHARD_SIZE
  images each). Adding or removing images changes only the buckets they hash to; the others
  keep their images, their order and so their bytes. The bucket count of a split changes only
  when the split roughly doubles or halves in size (then its shards are all rewritten once).
  Each shard has a `shard_key` (its images, labels, parameters and format); a published version
  records `processed/<dataset>/_shards/<shard_key>.json` -> the S3 key of those bytes, and a later
  version with the same shard copies that object server-side (and hard-links the local file)
  instead of encoding and uploading it again. Index entries are written only after the version's
  dataset.json, and an entry counts only while that version's dataset.json still exists.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from contracts.settings import Settings

SHARD_INDEX_DIR = "_shards"
BUCKET_HASH_HEX = 8  # hex digits of sha256 that pick the bucket (32 bits)


def params_hash(preprocessing: dict[str, Any]) -> str:
    from contracts.common import stable_hash

    return stable_hash(preprocessing, 16)


def prepared_path(settings: Settings, preprocessing: dict[str, Any], sha256: str) -> Path:
    return (settings.hemaflow_home / "cache" / "prepared" / params_hash(preprocessing) / sha256[:2] / sha256)


def is_prepared(settings: Settings, preprocessing: dict[str, Any], sha256: str) -> bool:
    size = int(preprocessing["image_size"])
    try:
        return prepared_path(settings, preprocessing, sha256).stat().st_size == size * size * 3
    except FileNotFoundError:
        return False


def prepared_pixels(settings: Settings, preprocessing: dict[str, Any], sha256: str,
                    raw_path: Callable[[], Path | str], prepare: Callable[[bytes], Any]) -> bytes:
    """The prepared pixels of one image: from the cache, or decoded once with `prepare` and cached.

    A cached file counts only at its exact size (size x size x 3); writes are atomic renames, so a
    killed run never leaves a partial entry under a content name."""
    from pipeline.storage import atomic_write_bytes

    target = prepared_path(settings, preprocessing, sha256)
    if is_prepared(settings, preprocessing, sha256):
        return target.read_bytes()
    with open(raw_path(), "rb") as fh:
        pixels = prepare(fh.read()).tobytes()
    atomic_write_bytes(target, pixels, fsync=False)  # a cache: a lost entry is decoded again
    return pixels


def bucket_count(images: int, shard_size: int) -> int:
    """Power of two nearest images/shard_size (at least 1): stable while a split grows a little."""
    ratio = images / max(1, shard_size)
    return 1 if ratio <= 1 else 2 ** round(math.log2(ratio))


def bucket_of(sha256: str, buckets: int) -> int:
    """The shard of an image among `buckets` (a power of two): the top bits of its sha256."""
    return (int(sha256[:BUCKET_HASH_HEX], 16) * buckets) >> (4 * BUCKET_HASH_HEX)


def plan_shards(rows: list[dict[str, Any]], shard_size: int) -> list[tuple[int, int, list[dict[str, Any]]]]:
    """(bucket, buckets, rows) of the non-empty buckets of one split, rows kept in the given order."""
    buckets = bucket_count(len(rows), shard_size)
    grouped: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        grouped.setdefault(bucket_of(row["sha256"], buckets), []).append(row)
    return [(b, buckets, grouped[b]) for b in sorted(grouped)]


def shard_key(rows: list[dict[str, Any]], label_index: dict[str, int], preprocessing: dict[str, Any]) -> str:
    """What a shard's bytes are a function of: its images in order, their label indices, the
    preprocessing parameters and the record format."""
    from contracts.common import stable_hash
    from contracts.processed import FORMAT_VERSION

    return stable_hash({"images": [(r["sha256"], label_index[r["label"]]) for r in rows],
                        "preprocessing": preprocessing, "format_version": FORMAT_VERSION}, 32)


def shard_index_key(dataset: str, key: str) -> str:
    return f"processed/{dataset}/{SHARD_INDEX_DIR}/{key}.json"


def find_published_shard(settings: Settings, client, dataset: str, key: str) -> dict[str, str] | None:
    """The published copy of a shard with this key ({"version", "name", "s3_key"}) if it still exists."""
    from pipeline.storage import get_json_or_none, object_exists

    from contracts.processed import META_FILE, version_prefix

    entry = get_json_or_none(client, settings.s3_bucket, shard_index_key(dataset, key))
    if not entry or not object_exists(client, settings.s3_bucket, entry["s3_key"]):
        return None
    if not object_exists(client, settings.s3_bucket, version_prefix(dataset, entry["version"]) + META_FILE):
        return None  # that version is no longer published (deleted or being rebuilt): encode instead
    return entry


def reuse_local(settings: Settings, client, dataset: str, entry: dict[str, str], target: Path) -> None:
    """Put a published shard's bytes at `target`: hard-link (or copy) its local file, else download it."""
    from contracts.processed import local_version_dir

    source = local_version_dir(settings, dataset, entry["version"]) / entry["name"]
    if not source.is_file():
        client.download_file(settings.s3_bucket, entry["s3_key"], str(target))
        return
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def record_published_shards(settings: Settings, client, dataset: str, version: str, keys: dict[str, str]) -> None:
    """After dataset.json: index every shard of the version by its shard key (name -> key)."""
    from contracts.processed import version_prefix
    from pipeline.storage import put_json

    prefix = version_prefix(dataset, version)
    for name, key in keys.items():
        put_json(client, settings.s3_bucket, shard_index_key(dataset, key),
                 {"version": version, "name": name, "s3_key": prefix + name})
