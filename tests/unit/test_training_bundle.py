"""The serving bundle reproduces the Keras model, and its class maps are Grad-CAM."""

from __future__ import annotations

import json

import numpy as np
import pytest

from contracts.bundle import (
    OUTPUT_CLASS_MAPS,
    OUTPUT_PROBABILITIES,
    BundleError,
    TFLiteRunner,
    check_canaries,
    read_bundle,
    read_local_bundle,
    verify_checksums,
)
from training.model import gradcam_keras
from training.synthetic import synthetic_images


def test_bundle_files_and_metadata(tiny_bundle_dir):
    bundle = read_bundle(tiny_bundle_dir)
    names = {p.relative_to(tiny_bundle_dir).as_posix() for p in tiny_bundle_dir.rglob("*") if p.is_file()}
    assert {"model.tflite", "bundle.json", "SHA256SUMS", "SHA256SUMS.sig", "canary/0.png"} <= names
    meta = bundle.meta
    assert meta["format_version"] == 1 and meta["task"] == "binary"
    assert meta["labels"] == ["abnormal", "normal"] and meta["positive_label"] == "abnormal"
    assert meta["preprocessing"] == {"policy": "resize_shorter_center_crop", "resample": "bilinear",
                                     "crop": "center_crop"}
    assert len(meta["canaries"]) == 4 and all(len(c["probabilities"]) == 2 for c in meta["canaries"])
    sums = (tiny_bundle_dir / "SHA256SUMS").read_text().splitlines()
    assert len(sums) == len(names) - 2  # every file but SHA256SUMS and its signature


def test_tflite_matches_keras_on_unseen_images(tiny_keras_model, tiny_bundle_dir):
    model, _, _ = tiny_keras_model
    images = synthetic_images([0, 1] * 8, 32, seed=99).astype(np.float32)
    lite = TFLiteRunner(tiny_bundle_dir / "model.tflite")(images)
    keras_probs = model.predict(images, verbose=0)
    assert lite[OUTPUT_PROBABILITIES].shape == (16, 2)
    assert np.max(np.abs(lite[OUTPUT_PROBABILITIES] - keras_probs)) <= 1e-4
    # The tiny model has learned the classes, so the comparison is not between constants.
    assert np.ptp(keras_probs[:, 0]) > 0.05


@pytest.mark.parametrize("class_index", [0, 1])
def test_class_maps_equal_gradient_tape_gradcam(tiny_keras_model, tiny_bundle_dir, class_index):
    model, _, _ = tiny_keras_model
    images = synthetic_images([0, 1, 1, 0], 32, seed=5).astype(np.float32)
    maps = TFLiteRunner(tiny_bundle_dir / "model.tflite")(images)[OUTPUT_CLASS_MAPS]
    h, w = maps.shape[1:3]
    reference = gradcam_keras(model, images, class_index)
    ours = maps[..., class_index] / (h * w)
    scale = float(np.max(np.abs(reference)))
    assert scale > 0
    assert np.max(np.abs(ours - reference)) <= 1e-4 * max(1.0, scale)
    # After the ReLU + normalisation serving applies, the heat maps agree too.
    def norm(m):
        m = np.maximum(m, 0)
        return m / (m.max(axis=(1, 2), keepdims=True) + 1e-12)
    assert np.max(np.abs(norm(ours) - norm(reference))) <= 1e-3


def test_canaries_pass_and_tampering_is_detected(tiny_bundle_dir, tmp_path):
    import shutil

    assert check_canaries(read_bundle(tiny_bundle_dir)) <= 1e-4
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle_dir, copy)
    meta = json.loads((copy / "bundle.json").read_text())
    meta["threshold"] = 0.01
    (copy / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="sha256 mismatch"):
        verify_checksums(read_local_bundle(copy))
    (copy / "extra.txt").write_text("x")
    with pytest.raises(BundleError, match="differ"):
        read_bundle(copy)


def test_wrong_expected_canary_output_is_rejected(tiny_bundle_dir, tmp_path):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle_dir, copy)
    bundle = read_bundle(copy)
    bundle.meta["canaries"][0]["probabilities"][0] += 0.01
    with pytest.raises(BundleError, match="canary_mismatch: canary canary/0.png: outputs differ"):
        check_canaries(bundle)


@pytest.mark.parametrize("conv", ["standard", "separable"])
def test_served_twin_equals_the_network_trained_on_resized_images(conv):
    """Training at the network size + Resizing inside the served model = the same function
    (the conv type is read from the trained network, not passed)."""
    import tensorflow as tf

    from training.model import build_model, served_twin

    net = build_model(3, 16, 16, width=4, depth=2, seed=3, conv=conv)
    served = served_twin(net, 3, 40, 16, width=4, depth=2)
    assert [type(layer) for layer in served.layers if layer.name.startswith("b")] == [
        type(layer) for layer in net.layers if layer.name.startswith("b")]
    images = synthetic_images([0, 1, 2, 0], 40, seed=2).astype(np.float32)
    resized = tf.image.resize(images, [16, 16], method="bilinear").numpy()
    assert np.max(np.abs(served.predict(images, verbose=0) - net.predict(resized, verbose=0))) <= 1e-5
