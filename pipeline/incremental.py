"""Incremental preprocessing: decode each image once ever, rewrite only the shards a change touches.

Two mechanisms, both keyed by content so the dataset version stays a pure function of the data
and the parameters (same images and settings -> same version and same shard bytes, in any order):

- Prepared-pixel cache, `HEMAFLOW_HOME/cache/prepared/<params hash>/<sha[:2]>/<sha256>`: the
  uint8 pixels `prepare_image` produced for one image. The params hash is `stable_hash` of the
  preprocessing parameters dict (`preprocessing_params`: image size, crop policy,
  resample, PREPROCESS_VERSION), so changing any of them starts a fresh cache instead of
  reusing stale pixels. The pixels rather than the encoded Example are kept: the label index
  can change with the spec, and framing an Example is a copy, not a decode.
- Content-bucketed, content-addressed shards: within a split, an image's shard is the top bits of
  its sha256 (`bucket_of`) among a power-of-two number of buckets (`bucket_count`: about
  SHARD_SIZE images each). Each shard has a `shard_key` (its images in order, their labels, the
  preprocessing parameters and the record format), and its bytes are stored ONCE, under that key:
  `processed/<dataset>/_shards/<shard_key>.tfrecord` in S3 and
  `HEMAFLOW_HOME/cache/shards/<dataset>/<shard_key>.tfrecord` locally. A version's dataset.json
  maps each shard name to its object (`DatasetMeta.shard_objects`), so a later version that has
  the same shard writes, uploads and copies nothing for it (S3 copies are full byte copies on
  SeaweedFS); its local folder hard-links the local copy. Adding or removing images changes
  only the buckets they hash to, and the bucket count of a split changes only when the split
  roughly doubles or halves in size.

Which fraction of the shards a change touches: k new images spread uniformly over shards of
about m images touch about 1 - exp(-k m / N) of them, so +5 % touches ~1 - exp(-0.05 m):
80 % at m = 32, 33 % at m = 8, 18 % at m = 4. Only small shards make a small addition cheap;
tf.data reads many small files as fast as a few large ones (benchmarks in README).
"""

from __future__ import annotations

import math
import os
import shutil
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from contracts.settings import Settings

# 2: large JPEGs are decoded at reduced scale before resizing (contracts.imaging.DRAFT_FACTOR).
PREPROCESS_VERSION = 2
SHARD_STORE_DIR = "_shards"
SHARD_SUFFIX = ".tfrecord"
BUCKET_HASH_HEX = 8  # hex digits of sha256 that pick the bucket (32 bits)
# Shard bytes being PUT at once: several small shards in parallel, large ones one at a time
# (four parallel 75 MB PUTs timed out on a loaded 2-core machine's SeaweedFS).
UPLOAD_BYTES_IN_FLIGHT = 32 << 20
# Shards up to this size are PUT from memory: boto sends a file body with `Expect: 100-continue`,
# one more round trip per PUT (hundreds of small shards); larger ones stream from the file.
PUT_FROM_MEMORY_BYTES = 8 << 20


@dataclass(frozen=True)
class ShardPlan:
    """One shard of a version: its split, file name, content key and rows (in record order)."""

    split: str
    name: str
    key: str
    rows: list[dict[str, Any]]


def preprocessing_params(settings: Settings, crop: str = "center_crop") -> dict[str, Any]:
    """What prepared pixels are a function of (besides the image): recorded in every dataset version."""
    from contracts.imaging import CROP_POLICY_NAMES, RESAMPLE

    return {"policy": CROP_POLICY_NAMES[crop], "resample": RESAMPLE.name.lower(),
            "image_size": settings.image_size, "preprocess_version": PREPROCESS_VERSION}


def image_preparer(settings: Settings, crop: str = "center_crop"):
    """bytes -> prepared uint8 array with this install's parameters (those `preprocessing_params` records)."""
    from functools import partial

    from contracts.imaging import prepare_image

    return partial(prepare_image, size=settings.image_size, max_pixels=settings.max_image_pixels, crop=crop)


def params_hash(preprocessing: dict[str, Any]) -> str:
    from contracts.common import stable_hash

    return stable_hash(preprocessing, 16)


def prepared_path(settings: Settings, preprocessing: dict[str, Any], sha256: str) -> Path:
    root = _prepared_root(str(settings.hemaflow_home), tuple(sorted(preprocessing.items())))
    return Path(f"{root}/{sha256[:2]}/{sha256}")


@lru_cache(maxsize=64)
def _prepared_root(home: str, preprocessing: tuple) -> str:
    """The cache folder of one parameter set, hashed once (each image looks it up twice or more)."""
    return f"{home}/cache/prepared/{params_hash(dict(preprocessing))}"


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
    if is_prepared(settings, preprocessing, sha256):
        return prepared_path(settings, preprocessing, sha256).read_bytes()
    with open(raw_path(), "rb") as fh:
        pixels = prepare(fh.read()).tobytes()
    store_prepared(settings, preprocessing, sha256, pixels)
    return pixels


def store_prepared(settings: Settings, preprocessing: dict[str, Any], sha256: str, pixels: bytes) -> None:
    """Cache one image's prepared pixels (ingest calls it with the image it just decoded)."""
    from pipeline.storage import atomic_write_bytes

    # A cache: a lost entry is decoded again, so no fsync.
    atomic_write_bytes(prepared_path(settings, preprocessing, sha256), pixels, fsync=False)


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


def shard_object_key(dataset: str, key: str) -> str:
    """Where the bytes of the shard with content key `key` live in S3 (shared by every version)."""
    return f"processed/{dataset}/{SHARD_STORE_DIR}/{key}{SHARD_SUFFIX}"


def local_shard_path(settings: Settings, dataset: str, key: str) -> Path:
    """The local copy of a shard's bytes; version folders hard-link it."""
    return settings.hemaflow_home / "cache" / "shards" / dataset / f"{key}{SHARD_SUFFIX}"


def published_shard_keys(settings: Settings, client, dataset: str) -> set[str]:
    """Content keys of the shards already in S3: one listing, not one request per shard.

    A PUT is atomic, so an object under a content key holds that shard's complete bytes (it may
    belong to no published version yet: a run that died before its dataset.json; reusing it is
    then exactly what the re-run would have written)."""
    from pipeline.storage import iter_objects

    prefix = f"processed/{dataset}/{SHARD_STORE_DIR}/"
    return {o["Key"][len(prefix):-len(SHARD_SUFFIX)] for o in iter_objects(client, settings.s3_bucket, prefix)
            if o["Key"].endswith(SHARD_SUFFIX)}


def write_shard(path: Path, records) -> None:
    """Write TFRecords to `path` atomically (temporary name in the same folder, then rename)."""
    from contracts.processed import TFRecordWriter
    from pipeline.storage import creating_parent

    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.part")
    try:
        with creating_parent(lambda: TFRecordWriter(tmp), tmp) as writer:
            for record in records:
                writer.write(record)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def link_or_copy(source: Path, target: Path) -> None:
    """Hard-link `source` at `target` (a copy where the filesystem cannot link)."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def shard_builder(settings: Settings, client, dataset: str, preprocessing: dict[str, Any],
                  label_index: dict[str, int], published: set[str], prepare: Callable[[bytes], Any]):
    """A function ShardPlan -> Counter of what it took, safe to run in threads.

    It makes the shard's local copy (kept if there, downloaded if another worker published it,
    else encoded from prepared pixels, decoding only images never prepared with these
    parameters) and uploads it unless its content key is already in S3."""
    import numpy as np

    from contracts.processed import encode_example
    from pipeline.cache import ensure_cached
    from pipeline.storage import atomic_write_bytes, s3_call

    size = int(preprocessing["image_size"])
    bucket = settings.s3_bucket
    uploads = threading.Semaphore(max(1, UPLOAD_BYTES_IN_FLIGHT // (size * size * 3 * settings.shard_size)))

    def _record(row: dict[str, Any], prepare_counted: Callable[[bytes], Any]) -> bytes:
        pixels = prepared_pixels(settings, preprocessing, row["sha256"],
                                 lambda: ensure_cached(row, settings, client), prepare_counted)
        image = np.frombuffer(pixels, dtype=np.uint8).reshape(size, size, 3)
        return encode_example(image, label_index[row["label"]], row["sha256"])

    def _download(key: str) -> bytes:
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()

    def _upload(path: Path, key: str) -> None:
        with uploads, open(path, "rb") as fh:
            small = os.fstat(fh.fileno()).st_size <= PUT_FROM_MEMORY_BYTES
            client.put_object(Bucket=bucket, Key=key, Body=fh.read() if small else fh)

    def build(item: ShardPlan) -> Counter:
        done: Counter = Counter()
        local, remote = local_shard_path(settings, dataset, item.key), shard_object_key(dataset, item.key)
        if local.is_file():
            done["reused"] += 1
        elif item.key in published:
            atomic_write_bytes(local, s3_call(settings, f"download {item.name}", _download, remote), fsync=False)
            done.update(reused=1, downloaded=1)
        else:
            def prepare_counted(data: bytes) -> Any:  # images not prepared before (ingest prepares new ones)
                done["decoded"] += 1
                return prepare(data)

            write_shard(local, (_record(r, prepare_counted) for r in item.rows))
            done["written"] += 1
        if item.key not in published:
            s3_call(settings, f"upload {item.name}", _upload, local, remote)
            done["uploaded"] += 1
        return done

    return build
