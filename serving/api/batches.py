"""The review queue: `/batches` pages and the `/v1/batches...` JSON API (reviewer keys only).

Scored batches of the served dataset (`DATASET`) are read from S3 (results/), ranked most suspicious
first; a reviewer confirms or corrects each label and the decision is appended to
`reviews/<dataset>/<batch_id>.jsonl` (contracts.reviews). Every route needs a key of the reviewer
role (SERVING_REVIEWER_API_KEYS), sent by the page in the X-API-Key header; results are lab data.
"""

from __future__ import annotations

import asyncio
import io
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, Field

from contracts.screening import (
    HEATMAPS_DIR,
    THUMBNAILS_DIR,
    InvalidBatchId,
    check_batch_id,
    result_image_key,
)
from serving import schemas
from serving.api.page import STATIC_DIR
from serving.deps import ManagerDep, ReviewerDep, SettingsDep, get_screening_store
from serving.errors import ApiError
from serving.s3 import S3Error

THUMBNAIL_SIDE = 192
ERRORS = {**schemas.ERROR_RESPONSES, 400: {"model": schemas.ErrorBody, "description": "Bad batch id"},
          404: {"model": schemas.ErrorBody, "description": "No such batch, image or model version"}}

router = APIRouter(prefix="/v1/batches", tags=["batches"], responses=ERRORS)
page_router = APIRouter(include_in_schema=False)
StoreDep = Annotated[Any, Depends(get_screening_store)]
BatchId = Annotated[str, Path(description="Batch id (letters, digits, '.', '_', '-')")]
Sha256 = Annotated[str, Path(pattern=r"^[0-9a-f]{64}$")]
Version = Annotated[str | None, Query(pattern=r"^[A-Za-z0-9._-]{1,64}$", description="Model version (newest)")]


class ReviewRequest(BaseModel):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="The reviewed image (its predictions.csv sha256)")
    reviewed_label: str = Field(description="The predicted label to confirm it, another label to correct it")
    model_version: str | None = Field(None, description="The scoring reviewed (default: the newest)")


async def store_call(fn, *args):
    """A blocking store call in a thread, its failures as API errors (never a 500 for S3 trouble)."""
    from serving.review_queue import BatchNotFound

    try:
        return await asyncio.to_thread(fn, *args)
    except InvalidBatchId as exc:
        raise ApiError(400, "bad_batch_id", str(exc)) from None
    except BatchNotFound as exc:
        raise ApiError(404, "batch_not_found", str(exc)) from None
    except S3Error as exc:
        raise ApiError(503, "storage_unavailable", f"S3 refused the request: {exc.response['Error']['Code']}") from None
    except ApiError:
        raise
    except Exception as exc:
        if isinstance(exc, OSError):  # unreachable S3 or a timeout (urllib's errors are OSErrors)
            raise ApiError(503, "storage_unavailable", f"S3 did not answer: {type(exc).__name__}") from None
        raise


def _batch_id(batch_id: str) -> str:
    try:
        return check_batch_id(batch_id)
    except InvalidBatchId as exc:
        raise ApiError(400, "bad_batch_id", str(exc)) from None


def _positive_label(manager) -> str | None:
    model = manager.current
    return model.positive_label if model is not None else None


@router.get("")
async def list_batches(settings: SettingsDep, store: StoreDep, reviewer: ReviewerDep):
    """Scored batches of the served dataset, each with its newest scoring and how many images are reviewed."""
    return {"dataset": settings.dataset, "reviewer": reviewer,
            "batches": await store_call(store.list_batches, settings.dataset)}


@router.get("/{batch_id}")
async def get_batch(batch_id: BatchId, settings: SettingsDep, manager: ManagerDep, store: StoreDep,
                    reviewer: ReviewerDep, version: Version = None):
    """A scoring's images in review order, each with its latest review; refused images apart."""
    batch = await store_call(store.load_batch, settings.dataset, _batch_id(batch_id), version, _positive_label(manager))
    return {"dataset": batch.dataset, "batch_id": batch.batch_id, "model_version": batch.model_version,
            "versions": batch.versions, "labels": batch.labels, "summary": batch.summary, "reviewer": reviewer,
            "items": batch.items, "refused": batch.refused}


@router.get("/{batch_id}/images/{sha256}/{kind}", response_class=Response,
            responses={200: {"content": {"image/jpeg": {}, "image/png": {}}}})
async def batch_image(batch_id: BatchId, sha256: Sha256, kind: Literal["thumbnail", "heatmap"], settings: SettingsDep,
                      manager: ManagerDep, store: StoreDep, reviewer: ReviewerDep, version: Version = None):
    """The scorer's thumbnail or Grad-CAM heatmap of one image (JPEG; PNG when made here); a missing thumbnail is made from the image.
    The page passes `version`, so a picture costs one S3 read."""
    batch_id = _batch_id(batch_id)
    versions = [version] if version else (await store_call(store.versions, settings.dataset, batch_id))[:1]
    if not versions:
        raise ApiError(404, "batch_not_found", f"batch {batch_id!r} of {settings.dataset!r} has no scoring")
    folder = HEATMAPS_DIR if kind == "heatmap" else THUMBNAILS_DIR
    data = await store_call(store.get_object, result_image_key(settings.dataset, batch_id, versions[0], folder, sha256))
    if data is None and kind == "thumbnail":
        batch = await store_call(store.load_batch, settings.dataset, batch_id, versions[0], _positive_label(manager))
        row = batch.item(sha256)
        original = row and await store_call(store.get_object, row["key"])
        data = original and await asyncio.to_thread(_thumbnail, original, settings.max_image_pixels)
    if not data:
        raise ApiError(404, "image_not_found", f"no {kind} for {sha256[:12]}... in batch {batch_id}")
    media_type = "image/jpeg" if data[:2] == b"\xff\xd8" else "image/png"  # the scorer writes JPEG previews
    return Response(data, media_type=media_type, headers={"Cache-Control": "private, max-age=300"})


def _thumbnail(data: bytes, max_pixels: int) -> bytes | None:
    """A small PNG of a stored image, refusing decompression bombs from the header (None if unreadable)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > max_pixels:
                return None
            img.draft("RGB", (THUMBNAIL_SIDE, THUMBNAIL_SIDE))
            thumb = img.convert("RGB")
            thumb.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return None
    out = io.BytesIO()
    thumb.save(out, "PNG")
    return out.getvalue()


@router.get("/{batch_id}/reviews")
async def batch_reviews(batch_id: BatchId, settings: SettingsDep, store: StoreDep, reviewer: ReviewerDep):
    """Every decision on the batch, oldest first (the file as stored, append-only)."""
    from contracts.reviews import read_decisions

    decisions = await store_call(read_decisions, store.client, store.bucket, settings.dataset, _batch_id(batch_id))
    return {"batch_id": batch_id, "decisions": [d.to_dict() for d in decisions]}


@router.post("/{batch_id}/reviews", status_code=201)
async def post_review(batch_id: BatchId, body: ReviewRequest, settings: SettingsDep, manager: ManagerDep,
                      store: StoreDep, reviewer: ReviewerDep):
    """Confirm or correct one image's label; the decision (reviewer, time, model version) is appended."""
    from contracts.reviews import append_decisions, new_decision

    batch = await store_call(store.load_batch, settings.dataset, _batch_id(batch_id), body.model_version,
                      _positive_label(manager))
    row = batch.item(body.sha256)
    if row is None:
        raise ApiError(404, "image_not_found", f"no scored image {body.sha256[:12]}... in batch {batch_id}")
    if body.reviewed_label not in batch.labels:
        raise ApiError(422, "unknown_label", f"{body.reviewed_label!r} is not one of {batch.labels}")
    decision = new_decision(dataset=batch.dataset, batch_id=batch.batch_id, image_key=row["key"],
                            sha256=row["sha256"], model_version=batch.model_version, predicted_label=row["label"],
                            reviewed_label=body.reviewed_label, reviewer=reviewer)
    await store_call(append_decisions, store.client, store.bucket, [decision])
    return JSONResponse(decision.to_dict(), status_code=201)


@page_router.get("/batches")
@page_router.get("/batches/{batch_id}")
async def batches_page():
    """One page for the list and a batch: it reads the batch id from its URL."""
    return FileResponse(STATIC_DIR / "batches.html", media_type="text/html")
