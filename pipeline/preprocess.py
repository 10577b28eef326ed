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
1.79x sequential, the old spawned pool 1.29x. Shards (built and uploaded a few at a time),
manifest.jsonl (with a `split` column) and finally dataset.json are uploaded; a local copy is
kept in the processed cache so training on the same machine does not download it again.

Incremental (issue 14, `pipeline/incremental.py`): each image is decoded once per set of
preprocessing parameters (prepared-pixel cache), shards are assigned by content (sha256 bucket
within a split) and stored once per content key, so a shard an earlier version already has is
neither encoded, uploaded nor copied; adding or removing a few images rewrites only the shards
they fall in (with small shards, SHARD_SIZE, a small minority of them).
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from contracts.settings import Settings, get_settings
from contracts.stages import PreprocessResult
from pipeline.incremental import (PREPROCESS_VERSION, ShardPlan, image_preparer, plan_shards,  # noqa: F401 - re-exported
                                  preprocessing_params, shard_builder)

# Shards built and uploaded at once (at least; more on more cores). Small shards are small PUTs whose
# time is mostly the round trip: 12 at once beat 4 by 1.5x on 2 cores (benchmarks/ingest.py, A/B runs).
# UPLOAD_BYTES_IN_FLIGHT (pipeline/incremental.py) still bounds the memory of large shards.
SHARD_WORKERS = 12
SHARD_STATS = ("written", "reused", "uploaded", "downloaded")
MANIFEST_ROW_FIELDS = ("key", "sha256", "class", "label", "bytes", "width", "height", "format", "mode")




def encode_cached_file(path: str, size: int, max_pixels: int, label: int, sha256: str,
                       crop: str = "center_crop") -> bytes:
    """One cached image file -> serialized tf.train.Example bytes (runs in the encoder threads)."""
    from contracts.imaging import prepare_image
    from contracts.processed import encode_example

    with open(path, "rb") as fh:
        data = fh.read()
    return encode_example(prepare_image(data, size, max_pixels, crop=crop), label, sha256)


def split_params(settings: Settings) -> dict[str, Any]:
    from contracts.near_duplicates import NEAR_DUPLICATE_MAX_BITS
    from contracts.splits import SPLITS_VERSION

    return {"val_fraction": settings.val_fraction, "test_fraction": settings.test_fraction,
            "salt": settings.split_salt, "splits_version": SPLITS_VERSION,
            "near_duplicate_max_bits": NEAR_DUPLICATE_MAX_BITS}


def dataset_version(pairs: list[tuple[str, str]], labels: list[str], preprocessing: dict, splits: dict) -> str:
    """Content hash of the dataset: sorted (sha256, label) + label order + parameters."""
    from contracts.common import stable_hash

    return stable_hash({"pairs": sorted(pairs), "labels": list(labels), "preprocessing": preprocessing,
                        "splits": splits}, 20)


def preprocess(validated_key: str, dataset: str, settings: Settings | None = None,
               show_progress: bool = False) -> PreprocessResult:
    """Write the processed dataset version for the validated rows (or find it already there).

    Incremental (pipeline/incremental.py): pixels come from the prepared cache when an image was
    decoded before with the same parameters, and a shard whose content key is already stored (in
    S3 or locally) is referenced by dataset.json and hard-linked locally, not encoded or uploaded."""
    from contracts.common import progress, to_jsonl, utc_now
    from contracts.dataset_spec import load_spec
    from contracts.processed import (MANIFEST_FILE, META_FILE, SPLITS, DatasetMeta, local_version_dir, shard_name,
                                     version_prefix)
    from contracts.splits import assign_splits, split_score
    from pipeline.incremental import (link_or_copy, local_shard_path, published_shard_keys, shard_key,
                                      shard_object_key)
    from pipeline.storage import ensure_bucket, get_jsonl, object_exists, s3_call, s3_client

    s = settings or get_settings()
    spec = load_spec(dataset, s.dataset_specs_dir)
    client = s3_client(s)
    ensure_bucket(client, s)
    rows = s3_call(s, "read validated manifest", get_jsonl, client, s.s3_bucket, validated_key)
    if not rows:
        raise ValueError(f"{validated_key} has no images: nothing to preprocess")
    prep, split_cfg = preprocessing_params(s, spec.crop), split_params(s)
    version = dataset_version([(r["sha256"], r["label"]) for r in rows], spec.labels, prep, split_cfg)
    prefix = version_prefix(dataset, version)
    if s3_call(s, "check version", object_exists, client, s.s3_bucket, prefix + META_FILE):
        return PreprocessResult(dataset_version=version, prefix=prefix, created=False,
                                message=f"dataset version {version} already exists: nothing to do")

    splits = assign_splits(((r["sha256"], r["label"]) for r in rows), s.val_fraction, s.test_fraction,
                           s.split_salt, fingerprints={r["sha256"]: r.get("fingerprint") for r in rows})
    # Order within a split by split score: deterministic and label-mixed within every shard.
    ordered = {sp: sorted((r for r in rows if splits[r["sha256"]] == sp),
                          key=lambda r: (split_score(r["sha256"], s.split_salt), r["sha256"])) for sp in SPLITS}
    plan = [ShardPlan(sp, shard_name(sp, bucket, buckets), shard_key(chunk, spec.label_index, prep), chunk)
            for sp in SPLITS for bucket, buckets, chunk in plan_shards(ordered[sp], s.shard_size)]
    published = s3_call(s, "list shards", published_shard_keys, s, client, dataset)
    build = shard_builder(s, client, dataset, prep, spec.label_index, published, image_preparer(s, spec.crop))
    stats = Counter()
    bar = progress(range(len(rows)), len(rows), f"preprocess {dataset}", show_progress)
    final_dir = local_version_dir(s, dataset, version)
    work = final_dir.parent / f".tmp-{version}-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        # Shards build (decode, encode, write) and upload in parallel: small shards are small PUTs.
        pool = ThreadPoolExecutor(max_workers=max(SHARD_WORKERS, os.cpu_count() or 2))
        try:
            for item, done in zip(plan, pool.map(build, plan)):
                stats.update(done)
                link_or_copy(local_shard_path(s, dataset, item.key), work / item.name)
                for _ in item.rows:
                    next(bar, None)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # a failure stops the shards not started
        manifest = [{**{k: row.get(k) for k in MANIFEST_ROW_FIELDS}, "split": item.split, "shard": item.name}
                    for item in plan for row in item.rows]
        (work / MANIFEST_FILE).write_bytes(to_jsonl(manifest))
        s3_call(s, "upload manifest", client.put_object, Bucket=s.s3_bucket, Key=prefix + MANIFEST_FILE,
                Body=(work / MANIFEST_FILE).read_bytes())
        counts = {sp: dict(sorted(Counter(r["label"] for r in ordered[sp]).items())) for sp in SPLITS}
        meta = DatasetMeta(
            dataset=dataset, dataset_version=version, image_size=s.image_size, labels=spec.labels,
            classes=dict(spec.classes), positive_label=spec.positive_label, counts=counts,
            shards={sp: [i.name for i in plan if i.split == sp] for sp in SPLITS},
            preprocessing={**prep, "splits": split_cfg}, source_manifest_key=validated_key,
            validation_summary_key=validated_key.rsplit("/", 1)[0] + "/summary.json", created_at=utc_now(),
            extra={"images": len(rows), "shard_size": s.shard_size, **{f"shards_{k}": stats[k] for k in SHARD_STATS},
                   "images_decoded": stats["decoded"]},
            shard_objects={i.name: shard_object_key(dataset, i.key) for i in plan},
        )
        (work / META_FILE).write_text(meta.to_json(), encoding="utf-8")
        s3_call(s, "upload dataset.json", client.put_object, Bucket=s.s3_bucket, Key=prefix + META_FILE,
                Body=meta.to_json().encode(), ContentType="application/json")  # last: marks completeness
        if not (final_dir / META_FILE).is_file():
            shutil.rmtree(final_dir, ignore_errors=True)
            os.replace(work, final_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    per_split = {sp: sum(c.values()) for sp, c in counts.items()}
    return PreprocessResult(dataset_version=version, prefix=prefix, created=True, counts=counts,
                            per_split=per_split,
                            message=f"dataset version {version} written: {per_split}; {stats['written']} "
                                    f"shards written ({stats['decoded']} images decoded), {stats['reused']} reused "
                                    f"({stats['uploaded']} uploaded, {stats['downloaded']} downloaded)")
