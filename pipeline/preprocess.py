"""Preprocess: validated manifest -> resized RGB TFRecord shards at processed/<dataset>/<version>/.

`dataset_version` is a hash of the sorted (sha256, label) pairs, the label order, the
preprocessing parameters (IMAGE_SIZE, policy, resample) and the split parameters (fractions,
salt): the same data and parameters always give the same version, so an unchanged re-run
finds `dataset.json` already there, does nothing and says so (`created=False`).

Images go through `imaging.prepare_image` (the function serving uses) in a thread pool:
Pillow releases the GIL while it decodes and resizes, so threads use both cores without worker
processes. Processes were used before and broke under Airflow's task runner: spawned children
re-ran the parent's `__main__` (the `airflow` entry script) and died initialising Airflow.
`benchmarks/preprocess.py` measures it in one run on pbc8 (360 px -> 224 px, 2 cores): threads
1.79x sequential, the old spawned pool 1.29x. Shards, manifest.jsonl (with a `split`
column) and finally dataset.json are uploaded, each shard while the next one is encoded; a
local copy is kept in the processed cache so training on the same machine does not download
it again.

Incremental (issue 14, `pipeline/incremental.py`): each image is decoded once per set of
preprocessing parameters (prepared-pixel cache), shards are assigned by content (sha256 bucket
within a split), and a shard whose content key a published version already has is copied in
S3 instead of being encoded and uploaded; adding or removing a few images rewrites only the
shards they fall in.
"""

from __future__ import annotations

import math
import os
import shutil
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from contracts.imaging import CROP_POLICY_NAMES
from contracts.settings import Settings, get_settings
from contracts.stages import PreprocessResult

# 2: large JPEGs are decoded at reduced scale before resizing (contracts.imaging.DRAFT_FACTOR).
PREPROCESS_VERSION = 2




def encode_cached_file(path: str, size: int, max_pixels: int, label: int, sha256: str,
                       crop: str = "center_crop") -> bytes:
    """One cached image file -> serialized tf.train.Example bytes (runs in the encoder threads)."""
    from contracts.imaging import prepare_image
    from contracts.processed import encode_example

    with open(path, "rb") as fh:
        data = fh.read()
    return encode_example(prepare_image(data, size, max_pixels, crop=crop), label, sha256)


def preprocessing_params(settings: Settings, crop: str = "center_crop") -> dict[str, Any]:
    from contracts.imaging import RESAMPLE

    return {"policy": CROP_POLICY_NAMES[crop], "resample": RESAMPLE.name.lower(),
            "image_size": settings.image_size, "preprocess_version": PREPROCESS_VERSION}


def split_params(settings: Settings) -> dict[str, Any]:
    from contracts.splits import SPLITS_VERSION

    return {"val_fraction": settings.val_fraction, "test_fraction": settings.test_fraction,
            "salt": settings.split_salt, "splits_version": SPLITS_VERSION}


def dataset_version(pairs: list[tuple[str, str]], labels: list[str], preprocessing: dict, splits: dict) -> str:
    """Content hash of the dataset: sorted (sha256, label) + label order + parameters."""
    from contracts.common import stable_hash

    return stable_hash({"pairs": sorted(pairs), "labels": list(labels), "preprocessing": preprocessing,
                        "splits": splits}, 20)


def image_preparer(settings: Settings, crop: str = "center_crop"):
    """bytes -> prepared uint8 array with this install's parameters (those `preprocessing_params` records)."""
    from functools import partial

    from contracts.imaging import prepare_image

    return partial(prepare_image, size=settings.image_size, max_pixels=settings.max_image_pixels, crop=crop)


def preprocess(validated_key: str, dataset: str, settings: Settings | None = None,
               show_progress: bool = False) -> PreprocessResult:
    """Write the processed dataset version for the validated rows (or find it already there).

    Incremental (pipeline/incremental.py): pixels come from the prepared cache when an image was
    decoded before with the same parameters, and a shard another published version already has
    (same shard key) is copied in S3 and hard-linked locally rather than encoded and uploaded."""
    from contracts.common import progress, to_jsonl, utc_now
    from contracts.dataset_spec import load_spec
    from contracts.processed import (MANIFEST_FILE, META_FILE, SPLITS, DatasetMeta, TFRecordWriter,
                                     encode_example, local_version_dir, shard_name, version_prefix)
    from pipeline.cache import ensure_cached
    from pipeline.incremental import (find_published_shard, is_prepared, plan_shards, prepared_pixels,
                                      record_published_shards, reuse_local, shard_key)
    from contracts.splits import assign_splits, split_score
    from pipeline.storage import ensure_bucket, get_jsonl, object_exists, s3_call, s3_client

    import numpy as np

    s = settings or get_settings()
    spec = load_spec(dataset, s.dataset_specs_dir)
    client = s3_client(s)
    ensure_bucket(client, s)
    rows = s3_call(s, "read validated manifest", get_jsonl, client, s.s3_bucket, validated_key)
    if not rows:
        raise ValueError(f"{validated_key} has no images: nothing to preprocess")
    prep, split_cfg = preprocessing_params(s, spec.crop), split_params(s)
    prepare = image_preparer(s, spec.crop)
    version = dataset_version([(r["sha256"], r["label"]) for r in rows], spec.labels, prep, split_cfg)
    prefix = version_prefix(dataset, version)
    if s3_call(s, "check version", object_exists, client, s.s3_bucket, prefix + META_FILE):
        return PreprocessResult(dataset_version=version, prefix=prefix, created=False,
                                message=f"dataset version {version} already exists: nothing to do")

    splits = assign_splits(((r["sha256"], r["label"]) for r in rows), s.val_fraction, s.test_fraction,
                           s.split_salt)
    label_index = spec.label_index
    # Order within a split by split score: deterministic and label-mixed within every shard.
    ordered = {sp: sorted((r for r in rows if splits[r["sha256"]] == sp),
                          key=lambda r: (split_score(r["sha256"], s.split_salt), r["sha256"])) for sp in SPLITS}
    size = s.image_size

    def _encode(row: dict) -> bytes:
        pixels = prepared_pixels(s, prep, row["sha256"], lambda: ensure_cached(row, s, client), prepare)
        image = np.frombuffer(pixels, dtype=np.uint8).reshape(size, size, 3)
        return encode_example(image, label_index[row["label"]], row["sha256"])

    def _encode_all(pool, chunk: list[dict]):
        missing = [r for r in chunk if not is_prepared(s, prep, r["sha256"])]
        with ThreadPoolExecutor(max_workers=s.transfer_workers) as fetcher:  # raw-cache misses re-download
            list(fetcher.map(lambda r: ensure_cached(r, s, client), missing))
        return pool.map(_encode, chunk), len(missing)

    final_dir = local_version_dir(s, dataset, version)
    work = final_dir.parent / f".tmp-{version}-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shards: dict[str, list[str]] = {}
    keys: dict[str, str] = {}
    counts: dict[str, dict[str, int]] = {}
    manifest: list[dict] = []
    stats = {"shards_reused": 0, "shards_written": 0, "images_decoded": 0}
    workers = max(2, os.cpu_count() or 2)
    bar = progress(range(len(rows)), len(rows), f"preprocess {dataset}", show_progress)

    def _upload(name: str) -> None:
        with open(work / name, "rb") as fh:
            s3_call(s, f"upload {name}", client.put_object, Bucket=s.s3_bucket, Key=prefix + name, Body=fh)

    def _copy(source_key: str, name: str) -> None:
        s3_call(s, f"copy {name}", client.copy_object, Bucket=s.s3_bucket, Key=prefix + name,
                CopySource={"Bucket": s.s3_bucket, "Key": source_key})

    try:
        # One uploader thread: each finished shard goes up while the next one is encoded
        # (parallel PUTs of large shards only thrash a small S3 server).
        with ThreadPoolExecutor(max_workers=workers) as pool, ThreadPoolExecutor(max_workers=1) as uploader:
            uploads = []
            for sp in SPLITS:
                items = ordered[sp]
                shards[sp] = []
                counts[sp] = dict(sorted(Counter(r["label"] for r in items).items()))
                for bucket, buckets, chunk in plan_shards(items, s.shard_size):
                    name = shard_name(sp, bucket, buckets)
                    keys[name] = shard_key(chunk, label_index, prep)
                    published = s3_call(s, "find shard", find_published_shard, s, client, dataset, keys[name])
                    if published:
                        uploads.append(uploader.submit(_copy, published["s3_key"], name))
                        s3_call(s, f"reuse {name}", reuse_local, s, client, dataset, published, work / name)
                        stats["shards_reused"] += 1
                    else:
                        records, decoded = _encode_all(pool, chunk)
                        with TFRecordWriter(work / name) as writer:
                            for record in records:
                                writer.write(record)
                        uploads.append(uploader.submit(_upload, name))
                        stats["shards_written"] += 1
                        stats["images_decoded"] += decoded
                    for _ in chunk:
                        next(bar, None)
                    shards[sp].append(name)
                    manifest.extend({**{k: row.get(k) for k in ("key", "sha256", "class", "label", "bytes",
                                                                   "width", "height", "format", "mode")},
                                     "split": sp, "shard": name} for row in chunk)
            (work / MANIFEST_FILE).write_bytes(to_jsonl(manifest))
            uploads.append(uploader.submit(_upload, MANIFEST_FILE))
            for future in uploads:
                future.result()
        meta = DatasetMeta(
            dataset=dataset, dataset_version=version, image_size=s.image_size, labels=spec.labels,
            classes=dict(spec.classes), positive_label=spec.positive_label, counts=counts, shards=shards,
            preprocessing={**prep, "splits": split_cfg}, source_manifest_key=validated_key,
            validation_summary_key=validated_key.rsplit("/", 1)[0] + "/summary.json", created_at=utc_now(),
            extra={"images": len(rows), "shard_size": s.shard_size, "shard_keys": keys, **stats},
        )
        (work / META_FILE).write_text(meta.to_json(), encoding="utf-8")
        s3_call(s, "upload dataset.json", client.put_object, Bucket=s.s3_bucket, Key=prefix + META_FILE,
                Body=meta.to_json().encode(), ContentType="application/json")  # last: marks completeness
        s3_call(s, "index shards", record_published_shards, s, client, dataset, version, keys)
        if not (final_dir / META_FILE).is_file():
            shutil.rmtree(final_dir, ignore_errors=True)
            os.replace(work, final_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    per_split = {sp: sum(c.values()) for sp, c in counts.items()}
    return PreprocessResult(dataset_version=version, prefix=prefix, created=True, counts=counts,
                            per_split=per_split,
                            message=f"dataset version {version} written: {per_split}; {stats['shards_written']} "
                                    f"shards written ({stats['images_decoded']} images decoded), "
                                    f"{stats['shards_reused']} reused")
