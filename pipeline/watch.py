"""Data-aware triggering: has the raw prefix of a dataset moved on since the last ingest?

The `hemaflow_watch_raw` DAG calls `pending_raw_changes` on a short schedule and, when
images were added, replaced or removed by any means (the upload CLI, `aws s3 cp`, a
scanner's export), emits the dataset's raw Asset so the retraining DAG runs. It only lists
the prefix and reads the latest manifest: no image is downloaded.
Its imports are inside the function: the DAG files import this module while parsing.
"""

from __future__ import annotations

from contracts.settings import Settings, get_settings


def raw_asset_uri(bucket: str, s3_prefix: str) -> str:
    """The Airflow Asset URI of a dataset's raw images, e.g. ``s3://hemaflow/raw/leukemia``."""
    return f"s3://{bucket}/{s3_prefix.strip('/')}"


def raw_asset_name(dataset: str) -> str:
    return f"hemaflow-raw-{dataset}"


def pending_raw_changes(dataset: str, settings: Settings | None = None) -> dict:
    """Compare the raw prefix with the latest ingest manifest by key, ETag and size.

    Returns {dataset, pending: bool, new, changed, deleted, listed, manifest_key}; `pending` is
    True when an ingest would find something to do (or no ingest ever ran and images exist).
    """
    from contracts.dataset_spec import load_spec
    from pipeline.manifests import diff_listing, load_previous
    from pipeline.storage import iter_objects, s3_client

    s = settings or get_settings()
    spec = load_spec(dataset, s.dataset_specs_dir)
    client = s3_client(s)
    listing = [
        obj
        for obj in iter_objects(client, s.s3_bucket, spec.s3_prefix)
        if not obj["Key"].endswith("/") and spec.class_of_key(obj["Key"]) in spec.classes
    ]
    pointer, previous = load_previous(client, s, dataset)
    new, changed, _unchanged, deleted = diff_listing(previous, listing)
    return {
        "dataset": dataset,
        "pending": bool(new or changed or deleted),
        "new": len(new),
        "changed": len(changed),
        "deleted": len(deleted),
        "listed": len(listing),
        "manifest_key": pointer["manifest_key"] if pointer else None,
    }
