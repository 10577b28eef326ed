"""The model card (issue 13 item 5) on real MLflow and a real serving process, and the rolling
prediction-mix / refusal-rate gauges serving exports to Prometheus (item 4)."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from tests.serving.support import image_bytes


def _gauge(text: str, name: str, label: str | None = None) -> float:
    pattern = rf'^{name}{{label="{label}"}} (\S+)$' if label else rf"^{name} (\S+)$"
    match = re.search(pattern, text, re.M)
    assert match, f"{name} {label or ''} not exported"
    return float(match.group(1))


def test_rolling_prediction_mix_and_refusal_rate(local_bundle_server):
    url = local_bundle_server.url
    for seed in range(3):
        r = httpx.post(f"{url}/v1/predict", files={"file": ("x.png", image_bytes("PNG", seed=seed), "image/png")})
        assert r.status_code == 200, r.text
    assert httpx.post(f"{url}/v1/predict", files={"file": ("x.png", b"junk" * 50, "image/png")}).status_code == 415
    text = httpx.get(f"{url}/metrics").text
    assert _gauge(text, "hemaflow_rolling_refusal_rate") == pytest.approx(1 / 4)
    shares = [_gauge(text, "hemaflow_rolling_prediction_share", label) for label in ("abnormal", "normal")
              if f'hemaflow_rolling_prediction_share{{label="{label}"}}' in text]
    assert shares and sum(shares) == pytest.approx(1.0)


def test_card_of_a_bundle_without_one_is_a_clear_404(local_bundle_server):
    r = httpx.get(f"{local_bundle_server.url}/v1/model/card")
    assert r.status_code == 404 and r.json()["error"] == "no_model_card"


@pytest.mark.slow
@pytest.mark.integration
def test_registered_version_has_card_and_serving_returns_it(tiny_registered_model, serving_server, tmp_path: Path):
    from mlflow import MlflowClient

    from contracts.bundle import DATA_PROFILE_FILE, MODEL_CARD_FILE, parse_sums
    from contracts.drift import load_profile
    from tests.fixtures.training import TINY_COUNTS
    from training.model import POOLED_FEATURES_LAYER
    from training.model_card import CARD_TAG
    from training.gate import download_bundle

    reg = tiny_registered_model
    settings, name, version, run_id = reg["settings"], reg["model_name"], str(reg["model_version"]), reg["run_id"]
    client = MlflowClient(settings.mlflow_tracking_uri)
    mv = client.get_model_version(name, version)
    assert mv.tags[CARD_TAG] == f"runs:/{run_id}/model_card/{MODEL_CARD_FILE}"
    card = Path(client.download_artifacts(run_id, f"model_card/{MODEL_CARD_FILE}", str(tmp_path))).read_text()
    metrics = client.get_run(run_id).data.metrics
    balanced = metrics["test_balanced_accuracy"]
    assert f"{balanced:.4f}" in card and f"{name} version {version}" in card
    assert metrics["test_balanced_accuracy_ci_low"] <= balanced <= metrics["test_balanced_accuracy_ci_high"]
    assert "<b>passed</b>" in card  # re-rendered after the gate with its decision
    assert "Screening aid, not a diagnosis" in card and "data:image/png;base64," in card

    bundle = download_bundle(client, run_id, settings)
    listed = parse_sums(bundle.files["SHA256SUMS"].decode())
    assert DATA_PROFILE_FILE in listed and MODEL_CARD_FILE in listed
    profile = load_profile(bundle.files[DATA_PROFILE_FILE])
    assert profile["label_mix"] == TINY_COUNTS["train"] and profile["dataset_version"] == reg["dataset_version"]
    assert profile["features"]["layer"] == POOLED_FEATURES_LAYER and profile["features"]["n"] > 0

    server = serving_server({"DATASET": reg["dataset"], "MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri})
    r = httpx.get(f"{server.url}/v1/model/card")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in r.headers["content-security-policy"]
    assert f"{balanced:.4f}" in r.text and reg["dataset_version"] in r.text
    assert 'href="/v1/model/card"' in httpx.get(f"{server.url}/").text
