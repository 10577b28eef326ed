"""The API against a real uvicorn server running a real bundle from a tiny training run."""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.serving.support import image_bytes

pytestmark = pytest.mark.slow


def _canary(bundle) -> tuple[bytes, list[float]]:
    meta = json.loads((bundle / "bundle.json").read_text())
    canary = meta["canaries"][0]
    return (bundle / canary["file"]).read_bytes(), canary["probabilities"]


def test_predict_returns_the_bundle_answer_with_model_identity(local_bundle_server, serving_bundles):
    png, expected = _canary(serving_bundles["good"])
    meta = json.loads((serving_bundles["good"] / "bundle.json").read_text())
    r = httpx.post(f"{local_bundle_server.url}/v1/predict", files={"file": ("c.png", png, "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert list(body["probabilities"]) == meta["labels"]
    # The canary is already S x S, so serving's preprocessing is the identity and the output
    # must equal what the exporter recorded.
    assert np.allclose(list(body["probabilities"].values()), expected, atol=1e-4)
    pos = body["probabilities"]["abnormal"]
    assert body["label"] == ("abnormal" if pos >= meta["threshold"] else "normal")
    assert body["task_label"] == body["label"]
    assert body["confidence"] == pytest.approx(body["probabilities"][body["label"]], abs=1e-6)
    assert body["threshold"] == meta["threshold"] and body["positive_label"] == "abnormal"
    assert body["model"]["name"] == "hemaflow-tiny"
    assert body["model"]["dataset_version"] == "tiny-v1"
    assert body["model"]["version"].startswith("local-")
    assert body["processing_ms"] > 0
    assert body["clinical"]["note"].lower().startswith("screening aid, not a diagnosis")
    assert body["explanation"] is None


def test_raw_image_body_is_accepted(local_bundle_server):
    r = httpx.post(f"{local_bundle_server.url}/v1/predict", content=image_bytes("PNG"),
                   headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    assert sum(r.json()["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("route", ["/v1/predict?explain=true", "/v1/explain"])
def test_explain_adds_a_gradcam_overlay_of_the_input(local_bundle_server, route):
    data = image_bytes("JPEG", size=(120, 90))
    r = httpx.post(local_bundle_server.url + route, files={"file": ("x.jpg", data, "image/jpeg")})
    assert r.status_code == 200, r.text
    exp = r.json()["explanation"]
    assert exp["label"] == r.json()["label"] and exp["method"] == "grad-cam"
    overlay = np.asarray(Image.open(io.BytesIO(base64.b64decode(exp["overlay_png_base64"]))))
    original = np.asarray(Image.open(io.BytesIO(base64.b64decode(exp["input_png_base64"]))))
    assert overlay.shape == original.shape == (exp["image_size"], exp["image_size"], 3)
    assert not np.array_equal(overlay, original)  # the heatmap is really blended in


def test_batch_answers_each_file_and_reports_bad_ones(local_bundle_server):
    files = [
        ("file", ("a.jpg", image_bytes("JPEG", seed=1), "image/jpeg")),
        ("file", ("b.txt", b"not an image at all" * 10, "text/plain")),
        ("file", ("c.png", image_bytes("PNG", seed=2), "image/png")),
    ]
    r = httpx.post(f"{local_bundle_server.url}/v1/predict/batch", files=files)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["filename"] for x in results] == ["a.jpg", "b.txt", "c.png"]
    assert "label" in results[0] and "label" in results[2]
    assert results[1]["error"] == "not_an_image"
    single = httpx.post(f"{local_bundle_server.url}/v1/predict",
                        files={"file": ("a.jpg", image_bytes("JPEG", seed=1), "image/jpeg")}).json()
    assert results[0]["probabilities"] == pytest.approx(single["probabilities"], abs=1e-5)


def test_batch_over_the_count_limit_is_413(local_bundle_server):
    files = [("file", (f"{i}.png", image_bytes("PNG", seed=i), "image/png")) for i in range(5)]  # limit is 4
    r = httpx.post(f"{local_bundle_server.url}/v1/predict/batch", files=files)
    assert r.status_code == 413 and r.json()["error"] == "too_many_files"


def test_model_health_readiness_and_openapi(local_bundle_server):
    url = local_bundle_server.url
    model = httpx.get(f"{url}/v1/model").json()
    assert model["source"] == "local" and model["labels"] == ["abnormal", "normal"]
    assert model["metrics"] == {"accuracy": 1.0} and model["loaded_at"]
    assert model["threshold_rule"] is None  # a bundle that does not record its rule (from before it was)
    assert set(model["clinical"]) == {"abnormal", "normal"}
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{url}/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    paths = httpx.get(f"{url}/openapi.json").json()["paths"]
    for p in ("/v1/predict", "/v1/predict/batch", "/v1/explain", "/v1/model", "/v1/admin/reload"):
        assert p in paths
    assert "multipart/form-data" in paths["/v1/predict"]["post"]["requestBody"]["content"]


def test_metrics_count_requests_errors_and_model(local_bundle_server):
    url = local_bundle_server.url
    httpx.post(f"{url}/v1/predict", files={"file": ("x.png", b"junk" * 50, "image/png")})
    text = httpx.get(f"{url}/metrics").text
    assert 'hemaflow_http_requests_total{method="POST",route="/v1/predict",status="415"}' in text
    assert 'hemaflow_http_errors_total{code="not_an_image",route="/v1/predict"}' in text
    assert "hemaflow_http_request_duration_seconds_bucket" in text
    assert 'hemaflow_model_info{dataset_version="tiny-v1"' in text
    assert "hemaflow_model_loaded 1.0" in text


def test_admin_reload_needs_the_key(local_bundle_server):
    url = f"{local_bundle_server.url}/v1/admin/reload"
    assert httpx.post(url).status_code == 401
    assert httpx.post(url, headers={"X-API-Key": "admin-key-3-0123456789ab"}).status_code == 403
    r = httpx.post(url, headers={"X-API-Key": "admin-key-2-0123456789ab"})
    assert r.status_code == 200 and r.json()["ok"] and not r.json()["changed"]


def test_web_page_and_assets_are_served_locally(local_bundle_server):
    url = local_bundle_server.url
    page = httpx.get(url + "/").text
    assert "/static/app.js" in page and "/static/app.css" in page
    assert "http://" not in page and "https://" not in page  # no CDN
    for asset in ("/static/app.js", "/static/app.css"):
        assert httpx.get(url + asset).status_code == 200


USER_KEY = "user-key-0123456789abcdef"


def test_prediction_keys_when_required(serving_bundles):
    from contracts.settings import get_settings
    from serving.app import create_app

    from tests.fixtures.keys import PUBLIC_KEY

    settings = get_settings(serving_bundle_path=serving_bundles["good"], serving_require_api_key=True,
                            serving_api_keys=USER_KEY, serving_poll_interval_s=0,
                            bundle_trusted_public_keys=PUBLIC_KEY)
    with TestClient(create_app(settings)) as client:
        files = {"file": ("x.png", image_bytes("PNG"), "image/png")}
        assert client.post("/v1/predict", files=files).status_code == 401
        assert client.post("/v1/predict", files=files, headers={"X-API-Key": "nope"}).status_code == 403
        assert client.post("/v1/predict", files=files, headers={"X-API-Key": USER_KEY}).status_code == 200
        assert client.get("/healthz").status_code == 200  # probes stay open
