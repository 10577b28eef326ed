"""The out-of-scope detector's numpy core (contracts/ood.py): shrinkage covariance, distances,
image statistics, the ood.npz round trip, and loading refusing arrays that do not fit."""

from __future__ import annotations

import numpy as np
import pytest

from contracts.ood import (
    REASON_FEATURES,
    REASON_STATISTICS,
    STAT_NAMES,
    Gaussian,
    OodDetector,
    image_statistics,
    ledoit_wolf,
)
from training.synthetic import synthetic_images


def test_ledoit_wolf_matches_scikit_learn():
    from sklearn.covariance import LedoitWolf

    rng = np.random.default_rng(0)
    for n, d in ((30, 40), (500, 8)):
        x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
        x -= x.mean(axis=0)
        assert np.allclose(ledoit_wolf(x), LedoitWolf(assume_centered=True).fit(x).covariance_, atol=1e-9)


def test_class_conditional_distance_is_to_the_nearest_class():
    rng = np.random.default_rng(1)
    a, b = rng.normal(0, 1, (200, 3)), rng.normal(10, 1, (200, 3))
    g = Gaussian.fit(np.concatenate([a, b]), np.array([0] * 200 + [1] * 200))
    near_a, near_b, between = g.distance(np.array([[0.0, 0, 0], [10.0, 10, 10], [5.0, 5, 5]]))
    assert near_a < 1 and near_b < 1 and between > 50


def _detector(seed: int = 2) -> tuple[OodDetector, np.ndarray]:
    images = synthetic_images([i % 2 for i in range(120)], 32, seed=seed)
    feats = np.random.default_rng(seed).normal(size=(120, 6))
    return OodDetector(Gaussian.fit(feats, np.arange(120) % 2), Gaussian.fit(image_statistics(images)),
                       feature_threshold=30.0, statistics_threshold=60.0), images


def test_statistics_separate_flat_and_noise_from_smears():
    det, images = _detector()
    smear = det.statistics.distance(image_statistics(images)).max()
    flat = np.full((1, 32, 32, 3), 128, np.uint8)
    noise = np.random.default_rng(3).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    assert image_statistics(images).shape == (120, len(STAT_NAMES))
    assert det.statistics.distance(image_statistics(flat))[0] > 10 * smear
    assert det.statistics.distance(image_statistics(noise))[0] > 10 * smear


def test_check_names_the_reason():
    det, images = _detector()
    feats = det.features.means[:1]
    ok, = det.check(feats, images[:1])
    assert ok.in_scope and ok.reason is None
    far, = det.check(feats + 100.0, images[:1])
    assert not far.in_scope and far.reason == REASON_FEATURES and far.feature_score > det.feature_threshold
    flat, = det.check(feats, np.full((1, 32, 32, 3), 20, np.uint8))
    assert not flat.in_scope and flat.reason == REASON_STATISTICS


def test_npz_round_trip_and_shape_checks():
    det, images = _detector()
    meta = det.describe({"val_pass_rate": 1.0})
    assert meta["feature_dim"] == 6 and meta["validation"] == {"val_pass_rate": 1.0}
    back = OodDetector.load(meta, det.to_npz())
    feats = det.features.means + 0.5
    assert [v.in_scope for v in back.check(feats, images[:2])] == [v.in_scope for v in det.check(feats, images[:2])]
    assert np.allclose(back.scores(feats, images[:2])[0], det.scores(feats, images[:2])[0], rtol=1e-4)
    with pytest.raises(ValueError, match="feature_dim"):
        OodDetector.load({**meta, "feature_dim": 7}, det.to_npz())
    with pytest.raises(ValueError):
        OodDetector.load(meta, b"not an npz")
