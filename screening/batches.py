"""Batches in the inbox: submitting a folder, the inbox Asset, and which batches need scoring.

A batch is every object under `inbox/<dataset>/<batch_id>/` (nested folders included). It may
arrive by `python -m pipeline submit`, by any S3 tool, or be found by the scoring DAG's own
schedule; `submit` also emits the inbox Asset event (extra: the batch id) so the
`hemaflow_score_<dataset>` DAG starts at once. Importing this module stays light (the DAG file does).
"""

from __future__ import annotations

import logging
from pathlib import Path

from contracts.screening import SUMMARY_FILE, check_batch_id, inbox_prefix, results_prefix
from contracts.settings import Settings, get_settings

log = logging.getLogger(__name__)

EVENT_SOURCE = "hemaflow-submit"


def inbox_asset_name(dataset: str) -> str:
    return f"hemaflow-inbox-{dataset}"


def inbox_asset_uri(bucket: str, dataset: str) -> str:
    """e.g. ``s3://hemaflow/inbox/leukemia``: every batch of the dataset's inbox."""
    from pipeline.watch import raw_asset_uri

    return raw_asset_uri(bucket, inbox_prefix(dataset))


def _batch_files(root: Path, prefix: str) -> list:
    """Every non-hidden file under `root` (any depth) as an upload under `prefix`."""
    from pipeline.upload import LocalFile

    files = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            files.append(LocalFile(path, prefix + rel.as_posix(), path.stat().st_size))
    return files


def submit_folder(root: Path, dataset: str, batch_id: str | None = None, settings: Settings | None = None,
                  show_progress: bool = False, emit_asset_event: bool = True) -> dict:
    """Upload a flat or nested folder to `inbox/<dataset>/<batch_id>/` (default id: a UTC stamp).

    Idempotent like `upload` (identical objects are skipped). When something was sent and
    AIRFLOW_API_URL is set, emits the inbox Asset event with the batch id in `extra`; a failed
    event is a warning (the scoring DAG's schedule finds the batch anyway).
    Returns {batch_id, prefix, uploaded, skipped, bytes, asset_event}.
    """
    from contracts.common import utc_stamp
    from contracts.dataset_spec import load_spec
    from pipeline.upload import put_local_files

    s = settings or get_settings()
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"submit source {root} is not a folder")
    load_spec(dataset, s.dataset_specs_dir)  # an unknown dataset is an error before anything is sent
    batch_id = check_batch_id(batch_id or utc_stamp())
    prefix = inbox_prefix(dataset, batch_id)
    files = _batch_files(root, prefix)
    if not files:
        raise ValueError(f"no files to submit in {root}")
    uploaded, skipped, sent = put_local_files(files, prefix, f"submit {batch_id}", s, show_progress)
    result = {"batch_id": batch_id, "prefix": prefix, "uploaded": uploaded, "skipped": skipped, "bytes": sent}
    result["asset_event"] = (announce_batch(dataset, result, s) if emit_asset_event
                             else {"emitted": False, "message": "asset event not requested by the caller"})
    return result


def announce_batch(dataset: str, submitted: dict, s: Settings) -> dict:
    """Emit the inbox Asset event for a submitted batch. Never raises: {emitted, message, event?}."""
    from pipeline.airflow_api import announce_event

    extra = {"source": EVENT_SOURCE, "dataset": dataset, "batch_id": submitted["batch_id"],
             "prefix": submitted["prefix"], "uploaded": submitted["uploaded"]}
    return announce_event(
        submitted["uploaded"], inbox_asset_name(dataset), inbox_asset_uri(s.s3_bucket, dataset), extra, s,
        later=(f"the scoring DAG looks for new batches on RAW_WATCH_SCHEDULE ({s.raw_watch_schedule}), or run "
               f"`python -m screening score --dataset {dataset} --batch {submitted['batch_id']}`"),
        queued=f"hemaflow_score_{dataset} is queued to score batch {submitted['batch_id']}")


def list_batches(client, dataset: str, s: Settings) -> list[str]:
    """Batch ids under `inbox/<dataset>/` (one listing level; folders that are not valid ids are skipped)."""
    from contracts.screening import InvalidBatchId

    paginator = client.get_paginator("list_objects_v2")
    found = []
    for page in paginator.paginate(Bucket=s.s3_bucket, Prefix=inbox_prefix(dataset), Delimiter="/"):
        for common in page.get("CommonPrefixes", []):
            name = common["Prefix"].rstrip("/").rsplit("/", 1)[-1]
            try:
                found.append(check_batch_id(name))
            except InvalidBatchId:
                log.warning("inbox folder %r is not a valid batch id: not scored", common["Prefix"])
    return sorted(found)


def batch_keys(client, dataset: str, batch_id: str, s: Settings) -> list[str]:
    """Every object key of a batch, sorted (folder markers left out)."""
    from pipeline.storage import iter_objects

    prefix = inbox_prefix(dataset, batch_id)
    return sorted(o["Key"] for o in iter_objects(client, s.s3_bucket, prefix) if not o["Key"].endswith("/"))


def summary_key(dataset: str, batch_id: str, model_version: str) -> str:
    """The completion marker of one scoring (written last)."""
    return results_prefix(dataset, batch_id, model_version) + SUMMARY_FILE
