"""POST /v1/predict, /v1/explain and /v1/predict/batch: uploads in, predictions out.

Uploads are read into memory by `serving.upload` (never a temporary file, never logged); each
request reads the current model once, so it finishes on that model even across a hot swap.
"""

from __future__ import annotations

import time
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, Query, Request, Response

from serving import schemas
from serving.deps import InferenceDep, ManagerDep, SettingsDep, current_model, require_predict_key
from serving.errors import ApiError
from serving.inference import crop_policy
from serving.manager import monotonic_ms
from serving.upload import read_files

BINARY = {"type": "string", "format": "binary"}


def _upload_body(file_field: dict, raw_image: bool) -> dict:
    """OpenAPI request body of an upload route: the body is read by serving.upload, not by FastAPI,
    so the docs describe it by hand (multipart field `file`; optionally a raw image body)."""
    multipart = {"type": "object", "required": ["file"], "properties": {"file": file_field}}
    content = {"multipart/form-data": {"schema": multipart}} | ({"image/*": {"schema": BINARY}} if raw_image else {})
    return {"requestBody": {"required": True, "content": content}}


MULTIPART_BODY = _upload_body({**BINARY, "description": "JPEG/PNG/TIFF/BMP"}, raw_image=True)
MULTIPART_BATCH_BODY = _upload_body({"type": "array", "items": BINARY,
                                     "description": "Repeat the field once per image (SERVING_MAX_BATCH at most)"},
                                    raw_image=False)

router = APIRouter(prefix="/v1", tags=["predict"], dependencies=[Depends(require_predict_key)],
                   responses=schemas.ERROR_RESPONSES)


async def _predict_one(request: Request, settings: SettingsDep, manager: ManagerDep, inference: InferenceDep,
                       explain: bool) -> Response:
    start = time.perf_counter()
    model = current_model(manager)
    (upload,) = await read_files(request, max_file_bytes=settings.serving_max_upload_bytes, max_files=1)
    prediction = await inference.answer(model, upload, settings, explain, start)
    # Already a validated schemas.Prediction: serialise it once, not again through response_model.
    return Response(prediction.model_dump_json(), media_type="application/json")


@router.post("/predict", response_model=schemas.Prediction, openapi_extra=MULTIPART_BODY)
async def predict(request: Request, settings: SettingsDep, manager: ManagerDep, inference: InferenceDep,
                  explain: Annotated[bool, Query(description="Add a Grad-CAM overlay")] = False):
    """Classify one image (multipart field `file`, or a raw image body).

    An image the model's out-of-scope detector flags (not a blood smear like those it was trained
    on: flat, noise, text, another modality) is answered 200 with `in_scope: false`, a
    `refusal_reason` and no label, probabilities or clinical context (SERVING_REFUSE_OUT_OF_SCOPE)."""
    return await _predict_one(request, settings, manager, inference, explain)


@router.post("/explain", response_model=schemas.Prediction, openapi_extra=MULTIPART_BODY)
async def explain(request: Request, settings: SettingsDep, manager: ManagerDep, inference: InferenceDep):
    """Same as /v1/predict?explain=true: the prediction plus its Grad-CAM overlay."""
    return await _predict_one(request, settings, manager, inference, True)


@router.post("/predict/batch", response_model=schemas.BatchPrediction, openapi_extra=MULTIPART_BATCH_BODY)
async def predict_batch(request: Request, settings: SettingsDep, manager: ManagerDep, inference: InferenceDep):
    """Classify up to SERVING_MAX_BATCH images; a bad file gets an error entry, the rest are answered
    (an out-of-scope image: `in_scope: false` and no label, as on /v1/predict)."""
    start = time.perf_counter()
    model = current_model(manager)
    uploads = await read_files(request, max_file_bytes=settings.serving_max_upload_bytes,
                               max_files=settings.serving_max_batch)
    prepared: list[np.ndarray | ApiError] = []
    for upload in uploads:
        try:
            prepared.append(await inference.prepare(upload, model.image_size, settings, crop_policy(model)))
        except ApiError as exc:
            prepared.append(exc)
    good = [p for p in prepared if isinstance(p, np.ndarray)]
    outputs = iter(await inference.predict(model, np.stack(good)) if good else [])
    results: list[schemas.Prediction | schemas.BatchItemError] = []
    for upload, item in zip(uploads, prepared, strict=True):
        if isinstance(item, ApiError):
            results.append(schemas.BatchItemError(filename=upload.filename, error=item.code, detail=item.detail))
        else:
            results.append(inference.result(model, upload, item, next(outputs), False, start))
    return schemas.BatchPrediction(results=results, model=schemas.model_ref(model), processing_ms=monotonic_ms(start))
