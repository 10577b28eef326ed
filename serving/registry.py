"""Follow the MLflow registry's @champion over MLflow's REST API, with plain HTTP.

Why not the mlflow client: it would pull ~300 MB of dependencies into a container whose
whole job is to run one small TFLite model. Three documented endpoints are enough:
`registered-models/alias` (alias -> version + run_id), `runs/get` (artifact root) and the
`mlflow-artifacts` proxy (downloads; S3 credentials stay on the MLflow server).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime

from serving.bundle import BUNDLE_DIR, BUNDLE_JSON, MAX_BUNDLE_BYTES, SUMS_FILE, BundleError, parse_sums

CHAMPION = "champion"
TIMEOUT_S = 10.0


class RegistryUnavailable(RuntimeError):
    """MLflow could not be reached or answered an error; the loaded model keeps serving."""


class NoChampion(RuntimeError):
    """The registered model (or its @champion alias) does not exist yet."""


@dataclass(frozen=True)
class ChampionRef:
    name: str
    version: str
    run_id: str
    promoted_at: str | None


def _get(url: str, limit: int = MAX_BUNDLE_BYTES) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as resp:  # noqa: S310 - configured URL
            data = resp.read(limit + 1)
    except urllib.error.HTTPError as exc:
        body = exc.read(2000).decode("utf-8", errors="replace")
        if exc.code == 404 or "RESOURCE_DOES_NOT_EXIST" in body or "INVALID_PARAMETER_VALUE" in body:
            raise NoChampion(f"{exc.code} from MLflow: {body[:300]}") from None
        raise RegistryUnavailable(f"HTTP {exc.code} from MLflow for {url.split('?')[0]}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise RegistryUnavailable(f"MLflow unreachable: {exc}") from None
    if len(data) > limit:
        raise BundleError("too_large", f"{url.split('?')[0]} is larger than {limit} bytes")
    return data


def _get_json(url: str) -> dict:
    try:
        return json.loads(_get(url, 10_000_000))
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


def resolve_champion(tracking_uri: str, model_name: str, alias: str = CHAMPION) -> ChampionRef:
    base = tracking_uri.rstrip("/")
    query = urllib.parse.urlencode({"name": model_name, "alias": alias})
    doc = _get_json(f"{base}/api/2.0/mlflow/registered-models/alias?{query}")
    mv = doc.get("model_version") or {}
    if not mv.get("version") or not mv.get("run_id"):
        raise NoChampion(f"{model_name}@{alias} has no version with a run")
    return ChampionRef(model_name, str(mv["version"]), str(mv["run_id"]), _promoted_at(mv))


def _artifact_base(base: str, run_id: str) -> tuple[str, bool]:
    """URL prefix of the run's artifacts, and whether it is the mlflow-artifacts proxy."""
    doc = _get_json(f"{base}/api/2.0/mlflow/runs/get?{urllib.parse.urlencode({'run_id': run_id})}")
    root = str(((doc.get("run") or {}).get("info") or {}).get("artifact_uri", ""))
    if root.startswith("mlflow-artifacts:"):
        path = urllib.parse.urlparse(root).path.lstrip("/")
        return f"{base}/api/2.0/mlflow-artifacts/artifacts/{path}", True
    return f"{base}/get-artifact", False


def download_bundle(tracking_uri: str, run_id: str) -> dict[str, bytes]:
    """SHA256SUMS first, then every file it lists (the list is the bundle; nothing else is fetched)."""
    base = tracking_uri.rstrip("/")
    prefix, proxied = _artifact_base(base, run_id)

    def fetch(rel: str) -> bytes:
        path = f"{BUNDLE_DIR}/{rel}"
        if proxied:
            return _get(f"{prefix}/{urllib.parse.quote(path)}")
        return _get(f"{prefix}?{urllib.parse.urlencode({'path': path, 'run_uuid': run_id})}")

    sums_bytes = fetch(SUMS_FILE)
    files = {SUMS_FILE: sums_bytes}
    for rel in parse_sums(sums_bytes.decode("utf-8", errors="replace")):
        files[rel] = fetch(rel)
    if BUNDLE_JSON not in files:
        raise BundleError("bad_checksums", "SHA256SUMS does not list bundle.json")
    return files
