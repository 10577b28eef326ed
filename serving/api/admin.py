"""POST /v1/admin/reload: pick up a new champion now instead of at the next poll (admin keys only)."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse

from serving import schemas
from serving.deps import ManagerDep, require_admin

router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(require_admin)])


@router.post("/reload", response_model=schemas.ReloadResponse,
             responses={401: schemas.ERROR_RESPONSES[401], 403: schemas.ERROR_RESPONSES[403],
                        409: {"model": schemas.ReloadResponse}})
async def admin_reload(manager: ManagerDep,
                       force: Annotated[bool, Query(description="Reload even if the version is unchanged")] = False):
    """Re-read the bundle source now; a bundle that fails its checks is refused (409) and the old model stays."""
    result = await asyncio.to_thread(manager.reload, force=force, trigger="admin")
    body = schemas.ReloadResponse(changed=result.changed, ok=result.ok, version=result.version, reason=result.reason)
    return JSONResponse(body.model_dump(), status_code=200 if result.ok else 409)
