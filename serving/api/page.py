"""The lab users' web page: `/` and its static files, all served locally (no CDN)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

router = APIRouter(include_in_schema=False)


@router.get("/")
async def index():
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html")


def mount_static(app: FastAPI) -> None:
    """A mount, not a route: `include_router` does not carry mounts, so the app mounts it itself."""
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
