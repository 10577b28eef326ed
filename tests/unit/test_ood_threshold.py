"""The out-of-scope thresholds' rule (training/ood.py): a split-conformal quantile of the
validation scores, with its finite-sample guarantee checked by simulation."""

from __future__ import annotations

import numpy as np

from training.ood import ALPHA, conformal_rank, conformal_threshold


def test_rank_has_the_finite_sample_correction():
    # ceil((n + 1)(1 - alpha)): 402 validation images at alpha 0.25 % per check -> the largest score,
    # at 0.5 % the second largest; a plain 99.5 % quantile would be the third largest.
    assert conformal_rank(402, ALPHA / 2) == 402
    assert conformal_rank(402, 0.005) == 401
    assert conformal_rank(99, 0.05) == 95


def test_threshold_is_the_ranked_score_and_falls_back_to_the_maximum():
    scores = np.random.default_rng(0).permutation(np.arange(100.0))
    assert conformal_threshold(scores, 0.05) == (95.0, 96, True)  # ceil(101 * 0.95) = 96th smallest
    assert conformal_threshold(scores[:10], 0.05) == (scores[:10].max(), 10, False)  # 10 cannot give 95 %


def test_guarantee_holds_for_any_score_distribution():
    # Expected share of fresh in-scope scores passing is >= 1 - alpha (and close to it), whereas a
    # plain (1 - alpha) quantile of the same small calibration sets falls short.
    rng = np.random.default_rng(1)
    n, alpha, trials = 39, 0.1, 4000
    conformal, plain = [], []
    for _ in range(trials):
        calibration, fresh = rng.lognormal(size=n), rng.lognormal(size=200)
        threshold, _, valid = conformal_threshold(calibration, alpha)
        assert valid
        conformal.append(np.mean(fresh <= threshold))
        plain.append(np.mean(fresh <= np.quantile(calibration, 1 - alpha)))
    assert 1 - alpha <= np.mean(conformal) <= 1 - alpha + 2 / (n + 1)
    assert np.mean(plain) < 1 - alpha
