"""Drift (contracts.drift, contracts.drift_checks) on real statistics: a re-stained batch is flagged, an unchanged
held-out batch is not. Real smear fields from ../shared/data when present, generated
smear-like images otherwise (both paths run the same assertions)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from contracts.drift import PROFILE_FORMAT, ProfileError, build_profile, load_profile, profile_bytes
from contracts.drift_checks import DriftThresholds, drift_report
from tests.helpers import SHARED_DATA, restain

SIZE = 64
THRESHOLDS = DriftThresholds(alpha=0.01, min_effect=0.5, strong_effect=1.5, min_images=20, permutations=200)


def _smears(n: int) -> tuple[np.ndarray, list[str]]:
    """n shuffled smear images and their labels: real leukemia fields if present, else generated."""
    root = SHARED_DATA / "leukemia"
    files = sorted(root.rglob("*.jpg")) if root.is_dir() else []
    if len(files) >= n:
        from contracts.imaging import prepare_image

        pick = np.random.default_rng(0).permutation(len(files))[:n]
        images = np.stack([prepare_image(files[i].read_bytes(), SIZE) for i in pick]).astype(np.uint8)
        return images, ["normal" if files[i].parent.name == "Benign" else "abnormal" for i in pick]
    from training.synthetic import synthetic_images

    ks = list(np.random.default_rng(0).integers(0, 2, n))
    return synthetic_images(ks, SIZE, seed=3), [["abnormal", "normal"][k] for k in ks]


@pytest.fixture(scope="module")
def smears():
    images, labels = _smears(360)
    return {"train": (images[:300], labels[:300]), "held": (images[300:], labels[300:])}


@pytest.fixture(scope="module")
def profile(smears):
    return build_profile(*smears["train"], dataset="leukemia", dataset_version="v-train")


def test_unchanged_held_out_batch_is_not_flagged(profile, smears):
    images, labels = smears["held"]
    result = drift_report(profile, images, labels=labels, thresholds=THRESHOLDS)
    assert result.level == "none", [c.detail for c in result.checks]
    assert result.check("colour").tested and result.check("label_mix").tested
    assert not result.check("features").tested  # no features given: said, not hidden
    assert 'data-drift-level="none"' in result.html_section()


def test_restained_batch_is_flagged(profile, smears):
    images, labels = smears["held"]
    result = drift_report(profile, restain(images, 20, 1.25), labels=labels, thresholds=THRESHOLDS)
    colour = result.check("colour")
    assert colour.drifted and colour.p_value < THRESHOLDS.alpha, colour.detail
    assert result.level in ("drift", "strong")
    assert result.metrics()["drift_colour_drifted"] == 1.0
    assert "Drift detected" in result.html_section() or "STRONG DRIFT" in result.html_section()


def test_heavy_restain_is_strong_and_marked(profile, smears):
    images, labels = smears["held"]
    result = drift_report(profile, restain(images, 60, 1.6), labels=labels, thresholds=THRESHOLDS)
    assert result.level == "strong"
    assert result.metrics()["drift_level"] == 2.0
    assert "STRONG DRIFT" in result.html_section()


def test_predicted_label_mix_shift_is_flagged(profile, smears):
    images, _ = smears["held"]
    result = drift_report(profile, images, labels=["normal"] * len(images), thresholds=THRESHOLDS)
    assert result.check("label_mix").drifted and not result.check("colour").drifted


def test_too_few_images_are_reported_not_tested(profile, smears):
    images, labels = smears["held"]
    result = drift_report(profile, images[:5], labels=labels[:5], thresholds=THRESHOLDS)
    assert result.level == "none" and not any(c.tested for c in result.checks)
    assert "DRIFT_MIN_IMAGES" in result.checks[0].detail


def test_a_bundle_without_profile_is_reported_not_tested(smears):
    images, labels = smears["held"]
    result = drift_report(None, images, labels=labels, thresholds=THRESHOLDS)
    assert result.level == "none" and not result.tested and not any(c.tested for c in result.checks)
    page = result.html_section()
    assert "Drift not tested: the model&#x27;s bundle has no training-data profile" in page
    assert "No drift detected" not in page and 'data-drift-level="untested"' in page
    assert result.to_dict()["tested"] is False


def test_per_image_stats_stand_in_for_the_images(profile, smears):
    """Batch scoring keeps image_stats rows, not pixels: the same verdict and figures."""
    from contracts.drift import image_stats

    images, labels = smears["held"]
    moved = restain(images, 20, 1.25)
    from_pixels = drift_report(profile, moved, labels=labels, thresholds=THRESHOLDS)
    from_stats = drift_report(profile, stats=image_stats(moved), labels=labels, thresholds=THRESHOLDS)
    assert from_stats.to_dict() == from_pixels.to_dict() and from_stats.level != "none"


def test_profile_round_trips_and_refuses_unknown_format(profile):
    again = load_profile(profile_bytes(profile))
    assert again["format"] == PROFILE_FORMAT and again["n_images"] == 300
    assert sum(again["label_mix"].values()) == 300
    with pytest.raises(ProfileError):
        load_profile(json.dumps({**profile, "version": 99}))


def test_pooled_feature_mmd_flags_restained_not_unchanged(tiny_keras_model):
    """The MMD test on the pooled_features layer of a trained CNN (generated images, its training kind)."""
    from training.model import POOLED_FEATURES_LAYER, pooled_feature_model
    from training.synthetic import synthetic_images

    model, _, _ = tiny_keras_model
    pooled = pooled_feature_model(model)
    ks = [i % 2 for i in range(240)]
    images = synthetic_images(ks, 32, seed=11)
    feats = pooled.predict(images.astype(np.float32), verbose=0)
    labels = [["abnormal", "normal"][k] for k in ks]
    profile = build_profile(images[:180], labels[:180], features=feats[:180], feature_layer=POOLED_FEATURES_LAYER)
    held = images[180:]
    same = drift_report(profile, held, features=feats[180:], labels=labels[180:], thresholds=THRESHOLDS)
    assert not same.check("features").drifted, same.check("features").detail
    shifted = restain(held, 120, 1.8)  # a strong stain change: features must move, not only colours
    moved = drift_report(profile, shifted, features=pooled.predict(shifted.astype(np.float32), verbose=0),
                         labels=labels[180:], thresholds=THRESHOLDS)
    assert moved.check("features").drifted, moved.check("features").detail
    assert moved.level == "strong"


def test_profile_drift_of_a_restained_dataset_version(profile, smears):
    """A new dataset version is compared profile to profile (what training does against the champion)."""
    from contracts.drift_checks import profile_drift

    images, labels = smears["held"]
    same = build_profile(images, labels, dataset_version="v-new")
    assert profile_drift(profile, same, thresholds=THRESHOLDS).level == "none"
    moved = profile_drift(profile, build_profile(restain(images, 20, 1.25), labels), thresholds=THRESHOLDS)
    assert moved.check("colour").drifted and moved.level != "none"
    assert moved.check("label_mix").tested and not moved.check("label_mix").drifted
