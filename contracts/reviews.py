"""Reviewer decisions: append-only `reviews/<dataset>/<batch_id>.jsonl`, never losing one.

Appending to an S3 object is read, append, write. Concurrent reviewers (or two serving replicas)
must not overwrite each other, so each write is a compare-and-set: `If-Match: <ETag read>` on an
existing file, `If-None-Match: *` on a new one. SeaweedFS honours both (PreconditionFailed, 412,
checked in tests/integration/test_screening_reviews.py); a refused write re-reads and retries.
Appends are idempotent by review id, so a client retrying a request adds its decision once.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Iterable

from contracts.common import from_jsonl, to_jsonl, utc_now
from contracts.screening import ReviewDecision, review_key

CAS_ATTEMPTS = 20
CAS_BACKOFF_S = 0.02
PRECONDITION_CODES = ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")


class ReviewWriteConflict(RuntimeError):
    """The review file kept changing under us for CAS_ATTEMPTS tries; nothing was written."""


def new_decision(*, dataset: str, batch_id: str, image_key: str, sha256: str, model_version: str | int,
                 predicted_label: str, reviewed_label: str, reviewer: str, **extra) -> ReviewDecision:
    """A decision stamped with a fresh review id and the current UTC time."""
    return ReviewDecision(
        review_id=uuid.uuid4().hex, dataset=dataset, batch_id=batch_id, image_key=image_key, sha256=sha256,
        model_version=str(model_version), predicted_label=predicted_label, reviewed_label=reviewed_label,
        reviewer=reviewer, reviewed_at=utc_now(), extra=dict(extra),
    )


def _error_code(exc: Exception) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


def _read(client, bucket: str, key: str) -> tuple[bytes, str | None]:
    """The file's bytes and ETag, or (b"", None) when it does not exist yet."""
    try:
        obj = client.get_object(Bucket=bucket, Key=key)
    except Exception as exc:  # noqa: BLE001 - only "no such key" means empty
        if _error_code(exc) in ("NoSuchKey", "404", "NotFound"):
            return b"", None
        raise
    return obj["Body"].read(), obj["ETag"]


def read_decisions(client, bucket: str, dataset: str, batch_id: str) -> list[ReviewDecision]:
    """Every decision of a batch, oldest first (an unknown field in a line is ignored)."""
    body, _ = _read(client, bucket, review_key(dataset, batch_id))
    return [ReviewDecision.from_dict(row) for row in from_jsonl(body)]


def append_decisions(client, bucket: str, decisions: Iterable[ReviewDecision]) -> int:
    """Append decisions (all of one batch) with a compare-and-set write; returns how many were new."""
    decisions = list(decisions)
    if not decisions:
        return 0
    (dataset, batch_id), *others = {(d.dataset, d.batch_id) for d in decisions}
    if others:
        raise ValueError("append_decisions takes the decisions of one batch at a time")
    key = review_key(dataset, batch_id)
    for attempt in range(CAS_ATTEMPTS):
        body, etag = _read(client, bucket, key)
        known = {row.get("review_id") for row in from_jsonl(body)}
        new = [d for d in decisions if d.review_id not in known]
        if not new:
            return 0
        if body and not body.endswith(b"\n"):
            body += b"\n"
        condition = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
        try:
            client.put_object(Bucket=bucket, Key=key, Body=body + to_jsonl(d.to_dict() for d in new),
                              ContentType="application/x-ndjson", **condition)
            return len(new)
        except Exception as exc:  # noqa: BLE001 - retry only a lost compare-and-set
            if _error_code(exc) not in PRECONDITION_CODES:
                raise
        time.sleep(CAS_BACKOFF_S * (attempt + 1) * (0.5 + random.random()))  # noqa: S311 - jitter
    raise ReviewWriteConflict(f"{key} changed on every one of {CAS_ATTEMPTS} attempts; nothing was written")


def latest_by_image(decisions: Iterable[ReviewDecision]) -> dict[str, ReviewDecision]:
    """The decision that counts for each image: the last one appended (a reviewer may change their mind;
    compare-and-set appends make file order the order in which decisions were made)."""
    return {decision.image_key: decision for decision in decisions}
