"""Follow the MLflow registry's @champion over MLflow's REST API, with plain HTTP.

Why not the mlflow client: it would pull ~300 MB of dependencies into a container whose
whole job is to run one small TFLite model. Three documented endpoints are enough:
`registered-models/alias` (alias -> version + run_id), `runs/get` (artifact root) and the
`mlflow-artifacts` proxy (downloads; S3 credentials stay on the MLflow server).
Requests carry HTTP basic auth with serving's read-only MLflow identity
(`SERVING_MLFLOW_USERNAME`/`SERVING_MLFLOW_PASSWORD`). What MLflow says is never trusted on its
own: the bundle's signature is checked (`check_sums`) before any other file is fetched.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from contracts.bundle import (
    BUNDLE_DIR,
    BUNDLE_JSON,
    MAX_BUNDLE_BYTES,
    SIGNATURE_FILE,
    SUMS_FILE,
    BundleError,
    parse_sums,
)

CHAMPION = "champion"
TIMEOUT_S = 10.0


class RegistryUnavailable(RuntimeError):
    """MLflow could not be reached or answered an error; the loaded model keeps serving."""


class RegistryUnauthorized(RegistryUnavailable):
    """MLflow refused serving's credentials (401/403): check SERVING_MLFLOW_USERNAME/PASSWORD."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class NoChampion(RuntimeError):
    """The registered model (or its @champion alias) does not exist yet."""


def basic_auth(username: str, password: str) -> str | None:
    """The Authorization header value for MLflow's basic-auth app (None without a username)."""
    if not username:
        return None
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


@dataclass(frozen=True)
class ChampionRef:
    name: str
    version: str
    run_id: str
    promoted_at: str | None


def _get(url: str, limit: int = MAX_BUNDLE_BYTES, auth: str | None = None) -> bytes:
    request = urllib.request.Request(url, headers={"Authorization": auth} if auth else {})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as resp:  # noqa: S310 - configured URL
            data = resp.read(limit + 1)
    except urllib.error.HTTPError as exc:
        body = exc.read(2000).decode("utf-8", errors="replace")
        if exc.code in (401, 403):
            raise RegistryUnauthorized(f"HTTP {exc.code} from MLflow for {url.split('?')[0]}: serving's "
                                       "MLflow identity is missing or lacks read permission", exc.code) from None
        if exc.code == 404 or "RESOURCE_DOES_NOT_EXIST" in body or "INVALID_PARAMETER_VALUE" in body:
            raise NoChampion(f"{exc.code} from MLflow: {body[:300]}") from None
        raise RegistryUnavailable(f"HTTP {exc.code} from MLflow for {url.split('?')[0]}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise RegistryUnavailable(f"MLflow unreachable: {exc}") from None
    if len(data) > limit:
        raise BundleError("too_large", f"{url.split('?')[0]} is larger than {limit} bytes")
    return data


def _get_json(url: str, auth: str | None = None) -> dict:
    try:
        return json.loads(_get(url, 10_000_000, auth))
    except ValueError as exc:
        raise RegistryUnavailable(f"MLflow answered non-JSON: {exc}") from None


def _promoted_at(version: dict) -> str | None:
    """A promotion time recorded by the gate (a tag ending in promoted_at), else last update."""
    for tag in version.get("tags") or []:
        if str(tag.get("key", "")).endswith("promoted_at") and tag.get("value"):
            return str(tag["value"])
    ts = version.get("last_updated_timestamp")
    if ts:
        return datetime.fromtimestamp(int(ts) / 1000, tz=UTC).isoformat(timespec="seconds")
    return None


def resolve_champion(tracking_uri: str, model_name: str, alias: str = CHAMPION, auth: str | None = None) -> ChampionRef:
    base = tracking_uri.rstrip("/")
    query = urllib.parse.urlencode({"name": model_name, "alias": alias})
    try:
        doc = _get_json(f"{base}/api/2.0/mlflow/registered-models/alias?{query}", auth)
    except RegistryUnauthorized as exc:
        # MLflow's auth answers 403 for a model that does not exist: tell that apart from a denial.
        if exc.status == 403 and not _model_visible(base, model_name, auth):
            raise NoChampion(f"registered model {model_name} does not exist (or serving may not read it)") from None
        raise
    mv = doc.get("model_version") or {}
    if not mv.get("version") or not mv.get("run_id"):
        raise NoChampion(f"{model_name}@{alias} has no version with a run")
    return ChampionRef(model_name, str(mv["version"]), str(mv["run_id"]), _promoted_at(mv))


def _model_visible(base: str, model_name: str, auth: str | None) -> bool:
    query = urllib.parse.urlencode({"filter": f"name = '{model_name}'", "max_results": 1})
    doc = _get_json(f"{base}/api/2.0/mlflow/registered-models/search?{query}", auth)
    return bool(doc.get("registered_models"))


def _artifact_base(base: str, run_id: str, auth: str | None) -> tuple[str, bool]:
    """URL prefix of the run's artifacts, and whether it is the mlflow-artifacts proxy."""
    doc = _get_json(f"{base}/api/2.0/mlflow/runs/get?{urllib.parse.urlencode({'run_id': run_id})}", auth)
    root = str(((doc.get("run") or {}).get("info") or {}).get("artifact_uri", ""))
    if root.startswith("mlflow-artifacts:"):
        path = urllib.parse.urlparse(root).path.lstrip("/")
        return f"{base}/api/2.0/mlflow-artifacts/artifacts/{path}", True
    return f"{base}/get-artifact", False


def _listed_names(base: str, run_id: str, auth: str | None) -> set[str]:
    """File names directly under the run's serving_bundle/ folder."""
    query = urllib.parse.urlencode({"run_id": run_id, "path": BUNDLE_DIR})
    doc = _get_json(f"{base}/api/2.0/mlflow/artifacts/list?{query}", auth)
    return {str(f.get("path", "")).rsplit("/", 1)[-1] for f in doc.get("files") or [] if not f.get("is_dir")}


def download_bundle(
    tracking_uri: str,
    run_id: str,
    auth: str | None = None,
    check_sums: Callable[[dict[str, bytes]], object] | None = None,
) -> dict[str, bytes]:
    """SHA256SUMS and its signature first, then every file it lists (the list is the bundle).

    `check_sums({SHA256SUMS: ..., SHA256SUMS.sig: ...})` runs before anything else is fetched
    (serving passes the signature check), so an untrusted bundle costs two small requests."""
    base = tracking_uri.rstrip("/")
    prefix, proxied = _artifact_base(base, run_id, auth)

    def fetch(rel: str) -> bytes:
        path = f"{BUNDLE_DIR}/{rel}"
        if proxied:
            return _get(f"{prefix}/{urllib.parse.quote(path)}", auth=auth)
        return _get(f"{prefix}?{urllib.parse.urlencode({'path': path, 'run_uuid': run_id})}", auth=auth)

    try:
        sums_bytes = fetch(SUMS_FILE)
    except NoChampion:
        raise BundleError("missing", f"run {run_id} has no {BUNDLE_DIR}/{SUMS_FILE}") from None
    files = {SUMS_FILE: sums_bytes}
    # MLflow's artifact proxy answers 500 (not 404) for a missing file: ask the listing instead.
    if SIGNATURE_FILE in _listed_names(base, run_id, auth):
        files[SIGNATURE_FILE] = fetch(SIGNATURE_FILE)
    if check_sums is not None:
        check_sums(files)
    for rel in parse_sums(sums_bytes.decode("utf-8", errors="replace")):
        files[rel] = fetch(rel)
    if BUNDLE_JSON not in files:
        raise BundleError("bad_checksums", "SHA256SUMS does not list bundle.json")
    return files
