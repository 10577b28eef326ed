"""MLflow with its own basic-auth app: who may write the registry, who may only read it.

Whoever can write to MLflow decides which bundle `@champion` points at, so the tracking
server runs `mlflow server --app-name basic-auth` (the local stack and docker compose alike)
with three identities:

- the admin (`hemaflow-admin`, `MLFLOW_ADMIN_PASSWORD`): created by MLflow on first start and
  used only here, to manage the other two;
- the pipeline (`MLFLOW_TRACKING_USERNAME`/`_PASSWORD`): MANAGE on every experiment and
  registered model (wildcard grants), so it can log runs, register versions and move aliases;
- serving (`SERVING_MLFLOW_USERNAME`/`_PASSWORD`): nothing but the default permission, READ.

Unauthenticated requests get 401 (only `/health` and static files are open). `ensure_users` is
idempotent: it creates missing users, resets their passwords to the configured ones and adds the
pipeline's grants if they are missing. Passwords never appear in errors or logs.
"""

from __future__ import annotations

import configparser
import os
import time
from pathlib import Path

import httpx

from contracts.settings import Settings, get_settings

ADMIN_USER = "hemaflow-admin"
DEFAULT_PERMISSION = "READ"  # what serving (and any other authenticated user) gets
WRITER_GRANTS = (("experiment", "*", "MANAGE"), ("registered_model", "*", "MANAGE"))
TIMEOUT_S = 10.0
# MLflow hashes the password (PBKDF2) on every request: ~0.8 s each on 2 busy cores, which made a
# bundle download take seconds. Successful checks are cached this long per worker; a password
# changed through the API stays valid on *other* workers for at most this long.
AUTH_CACHE_TTL_S = 120


class MlflowAuthError(RuntimeError):
    """MLflow's users could not be set up; the message says which step failed."""


def write_auth_config(path: Path, database_uri: str) -> Path:
    """The basic-auth app's ini (no password in it: MLflow reads MLFLOW_AUTH_ADMIN_PASSWORD)."""
    config = configparser.ConfigParser()
    config["mlflow"] = {
        "default_permission": DEFAULT_PERMISSION,
        "database_uri": database_uri,
        "admin_username": ADMIN_USER,
        "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
        "grant_default_workspace_access": "false",
        "auth_cache_ttl_seconds": str(AUTH_CACHE_TTL_S),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        config.write(fh)
    return path


def server_env(settings: Settings, config_path: Path | str) -> dict[str, str]:
    """Environment of an MLflow server process with basic auth (admin bootstrap, CSRF key)."""
    return {
        "MLFLOW_AUTH_CONFIG_PATH": str(config_path),
        "MLFLOW_AUTH_ADMIN_USERNAME": ADMIN_USER,
        "MLFLOW_AUTH_ADMIN_PASSWORD": settings.mlflow_admin_password.get_secret_value(),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": settings.mlflow_flask_secret_key.get_secret_value(),
    }


def auth_enabled(tracking_uri: str) -> bool:
    """True when MLflow answers an anonymous API request with 401 (basic auth is on)."""
    try:
        r = httpx.get(tracking_uri.rstrip("/") + "/api/2.0/mlflow/experiments/search",
                      params={"max_results": 1}, timeout=TIMEOUT_S)
    except httpx.HTTPError:
        return False
    return r.status_code == 401


def _call(client, method: str, path: str, what: str, ok: tuple[int, ...] = (200,), **kwargs):
    try:
        r = client.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        raise MlflowAuthError(f"MLflow auth setup: {what} failed: {type(exc).__name__}") from None
    if r.status_code not in ok:
        raise MlflowAuthError(f"MLflow auth setup: {what} answered HTTP {r.status_code}: {r.text[:200]}")
    return r


def _ensure_user(client, username: str, password: str) -> None:
    found = _call(client, "GET", "/api/2.0/mlflow/users/get", f"look up user {username}", ok=(200, 404),
                  params={"username": username})
    if found.status_code == 404:
        _call(client, "POST", "/api/2.0/mlflow/users/create", f"create user {username}",
              json={"username": username, "password": password})
    else:  # the configured password is the truth (e.g. after a rotation in secrets.env)
        _call(client, "PATCH", "/api/2.0/mlflow/users/update-password", f"set the password of {username}",
              json={"username": username, "password": password})


def _ensure_grant(client, username: str, resource_type: str, resource_id: str, permission: str) -> None:
    body = {"username": username, "resource_type": resource_type, "resource_id": resource_id,
            "permission": permission}
    r = _call(client, "POST", "/api/3.0/mlflow/users/permissions/grant", f"grant {permission} on {resource_type}",
              ok=(200, 400, 409), json=body)
    if r.status_code != 200 and "RESOURCE_ALREADY_EXISTS" not in r.text:
        raise MlflowAuthError(f"MLflow auth setup: grant {permission} on {resource_type} answered "
                              f"HTTP {r.status_code}: {r.text[:200]}")


def ensure_users(settings: Settings) -> None:
    """Create (or re-password) the pipeline and serving users and give the pipeline its grants."""
    writer, reader = settings.mlflow_tracking_username, settings.serving_mlflow_username
    if not writer or not reader:
        raise MlflowAuthError("MLFLOW_TRACKING_USERNAME and SERVING_MLFLOW_USERNAME must be set (make secrets)")
    if writer == reader:
        raise MlflowAuthError("the pipeline and serving need two different MLflow users")
    auth = (ADMIN_USER, settings.mlflow_admin_password.get_secret_value())
    with httpx.Client(base_url=settings.mlflow_tracking_uri.rstrip("/"), auth=auth, timeout=TIMEOUT_S) as client:
        _ensure_user(client, writer, settings.mlflow_tracking_password.get_secret_value())
        _ensure_user(client, reader, settings.serving_mlflow_password.get_secret_value())
        for resource_type, resource_id, permission in WRITER_GRANTS:
            _ensure_grant(client, writer, resource_type, resource_id, permission)


def main() -> int:
    """`python -m ops.mlflow_auth`: set up the users against MLFLOW_TRACKING_URI (compose's
    mlflow-users job), retrying while the server starts."""
    settings = get_settings()
    deadline = time.monotonic() + float(os.environ.get("MLFLOW_AUTH_SETUP_TIMEOUT_S", "300"))
    while True:
        try:
            ensure_users(settings)
            print(f"MLflow users ready: {settings.mlflow_tracking_username} (writer), "
                  f"{settings.serving_mlflow_username} (read-only)")
            return 0
        except MlflowAuthError as exc:
            if time.monotonic() > deadline:
                print(str(exc))
                return 1
            time.sleep(3)


if __name__ == "__main__":
    raise SystemExit(main())
