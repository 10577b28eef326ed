"""Temperature scaling: fitted on validation logits, never changes the argmax, lowers ECE."""

from __future__ import annotations

import numpy as np
import pytest

from training.calibration import fit_temperature, logits_from_probabilities, nll, softmax
from training.evaluate import expected_calibration_error


def _overconfident(n: int = 3000, classes: int = 4, true_t: float = 3.0, seed: int = 0):
    """Labels drawn from softmax(z / true_t): the raw logits z are overconfident by true_t."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 4.0, (n, classes))
    p = softmax(z, true_t)
    y = np.array([rng.choice(classes, p=row) for row in p])
    return z, y


def test_fit_recovers_the_temperature_and_lowers_ece():
    z, y = _overconfident()
    t = fit_temperature(z, y)
    assert t == pytest.approx(3.0, rel=0.1)
    before = expected_calibration_error(y, softmax(z))
    after = expected_calibration_error(y, softmax(z, t))
    assert before > 0.1 and after < 0.03 and after < before / 4
    assert nll(z, y, t) < nll(z, y, 1.0)


def test_temperature_keeps_the_argmax():
    z, _ = _overconfident(200)
    assert (softmax(z, 0.3).argmax(1) == softmax(z, 7.0).argmax(1)).all()


def test_calibrated_logits_give_temperature_near_one():
    z, y = _overconfident(true_t=1.0, seed=1)
    assert fit_temperature(z, y) == pytest.approx(1.0, abs=0.1)


def test_underconfident_logits_get_temperature_below_one():
    z, y = _overconfident(true_t=0.5, seed=2)
    assert fit_temperature(z, y) == pytest.approx(0.5, rel=0.15)


def test_nothing_to_fit_is_temperature_one():
    assert fit_temperature(np.zeros((0, 3)), np.zeros(0, np.int64)) == 1.0


def test_log_probabilities_are_softmax_equivalent_logits():
    z, _ = _overconfident(50)
    p = softmax(z)
    assert np.allclose(softmax(logits_from_probabilities(p), 2.0), softmax(z, 2.0), atol=1e-9)


def test_ece_of_a_perfectly_calibrated_toy_is_zero_and_of_a_wrong_one_is_large():
    probs = np.array([[0.75, 0.25]] * 4)
    assert expected_calibration_error(np.array([0, 0, 0, 1]), probs) == pytest.approx(0.0)
    assert expected_calibration_error(np.array([1, 1, 1, 1]), probs) == pytest.approx(0.75)


def test_temperature_applied_in_keras_and_in_the_exported_graph(tmp_path):
    """with_temperature divides the logits in Keras; the bundle's TFLite graph does the same."""
    from training.bundle import TFLiteRunner, export_bundle, read_bundle
    from training.model import OUTPUT_PROBABILITIES, build_model, pooled_feature_model, temperature_of, with_temperature
    from training.synthetic import synthetic_images

    net = build_model(3, 24, 24, width=4, depth=2, seed=5)
    images = synthetic_images([0, 1, 2, 0], 24, seed=4)
    calibrated = with_temperature(net, 2.5)
    assert temperature_of(net) == 1.0 and temperature_of(calibrated) == pytest.approx(2.5)
    raw = net.predict(images.astype(np.float32), verbose=0)
    cal = calibrated.predict(images.astype(np.float32), verbose=0)
    assert np.allclose(cal, softmax(logits_from_probabilities(raw), 2.5), atol=1e-5)
    assert pooled_feature_model(calibrated).output_shape == (None, 8)
    out = export_bundle(calibrated, tmp_path / "b", dataset="t", dataset_version="v", labels=["a", "b", "c"],
                        classes={"a": "a", "b": "b", "c": "c"}, image_size=24, canary_images=images,
                        canary_labels=["a", "b", "c", "a"], calibration={"method": "temperature", "temperature": 2.5},
                        crop="fit")
    lite = TFLiteRunner(out.folder / "model.tflite")(images.astype(np.float32))[OUTPUT_PROBABILITIES]
    assert np.max(np.abs(lite - cal)) < 1e-4
    meta = read_bundle(out.folder).meta
    assert meta["calibration"]["temperature"] == 2.5
    assert meta["preprocessing"] == {"policy": "resize_longer_pad_square", "resample": "bilinear", "crop": "fit"}
