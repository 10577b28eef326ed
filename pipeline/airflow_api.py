"""Tell Airflow that a dataset's raw images changed: an asset event through its REST API.

`python -m pipeline upload` calls this after it sent new or changed images, so the
retraining DAG (scheduled on the dataset's raw Asset) starts at once instead of waiting for
the `hemaflow_watch_raw` poll. Airflow 3's public API of the api-server is used:
`POST /auth/token` (simple auth manager, Airflow's default) for a JWT, `GET /api/v2/assets`
to find the Asset by name, `POST /api/v2/assets/events` to emit. httpx only: no Airflow
import, so the upload CLI stays light. Neither the password nor the token is ever logged
or put in an error message.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from pipeline.settings import Settings, get_settings

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 5.0
ATTEMPTS = 3  # per request; only connection errors, timeouts, 429 and 5xx are retried
BACKOFF_S = 0.5  # doubled after each failed attempt
RETRIABLE_STATUS = frozenset({429, 500, 502, 503, 504})
EVENT_SOURCE = "hemaflow-upload"


class AirflowApiError(RuntimeError):
    """The asset event could not be emitted; the message says why and what to check."""


def _detail(response) -> str:
    try:
        detail = response.json().get("detail")
    except ValueError:
        detail = response.text
    return str(detail)[:300]


def _request(client, method: str, path: str, what: str, **kwargs: Any):
    """One API call with bounded retries on transient failures; raises AirflowApiError."""
    import httpx

    delay = BACKOFF_S
    for attempt in range(1, ATTEMPTS + 1):
        try:
            response = client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            problem = f"{type(exc).__name__}: {exc}"
        else:
            if response.status_code not in RETRIABLE_STATUS:
                return response
            problem = f"HTTP {response.status_code}: {_detail(response)}"
        if attempt < ATTEMPTS:
            log.debug("airflow api %s failed (%s); retry %d/%d in %.1fs", what, problem, attempt, ATTEMPTS, delay)
            time.sleep(delay)
            delay *= 2
    raise AirflowApiError(f"{what} at {client.base_url} failed after {ATTEMPTS} attempts: {problem}")


def _token(client, s: Settings) -> str:
    """A JWT from the simple auth manager (`POST /auth/token`); without a username, the
    credential-less `GET /auth/token` that works only when every user is admin."""
    if s.airflow_api_username:
        response = _request(client, "POST", "/auth/token", "login",
                            json={"username": s.airflow_api_username,
                                  "password": s.airflow_api_password.get_secret_value()})
    else:
        response = _request(client, "GET", "/auth/token", "login (no AIRFLOW_API_USERNAME)")
    if response.status_code in (401, 403):
        who = f"user {s.airflow_api_username!r}" if s.airflow_api_username else "anonymous access"
        raise AirflowApiError(f"Airflow at {s.airflow_api_url} rejected {who} (HTTP {response.status_code}): "
                              "check AIRFLOW_API_USERNAME / AIRFLOW_API_PASSWORD")
    if response.status_code == 404:
        raise AirflowApiError(f"{s.airflow_api_url}/auth/token not found: is AIRFLOW_API_URL the api-server's "
                              "base URL, and does it use the simple auth manager?")
    if response.status_code >= 400:
        raise AirflowApiError(f"login to {s.airflow_api_url} failed: HTTP {response.status_code} "
                              f"{_detail(response)}")
    try:
        return response.json()["access_token"]
    except (ValueError, KeyError) as exc:
        raise AirflowApiError(f"login to {s.airflow_api_url} returned no access_token") from exc


def _checked(response, what: str) -> dict:
    if response.status_code in (401, 403):
        raise AirflowApiError(f"{what}: the Airflow user may not do this (HTTP {response.status_code}: "
                              f"{_detail(response)})")
    if response.status_code >= 400:
        raise AirflowApiError(f"{what} failed: HTTP {response.status_code} {_detail(response)}")
    try:
        return response.json()
    except ValueError as exc:
        raise AirflowApiError(f"{what}: the answer is not JSON (is AIRFLOW_API_URL the api-server?)") from exc


def find_raw_asset(client, dataset: str, s: Settings) -> dict:
    """The Asset row of the dataset's raw images, matched on name and URI."""
    from pipeline.dataset_spec import load_spec
    from pipeline.watch import raw_asset_name, raw_asset_uri

    name = raw_asset_name(dataset)
    uri = raw_asset_uri(s.s3_bucket, load_spec(dataset, s.dataset_specs_dir).s3_prefix)
    found = _checked(_request(client, "GET", "/api/v2/assets", "list assets",
                              params={"name_pattern": name, "limit": 100}), "list assets")
    named = [a for a in found.get("assets", []) if a.get("name") == name]
    for asset in named:
        if asset.get("uri") == uri:
            return asset
    if named:
        raise AirflowApiError(f"Airflow's asset {name!r} has URI {named[0].get('uri')!r}, not {uri!r}: the DAGs "
                              "there read another S3_BUCKET than this upload")
    raise AirflowApiError(f"Airflow knows no asset {name!r} ({uri}): are the HemaFlow DAGs deployed and parsed "
                          f"there (`airflow dags reserialize`), with a spec for {dataset!r}?")


def emit_raw_asset_event(dataset: str, extra: dict | None = None, settings: Settings | None = None) -> dict:
    """Emit an event on the dataset's raw Asset; returns {asset_id, event_id, uri, timestamp, url}.

    Raises AirflowApiError (clear message, no secret) when AIRFLOW_API_URL is unset or the
    api-server cannot be reached, rejects the login, or does not know the Asset.
    """
    import httpx

    s = settings or get_settings()
    base = s.airflow_api_url.rstrip("/")
    if not base:
        raise AirflowApiError("AIRFLOW_API_URL is not set")
    with httpx.Client(base_url=base, timeout=REQUEST_TIMEOUT_S) as client:
        client.headers["Authorization"] = f"Bearer {_token(client, s)}"
        asset = find_raw_asset(client, dataset, s)
        event = _checked(
            _request(client, "POST", "/api/v2/assets/events", "emit asset event",
                     json={"asset_id": asset["id"], "extra": dict(extra or {})}),
            f"emit an event on asset {asset['name']!r}",
        )
    return {"asset_id": asset["id"], "event_id": event.get("id"), "uri": asset["uri"],
            "timestamp": event.get("timestamp"), "url": base}


def announce_upload(dataset: str, summary: dict, settings: Settings | None = None) -> dict:
    """After an upload: emit the raw Asset event when something was sent. Never raises.

    Returns {emitted: bool, message: str, event?: dict}: an upload that reached the bucket
    is a success even when Airflow is down, since the watcher DAG will find the images anyway.
    """
    s = settings or get_settings()
    watcher = f"the watcher DAG will pick the upload up within RAW_WATCH_SCHEDULE ({s.raw_watch_schedule})"
    if not summary.get("uploaded"):
        return {"emitted": False, "message": "nothing new uploaded: no asset event"}
    if not s.airflow_api_url:
        return {"emitted": False, "message": f"AIRFLOW_API_URL is not set: {watcher}"}
    extra = {"source": EVENT_SOURCE, "dataset": dataset, "prefix": summary.get("prefix"),
             "uploaded": summary.get("uploaded"), "bytes": summary.get("bytes")}
    try:
        event = emit_raw_asset_event(dataset, extra, settings=s)
    except AirflowApiError as exc:
        message = f"WARNING could not emit the Airflow asset event ({exc}); the upload itself succeeded: {watcher}"
        log.warning(message)
        return {"emitted": False, "message": message}
    return {"emitted": True, "event": event,
            "message": f"asset event {event['event_id']} on {event['uri']} emitted to {event['url']}: "
                       f"hemaflow_retrain_{dataset} is queued to run"}
