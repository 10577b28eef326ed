"""Bootstrap intervals: contain the point figure, shrink with more images, exact when all correct."""

from __future__ import annotations

import numpy as np
import pytest

from training.intervals import bootstrap_intervals, roc_auc


def _binary(n: int, error_rate: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    wrong = rng.random(n) < error_rate
    p_pos = np.where((y == 0) ^ wrong, 0.9, 0.1)  # label 0 is "abnormal" (the positive class)
    return y, np.stack([p_pos, 1 - p_pos], axis=1)


def test_interval_contains_value_and_narrows_with_n():
    small = bootstrap_intervals(*_binary(200, 0.05), ["abnormal", "normal"], "abnormal", 0.5, n_boot=300)
    large = bootstrap_intervals(*_binary(5000, 0.05), ["abnormal", "normal"], "abnormal", 0.5, n_boot=300)
    for figs in (small, large):
        for row in figs.values():
            assert row["low"] <= row["value"] <= row["high"]
    width = lambda f, k: f[k]["high"] - f[k]["low"]  # noqa: E731
    assert width(large, "sensitivity") < width(small, "sensitivity") / 2
    assert 0.93 < large["sensitivity"]["value"] < 0.97


def test_perfect_predictions_have_a_degenerate_interval():
    y, p = _binary(300, 0.0)
    figs = bootstrap_intervals(y, p, ["abnormal", "normal"], "abnormal", 0.5, n_boot=100)
    assert figs["sensitivity"] == {"value": 1.0, "low": 1.0, "high": 1.0}


def test_multiclass_macro_f1():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 800)
    probs = np.eye(4)[np.where(rng.random(800) < 0.9, y, (y + 1) % 4)] * 0.7 + 0.075
    figs = bootstrap_intervals(y, probs, list("abcd"), n_boot=200)
    assert 0.85 < figs["macro_f1"]["value"] < 0.95 and figs["macro_f1"]["low"] < figs["macro_f1"]["value"]
    assert "sensitivity" not in figs


@pytest.mark.parametrize("decimals", [None, 2, 0])  # untied scores, many ties, scores all 0 or 1
def test_roc_auc_is_sklearns(decimals):
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(decimals or 7)
    y = rng.random(1500) < 0.8
    scores = rng.random(1500) * 0.6 + 0.4 * y
    scores = scores if decimals is None else np.round(scores, decimals)
    assert roc_auc(y, scores) == pytest.approx(roc_auc_score(y, scores), abs=1e-12)
    assert np.isnan(roc_auc(np.ones(5, bool), np.arange(5.0)))
