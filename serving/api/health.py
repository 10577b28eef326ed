"""GET /healthz, /readyz and /metrics: for the orchestrator and Prometheus, never behind an API key."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from serving import schemas
from serving.deps import ManagerDep, MetricsDep

router = APIRouter(tags=["ops"])


@router.get("/healthz", response_model=schemas.Health)
async def healthz():
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/readyz", response_model=schemas.Readiness, responses={503: {"model": schemas.Readiness}})
async def readyz(manager: ManagerDep):
    """Readiness: a model is loaded (stays true while MLflow or S3 is down)."""
    model = manager.current
    body = schemas.Readiness(ready=model is not None, model_version=model.identity.version if model else None,
                             source=manager.source, last_error=manager.last_error, last_check_at=manager.last_check_at)
    return JSONResponse(body.model_dump(), status_code=200 if model is not None else 503)


@router.get("/metrics", include_in_schema=False)
async def prometheus_metrics(metrics: MetricsDep):
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
