"""Zero-downtime swaps: under concurrent load, a new bundle replaces the old one with no failed
request, every response names the version that produced it, and a bad bundle is refused."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.serving.support import image_bytes, point_link

pytestmark = pytest.mark.slow

ADMIN = {"X-API-Key": "swap-admin-key-0123456789"}
WORKERS = 8


def _load(url: str, stop: threading.Event, log: list) -> None:
    data = image_bytes("JPEG", size=(64, 64), seed=5)
    with httpx.Client(timeout=30) as client:
        while not stop.is_set():
            started = time.monotonic()
            try:
                r = client.post(f"{url}/v1/predict", files={"file": ("x.jpg", data, "image/jpeg")})
                version = r.json().get("model", {}).get("version") if r.status_code == 200 else None
                log.append((started, time.monotonic(), r.status_code, version))
            except httpx.HTTPError as exc:
                log.append((started, time.monotonic(), repr(exc), None))


# The shipped defaults (inference threads, one interpreter each), and micro-batching on, where queued
# requests from before and after the swap must each run on their own model.
@pytest.mark.parametrize("extra_env", [{}, {"SERVING_MICRO_BATCH": "8"}], ids=["defaults", "micro_batch_8"])
def test_hot_swap_under_load_and_bad_bundles_are_refused(serving_server, serving_bundles, tmp_path, extra_env):
    link = tmp_path / "current"
    point_link(link, serving_bundles["good"])
    server = serving_server({"SERVING_BUNDLE_PATH": str(link), "SERVING_ADMIN_API_KEYS": "swap-admin-key-0123456789",
                             **extra_env})
    url = server.url
    v1 = httpx.get(f"{url}/v1/model").json()["model"]["version"]

    stop, log = threading.Event(), []
    with ThreadPoolExecutor(WORKERS) as pool:
        for _ in range(WORKERS):
            pool.submit(_load, url, stop, log)
        time.sleep(1.5)

        # A bundle with a flipped byte in the model: checksum refused, v1 keeps serving.
        point_link(link, serving_bundles["tampered"])
        r = httpx.post(f"{url}/v1/admin/reload", headers=ADMIN, timeout=60)
        assert r.status_code == 409 and r.json()["reason"].startswith("checksum_mismatch"), r.text
        # Checksums fine but a canary disagrees: refused too.
        point_link(link, serving_bundles["bad_canary"])
        r = httpx.post(f"{url}/v1/admin/reload", headers=ADMIN, timeout=60)
        assert r.status_code == 409 and r.json()["reason"].startswith("canary_mismatch"), r.text
        assert httpx.get(f"{url}/v1/model").json()["model"]["version"] == v1
        time.sleep(0.5)

        point_link(link, serving_bundles["good2"])
        r = httpx.post(f"{url}/v1/admin/reload", headers=ADMIN, timeout=60)
        assert r.status_code == 200 and r.json()["changed"], r.text
        swapped_at = time.monotonic()
        v2 = r.json()["version"]
        time.sleep(1.5)
        stop.set()

    assert v2 != v1
    failures = [entry for entry in log if entry[2] != 200]
    assert failures == [], failures[:5]
    assert len(log) > 50
    versions = {entry[3] for entry in log}
    assert versions == {v1, v2}
    # Requests that started after the reload returned were all answered by the new model.
    late = [entry for entry in log if entry[0] > swapped_at]
    assert late and all(entry[3] == v2 for entry in late)

    model = httpx.get(f"{url}/v1/model").json()
    assert model["model"]["version"] == v2 and model["model"]["dataset_version"] == "tiny-v2"
    metrics = httpx.get(f"{url}/metrics").text
    assert 'hemaflow_model_reload_failures_total{reason="checksum_mismatch"} 1.0' in metrics
    assert 'hemaflow_model_reload_failures_total{reason="canary_mismatch"} 1.0' in metrics
    assert 'hemaflow_model_reloads_total{result="swapped"}' in metrics
    assert "reload refused (checksum_mismatch" in server.log()


def test_server_starts_unready_without_a_bundle_then_loads_one(serving_server, serving_bundles, tmp_path):
    link = tmp_path / "later"
    server = serving_server({"SERVING_BUNDLE_PATH": str(link), "SERVING_ADMIN_API_KEYS": "swap-admin-key-0123456789"},
                            wait_ready=False)
    ready = httpx.get(f"{server.url}/readyz")
    assert ready.status_code == 503 and ready.json()["ready"] is False
    r = httpx.post(f"{server.url}/v1/predict", files={"file": ("x.png", image_bytes("PNG"), "image/png")})
    assert r.status_code == 503 and r.json()["error"] == "no_model"
    point_link(link, serving_bundles["good"])
    assert httpx.post(f"{server.url}/v1/admin/reload", headers=ADMIN, timeout=60).status_code == 200
    assert httpx.get(f"{server.url}/readyz").status_code == 200
