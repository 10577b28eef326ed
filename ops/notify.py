"""Tell the serving container that the registry's @champion moved.

Serving also polls the registry (SERVING_POLL_INTERVAL_S), so a notification is a
shortcut, not a requirement: when serving is not running or not configured this logs why
and returns, and the pipeline carries on.
"""

from __future__ import annotations

import logging

import httpx

from contracts.settings import Settings, get_settings

log = logging.getLogger(__name__)

RELOAD_PATH = "/v1/admin/reload"
NOTIFY_TIMEOUT_S = 120.0  # a reload downloads and canary-checks the bundle


def notify_serving(settings: Settings | None = None) -> dict:
    """POST {SERVING_URL}/v1/admin/reload with the first admin key; never raises on a down server.

    Returns {notified: bool, url, status (HTTP code or None), detail}.
    """
    s = settings or get_settings()
    url = s.serving_url.rstrip("/") + RELOAD_PATH
    keys = s.key_list(s.serving_admin_api_keys)
    if not keys:
        detail = "SERVING_ADMIN_API_KEYS is empty; serving will pick the new champion up by polling"
        log.warning("serving not notified: %s", detail)
        return {"notified": False, "url": url, "status": None, "detail": detail}
    try:
        resp = httpx.post(url, headers={"X-API-Key": keys[0]}, timeout=NOTIFY_TIMEOUT_S)
    except httpx.HTTPError as exc:
        detail = f"serving unreachable at {url} ({type(exc).__name__}); it will pick the champion up by polling"
        log.warning("serving not notified: %s", detail)
        return {"notified": False, "url": url, "status": None, "detail": detail}
    body = resp.text[:500]
    if resp.is_success:
        log.info("serving reloaded: HTTP %s %s", resp.status_code, body)
        return {"notified": True, "url": url, "status": resp.status_code, "detail": body}
    # A refused reload (e.g. canary mismatch) keeps the old model serving: report it loudly.
    log.error("serving refused the reload: HTTP %s %s", resp.status_code, body)
    return {"notified": False, "url": url, "status": resp.status_code, "detail": body}
