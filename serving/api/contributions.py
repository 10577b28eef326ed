"""POST /v1/contributions: a reviewer explicitly contributes one image with a label (off by default).

The single-image `/v1/predict` path stores nothing. Only this route, called by the page's
"contribute this image with this label" action (shown to reviewers only, unticked by default),
stores an upload: into `inbox/<dataset>/contributed-<UTC date>/` with a reviewer decision in that
day's review file, so feedback (screening.feedback) copies it into raw/ like any reviewed image.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from contracts.common import sha256_hex
from contracts.imaging import read_header
from contracts.screening import inbox_prefix
from serving.api.batches import ERRORS, StoreDep, store_call
from serving.deps import InferenceDep, ManagerDep, ReviewerDep, SettingsDep, current_model
from serving.errors import ApiError
from serving.upload import read_files

CONTRIBUTED_BATCH_PREFIX = "contributed-"
EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "TIFF": ".tif", "BMP": ".bmp"}

router = APIRouter(prefix="/v1", tags=["batches"], responses=ERRORS)


@router.post("/contributions", status_code=201, openapi_extra={"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                       "properties": {"file": {"type": "string", "format": "binary"}}}}}}})
async def contribute(request: Request, settings: SettingsDep, manager: ManagerDep, inference: InferenceDep,
                     store: StoreDep, reviewer: ReviewerDep,
                     label: Annotated[str, Query(description="The label the reviewer gives the image")],
                     predicted_label: Annotated[str | None, Query(description="What the model said")] = None):
    """Store one image with a reviewer's label for retraining (checked like a prediction upload)."""
    from contracts.reviews import append_decisions, new_decision

    model = current_model(manager)
    if label not in model.labels:
        raise ApiError(422, "unknown_label", f"{label!r} is not one of {model.labels}")
    (upload,) = await read_files(request, max_file_bytes=settings.serving_max_upload_bytes, max_files=1)
    await inference.prepare(upload, model.image_size, settings)  # the same refusals as /v1/predict
    data = bytes(upload.data)
    fmt = (await asyncio.to_thread(read_header, data, settings.max_image_pixels)).format.upper()
    sha = sha256_hex(data)
    batch_id = CONTRIBUTED_BATCH_PREFIX + datetime.now(UTC).strftime("%Y%m%d")
    key = f"{inbox_prefix(settings.dataset, batch_id)}{sha[:16]}{EXTENSIONS.get(fmt, '.img')}"
    await store_call(store.put_object, key, data)
    decision = new_decision(dataset=settings.dataset, batch_id=batch_id, image_key=key, sha256=sha,
                            model_version=model.identity.version,
                            predicted_label=predicted_label if predicted_label in model.labels else "",
                            reviewed_label=label, reviewer=reviewer, source="contribution")
    await store_call(append_decisions, store.client, store.bucket, [decision])
    return JSONResponse(decision.to_dict(), status_code=201)

