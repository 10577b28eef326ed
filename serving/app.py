"""The serving API and web page: `create_app(settings=None)` is the uvicorn app factory.

The model is loaded in the lifespan (from SERVING_BUNDLE_PATH, or the registry's
@champion, then followed by a poller). Uploaded images live only in memory: they are read
by `serving.upload` (no temp files), decoded and preprocessed by the pipeline's own
`prepare_image`, and never logged. Every bad input is answered with a 4xx JSON error.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pipeline.imaging import ImageRejected, open_image, prepare_image, read_header
from pipeline.settings import Settings, get_settings
from serving import gradcam, schemas
from serving.batcher import MicroBatcher
from serving.bundle import LoadedModel
from serving.clinical import context_for
from serving.manager import ModelManager
from serving.metrics import ServingMetrics
from serving.upload import UploadedFile, UploadError, read_files

log = logging.getLogger("serving")
STATIC_DIR = Path(__file__).resolve().parent / "static"
API_KEY_HEADER = "X-API-Key"
DECODE_SLOTS = 2

# ImageRejected reasons that mean "not an image we can read" (415); the rest are 422.
UNSUPPORTED_REASONS = {"not_an_image", "unsupported_format"}

MULTIPART_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": {"type": "string", "format": "binary", "description": "JPEG/PNG/TIFF/BMP"}},
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
MULTIPART_BATCH_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "array", "items": {"type": "string", "format": "binary"},
                                 "description": "Repeat the field once per image (SERVING_MAX_BATCH at most)"}
                    },
                }
            }
        },
    }
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": schemas.ErrorBody, "description": "API key missing"},
    403: {"model": schemas.ErrorBody, "description": "API key wrong"},
    413: {"model": schemas.ErrorBody, "description": "Upload over SERVING_MAX_UPLOAD_BYTES (or too many files)"},
    415: {"model": schemas.ErrorBody, "description": "Not an image, or an unsupported format"},
    422: {"model": schemas.ErrorBody, "description": "Empty, truncated, corrupt, bomb or unusable image"},
    503: {"model": schemas.ErrorBody, "description": "No model loaded yet"},
}


class ApiError(Exception):
    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


def _error(status: int, code: str, detail: str) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status)


def _key_matches(given: str, keys: list[str]) -> bool:
    """Constant-time comparison against every configured key (no early exit)."""
    given_b = given.encode()
    found = False
    for key in keys:
        found |= hmac.compare_digest(given_b, key.encode())
    return found


class MetricsMiddleware:
    """Pure ASGI middleware: requests, errors and latency by route template and status."""

    def __init__(self, app, metrics: ServingMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or ("/static" if scope["path"].startswith("/static") else "unmatched")
            code = status["code"]
            self.metrics.requests.labels(route=path, method=scope["method"], status=str(code)).inc()
            self.metrics.latency.labels(route=path).observe(time.perf_counter() - start)
            if code >= 400:
                self.metrics.errors.labels(route=path, code=scope.get("hemaflow.error", str(code))).inc()


def create_app(settings: Settings | None = None) -> FastAPI:
    from pipeline.credentials import check_component

    s = settings or get_settings()
    check_component("serving", s)  # guessable API keys or MLflow password: refuse to start
    metrics = ServingMetrics()
    manager = ModelManager(s, metrics)
    batcher = MicroBatcher(s.serving_micro_batch, on_batch=lambda n: metrics.batch_size.observe(n))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        result = await asyncio.to_thread(manager.reload, trigger="startup")
        if not result.ok:
            log.warning("no model at start-up (%s); %s", result.reason,
                        "polling the registry" if manager.source == "registry" else "use POST /v1/admin/reload")
        manager.start_polling()
        try:
            yield
        finally:
            manager.stop()
            await batcher.stop()

    app = FastAPI(
        title="HemaFlow serving",
        version="1",
        summary="Blood-smear screening model: predictions, Grad-CAM explanations and model status.",
        description="Screening aid, not a diagnosis. Images are processed in memory only and never stored.",
        lifespan=lifespan,
    )
    app.state.settings = s
    app.state.manager = manager
    app.state.metrics = metrics
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        request.scope["hemaflow.error"] = exc.code
        return _error(exc.status, exc.code, exc.detail)

    @app.exception_handler(UploadError)
    async def _upload_error(request: Request, exc: UploadError) -> JSONResponse:
        request.scope["hemaflow.error"] = exc.code
        return _error(exc.status, exc.code, exc.detail)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        request.scope["hemaflow.error"] = "internal"
        return _error(500, "internal", "unexpected server error (logged)")

    # --- auth -------------------------------------------------------------------------------
    def _check_key(request: Request, keys: list[str], what: str) -> None:
        given = request.headers.get(API_KEY_HEADER)
        if not given:
            raise ApiError(401, "api_key_missing", f"{what} needs the {API_KEY_HEADER} header")
        if not keys or not _key_matches(given, keys):
            raise ApiError(403, "api_key_invalid", f"the {API_KEY_HEADER} is not valid for {what}")

    def require_admin(request: Request) -> None:
        _check_key(request, s.key_list(s.serving_admin_api_keys), "admin endpoints")

    def require_predict_key(request: Request) -> None:
        if s.serving_require_api_key:
            _check_key(request, s.key_list(s.serving_api_keys) + s.key_list(s.serving_admin_api_keys), "prediction")

    def current_model() -> LoadedModel:
        model = manager.current
        if model is None:
            raise ApiError(503, "no_model", "no model is loaded yet; see /readyz")
        return model

    # --- inference helpers -------------------------------------------------------------------
    def _prepare(data: bytes, size: int) -> np.ndarray:
        # Format and sides from the header: nothing is decoded for an image that will be refused.
        head = read_header(data, s.max_image_pixels)
        fmt = head.format.upper()
        if fmt not in s.allowed_format_set:
            raise ImageRejected("unsupported_format", f"{fmt or 'this'} format is not accepted; use "
                                + ", ".join(sorted(s.allowed_format_set)))
        if min(head.width, head.height) < s.min_image_side or max(head.width, head.height) > s.max_image_side:
            raise ImageRejected("bad_dimensions", f"{head.width}x{head.height}: sides must be between "
                                f"{s.min_image_side} and {s.max_image_side} pixels")
        return prepare_image(open_image(data, s.max_image_pixels), size)

    # At most this many images are decoded at once, so concurrent uploads cannot multiply the
    # per-image peak (a 40 Mpx image is ~200 MB while it is decoded) without bound.
    decode_slots = asyncio.Semaphore(DECODE_SLOTS)

    async def _prepare_async(upload: UploadedFile, size: int) -> np.ndarray:
        try:
            async with decode_slots:
                return await asyncio.to_thread(_prepare, bytes(upload.data), size)
        except ImageRejected as exc:
            status = 415 if exc.reason in UNSUPPORTED_REASONS else 422
            raise ApiError(status, exc.reason, exc.detail) from None

    def _result(model: LoadedModel, upload: UploadedFile, image: np.ndarray, probs: np.ndarray,
                cmap: np.ndarray, explain: bool, start: float) -> schemas.Prediction:
        label, confidence = model.decide(probs)
        metrics.predictions.labels(version=model.identity.version, label=label).inc()
        explanation = None
        if explain:
            idx = model.labels.index(label)
            explanation = schemas.Explanation(
                label=label,
                image_size=model.image_size,
                overlay_png_base64=gradcam.png_base64(gradcam.overlay(image, cmap[..., idx])),
                input_png_base64=gradcam.png_base64(image),
            )
        return schemas.Prediction(
            filename=upload.filename,
            label=label,
            task_label=label,
            confidence=round(confidence, 6),
            probabilities={lab: round(float(p), 6) for lab, p in zip(model.labels, probs, strict=True)},
            threshold=model.threshold if model.task == "binary" else None,
            positive_label=model.positive_label if model.task == "binary" else None,
            model=_model_ref(model),
            processing_ms=round((time.perf_counter() - start) * 1000.0, 2),
            clinical=schemas.ClinicalContext(**context_for(label)),
            explanation=explanation,
        )

    async def _predict_one(request: Request, explain: bool) -> schemas.Prediction:
        start = time.perf_counter()
        model = current_model()  # this request finishes on this model, even across a swap
        (upload,) = await read_files(request, max_file_bytes=s.serving_max_upload_bytes, max_files=1)
        image = await _prepare_async(upload, model.image_size)
        ((probs, cmap),) = await batcher.predict(model, image[None])
        if explain:
            return await asyncio.to_thread(_result, model, upload, image, probs, cmap, True, start)
        return _result(model, upload, image, probs, cmap, False, start)

    # --- routes ----------------------------------------------------------------------------
    @app.post("/v1/predict", response_model=schemas.Prediction, responses=ERROR_RESPONSES,
              openapi_extra=MULTIPART_BODY, dependencies=[Depends(require_predict_key)], tags=["predict"])
    async def predict(request: Request, explain: Annotated[bool, Query(description="Add a Grad-CAM overlay")] = False):
        """Classify one image (multipart field `file`, or a raw image body)."""
        return await _predict_one(request, explain)

    @app.post("/v1/explain", response_model=schemas.Prediction, responses=ERROR_RESPONSES,
              openapi_extra=MULTIPART_BODY, dependencies=[Depends(require_predict_key)], tags=["predict"])
    async def explain(request: Request):
        """Same as /v1/predict?explain=true: the prediction plus its Grad-CAM overlay."""
        return await _predict_one(request, True)

    @app.post("/v1/predict/batch", response_model=schemas.BatchPrediction, responses=ERROR_RESPONSES,
              openapi_extra=MULTIPART_BATCH_BODY, dependencies=[Depends(require_predict_key)], tags=["predict"])
    async def predict_batch(request: Request):
        """Classify up to SERVING_MAX_BATCH images; a bad file gets an error entry, the rest are answered."""
        start = time.perf_counter()
        model = current_model()
        uploads = await read_files(request, max_file_bytes=s.serving_max_upload_bytes, max_files=s.serving_max_batch)
        prepared: list[np.ndarray | ApiError] = []
        for upload in uploads:
            try:
                prepared.append(await _prepare_async(upload, model.image_size))
            except ApiError as exc:
                prepared.append(exc)
        good = [p for p in prepared if isinstance(p, np.ndarray)]
        outputs = iter(await batcher.predict(model, np.stack(good)) if good else [])
        results: list[schemas.Prediction | schemas.BatchItemError] = []
        for upload, item in zip(uploads, prepared, strict=True):
            if isinstance(item, ApiError):
                results.append(schemas.BatchItemError(filename=upload.filename, error=item.code, detail=item.detail))
            else:
                probs, cmap = next(outputs)
                results.append(_result(model, upload, item, probs, cmap, False, start))
        return schemas.BatchPrediction(results=results, model=_model_ref(model),
                                       processing_ms=round((time.perf_counter() - start) * 1000.0, 2))

    @app.get("/v1/model", response_model=schemas.ModelInfo, responses={503: ERROR_RESPONSES[503]}, tags=["model"])
    async def model_info():
        """The model being served: version, dataset version, test metrics, promotion time."""
        model = current_model()
        meta = model.meta
        return schemas.ModelInfo(
            model=_model_ref(model),
            source=model.identity.source,
            labels=model.labels,
            task=model.task,
            positive_label=model.positive_label,
            threshold=model.threshold,
            image_size=model.image_size,
            metrics=dict(meta.get("metrics") or {}),
            dataset=meta.get("dataset"),
            promoted_at=model.identity.promoted_at,
            loaded_at=manager.loaded_at,
            created_at=meta.get("created_at"),
            git_commit=meta.get("git_commit"),
            signed_by=model.identity.signed_by,
            clinical={lab: schemas.ClinicalContext(**context_for(lab)) for lab in model.labels},
        )

    @app.post("/v1/admin/reload", response_model=schemas.ReloadResponse, dependencies=[Depends(require_admin)],
              responses={401: ERROR_RESPONSES[401], 403: ERROR_RESPONSES[403], 409: {"model": schemas.ReloadResponse}},
              tags=["admin"])
    async def admin_reload(force: Annotated[bool, Query(description="Reload even if the version is unchanged")] = False):
        """Re-read the bundle source now; a bundle that fails its checks is refused (409) and the old model stays."""
        result = await asyncio.to_thread(manager.reload, force=force, trigger="admin")
        body = schemas.ReloadResponse(changed=result.changed, ok=result.ok, version=result.version,
                                      reason=result.reason)
        return JSONResponse(body.model_dump(), status_code=200 if result.ok else 409)

    @app.get("/healthz", response_model=schemas.Health, tags=["ops"])
    async def healthz():
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", response_model=schemas.Readiness, responses={503: {"model": schemas.Readiness}}, tags=["ops"])
    async def readyz():
        """Readiness: a model is loaded (stays true while MLflow or S3 is down)."""
        model = manager.current
        body = schemas.Readiness(ready=model is not None, model_version=model.identity.version if model else None,
                                 source=manager.source, last_error=manager.last_error,
                                 last_check_at=manager.last_check_at)
        return JSONResponse(body.model_dump(), status_code=200 if model is not None else 503)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def _model_ref(model: LoadedModel) -> schemas.ModelRef:
    i = model.identity
    return schemas.ModelRef(name=i.name, version=i.version, dataset_version=i.dataset_version, run_id=i.run_id)
