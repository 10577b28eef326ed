"""The serving API and web page: `create_app(settings=None)` is the uvicorn app factory.

The app is assembled from parts: routers (serving.api), dependencies (serving.deps), error
handlers (serving.errors) and the metrics middleware. The model is loaded in the lifespan (from
SERVING_BUNDLE_PATH, or the registry's @champion, then followed by a poller). Uploaded images
live only in memory and are never logged; every bad input is answered with a 4xx JSON error.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from contracts.settings import Settings, get_settings
from serving.api import page
from serving.api.main import api_router
from serving.errors import install_error_handlers
from serving.inference import Inference
from serving.manager import ModelManager
from serving.metrics import MetricsMiddleware, ServingMetrics

log = logging.getLogger("serving")


@asynccontextmanager
async def lifespan(app: FastAPI):
    """Build the model manager and the inference engine, load a model, poll; stop both on exit."""
    settings, metrics = app.state.settings, app.state.metrics
    manager = app.state.manager = ModelManager(settings, metrics)
    inference = app.state.inference = Inference(settings, metrics)
    await inference.start()
    result = await asyncio.to_thread(manager.reload, trigger="startup")
    if not result.ok:
        log.warning("no model at start-up (%s); %s", result.reason,
                    "polling the registry" if manager.source == "registry" else "use POST /v1/admin/reload")
    manager.start_polling()
    # Everything alive now (modules, app, model) lives as long as the server: keep it out of the
    # cyclic collector's full passes, which otherwise took ~20% of the event loop's time under load.
    gc.freeze()
    try:
        yield
    finally:
        manager.stop()
        await inference.stop()


def create_app(settings: Settings | None = None) -> FastAPI:
    from contracts.credentials import check_component

    s = settings or get_settings()
    check_component("serving", s)  # guessable API keys or MLflow password: refuse to start
    app = FastAPI(
        title="HemaFlow serving",
        version="1",
        summary="Blood-smear screening model: predictions, Grad-CAM explanations and model status.",
        description="Screening aid, not a diagnosis. Images are processed in memory only and never stored.",
        lifespan=lifespan,
    )
    app.state.settings = s
    app.state.metrics = metrics = ServingMetrics()  # before the lifespan: the middleware counts every request
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    install_error_handlers(app)
    app.include_router(api_router)
    page.mount_static(app)
    return app
