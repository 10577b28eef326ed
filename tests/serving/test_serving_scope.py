"""Out-of-scope refusal and test-time augmentation, against real uvicorn servers running real
bundles: the tiny trained model with its fitted detector (`tiny_ood_bundle_dir`) and the same
kind of bundle without one (`tiny_bundle_dir`)."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
from PIL import Image

from contracts.bundle import TFLiteRunner
from contracts.ood import REASON_STATISTICS
from tests.fixtures.training import TINY_SIZE
from training.ood import non_smear_images
from training.synthetic import synthetic_images

pytestmark = pytest.mark.slow


def _png(image) -> bytes:
    buf = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def scope_server(tiny_ood_bundle_dir, tmp_path_factory):
    from tests.serving.support import ServingProcess

    proc = ServingProcess({"SERVING_BUNDLE_PATH": str(tiny_ood_bundle_dir), "SERVING_MAX_BATCH": "16"},
                          tmp_path_factory.mktemp("scope-server")).start()
    yield proc
    proc.stop()


def test_non_smears_are_refused_with_a_reason_and_no_label(scope_server):
    refused = 0
    pictures = non_smear_images(4, seed=31337)
    for kind, images in pictures.items():
        for i, img in enumerate(images):
            data = _jpeg(img) if i % 2 else _png(img)
            r = httpx.post(f"{scope_server.url}/v1/predict", files={"file": (f"{kind}.img", data, "image/png")})
            assert r.status_code == 200, r.text
            body = r.json()
            if body["in_scope"] is False:
                refused += 1
                assert body["refusal_reason"] in ("image_statistics", "features")
                assert body["scope_detail"].startswith("This image does not look like what the model was trained on")
                assert body["label"] is None and body["probabilities"] is None and body["clinical"] is None
                assert body["model"]["dataset_version"] == "tiny-ood"
    assert refused / sum(len(v) for v in pictures.values()) >= 0.95
    metrics = httpx.get(f"{scope_server.url}/metrics").text
    assert f'hemaflow_out_of_scope_refusals_total{{reason="{REASON_STATISTICS}"}}' in metrics


def test_in_scope_images_pass_and_are_answered(scope_server):
    images = synthetic_images([i % 2 for i in range(100)], TINY_SIZE, seed=2024)  # never fitted on
    answers = []
    for start in range(0, 100, 16):
        files = [("file", (f"{start + i}.png", _png(img), "image/png")) for i, img in enumerate(images[start:start + 16])]
        r = httpx.post(f"{scope_server.url}/v1/predict/batch", files=files)
        assert r.status_code == 200, r.text
        answers += r.json()["results"]
    assert len(answers) == 100
    passed = [a for a in answers if a["in_scope"] is True]
    assert len(passed) >= 99  # <= 1 % of in-scope images refused
    assert all(a["label"] in ("abnormal", "normal") and a["refusal_reason"] is None for a in passed)


def test_batch_mixes_refusals_and_answers(scope_server):
    flat = Image.new("RGB", (320, 240), (128, 128, 128))
    smear = synthetic_images([0], TINY_SIZE, seed=77)[0]
    files = [("file", ("flat.png", _png(flat), "image/png")), ("file", ("smear.png", _png(smear), "image/png"))]
    flat_answer, smear_answer = httpx.post(f"{scope_server.url}/v1/predict/batch", files=files).json()["results"]
    assert flat_answer["in_scope"] is False and flat_answer["label"] is None
    assert smear_answer["in_scope"] is True and smear_answer["label"] in ("abnormal", "normal")


def test_openapi_and_model_info_document_the_detector(scope_server, tiny_ood):
    schema = httpx.get(f"{scope_server.url}/openapi.json").json()["components"]["schemas"]["Prediction"]
    assert {"in_scope", "refusal_reason", "scope_detail"} <= set(schema["properties"])
    assert "label" not in schema.get("required", [])
    info = httpx.get(f"{scope_server.url}/v1/model").json()
    assert info["out_of_scope_detector"]["validation"] == tiny_ood[2]


def test_a_bundle_without_detector_answers_in_scope_null(serving_server, tiny_bundle_dir):
    server = serving_server({"SERVING_BUNDLE_PATH": str(tiny_bundle_dir)})
    flat = Image.new("RGB", (320, 240), (128, 128, 128))
    body = httpx.post(f"{server.url}/v1/predict", files={"file": ("flat.png", _png(flat), "image/png")}).json()
    assert body["in_scope"] is None and body["scope_detail"].startswith("no detector")
    assert body["label"] in ("abnormal", "normal")


def test_refusal_off_labels_but_still_flags(serving_server, tiny_ood_bundle_dir):
    server = serving_server({"SERVING_BUNDLE_PATH": str(tiny_ood_bundle_dir), "SERVING_REFUSE_OUT_OF_SCOPE": "false"})
    noise = non_smear_images(1, seed=5)["noise"][0]
    body = httpx.post(f"{server.url}/v1/predict", files={"file": ("n.png", _png(noise), "image/png")}).json()
    assert body["in_scope"] is False and body["refusal_reason"] == REASON_STATISTICS
    assert body["label"] in ("abnormal", "normal") and body["probabilities"] is not None
    assert "hemaflow_out_of_scope_refusals_total{" not in httpx.get(f"{server.url}/metrics").text


def test_tta_averages_the_eight_flips_and_rotations(serving_server, tiny_ood_bundle_dir):
    from contracts.tta import views

    server = serving_server({"SERVING_BUNDLE_PATH": str(tiny_ood_bundle_dir), "INFERENCE_TTA": "true"})
    image = synthetic_images([1], TINY_SIZE, seed=8)[0]
    body = httpx.post(f"{server.url}/v1/predict?explain=true",
                      files={"file": ("s.png", _png(image), "image/png")}).json()
    runner = TFLiteRunner(tiny_ood_bundle_dir / "model.tflite")
    expected = runner.predict_proba(views(image[None])).mean(axis=0)
    assert np.allclose(list(body["probabilities"].values()), expected, atol=1e-5)
    assert body["in_scope"] is True and body["explanation"]["overlay_png_base64"]
