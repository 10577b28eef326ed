"""Quantized bundles: dynamic-range int8 is shipped only when it follows Keras on validation images,
else the bundle falls back to float32 and says why; either way serving's canary check holds."""

from __future__ import annotations

import numpy as np
import pytest

from contracts.bundle import (
    CANARY_TOLERANCE,
    CANARY_TOLERANCE_QUANTIZED,
    QUANTIZATION_DYNAMIC_INT8,
    QUANTIZATION_NONE,
    TFLiteRunner,
    canary_tolerance,
    check_canaries,
    read_bundle,
)
from tests.fixtures.keys import SIGNING_KEY
from tests.fixtures.training import TINY_CLASSES, TINY_LABELS, TINY_SIZE
from training import bundle as training_bundle
from training.synthetic import synthetic_images


def _export(model, images, labels, out, **kwargs):
    return training_bundle.export_bundle(
        model, out, dataset="tiny", dataset_version="tiny-q", labels=TINY_LABELS, classes=TINY_CLASSES,
        image_size=TINY_SIZE, canary_images=images[:2], canary_labels=[TINY_LABELS[k] for k in labels[:2]],
        positive_label="abnormal", threshold=0.5, run_id="local-q", model_name="hemaflow-tiny",
        git_commit="test", signing_key=SIGNING_KEY, **kwargs)


def _int8(model, images):
    """shipped_model's choice for dynamic_int8, checked against Keras on `images`."""
    return training_bundle.shipped_model(model, TINY_SIZE, QUANTIZATION_DYNAMIC_INT8, images, TINY_LABELS,
                                         "abnormal", 0.5)


def test_quantized_bundle_is_smaller_follows_keras_and_passes_its_canaries(tiny_keras_model, tmp_path):
    model, images, labels = tiny_keras_model
    quantized = _export(model, images, labels, tmp_path / "q", served_model=_int8(model, images))
    plain = _export(model, images, labels, tmp_path / "f")
    record = quantized.meta["quantization"]
    assert record["method"] == QUANTIZATION_DYNAMIC_INT8, record
    assert record["validation"]["images"] == len(images)
    assert record["validation"]["decision_agreement"] >= training_bundle.QUANTIZED_MIN_DECISION_AGREEMENT
    assert 0 < record["validation"]["max_abs_prob_diff"] <= training_bundle.QUANTIZED_MAX_PROB_DIFF
    assert plain.meta["quantization"] == {"method": QUANTIZATION_NONE}
    assert len(quantized.files["model.tflite"]) < 0.6 * len(plain.files["model.tflite"])
    assert check_canaries(read_bundle(quantized.folder)) <= CANARY_TOLERANCE_QUANTIZED
    # Unseen images: the quantized model answers like the float one, alone or in a batch.
    unseen = synthetic_images([0, 1] * 8, TINY_SIZE, seed=123).astype(np.float32)
    q_runner, f_runner = TFLiteRunner(quantized.files["model.tflite"]), TFLiteRunner(plain.files["model.tflite"])
    q_batch = q_runner(unseen)["probabilities"]
    assert np.max(np.abs(q_batch - f_runner(unseen)["probabilities"])) <= training_bundle.QUANTIZED_MAX_PROB_DIFF
    alone = np.concatenate([q_runner(unseen[i:i + 1])["probabilities"] for i in range(len(unseen))])
    assert np.array_equal(alone, q_batch)  # activations are quantized per image: no batch effects


def test_quantized_model_that_disagrees_falls_back_to_float32(tiny_keras_model, tmp_path, monkeypatch):
    model, images, labels = tiny_keras_model
    monkeypatch.setattr(training_bundle, "QUANTIZED_MAX_PROB_DIFF", 0.0)  # any difference is too much
    bundle = _export(model, images, labels, tmp_path / "b", served_model=_int8(model, images))
    record = bundle.meta["quantization"]
    assert record["method"] == QUANTIZATION_NONE and record["requested"] == QUANTIZATION_DYNAMIC_INT8
    assert "probabilities differ from Keras" in record["fallback_reason"]
    assert bundle.meta["keras_tflite_max_abs_diff"] <= CANARY_TOLERANCE
    assert check_canaries(read_bundle(bundle.folder)) <= CANARY_TOLERANCE


@pytest.mark.parametrize(("agreement", "reason"), [
    ({"max_abs_prob_diff": 0.01, "max_feature_diff": 0.01, "decision_agreement": 1.0}, None),
    ({"max_abs_prob_diff": 0.2, "max_feature_diff": 0.01, "decision_agreement": 1.0}, "probabilities"),
    ({"max_abs_prob_diff": float("nan"), "max_feature_diff": 0.01, "decision_agreement": 1.0}, "probabilities"),
    ({"max_abs_prob_diff": 0.01, "max_feature_diff": 0.3, "decision_agreement": 1.0}, "pooled features"),
    ({"max_abs_prob_diff": 0.01, "max_feature_diff": 0.01, "decision_agreement": 0.98}, "decisions agree"),
])
def test_quantization_refusal_names_the_bound_it_broke(agreement, reason):
    refusal = training_bundle.quantization_refusal(agreement)
    assert refusal is None if reason is None else reason in refusal


def test_canary_tolerance_follows_the_shipped_method():
    assert canary_tolerance({}) == CANARY_TOLERANCE  # bundles from before quantization
    assert canary_tolerance({"quantization": {"method": QUANTIZATION_NONE, "requested": "dynamic_int8"}}) \
        == CANARY_TOLERANCE
    assert canary_tolerance({"quantization": {"method": QUANTIZATION_DYNAMIC_INT8}}) == CANARY_TOLERANCE_QUANTIZED


def test_detector_fitted_on_the_served_model_uses_its_features(tiny_keras_model):
    """Training fits the out-of-scope detector on the features the served (quantized) model computes:
    its validation scores are then exactly what serving will compute for the same images."""
    from training.ood import fit_detector, pooled_features

    model, images, labels = tiny_keras_model
    tflite, record = _int8(model, images)
    assert record["method"] == QUANTIZATION_DYNAMIC_INT8
    runner = TFLiteRunner(tflite)
    val = synthetic_images([0, 1] * 20, TINY_SIZE, seed=5)
    served_features = pooled_features(runner, val)
    assert np.array_equal(served_features, runner(val.astype(np.float32))["features"])
    assert not np.array_equal(served_features, pooled_features(model, val))  # int8 features differ from Keras'
    detector, figures = fit_detector(runner, images, np.array(labels), val)
    distances = detector.features.distance(served_features)
    assert np.mean(distances <= detector.feature_threshold) == figures["val_pass_features"]


def test_agreement_uses_the_keras_probabilities_the_caller_already_has(tiny_keras_model):
    model, images, _ = tiny_keras_model
    runner = TFLiteRunner(training_bundle.convert_to_tflite(model, TINY_SIZE, QUANTIZATION_DYNAMIC_INT8))
    args = (model, runner, images, TINY_LABELS, "abnormal", 0.5)
    computed = training_bundle.quantization_agreement(*args)
    keras_p = model.predict(images.astype(np.float32), batch_size=64, verbose=0)
    assert training_bundle.quantization_agreement(*args, keras_probabilities=keras_p) == computed
    shifted = np.clip(keras_p + np.array([0.2, -0.2], np.float32), 0, 1)
    assert training_bundle.quantization_agreement(*args, keras_probabilities=shifted)["max_abs_prob_diff"] > 0.15
