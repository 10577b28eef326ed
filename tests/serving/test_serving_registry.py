"""Serving follows the real MLflow registry's @champion, and keeps serving when MLflow goes away.

MLflow is the session's real server; the test reaches it through a loopback TCP forwarder
so that "MLflow down" is a real refused connection without stopping the shared server.
"""

from __future__ import annotations

import time

import httpx
import pytest

from tests.serving.support import TcpProxy, image_bytes

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _wait_for(predicate, timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def _version(url: str) -> str | None:
    r = httpx.get(f"{url}/readyz")
    return r.json().get("model_version")


def test_follows_champion_and_survives_mlflow_outage(tiny_registered_model, serving_server):
    import mlflow
    from mlflow import MlflowClient

    reg = tiny_registered_model
    settings = reg["settings"]
    proxy = TcpProxy(settings.mlflow_port)
    try:
        server = serving_server({
            "DATASET": reg["dataset"],
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{proxy.port}",
            "SERVING_POLL_INTERVAL_S": "1",
            "SERVING_ADMIN_API_KEYS": "reg-admin-key-0123456789",
        })
        url = server.url
        model = httpx.get(f"{url}/v1/model").json()
        assert model["source"] == "registry"
        assert model["model"]["version"] == str(reg["model_version"])
        assert model["model"]["run_id"] == reg["run_id"]
        assert model["model"]["name"] == reg["model_name"]
        assert model["promoted_at"]

        # Promotion reaches serving: a new version takes @champion and the poller swaps it in.
        client = MlflowClient(tracking_uri=settings.mlflow_tracking_uri)
        current = client.get_model_version(reg["model_name"], str(reg["model_version"]))
        mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
        new = mlflow.register_model(current.source, reg["model_name"])  # same logged model, new version
        client.set_registered_model_alias(reg["model_name"], "champion", new.version)
        assert _wait_for(lambda: _version(url) == str(new.version)), server.log()

        # MLflow goes away: the loaded model keeps serving and readiness stays true.
        proxy.stop()
        time.sleep(2.5)  # several poll intervals against a dead endpoint
        ready = httpx.get(f"{url}/readyz")
        assert ready.status_code == 200 and ready.json()["model_version"] == str(new.version)
        r = httpx.post(f"{url}/v1/predict", files={"file": ("x.png", image_bytes("PNG"), "image/png")})
        assert r.status_code == 200 and r.json()["model"]["version"] == str(new.version)
        reload = httpx.post(f"{url}/v1/admin/reload", headers={"X-API-Key": "reg-admin-key-0123456789"}, timeout=60)
        assert reload.status_code == 409 and reload.json()["reason"].startswith("registry_unavailable")
        assert 'hemaflow_model_reload_failures_total{reason="registry_unavailable"}' in httpx.get(f"{url}/metrics").text
    finally:
        proxy.stop()
        # The registered model is a session fixture: leave @champion where the other tests expect it.
        MlflowClient(tracking_uri=settings.mlflow_tracking_uri).set_registered_model_alias(
            reg["model_name"], "champion", str(reg["model_version"]))


def test_registry_mode_without_champion_is_live_but_not_ready(local_stack, serving_server):
    server = serving_server({"DATASET": "nosuchmodel", "SERVING_POLL_INTERVAL_S": "1"}, wait_ready=False)
    r = httpx.get(f"{server.url}/readyz")
    assert r.status_code == 503 and r.json()["source"] == "registry"
    assert r.json()["last_error"].startswith("no_champion")
    assert httpx.get(f"{server.url}/healthz").status_code == 200
