"""The review queue's storage side: scored batches and their decisions, read from and written to S3.

Batch scoring writes `results/<dataset>/<batch_id>/<model_version>/` (contracts.screening); this
module lists those batches, reads a scoring's predictions.csv in review order (highest P(positive)
first for a two-label task, lowest confidence first otherwise; failed images apart) and appends
reviewer decisions with contracts.reviews, through serving.s3 (no boto3 in the serving image) as
serving's own S3 identity, which may write nothing but review files and contributed images.
Calls are blocking: routers run them in threads.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from typing import Any

from contracts.screening import (
    PREDICTIONS_FILE,
    RESULTS_ROOT,
    SUMMARY_FILE,
    check_batch_id,
    results_prefix,
)
from contracts.settings import Settings
from contracts.reviews import latest_by_image, read_decisions

PROBABILITY_PREFIX = "p_"
NOT_FOUND_CODES = ("NoSuchKey", "404", "NotFound")


class BatchNotFound(LookupError):
    """No scoring of this batch (or of this model version of it) exists in S3."""


@dataclass
class ScoredBatch:
    """One scoring of one batch: its rows in review order, the refused images apart."""

    dataset: str
    batch_id: str
    model_version: str
    versions: list[str]
    labels: list[str]
    items: list[dict[str, Any]] = field(default_factory=list)
    refused: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    def item(self, sha256: str) -> dict[str, Any] | None:
        return next((row for row in self.items if row["sha256"] == sha256), None)


def _version_order(version: str) -> tuple[int, int | str]:
    return (1, int(version)) if version.isdigit() else (0, version)


def _in_scope(text: str) -> bool | None:
    return {"true": True, "1": True, "false": False, "0": False}.get((text or "").strip().lower())


def parse_predictions(text: str) -> tuple[list[str], list[dict[str, Any]], list[dict[str, Any]]]:
    """(labels, scored rows, refused rows) of a predictions.csv; labels come from its `p_<label>` columns."""
    reader = csv.DictReader(io.StringIO(text))
    labels = [c[len(PROBABILITY_PREFIX):] for c in reader.fieldnames or [] if c.startswith(PROBABILITY_PREFIX)]
    items, refused = [], []
    for row in reader:
        if row.get("error"):
            refused.append({"key": row.get("key", ""), "sha256": row.get("sha256", ""), "error": row["error"]})
            continue
        items.append({
            "key": row["key"], "sha256": row["sha256"], "label": row["label"],
            "confidence": float(row.get("confidence") or 0.0),
            "probabilities": {lab: float(row.get(PROBABILITY_PREFIX + lab) or 0.0) for lab in labels},
            "in_scope": _in_scope(row.get("in_scope", "")),
            "rank": int(row["rank"]) if (row.get("rank") or "").strip().isdigit() else None,
        })
    return labels, items, refused


def review_order(items: list[dict[str, Any]], labels: list[str], positive_label: str | None) -> list[dict[str, Any]]:
    """Most suspicious first: P(positive) descending for two labels, else lowest confidence first;
    the scorer's own `rank` column wins when every row has one."""
    if items and all(row["rank"] is not None for row in items):
        return sorted(items, key=lambda row: row["rank"])
    if positive_label in labels and len(labels) == 2:
        return sorted(items, key=lambda row: (-row["probabilities"][positive_label], row["key"]))
    return sorted(items, key=lambda row: (row["confidence"], row["key"]))


def _is_not_found(exc: Exception) -> bool:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", "")) in NOT_FOUND_CODES


class ScreeningStore:
    """Reads scored batches and review files of one S3 bucket (one client, made on first use)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.bucket = settings.s3_bucket
        self._client = None

    @property
    def configured(self) -> bool:
        return bool(self.settings.serving_s3_secret_access_key.get_secret_value())

    @property
    def client(self):
        if self._client is None:
            from serving.s3 import S3Lite

            self._client = S3Lite(self.settings)
        return self._client

    def _folders(self, prefix: str) -> list[str]:
        names, token = [], None
        while True:
            extra = {"ContinuationToken": token} if token else {}
            page = self.client.list_objects_v2(Bucket=self.bucket, Prefix=prefix, Delimiter="/", **extra)
            names += [p["Prefix"][len(prefix):].rstrip("/") for p in page.get("CommonPrefixes", [])]
            token = page.get("NextContinuationToken")
            if not token:
                return names

    def _get(self, key: str) -> bytes | None:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except Exception as exc:  # noqa: BLE001 - only a missing object is None
            if _is_not_found(exc):
                return None
            raise

    def scorings(self, dataset: str, batch_id: str) -> dict[str, dict[str, Any]]:
        """{model version: summary} of the batch's complete scorings (summary.json, written last),
        newest first: a scoring still in progress must not hide the finished one from reviewers."""
        prefix = f"{RESULTS_ROOT}/{dataset}/{check_batch_id(batch_id)}/"
        found = {}
        for version in sorted(self._folders(prefix), key=_version_order, reverse=True):
            text = self._get(results_prefix(dataset, batch_id, version) + SUMMARY_FILE)
            if text is not None:
                found[version] = json.loads(text)
        return found

    def versions(self, dataset: str, batch_id: str) -> list[str]:
        """Model versions with a complete scoring of the batch, newest first."""
        return list(self.scorings(dataset, batch_id))

    def list_batches(self, dataset: str) -> list[dict[str, Any]]:
        """Every scored batch of the dataset with its newest scoring's summary and review progress."""
        out = []
        for batch_id in sorted(self._folders(f"{RESULTS_ROOT}/{dataset}/")):
            try:
                scorings = self.scorings(dataset, batch_id)
            except ValueError:  # a folder that is not a valid batch id: not ours to show
                continue
            if not scorings:
                continue
            versions = list(scorings)
            summary = scorings[versions[0]]
            reviewed = len(latest_by_image(read_decisions(self.client, self.bucket, dataset, batch_id)))
            out.append({"batch_id": batch_id, "model_version": versions[0], "versions": versions,
                        "summary": summary, "reviewed": reviewed})
        return out

    def load_batch(self, dataset: str, batch_id: str, version: str | None,
                   positive_label: str | None) -> ScoredBatch:
        """A scoring in review order with each image's latest decision (`review`, None if unreviewed)."""
        scorings = self.scorings(dataset, batch_id)
        versions = list(scorings)
        chosen = version or (versions[0] if versions else None)
        text = self._get(results_prefix(dataset, batch_id, chosen) + PREDICTIONS_FILE) if chosen in versions else None
        if text is None:
            raise BatchNotFound(f"batch {batch_id!r} of {dataset!r} has no scoring" +
                                (f" by model version {version}" if version else ""))
        summary = scorings[chosen]
        labels, items, refused = parse_predictions(text.decode("utf-8"))
        positive_label = summary.get("positive_label") or positive_label
        latest = latest_by_image(read_decisions(self.client, self.bucket, dataset, batch_id))
        for row in items:
            decision = latest.get(row["key"])
            row["review"] = decision.to_dict() if decision else None
        return ScoredBatch(dataset, batch_id, chosen, versions, labels,
                           review_order(items, labels, positive_label), refused, summary)

    def get_object(self, key: str) -> bytes | None:
        return self._get(key)

    def put_object(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data)
