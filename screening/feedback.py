"""Feedback into retraining: reviewed images are copied into `raw/<dataset>/<class folder>/`.

Each image's latest decision (contracts.reviews.latest_by_image; a confirmation is a verified
label as much as a correction) is copied server-side from the inbox to
`<spec prefix><class folder>/reviewed-<batch_id>-<sha256 prefix><ext>`, with its provenance in
the object's metadata (review id, reviewer, model version, batch, source key). The raw/ change is
what `hemaflow_watch_raw` (or an upload's Asset event) turns into a retraining run.

Idempotent by review id: a target that already carries the decision's review id is left alone; a
later decision on the same image replaces the copy (and removes it from a class folder it left).
"""

from __future__ import annotations

import logging
import posixpath
from urllib.parse import quote
from dataclasses import asdict, dataclass, field

from contracts.dataset_spec import DatasetSpec, load_spec
from contracts.screening import REVIEWED_NAME_PREFIX, REVIEWS_ROOT, ReviewDecision, check_batch_id
from contracts.settings import Settings, get_settings
from contracts.reviews import latest_by_image, read_decisions

log = logging.getLogger(__name__)

# S3 user metadata (x-amz-meta-*) of a reviewed image in raw/: its provenance.
META_REVIEW_ID = "hemaflow-review-id"
META_REVIEWER = "hemaflow-reviewer"
META_MODEL_VERSION = "hemaflow-model-version"
META_BATCH = "hemaflow-batch"
META_SOURCE_KEY = "hemaflow-source-key"
META_REVIEWED_LABEL = "hemaflow-reviewed-label"
NOT_FOUND_CODES = ("NoSuchKey", "404", "NotFound")


@dataclass
class FeedbackResult:
    """What one feedback run did (counts by outcome; skipped decisions with their reason)."""

    dataset: str
    batches: list[str] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)
    unchanged: int = 0
    removed: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def class_folder_for(spec: DatasetSpec, label: str) -> str | None:
    """The raw/ class folder a reviewed label goes to: the folder named like the label, else the
    first (sorted) folder mapped to it (e.g. leukemia `abnormal` -> `Early`; training uses labels)."""
    if spec.classes.get(label) == label:
        return label
    return next((folder for folder in spec.class_folders if spec.classes[folder] == label), None)


def reviewed_name(decision: ReviewDecision) -> str:
    ext = posixpath.splitext(decision.image_key)[1].lower()[:8]
    return f"{REVIEWED_NAME_PREFIX}{decision.batch_id}-{decision.sha256[:16]}{ext}"


def _error_code(exc: Exception) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


def _head_metadata(client, bucket: str, key: str) -> dict[str, str] | None:
    try:
        return client.head_object(Bucket=bucket, Key=key).get("Metadata", {})
    except Exception as exc:  # noqa: BLE001 - only a missing object is None
        if _error_code(exc) in NOT_FOUND_CODES:
            return None
        raise


def reviewed_batches(client, bucket: str, dataset: str) -> list[str]:
    """Batch ids with a review file."""
    from pipeline.storage import iter_objects

    prefix = f"{REVIEWS_ROOT}/{dataset}/"
    keys = (obj["Key"][len(prefix):] for obj in iter_objects(client, bucket, prefix))
    return sorted(k[: -len(".jsonl")] for k in keys if k.endswith(".jsonl") and "/" not in k)


def _apply_one(client, bucket: str, spec: DatasetSpec, decision: ReviewDecision, result: FeedbackResult) -> None:
    folder = class_folder_for(spec, decision.reviewed_label)
    if folder is None:
        result.skipped.append({"review_id": decision.review_id, "reason": f"label {decision.reviewed_label!r} "
                               f"is not in dataset spec {spec.name!r}"})
        return
    name = reviewed_name(decision)
    target = spec.key_for(folder, name)
    for other in spec.class_folders:  # a changed mind: the image leaves the folder it was in
        stale = spec.key_for(other, name)
        if other != folder and _head_metadata(client, bucket, stale) is not None:
            client.delete_object(Bucket=bucket, Key=stale)
            result.removed.append(stale)
    meta = _head_metadata(client, bucket, target)
    if meta is not None and meta.get(META_REVIEW_ID) == decision.review_id:
        result.unchanged += 1
        return
    provenance = {k: v if v.isascii() else quote(v) for k, v in {  # S3 metadata travels as ASCII headers
        META_REVIEW_ID: decision.review_id, META_REVIEWER: decision.reviewer,
        META_MODEL_VERSION: decision.model_version, META_BATCH: decision.batch_id,
        META_SOURCE_KEY: decision.image_key, META_REVIEWED_LABEL: decision.reviewed_label}.items()}
    try:
        client.copy_object(Bucket=bucket, Key=target, CopySource={"Bucket": bucket, "Key": decision.image_key},
                           Metadata=provenance, MetadataDirective="REPLACE")
    except Exception as exc:  # noqa: BLE001 - a deleted inbox image skips its decision, not the run
        if _error_code(exc) not in NOT_FOUND_CODES:
            raise
        result.skipped.append({"review_id": decision.review_id, "reason": f"{decision.image_key} is gone"})
        return
    result.copied.append(target)


def apply_feedback(dataset: str, batch_id: str | None = None, settings: Settings | None = None,
                   client=None) -> FeedbackResult:
    """Copy every batch's (or one batch's) reviewed images into raw/ with provenance; safe to re-run."""
    from pipeline.storage import s3_client

    s = settings or get_settings()
    client = client or s3_client(s)
    spec = load_spec(dataset, s.dataset_specs_dir)
    result = FeedbackResult(dataset=dataset)
    result.batches = [check_batch_id(batch_id)] if batch_id else reviewed_batches(client, s.s3_bucket, dataset)
    for batch in result.batches:
        for decision in latest_by_image(read_decisions(client, s.s3_bucket, dataset, batch)).values():
            _apply_one(client, s.s3_bucket, spec, decision, result)
    log.info("feedback %s: %d copied, %d unchanged, %d removed, %d skipped", dataset, len(result.copied),
             result.unchanged, len(result.removed), len(result.skipped))
    return result
