"""A quantized (dynamic_int8) bundle through a real uvicorn server: it loads (signature, checksums,
canaries within its tolerance), says what it is in /v1/model and answers as the float32 bundle of
the same weights does."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
from PIL import Image

from contracts.bundle import QUANTIZATION_DYNAMIC_INT8
from tests.fixtures.keys import SIGNING_KEY
from tests.fixtures.training import TINY_CLASSES, TINY_LABELS, TINY_SIZE
from training.synthetic import synthetic_images

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quantized_bundle_dir(tiny_keras_model, tmp_path_factory):
    from training.bundle import export_bundle, shipped_model

    model, images, labels = tiny_keras_model
    served = shipped_model(model, TINY_SIZE, QUANTIZATION_DYNAMIC_INT8, images, TINY_LABELS, "abnormal", 0.5)
    out = tmp_path_factory.mktemp("quantized-bundle") / "serving_bundle"
    bundle = export_bundle(model, out, dataset="tiny", dataset_version="tiny-q", labels=TINY_LABELS,
                           classes=TINY_CLASSES, image_size=TINY_SIZE, canary_images=images[:2],
                           canary_labels=[TINY_LABELS[k] for k in labels[:2]], positive_label="abnormal",
                           threshold=0.5, run_id="local-q", model_name="hemaflow-tiny", git_commit="test",
                           signing_key=SIGNING_KEY, served_model=served)
    assert bundle.meta["quantization"]["method"] == QUANTIZATION_DYNAMIC_INT8
    return out


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def test_quantized_bundle_is_served_and_answers_like_float32(serving_server, quantized_bundle_dir, tiny_bundle_dir):
    quantized = serving_server({"SERVING_BUNDLE_PATH": str(quantized_bundle_dir)})
    plain = serving_server({"SERVING_BUNDLE_PATH": str(tiny_bundle_dir)})
    info = httpx.get(f"{quantized.url}/v1/model").json()
    assert info["quantization"]["method"] == QUANTIZATION_DYNAMIC_INT8
    assert info["quantization"]["validation"]["decision_agreement"] >= 0.995
    assert httpx.get(f"{plain.url}/v1/model").json()["quantization"] == {"method": "none"}
    for image in synthetic_images([0, 1, 0, 1], TINY_SIZE, seed=321):
        files = {"file": ("cell.png", _png(image), "image/png")}
        q = httpx.post(f"{quantized.url}/v1/predict", files=files).json()
        f = httpx.post(f"{plain.url}/v1/predict", files=files).json()
        assert q["label"] == f["label"]
        assert max(abs(q["probabilities"][k] - f["probabilities"][k]) for k in TINY_LABELS) <= 0.05
