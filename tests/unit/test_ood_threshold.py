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


def test_exact_ranks_do_not_jump_for_floating_point_and_both_tails_agree():
    from training.conformal import lower_conformal_rank

    # 400 x (1 - 0.0025) is 399 exactly: 399 validation images are enough at alpha / 2, as documented.
    assert conformal_rank(399, ALPHA / 2) == 399 and conformal_rank(398, ALPHA / 2) == 399
    # The lower tail (the conformal decision threshold): the j-th lowest of n positives, j / (n + 1) <= alpha.
    assert [lower_conformal_rank(n, 0.01) for n in (98, 99, 251, 273)] == [0, 1, 2, 2]
    for n in range(1, 600):
        for alpha in (0.001, 0.005, 0.01, 0.02, 0.05, 0.1):
            j = lower_conformal_rank(n, alpha)
            assert j / (n + 1) <= alpha < (j + 1) / (n + 1) + 1e-12


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
