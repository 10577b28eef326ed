"""The one JSON error shape, `{"error": code, "detail": words}`, and the handlers that produce it.

Handlers also tag the request scope with the error code, so the metrics middleware counts
errors by what went wrong (`not_an_image`, `too_large`, ...) rather than by status alone.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from serving.metrics import ERROR_SCOPE_KEY
from serving.upload import UploadError

log = logging.getLogger("serving")


class ApiError(Exception):
    """A request the API refuses: its status, machine-readable code and words for the client."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


def error_response(status: int, code: str, detail: str) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status)


async def _refused(request: Request, exc: ApiError | UploadError) -> JSONResponse:
    request.scope[ERROR_SCOPE_KEY] = exc.code
    return error_response(exc.status, exc.code, exc.detail)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error on %s", request.url.path)
    request.scope[ERROR_SCOPE_KEY] = "internal"
    return error_response(500, "internal", "unexpected server error (logged)")


def install_error_handlers(app: FastAPI) -> None:
    """API and upload refusals keep their 4xx/503; anything else is a logged 500 with no details."""
    app.add_exception_handler(ApiError, _refused)
    app.add_exception_handler(UploadError, _refused)
    app.add_exception_handler(Exception, _unexpected)
