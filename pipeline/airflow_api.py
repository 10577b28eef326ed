"""Talk to Airflow's REST API: asset events after an upload, and watching DAG runs.

`python -m pipeline upload` calls this after it sent new or changed images, so the
retraining DAG (scheduled on the dataset's raw Asset) starts at once instead of waiting for
the `hemaflow_watch_raw` poll. Airflow 3's public API of the api-server is used:
`POST /auth/token` (simple auth manager, Airflow's default) for a JWT, `GET /api/v2/assets`
to find the Asset by name, `POST /api/v2/assets/events` to emit. httpx only: no Airflow
import, so the upload CLI stays light. Neither the password nor the token is ever logged
or put in an error message.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from contracts.settings import Settings, get_settings

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 15.0  # a busy api-server (one worker, SQLite) can take seconds to answer
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


def find_asset(client, name: str, uri: str, needs: str = "the HemaFlow specs") -> dict:
    """The Asset row named `name` with URI `uri`; AirflowApiError says what is wrong otherwise."""
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
                          f"there (`airflow dags reserialize`), with {needs}?")


@contextmanager
def api_client(settings: Settings | None = None) -> Iterator[Any]:
    """An httpx client of the api-server at AIRFLOW_API_URL, logged in (bearer token)."""
    import httpx

    s = settings or get_settings()
    base = s.airflow_api_url.rstrip("/")
    if not base:
        raise AirflowApiError("AIRFLOW_API_URL is not set")
    with httpx.Client(base_url=base, timeout=REQUEST_TIMEOUT_S) as client:
        client.headers["Authorization"] = f"Bearer {_token(client, s)}"
        yield client


def emit_raw_asset_event(dataset: str, extra: dict | None = None, settings: Settings | None = None) -> dict:
    """Emit an event on the dataset's raw Asset; returns {asset_id, event_id, uri, timestamp, url}.

    Raises AirflowApiError (clear message, no secret) when AIRFLOW_API_URL is unset or the
    api-server cannot be reached, rejects the login, or does not know the Asset.
    """
    from contracts.dataset_spec import load_spec
    from pipeline.watch import raw_asset_name, raw_asset_uri

    s = settings or get_settings()
    uri = raw_asset_uri(s.s3_bucket, load_spec(dataset, s.dataset_specs_dir).s3_prefix)
    return emit_asset_event(raw_asset_name(dataset), uri, extra, s, needs=f"a spec for {dataset!r}")


def emit_asset_event(name: str, uri: str, extra: dict | None = None, settings: Settings | None = None,
                     needs: str = "the HemaFlow specs") -> dict:
    """Emit an event on the Asset `name` (with URI `uri`); see emit_raw_asset_event."""
    s = settings or get_settings()
    with api_client(s) as client:
        asset = find_asset(client, name, uri, needs)
        event = _checked(
            _request(client, "POST", "/api/v2/assets/events", "emit asset event",
                     json={"asset_id": asset["id"], "extra": dict(extra or {})}),
            f"emit an event on asset {asset['name']!r}",
        )
    return {"asset_id": asset["id"], "event_id": event.get("id"), "uri": asset["uri"],
            "timestamp": event.get("timestamp"), "url": s.airflow_api_url.rstrip("/")}


# --- DAGs and their runs -------------------------------------------------------------------------


def get_dag(client, dag_id: str) -> dict | None:
    """The DAG as the api-server knows it (parsed, with `is_paused`), or None if not (yet) parsed."""
    response = _request(client, "GET", f"/api/v2/dags/{dag_id}", f"get DAG {dag_id}")
    return None if response.status_code == 404 else _checked(response, f"get DAG {dag_id}")


def dag_runs(client, dag_id: str, limit: int = 100) -> list[dict]:
    """The DAG's runs, newest first (dag_run_id, state, run_type, run_after, start_date, end_date)."""
    found = _checked(_request(client, "GET", f"/api/v2/dags/{dag_id}/dagRuns", f"list runs of {dag_id}",
                              params={"order_by": "-run_after", "limit": limit}), f"list runs of {dag_id}")
    return found.get("dag_runs", [])


def task_instances(client, dag_id: str, run_id: str) -> list[dict]:
    """The run's task instances (task_id, state, try_number, hostname, start_date, end_date, duration)."""
    what = f"list task instances of {dag_id} {run_id}"
    found = _checked(_request(client, "GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances", what,
                              params={"limit": 100}), what)
    return found.get("task_instances", [])


def xcom_value(client, dag_id: str, run_id: str, task_id: str, key: str = "return_value") -> Any:
    """What a task instance pushed to XCom under `key` (JSON as the task returned it)."""
    what = f"read XCom {key} of {dag_id} {run_id} {task_id}"
    found = _checked(_request(client, "GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}"
                                             f"/xcomEntries/{key}", what), what)
    value = found.get("value")
    return json.loads(value) if isinstance(value, str) else value


def trigger_dag(client, dag_id: str, conf: dict | None = None) -> dict:
    """A manual run of `dag_id` now; returns the new run."""
    return _checked(_request(client, "POST", f"/api/v2/dags/{dag_id}/dagRuns", f"trigger {dag_id}",
                             json={"logical_date": None, "conf": dict(conf or {})}), f"trigger {dag_id}")


FINISHED_RUN_STATES = frozenset({"success", "failed"})


def wait_for_run(client, dag_id: str, pick: Callable[[list[dict]], dict | None], timeout_s: float,
                 on_poll: Callable[[dict, list[dict]], None] | None = None, poll_s: float = 2.0) -> dict:
    """Wait until the run that `pick` chooses among the DAG's runs has finished; returns it.

    `on_poll(run, task_instances)` is called on each poll once the run exists (progress display)."""
    deadline = time.monotonic() + timeout_s
    run: dict | None = None
    while time.monotonic() < deadline:
        run = pick(dag_runs(client, dag_id))
        if run is not None:
            if on_poll is not None:
                on_poll(run, task_instances(client, dag_id, run["dag_run_id"]))
            if run.get("state") in FINISHED_RUN_STATES:
                return run
        time.sleep(poll_s)
    seen = f"run {run['dag_run_id']} still {run.get('state')}" if run else "no matching run"
    raise AirflowApiError(f"{dag_id}: {seen} after {timeout_s:.0f}s")


def announce_upload(dataset: str, summary: dict, settings: Settings | None = None) -> dict:
    """After an upload: emit the raw Asset event when something was sent. Never raises.

    Returns {emitted: bool, message: str, event?: dict}: an upload that reached the bucket
    is a success even when Airflow is down, since the watcher DAG will find the images anyway.
    """
    from contracts.dataset_spec import load_spec
    from pipeline.watch import raw_asset_name, raw_asset_uri

    s = settings or get_settings()
    extra = {"source": EVENT_SOURCE, "dataset": dataset, "prefix": summary.get("prefix"),
             "uploaded": summary.get("uploaded"), "bytes": summary.get("bytes")}
    uri = raw_asset_uri(s.s3_bucket, load_spec(dataset, s.dataset_specs_dir).s3_prefix)
    return announce_event(
        int(summary.get("uploaded") or 0), raw_asset_name(dataset), uri, extra, s,
        later=f"the watcher DAG will pick the upload up within RAW_WATCH_SCHEDULE ({s.raw_watch_schedule})",
        queued=f"hemaflow_retrain_{dataset} is queued to run")


def announce_event(uploaded: int, name: str, uri: str, extra: dict, s: Settings, later: str, queued: str) -> dict:
    """After an upload of `uploaded` objects: emit an event on Asset `name` when something was sent.

    Never raises: {emitted, message, event?}; `later` says what picks the upload up without the event
    (no AIRFLOW_API_URL, or Airflow down), `queued` what the event starts."""
    if not uploaded:
        return {"emitted": False, "message": "nothing new uploaded: no asset event"}
    if not s.airflow_api_url:
        return {"emitted": False, "message": f"AIRFLOW_API_URL is not set: {later}"}
    try:
        event = emit_asset_event(name, uri, extra, s, needs=f"a spec for {extra.get('dataset')!r}")
    except AirflowApiError as exc:
        message = f"WARNING could not emit the Airflow asset event ({exc}); the upload itself succeeded: {later}"
        log.warning(message)
        return {"emitted": False, "message": message}
    return {"emitted": True, "event": event,
            "message": f"asset event {event['event_id']} on {event['uri']} emitted to {event['url']}: {queued}"}
