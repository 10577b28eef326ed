"""The API and batch screening give the same answer for the same image and bundle: same crop
policy (the bundle's), same probabilities, same label, with and without test-time augmentation
(INFERENCE_TTA, which also switches both to the bundle's TTA threshold). Real uvicorn server, real
SeaweedFS for the batch side's image reads and previews; the bundle is the tiny trained model with
its detector, exported with the `fit` crop policy and a `tta` record, and the image a 320x240
field whose cell sits at its left edge (center_crop would cut it off)."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.fixtures.keys import PUBLIC_KEY, SIGNING_KEY
from tests.fixtures.training import TINY_CLASSES, TINY_LABELS, TINY_SIZE

pytestmark = [pytest.mark.slow, pytest.mark.integration]

TTA_THRESHOLD = 0.97  # unlike the plain 0.5: which one decided the label shows
RULE_RECORD = {"rule": "quantile", "target_sensitivity": 0.99}  # as training records it (bundle.json)


def _export_fit_bundle(tiny_ood, tiny_keras_model, out, **tta_record):
    from training.bundle import export_bundle

    model, detector, figures = tiny_ood
    _, images, labels = tiny_keras_model
    export_bundle(model, out, dataset="tiny", dataset_version="tiny-fit", labels=TINY_LABELS, classes=TINY_CLASSES,
                  image_size=TINY_SIZE, canary_images=images[:2], canary_labels=[TINY_LABELS[k] for k in labels[:2]],
                  positive_label="abnormal", threshold=0.5, run_id="local-fit", model_name="hemaflow-tiny",
                  git_commit="test", signing_key=SIGNING_KEY, ood=(detector, figures), crop="fit",
                  extra={"tta": {"views": 8, "threshold": TTA_THRESHOLD, "validation": {}, "test": {}, **tta_record},
                         "threshold_rule": RULE_RECORD})
    return out


@pytest.fixture(scope="module")
def fit_bundle(tiny_ood, tiny_keras_model, tmp_path_factory):
    """Its `tta` record has no on_by_default, as bundles before per-dataset defaults: TTA when unset."""
    return _export_fit_bundle(tiny_ood, tiny_keras_model, tmp_path_factory.mktemp("fit-bundle") / "serving_bundle")


@pytest.fixture(scope="module")
def one_view_bundle(tiny_ood, tiny_keras_model, tmp_path_factory):
    """The same model from a dataset whose spec says `inference_tta = false`."""
    return _export_fit_bundle(tiny_ood, tiny_keras_model, tmp_path_factory.mktemp("one-view") / "serving_bundle",
                              on_by_default=False)


def _off_centre_field(tiny_keras_model) -> bytes:
    """A 320x240 PNG: a training image of the tiny model scaled into the left quarter of a field."""
    _, images, _ = tiny_keras_model
    field = np.full((240, 320, 3), int(np.median(images[0])), dtype=np.uint8)
    cell = np.asarray(Image.fromarray(images[0]).resize((80, 80)))
    field[80:160, 0:80] = cell
    buf = io.BytesIO()
    Image.fromarray(field).save(buf, format="PNG")
    return buf.getvalue()


def _screened(bundle_dir, data: bytes, s3, settings, tta: bool) -> dict:
    """The batch side: screening's own row for the image, read from S3 like a batch image."""
    from contracts.bundle import read_bundle, verify_signature
    from contracts.ood import bundle_detector
    from contracts.signing import parse_public_keys
    from pipeline.storage import put_bytes
    from screening.champion import ChampionRef, ScoringModel
    from screening.score import score_key

    bundle = read_bundle(bundle_dir)
    runner = bundle.runner(num_threads=1)
    model = ScoringModel(ChampionRef("hemaflow-tiny", "1", "local-fit"), bundle.meta, runner,
                         verify_signature(bundle.files, parse_public_keys(PUBLIC_KEY)),
                         bundle_detector(bundle.files, bundle.meta, runner), tta)
    assert model.threshold == (TTA_THRESHOLD if tta else 0.5)
    key = "inbox/tiny/agreement/field.png"
    put_bytes(s3, settings.s3_bucket, key, data, "image/png")
    return score_key(s3, key, model, "results/tiny/agreement/1/", settings)


@pytest.mark.parametrize("tta", [False, True], ids=["plain", "tta"])
def test_screening_and_the_api_prepare_and_answer_alike(tta, fit_bundle, tiny_keras_model, serving_server,
                                                        local_stack, s3):
    from contracts.bundle import TFLiteRunner
    from contracts.imaging import prepare_image
    from contracts.tta import views

    data = _off_centre_field(tiny_keras_model)
    assert not np.array_equal(prepare_image(data, TINY_SIZE, crop="fit"),
                              prepare_image(data, TINY_SIZE, crop="center_crop"))  # the policy matters here
    # Labelled even when flagged out of scope (a padded field is mostly background), as batch rows are.
    server = serving_server({"SERVING_BUNDLE_PATH": str(fit_bundle), "SERVING_REFUSE_OUT_OF_SCOPE": "false",
                             "INFERENCE_TTA": str(tta).lower()})
    info = httpx.get(f"{server.url}/v1/model").json()
    assert info["tta"] is tta and info["threshold"] == (TTA_THRESHOLD if tta else 0.5)
    api = httpx.post(f"{server.url}/v1/predict", files={"file": ("field.png", data, "image/png")}).json()
    assert api["threshold"] == info["threshold"]
    image = prepare_image(data, TINY_SIZE, crop="fit")
    runner = TFLiteRunner(fit_bundle / "model.tflite")
    expected = runner.predict_proba(views(image[None])).mean(axis=0) if tta else runner.predict_proba(image[None])[0]
    p_abnormal = expected[TINY_LABELS.index("abnormal")]
    assert api["label"] == ("abnormal" if p_abnormal >= info["threshold"] else "normal")
    assert np.allclose([api["probabilities"][lab] for lab in TINY_LABELS], expected, atol=1e-5)
    row = _screened(fit_bundle, data, s3, local_stack, tta)
    assert row["tta"] is tta
    assert row["error"] is None and row["in_scope"] == api["in_scope"]
    assert row["label"] == api["label"]
    assert np.allclose([row[f"p_{lab}"] for lab in TINY_LABELS], [api["probabilities"][lab] for lab in TINY_LABELS],
                       atol=1e-5), (row, api)


def test_unset_inference_tta_answers_as_each_bundle_chose(fit_bundle, one_view_bundle, serving_server):
    """INFERENCE_TTA empty (as in .env.example): the API answers as the model's dataset spec chose at
    training (bundle.json tta.on_by_default; bundles without it: TTA); a value set still wins."""
    for bundle_dir, setting, expected in ((fit_bundle, "", True), (one_view_bundle, "", False),
                                          (one_view_bundle, "true", True), (fit_bundle, "false", False)):
        server = serving_server({"SERVING_BUNDLE_PATH": str(bundle_dir), "INFERENCE_TTA": setting})
        info = httpx.get(f"{server.url}/v1/model").json()
        assert (info["tta"], info["threshold"]) == (expected, TTA_THRESHOLD if expected else 0.5), (setting, info)
        assert info["threshold_rule"] == RULE_RECORD
        server.stop()
