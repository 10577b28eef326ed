"""The screening workflow's storage contract: where batches, results and reviews live in S3.

Batch scoring (the `hemaflow_score_<dataset>` DAG), the review queue (serving) and the feedback
step (reviews -> raw/) all meet here, so the layout and the row formats are defined once.
Nothing heavy is imported: this module is part of the shared kernel.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

INBOX_ROOT = "inbox"
RESULTS_ROOT = "results"
REVIEWS_ROOT = "reviews"

PREDICTIONS_FILE = "predictions.csv"
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.html"
HEATMAPS_DIR = "heatmaps"
THUMBNAILS_DIR = "thumbnails"
PREVIEW_SUFFIX = ".jpg"  # thumbnails and heatmaps are small JPEGs named by the image's sha256

# Batch ids become S3 key segments and URL path segments: keep them boring.
BATCH_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

# Serving's own SeaweedFS identity (SERVING_S3_ACCESS_KEY_ID / _SECRET_ACCESS_KEY): what the review
# queue needs and nothing else. It lists and reads scorings, reads inbox images (a missing
# thumbnail is made from the original) and review files, and writes only review files and
# contributed images; raw/, processed/ and MLflow's artifacts are out of its reach. SeaweedFS
# matches a trailing `*` as a key prefix; its `Write` also allows deleting under that prefix.
SERVING_S3_GRANTS = (("List", RESULTS_ROOT), ("Read", RESULTS_ROOT), ("Read", INBOX_ROOT), ("Read", REVIEWS_ROOT),
                     ("Write", REVIEWS_ROOT), ("Write", INBOX_ROOT))


def serving_s3_actions(bucket: str) -> list[str]:
    """SeaweedFS identity actions of serving: `Action:<bucket>/<prefix>/*` for each grant."""
    return [f"{action}:{bucket}/{root}/*" for action, root in SERVING_S3_GRANTS]


# Columns of predictions.csv, in order; per-class probabilities follow as `p_<label>`.
PREDICTION_COLUMNS = ("key", "sha256", "label", "confidence", "in_scope", "rank", "error")


class InvalidBatchId(ValueError):
    """A batch id that is not safe as an S3 key segment and URL path segment."""


def check_batch_id(batch_id: str) -> str:
    if not BATCH_ID_PATTERN.match(batch_id or ""):
        raise InvalidBatchId(
            f"batch id {batch_id!r} must be 1-64 characters of letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return batch_id


def inbox_prefix(dataset: str, batch_id: str | None = None) -> str:
    """`inbox/<dataset>/` or `inbox/<dataset>/<batch_id>/`: where a batch to score is uploaded."""
    base = f"{INBOX_ROOT}/{dataset}/"
    return base if batch_id is None else f"{base}{check_batch_id(batch_id)}/"


def results_prefix(dataset: str, batch_id: str, model_version: str | int) -> str:
    """`results/<dataset>/<batch_id>/<model_version>/`: one scoring of one batch by one model."""
    return f"{RESULTS_ROOT}/{dataset}/{check_batch_id(batch_id)}/{model_version}/"


def thumbnail_key(results: str, sha256: str) -> str:
    """`<results prefix>thumbnails/<sha256>.jpg`: the prepared image, small (one per distinct image)."""
    return f"{results}{THUMBNAILS_DIR}/{sha256}{PREVIEW_SUFFIX}"


def heatmap_key(results: str, sha256: str) -> str:
    """`<results prefix>heatmaps/<sha256>.jpg`: Grad-CAM of the predicted label over the prepared image."""
    return f"{results}{HEATMAPS_DIR}/{sha256}{PREVIEW_SUFFIX}"


def result_image_key(dataset: str, batch_id: str, model_version: str | int, kind: str, sha256: str) -> str:
    """`results/.../<kind>/<sha256>.jpg` with kind HEATMAPS_DIR or THUMBNAILS_DIR: one picture per scored image,
    named by content so the review page finds it from the predictions.csv row."""
    if kind not in (HEATMAPS_DIR, THUMBNAILS_DIR) or not re.fullmatch(r"[0-9a-f]{64}", sha256 or ""):
        raise ValueError(f"no result image {kind!r} for {sha256!r}")
    return f"{results_prefix(dataset, batch_id, model_version)}{kind}/{sha256}{PREVIEW_SUFFIX}"


# Reviewed images that feedback copies into raw/ are named `reviewed-<batch_id>-<sha256 prefix><ext>`,
# so ingest counts them from the listing alone (their provenance is in the objects' metadata).
REVIEWED_NAME_PREFIX = "reviewed-"


def is_reviewed_key(key: str) -> bool:
    """Whether a raw/ key is a reviewed image joined by feedback (screening.feedback)."""
    return key.rsplit("/", 1)[-1].startswith(REVIEWED_NAME_PREFIX)


def review_key(dataset: str, batch_id: str) -> str:
    """`reviews/<dataset>/<batch_id>.jsonl`: append-only reviewer decisions for a batch."""
    return f"{REVIEWS_ROOT}/{dataset}/{check_batch_id(batch_id)}.jsonl"


@dataclass(frozen=True)
class ReviewDecision:
    """One reviewer decision on one scored image (a line of the batch's review file)."""

    review_id: str  # uuid4 hex
    dataset: str
    batch_id: str
    image_key: str  # the inbox key of the image
    sha256: str
    model_version: str
    predicted_label: str
    reviewed_label: str  # equal to predicted_label when the reviewer confirms
    reviewer: str
    reviewed_at: str  # ISO 8601 UTC
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def confirmed(self) -> bool:
        return self.reviewed_label == self.predicted_label

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ReviewDecision":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
