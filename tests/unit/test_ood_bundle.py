"""The out-of-scope detector fitted on a real (tiny) trained model, exported in a signed bundle
and loaded by serving: thresholds from validation, generated non-smears refused, in-scope images
pass, ood.npz covered by the signed SHA256SUMS."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from contracts.bundle import OUTPUT_FEATURES, BundleError, read_bundle, read_local_bundle
from contracts.imaging import prepare_image
from contracts.ood import OOD_FILE
from contracts.signing import parse_public_keys
from tests.fixtures.keys import PUBLIC_KEY, SIGNING_KEY
from tests.fixtures.training import TINY_SIZE
from tests.serving.support import resum
from training.synthetic import synthetic_images


@pytest.fixture(scope="module")
def fitted(tiny_ood):
    return tiny_ood


@pytest.fixture(scope="module")
def ood_bundle(tiny_ood_bundle_dir):
    return tiny_ood_bundle_dir


def test_thresholds_keep_99_percent_of_validation_and_refuse_non_smears(fitted):
    from training.ood import ALPHA, non_smear_images, pooled_features

    model, detector, figures = fitted
    assert figures["val_pass_rate"] >= 0.99 and figures["val_images"] == 200
    # 200 validation images are too few for a 0.25 % conformal rank per check: the maximum, said so.
    assert figures["alpha"] == ALPHA and figures["conformal_rank"] == 200 and figures["conformal_valid"] == 0.0
    assert figures["synthetic_refused"] >= 0.95
    unseen = synthetic_images([i % 2 for i in range(400)], TINY_SIZE, seed=4242)  # in scope, never fitted on
    refused = [not v.in_scope for v in detector.check(pooled_features(model, unseen), unseen)]
    assert np.mean(refused) <= 0.01
    for kind, pictures in non_smear_images(10, seed=777).items():  # other seeds than training's figures
        batch = np.stack([prepare_image(p, TINY_SIZE) for p in pictures])
        verdicts = detector.check(pooled_features(model, batch), batch)
        assert np.mean([not v.in_scope for v in verdicts]) >= 0.95, kind


def test_bundle_carries_the_signed_detector_and_serving_loads_it(ood_bundle, fitted):
    from serving.bundle import load_bundle

    _, detector, figures = fitted
    bundle = read_bundle(ood_bundle)
    assert OOD_FILE in (ood_bundle / "SHA256SUMS").read_text()
    assert bundle.meta["ood"]["validation"] == figures
    assert bundle.meta["ood"]["feature_threshold"] == pytest.approx(detector.feature_threshold)
    assert bundle.runner().has_features
    model = load_bundle(read_local_bundle(ood_bundle), trusted_keys=parse_public_keys(PUBLIC_KEY))
    assert model.detector is not None and model.scope_note is None
    images = synthetic_images([i % 2 for i in range(20)], TINY_SIZE, seed=5)  # in scope, never fitted on
    probs, _, feats = model.predict_outputs(images)
    assert feats.shape == (20, detector.features.means.shape[1])
    # Thresholds keep >= 99 % of validation: one image may fall outside, most of 20 may not.
    assert sum(v.in_scope for v in model.detector.check(feats, images)) >= 16
    assert np.allclose(probs, model.predict(images)[0])


def test_bundle_without_detector_says_so(tiny_bundle_dir):
    from serving.bundle import load_bundle

    model = load_bundle(read_local_bundle(tiny_bundle_dir), trusted_keys=parse_public_keys(PUBLIC_KEY))
    assert model.detector is None and model.scope_note.startswith("no detector")
    assert model._runner(synthetic_images([0], TINY_SIZE))[OUTPUT_FEATURES].shape[0] == 1


@pytest.mark.parametrize("fault", ["tampered", "unlisted", "bad_arrays"])
def test_a_broken_detector_is_refused(ood_bundle, tmp_path, fault):
    from serving.bundle import load_bundle

    bad = tmp_path / "bad"
    shutil.copytree(ood_bundle, bad)
    if fault == "tampered":  # changed after signing: the checksum catches it
        (bad / OOD_FILE).write_bytes((bad / OOD_FILE).read_bytes()[:-8] + b"\0" * 8)
        expected = "checksum_mismatch"
    elif fault == "unlisted":  # announced in bundle.json but not covered by the signed checksums
        sums = [ln for ln in (bad / "SHA256SUMS").read_text().splitlines() if not ln.endswith(OOD_FILE)]
        (bad / "SHA256SUMS").write_text("\n".join(sums) + "\n")
        from training.bundle import sign_bundle
        sign_bundle(bad, SIGNING_KEY)
        expected = "bad_checksums"
    else:  # signed, but the arrays do not fit the model
        meta = json.loads((bad / "bundle.json").read_text())
        meta["ood"]["feature_dim"] = 3
        (bad / "bundle.json").write_text(json.dumps(meta))
        resum(bad)
        expected = "bad_detector"
    with pytest.raises(BundleError) as err:
        load_bundle(read_local_bundle(bad), trusted_keys=parse_public_keys(PUBLIC_KEY))
    assert err.value.reason == expected


def test_a_bundle_older_than_the_features_output_is_served_with_in_scope_null(tiny_keras_model, tmp_path,
                                                                              monkeypatch):
    """A bundle written before issue 10 (signature: probabilities + class_maps only)."""
    from contracts.bundle import OUTPUT_FEATURES as FEATURES
    from contracts.settings import Settings
    from serving.bundle import load_bundle
    from serving.inference import Inference
    from serving.metrics import ServingMetrics
    from training import bundle as writer
    from training.model import serving_function

    def old_serving_function(model, image_size):
        serve, signature = serving_function(model, image_size)
        return (lambda image: {k: v for k, v in serve(image).items() if k != FEATURES}), signature

    monkeypatch.setattr(writer, "serving_function", old_serving_function)
    monkeypatch.setattr(writer, "_check_features", lambda *a: None)
    model, images, labels = tiny_keras_model
    out = tmp_path / "old"
    writer.export_bundle(model, out, dataset="tiny", dataset_version="old", labels=["abnormal", "normal"],
                         classes={"Blast": "abnormal", "Benign": "normal"}, image_size=TINY_SIZE,
                         canary_images=images[:2], canary_labels=["abnormal", "normal"], positive_label="abnormal",
                         threshold=0.5, signing_key=SIGNING_KEY)
    loaded = load_bundle(read_local_bundle(out), trusted_keys=parse_public_keys(PUBLIC_KEY))
    assert loaded.detector is None  # and no features output: predict_outputs says so below
    probs, cmaps, feats = loaded.predict_outputs(images[:1])
    assert feats is None and probs.shape == (1, 2)
    scope = Inference(Settings(), ServingMetrics()).scope(loaded, images[0], None)
    assert scope.in_scope is None and scope.detail.startswith("no detector") and not scope.refused
