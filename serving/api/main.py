"""All routers in one `api_router`, in the order their routes appear in the OpenAPI document."""

from __future__ import annotations

from fastapi import APIRouter

from serving.api import admin, batches, contributions, health, model, page, predict

api_router = APIRouter()
for _module in (predict, model, admin, health, page, batches, contributions):
    api_router.include_router(_module.router)
api_router.include_router(batches.page_router)
