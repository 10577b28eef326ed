"""FastAPI dependencies: settings, model manager, inference engine, metrics and API-key auth.

Dependencies are `async def` although they do not await: FastAPI runs a plain `def` dependency
in a worker thread, which cost a prediction 8 thread hand-offs (about 1 ms of a ~4 ms request).

Routers take everything they need through `Depends`, never from a closure or a global, so a
test (or another deployment) can swap any of them with `app.dependency_overrides[...]`. The
objects themselves are built once per app: settings and metrics in `create_app`, the manager
and the inference engine in the lifespan (serving.app), and kept on `app.state`.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from contracts.settings import Settings
from serving.bundle import LoadedModel
from serving.errors import ApiError
from serving.inference import Inference
from serving.manager import ModelManager
from serving.metrics import ServingMetrics

API_KEY_HEADER = "X-API-Key"


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_manager(request: Request) -> ModelManager:
    """The model manager, caught up with the other workers' last swap (SERVING_WORKERS > 1)."""
    manager = request.app.state.manager
    await manager.catch_up()
    return manager


async def get_inference(request: Request) -> Inference:
    return request.app.state.inference


async def get_metrics(request: Request) -> ServingMetrics:
    return request.app.state.metrics


SettingsDep = Annotated[Settings, Depends(get_settings)]
ManagerDep = Annotated[ModelManager, Depends(get_manager)]
InferenceDep = Annotated[Inference, Depends(get_inference)]
MetricsDep = Annotated[ServingMetrics, Depends(get_metrics)]


def current_model(manager: ModelManager) -> LoadedModel:
    """The model a request runs on, read once: it finishes on this model even across a hot swap.

    Called in the handler body, not as a dependency, so query validation (422) and the upload's
    own errors keep their order relative to "no model yet" (503).
    """
    model = manager.current
    if model is None:
        raise ApiError(503, "no_model", "no model is loaded yet; see /readyz")
    return model


def key_matches(given: str, keys: list[str]) -> bool:
    """Constant-time comparison against every configured key (no early exit)."""
    given_b = given.encode()
    found = False
    for key in keys:
        found |= hmac.compare_digest(given_b, key.encode())
    return found


def _check_key(request: Request, keys: list[str], what: str) -> None:
    given = request.headers.get(API_KEY_HEADER)
    if not given:
        raise ApiError(401, "api_key_missing", f"{what} needs the {API_KEY_HEADER} header")
    if not keys or not key_matches(given, keys):
        raise ApiError(403, "api_key_invalid", f"the {API_KEY_HEADER} is not valid for {what}")


async def require_admin(request: Request, settings: SettingsDep) -> None:
    """Admin keys only; with none configured the admin endpoints refuse every key (403)."""
    _check_key(request, settings.key_list(settings.serving_admin_api_keys), "admin endpoints")


async def require_predict_key(request: Request, settings: SettingsDep) -> None:
    """Open unless SERVING_REQUIRE_API_KEY; then a prediction key or an admin key."""
    if settings.serving_require_api_key:
        keys = settings.key_list(settings.serving_api_keys) + settings.key_list(settings.serving_admin_api_keys)
        _check_key(request, keys, "prediction")


# --- the review queue (batch screening): reviewer keys and the S3 store -------------------------
def reviewer_keys(settings: Settings) -> dict[str, str]:
    """key -> reviewer id from SERVING_REVIEWER_API_KEYS (`name:key` entries, or bare keys whose id is
    `key-` + the first 8 hex digits of their sha256, so the stored id never reveals the key)."""
    import hashlib

    out = {}
    for entry in settings.key_list(settings.serving_reviewer_api_keys):
        name, _, key = entry.rpartition(":")
        out[key] = name or "key-" + hashlib.sha256(key.encode()).hexdigest()[:8]
    return out


def require_reviewer(request: Request, settings: SettingsDep) -> str:
    """The reviewer id behind the request's key; other roles' keys get 403 (reviewing is its own role)."""
    keys = reviewer_keys(settings)
    _check_key(request, list(keys), "the review queue")
    given = request.headers[API_KEY_HEADER].encode()
    return next(rid for key, rid in keys.items() if hmac.compare_digest(given, key.encode()))


def get_screening_store(request: Request):
    """The app's ScreeningStore, made on first use (its S3 client is only built when reviewing)."""
    from serving.review_queue import ScreeningStore

    store = getattr(request.app.state, "screening_store", None)
    if store is None:
        store = request.app.state.screening_store = ScreeningStore(request.app.state.settings)
    if not store.configured:
        raise ApiError(503, "screening_unavailable", "the review queue needs serving's S3 identity (SERVING_S3_SECRET_ACCESS_KEY)")
    return store


ReviewerDep = Annotated[str, Depends(require_reviewer)]
